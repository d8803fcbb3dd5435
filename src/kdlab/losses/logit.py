"""Logit distillation losses: KD, DKD and NKD.

Pure functions of tensors (architecture contract 2). Each is a batch MEAN by default (never a
batch sum), computed in float32 whatever the input dtype (bf16/fp16 are promoted; float64 stays
float64 so gradcheck can run), with the teacher's logits detached inside the loss.
``reduction="none"`` returns the per-sample values (a length-``B`` vector); SDD
(:func:`kdlab.losses.sdd.sdd_loss`) uses it to compute the same loss per region.

``log(0)`` is guarded by working in log space (see :mod:`kdlab.losses._common`): every loss is
finite, with finite gradients, for logits of magnitude ``1e4`` and for bf16 inputs.

``temperature`` is a positive float or a 0-dim tensor (a learned temperature, CTKD); see
:mod:`kdlab.losses._common`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdlab.losses._common import (
    Reduction,
    Temperature,
    binary_log_probs,
    check_temperature,
    decoupled_kd,
    drop_target,
    gather_target,
    nontarget_log_probs,
    prepare,
    reduce,
)

__all__ = ["kd_loss", "dkd_loss", "nkd_loss"]


def kd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    temperature: Temperature = 4.0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Knowledge distillation loss ``L_KD = T^2 * KL(p_t || p_s)``, ``p = softmax(z / T)``.

    Summed over classes, averaged over the batch. Hinton, Vinyals, Dean, "Distilling the
    Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop (arXiv:1503.02531, 2015).

    Args:
        logits_s: student logits ``B x K``.
        logits_t: teacher logits ``B x K`` (detached here).
        temperature: ``T > 0`` (CIFAR default 4), or a 0-dim tensor (a learned temperature,
            differentiated through ``z / T`` and ``T^2``).
        reduction: ``"mean"`` over the batch, or ``"none"`` for the ``B`` per-sample values.
    """
    check_temperature(temperature)
    zs, zt = prepare(logits_s, logits_t)
    log_ps = F.log_softmax(zs / temperature, dim=1)
    log_pt = F.log_softmax(zt / temperature, dim=1)
    per = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1)
    return reduce(per * temperature**2, reduction)


def dkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: Temperature = 4.0,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Decoupled KD ``L_DKD = alpha * TCKD + beta * NCKD``.

    ``TCKD = T^2 * KL(b_t || b_s)`` with the binary target distribution ``b = [p_y, 1 - p_y]`` of
    the full softmax ``p = softmax(z / T)``; ``NCKD = T^2 * KL(q_t || q_s)`` with ``q`` the
    non-target distribution, ``softmax(z / T - 1000 * onehot(y))`` (the target logit is pushed
    down by 1000, as the spec and the official code do). Zhao, Cui, Song, Qiu, Liang, "Decoupled
    Knowledge Distillation", CVPR 2022.

    ``log(0)`` in TCKD is guarded without a clamp: ``log(1 - p_y)`` is computed as
    ``logsumexp_{c != y} z_c / T - logsumexp_c z_c / T``, exact and finite (a clamp would zero the
    gradient where it is active).

    Args:
        logits_s, logits_t: ``B x K`` student and teacher logits (the teacher is detached here).
        target: ``B`` class indices.
        alpha, beta: weights of TCKD and NCKD (CIFAR defaults 1 and 8).
        temperature: ``T > 0`` (CIFAR default 4), or a 0-dim tensor (learned).
        reduction: ``"mean"`` over the batch or ``"none"``.
    """
    check_temperature(temperature)
    zs, zt = prepare(logits_s, logits_t, target)
    zs, zt = zs / temperature, zt / temperature
    per = decoupled_kd(
        binary_log_probs(zt, target),
        binary_log_probs(zs, target),
        nontarget_log_probs(zt, target),
        nontarget_log_probs(zs, target),
        alpha,
        beta,
        temperature,
    )
    return reduce(per, reduction)


def nkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    target: Tensor,
    temperature: Temperature = 1.0,
    gamma: float = 1.5,
    legacy: bool = False,
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """Normalized KD ``L_NKD = -p_t(y) log p_s(y) - gamma * T^2 * sum_{c != y} q_t(c) log q_s(c)``.

    The target term uses the temperature-1 softmax ``p = softmax(z)`` (as the official code
    does); ``q = softmax over the classes c != y of z / T`` is the normalised non-target
    distribution (the target column removed before the softmax). Yang, Zeng, Li, Zhang, Yuan, Li,
    "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels", ICCV 2023.

    ``legacy=True`` reproduces the variant in SDD's official code (and NKD's code before its fix
    of Oct 2023): the "non-target" mask is all-true, so the second term is
    ``-gamma * T^2 * sum_c p_t^T(c) log p_s^T(c)`` over ALL ``K`` classes, ``p^T = softmax(z / T)``.
    Use it only to reproduce published SD-NKD numbers (which also take ``T`` and ``gamma`` from
    the DKD block: ``T = 4``, ``gamma =`` DKD's beta).

    Args:
        logits_s, logits_t: ``B x K`` student and teacher logits (the teacher is detached here).
        target: ``B`` class indices.
        temperature: ``T > 0`` of the non-target term (default 1), or a 0-dim tensor (learned).
        gamma: weight of the non-target term (default 1.5).
        legacy: the SDD official code's all-classes variant (default False: the correct NKD).
        reduction: ``"mean"`` over the batch or ``"none"``.
    """
    check_temperature(temperature)
    zs, zt = prepare(logits_s, logits_t, target)
    log_ps_y = gather_target(F.log_softmax(zs, dim=1), target)
    pt_y = gather_target(F.softmax(zt, dim=1), target)
    target_term = -pt_y * log_ps_y
    if not legacy:
        zs, zt = drop_target(zs, target), drop_target(zt, target)
    log_qs = F.log_softmax(zs / temperature, dim=1)
    qt = F.softmax(zt / temperature, dim=1)
    nontarget_term = -gamma * temperature**2 * (qt * log_qs).sum(dim=1)
    return reduce(target_term + nontarget_term, reduction)
