"""Feature- and relation-based distillation losses (FitNet, AT, RKD, SP, PKT).

Pure functions of tensors (architecture contract 2). Every loss:

* is computed in float32 (bf16/fp16 inputs are promoted; float64 inputs stay float64 so the
  losses can be checked with :func:`torch.autograd.gradcheck`), with autocast disabled inside;
* detaches its teacher inputs (the teacher is frozen);
* is reduced to a batch MEAN (or, for the relation losses, the mean over the batch's pairs or
  triplets, as in the reference code), never a batch sum.

Which features each method uses, and with which weight, is the business of the distillers in
:mod:`kdlab.methods.feature`; these functions only implement the equations.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_map",
    "at_loss",
    "fitnet_loss",
    "pkt_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "sp_loss",
]


def _f32(x: Tensor) -> Tensor:
    """Promote half-precision tensors to float32; keep float32/float64 as they are."""
    return x if x.dtype == torch.float64 else x.float()


def _teacher(x: Tensor) -> Tensor:
    """Detach a teacher tensor (cloning inference-mode tensors so autograd may save them)."""
    x = x.detach()
    if x.is_inference():
        x = x.clone()
    return _f32(x)


def _no_autocast(x: Tensor) -> AbstractContextManager[None]:
    """A context with autocast disabled on ``x``'s device type (losses run in full precision)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# FitNet (Romero et al., ICLR 2015)
# ---------------------------------------------------------------------------------------------


