"""kdlab.tasks.detection.model: the Faster R-CNN FPN detector, the RoI distillation pass and
SDD's RoI regions.

References computed here, independently of the code under test:

* the FPN stage choice read off each zoo backbone's probe by hand;
* torchvision's own ``GeneralizedRCNN.forward`` losses (same seed, so same RoI sampling) and
  ``fastrcnn_loss``'s classification part (``F.cross_entropy(class_logits, labels)``, torchvision
  ``models/detection/roi_heads.py``) for the losses of :func:`roi_forward`;
* RoIAlign (``kdlab.core.vision_ops.roi_align``, sampling ratio 2, not aligned) of every RoI on
  its own FPN level (torchvision's ``LevelMapper``: ``k = floor(4 + log2(sqrt(area) / 224) +
  1e-6)`` clamped to the pyramid, spatial scale ``2**-k``) followed by the detector's box head,
  for SDD's regions: quadrant sub-boxes (grid) and the official SDD detection code's interleaved
  stride-2 views of a 14 x 14 RoIAlign (``shicaiwei123/SDD-CVPR2024`` ``detection/model/
  rcnn.py``: ``AdaptiveAvgPool2d(7)`` then the masks (even, even), (even, odd), (odd, odd),
  (odd, even)).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import DataConfig, DetectionConfig, MethodConfig
from kdlab.core.errors import MethodError, ModelError
from kdlab.models import create_model
from kdlab.models.output import KdModel, ModelOutput
from support import tiny_detector, two_coco_images

ARCH = "MobileNetV2_imagenet"
K = 3  # foreground classes of the tiny set


def _detector(cfg: DetectionConfig, seed: int, arch: str = ARCH) -> Any:
    return tiny_detector(cfg, seed, K, arch)


_two_images = two_coco_images


@pytest.fixture(scope="module")
def frozen_cfg(det_cfg: DetectionConfig) -> DetectionConfig:
    """The tiny detector with frozen BatchNorm (train and eval passes of the body agree, so a
    teacher in eval mode equals a student copy in train mode)."""
    return det_cfg.model_copy(update={"freeze_batchnorm": True})


@pytest.fixture(scope="module")
def data(coco_root: Path, det_cfg: DetectionConfig) -> Any:
    from kdlab.tasks.detection.data import build_detection_data

    cfg = DataConfig(name="coco", root=str(coco_root), batch_size=2, eval_batch_size=2,
                     num_workers=0)
    return build_detection_data(cfg, det_cfg.model_copy(update={"train_split": "train",
                                                                 "test_split": "test"}),
                                seed=0, device=torch.device("cpu"))


def _methods(task_data: Any, student: Any, teacher: Any, **methods: dict[str, Any]
             ) -> dict[str, Any]:
    """``{key: CompositeDistiller}`` built like a run does (the task's distill_context)."""
    from kdlab.methods.compose import build_method
    from kdlab.tasks.detection.task import DetectionTask

    ctx = DetectionTask().distill_context(student, teacher, task_data)
    return {k: build_method(MethodConfig(**m), ctx) for k, m in methods.items()}


# ----------------------------------------------------------------------------------------------
# 1. the detector
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "indices", "channels"), [
    # resnet18_imagenet features at 224 px: [stem 64@56, layer1 64@56, layer2 128@28,
    # layer3 256@14, layer4 512@7]; the stem (features[0]) is never a pyramid input.
    ("resnet18_imagenet", [1, 2, 3, 4], [64, 128, 256, 512]),
    # MobileNetV2_imagenet: [stem 32@112, 24@56, 32@28, 96@14, 320@7]
    ("MobileNetV2_imagenet", [1, 2, 3, 4], [24, 32, 96, 320]),
])
def test_pyramid_stages_of_zoo_backbones(tv: Any, arch: str, indices: list[int],
                                         channels: list[int]) -> None:
    from kdlab.tasks.detection.model import pyramid_stages

    body = create_model(arch, num_classes=1000, in_channels=3)
    with torch.no_grad():
        feats = body.eval()(torch.zeros(1, 3, 224, 224)).features
    # the hand-read table agrees with the probe: each chosen stage has stride 4, 8, 16, 32 and
    # is the last feature at that stride
    sides = [f.shape[-1] for f in feats]
    for idx, stride in zip(indices, (4, 8, 16, 32), strict=True):
        assert sides[idx] == 224 // stride
        assert all(s != sides[idx] for s in sides[idx + 1:])
    assert pyramid_stages(body) == (indices, channels, [4, 8, 16, 32])


