"""Distillers that work on a segmentation model's logit map (``task: segmentation``).

The segmentation task hands the methods a pixel view (``logits`` = the labelled pixels' rows,
``batch.labels`` their labels), so the logit methods (KD, DKD, NKD, DCKD, DIST) run per pixel
unchanged. The two methods here need the map itself (``ModelOutput.dense_logits``):

* ``cwd``: channel-wise distillation (Shu et al., ICCV 2021) on the logit maps (default) or on
  the heads' pre-classifier ``feature_map`` (``maps: feature_map``),
  ``L = ce_weight * CE + cwd_weight * cwd_loss(P(y_s), y_t, T)``; CIRKD's segmentation recipe
  uses ``T = 4`` and weight 3 (``train_kd.py``), the defaults here. ``P`` is the identity on
  logit maps and on feature maps of one channel count, else a learnable 1x1 convolution from
  the student's to the teacher's channels owned by the method (the CWD paper's alignment layer
  for features of different widths), followed by a resize to the teacher's spatial size when the
  output strides differ.
* ``sd_map``: SDD on logit maps (docs/methods/sdd-segmentation.md),
  ``L = ce_weight * CE + kd_weight * pixel_sdd_loss`` with the KD, DKD or NKD base: SD-KD and
  SD-DKD of segmentation.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.losses.dense import cwd_loss, masked_pixel_sdd_loss
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams, warmup_factor
from kdlab.methods.feature import resize_to_grid
from kdlab.methods.logit import ce_term
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["CWD", "CWDParams", "SDMap", "SDMapParams", "channel_projection", "dense_maps"]


def dense_maps(out_s: ModelOutput, out_t: ModelOutput, method: str) -> tuple[Tensor, Tensor]:
    """The student's and teacher's ``B x K x H x W`` logit maps; a one-line
    :class:`MethodError` for outputs that carry none (a task other than segmentation)."""
    if out_s.dense_logits is None or out_t.dense_logits is None:
        raise MethodError(f"method {method!r} distils segmentation logit maps; use it with "
                          "task: segmentation")
    return out_s.dense_logits, out_t.dense_logits


class CWDParams(MethodParams):
    """CWD on logit maps (Shu et al., ICCV 2021); CIRKD's segmentation defaults T 4, weight 3.
    ``maps: feature_map`` distils the heads' pre-classifier maps instead."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the pixel cross-entropy")
    cwd_weight: float = Field(3.0, ge=0, description="weight of the CWD term (CIRKD: 3)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature over positions")
    maps: Literal["logits", "feature_map"] = Field(
        "logits", description="what is distilled: the logit maps, or the heads' pre-classifier "
        "feature_map (a learnable 1x1 projection maps the student's channels to the teacher's "
        "when they differ)")


def channel_projection(ctx: DistillContext, method: str) -> nn.Conv2d | None:
    """The 1x1 convolution from the student's ``feature_map`` channels to the teacher's (with
    bias, as the CWD authors' alignment layer), sized from the probes; None when the channel
    counts are equal (the maps are compared as they are)."""
    fs, ft = ctx.student_probe.feature_map, ctx.require_teacher_probe(method).feature_map
    if fs.dim() != 4 or ft.dim() != 4:
        raise MethodError(f"{method}: maps: feature_map needs B x C x H x W feature maps on both "
                          f"models, got {tuple(fs.shape)} and {tuple(ft.shape)}")
    c_s, c_t = int(fs.shape[1]), int(ft.shape[1])
    return None if c_s == c_t else nn.Conv2d(c_s, c_t, kernel_size=1)


