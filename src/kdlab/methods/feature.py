"""Feature- and relation-based partner distillers: FitNet, AT, RKD, SP, PKT.

Partners return only their own term, already multiplied by ``weight`` (lambda_f); the logit
method (``vanilla`` for the published baselines) owns cross-entropy. Default weights are the
CIFAR-100 values of RepDistiller (Tian et al., ICLR 2020) and mdistiller, where CE weight is 1.0.
See ``docs/methods/partners.md`` for the equations, defaults and the features each one uses.
"""

from __future__ import annotations

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

__all__ = ["AT", "PKT", "RKD", "SP", "ConvRegressor", "FitNet", "pooled_embedding"]


def pooled_embedding(out: ModelOutput) -> Tensor:
    """The pooled ``B x C`` vector fed to the classifier (global-average of ``feature_map`` when a
    model does not expose ``embedding``)."""
    if out.embedding is not None:
        return out.embedding.flatten(1)
    return F.adaptive_avg_pool2d(out.feature_map, 1).flatten(1)


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


class FitNetParams(MethodParams):
    """FitNet: ``weight * MSE(r(F_s^hint), F_t^hint)``."""

    weight: float = Field(100.0, ge=0, description="lambda_f (RepDistiller beta=100)")
    hint_layer: int = Field(
        2, ge=0, description="index into ModelOutput.features (0 = stem, 2 = stage 2)"
    )
    regressor_relu: bool = Field(
        True, description="ReLU after the regressor's BN (RepDistiller ConvReg default)"
    )


@register_method
class FitNet(Distiller[FitNetParams]):
    """FitNets (Romero et al., ICLR 2015), single-stage as in RepDistiller/mdistiller: the hint
    loss on ``features[hint_layer]`` through a trainable :class:`ConvRegressor`."""

    name = "fitnet"
    kind = "partner"

    def __init__(self, params: FitNetParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        p = self.params
        fs, ft = ctx.student_probe.features, ctx.require_teacher_probe(self.name).features
        h = p.hint_layer
        if h >= len(fs) or h >= len(ft):
            raise MethodError(
                f"fitnet: hint_layer={h} but the student has {len(fs)} and the teacher "
                f"{len(ft)} features (stem + stages); choose hint_layer <= "
                f"{min(len(fs), len(ft)) - 1}"
            )
        if fs[h].dim() != 4 or ft[h].dim() != 4:
            raise MethodError(f"fitnet: features[{h}] must be B x C x H x W maps")
        self.regressor = ConvRegressor(fs[h].shape, ft[h].shape, use_relu=p.regressor_relu)

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        h = p.hint_layer
        loss = fitnet_loss(self.regressor(out_s.features[h]), out_t.features[h])
        return {"fitnet": p.weight * loss}


# ---------------------------------------------------------------------------------------------


class ATParams(MethodParams):
    """AT: ``weight * sum_j mean (Q_s^j - Q_t^j)^2`` over the stage outputs."""

    weight: float = Field(1000.0, ge=0, description="lambda_f (beta=1000 in AT and RepDistiller)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map mean_c |A_c|^p")


@register_method
class AT(Distiller[ATParams]):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) on every stage output
    ``features[1:]`` (RepDistiller's ``feat[1:-1]``: stem and pooled vector excluded).

    Stages are paired from the first one (``zip``, as RepDistiller); when the two models have
    different stage counts the deepest stages of the longer one are left out.
    """

    name = "at"
    kind = "partner"

    def __init__(self, params: ATParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        s = _stages(ctx.student_probe, "student", self.name)
        t = _stages(ctx.require_teacher_probe(self.name), "teacher", self.name)
        self.num_pairs = min(len(s), len(t))

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        n = self.num_pairs
        loss = at_loss(out_s.features[1 : 1 + n], out_t.features[1 : 1 + n], p=p.p)
        return {"at": p.weight * loss}


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
