"""SDD distillers: ``sd_kd``, ``sd_dkd`` and ``sd_nkd`` (Wei, Luo, Luo, CVPR 2024).

Each computes local logits ``B x K x N`` with :func:`kdlab.losses.sdd.multiscale_logits` from the
student's final feature map and the student's own classifier (with gradients) and from the
teacher's map and classifier (under ``torch.no_grad()``), then :func:`kdlab.losses.sdd.sdd_loss`
with its base loss. The models are used through ``self.ctx`` and never registered as submodules.

Scales larger than a feature map: a scale ``m`` is accepted on an ``H x W`` map when, along each
side, ``m <= H`` or ``m`` is a multiple of ``H`` (adaptive pooling then repeats each location
exactly, e.g. the MobileNetV2 student's 2x2 CIFAR map under the 4x4 grid, as in the official
code); otherwise the distiller raises :class:`~kdlab.core.errors.MethodError` when it is built,
naming the model whose map is too small. A 1x1 map (H = W = 1, e.g. a torchvision-style ResNet
on tiny inputs) is refused too when a scale above 1 is asked for: every region would be a copy of
the global one, so SD-X would silently be X. See ``docs/methods/sdd.md``.

Defaults: ``scales = [1, 2, 4]`` (the spec's M for different architectures, most table pairs;
configs set ``[1, 2]`` for resnet32x4->resnet8x4, vgg13->vgg8 and ImageNet R34->R18), nested
pooling, ``sdd_beta = 2``, ``consistent_weight = 1`` (an ablation switch for the paper's Table 6),
correctness criterion, mean reduction (all code-faithful). The
official trainer's gradient-norm clip at 40 is exposed as ``default_clip_grad_norm``.

Detection (the task's ``region_logits``, docs/methods/sdd-detection.md): by default the local
regions of the foreground RoIs only (``detection_region_rois: foreground``), every other RoI
getting the base loss on its own logits at a whole RoI's weight, so a batch without foreground
RoIs gets exactly the base loss; ``detection_region_fraction`` below 1 distils a uniform random
subset of that pool with the unbiased estimate ``w L_S + c w (L_base(P) - L_base(S)) + c N
(L_base(all) - w L_base(P))``. Issue 26: 1.10x DKD's step (every RoI: 1.95x) and 2.6 AP more than
every RoI's regions over 3 seeds. The interleaved layout always uses every RoI.

The base methods' switches apply per region: ``logit_standardization`` z-scores every global and
local logit vector of both models over the classes before the per-region loss (kdlab's
composition of LS, Sun et al., CVPR 2024, with SDD; no source reports it), and
``learned_temperature`` (CTKD, Li et al., AAAI 2023) gives every region the same learned ``T``.
The consistent/complementary weights are unchanged by LS: they come from the teacher's argmax,
which a z-score keeps.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from pydantic import Field, PositiveInt, field_validator
from torch import Tensor

from kdlab.core.errors import MethodError
from kdlab.losses._common import Temperature
from kdlab.losses.sdd import multiscale_logits, sdd_loss, sdd_pooling_grids
from kdlab.methods.base import Batch, DistillContext, MethodParams, warmup_factor
from kdlab.methods.logit import DKDParams, KDParams, LogitDistiller, NKDParams, ce_term
from kdlab.methods.registry import register_method
from kdlab.models.output import KdModel, ModelOutput

__all__ = ["SDDKD", "SDDKDParams", "SDDDKD", "SDDDKDParams", "SDDNKD",
           "SDDNKDParams", "SDDParams"]


class SDDParams(MethodParams):
    """SDD's own hyperparameters (shared by sd_kd, sd_dkd, sd_nkd)."""

    scales: list[PositiveInt] = Field(
        default_factory=lambda: [1, 2, 4],
        description="pooling grid sizes M; must include 1 (the global region)",
    )
    pooling: Literal["nested", "direct"] = Field(
        "nested", description="nested: official code (grids pooled from one grid); direct"
    )
    nested_grid: PositiveInt | None = Field(
        None,
        description="intermediate grid of nested pooling (None: the largest scale; 4: official "
        "code exactly, which matters for M=[1,2] on maps whose side is not a multiple of 4)",
    )
    sdd_beta: float = Field(2.0, ge=0, description="weight of complementary regions")
    consistent_weight: float = Field(
        1.0,
        ge=0,
        description="weight of consistent LOCAL regions (the global region always weighs 1); "
        "Table 6 ablation: 0 = complementary only (sdd_beta 0 = consistent only)",
    )
    criterion: Literal["correctness", "class"] = Field(
        "correctness", description="complementary test: correctness (code) or class (paper)"
    )
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean over regions x batch (code) or sum over regions (paper Eq. 9)"
    )
    detection_regions: Literal["grid", "interleaved"] = Field(
        "grid",
        description="detection only: RoI regions as m x m sub-boxes (grid, kdlab) or the official "
        "SDD detection code's five interleaved 7x7 views of a 14x14 RoIAlign (interleaved; "
        "scales [1, 2])",
    )

    detection_region_rois: Literal["all", "foreground"] = Field(
        "foreground",
        description="detection only, grid layout: which RoIs have their local regions "
        "distilled: only those matched to an object (foreground, label > 0; the default: "
        "~1.1x DKD's step, higher AP than all in the study) or every sampled RoI (all, ~2x); "
        "the others get the base loss on their global logits at a whole RoI's weight "
        "(docs/methods/sdd-detection.md); the interleaved layout always uses all",
    )
    detection_region_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="detection only, grid layout: the fraction of the RoIs chosen by "
        "detection_region_rois whose local regions are distilled, a uniform random subset drawn "
        "every step, with the local terms scaled so that the loss is an unbiased estimate of "
        "the loss over all chosen RoIs (docs/methods/sdd-detection.md); 1 (default): all of them",
    )

    @field_validator("scales")
    @classmethod
    def _scales(cls, v: list[int]) -> list[int]:
        # Only the scales here: pooling and nested_grid are checked with the feature maps when
        # the distiller is built (the same function, given the maps' sizes).
        try:
            return list(sdd_pooling_grids(v)[0])
        except MethodError as e:
            raise ValueError(str(e)) from e


