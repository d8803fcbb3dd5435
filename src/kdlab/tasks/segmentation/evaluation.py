"""Inference and evaluation of segmentation models: whole images or sliding windows, scored by a
confusion matrix summed over the ranks (:mod:`kdlab.tasks.segmentation.metrics`).

Sliding inference follows mmsegmentation's ``slide_inference``: windows of ``window x window``
at steps of ``stride`` (the last row / column of windows aligned to the image's bottom / right
edge; an image smaller than the window is one window of its own size); each pixel's logits are
the mean over the windows covering it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import SegmentationConfig
from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.core.runtime import autocast
from kdlab.tasks.segmentation.metrics import confusion_matrix, segmentation_scores

__all__ = ["evaluate_segmentation", "format_class_iou", "label_confusion", "named_class_iou",
           "predict_logits", "sliding_logits"]


def _starts(size: int, window: int, stride: int) -> list[int]:
    n = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(n)]


def sliding_logits(model: nn.Module, images: Tensor, num_classes: int, window: int,
                   stride: int) -> Tensor:
    """``B x K x H x W`` logits of ``images`` (``B x 3 x H x W``) averaged over sliding windows
    (module docstring)."""
    b, _, h, w = images.shape
    total = images.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y in _starts(h, window, stride):
        for x in _starts(w, window, stride):
            y2, x2 = min(y + window, h), min(x + window, w)
            total[:, :, y:y2, x:x2] += model(images[:, :, y:y2, x:x2]).logits.float()
            count[:, :, y:y2, x:x2] += 1
    return total / count


def predict_logits(model: nn.Module, images: Tensor, seg: SegmentationConfig,
                   num_classes: int) -> Tensor:
    """The float ``B x K x H x W`` logits of ``images`` by ``seg.inference``."""
    if seg.inference == "sliding":
        return sliding_logits(model, images, num_classes, seg.window, seg.stride)
    return model(images).logits.float()


def label_confusion(logits: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255
                    ) -> Tensor:
    """The ``K x K`` confusion matrix of one image: its ``K x h x w`` logits bilinearly resized
    to the ``H x W`` label map's size when they differ (an image resized by ``eval_size``), then
    the argmax scored against ``label`` (:func:`~kdlab.tasks.segmentation.metrics.
    confusion_matrix`, pixels labelled ``ignore_index`` left out)."""
    z = logits.unsqueeze(0) if logits.dim() == 3 else logits
    if z.shape[-2:] != label.shape:
        z = F.interpolate(z, size=label.shape, mode="bilinear", align_corners=False)
    return confusion_matrix(z[0].argmax(dim=0), label, num_classes, ignore_index)


def named_class_iou(scores: Mapping[str, float], class_names: Sequence[str]
                    ) -> dict[str, float | None]:
    """Per-class IoU (%) named by the data set's classes: ``{class_names[k]: scores["IoU_k"]}``
    for every class ``k`` in train-id order, None where ``IoU_k`` is absent (the class's union
    is empty: neither labelled nor predicted). A repeated name gets its train id appended."""
    out: dict[str, float | None] = {}
    for k, name in enumerate(class_names):
        key = name if name not in out else f"{name} ({k})"
        value = scores.get(f"IoU_{k}")
        out[key] = None if value is None else float(value)
    return out


def format_class_iou(per_class: Mapping[str, float | None]) -> str:
    """A plain-text table of :func:`named_class_iou`: one ``class  IoU %`` row per class
    (``-`` for a class without IoU), aligned on the longest name."""
    width = max([len("class"), *(len(n) for n in per_class)])
    rows = [f"{'class':<{width}}  {'IoU %':>7}"]
    rows += [f"{name:<{width}}  {'-' if v is None else f'{v:.2f}':>7}"
             for name, v in per_class.items()]
    return "\n".join(rows) + "\n"


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable[Any], device: torch.device,
                          seg: SegmentationConfig, num_classes: int,
                          amp_dtype: torch.dtype | None = None,
                          dist: DistInfo | None = None) -> tuple[dict[str, float], Tensor]:
    """``(scores, confusion matrix)`` of ``model`` over evaluation batches
    (:class:`~kdlab.tasks.segmentation.data.SegmentationEvalBatch`).

    Images of one size in a batch run together; the logits are bilinearly resized to the label
    map's size when the image was resized (``eval_size``), then the argmax is scored. In a
    distributed run the matrices (and image counts) are summed over the ranks, so every rank
    returns the global scores (a collective: every rank must call it). ``scores`` holds
    ``mIoU``, ``pixel_acc``, ``mAcc``, ``IoU_<k>`` for every class ``k`` with a non-empty union,
    and ``count`` (images)."""
    was_training = model.training
    model.eval()
    conf = torch.zeros((num_classes, num_classes), dtype=torch.long, device=device)
    count = 0
    for batch in batches:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(batch.images):
            groups.setdefault(tuple(image.shape), []).append(i)
        for idx in groups.values():
            images = torch.stack([batch.images[i] for i in idx])
            with autocast(device, amp_dtype):
                logits = predict_logits(model, images, seg, num_classes)
            for j, i in enumerate(idx):
                conf += label_confusion(logits[j], batch.labels[i], num_classes,
                                        seg.ignore_index)
            count += len(idx)
    model.train(was_training)
    if dist is not None and dist.enabled:
        all_reduce_sum(conf, dist)
        n = torch.tensor(count, device=device)
        all_reduce_sum(n, dist)
        count = int(n)
    scores, ious = segmentation_scores(conf)
    out: dict[str, float] = dict(scores)
    out.update({f"IoU_{k}": v for k, v in enumerate(ious) if v is not None})
    out["count"] = float(count)
    return out, conf
