"""Contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020): the NCE pieces.

CRD maximises a lower bound on the mutual information between teacher and student embeddings
with noise-contrastive estimation over a memory bank (one 128-d row per training sample for each
network). With ``h(v, v') = exp(<v, v'> / tau) / Z`` and ``M = K`` negatives drawn uniformly from
``N`` training samples (noise probability ``P_n = 1 / N``), the per-anchor loss is (paper Eq. 18,
RepDistiller ``ContrastLoss``)::

    L = -log( h_pos / (h_pos + M P_n + eps) ) - sum_{k=1..M} log( M P_n / (h_k + M P_n + eps) )

averaged over the batch, and CRD sums it over the two symmetric directions (teacher anchor
against the student memory, student anchor against the teacher memory). ``Z`` is a constant
estimated once, from the first batch, as ``mean(exp(<.,.>/tau)) * N`` (RepDistiller).

Everything here is a pure function; the memory bank, the embedding heads and the sampling state
live in :class:`kdlab.methods.crd.CRD`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.feature import _f32, _no_autocast

__all__ = [
    "class_layout",
    "contrast_scores",
    "crd_loss",
    "estimate_partition",
    "memory_update_rows",
    "nce_loss",
    "sample_negatives",
]


def class_layout(train_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Training-set indices sorted by class, and each class's count and start in that order."""
    order = torch.argsort(train_labels, stable=True)
    counts = torch.bincount(train_labels)
    starts = torch.cumsum(counts, 0) - counts
    return order, counts, starts


def sample_negatives(
    train_labels: Tensor,
    anchor_labels: Tensor,
    k: int,
    generator: torch.Generator | None = None,
    replacement: bool = False,
    layout: tuple[Tensor, Tensor, Tensor] | None = None,
    validate: bool = True,
) -> Tensor:
    """Draw ``k`` negative training-set indices per anchor, all from OTHER classes ("exact" mode).

    This is RepDistiller's ``CIFAR100InstanceSample(mode="exact")``: negatives are uniform over
    the samples whose label differs from the anchor's (so the anchor itself is never among
    them), without replacement when ``replacement`` is False (the reference draws without
    replacement whenever ``k`` does not exceed the pool). Sampling runs on ``train_labels``'s
    device with ``generator`` (which must live on that device).

    Without replacement costs ``B x N`` random keys and a top-k per step (fine for CIFAR); with
    replacement costs ``B x k`` (use it for ImageNet-sized ``N``); ``layout`` is
    :func:`class_layout` of ``train_labels``, precomputed by callers that sample every step.
    ``validate=False`` skips the pool-size check (which synchronises with the device).

    Returns:
        ``B x k`` int64 indices into the training set.
    """
    dev = train_labels.device
    anchor_labels = anchor_labels.to(dev)
    b = anchor_labels.shape[0]
    n = train_labels.shape[0]
    if replacement:
        order, counts, starts = class_layout(train_labels) if layout is None else layout
        n_c = counts[anchor_labels].unsqueeze(1)
        start_c = starts[anchor_labels].unsqueeze(1)
        pool = n - n_c
        if validate and b > 0 and int(pool.min().item()) < 1:
            raise ValueError("sample_negatives: an anchor's class covers the whole training set")
        u = torch.rand(b, k, generator=generator, device=dev, dtype=torch.float64)
        j = torch.minimum((u * pool.to(torch.float64)).floor().long(), pool - 1)
        j = j + n_c * (j >= start_c).long()
        return order[j]
    same = train_labels.unsqueeze(0) == anchor_labels.unsqueeze(1)
    if validate and b > 0:
        pool_min = int((~same).sum(dim=1).min().item())
        if k > pool_min:
            raise ValueError(
                f"sample_negatives: {k} negatives requested without replacement but an anchor "
                f"has only {pool_min} samples of other classes"
            )
    keys = torch.rand(b, n, generator=generator, device=dev)
    keys = keys.masked_fill(same, -1.0)
    return keys.topk(k, dim=1).indices


