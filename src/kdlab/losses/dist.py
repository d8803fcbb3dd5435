"""DIST: distillation from a stronger teacher by Pearson-correlation relations.

Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022
(arXiv:2205.10536). Official loss: hunto/image_classification_sota,
``lib/models/losses/dist_kd.py`` (the DIST_KD repository links it).

With ``Y = softmax(Z / tau)`` (``B x K``, rows are samples):

* inter-class relation: ``1 - mean_b rho(Y_s[b, :], Y_t[b, :])``, the Pearson correlation of
  each sample's class distribution, averaged over the batch;
* intra-class relation: ``1 - mean_c rho(Y_s[:, c], Y_t[:, c])``, the Pearson correlation of
  each class's probabilities across the batch, averaged over the classes;
* ``L_DIST = beta * tau^2 * inter + gamma * tau^2 * intra``.

``rho(u, v) = <u - mean u, v - mean v> / (||u - mean u|| * ||v - mean v|| + eps)`` with the
official ``eps = 1e-8`` added to the product of the norms (not to each norm), exactly as the
official ``cosine_similarity``. The intra-class term correlates over the BATCH, so DIST is not a
mean of per-sample losses: it depends on which samples share the batch (there is no
``reduction="none"``), and a batch of one sample has a constant intra term (``rho = 0``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kdlab.losses._common import check_temperature, prepare

__all__ = ["dist_loss", "pearson_correlation"]

#: the official code's epsilon in the denominator of the Pearson correlation.
DIST_EPS = 1e-8


def pearson_correlation(a: Tensor, b: Tensor, eps: float = DIST_EPS) -> Tensor:
    """Row-wise Pearson correlation of two ``N x D`` matrices (a length-``N`` vector).

    ``rho_n = <a_n - mean a_n, b_n - mean b_n> / (||a_n - mean a_n|| ||b_n - mean b_n|| + eps)``,
    the official DIST ``pearson_correlation`` (the cosine similarity of mean-centred rows, with
    ``eps`` added to the product of the norms; Huang et al., NeurIPS 2022).
    """
    a_c = a - a.mean(dim=1, keepdim=True)
    b_c = b - b.mean(dim=1, keepdim=True)
    return (a_c * b_c).sum(dim=1) / (a_c.norm(dim=1) * b_c.norm(dim=1) + eps)


def dist_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 4.0,
    *,
    eps: float = DIST_EPS,
) -> Tensor:
    """DIST loss ``L = beta * tau^2 * (1 - mean_b rho(Y_s[b], Y_t[b]))
    + gamma * tau^2 * (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))``, ``Y = softmax(Z / tau)``.

    Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022;
    the official CIFAR-100 setting is ``dist_t4``: ``tau = 4, beta = gamma = 1``.
    The first term (inter-class relation) is a batch mean of per-sample values; the second
    (intra-class relation) correlates each class's probabilities ACROSS the batch, so the loss
    depends on the batch composition (module docstring). Computed in float32 (at least), the
    teacher's logits detached.

    Args:
        logits_s: student logits ``B x K``.
        logits_t: teacher logits ``B x K`` (detached here).
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: ``tau > 0``.
        eps: the Pearson denominator's epsilon (official: 1e-8).
    """
    check_temperature(temperature)
    zs, zt = prepare(logits_s, logits_t)
    y_s = F.softmax(zs / temperature, dim=1)
    y_t = F.softmax(zt / temperature, dim=1)
    inter = 1 - pearson_correlation(y_s, y_t, eps).mean()
    intra = 1 - pearson_correlation(y_s.transpose(0, 1), y_t.transpose(0, 1), eps).mean()
    # the official order of operations: beta * (tau^2 * inter) + gamma * (tau^2 * intra)
    return beta * (temperature**2 * inter) + gamma * (temperature**2 * intra)
