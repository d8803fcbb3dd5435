"""Downloads without the network: md5 checks, atomic writes, safe tar extraction."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
from pathlib import Path

import pytest

from kdlab.core.errors import DatasetError
from kdlab.data import download as dl
from kdlab.data import load_cifar, write_cifar
from kdlab.data.cifar import CIFAR_SPECS


class _FakeResponse(io.BytesIO):
    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> _FakeResponse:
        calls.append(url)
        return _FakeResponse(payload)

    monkeypatch.setattr(dl.urllib.request, "urlopen", fake_urlopen)
    return calls


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(url: str, timeout: float = 0) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(dl.urllib.request, "urlopen", fail)


def _tar(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_md5_mismatch_detected_and_nothing_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve(monkeypatch, b"not the archive")
    dest = tmp_path / "a.tar.gz"
    with pytest.raises(DatasetError, match="md5 mismatch"):
        dl.download_file("https://example.invalid/a.tar.gz", dest, "0" * 32)
    assert not dest.exists() and not (tmp_path / "a.tar.gz.part").exists()


def test_download_and_extract_local_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = _tar(tmp_path / "src.tar.gz", {"pkg/a.txt": b"hello", "pkg/b/c.txt": b"x"})
    calls = _serve(monkeypatch, blob)
    out = tmp_path / "out"
    archive = dl.download_and_extract("https://h/x.tar.gz", out, hashlib.md5(blob).hexdigest())
    assert archive == out / "x.tar.gz" and (out / "pkg" / "a.txt").read_bytes() == b"hello"
    # Present with the right md5: no second download.
    dl.download_and_extract("https://h/x.tar.gz", out, hashlib.md5(blob).hexdigest())
    assert len(calls) == 1


@pytest.mark.parametrize("bad", ["../escape.txt", "ok/../../escape.txt", "/abs/escape.txt"])
def test_safe_extract_rejects_escaping_members(tmp_path: Path, bad: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    _tar(archive, {"fine.txt": b"1", bad: b"2"})
    dest = tmp_path / "dest" / "inner"
    with pytest.raises(DatasetError, match="unsafe path"):
        dl.safe_extract_tar(archive, dest)
    assert not (tmp_path / "dest" / "escape.txt").exists()
    assert not (dest / "fine.txt").exists()  # nothing extracted at all


def test_safe_extract_rejects_links(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("passwd")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DatasetError, match="link or special file"):
        dl.safe_extract_tar(archive, tmp_path / "d")


def test_no_network_message_names_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_network(monkeypatch)
    with pytest.raises(DatasetError, match="could not download") as err:
        load_cifar(tmp_path, "cifar100", download=True)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_load_cifar_download_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    write_cifar(src, "cifar10", n_train=25, n_test=5)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    blob = archive.read_bytes()
    _serve(monkeypatch, blob)
    monkeypatch.setattr(CIFAR_SPECS["cifar10"], "md5", hashlib.md5(blob).hexdigest())
    ds = load_cifar(tmp_path / "root", "cifar10", train=True, download=True)
    assert len(ds) == 25 and (tmp_path / "root" / "cifar-10-python.tar.gz").is_file()