def memory_update_rows(old_rows: Tensor, new: Tensor, momentum: float) -> Tensor:
    """Momentum update of memory-bank rows, renormalised to unit length (RepDistiller).

    ``m_i <- (momentum * m_i + (1 - momentum) * v_i) / ||momentum * m_i + (1 - momentum) * v_i||``
    """
    mixed = momentum * old_rows + (1.0 - momentum) * new.detach().to(old_rows.dtype)
    return F.normalize(mixed, p=2.0, dim=1)


def contrast_scores(anchor: Tensor, memory_rows: Tensor, temperature: float) -> Tensor:
    """Unnormalised NCE scores ``exp(<m_k, v> / tau)``.

    Args:
        anchor: ``B x D`` anchor embeddings ``v`` (gradients flow into them).
        memory_rows: ``B x (K+1) x D`` memory rows, positive first (detached here).
        temperature: ``tau``.

    Returns:
        ``B x (K+1)`` scores.
    """
    with _no_autocast(anchor):
        a = _f32(anchor)
        rows = memory_rows.detach().to(a.dtype)
        return torch.exp(torch.bmm(rows, a.unsqueeze(2)).squeeze(2) / temperature)


def estimate_partition(scores: Tensor, n_data: int) -> Tensor:
    """RepDistiller's normalisation constant ``Z = mean(scores) * N``, estimated on one batch."""
    return scores.detach().mean() * n_data


def nce_loss(probs: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """NCE loss of CRD (paper Eq. 18; RepDistiller ``ContrastLoss``), batch mean.

    Args:
        probs: ``B x (K+1)`` normalised scores ``h = exp(<.,.>/tau) / Z``, positive in column 0.
        n_data: training-set size ``N`` (noise probability ``1/N``).
        eps: guard inside the logarithms (reference value 1e-7).

    ``L = -1/B sum_b [ log(h_pos / (h_pos + M/N + eps)) + sum_k log((M/N) / (h_k + M/N + eps)) ]``
    with ``M = K`` the number of negatives.
    """
    with _no_autocast(probs):
        p = _f32(probs)
        m = p.shape[1] - 1
        mpn = m / float(n_data)
        p_pos = p[:, 0]
        p_neg = p[:, 1:]
        log_d1 = torch.log(p_pos / (p_pos + mpn + eps))
        log_d0 = torch.log(mpn / (p_neg + mpn + eps))
        return -(log_d1 + log_d0.sum(dim=1)).mean()


def crd_loss(
    emb_s: Tensor,
    emb_t: Tensor,
    memory_s_rows: Tensor,
    memory_t_rows: Tensor,
    z_s: Tensor | float,
    z_t: Tensor | float,
    n_data: int,
    temperature: float = 0.07,
) -> Tensor:
    """The symmetric CRD loss for one batch (Tian et al., ICLR 2020; RepDistiller ``CRDLoss``).

    ``L = NCE(exp(<M_t[idx], e_s>/tau) / Z_s) + NCE(exp(<M_s[idx], e_t>/tau) / Z_t)``: the student
    anchor ``e_s`` against rows of the TEACHER memory and the teacher anchor ``e_t`` against rows
    of the STUDENT memory, positive first.

    ``emb_t`` is NOT detached: it is the output of CRD's trainable teacher embedding head, which
    this loss trains (the teacher network's feature must be detached before the head). The memory
    rows are detached.

    Args:
        emb_s, emb_t: ``B x D`` L2-normalised embeddings.
        memory_s_rows, memory_t_rows: ``B x (K+1) x D`` rows of the student / teacher memory.
        z_s, z_t: normalisation constants for the student-anchor / teacher-anchor scores.
        n_data: training-set size.
        temperature: NCE temperature ``tau`` (0.07).
    """
    p_s = contrast_scores(emb_s, memory_t_rows, temperature) / z_s
    p_t = contrast_scores(emb_t, memory_s_rows, temperature) / z_t
    return nce_loss(p_s, n_data) + nce_loss(p_t, n_data)