class SDDKDParams(KDParams, SDDParams):
    """SD-KD: KD's parameters (T 4, ce 0.1, kd 0.9; no warm-up) plus SDD's."""


class SDDDKDParams(DKDParams, SDDParams):
    """SD-DKD: DKD's parameters (alpha 1, beta 8, T 4, warmup_epochs 20, ce 1) plus SDD's."""


class SDDNKDParams(NKDParams, SDDParams):
    """SD-NKD: NKD's parameters (T 1, gamma 1.5, warmup_epochs 20, ce 1, legacy False) plus SDD's.

    The published SD-NKD numbers used ``legacy: true``, ``temperature: 4`` and ``gamma`` = the
    pair's DKD beta (the official code reads them from its DKD block).
    """


#: The parameter class of an SDD distiller (SDD's parameters plus its base loss's).
SP = TypeVar("SP", bound=SDDParams)
#: The parameter class of an SDD distiller whose loss has a warm-up (SD-DKD, SD-NKD).
WP = TypeVar("WP", SDDDKDParams, SDDNKDParams)


class _SDDBase(LogitDistiller[SP], Generic[SP]):
    """Shared machinery: local logits of both models and the weighted per-region loss.

    Subclasses set ``name`` and ``base`` and implement ``base_kwargs`` and ``forward``.
    """

    kind = "logit"
    default_clip_grad_norm: ClassVar[float | None] = 40.0
    base: ClassVar[Literal["kd", "dkd", "nkd"]]
    term: ClassVar[str] = "sdd"

    def __init__(self, params: SP, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        p = params
        for who, model, probe in (
            ("student", ctx.student, ctx.student_probe),
            ("teacher", ctx.teacher, ctx.teacher_probe),
        ):
            if model is None or probe is None:
                raise MethodError(f"method {self.name!r} needs a teacher")
            if probe.region_logits is not None:
                if p.detection_regions == "interleaved" and self._subset_asked():
                    raise MethodError(
                        f"{self.name}: detection_region_fraction below 1 and "
                        "detection_region_rois 'foreground' need detection_regions 'grid' (the "
                        "interleaved layout's region 0 is not the RoI's own logits, so every RoI "
                        "needs its 14x14 pooling); remove them")
                continue  # the task computes the regions (detection: RoI sub-boxes)
            if self._subset_asked():
                raise MethodError(f"{self.name}: detection_region_fraction and "
                                  "detection_region_rois apply to detection only; remove them "
                                  "for classification")
            if p.detection_regions != "grid":
                raise MethodError(f"{self.name}: detection_regions applies to detection only; "
                                  "remove it for classification")
            fmap = probe.feature_map
            if fmap.dim() != 4:
                raise MethodError(
                    f"SDD needs the {who}'s B x C x H x W feature map, got shape "
                    f"{tuple(fmap.shape)}"
                )
            sdd_pooling_grids(
                p.scales,
                p.pooling,
                p.nested_grid,
                fmap.shape[-2],
                fmap.shape[-1],
                what=f"{who} feature map",
            )
            if fmap.shape[-2] == 1 and fmap.shape[-1] == 1 and max(p.scales) > 1:
                # every cell of every grid would be a copy of the one location: the loss would
                # silently be the base loss on the global logits
                arch = getattr(model, "arch", None) or type(model).__name__
                raise MethodError(
                    f"{self.name}: the {who} {arch} has a 1x1 final feature map at "
                    f"{ctx.input_size} px, so every SDD region equals the global one; use a "
                    f"larger input or a model with a larger final map (or {self.base})"
                )
            in_features = getattr(model.classifier, "in_features", fmap.shape[1])
            if in_features != fmap.shape[1]:
                raise MethodError(
                    f"the {who}'s classifier takes {in_features} features but its feature map "
                    f"has {fmap.shape[1]} channels; SDD needs the map fed to the classifier"
                )

    def _teacher(self) -> KdModel:
        """The teacher (always set: ``__init__`` refuses a context without one)."""
        teacher = self.ctx.teacher
        if teacher is None:  # pragma: no cover - checked in __init__
            raise MethodError(f"method {self.name!r} needs a teacher")
        return teacher

    def base_kwargs(self, temperature: Temperature) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def _subset_asked(self) -> bool:
        """Whether the parameters ask for local regions of only some RoIs (detection): a
        fraction below 1 or an explicitly set ``detection_region_rois: foreground`` (its default
        applies to the grid layout only)."""
        p = self.params
        explicit_pool = ("detection_region_rois" in p.model_fields_set
                         and p.detection_region_rois != "all")
        return p.detection_region_fraction < 1 or explicit_pool

    def region_pool(self) -> str:
        """The RoIs whose local regions are distilled: ``detection_region_rois`` for the grid
        layout, ``"all"`` for the interleaved one (its region 0 is not the RoI's logits)."""
        p = self.params
        return "all" if p.detection_regions == "interleaved" else p.detection_region_rois

    def region_fraction(self) -> float:
        """The fraction of the chosen RoIs (``detection_region_rois``) of a detection batch whose
        local regions are distilled (``detection_region_fraction``, 1 = all of them)."""
        return float(self.params.detection_region_fraction)

    def local_logits(self, out_s: ModelOutput, out_t: ModelOutput, rows: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
        """``B x K x N`` local logits of the student (with gradients) and the teacher (without):
        the classifier on pooled regions of each ``feature_map`` (:func:`multiscale_logits`), or
        the outputs' own ``region_logits`` where the task provides them (detection; ``rows``:
        only those sorted RoIs, None: all)."""
        p = self.params
        if out_s.region_logits is not None and out_t.region_logits is not None:
            if rows is None:
                local_s = out_s.region_logits(p.scales, p.detection_regions)
                with torch.no_grad():
                    local_t = out_t.region_logits(p.scales, p.detection_regions)
                return local_s, local_t
            # the detection task's region_logits take the RoI subset as the keyword ``rows``
            region_s: Any = out_s.region_logits
            region_t: Any = out_t.region_logits
            local_s = region_s(p.scales, p.detection_regions, rows=rows)
            with torch.no_grad():
                local_t = region_t(p.scales, p.detection_regions, rows=rows)
            return local_s, local_t
        local_s = multiscale_logits(
            out_s.feature_map, self.ctx.student.classifier, p.scales, p.pooling, p.nested_grid
        )
        with torch.no_grad():
            local_t = multiscale_logits(
                out_t.feature_map, self._teacher().classifier, p.scales, p.pooling, p.nested_grid
            )
        return local_s, local_t

    def local_loss(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> Tensor:
        """``L_SDD`` of the batch (unweighted by warm-up / method weight) at ``epoch`` (which
        sets CTKD's learned temperature, when on)."""
        p = self.params

        def loss(local_s: Tensor, local_t: Tensor, labels: Tensor) -> Tensor:
            return sdd_loss(
                self.standardized(local_s, dim=1),
                self.standardized(local_t, dim=1),
                labels,
                base=self.base,
                base_kwargs=self.base_kwargs(self.temperature(epoch)),
                beta=p.sdd_beta,
                criterion=p.criterion,
                reduction=p.reduction,
                consistent_weight=p.consistent_weight,
            )

        subset = self._region_rows(out_s, batch.labels)
        if subset is None:
            local_s, local_t = self.local_logits(out_s, out_t)
            return loss(local_s, local_t, batch.labels)
        # The pool P of chosen RoIs (all, or the foreground ones) gets SDD, every other RoI its
        # global region's loss at a whole RoI's weight (its local regions taken as equal to the
        # global one); a random subset S of P stands in for P, unbiased:
        #   L = w L_SDD(S) + c w (L_base(P) - L_base(S)) + c N (L_base(all) - w L_base(P)),
        # w = |P| / R, c = 1/N (mean) or 1 (sum) (docs/methods/sdd-detection.md).
        pool, rows = subset
        r = batch.labels.shape[0]
        w = pool.numel() / max(r, 1)
        n_regions = _region_count(p.scales)
        c = 1.0 / n_regions if p.reduction == "mean" else 1.0

        def base(picked: Tensor | None = None) -> Tensor:  # base loss on the RoIs' own logits
            zs, zt, y = out_s.logits, out_t.logits.detach(), batch.labels
            if picked is not None:
                zs, zt, y = zs[picked], zt[picked], y[picked]
            return loss(zs.unsqueeze(2), zt.unsqueeze(2), y)

        base_all = base()
        if rows.numel() == 0:  # no RoI in the pool: the base loss on every RoI
            return c * n_regions * base_all
        base_pool = base(pool) if pool.numel() < r else base_all
        local_s, local_t = self.local_logits(out_s, out_t, rows)
        labels_s = batch.labels[rows]
        base_sub = loss(local_s[:, :, :1], local_t[:, :, :1], labels_s)
        return (w * loss(local_s, local_t, labels_s) + c * w * (base_pool - base_sub)
                + c * n_regions * (base_all - w * base_pool))

    def _region_rows(self, out_s: ModelOutput, labels: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(pool, rows)``: the sorted RoIs ``P`` chosen for local regions (every RoI, or the
        foreground ones with ``detection_region_rois: foreground``) and the sorted subset of
        ``ceil(fraction * |P|)`` of them drawn uniformly without replacement (torch's global
        generator) whose regions this step distils. None when every RoI's regions are distilled
        (classification, scales [1], or a pool of every RoI at fraction 1)."""
        p = self.params
        if out_s.region_logits is None or max(p.scales) == 1:
            return None
        r = int(labels.shape[0])
        if self.region_pool() == "foreground":
            pool = torch.nonzero(labels > 0).flatten()
        else:
            pool = torch.arange(r, device=labels.device)
        size = int(pool.numel())
        if size == r and self.region_fraction() >= 1:
            return None
        n = math.ceil(self.region_fraction() * size)
        if n >= size:
            return pool, pool
        return pool, pool[torch.randperm(size, device=pool.device)[:n]].sort().values


def _region_count(scales: list[int]) -> int:
    """``N``: regions per RoI of the grid layout (``sum m^2`` over the scales)."""
    return sum(m * m for m in scales)


class _WarmupSDDBase(_SDDBase[WP], Generic[WP]):
    """SD-DKD and SD-NKD: the SDD loss under the base method's linear warm-up."""

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "sdd": min(epoch / warmup_epochs, 1) * L_SDD}``."""
        p = self.params
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "sdd": warmup_factor(epoch, p.warmup_epochs)
            * self.local_loss(out_s, out_t, batch, epoch),
        }


@register_method
class SDDKD(_SDDBase[SDDKDParams]):
    """SD-KD: ``L = ce_weight * CE + kd_weight * L_SDD(KD, T)`` (no warm-up).

    Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024; KD: Hinton et al., 2015.
    """

    name = "sd_kd"
    base = "kd"

    def base_kwargs(self, temperature: Temperature) -> dict[str, Any]:
        """KD's temperature."""
        return {"temperature": temperature}

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ..., "sdd": kd_weight * L_SDD}``."""
        p = self.params
        return {
            "ce": ce_term(out_s, batch, p.ce_weight),
            "sdd": p.kd_weight * self.local_loss(out_s, out_t, batch, epoch),
        }


@register_method
class SDDDKD(_WarmupSDDBase[SDDDKDParams]):
    """SD-DKD: ``L = ce_weight * CE + min(epoch / warmup_epochs, 1) * L_SDD(DKD, alpha, beta, T)``.

    Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024; DKD: Zhao et al., CVPR 2022.
    """

    name = "sd_dkd"
    base = "dkd"

    def base_kwargs(self, temperature: Temperature) -> dict[str, Any]:
        """DKD's alpha, beta and the temperature."""
        p = self.params
        return {"alpha": p.alpha, "beta": p.beta, "temperature": temperature}


@register_method
class SDDNKD(_WarmupSDDBase[SDDNKDParams]):
    """SD-NKD: ``L = ce_weight * CE + min(epoch / warmup_epochs, 1) * L_SDD(NKD, T, gamma)``.

    Wei, Luo, Luo, "Scale Decoupled Distillation", CVPR 2024; NKD: Yang et al., ICCV 2023.
    """

    name = "sd_nkd"
    base = "nkd"

    def base_kwargs(self, temperature: Temperature) -> dict[str, Any]:
        """NKD's temperature, gamma and legacy switch."""
        p = self.params
        return {"temperature": temperature, "gamma": p.gamma, "legacy": p.legacy}