def fitnet_loss(feat_s_regressed: Tensor, feat_t: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    ``L = mean_{b,c,h,w} (r(F_s) - F_t)^2``: the mean squared error between the student's hint
    feature after the trainable regressor ``r`` and the teacher's hint feature, averaged over
    every element (the paper writes ``1/2 ||.||^2`` summed; RepDistiller/mdistiller use
    ``nn.MSELoss`` with mean reduction, which the default weight 100 is tuned for).

    Args:
        feat_s_regressed: ``B x C_t x H_t x W_t`` student hint after the regressor.
        feat_t: teacher hint of the same shape (detached here).
    """
    if feat_s_regressed.shape != feat_t.shape:
        raise ValueError(
            f"fitnet_loss: regressed student shape {tuple(feat_s_regressed.shape)} "
            f"!= teacher shape {tuple(feat_t.shape)}"
        )
    with _no_autocast(feat_s_regressed):
        return F.mse_loss(_f32(feat_s_regressed), _teacher(feat_t))


# ---------------------------------------------------------------------------------------------
# Attention transfer (Zagoruyko & Komodakis, ICLR 2017)
# ---------------------------------------------------------------------------------------------


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention map ``Q = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||_2``.

    ``feat`` is ``B x C x H x W``; the result is ``B x (H*W)`` with unit L2 norm per sample
    (zero rows stay zero). For even ``p`` this equals the reference ``A.pow(p).mean(1)``.
    """
    a = _f32(feat).abs().pow(p).mean(dim=1).reshape(feat.shape[0], -1)
    return F.normalize(a, p=2.0, dim=1)


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two maps to the smaller one's spatial size."""
    hs, ws = f_s.shape[-2:]
    ht, wt = f_t.shape[-2:]
    if (hs, ws) == (ht, wt):
        return f_s, f_t
    if hs * ws > ht * wt:
        return F.adaptive_avg_pool2d(f_s, (ht, wt)), f_t
    return f_s, F.adaptive_avg_pool2d(f_t, (hs, ws))


def at_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """Attention transfer loss (Zagoruyko & Komodakis, "Paying More Attention to Attention",
    ICLR 2017), in the form of the reference code (szagoruyko/attention-transfer, RepDistiller).

    ``L = sum_j mean_{b, hw} (Q_s^j - Q_t^j)^2`` over the stage pairs ``j``, with ``Q`` from
    :func:`attention_map`. When a pair's spatial sizes differ, the larger map is adaptively
    average-pooled to the smaller one before the attention map is taken (RepDistiller). The
    paper writes ``beta/2 * sum_j ||Q_s^j - Q_t^j||_2`` (a norm, not squared, no spatial mean);
    the default weight 1000 belongs to the code's form.
    """
    if len(feats_s) != len(feats_t):
        raise ValueError(f"at_loss: {len(feats_s)} student vs {len(feats_t)} teacher features")
    if len(feats_s) == 0:
        raise ValueError("at_loss: no feature pairs given")
    with _no_autocast(feats_s[0]):
        total: Tensor | None = None
        for f_s, f_t in zip(feats_s, feats_t, strict=True):
            s, t = _match_spatial(_f32(f_s), _teacher(f_t))
            term = (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
            total = term if total is None else total + term
        assert total is not None
        return total


# ---------------------------------------------------------------------------------------------
# Relational KD (Park et al., CVPR 2019)
# ---------------------------------------------------------------------------------------------


def _pairwise_distance(e: Tensor, eps: float = 1e-12) -> Tensor:
    """Distance matrix ``sqrt(max(||e_i||^2 + ||e_j||^2 - 2 e_i.e_j, eps))``, zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps)
    d = d2.sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _normalised_distance(e: Tensor, eps: float) -> Tensor:
    """Distance matrix divided by the mean of its positive entries (RKD's ``mu``)."""
    d = _pairwise_distance(e, eps)
    pos = (d > 0).to(d.dtype)
    mu = (d * pos).sum() / pos.sum().clamp(min=1.0)
    return d / mu.clamp(min=eps)


def rkd_distance_loss(emb_s: Tensor, emb_t: Tensor, eps: float = 1e-12) -> Tensor:
    """RKD distance-wise loss (Park et al., "Relational Knowledge Distillation", CVPR 2019, Eq. 5).

    ``psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu`` with ``mu`` the mean distance over the batch's
    distinct pairs; ``L_D = mean_{i,j} Huber(psi_D(s_i, s_j) - psi_D(t_i, t_j))`` with the Huber
    (smooth-L1, delta 1) loss, averaged over all ``B^2`` entries (diagonal included, as in the
    reference code). Inputs are flattened to ``B x D``. Invariant to permuting the batch.
    """
    with _no_autocast(emb_s):
        s = _f32(emb_s).reshape(emb_s.shape[0], -1)
        t = _teacher(emb_t).reshape(emb_t.shape[0], -1)
        return F.smooth_l1_loss(_normalised_distance(s, eps), _normalised_distance(t, eps))


def _angles(e: Tensor) -> Tensor:
    """``B x B x B`` cosines ``<n(e_j - e_i), n(e_k - e_i)>`` (angle at vertex ``i``)."""
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [i, j] = e_j - e_i
    n = F.normalize(diff, p=2.0, dim=2)
    return torch.bmm(n, n.transpose(1, 2))


def rkd_angle_loss(emb_s: Tensor, emb_t: Tensor) -> Tensor:
    """RKD angle-wise loss (Park et al., CVPR 2019, Eq. 7).

    ``psi_A(t_i, t_j, t_k) = cos angle(t_i t_j, t_k t_j)``; ``L_A`` is the Huber loss between the
    student's and teacher's cosines averaged over all ``B^3`` triplets (degenerate ones, where two
    indices coincide, contribute zero vectors as in the reference code). Invariant to permuting
    the batch.
    """
    with _no_autocast(emb_s):
        s = _f32(emb_s).reshape(emb_s.shape[0], -1)
        t = _teacher(emb_t).reshape(emb_t.shape[0], -1)
        return F.smooth_l1_loss(_angles(s), _angles(t))


def rkd_loss(
    emb_s: Tensor,
    emb_t: Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    eps: float = 1e-12,
) -> Tensor:
    """RKD-DA: ``distance_weight * L_D + angle_weight * L_A`` (Park et al., CVPR 2019).

    Defaults 25 and 50 are the paper's and RepDistiller's.
    """
    return distance_weight * rkd_distance_loss(emb_s, emb_t, eps) + angle_weight * rkd_angle_loss(
        emb_s, emb_t
    )


# ---------------------------------------------------------------------------------------------
# Similarity-preserving KD (Tung & Mori, ICCV 2019)
# ---------------------------------------------------------------------------------------------


def _similarity(f: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix ``G = norm_rows(Q Q^T)`` of the flattened ``B x D`` feature."""
    q = f.reshape(f.shape[0], -1)
    return F.normalize(q @ q.t(), p=2.0, dim=1)


def sp_loss(feat_s: Tensor, feat_t: Tensor) -> Tensor:
    """Similarity-preserving loss (Tung & Mori, "Similarity-Preserving Knowledge Distillation",
    ICCV 2019, Eq. 4).

    ``L_SP = ||G_t - G_s||_F^2 / B^2`` where ``G = norm_rows(Q Q^T)`` and ``Q`` is the feature
    flattened to ``B x (C*H*W)``. Channel counts and spatial sizes of student and teacher may
    differ (only the ``B x B`` similarities are compared). Invariant to permuting the batch; not
    to duplicating it (the row normalisation runs over the batch).
    """
    with _no_autocast(feat_s):
        g_s = _similarity(_f32(feat_s))
        g_t = _similarity(_teacher(feat_t))
        b = feat_s.shape[0]
        return (g_t - g_s).pow(2).sum() / (b * b)


# ---------------------------------------------------------------------------------------------
# Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018)
# ---------------------------------------------------------------------------------------------


def _cosine_probabilities(e: Tensor, eps: float) -> Tensor:
    """Row-stochastic ``P_ij = K_ij / sum_k K_ik`` with the cosine kernel ``K = (cos + 1) / 2``."""
    e = e / (e.norm(p=2, dim=1, keepdim=True) + eps)
    e = torch.where(torch.isnan(e), torch.zeros_like(e), e)
    k = (e @ e.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(emb_s: Tensor, emb_t: Tensor, eps: float = 1e-7) -> Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018), cosine-kernel form of the authors' code.

    ``P_ij = K_ij / sum_k K_ik`` with ``K = (cos(x_i, x_j) + 1) / 2`` for teacher (``P^t``) and
    student (``P^s``); ``L = mean_{i,j} P^t_ij log((P^t_ij + eps) / (P^s_ij + eps))``: the mean
    over all ``B^2`` entries (RepDistiller/mdistiller), i.e. the batch-mean of the row KL
    divergences divided by ``B``; the default weight 30000 is tuned for this form. Invariant to
    permuting the batch.
    """
    with _no_autocast(emb_s):
        s = _f32(emb_s).reshape(emb_s.shape[0], -1)
        t = _teacher(emb_t).reshape(emb_t.shape[0], -1)
        p_s = _cosine_probabilities(s, eps)
        p_t = _cosine_probabilities(t, eps)
        return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()
