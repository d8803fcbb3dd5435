"""Teacher identity on resume: the teacher file must be the one the run started with (sha256),
unless ``--allow-teacher-change`` is given (then the change is recorded); the teacher accuracy
guard applies on resume as at the start."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdlab.models import create_model
from support import one_error_line

from .conftest import cli

pytestmark = pytest.mark.e2e  # trains runs end to end


def _own_teacher(tmp_path: Path, teacher_ckpt: Path) -> Path:
    path = tmp_path / "teacher.pth"
    shutil.copy(teacher_ckpt, path)
    return path


def test_swapped_teacher_is_refused_on_resume(write_cfg: Callable[..., Path],
                                              teacher_ckpt: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    teacher = _own_teacher(tmp_path, teacher_ckpt)
    cfg = write_cfg(tmp_path, teacher={"checkpoint": str(teacher)}, optim={"epochs": 2})
    run = tmp_path / "run"
    assert cli(["distill", str(cfg), "--run-dir", str(run), "--stop-after", "1"]) == 0
    recorded = json.loads((run / "teacher.json").read_text())["sha256"]

    torch.manual_seed(7)  # another resnet14: same architecture, other weights
    torch.save({"model": create_model("resnet14", num_classes=4).state_dict()}, teacher)
    capsys.readouterr()
    assert cli(["distill", str(cfg), "--run-dir", str(run), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "changed since the run started" in line and "--allow-teacher-change" in line
    assert json.loads((run / "status.json").read_text())["epoch"] == 1  # nothing trained

    assert cli(["distill", str(cfg), "--run-dir", str(run), "--resume",
                "--allow-teacher-change"]) == 0
    info = json.loads((run / "teacher.json").read_text())
    assert info["sha256"] != recorded
    assert info["changes"][0]["from_sha256"] == recorded
    assert info["changes"][0]["to_sha256"] == info["sha256"]
    assert info["changes"][0]["after_epoch"] == 1
    assert (run / "summary.json").exists()


def test_same_teacher_resumes(write_cfg: Callable[..., Path], teacher_ckpt: Path,
                              tmp_path: Path) -> None:
    teacher = _own_teacher(tmp_path, teacher_ckpt)
    cfg = write_cfg(tmp_path, teacher={"checkpoint": str(teacher)}, optim={"epochs": 2})
    run = tmp_path / "run"
    assert cli(["distill", str(cfg), "--run-dir", str(run), "--stop-after", "1"]) == 0
    shutil.copy(teacher_ckpt, tmp_path / "copy.pth")  # touching other files changes nothing
    assert cli(["distill", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert "changes" not in json.loads((run / "teacher.json").read_text())


def test_teacher_guard_applies_on_resume(write_cfg: Callable[..., Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A run stopped by the accuracy guard does not train on --resume (it stops again, or is
    refused for holding no run); nothing is trained either way."""
    cfg = write_cfg(tmp_path, teacher={"expected_accuracy": 99.0}, optim={"epochs": 2})
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli(["distill", str(cfg), "--run-dir", str(run)]) == 2
    assert "does not match its claimed accuracy" in one_error_line(capsys.readouterr().err)
    assert cli(["distill", str(cfg), "--run-dir", str(run), "--resume"]) != 0
    one_error_line(capsys.readouterr().err)
    assert not (run / "checkpoints" / "last.pt").exists()
    assert not (run / "summary.json").exists()
