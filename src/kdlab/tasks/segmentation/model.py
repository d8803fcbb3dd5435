"""Segmentation models: torchvision's segmentation heads, or PSPNet's, around a kdlab backbone.

:func:`build_segmenter` builds :class:`SegmentationModel`: any kdlab classifier (the zoo's
ImageNet ResNets, its MobileNetV2, its small CIFAR ResNets for CPU runs, or a
``torchvision:``/``timm:`` model through kdlab's adapter) whose last feature map feeds one of
torchvision's heads (``torchvision.models.segmentation``; Chen et al., "Rethinking Atrous
Convolution for Semantic Image Segmentation", arXiv:1706.05587 for DeepLabV3's ASPP; Long et al.,
CVPR 2015 for the FCN head; Howard et al., ICCV 2019 for LR-ASPP):

* ``deeplabv3``: ``ASPP(in, atrous_rates, c)``, 3x3 conv, BN, ReLU, 1x1 conv to ``K`` (exactly
  torchvision's ``DeepLabHead`` for ``c = 256``, with the same module indices);
* ``fcn``: torchvision's ``FCNHead(in, K)``;
* ``lraspp``: torchvision's ``LRASPPHead(low, in, K, inter)``, whose low-level input is the last
  stage before the final one at stride <= 8;
* ``pspnet``: PSPNet's pyramid pooling module (Zhao et al., "Pyramid Scene Parsing Network",
  CVPR 2017; :func:`pspnet_head`): for each bin ``b`` of ``psp_bins`` an adaptive average pool
  to ``b x b``, a 1x1 conv to ``in / len(bins)`` channels, BN, ReLU and a bilinear upsampling
  back, concatenated after the input; then a 3x3 conv to ``psp_channels``, BN, ReLU, dropout 0.1
  and the 1x1 classifier (the structure of CIRKD's and mmseg's PSPNet heads).

A teacher and a student may have different heads: :func:`build_segmenter` applies the section's
``arch_overrides`` of the backbone's ``arch`` (:meth:`SegmentationConfig.for_arch`).

The output stride is set by :func:`dilate_to_output_stride`: every stride-2 convolution whose
input is already at the output stride becomes stride 1, and every larger-kernel convolution
whose input was downsampled beyond it is dilated by the lost factor, with its padding scaled to
keep the size (torchvision's ``replace_stride_with_dilation`` for ResNets: the first block of a
dilated stage keeps the previous dilation, the others take the new one).

The model returns :class:`SegmentationOutput`: ``logits`` ``B x K x H x W`` bilinearly upsampled
to the input size (as torchvision's ``_SimpleSegmentationModel``), ``feature_map`` the head's
map right before its last 1x1 classifier, ``features`` the backbone's stages, and, with
``aux_head`` in training mode, ``aux_logits`` of torchvision's auxiliary FCN head on the stage
before the last (upsampled likewise). Module names follow torchvision (``backbone``,
``classifier``, ``aux_classifier``); the backbone's own linear head is frozen (never used).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import SegmentationConfig
from kdlab.core.errors import ModelError
from kdlab.core.torchvision_shim import import_torchvision_for_detection
from kdlab.models import create_model
from kdlab.models.output import KdModel, ModelOutput

log = logging.getLogger(__name__)

__all__ = ["PyramidPooling", "SegmentationModel", "SegmentationOutput", "build_segmenter",
           "dilate_to_output_stride", "feature_strides", "pspnet_head"]

#: side of the probe images that measure strides (divisible by 32).
PROBE_SIZE = 64


@dataclass
class SegmentationOutput(ModelOutput):
    """:class:`ModelOutput` of a segmentation model (module docstring): ``logits`` are
    ``B x K x H x W``; ``aux_logits`` the auxiliary head's map (None without one, or in eval
    mode); ``task_losses`` the task's own weighted loss terms of a training step, filled by
    :meth:`kdlab.tasks.segmentation.task.SegmentationTask.forward` (``aux_ce``)."""

    aux_logits: Tensor | None = None
    task_losses: dict[str, Tensor] = field(default_factory=dict)

    def detach(self) -> SegmentationOutput:
        """A copy with every tensor detached."""
        base = super().detach()
        return SegmentationOutput(
            **{f: getattr(base, f) for f in ModelOutput.__dataclass_fields__},
            aux_logits=None if self.aux_logits is None else self.aux_logits.detach())


def _probe(body: nn.Module, in_channels: int, size: int = PROBE_SIZE) -> ModelOutput:
    was_training = body.training
    body.eval()
    device = next(body.parameters()).device
    with torch.no_grad():
        out = body(torch.zeros(1, in_channels, size, size, device=device))
    body.train(was_training)
    return out  # type: ignore[no-any-return]


def feature_strides(body: KdModel, size: int = PROBE_SIZE) -> tuple[list[int], int]:
    """The stride of each of ``body``'s stage features and of its ``feature_map`` (``size`` over
    the map's width in a ``size x size`` probe; 0 for a feature that is not a map)."""
    out = _probe(body, body.in_channels, size)
    strides = [round(size / f.shape[-1]) if f.dim() == 4 else 0 for f in out.features]
    return strides, round(size / out.feature_map.shape[-1])


