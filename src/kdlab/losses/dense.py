"""Distillation losses on dense prediction maps (semantic segmentation: ``B x K x H x W`` logits).

* :func:`pixel_kd_loss`: Hinton's KD applied at every pixel (the pixel-wise KD of segmentation
  distillation; Liu et al., "Structured Knowledge Distillation for Semantic Segmentation",
  CVPR 2019, and CIRKD's ``CriterionKD``, Yang et al., CVPR 2022):
  ``T^2 / (B H W) * sum_{b,h,w} KL(softmax(z_t[b,:,h,w] / T) || softmax(z_s[b,:,h,w] / T))``,
  optionally over the pixels of a mask only (then divided by the count of kept pixels).
* :func:`cwd_loss`: channel-wise distillation (Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge
  Distillation for Dense Prediction", ICCV 2021): each channel's map is turned into a
  distribution over the ``H W`` positions by a softmax at ``T``, and
  ``T^2 / (B C) * sum_{b,c} KL(softmax(y_t[b,c,:] / T) || softmax(y_s[b,c,:] / T))``.
* :func:`window_logits` / :func:`pixel_sdd_loss`: SDD on a logit map (docs/methods/
  sdd-segmentation.md): every pixel's prediction is decoupled into the mean logits of the
  ``s x s`` windows around it at several scales ``s`` (``s = 1``: the pixel itself, SDD's
  "global" logit), and SDD's loss (consistent / complementary windows, Wei et al., CVPR 2024)
  is taken with the pixels as samples.
* :func:`dist_pixel_loss`: DIST (Huang et al., NeurIPS 2022) with every pixel a sample, as the
  official segmentation code (``hunto/DIST_KD``, ``segmentation/losses/dist_kd.py``) reshapes the
  maps to ``(B H W) x K`` before the inter- and intra-class relations.

As every kdlab loss: a pure function of tensors, computed in (at least) float32, the teacher
detached inside, log-probabilities by ``log_softmax`` (never the log of a softmax). Maps of
different sizes or channel counts are refused: resizing and channel projections belong to the
method, not to the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import Temperature, check_temperature, to_float
from kdlab.losses.dist import DIST_EPS, dist_loss
from kdlab.losses.sdd import Base, Criterion, sdd_loss

__all__ = ["cwd_loss", "dist_pixel_loss", "masked_pixel_sdd_loss", "pixel_kd_loss",
           "pixel_sdd_loss", "pixels_as_rows", "window_logits"]


def _maps(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Check that both are ``B x K x H x W`` of one shape; ``(float student, detached teacher)``."""
    if student_map.dim() != 4 or student_map.shape != teacher_map.shape:
        raise MethodError(f"student and teacher maps must both be B x K x H x W with the same "
                          f"shape, got {tuple(student_map.shape)} and "
                          f"{tuple(teacher_map.shape)}; resize the maps or project the "
                          "channels in the method first")
    return to_float(student_map), to_float(teacher_map.detach())


