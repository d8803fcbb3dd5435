"""Logit distillers: ``vanilla`` (CE only), ``kd``, ``dkd``, ``nkd`` and ``dckd``.

Each owns the cross-entropy term and returns ``{"ce": ce_weight * CE, "<name>": ...}`` with
every term already weighted (warm-ups included). Losses are computed in float32 (the loss
functions cast their inputs). Defaults are the kdlab methods spec's CIFAR-100 values.

Two switches shared by every distiller with a temperature (kd, dkd, nkd, dckd and the SDD ones):

* ``logit_standardization`` (:class:`LogitStandardizationParams`; Sun et al., CVPR 2024): the
  distillation loss sees the z-scores of the student's and the teacher's logits
  (:func:`kdlab.losses.standardize.standardize_logits`); the CE term keeps the raw logits. See
  ``docs/methods/logit-standardization.md``.
* ``learned_temperature`` (:class:`kdlab.methods.ctkd.LearnedTemperatureParams`; CTKD, Li et
  al., AAAI 2023): the fixed ``temperature`` is replaced by a learned one. See
  ``docs/methods/ctkd.md``.
"""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

import torch.nn.functional as F
from pydantic import AliasChoices, Field
from torch import Tensor

from kdlab.losses._common import Temperature, to_float
from kdlab.losses.dckd import dckd_loss
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss
from kdlab.losses.standardize import standardize_logits
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams, warmup_factor
from kdlab.methods.ctkd import CurriculumTemperature, LearnedTemperatureParams
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = [
    "DCKD",
    "DCKDParams",
    "DKD",
    "DKDParams",
    "KD",
    "KDParams",
    "LogitDistiller",
    "LogitStandardizationParams",
    "NKD",
    "NKDParams",
    "Vanilla",
    "VanillaParams",
    "ce_term",
    "standardize_if",
]


def ce_term(out_s: ModelOutput, batch: Batch, weight: float) -> Tensor:
    """``weight * CE(z_s, y)``, batch mean, in float32."""
    return weight * F.cross_entropy(out_s.logits.float(), batch.labels)


class LogitStandardizationParams(MethodParams):
    """Mixin of the logit methods' parameters: the logit standardization switch.

    Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024. The
    official code's per-method rules (KD: ``T = 2``, kd weight 9, CE 0.1; DKD: ``T = 2``, alpha
    and beta times the kd weight, CE 1) are config values, not implied by the switch (see
    ``docs/methods/logit-standardization.md``).
    """

    logit_standardization: bool = Field(
        False,
        description="z-score every student and teacher logit vector over the classes before the "
        "distillation loss (LS, CVPR 2024); the CE term keeps the raw logits",
    )


def standardize_if(logits: Tensor, enabled: bool, dim: int = 1) -> Tensor:
    """``standardize_logits(logits, dim)`` computed in float32 (at least) when ``enabled``;
    ``logits`` unchanged otherwise.

    ``Z(z) = (z - mean_c z) / (1e-7 + std_c z)`` with the unbiased std, the official ``normalize``
    (Sun et al., CVPR 2024). ``dim`` is the class dimension (1 for ``B x K`` logits and for SDD's
    ``B x K x N`` local logits). Under autocast the logits are cast to float32 first, so the
    standardization is not computed in bf16/fp16.
    """
    return standardize_logits(to_float(logits), dim=dim) if enabled else logits


class VanillaParams(MethodParams):
    """Plain training: ``ce_weight * CE``."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")


class KDParams(LogitStandardizationParams, LearnedTemperatureParams):
    """KD (Hinton et al., 2015). CIFAR defaults: T=4, ce 0.1, kd 0.9 (ImageNet: T=1, 0.5, 0.5).

    With the LS and CTKD switches (off by default).
    """

    ce_weight: float = Field(0.1, ge=0, description="weight of the cross-entropy term")
    kd_weight: float = Field(0.9, ge=0, description="weight of the KD term")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")


class DKDParams(LogitStandardizationParams, LearnedTemperatureParams):
    """DKD (Zhao et al., CVPR 2022). CIFAR defaults: alpha 1, beta 8, T 4, warmup_epochs 20, ce 1.

    ``warmup_epochs`` is also accepted under its former key ``warmup`` (old configs). With the LS
    and CTKD switches (off by default).
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


