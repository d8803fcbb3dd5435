"""Atomic checkpoint files: a run never loses its last good checkpoint.

Writing: the state is serialised to ``NAME.tmp`` in the same folder, flushed and fsynced, the
current ``NAME`` is kept as ``NAME.prev``, then the temporary file is renamed over ``NAME`` and
the folder is fsynced. A crash, a kill or a full disk at any point leaves either the new file or
the previous one complete. Reading falls back from ``NAME`` to ``NAME.prev`` with a warning when
the latest file is truncated or corrupt.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from kdlab.core.errors import CheckpointError
from kdlab.core.io import atomic_write
from kdlab.core.signals import signals_deferred
from kdlab.core.weights_file import INTEGRITY_KEY, read_verified, state_digest

__all__ = ["load_latest", "remove_checkpoint", "save_atomic"]

log = logging.getLogger(__name__)

class _ByteCounter:
    """A write-only sink that counts what ``torch.save`` writes into it (nothing is kept)."""

    name = "<checkpoint size probe>"

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.size += n
        return n

    def flush(self) -> None:
        pass


def _disk_full_cause(e: BaseException) -> OSError | None:
    """The "no space" ``OSError`` (ENOSPC, or EDQUOT: quota exceeded) behind ``e``, if any.

    ``torch.save`` turns a failed write into a ``RuntimeError`` ("unexpected pos ...") whose
    context is the ``OSError``, so the cause/context chain is searched.
    """
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _mb(n_bytes: float) -> str:
    mb = n_bytes / 1e6
    return f"{mb:.1f}" if mb < 10 else f"{mb:.0f}"


def save_atomic(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename), keeping ``path.prev``.

    Uses :func:`kdlab.core.io.atomic_write`. On any write failure (e.g. disk full) the temporary
    file is removed, the existing checkpoint is untouched, and :class:`CheckpointError` is
    raised. When the disk is full the message says so and gives the checkpoint's serialised
    size (measured by serialising it again into a byte counter) and the space left on that disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {**state, INTEGRITY_KEY: state_digest(state)}
    try:
        with signals_deferred():
            atomic_write(path, lambda f: torch.save(state, f), keep_previous=keep_previous)
    except (OSError, RuntimeError) as e:
        kept = "the previous checkpoint is kept"
        full = _disk_full_cause(e)
        if full is None:
            raise CheckpointError(f"could not write checkpoint {path}: "
                                  f"{' '.join(str(e).split())}; {kept}") from e
        cause = os.strerror(full.errno or errno.ENOSPC)
        try:
            counter = _ByteCounter()
            torch.save(state, counter)
            needs = f"it needs about {_mb(counter.size)} MB"
        except Exception:  # the size is a hint: never hide the disk-full error behind it
            needs = "it needs more space"
        try:
            free = f", {_mb(shutil.disk_usage(path.parent).free)} MB free on that disk"
        except OSError:
            free = ""
        raise CheckpointError(f"could not write checkpoint {path}: {cause}; {needs}{free}; "
                              f"{kept} (free some space, then --resume)") from e


def remove_checkpoint(path: str | Path) -> None:
    """Delete ``path`` and the ``path.prev`` that :func:`save_atomic` keeps beside it."""
    path = Path(path)
    for stale in (path, path.with_name(path.name + ".prev")):
        stale.unlink(missing_ok=True)


def load_latest(path: str | Path) -> tuple[dict[str, Any], Path] | None:
    """Read ``path``, or ``path.prev`` if ``path`` is missing or unreadable. None if neither is.

    A corrupt latest file (unreadable, or failing the sha256 stored in it) is reported with a
    warning and skipped, never deleted.
    """
    path = Path(path)
    candidates = [path, path.with_name(path.name + ".prev")]
    errors = []
    for cand in candidates:
        if not cand.exists():
            continue
        try:
            return read_verified(cand), cand
        except CheckpointError as e:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", cand, e)
            errors.append(str(e))
    if errors:
        raise CheckpointError(f"no readable checkpoint in {path.parent}: {'; '.join(errors)}")
    return None
