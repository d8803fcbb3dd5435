"""Faster R-CNN with FPN built from torchvision's detection package and a kdlab zoo backbone.

:func:`build_detector` assembles torchvision's ``FasterRCNN`` (Ren et al., NeurIPS 2015; FPN:
Lin et al., CVPR 2017) around :class:`PyramidBackbone`, which runs any kdlab classifier (the zoo's
ImageNet ResNets and MobileNetV2, or a ``torchvision:``/``timm:`` model through kdlab's adapter)
and feeds the last stage of each stride (4, 8, 16, 32) to a feature pyramid. All sizes come from
:class:`~kdlab.config.schema.DetectionConfig`, so the same code runs the COCO recipe (FPN 256,
512 RoIs, 800 px) and a 2-core CPU recipe (FPN 64, 128 RoIs, 128-256 px).

:func:`roi_forward` is the training forward pass of distillation (the DKD detection recipe, Zhao
et al., CVPR 2022, mdistiller ``detection/model/rcnn.py``): the student's normal RPN and RoI-head
losses, the RoIs it sampled with their labels, and the (K+1)-way class logits of the student and
of the teacher on those SAME proposals. :func:`region_logits` gives SDD's multi-scale local logits
of every RoI or of a subset (see docs/methods/sdd-detection.md).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import DetectionConfig
from kdlab.core.errors import MethodError, ModelError
from kdlab.core.torchvision_shim import import_torchvision_for_detection
from kdlab.models import create_model
from kdlab.models.output import KdModel, ModelOutput

__all__ = [
    "Detector",
    "DetectorOutput",
    "PyramidBackbone",
    "build_detector",
    "pyramid_stages",
    "region_logits",
    "roi_forward",
]

#: the RoI-pooled feature levels' names (torchvision's convention: "0" finest, then "pool").
_POOL = "pool"


def pyramid_stages(body: KdModel, probe_size: int = 224) -> tuple[list[int], list[int], list[int]]:
    """Which of ``body``'s stage features feed the FPN: for each stride (4, 8, 16, 32, as the
    stride appears in a ``probe_size`` probe), the LAST stage at that stride.

    Returns ``(indices into features, channels, strides)``, finest first, at most four levels
    (strides 4-32 of a standard backbone; a stride-64 stage is left out). Stages finer than
    stride 4 are left out (as in torchvision's ResNet FPN, which starts at ``layer1``).
    """
    was_training = body.training
    body.eval()
    device = next(body.parameters()).device
    with torch.no_grad():
        out = body(torch.zeros(1, body.in_channels, probe_size, probe_size, device=device))
    body.train(was_training)
    chosen: dict[int, tuple[int, int]] = {}
    for i, f in enumerate(out.features[1:], start=1):
        if f.dim() != 4:
            continue
        stride = round(probe_size / f.shape[-1])
        if stride >= 4:
            chosen[stride] = (i, int(f.shape[1]))  # later stages at a stride replace earlier
    if not chosen:
        raise ModelError(f"{getattr(body, 'arch', type(body).__name__)} exposes no stage "
                         "features at stride >= 4; a detection backbone needs ModelOutput.features")
    strides = sorted(chosen)[:4]  # the finest four: C2-C5 of a standard backbone
    return [chosen[s][0] for s in strides], [chosen[s][1] for s in strides], strides


class PyramidBackbone(nn.Module):
    """A kdlab classifier's stages feeding torchvision's ``FeaturePyramidNetwork`` with the extra
    max-pooled level (``LastLevelMaxPool``): returns ``{"0": P_finest, ..., "pool": P_extra}``,
    each with ``out_channels`` channels. The classifier's own head is left unused."""

    def __init__(self, body: KdModel, out_channels: int) -> None:
        super().__init__()

        tv = import_torchvision_for_detection()
        fpn_mod = tv.ops.feature_pyramid_network
        self.body = body
        self.stage_indices, in_channels, self.strides = pyramid_stages(body)
        self.fpn = fpn_mod.FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=fpn_mod.LastLevelMaxPool())
        self.out_channels = out_channels
        #: the body's stem output of the last forward pass (features[0], for feature partners)
        self.last_stem: Tensor | None = None

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out = self.body(x)
        self.last_stem = out.features[0]
        levels = OrderedDict((str(k), out.features[i]) for k, i in enumerate(self.stage_indices))
        return self.fpn(levels)


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by torchvision's FrozenBatchNorm2d (same
    statistics and affine parameters, never updated)."""

    frozen_cls = import_torchvision_for_detection().ops.misc.FrozenBatchNorm2d
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = frozen_cls(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            if child.running_mean is not None and child.running_var is not None:
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
    return module


class Detector(nn.Module):
    """torchvision's Faster R-CNN plus what kdlab records about it (arch, class count).

    ``forward(images, targets)`` is torchvision's (losses in training mode, detections in
    eval mode). ``num_classes`` counts the foreground classes K; the RoI head has K + 1 outputs
    (index 0 is background, torchvision's convention).
    """

    def __init__(self, model: nn.Module, arch: str, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.num_classes = num_classes
        self.in_channels = 3

    @property
    def backbone(self) -> PyramidBackbone:
        """The FPN backbone."""
        return self.model.backbone  # type: ignore[no-any-return]

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
                ) -> Any:
        return self.model(images, targets)


def build_detector(arch: str, num_classes: int, cfg: DetectionConfig) -> Detector:
    """Faster R-CNN FPN with backbone ``arch`` for ``num_classes`` foreground classes.

    The backbone is ``kdlab.models.create_model(arch)`` (zoo names, ``torchvision:NAME``,
    ``timm:NAME``); anchors, RPN and RoI-head sizes come from ``cfg``. Raises ModelError when
    the anchor sizes do not match the pyramid's levels.
    """

    tv = import_torchvision_for_detection()
    det = tv.models.detection
    body = create_model(arch, num_classes=1000, in_channels=3)
    backbone = PyramidBackbone(body, cfg.fpn_channels)
    if cfg.freeze_batchnorm:
        _freeze_batchnorm(backbone.body)
    names = [str(k) for k in range(len(backbone.stage_indices))]
    if len(cfg.anchor_sizes) != len(names) + 1:
        raise ModelError(f"config key 'detection.anchor_sizes' needs {len(names) + 1} sizes for "
                         f"{arch} (its {len(names)} pyramid levels and the max-pool level), got "
                         f"{len(cfg.anchor_sizes)}")
    anchors = det.anchor_utils.AnchorGenerator(
        sizes=tuple((s,) for s in cfg.anchor_sizes),
        aspect_ratios=(tuple(cfg.aspect_ratios),) * len(cfg.anchor_sizes))
    roi_pool = tv.ops.MultiScaleRoIAlign(names, cfg.roi_output_size, cfg.roi_sampling_ratio)
    model = det.FasterRCNN(
        backbone, num_classes=None,
        min_size=cfg.min_size, max_size=cfg.max_size,
        image_mean=list(cfg.image_mean), image_std=list(cfg.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_roi_pool=roi_pool,
        box_head=det.faster_rcnn.TwoMLPHead(
            cfg.fpn_channels * cfg.roi_output_size ** 2, cfg.representation_size),
        box_predictor=det.faster_rcnn.FastRCNNPredictor(cfg.representation_size,
                                                        num_classes + 1),
        box_score_thresh=cfg.box_score_thresh, box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
    )
    return Detector(model, arch, num_classes)


@dataclass
class DetectorOutput:
    """One model's training forward pass on a batch (see :func:`roi_forward`).

    ``roi`` is the RoI-level view the distillation methods read: ``logits`` (R x (K+1) class
    logits of the R sampled RoIs of the batch), ``feature_map`` (R x C x 7 x 7 pooled RoI
    features), ``features`` ([stem, P2, ..., P6]: the backbone stem, then the FPN levels finest
    first), and ``region_logits`` (SDD's local logits). ``losses`` are torchvision's four
    detector losses (the student's only); ``labels`` are the RoIs' classes (0 = background).
    """

    roi: ModelOutput
    labels: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)


def _head_logits(model: nn.Module, pooled: Tensor) -> Tensor:
    """The box head and the class predictor of ``model`` on pooled RoI features (only the class
    scores: torchvision's ``FastRCNNPredictor`` would compute the box deltas too)."""
    heads = model.roi_heads
    represented = heads.box_head(pooled)
    cls_score = getattr(heads.box_predictor, "cls_score", None)
    if isinstance(cls_score, nn.Module):
        return cls_score(represented.flatten(1))  # type: ignore[no-any-return]
    return heads.box_predictor(represented)[0]  # type: ignore[no-any-return]


def region_logits(model: nn.Module, fpn: dict[str, Tensor], proposals: list[Tensor],
                  image_sizes: list[tuple[int, int]], global_logits: Tensor,
                  scales: Sequence[int], layout: str, rows: Tensor | None = None) -> Tensor:
    """SDD's local logits of every RoI, ``R x (K+1) x N`` (region 0 global), for detection.

    ``rows`` (sorted indices into the batch's ``R`` RoIs, images in order): only those RoIs,
    ``len(rows) x (K+1) x N``, each row equal to the same RoI's row of the full result (SDD's
    ``detection_region_fraction``); None: every RoI.

    ``layout="grid"`` (kdlab): for each scale ``m`` the RoI is split into ``m x m`` sub-boxes
    (row-major) and each is classified by the detector's own box head from its ``s x s`` RoIAlign
    grid (``s`` the head's input size), pooled on the RoI's own FPN level: one ``ms x ms``
    RoIAlign split into blocks, which equals RoIAlign of each sub-box at ``s x s`` whenever a
    sub-box spans at least one feature pixel (smaller ones are not clamped to one pixel as a
    non-aligned RoIAlign of the sub-box alone would be). Region 0 is the
    RoI's ordinary logits (``global_logits``), so scales ``[1]`` gives exactly the base loss, as
    for classification SDD (Wei, Luo, Luo, CVPR 2024, Sec. 3.2).

    ``layout="interleaved"`` (the official SDD code's detection variant, ``detection/model/
    rcnn.py``; scales must be ``[1, 2]``): one ``2s x 2s`` RoIAlign; region 0 is its 2 x 2
    average pool, regions 1-4 the four stride-2 sub-grids (even/even, even/odd, odd/odd,
    odd/even positions), i.e. five views of the whole RoI rather than quadrants.
    """

    pooler = model.roi_heads.box_roi_pool
    size = int(pooler.output_size[0])
    scales = list(scales)
    if layout == "interleaved":
        if scales != [1, 2]:
            raise MethodError("detection_regions 'interleaved' (the official SDD detection code) "
                              f"has five views and needs scales [1, 2], got {scales}")
    elif layout != "grid":
        raise MethodError(f"detection_regions must be 'grid' or 'interleaved', got {layout!r}")
    if rows is not None:
        proposals, global_logits = _select_rois(proposals, global_logits, rows)
    tv = import_torchvision_for_detection()
    feats = OrderedDict((k, v) for k, v in fpn.items() if k in pooler.featmap_names)
    regions: list[Tensor] = []
    r = global_logits.shape[0]
    for m in scales:
        if m == 1:
            if layout == "grid":
                regions.append(global_logits.unsqueeze(2))
            continue  # interleaved: all five views come from the 2s x 2s pool below
        big = tv.ops.MultiScaleRoIAlign(pooler.featmap_names, size * m, pooler.sampling_ratio)
        pooled = big(feats, proposals, image_sizes)  # R x C x ms x ms
        c = pooled.shape[1]
        if layout == "interleaved":
            views = [F.avg_pool2d(pooled, 2)] + [
                pooled[:, :, i::2, j::2] for i, j in ((0, 0), (0, 1), (1, 1), (1, 0))]
            cells = torch.stack(views, dim=1)  # R x 5 x C x s x s
            logits = _head_logits(model, cells.reshape(-1, c, size, size))
            return logits.reshape(r, len(views), -1).transpose(1, 2)
        blocks = pooled.reshape(r, c, m, size, m, size).permute(0, 2, 4, 1, 3, 5)
        logits = _head_logits(model, blocks.reshape(r * m * m, c, size, size))
        regions.append(logits.reshape(r, m * m, -1).transpose(1, 2))
    return torch.cat(regions, dim=2)


def _select_rois(proposals: list[Tensor], logits: Tensor, rows: Tensor
                 ) -> tuple[list[Tensor], Tensor]:
    """The per-image proposals and the logits of the RoIs ``rows`` (sorted indices into the
    concatenation of ``proposals``)."""
    r = logits.shape[0]
    if rows.dim() != 1 or (rows.numel() > 0 and (
            int(rows[0]) < 0 or int(rows[-1]) >= r or not bool((rows[1:] > rows[:-1]).all()))):
        raise MethodError(f"region rows must be increasing RoI indices in [0, {r}), got "
                          f"{rows.tolist() if rows.numel() <= 8 else tuple(rows.shape)}")
    picked: list[Tensor] = []
    start = 0
    for boxes in proposals:
        end = start + boxes.shape[0]
        inside = rows[(rows >= start) & (rows < end)]
        picked.append(boxes[inside - start])
        start = end
    return picked, logits[rows]


def roi_forward(student: Detector, teacher: Detector | None, images: list[Tensor],
                targets: list[dict[str, Tensor]]) -> tuple[DetectorOutput, DetectorOutput | None]:
    """The distillation training pass (mdistiller's ``RCNNKD.forward``, in torchvision terms).

    The student runs torchvision's transform, backbone, RPN (its two losses) and samples its
    training RoIs (``select_training_samples``); its box head gives the class logits and the
    box-regression loss. The teacher (no gradients) runs its backbone on the SAME transformed
    images and its box head on the SAME sampled proposals, so the two (K+1)-way logit matrices
    are row-aligned. ``region_logits`` of each output computes SDD's local logits on demand.
    """
    s = student.model
    images_t, targets_t = s.transform(images, targets)
    fpn_s = s.backbone(images_t.tensors)
    proposals, rpn_losses = s.rpn(images_t, fpn_s, targets_t)
    heads = s.roi_heads
    proposals, _, labels, regression_targets = heads.select_training_samples(proposals, targets_t)
    pooled_s = heads.box_roi_pool(fpn_s, proposals, images_t.image_sizes)
    logits_s, box_regression = heads.box_predictor(heads.box_head(pooled_s))
    labels_all = torch.cat(labels, dim=0)

    fastrcnn_loss = import_torchvision_for_detection().models.detection.roi_heads.fastrcnn_loss
    _, loss_box = fastrcnn_loss(logits_s, box_regression, labels, regression_targets)
    sizes = list(images_t.image_sizes)
    out_s = DetectorOutput(
        roi=_roi_output(s, fpn_s, pooled_s, logits_s, proposals, sizes),
        labels=labels_all,
        losses={"rpn_objectness": rpn_losses["loss_objectness"],
                "rpn_box_reg": rpn_losses["loss_rpn_box_reg"], "roi_box_reg": loss_box})
    if teacher is None:
        return out_s, None
    t = teacher.model
    with torch.no_grad():
        fpn_t = t.backbone(images_t.tensors)
        pooled_t = t.roi_heads.box_roi_pool(fpn_t, proposals, images_t.image_sizes)
        logits_t = _head_logits(t, pooled_t)
    out_t = DetectorOutput(roi=_roi_output(t, fpn_t, pooled_t, logits_t, proposals, sizes),
                           labels=labels_all)
    return out_s, out_t


def _roi_output(model: nn.Module, fpn: OrderedDict[str, Tensor], pooled: Tensor, logits: Tensor,
                proposals: list[Tensor], sizes: list[tuple[int, int]]) -> ModelOutput:
    """The RoI-level ModelOutput of one model (see :class:`DetectorOutput`)."""
    stem = model.backbone.last_stem
    features = ([stem] if stem is not None else []) + list(fpn.values())

    def local(scales: Sequence[int], layout: str, rows: Tensor | None = None) -> Tensor:
        return region_logits(model, fpn, proposals, sizes, logits, scales, layout, rows)

    return ModelOutput(logits=logits, feature_map=pooled, features=features, region_logits=local)


@torch.no_grad()
def probe_output(detector: Detector, size: int) -> ModelOutput:
    """The RoI-level output of ``detector`` on one blank ``size`` px image and two fixed boxes,
    in eval mode (no statistics updated), so that methods can size their helper modules from the
    FPN levels and the pooled RoI features (:class:`~kdlab.methods.base.DistillContext`)."""
    m = detector.model
    was_training = m.training
    m.eval()
    try:
        device = next(m.parameters()).device
        images_t, _ = m.transform([torch.zeros(3, size, size, device=device)])
        fpn = m.backbone(images_t.tensors)
        h, w = images_t.image_sizes[0]
        proposals = [torch.tensor([[0.0, 0.0, w / 2, h / 2], [w / 4, h / 4, w, h]],
                                  device=device)]
        pooled = m.roi_heads.box_roi_pool(fpn, proposals, images_t.image_sizes)
        logits = _head_logits(m, pooled)
        return _roi_output(m, fpn, pooled, logits, proposals, list(images_t.image_sizes))
    finally:
        m.train(was_training)