class _Stages(KdModel):
    """Features at strides 2, 4, 4, 8, 8, 8, 16, 32 (channels 1..8) plus a flat embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels, self.num_classes = 3, 2
        self.w = nn.Parameter(torch.zeros(()))
        self.classifier = nn.Linear(1, 2)

    def forward(self, x: Tensor) -> ModelOutput:
        side = x.shape[-1]
        feats = [torch.zeros(x.shape[0], c, side // s, side // s)
                 for c, s in enumerate((2, 4, 4, 8, 8, 8, 16, 32), start=1)]
        return ModelOutput(logits=torch.zeros(x.shape[0], 2), feature_map=feats[-1],
                           features=[*feats, x.mean((1, 2))])


def test_pyramid_stages_takes_the_last_stage_of_each_stride(tv: Any) -> None:
    from kdlab.tasks.detection.model import pyramid_stages

    # indices: stride 4 -> 2 (not 1), stride 8 -> 5 (not 3, 4), 16 -> 6, 32 -> 7
    assert pyramid_stages(_Stages()) == ([2, 5, 6, 7], [3, 6, 7, 8], [4, 8, 16, 32])


def test_roi_head_has_k_plus_one_outputs(tv: Any, det_cfg: DetectionConfig) -> None:
    det = _detector(det_cfg, 0)
    predictor = det.model.roi_heads.box_predictor
    assert det.num_classes == K
    assert predictor.cls_score.out_features == K + 1
    assert predictor.bbox_pred.out_features == 4 * (K + 1)
    assert predictor.cls_score.in_features == det_cfg.representation_size
    assert det.backbone.out_channels == det_cfg.fpn_channels


@pytest.mark.parametrize("sizes", [[8, 16, 32, 64], [8, 16, 32, 64, 128, 256]])
def test_bad_anchor_sizes_length_is_refused(tv: Any, det_cfg: DetectionConfig,
                                            sizes: list[int]) -> None:
    from kdlab.tasks.detection.model import build_detector

    with pytest.raises(ModelError, match=r"detection\.anchor_sizes") as err:
        build_detector(ARCH, K, det_cfg.model_copy(update={"anchor_sizes": sizes}))
    assert "needs 5 sizes" in str(err.value) and f"got {len(sizes)}" in str(err.value)


def test_freeze_batchnorm_keeps_eval_outputs(tv: Any, det_cfg: DetectionConfig) -> None:
    from kdlab.tasks.detection.model import _freeze_batchnorm

    frozen_cls = tv.ops.misc.FrozenBatchNorm2d
    torch.manual_seed(3)
    body = create_model(ARCH, num_classes=1000, in_channels=3)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    assert n_bn > 10
    for m in body.modules():  # non-trivial statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = body.eval()(x).features
        frozen = _freeze_batchnorm(copy.deepcopy(body))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
        assert sum(isinstance(m, frozen_cls) for m in frozen.modules()) == n_bn
        for a, b in zip(ref, frozen.eval()(x).features, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        # frozen statistics: the train-mode pass is the eval pass and updates nothing
        before = copy.deepcopy(frozen.state_dict())
        for a, b in zip(ref, frozen.train()(x).features, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for k, v in frozen.state_dict().items():
        assert torch.equal(v, before[k]), k
    # and build_detector applies it to the whole body when asked
    det = _detector(det_cfg.model_copy(update={"freeze_batchnorm": True}), 0)
    body_modules = list(det.backbone.body.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body_modules)
    assert sum(isinstance(m, frozen_cls) for m in body_modules) == n_bn


# ----------------------------------------------------------------------------------------------
# 2. roi_forward
# ----------------------------------------------------------------------------------------------


def test_roi_forward_equals_torchvision_forward(tv: Any, coco_root: Path,
                                                det_cfg: DetectionConfig) -> None:
    from kdlab.tasks.detection.model import roi_forward

    det = _detector(det_cfg, 0)
    images, targets = _two_images(coco_root)
    torch.manual_seed(11)
    out, none = roi_forward(det, None, images, targets)
    assert none is None
    assert set(out.losses) == {"rpn_objectness", "rpn_box_reg", "roi_box_reg"}
    r = len(images) * det_cfg.box_batch_size_per_image
    assert out.roi.logits.shape == (r, K + 1)
    assert out.labels.shape == (r,) and out.labels.dtype == torch.long
    assert 0 <= int(out.labels.min()) and int(out.labels.max()) <= K
    assert int((out.labels > 0).sum()) > 0  # the ground-truth boxes are among the proposals
    assert out.roi.feature_map.shape == (r, det_cfg.fpn_channels, 7, 7)
    # features: the stem, then P2..P5 and the max-pool level (finest first)
    fpn = out.roi.features[1:]
    assert len(fpn) == 5 and all(f.shape[1] == det_cfg.fpn_channels for f in fpn)
    assert [f.shape[-1] for f in fpn] == [16, 8, 4, 2, 1]

    # torchvision's own training forward with the same seed samples the same RoIs
    torch.manual_seed(11)
    ref = det(images, targets)
    for ours, theirs in (("rpn_objectness", "loss_objectness"),
                         ("rpn_box_reg", "loss_rpn_box_reg"), ("roi_box_reg", "loss_box_reg")):
        torch.testing.assert_close(out.losses[ours], ref[theirs], rtol=1e-5, atol=1e-6)
    # fastrcnn_loss's classification part, on the same tensors
    own_ce = F.cross_entropy(out.roi.logits, out.labels)
    torch.testing.assert_close(own_ce, ref["loss_classifier"], rtol=1e-5, atol=1e-6)


def test_roi_forward_teacher_copy_is_row_aligned_and_gets_no_grad(
        tv: Any, coco_root: Path, frozen_cfg: DetectionConfig, data: Any) -> None:
    from kdlab.tasks.detection.model import roi_forward
    from kdlab.tasks.detection.task import DetectionTask

    student = _detector(frozen_cfg, 0)
    # parameters still requiring grad: roi_forward itself must keep the teacher out of autograd
    teacher = copy.deepcopy(student).eval()
    images, targets = _two_images(coco_root)
    torch.manual_seed(5)
    out_s, out_t = roi_forward(student, teacher, images, targets)
    assert out_t is not None and not out_t.losses
    torch.testing.assert_close(out_t.roi.logits, out_s.roi.logits, rtol=0, atol=1e-6)
    assert torch.equal(out_t.labels, out_s.labels)
    assert not out_t.roi.logits.requires_grad and out_s.roi.logits.requires_grad

    task = DetectionTask()
    ms = _methods(data, student, teacher, kd={"name": "kd"},
                  dkd={"name": "dkd", "params": {"beta": 0.25, "temperature": 1.0,
                                                 "warmup_epochs": 0}},
                  sd={"name": "sd_dkd", "params": {"scales": [1, 2], "warmup_epochs": 0}})
    roi_s, roi_t, batch = task.distill_inputs(out_s, out_t, None)
    assert torch.equal(batch.labels, out_s.labels)
    terms = {k: m(roi_s, roi_t, batch, 1) for k, m in ms.items()}
    assert abs(float(terms["kd"]["kd"].detach())) < 1e-6
    assert abs(float(terms["dkd"]["dkd"].detach())) < 1e-6
    assert abs(float(terms["sd"]["sdd"].detach())) < 1e-6  # every region of both models agrees too
    # ce is Faster R-CNN's RoI classification loss
    torch.testing.assert_close(terms["dkd"]["ce"], F.cross_entropy(out_s.roi.logits,
                                                                   out_s.labels))
    loss = sum(sum(t.values()) for t in terms.values()) + sum(task.task_terms(out_s).values())
    loss.backward()  # type: ignore[union-attr]
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.roi_heads.box_predictor.cls_score.weight.grad is not None
    assert student.backbone.body.features[0][0].weight.grad is not None


def test_roi_losses_are_positive_for_a_different_teacher(
        tv: Any, coco_root: Path, frozen_cfg: DetectionConfig, data: Any) -> None:
    """The zero losses above are not zero by construction: another teacher gives > 0."""
    from kdlab.tasks.detection.model import roi_forward

    student, teacher = _detector(frozen_cfg, 0), _detector(frozen_cfg, 1).eval()
    images, targets = _two_images(coco_root)
    torch.manual_seed(5)
    out_s, out_t = roi_forward(student, teacher, images, targets)
    assert out_t is not None
    assert not torch.allclose(out_s.roi.logits, out_t.roi.logits)
    ms = _methods(data, student, teacher, kd={"name": "kd"},
                  dkd={"name": "dkd", "params": {"warmup_epochs": 0}})
    from kdlab.tasks.detection.task import DetectionTask

    roi_s, roi_t, batch = DetectionTask().distill_inputs(out_s, out_t, None)
    assert float(ms["kd"](roi_s, roi_t, batch, 1)["kd"].detach()) > 1e-6
    assert float(ms["dkd"](roi_s, roi_t, batch, 1)["dkd"].detach()) > 1e-6


# ----------------------------------------------------------------------------------------------
# 3. region_logits
# ----------------------------------------------------------------------------------------------

#: RoIs on a 512 px image whose sqrt(area) puts them on P2, P2, P3, P4 and P5
#: (floor(4 + log2(s / 224)) = 0 -> 2, 1 -> 2, 3, 4, 5).
_BOXES = torch.tensor([[3.3, 5.0, 17.9, 25.2],
                       [40.5, 60.0, 101.0, 99.7],
                       [100.2, 80.4, 251.0, 201.9],
                       [10.0, 20.0, 260.6, 270.1],
                       [4.0, 9.5, 505.0, 500.0]])


def _levels(boxes: Tensor) -> list[int]:
    """torchvision's LevelMapper (canonical size 224 at level 4), clamped to P2..P5."""
    out = []
    for x1, y1, x2, y2 in boxes.tolist():
        k = math.floor(4 + math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 224) + 1e-6)
        out.append(min(max(k, 2), 5))
    return out


