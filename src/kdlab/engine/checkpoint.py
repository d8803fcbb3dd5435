"""Atomic checkpoint files: a run never loses its last good checkpoint.

Writing: the state is serialised to ``NAME.tmp`` in the same folder, flushed and fsynced, the
current ``NAME`` is kept as ``NAME.prev``, then the temporary file is renamed over ``NAME`` and
the folder is fsynced. A crash, a kill or a full disk at any point leaves either the new file or
the previous one complete. Reading falls back from ``NAME`` to ``NAME.prev`` with a warning when
the latest file is truncated or corrupt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from kdlab.errors import CheckpointError
from kdlab.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename), keeping ``path.prev``.

    On any write failure (e.g. disk full) the temporary file is removed, the existing checkpoint
    is untouched, and :class:`CheckpointError` is raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not write checkpoint {path}: {e}; "
                              "the previous checkpoint is kept") from e
    if keep_previous and path.exists():
        prev = path.with_name(path.name + ".prev")
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_latest(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """Read ``path``, or ``path.prev`` if ``path`` is missing or unreadable. None if neither is.

    A corrupt latest file is reported with a warning and skipped, never deleted.
    """
    path = Path(path)
    candidates = [path, path.with_name(path.name + ".prev")]
    errors = []
    for cand in candidates:
        if not cand.exists():
            continue
        try:
            return read_checkpoint(cand), cand
        except CheckpointError as e:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", cand, e)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no readable checkpoint in {path.parent}: {'; '.join(errors)}")
    return None