@register_method
class CWD(Distiller[CWDParams]):
    """``{"ce", "cwd"}``: the pixel CE and ``cwd_weight * cwd_loss`` of the logit maps
    (:func:`kdlab.losses.dense.cwd_loss`; every pixel, labelled or not, as the official
    code) or, with ``maps: feature_map``, of the heads' pre-classifier maps: the student's
    through :attr:`projection` (a trainable 1x1 convolution to the teacher's channel count, None
    when the counts match) and resized to the teacher's spatial size when it differs
    (:func:`~kdlab.methods.feature.resize_to_grid`)."""

    name = "cwd"
    kind = "logit"
    needs_dense_maps = True

    def __init__(self, params: CWDParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        self.projection: nn.Conv2d | None = None
        if self.params.maps == "feature_map":
            self.projection = channel_projection(ctx, self.name)

    def describe(self) -> dict[str, Any]:
        """The name, the parameters and whether a channel projection was built."""
        return {**super().describe(), "resolved": {"projection": None if self.projection is None
                                                   else list(self.projection.weight.shape[:2])}}

    def student_teacher_maps(self, out_s: ModelOutput, out_t: ModelOutput
                             ) -> tuple[Tensor, Tensor]:
        """The two maps CWD compares: the logit maps, or the feature maps with the student's
        projected to the teacher's channels and resized to its size."""
        zs, zt = dense_maps(out_s, out_t, self.name)
        if self.params.maps == "logits":
            return zs, zt
        ys, yt = out_s.feature_map, out_t.feature_map
        if self.projection is not None:
            ys = self.projection(ys.to(self.projection.weight.dtype))
        return resize_to_grid(ys, yt.shape[-2:]), yt

    def forward(self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
                ) -> dict[str, Tensor]:
        """The two terms (no warm-up)."""
        p = self.params
        ys, yt = self.student_teacher_maps(out_s, out_t)
        return {"ce": ce_term(out_s, batch, p.ce_weight),
                "cwd": p.cwd_weight * cwd_loss(ys, yt, p.temperature)}


class SDMapParams(MethodParams):
    """SDD on logit maps: the base loss's parameters, the window scales and ``beta``."""

    base: Literal["kd", "dkd", "nkd"] = Field("dkd", description="the base loss of every "
                                               "window: kd (SD-KD), dkd (SD-DKD) or nkd")
    scales: list[int] = Field(default_factory=lambda: [1, 2, 4], description="window sides in "
                              "pixels of the logit map; 1 (the pixel itself) first")
    beta: float = Field(2.0, ge=0, description="weight of complementary windows (SDD: 2)")
    criterion: Literal["correctness", "class"] = Field(
        "correctness", description="complementary when the window's correctness (official "
        "SDD code) or predicted class (paper text) differs from the pixel's")
    ce_weight: float = Field(1.0, ge=0, description="weight of the pixel cross-entropy")
    kd_weight: float = Field(1.0, ge=0, description="weight of the SDD term")
    temperature: float = Field(4.0, gt=0, description="the base loss's temperature")
    alpha: float = Field(1.0, ge=0, description="DKD's target-class weight")
    dkd_beta: float = Field(8.0, ge=0, description="DKD's non-target weight")
    gamma: float = Field(1.5, ge=0, description="NKD's non-target weight")
    warmup_epochs: int = Field(0, ge=0, description="epochs of linear loss warm-up (0: none)")


@register_method
class SDMap(Distiller[SDMapParams]):
    """``{"ce", "sdd"}``: the pixel CE and ``kd_weight * L_SDD`` over the labelled pixels'
    windows (:func:`kdlab.losses.dense.masked_pixel_sdd_loss`;
    docs/methods/sdd-segmentation.md)."""

    name = "sd_map"
    kind = "logit"
    needs_dense_maps = True

    def _base_kwargs(self) -> dict[str, float]:
        p = self.params
        if p.base == "dkd":
            return {"alpha": p.alpha, "beta": p.dkd_beta, "temperature": p.temperature}
        if p.base == "nkd":
            return {"gamma": p.gamma, "temperature": p.temperature}
        return {"temperature": p.temperature}

    def forward(self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
                ) -> dict[str, Tensor]:
        """The two terms; the SDD term ramps up over ``warmup_epochs``."""
        p = self.params
        zs, zt = dense_maps(out_s, out_t, self.name)
        loss = masked_pixel_sdd_loss(zs, zt, out_s.pixel_mask, batch.labels, p.scales,
                                     base=p.base, base_kwargs=self._base_kwargs(), beta=p.beta,
                                     criterion=p.criterion)
        ramp = warmup_factor(epoch, p.warmup_epochs)
        return {"ce": ce_term(out_s, batch, p.ce_weight), "sdd": ramp * p.kd_weight * loss}