def _pool_each(fpn: dict[str, Tensor], boxes: Tensor, size: int) -> Tensor:
    """RoIAlign of each box on its own level at ``size x size`` (sampling ratio 2)."""
    from kdlab.core.vision_ops import roi_align

    rows = []
    for box, k in zip(boxes, _levels(boxes), strict=True):
        rows.append(roi_align(fpn[str(k - 2)], [box[None]], size, spatial_scale=2.0 ** -k,
                              sampling_ratio=2, aligned=False))
    return torch.cat(rows)


def _head(det: Any, pooled: Tensor) -> Tensor:
    heads = det.model.roi_heads
    return heads.box_predictor.cls_score(heads.box_head(pooled))


@pytest.fixture(scope="module")
def region_setup(tv: Any, det_cfg: DetectionConfig) -> tuple[Any, dict[str, Tensor], Tensor]:
    """A detector, the FPN of one random 512 px image and the global logits of ``_BOXES``."""
    det = _detector(det_cfg, 2)
    with torch.no_grad():
        fpn = det.backbone(torch.randn(1, 3, 512, 512))
        pooled = det.model.roi_heads.box_roi_pool(fpn, [_BOXES], [(512, 512)])
        glob = _head(det, pooled)
        # the detector's own pooler uses the levels and scales computed here
        torch.testing.assert_close(glob, _head(det, _pool_each(fpn, _BOXES, 7)),
                                   rtol=1e-4, atol=1e-5)
    assert sorted(set(_levels(_BOXES))) == [2, 3, 4, 5]
    return det, fpn, glob


