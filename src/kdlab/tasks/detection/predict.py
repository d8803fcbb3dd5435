"""A detector's detections on a split, in the COCO results format (for COCOeval and files)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from kdlab.core.runtime import autocast
from kdlab.tasks.detection.evaluation import detections_to_coco

__all__ = ["predict_coco"]


@torch.no_grad()
def predict_coco(model: nn.Module, batches: Iterable[Any], device: torch.device,
                 amp_dtype: torch.dtype | None) -> list[dict[str, Any]]:
    """Run ``model`` (eval mode, under the run's autocast) over ``batches`` (a detection loader
    whose ``dataset`` maps labels to COCO category ids) and return every detection as
    ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in original-image pixels
    (torchvision's postprocessing: score threshold, per-class NMS, top detections per image)."""

    mapping = batches.dataset.label_to_category_id  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for batch in batches:
            with autocast(device, amp_dtype):
                outputs = model(batch.images)
            for image_id, out in zip(batch.image_ids, outputs, strict=True):
                results += detections_to_coco(image_id, out["boxes"].float().cpu(),
                                              out["scores"].float().cpu(),
                                              out["labels"].cpu(), mapping)
    finally:
        model.train(was_training)
    return results
