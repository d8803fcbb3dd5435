"""ReviewKD partner distiller (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge
Review", CVPR 2021): attention-based fusion (ABF) of the student's stages, deepest first, and the
hierarchical context loss (HCL) against the teacher's stages.

The official code and mdistiller hard-code per-pair tables of channels and spatial sizes
(``IN_CHANNELS``, ``OUT_CHANNELS``, ``SHAPES``, ``OUT_SHAPES``); here every size comes from the
probes in the :class:`~kdlab.methods.base.DistillContext` (channels) and from the tensors
themselves at run time (spatial sizes), so any student/teacher pair works. Pairs with a ViT on
either side (``KdModel.token_grid``) pair their levels by relative depth and resize smoothly
(:func:`level_pairs`, :class:`ABF`; docs/methods/heterogeneous.md).
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.losses.reviewkd import hcl_loss
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams, warmup_factor
from kdlab.methods.feature import (
    is_token_grid,
    pooled_embedding,
    resize_to_grid,
    stage_pairs,
)
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["ABF", "ReviewKD", "ReviewKDParams", "level_pairs", "review_levels"]


class ReviewKDParams(MethodParams):
    """ReviewKD hyperparameters."""

    weight: float = Field(
        1.0, ge=0, description="lambda_f (mdistiller default 1.0; 5.0 in resnet32x4->resnet8x4)"
    )
    warmup_epochs: int = Field(
        20, ge=0, description="linear warm-up min(epoch / warmup, 1); 0 disables it"
    )
    max_mid_channels: int = Field(
        512, ge=1, description="ABF width = min(this, channels of the student's embedding)"
    )
    student_preact: bool = Field(
        False, description="fuse the student's pre-activation stages (mdistiller STU_PREACT)"
    )
    teacher_preact: bool = Field(
        True, description="match the teacher's pre-activation stages (official code)"
    )
    embedding_level: bool = Field(
        True,
        description="append the pooled embedding as the deepest level (classification, official "
        "code); false: the stage maps only (detection: the FPN levels P2-P6, as ReviewKD's "
        "detection code)",
    )


class ABF(nn.Module):
    """Attention-based fusion (ReviewKD, Sec. 3.2).

    ``x' = BN(conv1x1(x))`` maps the student level ``x`` to ``mid`` channels. When ``fuse``, the
    residual ``y`` from the deeper level is upsampled (nearest) to ``x'``'s size and the two are
    blended with two per-pixel attention maps ``a = sigmoid(conv1x1([x', y]))``:
    ``x' <- a_0 * x' + a_1 * y``. The result is resized (nearest) to the teacher level's size,
    becomes the residual passed to the next (shallower) level, and ``BN(conv3x3(.))`` maps it to
    the teacher's channel count.

    ``smooth_resize`` (pairs with a ViT): both resizes use
    :func:`~kdlab.methods.feature.resize_to_grid` (adaptive average pooling down, bilinear up)
    instead of nearest neighbours, which would keep one cell in 16 when a CNN's 32x32 stage
    meets an 8x8 token grid.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool,
                 smooth_resize: bool = False) -> None:
        super().__init__()
        self.smooth_resize = smooth_resize
        conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.conv1 = nn.Sequential(conv1, nn.BatchNorm2d(mid_channels))
        conv2 = nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Sequential(conv2, nn.BatchNorm2d(out_channels))
        self.att_conv: nn.Module | None = None
        if fuse:
            self.att_conv = nn.Sequential(
                nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()
            )
        # The reference initialisation.
        nn.init.kaiming_uniform_(conv1.weight, a=1)
        nn.init.kaiming_uniform_(conv2.weight, a=1)

    def forward(
        self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor]:
        """Returns ``(output at the teacher's shape, residual for the next level)``."""
        # Helper layers run in their own (float32) precision: distillers run outside autocast.
        x = self.conv1(x.to(cast(nn.Conv2d, self.conv1[0]).weight.dtype))
        if residual is not None:
            residual = residual.to(x.dtype)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the residual of the deeper level")
            y = self._resize(residual, x.shape[-2:])
            a = self.att_conv(torch.cat([x, y], dim=1))
            x = x * a[:, 0:1] + y * a[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = self._resize(x, out_size)
        return self.conv2(x), x

    def _resize(self, x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
        """``x`` at ``size``: :func:`~kdlab.methods.feature.resize_to_grid` when
        ``smooth_resize``, else nearest neighbours (the official code)."""
        if self.smooth_resize:
            return resize_to_grid(x, size)
        return F.interpolate(x, size=tuple(size), mode="nearest")


def review_levels(out: ModelOutput, preact: bool, embedding: bool = True) -> list[Tensor]:
    """The maps ReviewKD works on, shallow to deep: the stage outputs ``features[1:]`` (or
    ``preact_features[1:]`` when ``preact`` and the model provides them) followed, when
    ``embedding``, by the pooled embedding as a ``B x C x 1 x 1`` map."""
    feats = out.preact_features if preact and out.preact_features else out.features
    levels = list(feats[1:])
    if not embedding:
        return levels
    return levels + [pooled_embedding(out)[:, :, None, None]]


def level_pairs(n_s: int, n_t: int, grid_pair: bool, embedding: bool) -> list[tuple[int, int]]:
    """``(student level, teacher level)`` indices (0-based, shallow to deep) into
    :func:`review_levels` lists of ``n_s`` and ``n_t`` levels (each >= 2 long).

    Two CNNs (``grid_pair`` false): the deepest ``min(n_s, n_t)`` levels of each, in order.
    A ViT on either side: the stage levels by relative depth
    (:func:`~kdlab.methods.feature.stage_pairs`: every stage of the shallower model with the
    other's stage at the same relative depth) and, when ``embedding``, the last level (the pooled
    embedding) with the last.
    """
    if not grid_pair:
        n = min(n_s, n_t)
        return list(zip(range(n_s - n, n_s), range(n_t - n, n_t), strict=True))
    k = 1 if embedding else 0
    pairs = [(i - 1, j - 1) for i, j in stage_pairs(n_s - k, n_t - k)]
    return pairs + [(n_s - 1, n_t - 1)] * k


@register_method
class ReviewKD(Distiller[ReviewKDParams]):
    """ReviewKD with ABF modules sized from the probes and the HCL loss, linear warm-up.

    Levels (shallow to deep) are ``features[1:] + [embedding]`` on both sides; the student's are
    post-activation, the teacher's pre-activation (official code; a ViT has no pre-activation
    stages, so its ``features`` are used). Which levels are paired is :func:`level_pairs`: for two
    CNNs with different numbers of stages, the DEEPEST ``n = min(n_s, n_t)`` levels of each (the
    review path starts from the pooled embedding, so depth alignment keeps the pooled vectors and
    the last stages together) and the shallowest extra stages are unused; with a ViT on either
    side, the stages at the same relative depth, and the ABF resizes are smooth
    (``ABF.smooth_resize``).

    Raises:
        MethodError: a model without stage features, or levels that are not maps.
    """

    name = "reviewkd"
    kind = "partner"

    def __init__(self, params: ReviewKDParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        p = self.params
        s_levels = review_levels(ctx.student_probe, p.student_preact, p.embedding_level)
        t_levels = review_levels(ctx.require_teacher_probe(self.name), p.teacher_preact,
                                 p.embedding_level)
        for who, levels in (("student", s_levels), ("teacher", t_levels)):
            if len(levels) < 2:
                raise MethodError(
                    f"reviewkd: the {who} model exposes no stage features (ModelOutput.features "
                    "needs the stem followed by one map per stage)"
                )
            if any(f.dim() != 4 for f in levels):
                raise MethodError(f"reviewkd: {who} stage features must be B x C x H x W maps")
        grid_pair = is_token_grid(ctx.student) or is_token_grid(ctx.teacher)
        #: ``(student level, teacher level)`` indices into the review_levels lists.
        self.pairs = level_pairs(len(s_levels), len(t_levels), grid_pair, p.embedding_level)
        n = self.num_levels = len(self.pairs)
        s_levels = [s_levels[i] for i, _ in self.pairs]
        t_levels = [t_levels[j] for _, j in self.pairs]
        in_channels = [int(f.shape[1]) for f in s_levels]
        out_channels = [int(f.shape[1]) for f in t_levels]
        mid = min(p.max_mid_channels, in_channels[-1])
        # Built deepest first: abfs[0] takes the pooled embedding and does not fuse.
        self.abfs = nn.ModuleList(
            ABF(in_channels[i], mid, out_channels[i], fuse=i < n - 1, smooth_resize=grid_pair)
            for i in reversed(range(n))
        )
        #: probe shapes (C, H, W) per level, shallow to deep, for the record.
        self.student_shapes = [tuple(int(v) for v in f.shape[1:]) for f in s_levels]
        self.teacher_shapes = [tuple(int(v) for v in f.shape[1:]) for f in t_levels]

    def describe(self) -> dict[str, Any]:
        """The name, the parameters and the ``(student, teacher)`` level indices paired."""
        return {**super().describe(), "resolved": {"pairs": [list(q) for q in self.pairs]}}

    def review(self, out_s: ModelOutput, teacher_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """The student's reviewed maps, shallow to deep, each at the teacher level's size."""
        p = self.params
        all_levels = review_levels(out_s, p.student_preact, p.embedding_level)
        levels = [all_levels[i] for i, _ in self.pairs]
        results: list[Tensor] = []
        residual: Tensor | None = None
        for abf, x, size in zip(self.abfs, reversed(levels), reversed(teacher_sizes), strict=True):
            y, residual = abf(x, residual, size)
            results.insert(0, y)
        return results

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        all_levels = review_levels(out_t, p.teacher_preact, p.embedding_level)
        t_levels = [all_levels[j] for _, j in self.pairs]
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in t_levels]
        loss = hcl_loss(self.review(out_s, sizes), t_levels)
        return {"reviewkd": p.weight * warmup_factor(epoch, p.warmup_epochs) * loss}
