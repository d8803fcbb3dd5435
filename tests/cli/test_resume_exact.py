"""A run stopped after epoch 1 and resumed ends bit-for-bit equal to an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli.main import main
from kdlab.models import create_model
from support import assert_same

pytestmark = pytest.mark.e2e  # trains runs end to end


def config(tmp_path: Path, epochs: int, teacher_ckpt: Path) -> Path:
    cfg = {
        "name": "resume",
        "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 32,
                 "synthetic": {"n_train": 64, "n_test": 32, "num_classes": 10}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher_ckpt)},
        "method": {"name": "sd_dkd", "params": {"warmup": 2}, "partners": [{"name": "crd"}]},
        "optim": {"epochs": epochs, "milestones": [2], "lr": 0.05},
        "runtime": {"threads": 1, "amp": "off", "deterministic": True},
    }
    p = tmp_path / f"cfg{epochs}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p



def test_resume_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(1)
    teacher = tmp_path / "t.pth"
    torch.save({"model": create_model("resnet14", num_classes=10).state_dict()}, teacher)
    full = tmp_path / "full"
    assert main(["-q", "distill", str(config(tmp_path, 3, teacher)), "--run-dir", str(full),
                 "--no-progress"]) == 0

    part = tmp_path / "part"
    cfg3 = config(tmp_path, 3, teacher)
    assert main(["-q", "distill", str(cfg3), "--run-dir", str(part), "--no-progress",
                 "--stop-after", "1"]) == 0
    assert not (part / "summary.json").exists()
    assert json.loads((part / "status.json").read_text())["state"] == "stopped"
    assert main(["-q", "distill", str(cfg3), "--run-dir", str(part), "--resume",
                 "--no-progress"]) == 0
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    assert_same(a["model"], b["model"])
    assert_same(a["distiller"], b["distiller"])
    assert_same(a["optimizer"], b["optimizer"])
    ma = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    strip = ("train_img_per_s", "train_time_s", "eval_time_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in ma] == \
           [{k: v for k, v in r.items() if k not in strip} for r in mb]
