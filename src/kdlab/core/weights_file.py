"""Reading weights files safely, with kdlab's one integrity check.

:func:`read_checkpoint` loads with ``torch.load(weights_only=True)`` (no code can run);
:func:`state_digest` is the sha256 kdlab stores in every checkpoint it writes under
:data:`INTEGRITY_KEY` (:func:`kdlab.runs.checkpoint.save_atomic`, exported weights), and
:func:`read_verified` reads a file and checks that digest: every reader of a kdlab file (resume,
teacher loading, eval, export, :func:`kdlab.load_student`) goes through it.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from kdlab.core.errors import CheckpointError

__all__ = ["INTEGRITY_KEY", "read_checkpoint", "read_verified", "state_digest"]

INTEGRITY_KEY = "integrity_sha256"


def state_digest(obj: Any) -> str:
    """sha256 over a checkpoint's content: every tensor's dtype, shape and bytes, every scalar.

    Stored in the checkpoint by :func:`save_atomic` and checked by :func:`load_latest`, so a
    file whose bits changed on disk is detected even when it still unpickles.
    """
    h = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                visit(x[k])
            h.update(b"}")
        elif isinstance(x, list | tuple):
            h.update(b"[")
            for v in x:
                visit(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    visit(obj)
    return h.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file with ``torch.load(weights_only=True)`` (no code can run).

    Raises :class:`CheckpointError` with a one-line reason when the file is missing, truncated,
    not a torch file, or holds objects outside the weights-only allow-list.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            OSError, IndexError, KeyError, TypeError, AttributeError, OverflowError) as e:
        # a corrupt file makes the weights-only unpickler fail in many ways (all seen by fuzzing)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def read_verified(path: str | Path) -> dict[str, Any]:
    """:func:`read_checkpoint`, then the stored :data:`INTEGRITY_KEY` checked and removed.

    A file without the key (a published teacher, a file of another tool) is accepted as read.

    Raises:
        CheckpointError: unreadable (see :func:`read_checkpoint`), or its content no longer
            matches the sha256 stored in it (changed on disk after it was written).
    """
    state = read_checkpoint(path)
    stored = state.pop(INTEGRITY_KEY, None)
    if stored is not None and stored != state_digest(state):
        raise CheckpointError(f"checkpoint {path} fails its sha256 check (changed on disk after "
                              "it was written)")
    return state
