"""Pure-PyTorch detection kernels with torchvision's signatures and semantics.

On machines where torchvision's compiled operators cannot load (a CUDA build of torchvision next
to a CPU-only torch), ``torchvision.ops.nms`` fails; these functions are drop-in replacements that
reproduce the compiled kernels' results (``torchvision/csrc/ops/cpu/nms_kernel.cpp``):

* :func:`nms`: boxes sorted by descending score, a box is suppressed by a kept box when their IoU
  is **strictly greater** than the threshold, areas are ``(x2 - x1) * (y2 - y1)`` (no ``+1``),
  and the kept indices are returned in descending-score order;
* :func:`batched_nms`: NMS independently per category, through the same coordinate-offset trick
  torchvision uses (each category's boxes shifted by ``idx * (max_coordinate + 1)``), so that
  boxes of different categories never overlap.

Ties in score keep the input order (a stable sort); the compiled kernel's order for exactly tied
scores is that of its unstable sort and is not specified.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdlab.core.errors import KdlabError

__all__ = ["DetectionOpError", "batched_nms", "box_iou_matrix", "nms", "roi_align"]


class DetectionOpError(KdlabError, ValueError):
    """A detection kernel got inputs of the wrong shape."""


def _check(boxes: Tensor, scores: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise DetectionOpError(f"boxes must be N x 4 (x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise DetectionOpError(f"scores must be a vector of {boxes.shape[0]} values, got shape "
                               f"{tuple(scores.shape)}")


def box_iou_matrix(boxes: Tensor) -> Tensor:
    """``IoU[i, j] = inter(i, j) / (area_i + area_j - inter(i, j))`` of ``N x 4`` boxes
    ``(x1, y1, x2, y2)``, with ``area = (x2 - x1) * (y2 - y1)`` as torchvision's NMS kernel
    computes it (a zero union gives NaN, which suppresses nothing)."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1) * (y2 - y1)
    w = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :]))
    h = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :]))
    inter = w.clamp(min=0) * h.clamp(min=0)
    return inter / (areas[:, None] + areas[None, :] - inter)


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression with ``torchvision.ops.nms``'s semantics.

    Visiting boxes by descending score, each box not yet suppressed is kept and suppresses every
    later box whose IoU with it is strictly greater than ``iou_threshold``.

    Args:
        boxes: ``N x 4`` boxes ``(x1, y1, x2, y2)``.
        scores: ``N`` scores.
        iou_threshold: boxes with IoU ``> iou_threshold`` with a kept box are discarded.

    Returns:
        int64 indices of the kept boxes, in descending-score order, on ``boxes.device``.
    """
    _check(boxes, scores)
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    over = (box_iou_matrix(boxes[order]) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(n, dtype=bool)
    kept: list[int] = []
    for i in range(n):
        if suppressed[i]:
            continue
        kept.append(i)
        suppressed |= over[i]
    return order[torch.tensor(kept, dtype=torch.int64, device=order.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS performed independently per category ``idxs`` (``torchvision.ops.batched_nms``).

    Each category's boxes are shifted by ``idx * (max_coordinate + 1)`` so that boxes of
    different categories cannot overlap, then :func:`nms` runs once.

    Returns:
        int64 indices of the kept boxes, in descending-score order.
    """
    _check(boxes, scores)
    if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
        raise DetectionOpError(f"idxs must be a vector of {boxes.shape[0]} category indices, "
                               f"got shape {tuple(idxs.shape)}")
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1, dtype=boxes.dtype,
                                                           device=boxes.device))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def _roi_boxes(boxes: Tensor | list[Tensor] | tuple[Tensor, ...], input: Tensor) -> Tensor:
    """``K x 5`` rois ``(batch_index, x1, y1, x2, y2)`` from either accepted box format."""
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[-1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise DetectionOpError(f"boxes[{i}] must be a L x 4 tensor (x1, y1, x2, y2), "
                                       f"got {shape}")
        if len(boxes) == 0:
            return input.new_zeros((0, 5))
        cat = torch.cat([b.to(input.device) for b in boxes], dim=0)
        idx = torch.cat([torch.full((b.shape[0], 1), i, dtype=cat.dtype, device=cat.device)
                         for i, b in enumerate(boxes)], dim=0)
        return torch.cat([idx, cat], dim=1)
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 5:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise DetectionOpError(f"boxes must be a K x 5 tensor (batch_index, x1, y1, x2, y2) or a "
                               f"list of L x 4 tensors, got {shape}")
    return boxes


def _axis_samples(start: Tensor, size: Tensor, pooled: int, grid: int, extent: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bilinear taps along one axis for ``K`` RoIs: the low/high pixel indices and their
    weights at ``start + p * bin + (i + 0.5) * bin / grid`` (``K x pooled x grid`` each), with
    the compiled kernel's border rule (outside ``[-1, extent]`` → weight 0, else clamp)."""
    bin_size = size / pooled
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)
    i = torch.arange(grid, device=start.device, dtype=start.dtype) + 0.5
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + i[None, None, :] * bin_size[:, None, None] / grid)
    valid = (coord >= -1.0) & (coord <= extent)
    c = coord.clamp(min=0.0, max=float(extent - 1))
    low = c.floor()
    frac = c - low
    low_i = low.long().clamp(min=0, max=extent - 1)
    high_i = (low_i + 1).clamp(max=extent - 1)
    zero = torch.zeros((), dtype=coord.dtype, device=coord.device)
    w_low = torch.where(valid, 1.0 - frac, zero)
    w_high = torch.where(valid, frac, zero)
    return low_i, high_i, w_low, w_high


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """RoIAlign (He et al., "Mask R-CNN", ICCV 2017) equal to torchvision's compiled kernels.

    For RoI ``k`` on image ``b`` and output cell ``(i, j)``::

        out[k, c, i, j] = (1 / count) * sum_{iy < gh, ix < gw} bilinear(input[b, c], y, x)
        y = y1 * s - o + i * bin_h + (iy + 0.5) * bin_h / gh      (o = 0.5 if aligned else 0)
        bin_h = roi_h / ph,  roi_h = (y2 - y1) * s  (clamped >= 1 when not aligned)

    with ``gh = sampling_ratio`` if it is ``> 0`` else ``ceil(roi_h / ph)`` per RoI (same for
    ``x``), ``count = max(gh * gw, 1)``, and the kernel's border rule: a sample with
    ``y < -1``, ``y > H``, ``x < -1`` or ``x > W`` contributes 0 (but is counted), otherwise its
    coordinates are clamped into ``[0, H - 1] x [0, W - 1]`` (torchvision's
    ``csrc/ops/cpu/roi_align_kernel.cpp``; its pure-Python ``_roi_align`` fallback differs at
    the borders). Implemented as one weighted ``embedding_bag`` over the channels-last feature
    map (each output cell is a bag of ``gh * gw * 4`` taps), so autograd gives the kernel's
    backward (scatter of the bilinear weights divided by ``count``); where a gradient is needed
    and the map has at most :data:`DENSE_MAX_PIXELS` pixels, as the equal separable product
    ``A_y[k] @ input[b_k, c] @ A_x[k]^T`` of per-RoI bilinear weight matrices instead, whose
    backward is matrix products (same sums in another order; faster on small maps). No
    gradient flows to ``boxes``. Half and bfloat16 inputs (and any input under autocast) are
    computed in float32 and returned in the input's dtype.

    Args:
        input: ``N x C x H x W`` feature maps.
        boxes: ``K x 5`` ``(batch_index, x1, y1, x2, y2)`` or a list of ``L_n x 4`` tensors,
            one per image.
        output_size: ``(ph, pw)`` or one int for both.
        spatial_scale: factor from box coordinates to ``input`` pixels.
        sampling_ratio: samples per bin and axis; ``<= 0`` for adaptive.
        aligned: shift the box by -0.5 pixel (pixel-centre alignment).

    Returns:
        ``K x C x ph x pw`` tensor in ``input``'s dtype.
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
        raise DetectionOpError(f"input must be an N x C x H x W tensor, got {shape}")
    if isinstance(output_size, int):
        ph, pw = output_size, output_size
    else:
        if len(output_size) != 2:
            raise DetectionOpError(f"output_size must be an int or (height, width), got "
                                   f"{output_size!r}")
        ph, pw = int(output_size[0]), int(output_size[1])
    if ph <= 0 or pw <= 0:
        raise DetectionOpError(f"output_size must be positive, got {(ph, pw)}")
    rois = _roi_boxes(boxes, input)
    out_dtype = input.dtype
    compute = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    n, ch, h, w = input.shape
    device_type = input.device.type
    autocast_on = (device_type in ("cpu", "cuda")
                   and torch.is_autocast_enabled(device_type))
    if autocast_on:
        with torch.autocast(device_type=device_type, enabled=False):
            return _roi_align_impl(input.to(compute), rois.detach().to(compute), ph, pw,
                                   float(spatial_scale), int(sampling_ratio), bool(aligned),
                                   n, ch, h, w).to(out_dtype)
    return _roi_align_impl(input.to(compute), rois.detach().to(device=input.device, dtype=compute),
                           ph, pw, float(spatial_scale), int(sampling_ratio), bool(aligned),
                           n, ch, h, w).to(out_dtype)


_Geometry = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _roi_geometry(rois: Tensor, scale: float, aligned: bool) -> _Geometry:
    """``(x1, y1, roi_w, roi_h, batch_index)`` of each RoI in ``input`` pixels."""
    offset = 0.5 if aligned else 0.0
    scale_t = torch.tensor(scale, dtype=rois.dtype, device=rois.device)
    x1 = rois[:, 1] * scale_t - offset
    y1 = rois[:, 2] * scale_t - offset
    rw = rois[:, 3] * scale_t - offset - x1
    rh = rois[:, 4] * scale_t - offset - y1
    if not aligned:
        rw = rw.clamp(min=1.0)
        rh = rh.clamp(min=1.0)
    return x1, y1, rw, rh, rois[:, 0].long()


def _sampling_groups(rw: Tensor, rh: Tensor, ph: int, pw: int,
                     sampling_ratio: int) -> list[tuple[int, int, Tensor | None]]:
    """RoIs grouped by sampling grid ``(gh, gw, RoI indices)``: one group of all RoIs
    (indices ``None``) for a fixed ``sampling_ratio``, else one per distinct adaptive grid."""
    if sampling_ratio > 0:
        return [(sampling_ratio, sampling_ratio, None)]
    gh_all = torch.ceil(rh / ph).clamp(min=0).long()
    gw_all = torch.ceil(rw / pw).clamp(min=0).long()
    key = gh_all * (int(gw_all.max().item()) + 1) + gw_all
    uniq = torch.unique(key).tolist()
    stride = int(gw_all.max().item()) + 1
    return [(u // stride, u % stride, torch.nonzero(key == u).squeeze(1)) for u in uniq]


def _bag_taps(geometry: _Geometry, out_hw: tuple[int, int], grid: tuple[int, int],
              in_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Flat table indices and weights of the ``K x ph x pw`` bags of one group of RoIs, each
    bag ``gh * gw * 4`` bilinear taps (``grid = (gh, gw)``) weighted by ``1 / (gh * gw)``."""
    gx1, gy1, grw, grh, gb = geometry
    (ph, pw), (gh, gw), (h, w) = out_hw, grid, in_hw
    ylo, yhi, wylo, wyhi = _axis_samples(gy1, grh, ph, gh, h)
    xlo, xhi, wxlo, wxhi = _axis_samples(gx1, grw, pw, gw, w)
    yi = torch.stack([ylo, yhi], dim=-1)  # K, ph, gh, 2
    xi = torch.stack([xlo, xhi], dim=-1)  # K, pw, gw, 2
    wy = torch.stack([wylo, wyhi], dim=-1)
    wx = torch.stack([wxlo, wxhi], dim=-1)
    # K, ph, pw, gh, gw, 2, 2
    idx = (gb[:, None, None, None, None, None, None] * (h * w)
           + yi[:, :, None, :, None, :, None] * w + xi[:, None, :, None, :, None, :])
    wt = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :] / (gh * gw)
    return idx.reshape(-1), wt.reshape(-1)


