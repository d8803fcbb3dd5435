"""Issue 26's fast detection paths against the computations they replace.

* ``roi_align``'s separable matrix path (taken where a gradient is needed on maps of at most
  ``DENSE_MAX_PIXELS`` pixels) against its ``embedding_bag`` path, itself checked against
  torchvision's compiled kernel in ``tests/core/test_roi_align.py``: same values and gradients;
* SDD's RoI subset (``detection_region_fraction``): the subset's region logits are the full
  computation's rows, and the loss is the unbiased estimate written out here from the per-region
  DKD losses and SDD's weights (Wei, Luo, Luo, CVPR 2024, Eqs. 6-9), not through ``sdd_loss``;
* ``runtime.channels_last`` on a detector: the same losses as the contiguous layout.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from kdlab.config import DataConfig, DetectionConfig, MethodConfig
from kdlab.core import vision_ops
from kdlab.core.errors import MethodError
from kdlab.core.vision_ops import roi_align
from support import tiny_detector, two_coco_images

K = 3


@pytest.fixture
def bag_only() -> Iterator[None]:
    """roi_align without its matrix path (every call takes the embedding_bag path)."""
    limit = vision_ops.DENSE_MAX_PIXELS
    vision_ops.DENSE_MAX_PIXELS = 0
    yield
    vision_ops.DENSE_MAX_PIXELS = limit


def _rois(k: int, side: float, images: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * side * 0.9 - side * 0.05  # some cross the border
    wh = torch.rand(k, 2, generator=g) * side * 0.6 + 0.3
    batch = torch.randint(0, images, (k, 1), generator=g).float()  # images out of order
    return torch.cat([batch, xy, xy + wh], 1)


def _fwd_bwd(x: Tensor, rois: Tensor, out: int, scale: float, sr: int, aligned: bool,
             upstream: Tensor | None = None) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = roi_align(x, rois, out, scale, sr, aligned)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)) if upstream is None \
        else upstream
    (y * up).sum().backward()
    assert x.grad is not None
    return y.detach(), x.grad


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("out", "sr", "aligned"), [(7, 2, False), (14, 2, False), (7, 0, False),
                                                    (5, 0, True), (7, 1, True)])
def test_dense_roi_align_equals_the_bag_path(out: int, sr: int, aligned: bool,
                                             channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 12, 10, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rois = _rois(40, 40.0, 3, 1)
    dense_y, dense_g = _fwd_bwd(x, rois, out, 0.25, sr, aligned)
    limit = vision_ops.DENSE_MAX_PIXELS
    vision_ops.DENSE_MAX_PIXELS = 0
    try:
        bag_y, bag_g = _fwd_bwd(x, rois, out, 0.25, sr, aligned)
    finally:
        vision_ops.DENSE_MAX_PIXELS = limit
    with torch.no_grad():  # no gradient needed: the bag path, whatever the limit
        torch.testing.assert_close(roi_align(x, rois, out, 0.25, sr, aligned), bag_y,
                                   rtol=0, atol=0)
    assert dense_y.abs().sum() > 0
    torch.testing.assert_close(dense_y, bag_y, rtol=0, atol=1e-6)
    torch.testing.assert_close(dense_g, bag_g, rtol=1e-5, atol=1e-5)  # float32 sums


def test_dense_roi_align_gradcheck_and_map_size_limit() -> None:
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[1, 0.3, 0.6, 4.1, 3.7], [0, -1.4, 2.2, 6.6, 5.4],
                         [1, 1.1, 1.2, 2.3, 2.9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, (2, 3), 1.0, 2, False), (x,))
    # a map above the limit takes the bag path (same numbers; just slower there for the product)
    big = torch.randn(1, 2, 40, 40)
    assert 40 * 40 > vision_ops.DENSE_MAX_PIXELS
    y, grad = _fwd_bwd(big, torch.tensor([[0, 2.0, 3.0, 30.0, 20.0]]), 7, 1.0, 2, False)
    assert torch.count_nonzero(grad) > 0 and y.shape == (1, 2, 7, 7)


# ---------------------------------------------------------------------------------------------
# SDD's RoI subset
# ---------------------------------------------------------------------------------------------


def _detector(cfg: DetectionConfig, seed: int) -> Any:
    return tiny_detector(cfg, seed, K)


_two_images = two_coco_images


@pytest.fixture(scope="module")
def setup(coco_root: Path, det_cfg: DetectionConfig) -> Any:
    from kdlab.tasks.detection.data import build_detection_data
    from kdlab.tasks.detection.model import roi_forward
    from kdlab.tasks.detection.task import DetectionTask

    cfg = det_cfg.model_copy(update={"freeze_batchnorm": True})
    data = build_detection_data(
        DataConfig(name="coco", root=str(coco_root), batch_size=2, eval_batch_size=2,
                   num_workers=0), cfg, seed=0, device=torch.device("cpu"))
    student, teacher = _detector(cfg, 0), _detector(cfg, 1).eval()
    images, targets = _two_images(coco_root)
    torch.manual_seed(5)
    out_s, out_t = roi_forward(student, teacher, images, targets)
    task = DetectionTask()
    return task, data, student, teacher, task.distill_inputs(out_s, out_t, None)


def _method(setup: Any, **params: Any) -> Any:
    from kdlab.methods.compose import build_method

    task, data, student, teacher, _ = setup
    ctx = task.distill_context(student, teacher, data)
    dkd = {"alpha": 1.0, "beta": 0.25, "temperature": 1.0, "warmup_epochs": 0}
    return build_method(MethodConfig(name="sd_dkd", params={**dkd, **params}), ctx)


def test_region_subset_rows_equal_the_full_computation(setup: Any) -> None:
    roi_s = setup[4][0]
    full = roi_s.region_logits([1, 2], "grid")
    r = full.shape[0]
    rows = torch.tensor([0, 3, r // 2, r - 1])
    sub = roi_s.region_logits([1, 2], "grid", rows=rows)
    torch.testing.assert_close(sub, full[rows], rtol=0, atol=1e-6)
    with pytest.raises(MethodError, match="increasing"):
        roi_s.region_logits([1, 2], "grid", rows=torch.tensor([3, 0]))


def _dkd_rows(s: Tensor, t: Tensor, y: Tensor) -> Tensor:
    """DKD per row (alpha 1, beta 0.25, T 1), Zhao et al., CVPR 2022, Eq. 7, written out."""
    ps, pt = s.softmax(1), t.softmax(1)
    gt = torch.nn.functional.one_hot(y, s.shape[1]).bool()
    bs = torch.stack([ps[gt], 1 - ps[gt]], 1)
    bt = torch.stack([pt[gt], 1 - pt[gt]], 1)
    tckd = (bt * (bt.log() - bs.log())).sum(1)
    qs = s.masked_fill(gt, -1e9).log_softmax(1)
    qt = t.masked_fill(gt, -1e9).softmax(1)
    nckd = (qt * (qt.clamp_min(1e-30).log() - qs)).masked_fill(gt, 0).sum(1)
    return tckd + 0.25 * nckd


def _region_terms(setup: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-RoI, per-region DKD losses ``R x 5`` of the grid regions [1, 2], SDD's weights
    (2 where a region's teacher correctness differs from the global region's) and the labels."""
    roi_s, roi_t, batch = setup[4]
    ls = roi_s.region_logits([1, 2], "grid")
    with torch.no_grad():
        lt = roi_t.region_logits([1, 2], "grid")
    y = batch.labels
    loss = torch.stack([_dkd_rows(ls[:, :, j], lt[:, :, j], y) for j in range(5)], 1)
    ok = lt.argmax(1) == y[:, None]
    return loss, torch.where(ok != ok[:, :1], 2.0, 1.0), y


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_region_fraction_is_the_unbiased_estimate(setup: Any, fraction: float) -> None:
    roi_s, roi_t, batch = setup[4]
    r = batch.labels.shape[0]
    n = math.ceil(fraction * r)
    assert 0 < n < r
    method = _method(setup, scales=[1, 2], sdd_beta=2.0, detection_region_fraction=fraction,
                     detection_region_rois="all")
    torch.manual_seed(7)
    got = method(roi_s, roi_t, batch, 1)["sdd"]
    torch.manual_seed(7)
    rows = torch.randperm(r)[:n].sort().values  # the draw the method makes
    # l[b, j]: DKD of region j of RoI b; weight 2 where the teacher's correctness differs
    loss, weight, _ = _region_terms(setup)
    chosen = torch.zeros(r, dtype=torch.bool)
    chosen[rows] = True
    local = (weight[:, 1:] * loss[:, 1:])[chosen].sum() * (r / n)
    want = (loss[:, 0].sum() + local) / (5 * r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # E over draws: every RoI is in S with probability n / r, so E[want] is the full loss
    full = (loss[:, 0].sum() + (weight[:, 1:] * loss[:, 1:]).sum()) / (5 * r)
    full_method = _method(setup, scales=[1, 2], sdd_beta=2.0, detection_region_fraction=1.0,
                          detection_region_rois="all")
    torch.testing.assert_close(full_method(roi_s, roi_t, batch, 1)["sdd"], full,
                               rtol=1e-5, atol=1e-7)
    # gradients reach the student's box head and the global logits of every RoI
    head = setup[2].model.roi_heads.box_head.fc6.weight
    g_head, g_glob = torch.autograd.grad(got, [head, roi_s.logits], retain_graph=True)
    assert torch.count_nonzero(g_head) > 0 and bool((g_glob.abs().sum(1) > 0).all())


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_foreground_regions_drop_the_background_local_terms(setup: Any, fraction: float
                                                            ) -> None:
    """``detection_region_rois: foreground``: SDD on the foreground RoIs and, on every background
    RoI, its global region's loss at a whole RoI's weight (its N regions taken as equal to the
    global one); with a fraction below 1, the unbiased estimate of that over a random subset of
    the foreground RoIs. Without foreground RoIs it is exactly the base loss (DKD)."""
    roi_s, roi_t, batch = setup[4]
    loss, weight, y = _region_terms(setup)
    r, fg = y.shape[0], torch.nonzero(y > 0).flatten()
    assert 0 < fg.numel() < r  # the fixture's RoIs have both kinds
    method = _method(setup, scales=[1, 2], sdd_beta=2.0, detection_region_rois="foreground",
                     detection_region_fraction=fraction)
    torch.manual_seed(11)
    got = method(roi_s, roi_t, batch, 1)["sdd"]
    n = math.ceil(fraction * fg.numel())
    torch.manual_seed(11)
    rows = fg if n == fg.numel() else fg[torch.randperm(fg.numel())[:n]].sort().values
    chosen = torch.zeros(r, dtype=torch.bool)
    chosen[rows] = True
    local = (weight[:, 1:] * loss[:, 1:])[chosen].sum() * (fg.numel() / n)
    background = y == 0
    want = (loss[~background, 0].sum() + local + 5 * loss[background, 0].sum()) / (5 * r)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # no foreground RoI: DKD on the RoI logits, as the dkd method computes it
    zero = torch.zeros_like(y)
    empty = type(batch)(batch.images, zero, batch.index)
    dkd = _dkd_rows(roi_s.logits, roi_t.logits, zero).mean()
    torch.testing.assert_close(method(roi_s, roi_t, empty, 1)["sdd"], dkd, rtol=1e-5, atol=1e-7)


def test_region_fraction_default_and_validation(setup: Any) -> None:
    grid = _method(setup, scales=[1, 2])
    inter = _method(setup, scales=[1, 2], detection_regions="interleaved", temperature=2.0)
    found = [d for m in (grid, inter) for d in m.modules() if hasattr(d, "region_fraction")]
    assert [d.region_fraction() for d in found] == [1.0, 1.0]  # the whole pool unless asked
    # the grid layout distils the foreground RoIs' regions by default, interleaved every RoI's
    assert [d.region_pool() for d in found] == ["foreground", "all"]
    with pytest.raises(MethodError, match="detection_region_fraction"):
        _method(setup, scales=[1, 2], detection_regions="interleaved",
                detection_region_fraction=0.5)
    with pytest.raises(MethodError, match="detection_region_rois"):
        _method(setup, scales=[1, 2], detection_regions="interleaved",
                detection_region_rois="foreground")


def test_channels_last_detector_gives_the_same_losses(coco_root: Path,
                                                      det_cfg: DetectionConfig) -> None:
    from kdlab.tasks.detection.model import roi_forward

    cfg = det_cfg.model_copy(update={"freeze_batchnorm": True})
    plain = _detector(cfg, 0)
    cl = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    images, targets = _two_images(coco_root)
    outs = []
    for det in (plain, cl):
        torch.manual_seed(5)
        out, _ = roi_forward(det, None, images, targets)
        outs.append(out)
    assert outs[1].roi.features[1].is_contiguous(memory_format=torch.channels_last)
    for key in outs[0].losses:
        torch.testing.assert_close(outs[1].losses[key], outs[0].losses[key], rtol=1e-4,
                                   atol=1e-5)
    torch.testing.assert_close(outs[1].roi.logits, outs[0].roi.logits, rtol=1e-4, atol=1e-5)
