"""Logit distillers: ``vanilla`` (CE only), ``kd``, ``dkd``, ``nkd`` and ``dckd``.

Each owns the cross-entropy term and returns ``{"ce": ce_weight * CE, "<name>": ...}`` with
every term already weighted (warm-ups included). Losses are computed in float32 (the loss
functions cast their inputs). Defaults are the kdlab methods spec's CIFAR-100 values.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import AliasChoices, Field
from torch import Tensor

from kdlab.losses.dckd import dckd_loss
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss
from kdlab.methods.base import Batch, Distiller, MethodParams, warmup_factor
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = [
    "DCKD",
    "DCKDParams",
    "DKD",
    "DKDParams",
    "KD",
    "KDParams",
    "NKD",
    "NKDParams",
    "Vanilla",
    "VanillaParams",
    "ce_term",
]


def ce_term(out_s: ModelOutput, batch: Batch, weight: float) -> Tensor:
    """``weight * CE(z_s, y)``, batch mean, in float32."""
    return weight * F.cross_entropy(out_s.logits.float(), batch.labels)


class VanillaParams(MethodParams):
    """Plain training: ``ce_weight * CE``."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")


class KDParams(MethodParams):
    """KD (Hinton et al., 2015). CIFAR defaults: T=4, ce 0.1, kd 0.9 (ImageNet: T=1, 0.5, 0.5)."""

    ce_weight: float = Field(0.1, ge=0, description="weight of the cross-entropy term")
    kd_weight: float = Field(0.9, ge=0, description="weight of the KD term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")


class DKDParams(MethodParams):
    """DKD (Zhao et al., CVPR 2022). CIFAR defaults: alpha 1, beta 8, T 4, warmup_epochs 20, ce 1.

    ``warmup_epochs`` is also accepted under its former key ``warmup`` (old configs).
    """

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    alpha: float = Field(1.0, ge=0, description="weight of TCKD (target class term)")
    beta: float = Field(8.0, ge=0, description="weight of NCKD (non-target class term)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    warmup_epochs: int = Field(
        20,
        ge=0,
        validation_alias=AliasChoices("warmup_epochs", "warmup"),
        description="epochs of linear loss warm-up (0: none); former key: warmup",
    )


class NKDParams(MethodParams):
    """NKD (Yang et al., ICCV 2023). Defaults: T 1, gamma 1.5, warmup_epochs 20, ce 1, correct NKD.

    ``warmup_epochs`` is also accepted under its former key ``warmup`` (old configs).
    """

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    temperature: float = Field(1.0, gt=0, description="temperature T of the non-target term")
    gamma: float = Field(1.5, ge=0, description="weight of the non-target term")
    legacy: bool = Field(
        False,
        description="SDD official code's variant whose non-target sum includes the target class",
    )
    warmup_epochs: int = Field(
        20,
        ge=0,
        validation_alias=AliasChoices("warmup_epochs", "warmup"),
        description="epochs of linear loss warm-up (0: none); former key: warmup",
    )


class DCKDParams(DKDParams):
    """DCKD (kdlab's reconstruction, see ``docs/methods/dckd.md``): DKD's defaults plus rules."""

    target_rule: Literal["max", "correct", "teacher"] = Field(
        "max", description="how the target component's reference probability m is formed"
    )
    nontarget_source: Literal["teacher", "student"] = Field(
        "teacher", description="reference of the non-target component"
    )


@register_method
class Vanilla(Distiller[VanillaParams]):
    """No distillation: ``L = ce_weight * CE(z_s, y)``. Needs no teacher."""

    name = "vanilla"
    kind = "logit"
    uses_teacher = False

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput | None, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ce_weight * CE}``."""
        return {"ce": ce_term(out_s, batch, self.params.ce_weight)}


@register_method
class KD(Distiller[KDParams]):
    """KD: ``L = ce_weight * CE + kd_weight * T^2 * KL(p_t || p_s)``.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015.
    """

    name = "kd"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "kd": kd_weight * L_KD}`` (no warm-up)."""
        p = self.params
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "kd": p.kd_weight * kd_loss(out_s.logits, out_t.logits, p.temperature),
        }


@register_method
class DKD(Distiller[DKDParams]):
    """DKD: ``L = ce_weight * CE + min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD)``.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022.
    """

    name = "dkd"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "dkd": warmup_factor * L_DKD}``."""
        p = self.params
        loss = dkd_loss(out_s.logits, out_t.logits, batch.labels, p.alpha, p.beta, p.temperature)
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "dkd": warmup_factor(epoch, p.warmup_epochs) * loss,
        }


@register_method
class NKD(Distiller[NKDParams]):
    """NKD: ``L = ce_weight * CE + min(epoch / warmup_epochs, 1) * L_NKD``.

    Yang, Zeng, Li, Zhang, Yuan, Li, "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023.
    """

    name = "nkd"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "nkd": warmup_factor * L_NKD}``."""
        p = self.params
        loss = nkd_loss(
            out_s.logits, out_t.logits, batch.labels, p.temperature, p.gamma, legacy=p.legacy
        )
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "nkd": warmup_factor(epoch, p.warmup_epochs) * loss,
        }


@register_method
class DCKD(Distiller[DCKDParams]):
    """DCKD (kdlab's reconstruction from the abstract; the paper's equations were not available).

    ``L = ce_weight * CE + min(epoch / warmup_epochs, 1) * T^2 * (alpha KL(b* || b_s) +
    beta KL(q_src || q_s))``; see :func:`kdlab.losses.dckd.dckd_loss`. Wang, Dong, Zhu, Li,
    "Decoupled Classifier Knowledge Distillation", PLOS ONE 2025. Meant to be merged with a
    feature/relation partner (``method.partners``).
    """

    name = "dckd"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "dckd": warmup_factor * L_DCKD}``."""
        p = self.params
        loss = dckd_loss(
            out_s.logits,
            out_t.logits,
            batch.labels,
            p.alpha,
            p.beta,
            p.temperature,
            target_rule=p.target_rule,
            nontarget_source=p.nontarget_source,
        )
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "dckd": warmup_factor(epoch, p.warmup_epochs) * loss,
        }