def _regions(setup: Any, scales: list[int], layout: str) -> Tensor:
    from kdlab.tasks.detection.model import region_logits

    det, fpn, glob = setup
    with torch.no_grad():
        return region_logits(det.model, fpn, [_BOXES], [(512, 512)], glob, scales, layout)


def test_grid_scale_one_is_the_global_logits(region_setup: Any) -> None:
    out = _regions(region_setup, [1], "grid")
    assert out.shape == (len(_BOXES), K + 1, 1)
    assert torch.equal(out[:, :, 0], region_setup[2])


def _sub_boxes(boxes: Tensor, m: int) -> Tensor:
    """The ``m x m`` sub-boxes of every box, row-major: ``R x m*m x 4``."""
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = (x2 - x1) / m, (y2 - y1) / m
    cells = []
    for i in range(m):  # row (y)
        for j in range(m):  # column (x)
            cells.append(torch.stack([x1 + j * w, y1 + i * h, x1 + (j + 1) * w,
                                      y1 + (i + 1) * h], dim=1))
    return torch.stack(cells, dim=1)


@pytest.mark.parametrize("scales", [[1, 2], [1, 2, 4]])
def test_grid_regions_are_sub_boxes_on_the_rois_level(region_setup: Any,
                                                      scales: list[int]) -> None:
    from kdlab.core.vision_ops import roi_align

    det, fpn, glob = region_setup
    out = _regions(region_setup, scales, "grid")
    assert out.shape == (len(_BOXES), K + 1, sum(m * m for m in scales))
    assert torch.equal(out[:, :, 0], glob)
    col = 1
    levels = _levels(_BOXES)
    clamped = 0
    for m in [s for s in scales if s > 1]:
        subs = _sub_boxes(_BOXES, m)
        for r in range(len(_BOXES)):
            k = levels[r]  # the RoI's own level, not the sub-box's
            side = (subs[r, 0, 2:] - subs[r, 0, :2]) * 2.0 ** -k
            if bool((side >= 1).all()):
                pooled = roi_align(fpn[str(k - 2)], [subs[r]], 7, spatial_scale=2.0 ** -k,
                                   sampling_ratio=2, aligned=False)
            else:
                # a sub-box under one feature pixel: non-aligned RoIAlign would clamp its size
                # to 1 px, so the regions are the blocks of one 7m x 7m RoIAlign of the RoI
                clamped += 1
                big = roi_align(fpn[str(k - 2)], [_BOXES[r][None]], 7 * m,
                                spatial_scale=2.0 ** -k, sampling_ratio=2, aligned=False)
                pooled = torch.stack([big[0, :, 7 * i:7 * i + 7, 7 * j:7 * j + 7]
                                      for i in range(m) for j in range(m)])
            with torch.no_grad():
                ref = _head(det, pooled)  # m*m x (K+1)
            torch.testing.assert_close(out[r, :, col:col + m * m], ref.T, rtol=1e-4, atol=1e-5,
                                       msg=lambda s, r=r, m=m: f"roi {r} m {m}: {s}")
        col += m * m
    assert clamped == (1 if 4 in scales else 0)  # RoI 0 (3.7 x 5.1 px on P2) at m = 4