def pixels_as_rows(x: Tensor) -> Tensor:
    """``B x K x H x W`` -> ``(B H W) x K``: one row per pixel (b, h, w order)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def pixel_kd_loss(student_map: Tensor, teacher_map: Tensor, temperature: Temperature = 1.0,
                  mask: Tensor | None = None) -> Tensor:
    """Pixel-wise KD: ``T^2 * mean over pixels of KL(p_t || p_s)``, ``p = softmax(z / T)`` over
    the ``K`` classes at each pixel (module docstring; CIRKD ``CriterionKD``: the KL summed over
    classes and pixels, divided by ``B H W``, times ``T^2``).

    Args:
        student_map: student logits ``B x K x H x W``.
        teacher_map: teacher logits of the same shape (detached here).
        temperature: ``T > 0`` (CIRKD's default 1).
        mask: optional boolean ``B x H x W``: only these pixels count (e.g. not the ignored
            label 255), and the sum is divided by their number; an all-False mask gives 0.
    """
    check_temperature(temperature)
    zs, zt = _maps(student_map, teacher_map)
    log_ps = F.log_softmax(pixels_as_rows(zs) / temperature, dim=1)
    log_pt = F.log_softmax(pixels_as_rows(zt) / temperature, dim=1)
    per_pixel = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    if mask is not None:
        if mask.shape != (zs.shape[0], *zs.shape[2:]):
            raise MethodError(f"mask must be B x H x W = {(zs.shape[0], *zs.shape[2:])}, got "
                              f"{tuple(mask.shape)}")
        keep = mask.reshape(-1).to(torch.bool)
        return per_pixel[keep].sum() / keep.sum().clamp(min=1) * temperature**2
    return per_pixel.mean() * temperature**2


def cwd_loss(student_map: Tensor, teacher_map: Tensor, temperature: Temperature = 4.0
             ) -> Tensor:
    """Channel-wise distillation: ``T^2 / (B C) * sum_{b,c} KL(q_t[b,c] || q_s[b,c])`` with
    ``q[b,c] = softmax(y[b,c,:,:].flatten() / T)`` over the ``H W`` positions (Shu et al., ICCV
    2021; the official ``CriterionCWD(norm_type='channel', divergence='kl')``, T = 4 in its
    segmentation recipe). The maps may be logits or features of one channel count ``C``."""
    check_temperature(temperature)
    ys, yt = _maps(student_map, teacher_map)
    b, c = ys.shape[:2]
    log_qs = F.log_softmax(ys.reshape(b, c, -1) / temperature, dim=2)
    log_qt = F.log_softmax(yt.reshape(b, c, -1) / temperature, dim=2)
    kl = (log_qt.exp() * (log_qt - log_qs)).sum()
    return kl / (b * c) * temperature**2


def dist_pixel_loss(student_map: Tensor, teacher_map: Tensor, beta: float = 1.0,
                    gamma: float = 1.0, temperature: float = 1.0, *,
                    eps: float = DIST_EPS) -> Tensor:
    """DIST on pixels: :func:`~kdlab.losses.dist.dist_loss` of the ``(B H W) x K`` pixel rows
    (:func:`pixels_as_rows`): the inter-class relation averaged over pixels, the intra-class
    relation of each class across all pixels of the batch (official DIST_KD segmentation code,
    whose ``tau`` is 1)."""
    zs, zt = _maps(student_map, teacher_map)
    return dist_loss(pixels_as_rows(zs), pixels_as_rows(zt), beta, gamma, temperature, eps=eps)


def window_logits(logit_map: Tensor, scales: tuple[int, ...] | list[int] = (1, 2, 4)) -> Tensor:
    """SDD's local logits of a logit map: ``B x K x N x H x W`` where slice ``i`` gives every
    pixel the mean logits of the ``s_i x s_i`` window (stride ``s_i``, aligned at the top-left
    corner; windows cut by the border average their existing pixels) that contains it.
    ``scales`` must start with 1 (the pixel itself) and be increasing. Because the logits of
    the segmentation head are linear in its input, a window's mean logit is the head applied
    to the window's mean feature, as SDD's local logits are (docs/methods/sdd-segmentation.md).
    """
    if logit_map.dim() != 4:
        raise MethodError(f"SDD on maps needs B x K x H x W logits, got {tuple(logit_map.shape)}")
    sc = [int(x) for x in scales]
    if not sc or sc[0] != 1 or any(b <= a for a, b in zip(sc, sc[1:], strict=False)):
        raise MethodError(f"SDD scales on maps must start with 1 and increase, got {list(scales)}")
    h, w = logit_map.shape[-2:]
    if sc[-1] > min(h, w):
        raise MethodError(f"SDD scale {sc[-1]} is larger than the {h} x {w} logit map")
    out = [logit_map]
    for s in sc[1:]:
        pooled = F.avg_pool2d(logit_map, s, stride=s, ceil_mode=True, count_include_pad=False)
        out.append(pooled.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)[..., :h, :w])
    return torch.stack(out, dim=2)


def pixel_sdd_loss(student_map: Tensor, teacher_map: Tensor, labels: Tensor,
                   scales: tuple[int, ...] | list[int] = (1, 2, 4), base: Base = "kd",
                   base_kwargs: dict[str, object] | None = None, beta: float = 2.0,
                   criterion: Criterion = "correctness", ignore_index: int = 255) -> Tensor:
    """SDD on logit maps: :func:`~kdlab.losses.sdd.sdd_loss` with every labelled pixel a sample
    and its windows (:func:`window_logits`) the regions: ``sum_{p, i} w_{p,i} l_{p,i} / (N P)``
    over the ``P`` pixels whose label is not ``ignore_index``, ``l`` the base loss (KD, DKD,
    NKD) of window ``i`` of pixel ``p`` against the pixel's label, ``w`` = ``beta`` when the
    teacher's window prediction is complementary to its pixel prediction, else 1. With
    ``scales = (1,)`` it is the base loss over the labelled pixels. No labelled pixel: 0."""
    if labels.shape != (student_map.shape[0], *student_map.shape[2:]):
        raise MethodError(f"labels must be B x H x W = "
                          f"{(student_map.shape[0], *student_map.shape[2:])}, got "
                          f"{tuple(labels.shape)}")
    keep = labels.reshape(-1) != ignore_index
    return masked_pixel_sdd_loss(student_map, teacher_map, keep, labels.reshape(-1)[keep],
                                 scales, base, base_kwargs, beta, criterion)


def masked_pixel_sdd_loss(student_map: Tensor, teacher_map: Tensor, keep: Tensor | None,
                          target: Tensor, scales: tuple[int, ...] | list[int] = (1, 2, 4),
                          base: Base = "kd", base_kwargs: dict[str, object] | None = None,
                          beta: float = 2.0, criterion: Criterion = "correctness") -> Tensor:
    """:func:`pixel_sdd_loss` over the pixels a flat ``B H W`` boolean ``keep`` selects (None:
    every pixel), ``target`` their labels in (b, h, w) order: the form the segmentation task's
    pixel view gives (``ModelOutput.pixel_mask`` and the kept labels). No pixel: 0."""
    zs, zt = _maps(student_map, teacher_map)
    if target.numel() == 0:
        return zs.sum() * 0.0
    n = len(scales)

    def rows(x: Tensor) -> Tensor:  # B x K x N x H x W -> P x K x N (the kept pixels)
        local = window_logits(x, scales).permute(0, 3, 4, 1, 2).reshape(-1, x.shape[1], n)
        return local if keep is None else local[keep]

    return sdd_loss(rows(zs), rows(zt), target.long(), base=base,
                    base_kwargs=dict(base_kwargs or {}), beta=beta, criterion=criterion)
