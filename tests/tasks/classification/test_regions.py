"""``region_accuracy`` and ``kdlab eval --regions``: the top-1 of SDD's local logits per scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.cli.main import main
from kdlab.core.errors import ConfigError
from kdlab.models import create_model
from kdlab.models.output import KdModel, ModelOutput
from kdlab.tasks.classification.regions import region_accuracy
from support import run_distill, save_random_teacher

K = 4


class GivenMap(KdModel):
    """Returns a fixed ``B x K x 2 x 2`` map per image; the classifier is the identity and the
    logits are a separate, given tensor (as a class-token head would be)."""

    def __init__(self, maps: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.maps, self.given = maps, logits
        self.classifier = nn.Linear(K, K, bias=False)
        with torch.no_grad():
            self.classifier.weight.copy_(torch.eye(K))
        self.num_classes, self.in_channels = K, 1

    def forward(self, x: torch.Tensor) -> ModelOutput:
        idx = x[:, 0, 0, 0].long()
        return ModelOutput(logits=self.given[idx], feature_map=self.maps[idx])


def _onehot_cells(classes: list[list[int]]) -> torch.Tensor:
    """``B x K x 2 x 2`` maps whose cell ``(r, c)`` (row-major index ``i``) is one-hot of
    ``classes[b][i]``, scaled so the 1x1 mean is dominated by the most frequent class."""
    maps = torch.zeros(len(classes), K, 2, 2)
    for b, cells in enumerate(classes):
        for i, k in enumerate(cells):
            maps[b, k, i // 2, i % 2] += 1.0 + 0.1 * i
    return maps


def test_hand_counted_scores() -> None:
    maps = _onehot_cells([[0, 0, 0, 1], [2, 3, 3, 3]])
    logits = torch.tensor([[5.0, 0, 0, 0], [5.0, 0, 0, 0]])  # the model says class 0 twice
    labels = torch.tensor([0, 3])
    images = torch.arange(2.0).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    res = region_accuracy(GivenMap(maps, logits), [(images, labels, torch.arange(2))],
                          torch.device("cpu"), scales=[2])
    assert res["top1"] == pytest.approx(50.0)          # image 1 is wrong
    assert res["region_top1_1"] == pytest.approx(100.0)  # whole map: 0 and 3
    assert res["region_top1_2"] == pytest.approx(100 * (3 / 4 + 3 / 4) / 2)
    assert res["region_agree_1"] == pytest.approx(50.0)
    assert res["region_agree_2"] == pytest.approx(100 * (3 / 4 + 0) / 2)
    assert res["count"] == 2


def test_gap_model_whole_map_is_the_model() -> None:
    torch.manual_seed(0)
    model = create_model("vit_lite_7_gap", num_classes=K, in_channels=1)
    images = torch.randn(6, 1, 32, 32)
    batch = [(images, torch.randint(0, K, (6,)), torch.arange(6))]
    res = region_accuracy(model.train(), batch, torch.device("cpu"), scales=(1, 2, 4))
    assert res["region_agree_1"] == pytest.approx(100.0)
    assert res["region_top1_1"] == pytest.approx(res["top1"])
    assert model.training  # mode restored
    assert {"region_top1_4", "region_agree_4", "region_top1_2"} <= res.keys()


def test_bad_scales() -> None:
    with pytest.raises(ConfigError, match="positive grid sizes"):
        region_accuracy(GivenMap(torch.zeros(1, K, 2, 2), torch.zeros(1, K)), [],
                        torch.device("cpu"), scales=[0, 2])


@pytest.mark.e2e
def test_eval_regions_on_a_vit_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher = save_random_teacher(tmp_path / "t.pth", num_classes=K)
    run = run_distill(tmp_path, {
        "name": "regions",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 8,
                 "synthetic": {"n_train": 16, "n_test": 12, "num_classes": K}},
        "student": {"arch": "vit_tiny"},
        "teacher": {"arch": "resnet14", "checkpoint": str(teacher)},
        "method": {"name": "sd_dkd"},
        "optim": {"epochs": 1, "milestones": [], "lr": 0.01},
        "runtime": {"threads": 1, "amp": "off"},
    })
    capsys.readouterr()
    assert main(["-q", "eval", str(run), "--regions", "1,2,4"]) == 0
    shown = capsys.readouterr().out
    assert "local top-1" in shown and "4x4" in shown
    scores = json.loads((run / "eval" / "scores.json").read_text())["scores"]
    assert {f"region_top1_{m}" for m in (1, 2, 4)} <= scores.keys()
    assert all(0.0 <= scores[f"region_agree_{m}"] <= 100.0 for m in (1, 2, 4))