class NKDParams(LogitStandardizationParams, LearnedTemperatureParams):
    """NKD (Yang et al., ICCV 2023). Defaults: T 1, gamma 1.5, warmup_epochs 20, ce 1, correct NKD.

    ``warmup_epochs`` is also accepted under its former key ``warmup`` (old configs). With the LS
    and CTKD switches (off by default; a learned temperature replaces the non-target term's T).
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


#: The parameter class of a :class:`LogitDistiller`.
LP = TypeVar("LP", bound=MethodParams)


class LogitDistiller(Distiller[LP], Generic[LP]):
    """A distiller with a temperature: the LS switch and CTKD's learned temperature, once.

    Its parameters may define ``logit_standardization`` (:class:`LogitStandardizationParams`)
    and ``learned_temperature`` (:class:`~kdlab.methods.ctkd.LearnedTemperatureParams`) besides
    ``temperature``. When ``learned_temperature`` is set, the distiller owns a
    :class:`~kdlab.methods.ctkd.CurriculumTemperature` (``self.learned_temperature``), trained by
    the optimizer with the student and saved in the checkpoint; otherwise it has no parameters.
    """

    def __init__(self, params: LP, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        block = getattr(params, "learned_temperature", None)
        self.learned_temperature: CurriculumTemperature | None = (
            None if block is None else CurriculumTemperature(block)
        )

    def temperature(self, epoch: int) -> Temperature:
        """The fixed ``temperature`` (a float), or the learned one of ``epoch`` (a 0-dim tensor
        carrying the gradient to CTKD's ``theta``)."""
        if self.learned_temperature is None:
            fixed: float = getattr(self.params, "temperature")  # noqa: B009
            return fixed
        return self.learned_temperature(epoch)

    def standardized(self, logits: Tensor, dim: int = 1) -> Tensor:
        """``logits`` standardized when ``logit_standardization`` is on (see
        :func:`standardize_if`), else unchanged."""
        return standardize_if(logits, bool(getattr(self.params, "logit_standardization", False)),
                              dim)

    def epoch_metrics(self) -> dict[str, float]:
        """The learned ``temperature`` (and the GRL's ``ctkd_lambda``) when CTKD is on."""
        if self.learned_temperature is None:
            return {}
        return self.learned_temperature.epoch_metrics()


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
class KD(LogitDistiller[KDParams]):
    """KD: ``L = ce_weight * CE + kd_weight * T^2 * KL(p_t || p_s)``.

    Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015.
    With ``logit_standardization`` the KL term reads ``Z(z)`` (Sun et al., CVPR 2024); with
    ``learned_temperature`` ``T`` is CTKD's (Li et al., AAAI 2023).
    """

    name = "kd"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "kd": kd_weight * L_KD}`` (no warm-up)."""
        p = self.params
        zs, zt = self.standardized(out_s.logits), self.standardized(out_t.logits)
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "kd": p.kd_weight * kd_loss(zs, zt, self.temperature(epoch)),
        }


@register_method
class DKD(LogitDistiller[DKDParams]):
    """DKD: ``L = ce_weight * CE + min(epoch / warmup_epochs, 1) * (alpha * TCKD + beta * NCKD)``.

    Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022. With
    ``logit_standardization`` both logit vectors are standardized before the target/non-target
    split, as the official LS code does; with ``learned_temperature`` ``T`` is CTKD's.
    """

    name = "dkd"
    kind = "logit"

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "dkd": warmup_factor * L_DKD}``."""
        p = self.params
        zs, zt = self.standardized(out_s.logits), self.standardized(out_t.logits)
        loss = dkd_loss(zs, zt, batch.labels, p.alpha, p.beta, self.temperature(epoch))
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "dkd": warmup_factor(epoch, p.warmup_epochs) * loss,
        }


@register_method
class NKD(LogitDistiller[NKDParams]):
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
        zs, zt = self.standardized(out_s.logits), self.standardized(out_t.logits)
        loss = nkd_loss(zs, zt, batch.labels, self.temperature(epoch), p.gamma, legacy=p.legacy)
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "nkd": warmup_factor(epoch, p.warmup_epochs) * loss,
        }


@register_method
class DCKD(LogitDistiller[DCKDParams]):
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
            self.standardized(out_s.logits),
            self.standardized(out_t.logits),
            batch.labels,
            p.alpha,
            p.beta,
            self.temperature(epoch),
            target_rule=p.target_rule,
            nontarget_source=p.nontarget_source,
        )
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "dckd": warmup_factor(epoch, p.warmup_epochs) * loss,
        }
