"""Segmentation models: output contract, torchvision's dilation rule, heads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from kdlab.config import SegmentationConfig
from kdlab.tasks.segmentation.model import (
    SegmentationOutput,
    build_segmenter,
    dilate_to_output_stride,
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
