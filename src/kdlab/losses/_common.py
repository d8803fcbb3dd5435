"""Shared building blocks of the logit-based losses (KD, DKD, NKD, SDD, DCKD).

Every loss in :mod:`kdlab.losses.logit`, :mod:`kdlab.losses.sdd` and :mod:`kdlab.losses.dckd` is
built from these pieces, so a quantity (the binary target distribution, the non-target
distribution, a KL divergence) has exactly one implementation.

Numerical conventions (kdlab methods spec, "Distillation methods: the exact mathematics"):

* inputs are cast to at least float32 (bf16/fp16 logits under autocast become float32; float64
  stays float64, so ``torch.autograd.gradcheck`` can run) and the teacher's logits are detached
  inside the loss;
* probabilities are never logged directly: every log-probability is a ``log_softmax`` or a
  ``logsumexp`` difference, which is finite for any finite logits. This is kdlab's guard against
  ``log(0)``: instead of clamping ``p`` before the log (which zeroes the gradient wherever the
  clamp is active) the logarithm is evaluated in log space, exactly. KL divergences are written
  as ``sum exp(log_p) * (log_p - log_q)``, so a teacher probability that underflows to 0 gives
  the term ``0 * finite = 0`` (the ``0 log 0 = 0`` convention).

Temperatures: every loss takes ``temperature`` as a positive float (the usual, fixed ``T``) or as
a 0-dim floating-point tensor (a learned temperature such as CTKD's,
:mod:`kdlab.methods.ctkd`), through which the gradient flows in both the ``z / T`` and the
``T^2`` factors. A float temperature takes exactly the code path it always took (bit-identical
results).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError

Reduction = Literal["mean", "none"]

#: A softmax temperature: a positive float, or a 0-dim floating-point tensor (learned).
Temperature = float | Tensor

#: constant subtracted from the (temperature-scaled) target logit to form DKD's non-target
#: softmax, as in DKD (Zhao et al., CVPR 2022) and its official code.
NONTARGET_OFFSET = 1000.0


def prepare(
    logits_s: Tensor, logits_t: Tensor, target: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Check shapes, cast to at least float32 and detach the teacher: ``(z_s, z_t.detach())``.

    Raises:
        MethodError: when the logits are not ``B x K`` matrices of the same shape, or ``target``
            is not a length-``B`` vector.
    """
    if logits_s.dim() != 2 or logits_s.shape != logits_t.shape:
        raise MethodError(
            f"student and teacher logits must both be B x K with the same shape, got "
            f"{tuple(logits_s.shape)} and {tuple(logits_t.shape)}; check that both models have "
            "the same number of classes"
        )
    if target is not None and (target.dim() != 1 or target.shape[0] != logits_s.shape[0]):
        raise MethodError(
            f"target must be a vector of {logits_s.shape[0]} class indices, got shape "
            f"{tuple(target.shape)}"
        )
    return to_float(logits_s), to_float(logits_t.detach())


def to_float(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (never a lower precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_temperature(temperature: Temperature) -> None:
    """Raise :class:`MethodError` unless ``temperature`` is a float ``> 0`` or a 0-dim
    floating-point tensor.

    A tensor's value is not checked: reading it would synchronise the device at every step. A
    learned temperature is positive by construction (CTKD's ``T = t_start + t_end * sigmoid``
    with ``t_start > 0``, :class:`kdlab.methods.ctkd.CurriculumTemperature`).
    """
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0 or not temperature.is_floating_point():
            raise MethodError(
                f"a tensor temperature must be a 0-dim floating-point tensor, got shape "
                f"{tuple(temperature.shape)} and dtype {temperature.dtype}; use t.reshape(()) "
                "or a float"
            )
        return
    if not temperature > 0:
        raise MethodError(f"temperature must be > 0, got {temperature}")


def reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Batch reduction: ``"mean"`` (kdlab's default, never a sum) or ``"none"`` (per sample)."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise MethodError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def target_mask(logits: Tensor, target: Tensor) -> Tensor:
    """Boolean ``B x K`` mask, True at each row's target class."""
    return F.one_hot(target.long(), logits.shape[1]).bool()


def gather_target(x: Tensor, target: Tensor) -> Tensor:
    """``x[b, y_b]`` for every row ``b``: a length-``B`` vector."""
    return x.gather(1, target.long().unsqueeze(1)).squeeze(1)


def drop_target(x: Tensor, target: Tensor) -> Tensor:
    """``B x (K-1)``: each row of ``x`` with its target column removed (order kept)."""
    b, k = x.shape
    if k < 2:
        raise MethodError("a non-target distribution needs at least 2 classes")
    cols = torch.arange(k - 1, device=x.device).unsqueeze(0).expand(b, k - 1)
    cols = cols + (cols >= target.long().unsqueeze(1)).long()
    return x.gather(1, cols)


def binary_log_probs(z: Tensor, target: Tensor) -> Tensor:
    """``B x 2`` log of the binary target distribution ``b = [p_y, 1 - p_y]``, ``p = softmax(z)``.

    ``log p_y = log_softmax(z)_y`` and ``log(1 - p_y) = logsumexp_{c != y} z_c - logsumexp_c z_c``
    (DKD, Zhao et al., CVPR 2022, Eq. 1), both exact and finite for finite ``z``; ``1 - p_y`` is the
    sum of the non-target probabilities, as in the official DKD code.
    """
    lse_all = torch.logsumexp(z, dim=1)
    lse_other = torch.logsumexp(z.masked_fill(target_mask(z, target), float("-inf")), dim=1)
    log_py = gather_target(z, target) - lse_all
    return torch.stack([log_py, lse_other - lse_all], dim=1)


def nontarget_log_probs(z: Tensor, target: Tensor) -> Tensor:
    """``B x K`` log of DKD's non-target distribution ``q = softmax(z - 1000 * onehot(y))``.

    The spec's (and DKD's official code's) construction: a large constant is subtracted from the
    target logit before the softmax, so ``q(y)`` is ``~exp(-1000) = 0`` for any realistic logits
    and the remaining ``K - 1`` entries are the softmax over the non-target classes. (For target
    logits more than ~900 above the others after the temperature, the target class leaks into
    ``q``; the loss stays finite.)
    """
    return F.log_softmax(z - NONTARGET_OFFSET * target_mask(z, target).to(z.dtype), dim=1)


def kl_from_logs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row ``KL(p || q) = sum_c p_c (log p_c - log q_c)`` from log-probabilities (``B``)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def decoupled_kd(
    log_b_ref: Tensor,
    log_b_s: Tensor,
    log_q_ref: Tensor,
    log_q_s: Tensor,
    alpha: float,
    beta: float,
    temperature: Temperature,
) -> Tensor:
    """Per-sample ``T^2 * (alpha * KL(b_ref || b_s) + beta * KL(q_ref || q_s))``.

    DKD (Zhao et al., CVPR 2022) with ``b_ref = b_t, q_ref = q_t``; DCKD (kdlab's reconstruction)
    with its own references. Shared so that DCKD with ``target_rule="teacher"`` is DKD bit for bit.
    """
    tckd = kl_from_logs(log_b_ref, log_b_s)
    nckd = kl_from_logs(log_q_ref, log_q_s)
    return (temperature**2) * (alpha * tckd + beta * nckd)
