"""``load_checkpoint`` rejects checkpoints of another architecture or class count by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.core.errors import CheckpointError
from kdlab.models import create_model, load_checkpoint

GOLDEN_DIR = Path(__file__).parent / "golden"


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "epoch": 240}, path)
    return path


def test_roundtrip_through_crd_format(tmp_path: Path) -> None:
    src = create_model("ShuffleV2", num_classes=10).eval()
    dst = create_model("ShuffleV2", num_classes=10).eval()
    load_checkpoint(dst, _save(src, tmp_path / "ckpt.pth"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x).logits, src(x).logits)


def test_other_architecture_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not fit model wrn_16_1.*keys"):
        load_checkpoint(create_model("wrn_16_1"), GOLDEN_DIR / "resnet8.pth")


def test_same_family_other_depth_is_rejected() -> None:
    with pytest.raises(CheckpointError, match="resnet8.*(missing|unexpected) keys"):
        load_checkpoint(create_model("resnet8"), GOLDEN_DIR / "resnet14.pth")


def test_other_width_names_the_extra_key(tmp_path: Path) -> None:
    path = _save(create_model("wrn_16_2"), tmp_path / "wrn_16_2.pth")
    with pytest.raises(CheckpointError, match="unexpected keys .*convShortcut"):
        load_checkpoint(create_model("wrn_16_1"), path)


@pytest.mark.parametrize("name", ["resnet8", "ResNet18", "vgg8", "MobileNetV2", "ShuffleV1"])
def test_other_class_count_names_it(tmp_path: Path, name: str) -> None:
    path = _save(create_model(name, num_classes=100), tmp_path / "c100.pth")
    with pytest.raises(CheckpointError, match="class count: checkpoint 100, model 10"):
        load_checkpoint(create_model(name, num_classes=10), path)


def test_other_in_channels_is_rejected(tmp_path: Path) -> None:
    path = _save(create_model("resnet8", in_channels=3), tmp_path / "rgb.pth")
    with pytest.raises(CheckpointError, match="conv1.weight has shape"):
        load_checkpoint(create_model("resnet8", in_channels=1), path)