def test_interleaved_regions_follow_the_official_sdd_views(region_setup: Any) -> None:
    det, fpn, glob = region_setup
    out = _regions(region_setup, [1, 2], "interleaved")
    assert out.shape == (len(_BOXES), K + 1, 5)
    big = _pool_each(fpn, _BOXES, 14)
    views = [F.adaptive_avg_pool2d(big, 7)]  # the official global view
    for i, j in ((0, 0), (0, 1), (1, 1), (1, 0)):  # masks 1-4 of the official code
        mask = torch.zeros(14, 14, dtype=torch.bool)
        mask[i::2, j::2] = True
        views.append(torch.masked_select(big, mask).reshape(len(_BOXES), -1, 7, 7))
    with torch.no_grad():
        for v, view in enumerate(views):
            torch.testing.assert_close(out[:, :, v], _head(det, view), rtol=1e-4, atol=1e-5)
    # five distinct views (region 0 is not the 7 x 7 RoI logits)
    assert not torch.allclose(out[:, :, 0], glob, atol=1e-4)
    assert not torch.allclose(out[:, :, 1], out[:, :, 2], atol=1e-5)


@pytest.mark.parametrize(("scales", "layout"), [([1], "interleaved"),
                                                ([1, 2, 4], "interleaved"),
                                                ([1, 2], "quadrants")])
