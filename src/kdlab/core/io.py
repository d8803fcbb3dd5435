"""File I/O every layer needs: atomic writes and file digests.

Atomic writes: a reader (or a resumed run) sees the old file or the new one, never a torn
one.

:func:`atomic_write` writes ``NAME.tmp`` in the destination's folder, flushes and fsyncs it,
optionally keeps the current ``NAME`` as ``NAME.prev``, renames the temporary file over ``NAME``
with :func:`os.replace` and fsyncs the folder so the rename itself is durable. A crash or a kill
at any point leaves either the new file or the previous one complete (with ``keep_previous``,
killed between the two renames, only ``NAME.prev`` and ``NAME.tmp`` exist: readers fall back to
``NAME.prev``).

Digests: :func:`file_sha256` (teacher checkpoints, exported files, downloads) and
:func:`file_md5` (the published md5 of dataset archives).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["Writer", "atomic_write", "file_md5", "file_sha256", "fsync_dir"]

_CHUNK = 1 << 20

#: A callback that writes the file's content into the open (binary) temporary file.
Writer = Callable[[BinaryIO], None]


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the folder ``path`` so that renames inside it survive a power loss.

    Best effort: a folder that cannot be opened or fsynced (some filesystems and platforms
    refuse) is silently skipped, as the file data itself has already been fsynced.
    """
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


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes | str | Writer,
    *,
    keep_previous: bool = False,
    fsync: bool = True,
    tmp_suffix: str = ".tmp",
) -> None:
    """Replace ``path`` with ``data`` atomically.

    ``data`` is bytes, a str (written as UTF-8), or a callable that writes into the open binary
    temporary file (e.g. ``lambda f: torch.save(state, f)``). The temporary file is
    ``path`` + ``tmp_suffix`` in the same folder. With ``keep_previous`` an existing ``path`` is
    first moved to ``path.prev``. With ``fsync`` (the default) the temporary file is fsynced
    before the rename and the folder after it.

    On any exception (an ``OSError`` such as a full disk, a ``RuntimeError`` from a serialiser,
    or whatever the writer raises) the temporary file is removed, ``path`` is left as it was
    (moved back from ``path.prev`` if the final rename failed), and the exception propagates
    unchanged for the caller to wrap in its own error type. The folder must exist.
    """
    path = Path(path)
    tmp = path.with_name(path.name + tmp_suffix)
    prev = path.with_name(path.name + ".prev")
    moved_to_prev = False
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, prev)
            moved_to_prev = True
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if moved_to_prev and not path.exists():
            with contextlib.suppress(OSError):
                os.replace(prev, path)
        raise
    if fsync:
        fsync_dir(path.parent)


def _file_digest(path: str | os.PathLike[str], digest: Any) -> str:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return str(digest.hexdigest())


def file_md5(path: str | os.PathLike[str]) -> str:
    """The hex md5 digest of a file."""
    return _file_digest(path, hashlib.md5(usedforsecurity=False))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex sha256 digest of a file (teacher checkpoints, exported files, downloads)."""
    return _file_digest(path, hashlib.sha256())
