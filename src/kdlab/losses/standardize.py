"""Logit standardization (Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024).

A per-sample pre-process of teacher and student logits before any temperature-scaled logit loss:
``Z(z) = (z - mean(z)) / (1e-7 + std(z))`` over the class dimension, with the unbiased (N - 1)
standard deviation, exactly as the official code (sunshangquan/logit-standardization-KD)
computes it.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["STANDARDIZE_EPS", "standardize_logits"]

#: the constant added to the standard deviation, as in the official code.
STANDARDIZE_EPS = 1e-7


def standardize_logits(logits: Tensor, dim: int = 1) -> Tensor:
    """The z-score of every logit vector: ``(z - mean_c z) / (1e-7 + std_c z)``.

    ``std`` is the unbiased sample standard deviation (``torch.std``, N - 1), the mean and std
    are taken over ``dim`` (the classes: ``dim=1`` for ``B x K`` logits and for SDD's ``B x K x N``
    local logits), and the input dtype is kept (the losses cast to float32 afterwards). Gradients
    flow through the mean and the standard deviation. Sun et al., CVPR 2024, Eq. (5) and the
    official ``normalize``.
    """
    mean = logits.mean(dim=dim, keepdim=True)
    std = logits.std(dim=dim, keepdim=True)
    return (logits - mean) / (STANDARDIZE_EPS + std)
