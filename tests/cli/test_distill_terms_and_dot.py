"""End-to-end: ``kdlab distill`` on synthetic data with DIST, TTM, WTTM + CRD, and the DOT
optimizer under SD-DKD and KD (the shipped CIFAR-100 configs' methods, on tiny models)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlab.cli.main import main
from support import run_distill, save_random_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "t.pth", 5, seed=0)


def run(tmp_path: Path, teacher: Path, method: dict[str, Any],
        optim: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = {
        "name": "e2e",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 24, "n_test": 16, "num_classes": 5}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher)},
        "method": method,
        "optim": {"epochs": 1, "milestones": [], "lr": 0.01, **(optim or {})},
        "runtime": {"threads": 2, "amp": "off"},
    }
    run_dir = run_distill(tmp_path, cfg)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(math.isfinite(v) for v in record["train_terms"].values())
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    return record, ckpt


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "terms"), [
    ({"name": "dist"}, {"ce", "dist"}),
    ({"name": "ttm"}, {"ce", "ttm"}),
    ({"name": "wttm", "partners": [{"name": "crd", "params": {"nce_k": 16}}]},
     {"ce", "wttm", "crd"}),
])
def test_new_logit_methods_train(tmp_path: Path, teacher: Path, method: dict[str, Any],
                                 terms: set[str]) -> None:
    record, ckpt = run(tmp_path, teacher, method)
    assert set(record["train_terms"]) == terms
    assert ckpt["epoch"] == 1


@pytest.mark.e2e
@pytest.mark.parametrize("method", [{"name": "sd_dkd"}, {"name": "kd"}])
def test_dot_optimizer_trains(tmp_path: Path, teacher: Path, method: dict[str, Any]) -> None:
    record, ckpt = run(tmp_path, teacher, method, {"name": "dot", "args": {"delta": 0.075}})
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["momentum"] == pytest.approx(0.825) and group["momentum_kd"] == 0.975
    state = ckpt["optimizer"]["state"]
    assert state and all("momentum_kd_buffer" in s for s in state.values())


def test_dot_refuses_a_method_without_its_task_term(tmp_path: Path, teacher: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"name": "synthetic", "batch_size": 8,
                 "synthetic": {"n_train": 16, "n_test": 8, "num_classes": 5}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher)},
        "method": {"name": "kd"},
        "optim": {"name": "dot", "args": {"task_terms": ["task"]}, "epochs": 1,
                  "milestones": []},
        "runtime": {"threads": 2, "amp": "off"}}))
    assert main(["-q", "distill", str(cfg), "--run-dir", str(tmp_path / "r"),
                 "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.args.task_terms" in err[0]
