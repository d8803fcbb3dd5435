"""The teacher check evaluates a teacher file once per process and test set
(``kdlab.engine.trainer._TEACHER_EVALS``): a second run with the same teacher and data reuses the
evaluation and records the same teacher.json; a different test set is evaluated again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdlab.engine import trainer as trainer_mod
from support import run_distill, save_random_teacher


def _cfg(teacher: Path, n_test: int) -> dict[str, Any]:
    return {
        "name": "cache",
        "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 16,
                 "synthetic": {"n_train": 32, "n_test": n_test, "num_classes": 4, "size": 16}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet8", "checkpoint": str(teacher)},
        "method": {"name": "kd"},
        "optim": {"epochs": 1, "milestones": [], "lr": 0.05},
        "runtime": {"threads": 1, "amp": "off"},
    }


def test_a_teacher_is_evaluated_once_per_test_set(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "_TEACHER_EVALS", {})
    teacher = save_random_teacher(tmp_path / "teacher.pth", 4, seed=3, arch="resnet8")
    calls: list[int] = []
    original = trainer_mod.Trainer._check_teacher

    def counting(self: Any) -> None:
        before = len(trainer_mod._TEACHER_EVALS)
        original(self)
        calls.append(len(trainer_mod._TEACHER_EVALS) - before)  # 1: evaluated, 0: reused

    monkeypatch.setattr(trainer_mod.Trainer, "_check_teacher", counting)
    runs = [run_distill(tmp_path / name, _cfg(teacher, n)) for name, n in
            (("a", 24), ("b", 24), ("c", 40))]
    assert calls == [1, 0, 1]
    records = [json.loads((r / "teacher.json").read_text()) for r in runs]
    assert records[0] == records[1]  # the reused evaluation is the recorded one
    assert records[2]["sha256"] == records[0]["sha256"]
