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

__all__ = ["cwd_loss", "dist_pixel_loss", "pixel_kd_loss", "pixels_as_rows"]


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
