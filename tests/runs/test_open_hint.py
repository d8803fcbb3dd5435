"""Opening a folder that holds runs (not a run itself) names the runs inside (issue 23)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.api import load_student
from kdlab.core.errors import RunError
from kdlab.runs.open import open_run, runs_inside_hint


def _fake_run(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("student: {arch: resnet8}\n")
    return path


def test_folder_of_seed_runs_names_them(tmp_path: Path) -> None:
    method = tmp_path / "sd_dkd"
    runs = [_fake_run(method / f"seed{s}") for s in range(5)]
    hint = runs_inside_hint(method)
    assert hint == f"; it holds runs: {runs[0]}, {runs[1]}, {runs[2]} (+2 more)"
    with pytest.raises(RunError, match=r"no config.yaml\); it holds runs: .*seed0"):
        open_run(method)
    with pytest.raises(RunError, match="seed0"):
        load_student(method)


def test_empty_folder_has_no_hint(tmp_path: Path) -> None:
    assert runs_inside_hint(tmp_path) == ""
    with pytest.raises(RunError, match=r"\(no config.yaml\)$"):
        open_run(tmp_path)