def test_bad_region_layouts_are_refused(region_setup: Any, scales: list[int],
                                        layout: str) -> None:
    with pytest.raises(MethodError, match="interleaved|grid"):
        _regions(region_setup, scales, layout)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sd_dkd_with_scale_one_is_dkd_on_roi_logits(tv: Any, coco_root: Path,
                                                    frozen_cfg: DetectionConfig, data: Any,
                                                    temperature: float) -> None:
    from kdlab.tasks.detection.model import roi_forward
    from kdlab.tasks.detection.task import DetectionTask

    student, teacher = _detector(frozen_cfg, 0), _detector(frozen_cfg, 1).eval()
    teacher.requires_grad_(False)
    images, targets = _two_images(coco_root)
    torch.manual_seed(5)
    out_s, out_t = roi_forward(student, teacher, images, targets)
    dkd = {"alpha": 1.0, "beta": 0.25, "temperature": temperature, "warmup_epochs": 4}
    ms = _methods(data, student, teacher, dkd={"name": "dkd", "params": dkd},
                  sd={"name": "sd_dkd", "params": {**dkd, "scales": [1]}},
                  sd2={"name": "sd_dkd", "params": {**dkd, "scales": [1, 2]}})
    roi_s, roi_t, batch = DetectionTask().distill_inputs(out_s, out_t, None)
    a = ms["dkd"](roi_s, roi_t, batch, 2)
    b = ms["sd"](roi_s, roi_t, batch, 2)
    c = ms["sd2"](roi_s, roi_t, batch, 2)
    dkd_value = float(a["dkd"].detach())
    assert dkd_value > 0
    torch.testing.assert_close(b["sdd"], a["dkd"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(b["ce"], a["ce"])
    # the local regions change the loss (the comparison above can fail)
    assert abs(float(c["sdd"].detach()) - dkd_value) > 1e-5 * dkd_value
    # gradients agree too
    ga = torch.autograd.grad(a["dkd"], roi_s.logits, retain_graph=True)[0]
    gb = torch.autograd.grad(b["sdd"], roi_s.logits, retain_graph=True)[0]
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-8)


def test_sd_dkd_with_unit_weights_is_the_official_mean_over_regions(
        tv: Any, coco_root: Path, frozen_cfg: DetectionConfig, data: Any) -> None:
    """The official SDD detection code averages DKD over its five views with equal weights
    (``dkd_sum / count_num``); kdlab's sd_dkd equals that with ``sdd_beta = 1`` (and the default
    ``consistent_weight = 1``): here on the grid regions of scales [1, 2] of every RoI
    (``detection_region_rois: all``, ``detection_region_fraction: 1``)."""
    from kdlab.tasks.detection.model import roi_forward
    from kdlab.tasks.detection.task import DetectionTask

    student, teacher = _detector(frozen_cfg, 0), _detector(frozen_cfg, 1).eval()
    images, targets = _two_images(coco_root)
    torch.manual_seed(5)
    out_s, out_t = roi_forward(student, teacher, images, targets)
    dkd = {"alpha": 1.0, "beta": 0.25, "temperature": 2.0, "warmup_epochs": 0}
    ms = _methods(data, student, teacher, dkd={"name": "dkd", "params": dkd},
                  sd={"name": "sd_dkd", "params": {**dkd, "scales": [1, 2], "sdd_beta": 1.0,
                                                   "detection_region_fraction": 1.0,
                                                   "detection_region_rois": "all"}})
    roi_s, roi_t, batch = DetectionTask().distill_inputs(out_s, out_t, None)
    got = ms["sd"](roi_s, roi_t, batch, 1)["sdd"]
    local_s = roi_s.region_logits([1, 2], "grid")
    with torch.no_grad():
        local_t = roi_t.region_logits([1, 2], "grid")
    views = []
    for n in range(local_s.shape[2]):
        vs = ModelOutput(logits=local_s[:, :, n], feature_map=roi_s.feature_map)
        vt = ModelOutput(logits=local_t[:, :, n], feature_map=roi_t.feature_map)
        views.append(ms["dkd"](vs, vt, batch, 1)["dkd"])
    assert len(views) == 5
    torch.testing.assert_close(got, torch.stack(views).mean(), rtol=1e-5, atol=1e-8)
