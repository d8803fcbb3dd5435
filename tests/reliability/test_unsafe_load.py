"""Nothing unsafe is loaded: checkpoints only weights-only, CIFAR pickles only through the
restricted unpickler, and run-directory writes cannot escape the run directory."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdlab.core.errors import CheckpointError, RunError
from kdlab.runs.checkpoint import load_latest, save_atomic
from kdlab.runs.rundir import RunDir
from support import one_error_line

from .conftest import cli
from .test_bad_input import _cifar_folder


class _Payload:
    """Pickles to "call Path.touch(marker)": proof of code execution if it ever runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_code_carrying_teacher_checkpoint_is_rejected(tmp_path: Path,
                                                      write_cfg: Callable[..., Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    cfg = write_cfg(tmp_path, teacher={"checkpoint": str(evil)})
    capsys.readouterr()
    assert cli(["distill", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot read checkpoint" in line and str(evil) in line
    assert not marker.exists(), "the pickle payload ran"


def test_code_carrying_last_checkpoint_is_skipped(tmp_path: Path) -> None:
    """A poisoned last.pt on resume is treated as unreadable: the payload never runs and the
    previous checkpoint is used."""
    marker = tmp_path / "pwned"
    last = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, last)
    save_atomic({"epoch": 2}, last)
    torch.save({"epoch": 3, "x": _Payload(marker)}, last)
    found = load_latest(last)
    assert found is not None and found[0]["epoch"] == 1 and found[1].name == "last.pt.prev"
    assert not marker.exists()
    torch.save({"x": _Payload(marker)}, last.with_name("last.pt.prev"))
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest(last)
    assert not marker.exists()


def test_crafted_cifar_pickle_rejected_through_cli(tmp_path: Path,
                                                   write_cfg: Callable[..., Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    folder = _cifar_folder(tmp_path / "data")
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(marker)}, protocol=2))
    cfg = write_cfg(tmp_path, data={"name": "cifar10", "root": str(tmp_path / "data")})
    capsys.readouterr()
    assert cli(["distill", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "data_batch_1" in line
    assert not marker.exists(), "the pickle payload ran"


#: stands for an absolute path outside the run (made under the test's own tmp_path)
ABSOLUTE = "<absolute>"


@pytest.mark.parametrize("name", ["../escape.json", ABSOLUTE, "a/../../x.json",
                                  "link/escape.json"])
def test_run_dir_writes_cannot_escape(name: str, tmp_path: Path) -> None:
    absolute = tmp_path / "absolute-escape.json"
    if name == ABSOLUTE:
        name = str(absolute)
    run = tmp_path / "run"
    run.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "link").symlink_to(outside)
    rd = RunDir(run)
    with pytest.raises(RunError, match="escapes the run directory"):
        rd.write_json(name, {"x": 1})
    assert not (tmp_path / "escape.json").exists()
    assert not (outside / "escape.json").exists()
    assert not absolute.exists()
    rd.write_json("inside.json", {"x": 1})
    assert rd.read_json("inside.json") == {"x": 1}
