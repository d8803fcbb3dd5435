"""Feature- and relation-based partner distillers: FitNet, AT, RKD, SP, PKT.

Partners return only their own term, already multiplied by ``weight`` (lambda_f); the logit
method (``vanilla`` for the published baselines) owns cross-entropy. Default weights are the
CIFAR-100 values of RepDistiller (Tian et al., ICLR 2020) and mdistiller, where CE weight is 1.0.
See ``docs/methods/partners.md`` for the equations, defaults and the features each one uses, and
``docs/methods/heterogeneous.md`` for pairs where one or both models are vision transformers
(``KdModel.token_grid``): which stages are matched, how the grids are resized, what is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.losses.feature import (
    at_loss,
    fitnet_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    sp_loss,
)
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = [
    "AT",
    "PKT",
    "RKD",
    "SP",
    "ConvRegressor",
    "FitNet",
    "GridRegressor",
    "is_token_grid",
    "pooled_embedding",
    "relative_stage",
    "resize_to_grid",
    "stage_pairs",
]


def pooled_embedding(out: ModelOutput) -> Tensor:
    """The pooled ``B x C`` vector fed to the classifier (global-average of ``feature_map`` when a
    model does not expose ``embedding``)."""
    if out.embedding is not None:
        return out.embedding.flatten(1)
    return F.adaptive_avg_pool2d(out.feature_map, 1).flatten(1)


def is_token_grid(model: nn.Module | None) -> bool:
    """Whether ``model``'s ``features`` are a transformer's patch tokens laid out as grids
    (:attr:`kdlab.models.output.KdModel.token_grid`); False for CNNs and for no model."""
    return bool(getattr(model, "token_grid", False))


def relative_stage(index: int, n_from: int, n_to: int) -> int:
    """The stage of a model with ``n_to`` stages at the relative depth of stage ``index`` of a
    model with ``n_from`` stages: ``floor(index * n_to / n_from + 1/2)``, TinyBERT's "uniform"
    layer mapping ``m * N / M`` (Jiao et al., Findings of EMNLP 2020) rounded half up where the
    ratio is not an integer. Stage 0 (the stem or patch embedding) maps to 0 and the last stage
    to the last.

    Raises:
        ValueError: ``n_from < 1`` or ``index`` outside ``0..n_from``.
    """
    if n_from < 1 or not 0 <= index <= n_from:
        raise ValueError(f"relative_stage: stage {index} of a model with {n_from} stages")
    return (2 * index * n_to + n_from) // (2 * n_from)


def stage_pairs(n_s: int, n_t: int) -> list[tuple[int, int]]:
    """``(student stage, teacher stage)`` pairs (1-based, shallow to deep) by relative depth:
    every stage of the model with fewer stages, each with the other model's stage at the same
    relative depth (:func:`relative_stage`); equal counts pair stage ``i`` with stage ``i``."""
    if n_s <= n_t:
        return [(i, relative_stage(i, n_s, n_t)) for i in range(1, n_s + 1)]
    return [(relative_stage(j, n_t, n_s), j) for j in range(1, n_t + 1)]


def resize_to_grid(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """``x`` (``B x C x H x W``) at spatial ``size``: adaptive average pooling when ``x`` is at
    least as large on both sides (each output cell the mean of the region it covers, as a patch
    token summarises its patch), bilinear interpolation (``align_corners=False``) otherwise;
    ``x`` itself when the size already matches."""
    size = (int(size[0]), int(size[1]))
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == size:
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _stages(out: ModelOutput, who: str, method: str) -> list[Tensor]:
    """The stage outputs ``features[1:]`` (the stem excluded), checked to be 4-D maps."""
    stages = list(out.features[1:])
    if not stages:
        raise MethodError(
            f"{method}: the {who} model exposes no stage features (ModelOutput.features needs "
            "the stem followed by one map per stage); use a model from the kdlab zoo or an "
            "adapter that fills `features`"
        )
    for f in stages:
        if f.dim() != 4:
            raise MethodError(
                f"{method}: {who} stage features must be B x C x H x W maps, got shape "
                f"{tuple(f.shape)}"
            )
    return stages


class ConvRegressor(nn.Module):
    """FitNet's convolutional regressor from the student hint to the teacher hint's shape.

    Follows RepDistiller's ``ConvReg`` (conv -> BN -> optional ReLU); the convolution depends on
    the spatial sizes ``(H_s, W_s)`` and ``(H_t, W_t)``:

    * ``H_s = 2 H_t``: 3x3 convolution, stride 2, padding 1;
    * ``2 H_s = H_t``: 4x4 transposed convolution, stride 2, padding 1;
    * ``H_s >= H_t`` and ``W_s >= W_t`` otherwise (equal sizes included): a "valid" convolution
      of kernel ``(1 + H_s - H_t) x (1 + W_s - W_t)`` (1x1 for equal sizes);
    * any other smaller student map (a kdlab extension; RepDistiller raises): nearest
      upsampling to the teacher size, then a 3x3 convolution with padding 1.
    """

    def __init__(
        self,
        s_shape: tuple[int, ...] | torch.Size,
        t_shape: tuple[int, ...] | torch.Size,
        use_relu: bool = True,
    ) -> None:
        super().__init__()
        _, s_c, s_h, s_w = (int(v) for v in s_shape)
        _, t_c, t_h, t_w = (int(v) for v in t_shape)
        self.out_size = (t_h, t_w)
        self.upsample = False
        conv: nn.Module
        if (s_h, s_w) == (2 * t_h, 2 * t_w):
            conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif (2 * s_h, 2 * s_w) == (t_h, t_w):
            conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h and s_w >= t_w:
            conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            self.upsample = True
            conv = nn.Conv2d(s_c, t_c, kernel_size=3, padding=1)
        self.conv = conv
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        if self.upsample:
            x = F.interpolate(x, size=self.out_size, mode="nearest")
        x = self.bn(self.conv(x.to(self.conv.weight.dtype)))
        return F.relu(x) if self.use_relu else x


# ---------------------------------------------------------------------------------------------


class GridRegressor(nn.Module):
    """FitNet's regressor when either model is a ViT token grid (``KdModel.token_grid``).

    The student hint is resized to the teacher hint's grid with :func:`resize_to_grid`
    (adaptive average pooling when it is larger, bilinear interpolation when it is smaller),
    then mapped by a 1x1 convolution (a per-token linear map of the channels) -> BN -> optional
    ReLU. Unlike :class:`ConvRegressor` no kernel grows with the size ratio (a CNN's 32x32 stage
    against an 8x8 token grid would need a 25x25 "valid" kernel there).
    """

    def __init__(
        self,
        s_shape: tuple[int, ...] | torch.Size,
        t_shape: tuple[int, ...] | torch.Size,
        use_relu: bool,
    ) -> None:
        super().__init__()
        _, s_c, _, _ = (int(v) for v in s_shape)
        _, t_c, t_h, t_w = (int(v) for v in t_shape)
        self.out_size = (t_h, t_w)
        self.conv = nn.Conv2d(s_c, t_c, kernel_size=1)
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: Tensor) -> Tensor:
        x = resize_to_grid(x.to(self.conv.weight.dtype), self.out_size)
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


# ---------------------------------------------------------------------------------------------


class FitNetParams(MethodParams):
    """FitNet: ``weight * MSE(r(F_s^hint), F_t^hint)``."""

    weight: float = Field(100.0, ge=0, description="lambda_f (RepDistiller beta=100)")
    hint_layer: int = Field(
        2, ge=0, description="the student's index into ModelOutput.features (0 = stem, 2 = stage 2)"
    )
    teacher_hint_layer: int | None = Field(
        None,
        ge=0,
        description="the teacher's index into ModelOutput.features; null: hint_layer for two "
        "CNNs (RepDistiller), the stage at the same relative depth when either model is a ViT "
        "(docs/methods/heterogeneous.md)",
    )
    regressor_relu: bool | None = Field(
        None,
        description="ReLU after the regressor's BN; null: on for a CNN teacher (RepDistiller "
        "ConvReg), off for a ViT teacher, whose token features are signed",
    )


@register_method
class FitNet(Distiller[FitNetParams]):
    """FitNets (Romero et al., ICLR 2015), single-stage as in RepDistiller/mdistiller: the hint
    loss between the student's ``features[hint_layer]`` through a trainable regressor and the
    teacher's ``features[teacher_hint_layer]``.

    Two CNNs (RepDistiller's setting): the teacher's hint has the same index and the regressor
    is a :class:`ConvRegressor`. When either model is a ViT token grid (``KdModel.token_grid``;
    docs/methods/heterogeneous.md): the teacher's hint is the stage at the student hint's
    relative depth (:func:`relative_stage`, stages counted without the stem / patch embedding)
    unless ``teacher_hint_layer`` is set, and the regressor is a :class:`GridRegressor`. The ReLU
    after the regressor is on for a CNN teacher (post-ReLU hints) and off for a ViT teacher
    (signed residual-stream tokens), unless ``regressor_relu`` is set.

    Raises:
        MethodError: a hint index beyond either model's features, or hints that are not
            ``B x C x H x W`` maps.
    """

    name = "fitnet"
    kind = "partner"

    def __init__(self, params: FitNetParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        p = self.params
        fs, ft = ctx.student_probe.features, ctx.require_teacher_probe(self.name).features
        self.grid_pair = is_token_grid(ctx.student) or is_token_grid(ctx.teacher)
        self.teacher_hint_layer = self._teacher_hint(len(fs), len(ft))
        f_s, f_t = fs[p.hint_layer], ft[self.teacher_hint_layer]
        if f_s.dim() != 4 or f_t.dim() != 4:
            raise MethodError(
                f"fitnet: the student's features[{p.hint_layer}] and the teacher's "
                f"features[{self.teacher_hint_layer}] must be B x C x H x W maps"
            )
        relu = not is_token_grid(ctx.teacher) if p.regressor_relu is None else p.regressor_relu
        regressor = GridRegressor if self.grid_pair else ConvRegressor
        self.regressor = regressor(f_s.shape, f_t.shape, use_relu=relu)

    def _teacher_hint(self, n_s: int, n_t: int) -> int:
        """The teacher's hint index for models with ``n_s`` and ``n_t`` features (stem
        included); :class:`MethodError` when either index does not exist."""
        p = self.params
        h = p.hint_layer
        if p.teacher_hint_layer is not None:
            t = p.teacher_hint_layer
        elif self.grid_pair and min(n_s, n_t) >= 2 and h < n_s:
            t = relative_stage(h, n_s - 1, n_t - 1)
        else:
            t = h
        if h < n_s and t < n_t:
            return t
        key = "hint_layer" if p.teacher_hint_layer is None else "teacher_hint_layer"
        raise MethodError(
            f"fitnet: hint_layer={h} (teacher: features[{t}]) but the student has {n_s} and the "
            f"teacher {n_t} features (stem + stages); choose hint_layer <= {n_s - 1} and "
            f"{key} <= {n_t - 1}"
        )

    def describe(self) -> dict[str, Any]:
        """The name, the parameters and what they resolved to for these models."""
        return {**super().describe(), "resolved": {
            "hint_layer": self.params.hint_layer,
            "teacher_hint_layer": self.teacher_hint_layer,
            "regressor": type(self.regressor).__name__,
            "regressor_relu": bool(self.regressor.use_relu),
        }}

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        hint = self.regressor(out_s.features[p.hint_layer])
        loss = fitnet_loss(hint, out_t.features[self.teacher_hint_layer])
        return {"fitnet": p.weight * loss}


# ---------------------------------------------------------------------------------------------


class ATParams(MethodParams):
    """AT: ``weight * sum_j mean (Q_s^j - Q_t^j)^2`` over the stage outputs."""

    weight: float = Field(1000.0, ge=0, description="lambda_f (beta=1000 in AT and RepDistiller)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map mean_c |A_c|^p")
    cross_architecture: bool = Field(
        False,
        description="allow a CNN with a ViT (refused by default: nothing trainable bridges their "
        "activation-energy maps); stages are then paired by relative depth "
        "(docs/methods/heterogeneous.md)",
    )


def _family(model: nn.Module | None) -> str:
    return "ViT (token grid)" if is_token_grid(model) else "CNN"


@register_method
class AT(Distiller[ATParams]):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on the stage outputs
    ``features[1:]`` (RepDistiller's ``feat[1:-1]``: stem and pooled vector excluded).

    Two CNNs: stages are paired from the first one (``zip``, as RepDistiller); when the two
    models have different stage counts the deepest stages of the longer one are left out. When
    either model is a ViT token grid: every stage of the model with fewer stages is paired with
    the other model's stage at the same relative depth (:func:`stage_pairs`). In both cases a
    pair of different grids is compared after adaptive-average-pooling the larger map to the
    smaller one (:func:`~kdlab.losses.feature.at_loss`).

    Raises:
        MethodError: a model without stage features; a CNN paired with a ViT unless
            ``cross_architecture`` (docs/methods/heterogeneous.md gives the reasons).
    """

    name = "at"
    kind = "partner"

    def __init__(self, params: ATParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        s = _stages(ctx.student_probe, "student", self.name)
        t = _stages(ctx.require_teacher_probe(self.name), "teacher", self.name)
        token_s, token_t = is_token_grid(ctx.student), is_token_grid(ctx.teacher)
        if token_s != token_t and not self.params.cross_architecture:
            raise MethodError(
                f"at: a {_family(ctx.student)} student with a {_family(ctx.teacher)} teacher: "
                "attention transfer equates raw activation-energy maps of different kinds with "
                "nothing trainable between them; use fitnet (projected hint), rkd, pkt, sp or "
                "crd, or set cross_architecture: true to pair stages by relative depth anyway"
            )
        if token_s or token_t:
            self.pairs = stage_pairs(len(s), len(t))
        else:
            self.pairs = [(i, i) for i in range(1, min(len(s), len(t)) + 1)]

    def describe(self) -> dict[str, Any]:
        """The name, the parameters and the ``(student, teacher)`` feature indices paired."""
        return {**super().describe(), "resolved": {"pairs": [list(p) for p in self.pairs]}}

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        feats_s = [out_s.features[i] for i, _ in self.pairs]
        feats_t = [out_t.features[j] for _, j in self.pairs]
        return {"at": p.weight * at_loss(feats_s, feats_t, p=p.p)}


# ---------------------------------------------------------------------------------------------


class RKDParams(MethodParams):
    """RKD: ``weight * (distance_weight * L_D + angle_weight * L_A)`` on the pooled embedding."""

    weight: float = Field(1.0, ge=0, description="lambda_f multiplying both RKD terms")
    distance_weight: float = Field(25.0, ge=0, description="lambda_D (paper and RepDistiller: 25)")
    angle_weight: float = Field(50.0, ge=0, description="lambda_A (paper and RepDistiller: 50)")
    eps: float = Field(1e-12, gt=0, description="clamp of squared distances before the sqrt")


@register_method
class RKD(Distiller[RKDParams]):
    """Relational KD (Park et al., CVPR 2019), distance + angle, on the pooled embeddings.

    Returns two terms, ``rkd_distance`` and ``rkd_angle``, each already weighted.
    """

    name = "rkd"
    kind = "partner"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        e_s, e_t = pooled_embedding(out_s), pooled_embedding(out_t)
        return {
            "rkd_distance": p.weight * p.distance_weight * rkd_distance_loss(e_s, e_t, p.eps),
            "rkd_angle": p.weight * p.angle_weight * rkd_angle_loss(e_s, e_t),
        }


# ---------------------------------------------------------------------------------------------


class SPParams(MethodParams):
    """SP: ``weight * ||G_t - G_s||_F^2 / B^2`` on the last stage output."""

    weight: float = Field(3000.0, ge=0, description="gamma (SP paper and RepDistiller: 3000)")


@register_method
class SP(Distiller[SPParams]):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019) on the LAST stage output
    ``features[-1]`` (RepDistiller's ``feat[-2]``, mdistiller's ``feats[-1]``): the output of the
    last residual group, which is ``feature_map`` for ResNet/WRN but precedes the final 1x1
    convolution for MobileNetV2."""

    name = "sp"
    kind = "partner"

    def __init__(self, params: SPParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        _stages(ctx.student_probe, "student", self.name)
        _stages(ctx.require_teacher_probe(self.name), "teacher", self.name)

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        return {"sp": p.weight * sp_loss(out_s.features[-1], out_t.features[-1])}


# ---------------------------------------------------------------------------------------------


class PKTParams(MethodParams):
    """PKT: ``weight * mean_ij P^t_ij log(P^t_ij / P^s_ij)`` on the pooled embedding."""

    weight: float = Field(30000.0, ge=0, description="lambda_f (RepDistiller/mdistiller: 30000)")
    eps: float = Field(1e-7, gt=0, description="guard of the norms and logarithms")


@register_method
class PKT(Distiller[PKTParams]):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) on the pooled embeddings,
    with the cosine kernel of the authors' code."""

    name = "pkt"
    kind = "partner"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        loss = pkt_loss(pooled_embedding(out_s), pooled_embedding(out_t), eps=p.eps)
        return {"pkt": p.weight * loss}
