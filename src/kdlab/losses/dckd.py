"""DCKD: Decoupled Classifier Knowledge Distillation, as RECONSTRUCTED by kdlab.

Wang, Dong, Zhu, Li, "Decoupled Classifier Knowledge Distillation", PLOS ONE 2025. Only the
paper's abstract was available: no equations and no public code. The loss below is kdlab's
reading of that abstract (see ``docs/methods/dckd.md``), not the authors' implementation.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import (
    Reduction,
    Temperature,
    binary_log_probs,
    check_temperature,
    decoupled_kd,
    nontarget_log_probs,
    prepare,
    reduce,
)

__all__ = ["dckd_loss"]

TargetRule = Literal["max", "correct", "teacher"]
NontargetSource = Literal["teacher", "student"]


def dckd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: Temperature = 4.0,
    target_rule: TargetRule = "max",
    nontarget_source: NontargetSource = "teacher",
    *,
    reduction: Reduction = "mean",
) -> Tensor:
    """DCKD, kdlab's reconstruction: ``T^2 * (alpha KL(b* || b_s) + beta KL(q_src || q_s))``.

    IMPORTANT: the paper's equations were not available (only its abstract: Wang, Dong, Zhu, Li,
    "Decoupled Classifier Knowledge Distillation", PLOS ONE 2025, and no public code was found).
    This is kdlab's reconstruction from the abstract, as written in the kdlab methods spec; it is
    not the authors' code and its numbers need not match theirs.

    The abstract decouples the classifier output into "target classes obtained by both the teacher
    and the student" and "non-target classes learned by the student", and "fixes the correct
    knowledge that the student has already acquired". With ``p = softmax(z / T)``,
    ``b_s = [p_s(y), 1 - p_s(y)]`` and ``q`` DKD's non-target distribution:

    * target component ``b* = [m, 1 - m]``:

      - ``target_rule="max"`` (default): ``m = max(p_t(y), stopgrad(p_s(y)))``. Where the student
        already exceeds the teacher, ``b* = stopgrad(b_s)``: the term is 0 in value AND in
        gradient (``grad KL(sg(b) || b) = -sum_i grad b_i = 0``), i.e. the student's extra target
        confidence is left alone (fixed), neither pushed down to the teacher's nor further up;
        where it lags, it is pulled up to the teacher's as in DKD;
      - ``target_rule="correct"``: ``m = stopgrad(p_s(y))`` for samples whose student prediction
        ``argmax z_s`` is already ``y``, else ``p_t(y)``;
      - ``target_rule="teacher"``: ``m = p_t(y)``: DCKD is then exactly
        :func:`kdlab.losses.logit.dkd_loss` (same code path, bit-for-bit equal).

    * non-target component: ``nontarget_source="teacher"`` (default) aligns ``q_s`` to ``q_t``
      (DKD's NCKD); ``"student"`` uses ``stopgrad(q_s)`` (the self-distillation reading: the term
      is exactly 0).

    Both choices between teacher and (stop-gradient) student are made per sample and in log
    space, so the loss stays finite for any finite logits.

    Args:
        logits_s, logits_t: ``B x K`` student and teacher logits (the teacher is detached here).
        target: ``B`` class indices.
        alpha, beta: weights of the target and non-target terms (DKD's CIFAR defaults 1 and 8).
        temperature: ``T > 0`` (default 4), or a 0-dim tensor (learned, CTKD).
        target_rule: ``"max"`` | ``"correct"`` | ``"teacher"`` (see above).
        nontarget_source: ``"teacher"`` | ``"student"`` (see above).
        reduction: ``"mean"`` over the batch or ``"none"``.
    """
    check_temperature(temperature)
    if target_rule not in ("max", "correct", "teacher"):
        raise MethodError(
            f"target_rule must be 'max', 'correct' or 'teacher', got {target_rule!r}"
        )
    if nontarget_source not in ("teacher", "student"):
        raise MethodError(
            f"nontarget_source must be 'teacher' or 'student', got {nontarget_source!r}"
        )
    zs, zt = prepare(logits_s, logits_t, target)
    zs_t, zt_t = zs / temperature, zt / temperature
    log_b_s = binary_log_probs(zs_t, target)
    log_b_ref = binary_log_probs(zt_t, target)
    if target_rule == "max":
        keep_student = log_b_s[:, 0].detach() > log_b_ref[:, 0]
    elif target_rule == "correct":
        keep_student = zs.detach().argmax(dim=1) == target
    else:
        keep_student = None
    if keep_student is not None:
        log_b_ref = torch.where(keep_student.unsqueeze(1), log_b_s.detach(), log_b_ref)
    log_q_s = nontarget_log_probs(zs_t, target)
    log_q_ref = log_q_s.detach() if nontarget_source == "student" else nontarget_log_probs(
        zt_t, target
    )
    per = decoupled_kd(log_b_ref, log_b_s, log_q_ref, log_q_s, alpha, beta, temperature)
    return reduce(per, reduction)
