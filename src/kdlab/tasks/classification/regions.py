"""How good SDD's local logits are: top-1 accuracy of the classifier on pooled regions, per scale.

SDD (Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024) distils the local logits
``classifier(avgpool_m(F))`` of every cell of every ``m x m`` grid of the final map ``F``. For a
CNN (or a ViT with a global-average-pool head) the 1x1 region is the model's own logits; for a
class-token ViT it is a different head input (the mean of the normed patch tokens), so whether
the local logits mean anything is an empirical question. This measures it on a test set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from kdlab.core.errors import ConfigError
from kdlab.core.runtime import autocast
from kdlab.losses.sdd import multiscale_logits
from kdlab.models.output import KdModel

__all__ = ["region_accuracy"]


def _check_scales(scales: Sequence[int]) -> list[int]:
    """The scales sorted, with 1 (the whole map) added when missing."""
    if any(m < 1 for m in scales):
        raise ConfigError(f"region scales must be positive grid sizes such as 1,2,4; got "
                          f"{list(scales)}")
    return sorted({1, *scales})


@torch.no_grad()
def region_accuracy(
    model: KdModel,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    device: torch.device,
    scales: Sequence[int] = (1, 2, 4),
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Top-1 (%) of SDD's local logits at each scale, and their agreement with the model.

    For each scale ``m`` (1 always included) the map is pooled directly to ``m x m`` (SDD's
    ``"direct"`` pooling, equal to the default nested pooling on 8x8 and 4x4 maps) and
    ``classifier`` applied to each cell. Returns ``top1`` (the model's logits), and per scale
    ``m``: ``region_top1_m`` (the mean over the ``m^2`` cells of each cell's top-1 against the
    image label) and ``region_agree_m`` (the share of cells whose argmax equals the model's:
    SDD's "consistent" regions, Wei et al. Sec. 3.3), plus ``count``. Evaluated in eval mode;
    the model's mode is restored.
    """
    ordered = _check_scales(scales)
    was_training = model.training
    model.eval()
    hits = torch.zeros(len(ordered) * 2 + 1, dtype=torch.float64, device=device)
    count = 0
    for images, labels, _ in batches:
        with autocast(device, amp_dtype):
            out = model(images)
            local = multiscale_logits(out.feature_map, model.classifier, ordered,
                                      pooling="direct").argmax(dim=1)
        pred = out.logits.argmax(dim=1)
        hits[0] += pred.eq(labels).sum()
        first = 0
        for i, m in enumerate(ordered):
            cells = local[:, first:first + m * m]
            first += m * m
            hits[2 * i + 1] += cells.eq(labels[:, None]).double().mean(dim=1).sum()
            hits[2 * i + 2] += cells.eq(pred[:, None]).double().mean(dim=1).sum()
        count += labels.shape[0]
    model.train(was_training)
    values = (100.0 * hits / max(count, 1)).tolist()
    result = {"top1": values[0]}
    for i, m in enumerate(ordered):
        result[f"region_top1_{m}"] = values[2 * i + 1]
        result[f"region_agree_{m}"] = values[2 * i + 2]
    return {**result, "count": float(count)}
