"""`kdlab distill` end to end on streamed image datasets (ImageNet and CUB layouts, generated).

Small images and crop sizes keep it fast; the code path (file index, Pillow decoding in the
loader, protocol transforms, one corrupt JPEG skipped and counted) is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli.main import main
from kdlab.models import create_model
from support import run_distill

pytestmark = pytest.mark.e2e  # trains runs end to end


def distill(tmp_path: Path, data: dict, num_classes: int, method: dict) -> dict:
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save({"model": create_model("resnet14", num_classes=num_classes).state_dict()}, teacher)
    cfg = {
        "name": "streamed",
        "data": {**data, "image_size": 32, "resize": 36, "num_workers": 0, "batch_size": 4,
                 "eval_batch_size": 8},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher)},
        "method": method,
        "optim": {"epochs": 1, "milestones": [], "lr": 0.01},
        "runtime": {"threads": 1, "amp": "off"},
    }
    run = run_distill(tmp_path, cfg)
    return json.loads((run / "summary.json").read_text())


@pytest.mark.parametrize("method", [{"name": "sd_dkd", "params": {"scales": [1, 2]}},
                                    {"name": "dckd", "partners": [{"name": "fitnet"}]}])
def test_distill_on_imagenet_layout(tmp_path: Path, imagenet_root: Path, method: dict) -> None:
    summary = distill(tmp_path, {"name": "imagenet", "root": str(imagenet_root)}, 3, method)
    assert summary["epochs"] == 1 and 0.0 <= summary["last_top1"] <= 100.0


def test_distill_on_cub_layout(tmp_path: Path, cub_root: Path) -> None:
    summary = distill(tmp_path, {"name": "cub200", "root": str(cub_root)}, 3,
                      {"name": "sd_kd", "params": {"scales": [1, 2, 4]}})
    assert summary["epochs"] == 1


def test_unreadable_image_stops_with_one_line_error(tmp_path: Path, imagenet_root: Path,
                                                    capsys) -> None:
    cfg = {
        "data": {"name": "imagenet", "root": str(imagenet_root), "on_error": "stop",
                 "image_size": 32, "resize": 36, "num_workers": 0, "batch_size": 12},
        "student": {"arch": "resnet8"},
        "optim": {"epochs": 1, "milestones": []},
        "runtime": {"threads": 1, "amp": "off"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0
    assert "kdlab: error:" in err and "Traceback" not in err
