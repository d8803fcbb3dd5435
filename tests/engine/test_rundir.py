"""Run directories refuse to mix runs; metrics survive torn writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import validate_config
from kdlab.engine.rundir import RunDir
from kdlab.errors import RunError


def cfg(**optim):
    return validate_config({"student": {"arch": "resnet8"}, "optim": optim})


def test_new_then_unfinished_requires_resume(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert rd.prepare(cfg(), resume=False) == "new"
    assert (rd.path / "env.json").exists() and rd.config_path.exists()
    with pytest.raises(RunError, match="--resume"):
        rd.prepare(cfg(), resume=False)
    assert rd.prepare(cfg(), resume=True) == "resume"


def test_different_run_is_refused(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(lr=0.05), resume=False)
    with pytest.raises(RunError, match="different run"):
        rd.prepare(cfg(lr=0.1), resume=True)


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("x")
    with pytest.raises(RunError, match="not a kdlab run"):
        RunDir(tmp_path / "run").prepare(cfg(), resume=False)


def test_metrics_torn_line_and_truncate(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(), resume=False)
    for e in (1, 2, 3):
        rd.append_metrics({"epoch": e})
    with open(rd.metrics_path, "a") as f:
        f.write('{"epoch": 4, "tru')
    assert [r["epoch"] for r in rd.read_metrics()] == [1, 2, 3]
    rd.truncate_metrics(2)
    assert [r["epoch"] for r in rd.read_metrics()] == [1, 2]


def test_paths_cannot_escape(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(), resume=False)
    with pytest.raises(RunError, match="escapes"):
        rd.write_json("../outside.json", {})
    assert not (tmp_path / "outside.json").exists()


def test_resume_does_not_adopt_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a kdlab run"):
        RunDir(tmp_path / "run").prepare(cfg(), resume=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run" / "config.yaml").exists()
