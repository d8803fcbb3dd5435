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

from kdlab.errors import KdlabError

__all__ = ["batched_nms", "box_iou_matrix", "nms"]


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
