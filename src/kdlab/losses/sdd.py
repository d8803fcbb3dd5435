"""SDD: Scale Decoupled Distillation (Wei, Luo, Luo, CVPR 2024).

Two pure functions: :func:`multiscale_logits` turns a model's final feature map and its linear
classifier into local logits ``B x K x N`` (one column per region), and :func:`sdd_loss` applies a
base logit loss (KD, DKD or NKD, from :mod:`kdlab.losses.logit`) to every region with
teacher-derived consistent/complementary weights. :func:`sdd_pooling_grids` is the one check of
SDD's scale rules (used by :func:`multiscale_logits`, the SDD params and the SDD distillers).

Scales larger than the feature map (kdlab's rule, checked by :func:`sdd_pooling_grids`): an
``m x m`` grid is accepted on an ``H x W`` map when, along each side, ``m <= H`` (ordinary,
possibly overlapping, adaptive average pooling) or ``m`` is a multiple of ``H`` (adaptive pooling
then repeats every location exactly ``m / H`` times: the MobileNetV2 student on CIFAR has a 2x2
map whose 4x4 cells are copies of its 4 locations, which the official code trains with). Any
other ``m > H`` (say 4 cells on a side of 3) would make cells that mix unequal shares of
locations, and raises :class:`~kdlab.core.errors.MethodError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss

__all__ = ["multiscale_logits", "sdd_loss", "sdd_pooling_grids"]

Pooling = Literal["nested", "direct"]
Base = Literal["kd", "dkd", "nkd"]
Criterion = Literal["correctness", "class"]

_BASES: dict[str, Callable[..., Tensor]] = {"kd": kd_loss, "dkd": dkd_loss, "nkd": nkd_loss}


def _fits(m: int, side: int) -> bool:
    return m <= side or m % side == 0


def sdd_pooling_grids(
    scales: Iterable[int],
    pooling: str = "nested",
    nested_grid: int | None = None,
    height: int | None = None,
    width: int | None = None,
    what: str = "feature map",
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check SDD's scale rules once; return ``(scales, grids pooled directly from the map)``.

    The one place SDD's scale rules are checked (the params validator, the distillers when they
    are built and :func:`multiscale_logits` all call it):

    * ``scales`` must be distinct positive integers including 1 (region 0, the global 1x1
      region, is what SDD compares every local prediction with); they are returned sorted;
    * ``pooling`` is ``"direct"`` (every scale is pooled from the map, so the grids are the
      scales) or ``"nested"`` (the map is pooled once to ``g x g``, ``g = nested_grid`` or the
      largest scale, which must be at least the largest scale);
    * when ``height`` and ``width`` are given, every grid pooled from the map must fit it:
      along each side, ``m <= side`` or ``m`` is a multiple of ``side`` (see the module doc);
      ``what`` names the map in that error.

    Raises:
        MethodError: any rule broken.
    """
    given = list(scales)
    sc = tuple(sorted(int(m) for m in given))
    if not sc or sc[0] != 1 or len(set(sc)) != len(sc):
        raise MethodError(
            f"SDD scales must be distinct positive integers including 1 (the global region), "
            f"got {given}; e.g. [1, 2] or [1, 2, 4]"
        )
    if pooling == "direct":
        grids = sc
    elif pooling == "nested":
        g = sc[-1] if nested_grid is None else int(nested_grid)
        if g < sc[-1]:
            raise MethodError(
                f"nested_grid ({g}) must be at least the largest SDD scale ({sc[-1]})"
            )
        grids = (g,)
    else:
        raise MethodError(f"SDD pooling must be 'nested' or 'direct', got {pooling!r}")
    if height is not None and width is not None:
        for m in grids:
            if not (_fits(m, height) and _fits(m, width)):
                raise MethodError(
                    f"SDD scale {m} does not fit the {height}x{width} {what}: a scale must be at "
                    "most the map's side or a multiple of it; use smaller scales (e.g. [1, 2]) "
                    "for this model"
                )
    return sc, grids