def dilate_to_output_stride(body: nn.Module, in_channels: int, output_stride: int,
                            size: int = PROBE_SIZE) -> int:
    """Convert ``body``'s downsampling beyond ``output_stride`` into dilation, in place (module
    docstring); returns the feature map's stride afterwards.

    Measures each ``Conv2d``'s input stride ``s`` in a ``size x size`` probe; then a stride-2
    convolution with ``s >= output_stride`` becomes stride 1, and a convolution with kernel > 1
    gets dilation ``s / min(s, output_stride)`` and padding ``dilation * (k - 1) / 2``. A
    convolution whose padding is not "same" cannot be dilated (:class:`ModelError`)."""
    seen: dict[nn.Conv2d, int] = {}
    hooks = []
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod: nn.Module, inputs: tuple[Tensor, ...], _out: Any) -> None:
                seen.setdefault(mod, max(1, round(size / inputs[0].shape[-1])))  # type: ignore[arg-type]
            hooks.append(m.register_forward_hook(hook))
    try:
        _probe(body, in_channels, size)
    finally:
        for h in hooks:
            h.remove()
    for conv, s in seen.items():
        k = conv.kernel_size
        if s >= output_stride and conv.stride == (2, 2):
            conv.stride = (1, 1)
        d = s // min(s, output_stride)
        if d > 1 and k != (1, 1):
            if conv.padding != ((k[0] - 1) // 2 * conv.dilation[0],
                                (k[1] - 1) // 2 * conv.dilation[1]) or conv.dilation != (1, 1):
                raise ModelError(f"cannot dilate a {k[0]}x{k[1]} convolution with padding "
                                 f"{conv.padding}; use a backbone with 'same'-padded "
                                 "convolutions or a larger segmentation.output_stride")
            conv.dilation = (d, d)
            conv.padding = (d * (k[0] - 1) // 2, d * (k[1] - 1) // 2)
    out = _probe(body, in_channels, size)
    return round(size / out.feature_map.shape[-1])


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module (Zhao et al., CVPR 2017, Sec. 3.2): ``[x, up(f_b(x)) for
    b in bins]`` concatenated along channels, where ``f_b`` is an adaptive average pool to
    ``b x b``, a 1x1 convolution to ``in_channels // len(bins)`` channels (no bias), BN and ReLU,
    and ``up`` a bilinear resize back to ``x``'s size. Output channels: ``in + len(bins) * c``."""

    def __init__(self, in_channels: int, bins: list[int]) -> None:
        super().__init__()
        c = in_channels // len(bins)
        if c < 1:
            raise ModelError(f"the pspnet head needs at least {len(bins)} input channels (one "
                             f"per pyramid bin), got {in_channels}; use fewer segmentation."
                             "psp_bins")
        self.out_channels = in_channels + len(bins) * c
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, c, 1, bias=False),
                          nn.BatchNorm2d(c), nn.ReLU())
            for b in bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
                  for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


def pspnet_head(in_channels: int, num_classes: int, bins: list[int],
                channels: int) -> nn.Sequential:
    """PSPNet's head (Zhao et al., CVPR 2017): :class:`PyramidPooling`, a 3x3 convolution to
    ``channels`` (no bias), BN, ReLU, dropout 0.1, and the 1x1 classifier to ``num_classes``
    (with bias). A sequence, so the map before its last layer is the ``feature_map``."""
    ppm = PyramidPooling(in_channels, bins)
    return nn.Sequential(
        ppm, nn.Conv2d(ppm.out_channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(0.1), nn.Conv2d(channels, num_classes, 1))


def _low_level_index(strides: list[int], features: int) -> int:
    """LR-ASPP's low-level input: the last stage before the final one at stride <= 8."""
    for i in range(features - 2, -1, -1):
        if 0 < strides[i] <= 8:
            return i
    raise ModelError("the lraspp head needs a backbone stage at stride <= 8 before its last "
                     "one; use segmentation.head deeplabv3 or fcn")


def _make_head(seg: SegmentationConfig, num_classes: int, high: int, low: int,
               segmentation: Any) -> nn.Module:
    """The head ``seg.head`` (module docstring) on a ``high``-channel feature map; ``low`` is
    the channel count of LR-ASPP's low-level stage (unused by the other heads)."""
    if seg.head == "deeplabv3":
        c = seg.aspp_channels
        aspp = segmentation.deeplabv3.ASPP(high, list(seg.atrous_rates), c)
        return nn.Sequential(
            aspp, nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, num_classes, 1))
    if seg.head == "fcn":
        return segmentation.fcn.FCNHead(high, num_classes)  # type: ignore[no-any-return]
    if seg.head == "pspnet":
        return pspnet_head(high, num_classes, list(seg.psp_bins), seg.psp_channels)
    return segmentation.lraspp.LRASPPHead(  # type: ignore[no-any-return]
        low, high, num_classes, seg.lraspp_channels)