def _bags(groups: list[tuple[int, int, Tensor | None]], geometry: _Geometry,
          out_hw: tuple[int, int], in_hw: tuple[int, int], device: torch.device
          ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Per group: the taps' table indices and weights, the bag offsets, and (adaptive
    groups) the RoI indices, whose concatenation is the order of the output rows."""
    ph, pw = out_hw
    all_idx: list[Tensor] = []
    all_w: list[Tensor] = []
    all_off: list[Tensor] = []
    order: list[Tensor] = []
    base = 0
    for gh, gw, sel in groups:
        if sel is None:
            group = geometry
        else:
            x1, y1, rw, rh, batch = geometry
            group = (x1[sel], y1[sel], rw[sel], rh[sel], batch[sel])
            order.append(sel)
        kg = group[4].shape[0]
        bag = gh * gw * 4
        all_off.append(torch.arange(kg * ph * pw, device=device, dtype=torch.long) * bag + base)
        base += kg * ph * pw * bag
        if bag == 0:
            continue
        idx, wt = _bag_taps(group, out_hw, (gh, gw), in_hw)
        all_idx.append(idx)
        all_w.append(wt)
    return all_idx, all_w, all_off, order


#: the largest feature map (``H * W`` pixels) that :func:`roi_align` samples through the separable
#: matrix product when a gradient is needed; larger maps use the ``embedding_bag`` path (the
#: product's work grows with ``H * W``, the bag's with the samples; the bag's backward sorts the
#: taps). ``benchmarks/detection_ops.py`` times both (docs/performance.md, issue 26): the product
#: wins on 8x8 to 32x32 maps (2-4x at 14x14 outputs), the bag on 64x64.
DENSE_MAX_PIXELS = 32 * 32


def _axis_matrix(start: Tensor, size: Tensor, pooled: int, grid: int, extent: int) -> Tensor:
    """``K x pooled x extent`` bilinear weights along one axis: row ``p`` of RoI ``k`` holds the
    weights (each divided by ``grid``) that the ``grid`` samples of output bin ``p`` give to each
    pixel, with the border rule of :func:`_axis_samples` (a clamped tap adds to the edge pixel)."""
    low, high, w_low, w_high = _axis_samples(start, size, pooled, grid, extent)
    matrix = start.new_zeros((start.shape[0], pooled, extent))
    matrix.scatter_add_(2, low, w_low / grid)
    matrix.scatter_add_(2, high, w_high / grid)
    return matrix


def _roi_align_dense(input: Tensor, geometry: _Geometry,
                     groups: list[tuple[int, int, Tensor | None]], ph: int, pw: int) -> Tensor:
    """RoIAlign as ``out[k, c] = A_y[k] @ input[b_k, c] @ A_x[k]^T`` with the separable bilinear
    weight matrices ``A_y`` (``K x ph x H``) and ``A_x`` (``K x pw x W``) of :func:`_axis_matrix`.

    The sample weights of the bag path are the products ``w_y * w_x / (gh * gw)``, so the two
    paths sum the same terms (in another order: equal to float rounding). Autograd's backward is
    two matrix products per image instead of the bag path's sorted scatter."""
    x1, y1, rw, rh, batch = geometry
    k = x1.shape[0]
    n, ch, h, w = input.shape
    ay = input.new_zeros((k, ph, h))
    ax = input.new_zeros((k, pw, w))
    for gh, gw, sel in groups:
        if gh == 0 or gw == 0:
            continue  # no samples: the bin's value is 0, as in the kernel
        if sel is None:
            ay = _axis_matrix(y1, rh, ph, gh, h)
            ax = _axis_matrix(x1, rw, pw, gw, w)
        else:
            ay[sel] = _axis_matrix(y1[sel], rh[sel], ph, gh, h)
            ax[sel] = _axis_matrix(x1[sel], rw[sel], pw, gw, w)
    pieces: list[Tensor] = []
    order: list[Tensor] = []
    for b in torch.unique(batch).tolist():
        sel = torch.nonzero(batch == b).squeeze(1)
        kb = sel.shape[0]
        rows = input[b].transpose(0, 1).reshape(h, ch * w)  # H x (C W)
        t = (ay[sel].reshape(kb * ph, h) @ rows).view(kb, ph * ch, w)
        o = torch.bmm(t, ax[sel].transpose(1, 2))  # kb x (ph C) x pw
        pieces.append(o.view(kb, ph, ch, pw).transpose(1, 2))
        order.append(sel)
    out = torch.cat(pieces)
    perm = torch.cat(order)
    if not torch.equal(perm, torch.arange(k, device=perm.device)):
        out = out[torch.argsort(perm)]
    return out


