"""Downloading dataset archives: md5-checked, atomic, with safe tar extraction.

Only the standard library is used (``urllib``). A download is written to ``<name>.part`` next to
its destination, checked against its md5 and only then renamed into place, so an interrupted or
corrupt download never looks like a finished one. Archives are extracted only after every member
has been checked to stay inside the destination folder (no absolute paths, no ``..``, no links
or device files).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from kdlab.core.errors import DatasetError
from kdlab.core.io import atomic_write, file_md5

__all__ = ["download_and_extract", "download_file", "safe_extract_tar"]

_CHUNK = 1 << 20


def download_file(
    url: str, dest: str | os.PathLike[str], md5: str | None, *, timeout: float = 60.0
) -> Path:
    """Download ``url`` to ``dest`` atomically and check its md5; return ``dest``.

    An existing ``dest`` with the right md5 is kept as is. Network failures and md5 mismatches
    raise :class:`DatasetError`; a mismatching download is deleted.
    """
    dest = Path(dest)
    if dest.is_file() and (md5 is None or file_md5(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out: BinaryIO) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise DatasetError(
                f"could not download {url} ({reason}); download it on a machine with internet "
                f"and copy it to {dest}"
            ) from exc
        if md5 is not None and digest.hexdigest() != md5:
            raise DatasetError(
                f"md5 mismatch for {url}: got {digest.hexdigest()}, expected {md5} "
                f"(corrupt or tampered download; try again or fetch it manually into "
                f"{dest.parent})"
            )

    # The .part file is removed on any failure (network, disk, md5) and renamed into place only
    # after the md5 matched. Not fsynced (an archive is re-checked against its md5 when used).
    atomic_write(dest, fetch, fsync=False, tmp_suffix=".part")
    return dest


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a tar member that could write outside the extraction folder."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DatasetError(f"unsafe path {name!r} in archive {archive}; refusing to extract it")
    if not (member.isfile() or member.isdir()):
        raise DatasetError(
            f"archive {archive} holds a link or special file {name!r}; refusing to extract it"
        )


def safe_extract_tar(archive: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Extract a (possibly compressed) tar archive into ``dest`` after checking every member.

    Raises :class:`DatasetError` for members with absolute paths, ``..`` components, links or
    device files, and for unreadable archives; nothing is extracted in those cases.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
                target = (root / member.name).resolve()
                if target != root and root not in target.parents:
                    raise DatasetError(
                        f"unsafe path {member.name!r} in archive {archive}; refusing to extract it"
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4; members were checked above
                tar.extractall(root, members=members)  # noqa: S202
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(
            f"cannot extract {archive}: {exc} (delete it and download again)"
        ) from exc


def download_and_extract(
    url: str, root: str | os.PathLike[str], md5: str | None, *, keep_archive: bool = True
) -> Path:
    """Download the archive at ``url`` into ``root`` (md5-checked) and extract it there safely.

    Returns the archive path. With ``keep_archive=False`` the archive is deleted after a
    successful extraction.
    """
    root = Path(root)
    archive = download_file(url, root / url.rstrip("/").rsplit("/", 1)[-1], md5)
    safe_extract_tar(archive, root)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return archive
