"""Top-1 / top-5 evaluation with no host synchronisation until the end of the pass."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.core.runtime import autocast

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    dist_info: DistInfo | None = None,
) -> dict[str, float]:
    """Accuracy (top-1, top-5, in %) and mean cross-entropy of ``model`` over ``batches``.

    ``batches`` yields ``(images, labels, index)`` already on ``device``. Counts accumulate on
    the device; one synchronisation at the end. In a distributed run every rank evaluates its
    shard and the counts are summed over ranks, so every rank returns the global accuracy.
    """
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for images, labels, _ in batches:
        with autocast(device, amp_dtype):
            logits = model(images).logits
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(labels[:, None])
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(dim=1).sum()
        count += labels.shape[0]
    model.train(was_training)
    if dist_info is not None and dist_info.enabled:
        totals = torch.stack([correct1.double(), correct5.double(), loss_sum,
                              torch.tensor(float(count), dtype=torch.float64, device=device)])
        all_reduce_sum(totals, dist_info)
        correct1, correct5 = totals[0].long(), totals[1].long()
        loss_sum, count = totals[2], int(totals[3])
    if count == 0:
        return {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0}
    return {
        "top1": 100.0 * correct1.item() / count,
        "top5": 100.0 * correct5.item() / count,
        "loss": loss_sum.item() / count,
        "count": count,
    }
