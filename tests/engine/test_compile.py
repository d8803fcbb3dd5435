"""``runtime.compile``: the compiled training step computes what the eager step computes.

This is the GPU fast path's correctness check, run on CPU (inductor generates C++ here, Triton
on a GPU; the graph capture of kdlab's models, their ``ModelOutput`` and the distillation losses
is the same). Two steps of SD-DKD resnet14 -> resnet8 on 16x16 synthetic images, eager vs
compiled from identical weights: every loss term and the updated student weights must agree to
fp32 reassociation tolerance.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from kdlab.config import validate_config
from kdlab.engine.trainer import Trainer
from kdlab.models import create_model

pytestmark = [
    pytest.mark.e2e,  # compiles and runs trainer steps: several seconds
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="torch.compile on CPU needs a C++ compiler"),
]


def _trainer(tmp_path, teacher_ckpt, compile_: bool, name: str) -> Trainer:
    cfg = validate_config({
        "name": name,
        "seed": 3,
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 16, "n_test": 16, "num_classes": 10, "size": 16}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher_ckpt)},
        "method": {"name": "sd_dkd", "params": {"scales": [1, 2], "warmup_epochs": 1}},
        "optim": {"epochs": 2, "milestones": [], "lr": 0.05},
        "runtime": {"device": "cpu", "threads": 2, "amp": "off", "compile": compile_},
    }, "test")
    trainer = Trainer(cfg, run_dir=tmp_path / name)
    trainer.setup()
    return trainer


def _two_steps(trainer: Trainer) -> list[dict[str, float]]:
    losses = []
    trainer.student.train()
    trainer.train_loader.set_epoch(1)
    for batch in trainer.train_loader:
        result = trainer.step(batch, epoch=1)
        losses.append({k: float(v.detach()) for k, v in result.terms.items()})
    return losses


def test_compiled_step_matches_eager(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = tmp_path / "t.pth"
    torch.save({"model": create_model("resnet14", num_classes=10).state_dict()}, teacher)
    eager = _trainer(tmp_path, teacher, False, "eager")
    compiled = _trainer(tmp_path, teacher, True, "compiled")
    assert compiled.student_fwd is not compiled.student  # the compiled wrapper is in use
    compiled.student.load_state_dict(eager.student.state_dict())

    eager_losses = _two_steps(eager)
    compiled_losses = _two_steps(compiled)
    assert len(eager_losses) == 2
    for e, c in zip(eager_losses, compiled_losses, strict=True):
        assert e.keys() == c.keys()
        for k in e:
            assert c[k] == pytest.approx(e[k], rel=1e-4, abs=1e-5), k
    for (name, a), b in zip(eager.student.state_dict().items(),
                            compiled.student.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
