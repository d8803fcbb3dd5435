"""kdlab.core.io.atomic_write: content, .prev, and failures that leave the old file intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import pytest

from kdlab.core import io as atomic
from kdlab.core.io import atomic_write, fsync_dir


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("data", [b"\x00\x01bytes\xff", "text \u00e9\n"])
def test_writes_bytes_and_utf8_text(tmp_path: Path, data: bytes | str) -> None:
    p = tmp_path / "out.bin"
    atomic_write(p, data)
    expected = data.encode("utf-8") if isinstance(data, str) else data
    assert p.read_bytes() == expected
    assert _listing(tmp_path) == ["out.bin"]


def test_writer_callback_and_overwrite(tmp_path: Path) -> None:
    p = tmp_path / "f.txt"
    p.write_bytes(b"old")

    def writer(f: BinaryIO) -> None:
        assert Path(f.name).name == "f.txt.tmp"  # the temporary file, in the same folder
        f.write(b"new ")
        f.write(b"content")

    atomic_write(p, writer)
    assert p.read_bytes() == b"new content"
    assert _listing(tmp_path) == ["f.txt"]  # no .prev unless asked, no temp file left


def test_keep_previous(tmp_path: Path) -> None:
    p = tmp_path / "last.pt"
    atomic_write(p, b"one", keep_previous=True)
    assert _listing(tmp_path) == ["last.pt"]  # nothing to keep yet
    atomic_write(p, b"two", keep_previous=True)
    atomic_write(p, b"three", keep_previous=True)
    assert p.read_bytes() == b"three"
    assert (tmp_path / "last.pt.prev").read_bytes() == b"two"
    assert _listing(tmp_path) == ["last.pt", "last.pt.prev"]


@pytest.mark.parametrize("keep_previous", [False, True])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   RuntimeError("serialiser failed"), ValueError("bug")])
def test_failing_writer_leaves_old_file_and_no_temp(tmp_path: Path, keep_previous: bool,
                                                     error: Exception) -> None:
    p = tmp_path / "state.json"
    atomic_write(p, b"v1", keep_previous=True)
    atomic_write(p, b"v2", keep_previous=True)

    def half_then_fail(f: BinaryIO) -> None:
        f.write(b"partial")
        f.flush()
        raise error

    with pytest.raises(type(error)) as info:
        atomic_write(p, half_then_fail, keep_previous=keep_previous)
    assert info.value is error  # propagated unchanged, for the caller to wrap
    assert p.read_bytes() == b"v2"
    assert (tmp_path / "state.json.prev").read_bytes() == b"v1"
    assert _listing(tmp_path) == ["state.json", "state.json.prev"]


def test_failing_final_rename_restores_the_file(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The old file was already moved to .prev when the last rename fails: it is moved back."""
    p = tmp_path / "last.pt"
    atomic_write(p, b"old")
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name == "last.pt.tmp":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(p, b"new", keep_previous=True)
    monkeypatch.undo()
    assert p.read_bytes() == b"old"
    assert _listing(tmp_path) == ["last.pt"]


def test_temp_suffix_and_no_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def writer(f: BinaryIO) -> None:
        seen.append(Path(f.name).name)
        f.write(b"x")

    def no_fsync(fd: int) -> None:
        raise AssertionError("fsync called with fsync=False")

    monkeypatch.setattr(atomic.os, "fsync", no_fsync)
    atomic_write(tmp_path / "a.tar.gz", writer, fsync=False, tmp_suffix=".part")
    monkeypatch.undo()
    assert seen == ["a.tar.gz.part"]
    assert (tmp_path / "a.tar.gz").read_bytes() == b"x"
    assert _listing(tmp_path) == ["a.tar.gz"]


def test_fsync_calls_file_and_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    atomic_write(tmp_path / "f", b"x")
    monkeypatch.undo()
    assert len(synced) == 2  # the temporary file, then the folder


def test_fsync_dir_tolerates_missing_folder(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    fsync_dir(tmp_path / "missing")  # best effort: no error


def test_missing_folder_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "no" / "such" / "f.txt", "x")
    assert _listing(tmp_path) == []
