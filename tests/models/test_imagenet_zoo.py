from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.losses import multiscale_logits
from kdlab.models.checkpoint import load_checkpoint
from kdlab.models.registry import create_model, list_models

IMAGENET = {
    "resnet18_imagenet": 512, "resnet34_imagenet": 512, "resnet50_imagenet": 2048,
    "MobileNetV1_imagenet": 1024, "MobileNetV2_imagenet": 1280,
}  # fmt: skip


def test_every_224px_model_is_checked_here() -> None:
    """A newly registered ImageNet/CUB model must get its expected feature width here."""
    from kdlab.models.registry import MODELS

    registered = {n for n in list_models()
                  if MODELS.get(n).__module__.startswith("kdlab.models.imagenet.")}
    assert registered == set(IMAGENET) | set(CUB), sorted(registered ^ (set(IMAGENET) | set(CUB)))


@pytest.mark.parametrize("name", sorted(IMAGENET))
def test_imagenet_shapes(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=1000).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 1000)
    assert out.feature_map.shape == (2, IMAGENET[name], 2, 2)  # 224 px -> 7x7 (stride 32)
    assert out.embedding is not None
    torch.testing.assert_close(model.classifier(out.embedding), out.logits, rtol=0, atol=0)
    assert [f.shape[-1] for f in out.features][-1] == 2
    if "MobileNetV2" not in name:  # MobileNetV2's last stage precedes its 1x1 head conv
        assert torch.equal(out.features[-1], out.feature_map)


def test_seven_by_seven_at_224_and_names() -> None:
    model = create_model("resnet18_imagenet", num_classes=1000)
    assert model.probe(224).feature_map.shape[-2:] == (7, 7)
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-2:] == ["fc.weight", "fc.bias"]
    assert "layer4.1.bn2.running_var" in keys
    r50 = create_model("resnet50_imagenet", num_classes=10).state_dict()
    assert "layer1.0.downsample.0.weight" in r50 and "layer3.5.conv3.weight" in r50
    mv1 = create_model("MobileNetV1_imagenet", num_classes=10).state_dict()
    assert {"model.0.0.weight", "model.13.3.weight", "model.13.4.running_mean", "fc.weight"} <= set(
        mv1
    )
    mv2 = create_model("MobileNetV2_imagenet", num_classes=10).state_dict()
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.2.conv.3.weight",
            "features.18.1.bias", "classifier.1.weight"} <= set(mv2)  # fmt: skip


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    src = create_model("MobileNetV1_imagenet", num_classes=5).eval()
    torch.save({"model": src.state_dict()}, tmp_path / "mv1.pth")
    dst = create_model("MobileNetV1_imagenet", num_classes=5).eval()
    load_checkpoint(dst, tmp_path / "mv1.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x).logits, dst(x).logits)


CUB = {  # (channels, stride): the final map at 224 px is 224 / stride (28, 14 or 7)
    "resnet32x4_cub": (256, 8), "resnet8x4_cub": (256, 8), "vgg13_cub": (512, 8),
    "vgg8_cub": (512, 8), "ResNet50_cub": (2048, 16), "MobileNetV2_cub": (1280, 32),
    "ShuffleV1_cub": (960, 16), "ShuffleV2_cub": (1024, 16),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CUB))
def test_cub_models(name: str) -> None:
    assert name in list_models()
    model = create_model(name, num_classes=200).eval()
    channels, stride = CUB[name]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 96, 96))  # not 64: the CIFAR vgg pools once more at 64 px
    assert out.logits.shape == (1, 200)
    assert out.feature_map.shape == (1, channels, 96 // stride, 96 // stride)
    assert out.embedding is not None
    torch.testing.assert_close(model.classifier(out.embedding), out.logits, rtol=0, atol=0)


def test_cub_stem() -> None:
    conv1 = create_model("resnet32x4_cub", num_classes=200).conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((7, 7), (2, 2), (3, 3))
    mv2 = create_model("MobileNetV2_cub", num_classes=200).state_dict()
    assert mv2["conv1.0.weight"].shape == (16, 3, 7, 7)


def test_sdd_pooling_on_7x7_map() -> None:
    torch.manual_seed(0)
    model = create_model("resnet18_imagenet", num_classes=20).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
        assert out.feature_map.shape[-2:] == (7, 7)
        direct = multiscale_logits(out.feature_map, model.classifier, (1, 2, 4), "direct")
        nested = multiscale_logits(
            out.feature_map, model.classifier, (1, 2, 4), "nested", nested_grid=4
        )
    assert direct.shape == nested.shape == (2, 20, 21)
    torch.testing.assert_close(direct[:, :, 0], out.logits, rtol=1e-5, atol=1e-5)
    assert (nested[:, :, 0] - out.logits).abs().max() > 1e-4
