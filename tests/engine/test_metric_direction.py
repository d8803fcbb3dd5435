"""A task whose best metric is lower-is-better: the trainer, the summary and the teacher check
follow the task's declared direction (they used to take ``max`` for every metric)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import kdlab
from kdlab.core.errors import RunError
from kdlab.core.registries import TASKS
from kdlab.tasks.base import Metric, register_task
from kdlab.tasks.classification.task import ClassificationTask

pytestmark = pytest.mark.e2e


class ErrorTask(ClassificationTask):
    """Classification scored by its error rate (100 - top-1, lower is better)."""

    name = "classification_by_error"
    metrics = (*ClassificationTask.metrics, Metric("error", "error", higher_is_better=False))
    best_metric = "error"
    report_metrics = ("error", "top1")

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        scores = super().evaluate(*args, **kwargs)
        return {**scores, "error": 100.0 - scores["top1"]}


@pytest.fixture(scope="module", autouse=True)
def _registered() -> Iterator[None]:
    register_task(ErrorTask)
    yield
    TASKS.unregister(ErrorTask.name)


def _config(**over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": ErrorTask.name,
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 96, "n_test": 48, "num_classes": 4, "size": 16}},
        "student": {"arch": "resnet8"},
        # a large learning rate makes the test loss go up and down over the epochs
        "optim": {"epochs": 5, "lr": 0.3, "milestones": [], "weight_decay": 0.0},
        "runtime": {"amp": "off", "threads": 1},
    }
    cfg.update(over)
    return cfg


def _records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "test_loss" in r]


def test_declared_direction() -> None:
    task = ErrorTask()
    assert task.higher_is_better is False and ClassificationTask().higher_is_better is True
    assert task.is_better(5.0, 7.0) and not task.is_better(7.0, 5.0) and task.is_better(9.0, None)
    assert Metric("loss", "loss", higher_is_better=False).best([0.3, 0.1, 0.2]) == 0.1
    assert Metric("top1", "top-1").best([30.0, 50.0, 40.0]) == 50.0
    assert math.isnan(Metric("top1", "top-1").best([]))


@pytest.mark.parametrize("val_fraction", [0.0, 0.25])
def test_best_epoch_and_summary_take_the_lowest_error(tmp_path: Path,
                                                      val_fraction: float) -> None:
    run = tmp_path / "run"
    cfg = _config()
    cfg["data"]["val_fraction"] = val_fraction
    summary = kdlab.run(cfg, run_dir=run, progress=False)
    records = _records(run)
    errors = [r["test_error"] for r in records]
    assert min(errors) < max(errors)  # the test would not tell min from max otherwise
    assert summary["best_error"] == min(errors)
    chosen = "val_error" if val_fraction else "test_error"
    lowest = min(records, key=lambda r: r[chosen])
    assert summary["best_epoch"] == lowest["epoch"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == lowest["epoch"]


def test_teacher_check_follows_the_direction(tmp_path: Path) -> None:
    teacher_run = tmp_path / "teacher"
    kdlab.run(_config(optim={"epochs": 1, "lr": 0.1, "milestones": []}), run_dir=teacher_run,
              progress=False)
    ckpt = str(teacher_run / "checkpoints" / "best.pt")
    error = _records(teacher_run)[-1]["test_error"]
    student = {"optim": {"epochs": 1, "lr": 0.1, "milestones": []}}
    # a teacher error below (better than) its claim passes; one well above it fails
    fine = {"arch": "resnet8", "checkpoint": ckpt, "expected_accuracy": min(error + 10.0, 100.0),
            "accuracy_tolerance": 0.5}
    kdlab.run(_config(teacher=fine, method={"name": "kd"}, **student),
              run_dir=tmp_path / "fine", progress=False)
    assert json.loads((tmp_path / "fine" / "teacher.json").read_text())["error"] == error
    worse = {**fine, "expected_accuracy": max(error - 10.0, 0.0), "accuracy_tolerance": 0.1}
    with pytest.raises(RunError, match="does not match its claimed accuracy"):
        kdlab.run(_config(teacher=worse, method={"name": "kd"}, **student),
                  run_dir=tmp_path / "worse", progress=False)
