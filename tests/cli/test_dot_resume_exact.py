"""DOT (``optim.name: dot``) runs resume bit for bit: both momentum buffers live in the
optimizer's state dict, so a run stopped mid-epoch (step checkpoint) or after an epoch ends
equal to an uninterrupted one. SD-DKD (gradient clip 40, "auto") and DCKD + CRD (CRD's
embedding heads get only the distillation gradient)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlab.cli.main import main
from kdlab.engine import trainer as trainer_mod
from support import assert_same, save_random_teacher

pytestmark = pytest.mark.e2e  # trains runs end to end

STEPS_PER_EPOCH = 4  # 32 images, batch 8
METHODS = {
    "sd_dkd": {"name": "sd_dkd", "params": {"warmup_epochs": 2}},
    "dckd_crd": {"name": "dckd", "partners": [{"name": "crd", "params": {"nce_k": 16}}]},
}
TIMING = ("train_img_per_s", "train_time_s", "eval_time_s")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_teacher(tmp_path_factory.mktemp("teacher") / "t.pth", 4, seed=1)


def config(tmp_path: Path, teacher: Path, method: dict[str, Any]) -> Path:
    cfg = {
        "name": "dot_resume",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 32, "n_test": 16, "num_classes": 4}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher)},
        "method": method,
        "optim": {"name": "dot", "args": {"delta": 0.075}, "epochs": 3, "milestones": [2],
                  "lr": 0.05},
        "runtime": {"threads": 1, "amp": "off", "deterministic": True,
                    "checkpoint_every_steps": 1000000},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def distill(cfg: Path, run: Path, *extra: str) -> int:
    return main(["-q", "distill", str(cfg), "--run-dir", str(run), "--no-progress", *extra])



def metrics(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_dot_run_resumes_bit_exactly_mid_epoch(tmp_path: Path, teacher: Path, method: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(tmp_path, teacher, METHODS[method])
    full = tmp_path / "full"
    assert distill(cfg, full) == 0

    # stop after epoch 2's second step, as SIGTERM would: a step checkpoint is written
    part = tmp_path / "part"
    real = trainer_mod.Trainer.backward_step

    def stop_at(self: Any, *args: Any) -> None:
        real(self, *args)
        if self.state.global_step == STEPS_PER_EPOCH + 2:
            self._stop_signal = signal.SIGTERM

    monkeypatch.setattr(trainer_mod.Trainer, "backward_step", stop_at)
    assert distill(cfg, part) == 128 + signal.SIGTERM
    monkeypatch.setattr(trainer_mod.Trainer, "backward_step", real)
    step = torch.load(part / "checkpoints" / "step.pt", weights_only=True)
    assert (step["mid_epoch"]["epoch"], step["mid_epoch"]["step"]) == (2, 2)
    buffers = {k for s in step["optimizer"]["state"].values() for k in s}
    assert buffers == {"momentum_buffer", "momentum_kd_buffer"}
    group = step["optimizer"]["param_groups"][0]
    assert group["momentum"] == pytest.approx(0.825) and group["momentum_kd"] == 0.975

    assert distill(cfg, part, "--resume") == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "distiller", "optimizer", "scaler"):
        assert_same(a[key], b[key], key)
    assert metrics(full) == metrics(part)
    if method == "dckd_crd":  # CRD's heads are trained by the distillation gradient alone
        only_kd = [s for s in a["optimizer"]["state"].values()
                   if set(s) == {"momentum_kd_buffer"}]
        assert only_kd


def test_dot_run_resumes_bit_exactly_after_an_epoch(tmp_path: Path, teacher: Path) -> None:
    cfg = config(tmp_path, teacher, METHODS["sd_dkd"])
    full, part = tmp_path / "full", tmp_path / "part"
    assert distill(cfg, full) == 0
    assert distill(cfg, part, "--stop-after", "1") == 0
    assert distill(cfg, part, "--resume") == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "distiller", "optimizer"):
        assert_same(a[key], b[key], key)
    assert metrics(full) == metrics(part)
