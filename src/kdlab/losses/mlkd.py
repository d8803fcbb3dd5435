"""MLKD: multi-level logit distillation (Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR
2023; official code Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``).

Three alignments of the teacher's and the student's softmax predictions ``P = softmax(Z / T)``
(``B x C``, one row per sample), each summed over a set of temperatures ("prediction
augmentation", default ``{4, 3, 5, 2, 6}``) and over two views of every image (a weak and a
strong augmentation):

* instance level: ``L_ins = T^2 * KL(p_t || p_s)`` per sample (KD);
* class level:    ``L_cc  = ||P_t^T P_t - P_s^T P_s||_F^2 / C`` (``C x C`` class correlation);
* batch level:    ``L_bc  = ||P_t P_t^T - P_s P_s^T||_F^2 / B`` (``B x B`` sample correlation).

The weak-view terms are restricted by the teacher's confidence: the sample mask keeps the samples
whose teacher confidence ``max_c softmax(z_t)_c`` (temperature 1, weak view) is at most the batch
median, the class mask the classes whose summed teacher probability ``sum_i softmax(z_t)_ic`` is
at most the median over classes (medians as ``np.percentile(x, 50)``: linear interpolation).

Two variants (``docs/methods/mlkd.md``):

* default (``code_exact=False``): the masks weight the terms per sample (per class), the strong
  view is used at every temperature and its class- and batch-level terms are part of the loss;
* ``code_exact=True``: the official code's operations exactly, with its four quirks: each
  reduced scalar is multiplied by the mask and averaged, which only rescales it by the kept
  fraction; the strong-view KD sum reuses the weak logits at its 4th and 5th temperatures (T = 2
  and 6); the strong-view class- and batch-level terms are not part of the loss.

All terms are computed in float32 (float64 stays float64), with the teacher detached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import check_temperature, prepare, to_float
from kdlab.losses.logit import kd_loss
from kdlab.losses.standardize import standardize_logits

__all__ = [
    "DEFAULT_TEMPERATURES",
    "batch_level_loss",
    "class_confidence_mask",
    "class_level_loss",
    "confidence_mask",
    "mlkd_loss",
]

#: the official temperature set: ``cfg.KD.TEMPERATURE`` (4 on CIFAR) followed by 3, 5, 2, 6.
DEFAULT_TEMPERATURES: tuple[float, ...] = (4.0, 3.0, 5.0, 2.0, 6.0)

#: in the official strong-view KD sum, the terms from this position of the temperature list on
#: (T = 2 and 6 in the official set) use the weak view's logits (``code_exact`` quirk).
_STRONG_KD_REUSES_WEAK_FROM = 3


def _median_mask(values: Tensor) -> Tensor:
    """``values <= median(values)`` with the median of ``np.percentile(values, 50)`` (linear
    interpolation between the two middle values for an even count), on the device."""
    return values <= torch.quantile(values, 0.5)


def confidence_mask(logits_t: Tensor) -> Tensor:
    """Boolean ``B`` mask of the samples whose teacher confidence ``max_c softmax(z_t)_c`` is at
    most its batch median (the official ``confidence.le(np.percentile(confidence, 50))``).

    For an even batch of distinct confidences it keeps exactly half the samples, for an odd
    batch ``(B + 1) / 2``. Jin, Wang, Lin, CVPR 2023, official code ``KD_ours.py``.
    """
    conf = F.softmax(to_float(logits_t.detach()), dim=1).amax(dim=1)
    return _median_mask(conf)


def class_confidence_mask(logits_t: Tensor) -> Tensor:
    """Boolean ``C`` mask of the classes whose summed teacher probability ``sum_i softmax(z_t)_ic``
    is at most its median over the classes (official ``class_conf_mask``)."""
    return _median_mask(F.softmax(to_float(logits_t.detach()), dim=1).sum(dim=0))


def class_level_loss(
    logits_s: Tensor, logits_t: Tensor, temperature: float, class_weight: Tensor | None = None
) -> Tensor:
    """Class-level alignment ``sum_{j,k} w_k (G_t - G_s)_{jk}^2 / C`` with the class correlation
    ``G = P^T P`` (``C x C``) of ``P = softmax(Z / T)``.

    ``class_weight`` (``C``, default all ones) weights the columns of the squared difference
    (the official ``reduce=False`` masking, normalised like the reduced loss). Jin, Wang, Lin,
    CVPR 2023 (official ``cc_loss``).
    """
    check_temperature(temperature)
    zs, zt = prepare(logits_s, logits_t)
    ps, pt = F.softmax(zs / temperature, dim=1), F.softmax(zt / temperature, dim=1)
    sq = (pt.t() @ pt - ps.t() @ ps).square()
    if class_weight is not None:
        sq = sq * class_weight.to(sq.dtype)
    return sq.sum() / zs.shape[1]


def batch_level_loss(
    logits_s: Tensor, logits_t: Tensor, temperature: float, sample_weight: Tensor | None = None
) -> Tensor:
    """Batch-level alignment ``sum_{i,j} w_j (G_t - G_s)_{ij}^2 / B`` with the sample correlation
    ``G = P P^T`` (``B x B``) of ``P = softmax(Z / T)``.

    ``sample_weight`` (``B``, default all ones) weights the columns of the squared difference.
    Not a batch mean: it grows like ``B`` for a batch repeated (``docs/methods/mlkd.md``). Jin,
    Wang, Lin, CVPR 2023 (official ``bc_loss``).
    """
    check_temperature(temperature)
    zs, zt = prepare(logits_s, logits_t)
    ps, pt = F.softmax(zs / temperature, dim=1), F.softmax(zt / temperature, dim=1)
    sq = (pt @ pt.t() - ps @ ps.t()).square()
    if sample_weight is not None:
        sq = sq * sample_weight.to(sq.dtype)
    return sq.sum() / zs.shape[0]


def _instance(zs: Tensor, zt: Tensor, temperature: float, standardize: bool) -> Tensor:
    """Per-sample ``T^2 KL(p_t || p_s)`` (``B``), on z-scored logits when ``standardize``."""
    if standardize:
        zs, zt = standardize_logits(zs), standardize_logits(zt)
    return kd_loss(zs, zt, temperature, reduction="none")


def mlkd_loss(
    logits_s: Tensor,
    logits_t: Tensor,
    logits_s_strong: Tensor,
    logits_t_strong: Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    *,
    code_exact: bool = False,
    logit_standardization: bool = False,
) -> dict[str, Tensor]:
    """MLKD's distillation terms, unweighted: ``{"kd": L_ins, "cc": L_class, "bc": L_batch}``.

    Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023. With the weak-view logits
    ``z`` and the strong-view logits ``z'`` of both models, the sample mask ``m``
    (:func:`confidence_mask`) and the class mask ``c`` (:func:`class_confidence_mask`) of the
    teacher's weak view, and ``KL_T,i`` the per-sample ``T^2 KL`` at temperature ``T``:

    * default: ``kd = sum_T [mean_i m_i KL_T,i(z) + mean_i KL_T,i(z')]``,
      ``cc = sum_T [cc_T(z; weights c) + cc_T(z')]``, ``bc = sum_T [bc_T(z; weights m) +
      bc_T(z')]`` (:func:`class_level_loss`, :func:`batch_level_loss`);
    * ``code_exact``: the official ``KD_ours.py``: ``kd = mean(m) sum_T mean_i KL_T,i(z) +
      sum_{T in T[:3]} mean_i KL_T,i(z') + sum_{T in T[3:]} mean_i KL_T,i(z)``,
      ``cc = mean(c) sum_T cc_T(z)``, ``bc = mean(m) sum_T bc_T(z)`` (needs 5 temperatures).

    ``logit_standardization`` z-scores the logits of the instance-level terms only (the LS
    repository's ``MLKD.py``: Sun et al., CVPR 2024); the masks and the class- and batch-level
    terms use the raw logits. The official method weights each term by ``kd_weight`` and adds
    ``ce_weight * (CE(z_s) + CE(z_s'))`` (:class:`kdlab.methods.mlkd.MLKD`).

    Args:
        logits_s, logits_t: weak-view student and teacher logits ``B x C`` (teacher detached).
        logits_s_strong, logits_t_strong: the same for the strong view.
        temperatures: the temperature set (official: 4, 3, 5, 2, 6).
        code_exact: reproduce the official code's operations and quirks.
        logit_standardization: LS pre-process of the instance-level logits.
    """
    temps = [float(t) for t in temperatures]
    if not temps:
        raise MethodError("mlkd needs at least one temperature")
    for t in temps:
        check_temperature(t)
    if code_exact and len(temps) != len(DEFAULT_TEMPERATURES):
        raise MethodError(
            f"mlkd code_exact reproduces the official sums over 5 temperatures, got {len(temps)}; "
            "give 5 (the official [4, 3, 5, 2, 6]) or set code_exact: false")
    zs, zt = prepare(logits_s, logits_t)
    zs2, zt2 = prepare(logits_s_strong, logits_t_strong)
    if zs2.shape != zs.shape:
        raise MethodError(f"the strong view's logits {tuple(zs2.shape)} must have the weak "
                          f"view's shape {tuple(zs.shape)}")
    mask, cmask = confidence_mask(zt), class_confidence_mask(zt)
    ls = logit_standardization
    if code_exact:
        frac, cfrac = mask.to(zs.dtype).mean(), cmask.to(zs.dtype).mean()
        kd_weak = sum(_instance(zs, zt, t, ls).mean() for t in temps)
        kd_strong = sum(
            _instance(zs2, zt2, t, ls).mean() if i < _STRONG_KD_REUSES_WEAK_FROM
            else _instance(zs, zt, t, ls).mean()
            for i, t in enumerate(temps))
        return {
            "kd": frac * kd_weak + kd_strong,
            "cc": cfrac * sum(class_level_loss(zs, zt, t) for t in temps),
            "bc": frac * sum(batch_level_loss(zs, zt, t) for t in temps),
        }
    m = mask.to(zs.dtype)
    return {
        "kd": sum((_instance(zs, zt, t, ls) * m).mean() + _instance(zs2, zt2, t, ls).mean()
                  for t in temps),
        "cc": sum(class_level_loss(zs, zt, t, cmask) + class_level_loss(zs2, zt2, t)
                  for t in temps),
        "bc": sum(batch_level_loss(zs, zt, t, mask) + batch_level_loss(zs2, zt2, t)
                  for t in temps),
    }
