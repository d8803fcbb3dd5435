"""TTM and WTTM: (weighted) matching of the power-transformed teacher.

Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024
(arXiv:2402.11148). Official code: zkxufo/TTM, ``distiller_zoo/ttm.py`` and
``distiller_zoo/wttm.py``.

The teacher's distribution ``p_t = softmax(z_t)`` is power-transformed with the exponent
``gamma`` (``--ttm_l``; a temperature ``T = 1 / gamma`` on the teacher only):
``p~_t = p_t^gamma / sum_c p_t(c)^gamma``. The student keeps temperature 1.

* TTM: ``L = mean_b KL(p~_t || softmax(z_s))``;
* WTTM: ``L = mean_b [ (sum_c p_t(c)^gamma) * KL(p~_t || softmax(z_s)) ]``: each sample is
  weighted by the power sum before normalisation (large for smooth teacher outputs).

Numerics: ``p_t^gamma / sum p_t^gamma = softmax(gamma * z_t)`` exactly, and
``log sum_c p_t(c)^gamma = logsumexp(gamma * z_t) - gamma * logsumexp(z_t)``, so both are
computed in log space (no ``0^gamma`` or ``log 0``). The official code forms ``softmax(z_t)``
first and raises it to ``gamma``; a teacher probability that underflows to 0 there contributes 0,
here it contributes its (tiny, exact) value: the two agree to float32 rounding wherever the
official value is finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import Reduction, kl_from_logs, prepare, reduce

__all__ = ["transformed_teacher", "ttm_loss", "wttm_loss"]


def _check_gamma(gamma: float) -> None:
    if not gamma > 0:
        raise MethodError(f"gamma (the power-transform exponent, --ttm_l) must be > 0, got "
                          f"{gamma}")


def transformed_teacher(logits_t: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``(log p~_t, log w)``: the log of the power-transformed teacher distribution and of the
    per-sample WTTM weight.

    ``p~_t = softmax(z_t)^gamma / sum_c softmax(z_t)_c^gamma = softmax(gamma * z_t)`` (``B x K``)
    and ``w = sum_c softmax(z_t)_c^gamma`` (``B``), computed as
    ``logsumexp(gamma z_t) - gamma logsumexp(z_t)`` (Zheng & Yang, ICLR 2024).
    """
    _check_gamma(gamma)
    scaled = gamma * logits_t
    log_pt = F.log_softmax(scaled, dim=1)
    log_w = torch.logsumexp(scaled, dim=1) - gamma * torch.logsumexp(logits_t, dim=1)
    return log_pt, log_w


def ttm_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    gamma: float,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Transformed teacher matching ``L_TTM = mean_b KL(p~_t || softmax(z_s))``.

    ``p~_t = softmax(z_t)^gamma / sum_c softmax(z_t)_c^gamma`` (temperature ``1 / gamma`` on the
    teacher only, none on the student). Zheng & Yang, "Knowledge Distillation Based on Transformed
    Teacher Matching", ICLR 2024; official ``TTM(l=gamma)``. Computed in float32 (at least), the
    teacher's logits detached.

    Args:
        logits_s: student logits ``B x K``.
        logits_t: teacher logits ``B x K`` (detached here).
        gamma: the power-transform exponent ``> 0`` (``--ttm_l``).
        reduction: ``"mean"`` over the batch, or ``"none"`` for the ``B`` per-sample values.
    """
    zs, zt = prepare(logits_s, logits_t)
    log_pt, _ = transformed_teacher(zt, gamma)
    return reduce(kl_from_logs(log_pt, F.log_softmax(zs, dim=1)), reduction)


def wttm_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    gamma: float,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Weighted TTM ``L_WTTM = mean_b [ (sum_c softmax(z_t)_c^gamma) KL(p~_t || softmax(z_s)) ]``.

    The TTM divergence of each sample weighted by the teacher's power sum before normalisation
    (the official ``WTTM``: ``torch.mean(norm * KL)``). With ``gamma = 1`` the weight is 1 and
    the loss is ``KL(softmax(z_t) || softmax(z_s))``, KD at temperature 1 without the ``T^2``
    factor. Zheng & Yang, ICLR 2024. Computed in float32 (at least), the teacher detached.

    Args:
        logits_s: student logits ``B x K``.
        logits_t: teacher logits ``B x K`` (detached here).
        gamma: the power-transform exponent ``> 0`` (``--ttm_l``).
        reduction: ``"mean"`` over the batch, or ``"none"`` for the ``B`` per-sample values.
    """
    zs, zt = prepare(logits_s, logits_t)
    log_pt, log_w = transformed_teacher(zt, gamma)
    kl = kl_from_logs(log_pt, F.log_softmax(zs, dim=1))
    return reduce(log_w.exp() * kl, reduction)
