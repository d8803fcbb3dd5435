"""ReviewKD's hierarchical context loss (Chen, Liu, Zhao & Jia, "Distilling Knowledge via
Knowledge Review", CVPR 2021).

The attention-based fusion (ABF) modules that produce the student side live in
:mod:`kdlab.methods.reviewkd`; this module holds only the pure loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from kdlab.losses.feature import _f32, _no_autocast, _teacher

__all__ = ["hcl_levels", "hcl_loss"]

#: pyramid levels of the HCL, in the order the reference code visits them.
HCL_LEVELS: tuple[int, ...] = (4, 2, 1)


def hcl_levels(height: int, width: int) -> list[int]:
    """The pooled pyramid sizes used for an ``height x width`` map: each of 4, 2, 1 smaller than
    the map (the reference code tests the height only; for square maps the two agree)."""
    return [l for l in HCL_LEVELS if l < min(height, width)]


def hcl_loss(feats_s: Sequence[Tensor], feats_t: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss (ReviewKD, CVPR 2021, Sec. 3.3; official code ``hcl``).

    For each pair of same-shaped maps ``(F_s, F_t)``::

        L_pair = ( MSE(F_s, F_t) + sum_{i=1..n} 2^-i MSE(P_{l_i}(F_s), P_{l_i}(F_t)) )
                 / (1 + sum_{i=1..n} 2^-i)

    where ``P_l`` is adaptive average pooling to ``l x l``, ``l_1 > l_2 > ...`` are the sizes of
    4, 2, 1 that are smaller than the map (:func:`hcl_levels`), and ``MSE`` is the mean over all
    elements. ``L_HCL = sum_pairs L_pair``. A 1x1 map (the pooled embedding) uses only the plain
    MSE. Every term is an element mean, so the loss is a batch mean.
    """
    if len(feats_s) != len(feats_t):
        raise ValueError(f"hcl_loss: {len(feats_s)} student vs {len(feats_t)} teacher features")
    if len(feats_s) == 0:
        raise ValueError("hcl_loss: no feature pairs given")
    total: Tensor | None = None
    with _no_autocast(feats_s[0]):
        for f_s, f_t in zip(feats_s, feats_t, strict=True):
            s = _f32(f_s)
            t = _teacher(f_t)
            if s.shape != t.shape:
                raise ValueError(
                    f"hcl_loss: student map {tuple(s.shape)} != teacher map {tuple(t.shape)}"
                )
            loss = F.mse_loss(s, t)
            cnt = 1.0
            tot = 1.0
            for l in hcl_levels(s.shape[-2], s.shape[-1]):
                cnt /= 2.0
                loss = loss + cnt * F.mse_loss(
                    F.adaptive_avg_pool2d(s, (l, l)), F.adaptive_avg_pool2d(t, (l, l))
                )
                tot += cnt
            loss = loss / tot
            total = loss if total is None else total + loss
    assert total is not None
    return total
