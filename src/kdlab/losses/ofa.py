"""OFA-KD: the one-for-all distillation loss with a target-enhanced teacher distribution.

Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS 2023 (arXiv:2310.19444). Official code:
Hao840/OFAKD, ``distillers/ofa.py``, function ``ofa_loss`` (called by ``OFA.forward`` once per
branch projector with that stage's ``eps`` and once on the final logits with ``ofa_eps[-1]``,
all at ``--ofa-temperature``).

With ``p = softmax(z / T)`` for the student (``p_s``) and the teacher (``p_t``, detached), the
one-hot target ``m = onehot(y)`` and the exponent ``eps``:

    w_c = (p_t(c) + m_c)^eps - m_c   (= (1 + p_t(y))^eps - 1 at c = y, p_t(c)^eps elsewhere)
    L_OFA = (1/B) sum_b -sum_c w_c log p_s(c)

``eps = 1`` gives the cross-entropy with the teacher's soft labels ``H(p_t, p_s)`` (not a KL:
the teacher's entropy stays in). For ``eps > 1`` the target weight grows and the non-target
weights shrink; the weights are not renormalised. There is no ``T^2`` factor.

Numerics: ``log p_s`` is a ``log_softmax`` (the official ``log(softmax)`` is ``-inf`` once a
student probability underflows, about 100 logits below the maximum in float32); ``p_t^eps`` is
``exp(eps * log_softmax(z_t / T))`` and the target weight ``expm1(eps * log1p(p_t(y)))`` (the
official ``(1 + p_t(y))^eps - 1`` loses ``p_t(y)`` below float32's epsilon to rounding). The
values agree with the official operations wherever those are finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import Temperature, check_temperature, prepare, target_mask

__all__ = ["ofa_loss", "ofa_teacher_weights"]


def ofa_teacher_weights(logits_t: Tensor, labels: Tensor, eps: float,
                        temperature: Temperature = 1.0) -> Tensor:
    """``B x K`` OFA teacher weights ``w = (p_t + onehot(y))^eps - onehot(y)``, ``p_t =
    softmax(z_t / T)`` (Hao et al., NeurIPS 2023, the official ``prod - target_mask``).

    Computed in log space: ``p_t(c)^eps = exp(eps * log p_t(c))`` off the target and
    ``expm1(eps * log1p(p_t(y)))`` at it. ``logits_t`` is used as given (no detach, no cast).
    """
    log_pt = F.log_softmax(logits_t / temperature, dim=1)
    enhanced_target = torch.expm1(eps * torch.log1p(log_pt.exp()))
    return torch.where(target_mask(log_pt, labels), enhanced_target, torch.exp(eps * log_pt))


def ofa_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    eps: float,
    temperature: Temperature = 1.0,
) -> Tensor:
    """OFA loss ``L = mean_b -sum_c [(p_t(c) + m_c)^eps - m_c] log p_s(c)``, ``m = onehot(y)``.

    ``p = softmax(z / T)`` for both models, no ``T^2`` factor; ``eps = 1`` is the cross-entropy
    with the teacher's soft labels. Hao et al., "One-for-All: Bridge the Gap Between
    Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023; equal in values and
    gradients to the official ``ofa_loss`` (Hao840/OFAKD ``distillers/ofa.py``).

    Args:
        student_logits: student (or branch projector) logits ``B x K``.
        teacher_logits: teacher logits ``B x K`` (detached here).
        labels: ``B`` integer class indices (the official code takes ``argmax`` of soft,
            label-smoothed or mixed, targets before building the mask: the caller's job here).
        eps: the target-enhancement exponent ``> 0`` (``--ofa-eps``; 1.0 on CIFAR-100, 1.5 in
            the README's ImageNet command).
        temperature: ``T > 0`` for both softmaxes (``--ofa-temperature``, default 1), or a 0-dim
            tensor.

    Raises:
        MethodError: for ``eps <= 0``, a bad temperature, or mismatched shapes.
    """
    if not eps > 0:
        raise MethodError(f"OFA eps (the target-enhancement exponent, --ofa-eps) must be > 0, "
                          f"got {eps}")
    check_temperature(temperature)
    zs, zt = prepare(student_logits, teacher_logits, labels)
    with torch.autocast(device_type=zs.device.type, enabled=False):
        weights = ofa_teacher_weights(zt, labels, eps, temperature)
        log_ps = F.log_softmax(zs / temperature, dim=1)
        return -(weights * log_ps).sum(dim=1).mean()