def _roi_align_impl(input: Tensor, rois: Tensor, ph: int, pw: int, scale: float,
                    sampling_ratio: int, aligned: bool, n: int, ch: int, h: int, w: int
                    ) -> Tensor:
    k = rois.shape[0]
    rois = rois.to(input.device)
    if k > 0 and h * w > 0 and h * w <= DENSE_MAX_PIXELS and input.requires_grad \
            and torch.is_grad_enabled():
        geometry = _roi_geometry(rois, scale, aligned)
        groups = _sampling_groups(geometry[2], geometry[3], ph, pw, sampling_ratio)
        return _roi_align_dense(input, geometry, groups, ph, pw)
    table = input.permute(0, 2, 3, 1).reshape(n * h * w, ch)
    if k == 0 or h == 0 or w == 0:
        return (table[:0].sum() * 0).expand(k, ch, ph, pw).contiguous()
    geometry = _roi_geometry(rois, scale, aligned)
    groups = _sampling_groups(geometry[2], geometry[3], ph, pw, sampling_ratio)
    all_idx, all_w, all_off, order = _bags(groups, geometry, (ph, pw), (h, w), rois.device)
    flat_idx = torch.cat(all_idx) if all_idx else torch.zeros(0, dtype=torch.long,
                                                                device=rois.device)
    flat_w = torch.cat(all_w) if all_w else torch.zeros(0, dtype=input.dtype, device=rois.device)
    offsets = torch.cat(all_off)
    out = torch.nn.functional.embedding_bag(flat_idx, table, offsets, mode="sum",
                                            per_sample_weights=flat_w.to(input.dtype))
    out = out.reshape(-1, ph, pw, ch)
    if order:
        perm = torch.cat(order)
        out = out[torch.argsort(perm)]
    return out.permute(0, 3, 1, 2).contiguous()