def multiscale_logits(
    feature_map: Tensor,
    classifier: Callable[[Tensor], Tensor],
    scales: Sequence[int] = (1, 2, 4),
    pooling: Pooling = "nested",
    nested_grid: int | None = None,
) -> Tensor:
    """SDD's local logits: the classifier applied to every cell of every ``m x m`` pooling grid.

    For each scale ``m`` (increasing, 1 first) the map ``F`` (``B x C x H x W``) is average-pooled
    to ``m x m`` and the linear classifier is applied to each cell
    (``B x C x m x m -> B x m*m x C -> B x m*m x K``). Regions are concatenated in the order
    [global 1x1, 2x2 cells row-major, 4x4 cells row-major, ...] giving ``B x K x N`` with
    ``N = sum m^2``. Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024, Sec. 3.2.

    Pooling:
        ``"nested"`` (default, code-faithful): ``F`` is pooled to a ``g x g`` grid once and every
        scale is pooled from that grid, as the official SPP module does (``g = 4`` there). ``g``
        is ``nested_grid`` if given (it must be ``>=`` the largest scale), else the largest
        scale. ``"direct"``: every grid is pooled from ``F``. Both agree when ``H`` and ``W`` are
        multiples of ``g`` (CIFAR's 8x8 and 4x4 maps, the 2x2 MobileNetV2 map), not otherwise
        (7x7 ImageNet/CUB maps): there nested region 0 is not the model's own logits.

    Args:
        feature_map: ``B x C x H x W`` final map (after the last activation, before pooling).
        classifier: the model's linear head, callable on ``(..., C)``.
        scales: grid sizes; must contain 1 (see :func:`sdd_pooling_grids`).
        pooling: ``"nested"`` or ``"direct"``.
        nested_grid: the intermediate grid of nested pooling (``None``: the largest scale; 4
            reproduces the official code for every ``M`` it supports).

    Returns:
        ``B x K x N`` local logits.

    Raises:
        MethodError: bad scales, a scale that does not fit the map, an unknown ``pooling``
            (see :func:`sdd_pooling_grids`).
    """
    if feature_map.dim() != 4:
        raise MethodError(
            f"SDD needs a B x C x H x W feature map, got shape {tuple(feature_map.shape)}"
        )
    h, w = feature_map.shape[-2:]
    sc, from_map = sdd_pooling_grids(scales, pooling, nested_grid, int(h), int(w))
    if pooling == "direct":
        grids = [F.adaptive_avg_pool2d(feature_map, m) for m in from_map]
    else:
        g = from_map[0]
        base = F.adaptive_avg_pool2d(feature_map, g)
        grids = [base if m == g else F.adaptive_avg_pool2d(base, m) for m in sc]
    cells = torch.cat([grid.flatten(2) for grid in grids], dim=2)  # B x C x N
    # Under autocast the map may be bf16/fp16 while the head is float32: SDD's losses are
    # computed in float32 (spec), so the cells are classified at the head's precision.
    weight = getattr(classifier, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point():
        cells = cells.to(torch.promote_types(cells.dtype, weight.dtype))
    return classifier(cells.transpose(1, 2)).transpose(1, 2)  # B x K x N


def sdd_loss(
    local_s: Tensor,
    local_t: Tensor,
    target: Tensor,
    base: Base = "kd",
    base_kwargs: dict[str, Any] | None = None,
    beta: float = 2.0,
    criterion: Criterion = "correctness",
    reduction: Literal["mean", "sum"] = "mean",
    consistent_weight: float = 1.0,
) -> Tensor:
    """Scale decoupled distillation ``L_SDD = sum_{r,b} w_{r,b} * l_{r,b} / (N * B)``.

    ``l_{r,b}`` is the base loss (``kd_loss``/``dkd_loss``/``nkd_loss`` with ``reduction="none"``)
    of region ``r`` of sample ``b``, computed on the ``(N*B) x K`` matrix of local logits (every
    region's target is the sample's label). Weights come from the TEACHER only: region ``r > 0`` is
    complementary (weight ``beta``) when its teacher prediction disagrees with the teacher's
    global (region 0) prediction, else consistent (weight 1); region 0 is always consistent.
    Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024, Eqs. 6-9.

    Args:
        local_s, local_t: ``B x K x N`` local logits of student and teacher (region 0 global),
            as :func:`multiscale_logits` returns them; the teacher is detached.
        target: ``B`` labels.
        base: ``"kd"``, ``"dkd"`` or ``"nkd"``.
        base_kwargs: keyword arguments of the base loss (``temperature``, ``alpha``, ``beta``,
            ``gamma``, ``legacy``); ``None`` uses the base loss's defaults. ``temperature`` may
            be a 0-dim tensor (a learned temperature, CTKD), shared by every region.
        beta: weight of complementary regions (paper: 2.0).
        criterion: ``"correctness"`` (official code, default): complementary when the local
            prediction's correctness differs from the global one's; ``"class"`` (paper text):
            complementary when the local predicted class differs from the global predicted class.
        reduction: ``"mean"`` (official code, default): divide by ``N * B``; ``"sum"`` (the paper's
            Eq. 9, a plain sum over regions): divide by ``B`` only, i.e. ``N`` times larger.
        consistent_weight: weight of the CONSISTENT LOCAL regions (``r > 0``), default 1 (the
            method). An ablation switch for the paper's Table 6: ``consistent_weight=0`` keeps
            only the complementary local terms ("complementary only"), ``beta=0`` only the
            consistent ones ("consistent only"). The global region 0 always keeps weight 1 (the
            Table 6 row with neither local term is plain KD on the global logits), and the
            normaliser stays ``N * B`` (``B`` for ``"sum"``) whatever the weights.

    With ``N = 1`` (scales ``{1}``) this is exactly the base loss on the global logits.
    """
    if local_s.dim() != 3 or local_s.shape != local_t.shape:
        raise MethodError(
            f"SDD local logits must both be B x K x N with the same shape, got "
            f"{tuple(local_s.shape)} and {tuple(local_t.shape)}; student and teacher must use "
            "the same scales"
        )
    if base not in _BASES:
        raise MethodError(f"SDD base must be one of {sorted(_BASES)}, got {base!r}")
    if criterion not in ("correctness", "class"):
        raise MethodError(f"SDD criterion must be 'correctness' or 'class', got {criterion!r}")
    if reduction not in ("mean", "sum"):
        raise MethodError(f"SDD reduction must be 'mean' or 'sum', got {reduction!r}")
    if not consistent_weight >= 0:
        raise MethodError(f"SDD consistent_weight must be >= 0, got {consistent_weight!r}")
    b, k, n = local_s.shape
    # Region-major rows: row r * B + b is region r of sample b.
    rows_s = local_s.permute(2, 0, 1).reshape(n * b, k)
    rows_t = local_t.detach().permute(2, 0, 1).reshape(n * b, k)
    target_r = target.repeat(n)
    kwargs = dict(base_kwargs or {})
    if base == "kd":
        per = kd_loss(rows_s, rows_t, reduction="none", **kwargs)
    else:
        per = _BASES[base](rows_s, rows_t, target_r, reduction="none", **kwargs)
    pred_t = rows_t.argmax(dim=1).view(n, b)
    if criterion == "correctness":
        ok = pred_t == target.view(1, b)
        complementary = ok != ok[:1]
    else:
        complementary = pred_t != pred_t[:1]
    # Consistent regions weigh consistent_weight, except the global region 0 (always 1).
    consistent = torch.full((n, 1), float(consistent_weight), dtype=per.dtype, device=per.device)
    consistent[0] = 1.0
    weights = torch.where(complementary, float(beta), consistent)
    weights = weights.to(per.dtype).reshape(n * b)
    total = (weights * per).sum()
    return total / (n * b) if reduction == "mean" else total / b
