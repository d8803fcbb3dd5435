"""DeiT's distillation term (hard or soft), before the ``alpha`` mix with the base criterion.

Touvron, Cord, Douze, Massa, Sablayrolles, Jégou, "Training data-efficient image transformers &
distillation through attention", ICML 2021 (arXiv:2012.12877). Official code:
facebookresearch/deit, ``losses.py``, ``DistillationLoss.forward`` (the ``distillation_loss``
it forms for ``distillation_type`` ``"soft"`` and ``"hard"``).

The student's distillation-token logits ``z_d`` (``B x K``) are matched to the teacher's logits
``z_t`` (detached):

* ``soft``: ``L = tau^2 / (B * K) * sum_{b,c} p_t(b,c) (log p_t(b,c) - log p_d(b,c))`` with
  ``p = softmax(z / tau)``: the KL divergence summed over the batch and the classes and divided
  by ``z_d.numel() = B * K`` (the official normalisation, the legacy PyTorch ``"mean"``; NOT the
  ``batchmean`` of :func:`kdlab.losses.kd_loss`, which is ``K`` times larger);
* ``hard``: ``L = (1/B) sum_b -log softmax(z_d)_b[argmax_c z_t(b,c)]``, the cross-entropy with
  the teacher's top-1 class (``tau`` unused).

Both are batch means of per-sample values, computed in float32 at least with autocast disabled.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import Temperature, check_temperature, prepare

__all__ = ["DeitKind", "deit_loss"]

#: the official ``distillation_type`` values that have a distillation term (``"none"`` has none).
DeitKind = Literal["soft", "hard"]


def deit_loss(
    dist_logits: Tensor,
    teacher_logits: Tensor,
    kind: DeitKind,
    tau: Temperature,
) -> Tensor:
    """DeiT distillation term: ``soft`` (``tau^2 * KL / numel``) or ``hard`` (CE with argmax).

    ``soft``: ``tau^2 * sum_{b,c} KL-terms(softmax(z_t / tau) || softmax(z_d / tau)) / (B * K)``;
    ``hard``: ``CE(z_d, argmax_c z_t)``, batch mean. Touvron et al., "Training data-efficient
    image transformers & distillation through attention", ICML 2021; official
    ``DistillationLoss`` (facebookresearch/deit ``losses.py``), whose total is
    ``(1 - alpha) * base + alpha * deit_loss``: the mix is the method's, not this function's.

    Args:
        dist_logits: the student's distillation-token logits ``B x K``.
        teacher_logits: teacher logits ``B x K`` (detached here).
        kind: ``"soft"`` or ``"hard"`` (the official ``--distillation-type``).
        tau: softmax temperature ``> 0`` of ``soft`` (official default 1.0; checked and unused
            by ``hard``), or a 0-dim tensor.

    Raises:
        MethodError: for another ``kind``, a bad ``tau`` or mismatched shapes.
    """
    if kind not in ("soft", "hard"):
        raise MethodError(f"DeiT distillation kind must be 'soft' or 'hard', got {kind!r}")
    check_temperature(tau)
    zd, zt = prepare(dist_logits, teacher_logits)
    with torch.autocast(device_type=zd.device.type, enabled=False):
        if kind == "hard":
            return F.cross_entropy(zd, zt.argmax(dim=1))
        log_pd = F.log_softmax(zd / tau, dim=1)
        log_pt = F.log_softmax(zt / tau, dim=1)
        kl = F.kl_div(log_pd, log_pt, reduction="sum", log_target=True)
        return kl * (tau * tau) / zd.numel()