class SegmentationModel(KdModel):
    """A kdlab backbone with a torchvision or PSPNet segmentation head (module docstring)."""

    def __init__(self, backbone: KdModel, num_classes: int, seg: SegmentationConfig) -> None:
        super().__init__()
        tv = import_torchvision_for_detection()
        segmentation = tv.models.segmentation
        self.num_classes = num_classes
        self.in_channels = backbone.in_channels
        self.head_name = seg.head
        self.backbone = backbone
        # the backbone's classifier is never used: frozen, so DDP and optimizers ignore it
        for p in backbone.classifier.parameters():
            p.requires_grad_(False)
        if getattr(backbone, "token_grid", False):
            raise ModelError("segmentation heads need a convolutional backbone; transformer "
                             "token grids are not supported yet")
        self.output_stride = dilate_to_output_stride(backbone, self.in_channels,
                                                     seg.output_stride)
        out = _probe(backbone, self.in_channels)
        strides = [round(PROBE_SIZE / f.shape[-1]) if f.dim() == 4 else 0 for f in out.features]
        if self.output_stride > seg.output_stride:
            log.warning("%s keeps output stride %d (> segmentation.output_stride %d): its "
                        "downsampling is not by strided convolutions",
                        getattr(backbone, "arch", type(backbone).__name__),
                        self.output_stride, seg.output_stride)
        self.low_index: int | None = None
        low = 0
        if seg.head == "lraspp":
            self.low_index = _low_level_index(strides, len(out.features))
            low = int(out.features[self.low_index].shape[1])
        self.classifier = _make_head(  # type: ignore[assignment]
            seg, num_classes, int(out.feature_map.shape[1]), low, segmentation)
        self.aux_classifier: nn.Module | None = None
        if seg.aux_head:
            if len(out.features) < 2 or out.features[-2].dim() != 4:
                raise ModelError("aux_head needs a backbone stage before the last one; set "
                                 "segmentation.aux_head: false")
            self.aux_classifier = segmentation.fcn.FCNHead(int(out.features[-2].shape[1]),
                                                           num_classes)

    def _head(self, out: ModelOutput) -> tuple[Tensor, Tensor]:
        """``(pre-classifier map, logits)`` at the feature map's resolution."""
        head = self.classifier
        if self.low_index is None:
            *body, last = head.children()
            feat = out.feature_map
            for layer in body:
                feat = layer(feat)
            return feat, last(feat)
        low, high = out.features[self.low_index], out.feature_map
        x = head.cbr(high) * head.scale(high)  # type: ignore[operator]
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return x, head.low_classifier(low) + head.high_classifier(x)  # type: ignore[operator]

    def forward(self, x: Tensor) -> SegmentationOutput:
        size = x.shape[-2:]
        out = self.backbone(x)
        feat, logits = self._head(out)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        aux = None
        if self.aux_classifier is not None and self.training:
            aux = F.interpolate(self.aux_classifier(out.features[-2]), size=size,
                                mode="bilinear", align_corners=False)
        return SegmentationOutput(logits=logits, feature_map=feat, features=list(out.features),
                                  preact_features=list(out.preact_features), aux_logits=aux)


def build_segmenter(arch: str, num_classes: int, seg: SegmentationConfig,
                    in_channels: int = 3) -> SegmentationModel:
    """A fresh :class:`SegmentationModel`: backbone ``arch`` (``kdlab models``, or
    ``torchvision:NAME`` / ``timm:NAME``) with the head of ``seg`` for ``num_classes`` classes,
    ``seg.arch_overrides[arch]`` applied (:meth:`SegmentationConfig.for_arch`). torchvision is
    imported first as the heads import it, so a ``torchvision:`` backbone builds wherever they
    do (docs/torchvision-shim.md)."""
    import_torchvision_for_detection()
    backbone = create_model(arch, num_classes=num_classes, in_channels=in_channels)
    model = SegmentationModel(backbone, num_classes, seg.for_arch(arch))
    model.arch = arch  # type: ignore[assignment]
    return model
