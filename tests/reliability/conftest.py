"""Shared pieces of the fault-injection suite: a tiny distillation config, one uninterrupted
reference run (computed once per session), children that die at chosen points, and bit-exact
comparison of two run directories."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlab.cli.main import main
from support import assert_same, save_random_teacher

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_faulty_child.py"
EPOCHS = 4
STEPS_PER_EPOCH = 8  # 64 training images, batch 8
TIMING = ("train_img_per_s", "train_time_s", "eval_time_s")

BASE_CFG: dict[str, Any] = {
    "name": "reliability",
    "data": {"name": "synthetic", "batch_size": 8,
             "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 4}},
    "student": {"arch": "resnet8"},
    "teacher": {"arch": "resnet14", "checkpoint": None},
    "method": {"name": "sd_dkd", "params": {"warmup_epochs": EPOCHS},  # fits the schedule
               "partners": [{"name": "crd", "params": {"nce_k": 32}}]},
    "optim": {"epochs": EPOCHS, "milestones": [2], "lr": 0.05},
    "runtime": {"threads": 1, "amp": "off", "deterministic": True},
}


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init resnet14 (4 classes) saved as ``{"model": state_dict}``."""
    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "resnet14_c4.pth", 4, seed=1)


@pytest.fixture(scope="session")
def write_cfg(teacher_ckpt: Path) -> Callable[..., Path]:
    """``write_cfg(folder, **changes)``: the suite's config (deep-merged changes) as YAML."""

    def write(folder: Path, name: str = "cfg.yaml", **changes: Any) -> Path:
        cfg = _merge(BASE_CFG, {"teacher": {"checkpoint": str(teacher_ckpt)}})
        cfg = _merge(cfg, changes)
        if cfg["data"]["name"] != "synthetic":  # a real dataset reads no synthetic section
            cfg["data"].pop("synthetic")
        if "name" in changes.get("method", {}) and "params" not in changes["method"]:
            cfg["method"].pop("params")  # the base's params are sd_dkd's
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def cfg_path(suite_dir: Path, write_cfg: Callable[..., Path]) -> Path:
    """The one config every kill/resume test uses (so all runs share a fingerprint)."""
    return write_cfg(suite_dir)


@pytest.fixture(scope="session")
def reference(suite_dir: Path, cfg_path: Path) -> Path:
    """One uninterrupted run, the ground truth every interrupted run must equal bit for bit."""
    run = suite_dir / "reference"
    assert cli(["distill", str(cfg_path), "--run-dir", str(run)]) == 0
    assert (run / "summary.json").exists()
    return run


def cli(argv: list[str]) -> int:
    """``kdlab -q ARGV --no-progress`` in this process; returns the exit status."""
    extra = ["--no-progress"] if argv[0] in ("train", "distill") else []
    return main(["-q", *argv, *extra])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1] / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_faulty_child(fault: str, argv: list[str], timeout: float = 180
                     ) -> subprocess.CompletedProcess[str]:
    """Run ``kdlab ARGV`` in a child that SIGKILLs itself at ``fault``; asserts it was killed."""
    proc = subprocess.run([sys.executable, str(CHILD), fault, "--", "-q", *argv, "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, env=child_env())
    assert proc.returncode == -9, (
        f"child with fault {fault} was not killed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc



def metrics(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the timing fields (every line must parse)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_runs_equal(reference: Path, run: Path) -> None:
    """Final weights (student, distiller incl. CRD memory, optimizer), best weights and metrics
    of ``run`` equal those of ``reference`` bit for bit; both are finished."""
    assert (run / "summary.json").exists(), "run did not finish"
    a = load(reference / "checkpoints" / "last.pt")
    b = load(run / "checkpoints" / "last.pt")
    assert b["epoch"] == EPOCHS
    for key in ("model", "distiller", "optimizer", "scheduler", "rng"):
        assert_same(a[key], b[key], key)
    assert_same(load(reference / "checkpoints" / "best.pt")["model"],
                load(run / "checkpoints" / "best.pt")["model"], "best")
    assert metrics(reference) == metrics(run)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (reference, run))
    for k in ("best_top1", "best_epoch", "last_top1", "skipped_steps", "epochs"):
        assert sa[k] == sb[k], k


