"""Every registered model: forward in train / eval mode and the ModelOutput contract.

The models are those of the registry at collection time (``list_models()``), so a newly
registered model is covered without editing a list. ``SHAPES`` and ``HEAD_KEY`` add exact
expectations for the CIFAR zoo; a model missing from them gets the generic checks only. Input
sizes follow the model family (:func:`input_sizes`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdlab.core.errors import ModelError
from kdlab.models import KdModel, ModelOutput, create_model, list_models
from kdlab.models.vit import VisionTransformer

EXPECTED_MODELS = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "ResNet18", "ResNet34", "ResNet50",
    "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
    "MobileNetV2", "ShuffleV1", "ShuffleV2",
}  # fmt: skip
#: every registered model, at collection time.
ALL_MODELS = list_models()

STATE_DICTS = json.loads((Path(__file__).parent / "golden_state_dicts.json").read_text())

# feature_map (C, H, W) and per-stage feature shapes for a 32x32 input.
_RESNET = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
_RESNET_X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]
_RESNETV2 = [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
_RESNET50 = [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)]
_WRN1 = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
_WRN2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]
_VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]
SHAPES: dict[str, tuple[tuple[int, int, int], list[tuple[int, int, int]]]] = {
    **{f"resnet{d}": ((64, 8, 8), _RESNET) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": ((256, 8, 8), _RESNET_X4),
    "resnet32x4": ((256, 8, 8), _RESNET_X4),
    "ResNet18": ((512, 4, 4), _RESNETV2),
    "ResNet34": ((512, 4, 4), _RESNETV2),
    "ResNet50": ((2048, 4, 4), _RESNET50),
    "wrn_16_1": ((64, 8, 8), _WRN1),
    "wrn_40_1": ((64, 8, 8), _WRN1),
    "wrn_16_2": ((128, 8, 8), _WRN2),
    "wrn_40_2": ((128, 8, 8), _WRN2),
    **{f"vgg{d}": ((512, 4, 4), _VGG) for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": (
        (1280, 2, 2),
        [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)],
    ),
    "ShuffleV1": ((960, 4, 4), [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)]),
    "ShuffleV2": ((1024, 4, 4), [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)]),
}
# Reference head attribute name (kept for checkpoint compatibility) per family.
HEAD_KEY = {
    **{n: "fc" for n in EXPECTED_MODELS if n.startswith(("resnet", "wrn"))},
    **{n: "linear" for n in ("ResNet18", "ResNet34", "ResNet50", "ShuffleV1", "ShuffleV2")},
    **{n: "classifier" for n in EXPECTED_MODELS if n.startswith("vgg")},
    "MobileNetV2": "classifier.0",
}


def input_sizes(name: str) -> tuple[int, ...]:
    """Input sides to test ``name`` at, by family (the first one is the main one).

    The 224-px zoos are run at a reduced side that keeps their final map at least 2x2 (64 for
    ``*_imagenet``, stride 32; 96 for ``*_cub``, whose CIFAR-derived vgg pools once more at 64);
    CIFAR-size models at 32 and 28 (Fashion-MNIST).
    """
    if name.endswith("_imagenet"):
        return (64,)
    if name.endswith("_cub"):
        return (96,)
    return (32, 28)


def test_registry_lists_the_cifar_zoo() -> None:
    assert EXPECTED_MODELS <= set(list_models())
    assert set(SHAPES) == EXPECTED_MODELS == set(STATE_DICTS)


def test_unknown_model_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="unknown model"):
        create_model("resnet9000")


def _check_output(model: KdModel, out: ModelOutput, name: str, classes: int, size: int) -> None:
    assert out.logits.shape == (2, classes)
    assert torch.isfinite(out.logits).all()
    channels = out.feature_map.shape[1]
    assert out.embedding is not None and out.embedding.shape == (2, channels)
    if name in SHAPES:
        fmap_shape, stage_shapes = SHAPES[name]
        assert channels == fmap_shape[0]
        if size == 32:
            assert out.feature_map.shape == (2, *fmap_shape)
            assert [tuple(f.shape[1:]) for f in out.features] == stage_shapes
            assert [tuple(f.shape[1:]) for f in out.preact_features] == stage_shapes
    if model.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return  # dropout before the head (MobileNetV2_imagenet): checked in eval mode only
    if model.distillation_token and not model.training:
        return  # eval-mode logits average both DeiT heads (tests/methods/test_deit_method.py)
    torch.testing.assert_close(model.classifier(out.embedding), out.logits)
    # Every family pools by averaging over the whole final map.
    # (not class-token ViTs: their head reads the class token, kdlab.models.vit)
    if isinstance(model, VisionTransformer) and model.pool == "cls":
        return
    pooled = out.feature_map.mean((2, 3))
    torch.testing.assert_close(model.classifier(pooled), out.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_train_and_eval(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    assert isinstance(model, KdModel)
    assert (model.num_classes, model.in_channels) == (10, 3)
    _check_head(model, name, 10)
    size = input_sizes(name)[0]
    x = torch.randn(2, 3, size, size)

    model.train()
    out = model(x)
    _check_output(model, out, name, 10, size)
    out.logits.sum().backward()
    assert model.classifier.weight.grad is not None

    model.eval()
    with torch.no_grad():
        _check_output(model, model(x), name, 10, size)


def _check_head(model: KdModel, name: str, classes: int) -> None:
    """``classifier`` is the reference head (``fc`` / ``linear`` / ...), not a second copy."""
    head = model.classifier
    assert isinstance(head, nn.Linear) and head.out_features == classes
    head_key = next(n for n, m in model.named_modules() if m is head)
    if name in HEAD_KEY:
        assert head_key == HEAD_KEY[name]
    state = model.state_dict()
    keys = [k for k in state if k.endswith(("weight", "bias"))]
    last = "head_dist" if model.distillation_token else head_key  # DeiT's second head
    assert keys[-2:] == [f"{last}.weight", f"{last}.bias"]
    assert state[f"{head_key}.weight"].data_ptr() == head.weight.data_ptr()
    # no second copy of the head (ViTs have other linear layers: attention, MLP)
    others = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    assert all(m.weight.data_ptr() != head.weight.data_ptr() for m in others)
    if not isinstance(model, VisionTransformer):
        assert not others


def test_probe_reports_shapes_in_eval_mode_and_restores_training() -> None:
    model = create_model("resnet8x4").train()
    probe = model.probe()
    assert probe.feature_map.shape == (2, 256, 8, 8)
    assert model.training


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_channel_input(name: str) -> None:
    """``in_channels=1`` (Fashion-MNIST) changes only the first conv; 28x28 inputs also work."""
    model = create_model(name, num_classes=100, in_channels=1).eval()
    assert model.in_channels == 1
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    if name in STATE_DICTS:  # the CIFAR zoo: the reference's RGB layout
        rgb_layout = STATE_DICTS[name]["state_dict"]
    else:
        rgb_model = create_model(name, num_classes=100)
        rgb_layout = [[k, list(v.shape)] for k, v in rgb_model.state_dict().items()]
    changed = [(a, b) for a, b in zip(layout, rgb_layout, strict=True) if a != b]
    assert len(layout) == len(rgb_layout)
    assert len(changed) == 1
    (key, shape), (_, rgb_shape) = changed[0]
    assert key == rgb_layout[0][0] and shape == [rgb_shape[0], 1, *rgb_shape[2:]]
    with torch.no_grad():
        for size in input_sizes(name):
            _check_output(model, model(torch.randn(2, 1, size, size)), name, 100, size)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_assigning_classifier_replaces_the_head(name: str) -> None:
    model = create_model(name, num_classes=10)
    keys = list(model.state_dict())
    new_head = nn.Linear(model.classifier.in_features, 10)
    model.classifier = new_head
    assert model.classifier is new_head
    assert list(model.state_dict()) == keys
    size = input_sizes(name)[0]
    with torch.no_grad():  # a DeiT student's class head alone gives its training-mode logits
        out = model.train(model.distillation_token)(torch.randn(2, 3, size, size))
    torch.testing.assert_close(new_head(out.embedding), out.logits)


def test_bad_depth_is_a_model_error() -> None:
    from kdlab.models.cifar.resnet import ResNet
    from kdlab.models.cifar.wrn import WideResNet

    with pytest.raises(ModelError, match="6n\\+2"):
        ResNet(9, (16, 16, 32, 64))
    with pytest.raises(ModelError, match="6n\\+4"):
        WideResNet(15, 1)
