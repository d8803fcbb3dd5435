"""Confusion-matrix metrics of semantic segmentation (the standard protocol of the VOC, Cityscapes
and ADE20K benchmarks, as mmsegmentation's ``IoUMetric`` and torchvision's reference
``ConfusionMatrix`` compute them).

``C[t, p]`` counts the pixels of ground-truth class ``t`` predicted as ``p`` over the whole split
(pixels labelled ``ignore_index`` or outside ``0..K-1`` are left out). Then, per class ``k``,
``IoU_k = C[k, k] / (sum_p C[k, p] + sum_t C[t, k] - C[k, k])``; ``mIoU`` is the mean of the
``IoU_k`` over the classes whose union is not empty (a class absent from both the labels and the
predictions has no IoU, mmseg's ``nanmean``); pixel accuracy is ``trace(C) / sum(C)``; ``mAcc``
the mean over present classes of ``C[k, k] / sum_p C[k, p]``. All in %.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "segmentation_scores"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255
                     ) -> Tensor:
    """The ``K x K`` int64 confusion matrix (rows: labels, columns: predictions) of the pixels
    of ``pred`` and ``target`` (integer tensors of one shape) whose label is in ``0..K-1`` and
    not ``ignore_index``."""
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    idx = t[keep] * num_classes + p[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


def segmentation_scores(conf: Tensor) -> tuple[dict[str, float], list[float | None]]:
    """``({"mIoU", "pixel_acc", "mAcc"}, per-class IoU)`` of confusion matrix ``conf``, in %
    (module docstring); a class with an empty union has IoU None."""
    c = conf.double().cpu()
    tp = c.diag()
    gt, pr = c.sum(dim=1), c.sum(dim=0)
    union = gt + pr - tp
    ious: list[float | None] = [
        None if u == 0 else 100.0 * float(i / u) for i, u in zip(tp, union, strict=True)]
    valid = [v for v in ious if v is not None]
    present = gt > 0
    total = float(c.sum())
    scores = {
        "mIoU": sum(valid) / len(valid) if valid else 0.0,
        "pixel_acc": 100.0 * float(tp.sum()) / total if total else 0.0,
        "mAcc": 100.0 * float((tp[present] / gt[present]).mean()) if bool(present.any()) else 0.0,
    }
    return scores, ious
