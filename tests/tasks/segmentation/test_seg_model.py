"""Segmentation models: output contract, torchvision's dilation rule, heads (PSPNet
included), per-arch head overrides."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from kdlab.config import SegmentationConfig
from kdlab.core.errors import ModelError
from kdlab.tasks.segmentation.model import (
    PyramidPooling,
    SegmentationOutput,
    build_segmenter,
    dilate_to_output_stride,
    pspnet_head,
)


def _convs(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    return {n: (m.stride, m.dilation, m.padding) for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize(("output_stride", "replace"), [(8, [False, True, True]),
                                                          (16, [False, False, True])])
def test_dilation_matches_torchvision_replace_stride_with_dilation(
        tv: Any, output_stride: int, replace: list[bool]) -> None:
    from kdlab.models import create_model

    ours = create_model("resnet50_imagenet", num_classes=3)
    dilate_to_output_stride(ours, 3, output_stride)
    ref = tv.models.resnet50(weights=None, replace_stride_with_dilation=replace)
    want = {n: c for n, c in _convs(ref).items()}
    assert _convs(ours) == want


@pytest.mark.parametrize(("arch", "head", "aux"), [
    ("resnet18_imagenet", "deeplabv3", True),
    ("resnet8", "fcn", False),
    ("MobileNetV2_imagenet", "lraspp", False),
])
def test_output_contract(tv: Any, arch: str, head: str, aux: bool) -> None:
    seg = SegmentationConfig(head=head, aux_head=aux, output_stride=16, aspp_channels=16,
                             lraspp_channels=16)
    model = build_segmenter(arch, 5, seg)
    x = torch.randn(2, 3, 48, 64)
    out = model(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 5, 48, 64)
    assert out.feature_map.dim() == 4 and len(out.features) >= 3
    assert (out.aux_logits is not None) == aux
    if aux:
        assert out.aux_logits.shape == (2, 5, 48, 64)
    model.eval()
    assert model(x).aux_logits is None
    # the backbone's own classifier is frozen (never used)
    assert not any(p.requires_grad for p in model.backbone.classifier.parameters())
    detached = out.detach()
    assert isinstance(detached, SegmentationOutput) and not detached.logits.requires_grad


def test_deeplab_head_has_torchvision_names(tv: Any) -> None:
    model = build_segmenter("resnet18_imagenet", 4, SegmentationConfig(aux_head=True))
    ref = tv.models.segmentation.deeplabv3.DeepLabHead(512, 4)
    ours = {k: v.shape for k, v in model.classifier.state_dict().items()}
    assert ours == {k: v.shape for k, v in ref.state_dict().items()}
    assert model.output_stride == 8
    aux = tv.models.segmentation.fcn.FCNHead(256, 4)
    assert ({k: v.shape for k, v in model.aux_classifier.state_dict().items()}
            == {k: v.shape for k, v in aux.state_dict().items()})


def test_logits_are_the_upsampled_head_output(tv: Any) -> None:
    model = build_segmenter("resnet8", 3, SegmentationConfig(head="fcn")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        small = model.classifier(model.backbone(x).feature_map)
        want = nn.functional.interpolate(small, size=(32, 32), mode="bilinear",
                                         align_corners=False)
        assert torch.allclose(out.logits, want, atol=1e-5)
        assert torch.allclose(model.classifier[-1](out.feature_map), small, atol=1e-5)


# ------------------------------------------------------------------------------------- PSPNet
def _psp(**kw: Any) -> SegmentationConfig:
    return SegmentationConfig(head="pspnet", psp_channels=32, **kw)


@pytest.mark.parametrize(("output_stride", "size"), [(8, (48, 64)), (16, (64, 48)),
                                                      (8, (40, 56))])
def test_pspnet_output_contract(output_stride: int, size: tuple[int, int]) -> None:
    model = build_segmenter("resnet18_imagenet", 5, _psp(output_stride=output_stride,
                                                         aux_head=True))
    assert model.output_stride == output_stride
    out = model(torch.randn(2, 3, *size))
    h, w = size
    assert out.logits.shape == (2, 5, h, w)
    assert out.aux_logits is not None and out.aux_logits.shape == (2, 5, h, w)
    # the pre-classifier map: psp_channels at the backbone's stride (ceil: stride-2 convs pad)
    fh, fw = -(-h // output_stride), -(-w // output_stride)
    assert out.feature_map.shape == (2, 32, fh, fw)
    # the aux head reads layer3 (256 channels), torchvision's FCNHead: 256 -> 64 -> K
    assert model.aux_classifier[0].in_channels == 256
    model.eval()
    with torch.no_grad():
        small = model.classifier(model.backbone(torch.zeros(1, 3, *size)).feature_map)
    assert small.shape == (1, 5, fh, fw) and model(torch.zeros(1, 3, *size)).aux_logits is None


def test_pspnet_gradients_reach_every_head_parameter() -> None:
    model = build_segmenter("resnet18_imagenet", 4, _psp(aux_head=True))
    out = model(torch.randn(2, 3, 48, 48))
    labels = torch.randint(0, 4, (2, 48, 48))
    loss = (nn.functional.cross_entropy(out.logits, labels)
            + nn.functional.cross_entropy(out.aux_logits, labels))
    loss.backward()
    for name, p in [*model.classifier.named_parameters(),
                    *model.aux_classifier.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert model.backbone.conv1.weight.grad.abs().sum() > 0  # type: ignore[union-attr]


def test_pspnet_head_parameter_count_by_hand() -> None:
    """CIRKD's / CWD's PSPNet-ResNet18 head on Cityscapes: 512 input channels, bins 1, 2, 3, 6,
    a 128-channel bottleneck, 19 classes."""
    head = pspnet_head(512, 19, [1, 2, 3, 6], 128)
    c = 512 // 4                                # each branch: 128 channels
    branch = 512 * c + 2 * c                    # 1x1 conv (no bias) + BN weight and bias
    bottleneck = (512 + 4 * c) * 128 * 9 + 2 * 128  # 3x3 conv (no bias) + BN
    classifier = 128 * 19 + 19
    want = 4 * branch + bottleneck + classifier
    assert want == 1_445_523
    assert sum(p.numel() for p in head.parameters()) == want


def test_pyramid_pooling_matches_block_means() -> None:
    """Each branch pools ``b x b`` blocks: with a 6 x 6 map, bin 2 averages 3 x 3 blocks and
    bin 1 the whole map (computed independently of adaptive pooling); the input comes first."""
    torch.manual_seed(0)
    ppm = PyramidPooling(8, [1, 2]).eval()
    for m in ppm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y = ppm(x)
        assert y.shape == (2, 8 + 2 * 4, 6, 6) and torch.equal(y[:, :8], x)
        for k, blocks in [(0, x.mean((2, 3), keepdim=True)),
                          (1, x.reshape(2, 8, 2, 3, 2, 3).mean((3, 5)))]:
            _, conv, bn, relu = ppm.branches[k]
            want = relu(bn(conv(blocks)))
            got = nn.functional.interpolate(want, size=(6, 6), mode="bilinear",
                                            align_corners=False)
            assert torch.allclose(y[:, 8 + 4 * k:12 + 4 * k], got, atol=1e-6)
        # bin 1 is constant over the map
        assert torch.allclose(y[:, 8:12], y[:, 8:12, :1, :1].expand(-1, -1, 6, 6))


def test_pspnet_feature_map_is_the_pre_classifier_map() -> None:
    model = build_segmenter("resnet8", 3, _psp()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        small = model.classifier[-1](out.feature_map)
        want = nn.functional.interpolate(small, size=(32, 32), mode="bilinear",
                                         align_corners=False)
        assert torch.allclose(out.logits, want, atol=1e-5)


def test_arch_overrides_give_teacher_and_student_their_own_heads() -> None:
    seg = SegmentationConfig(aspp_channels=16, aux_head=True, arch_overrides={
        "resnet8": {"head": "pspnet", "psp_channels": 8, "aux_head": False}})
    student = build_segmenter("resnet8", 3, seg)
    teacher = build_segmenter("resnet14", 3, seg)
    assert student.head_name == "pspnet" and student.aux_classifier is None
    assert isinstance(student.classifier[0], PyramidPooling)
    assert student.classifier[-1].in_channels == 8
    assert teacher.head_name == "deeplabv3" and teacher.aux_classifier is not None
    assert teacher.classifier[-1].in_channels == 16


@pytest.mark.parametrize(("overrides", "message"), [
    ({"resnet8": {"crop_size": 32}}, "not head settings"),
    ({"resnet8": {"head": "unet"}}, "arch_overrides.resnet8.head"),
    ({"resnet8": {"psp_bins": [0, 2]}}, "psp_bins must be positive"),
])
def test_invalid_arch_overrides_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SegmentationConfig(arch_overrides=overrides)


def test_pspnet_needs_a_channel_per_bin() -> None:
    with pytest.raises(ModelError, match="psp_bins"):
        PyramidPooling(3, [1, 2, 3, 6])
