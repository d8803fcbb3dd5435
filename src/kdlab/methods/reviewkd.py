"""ReviewKD partner distiller (Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge
Review", CVPR 2021): attention-based fusion (ABF) of the student's stages, deepest first, and the
hierarchical context loss (HCL) against the teacher's stages.

The official code and mdistiller hard-code per-pair tables of channels and spatial sizes
(``IN_CHANNELS``, ``OUT_CHANNELS``, ``SHAPES``, ``OUT_SHAPES``); here every size comes from the
probes in the :class:`~kdlab.methods.base.DistillContext` (channels) and from the tensors
themselves at run time (spatial sizes), so any student/teacher pair works.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.losses.reviewkd import hcl_loss
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams, warmup_factor
from kdlab.methods.feature import pooled_embedding
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["ABF", "ReviewKD", "ReviewKDParams", "review_levels"]


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
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
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
            y = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            a = self.att_conv(torch.cat([x, y], dim=1))
            x = x * a[:, 0:1] + y * a[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def review_levels(out: ModelOutput, preact: bool, embedding: bool = True) -> list[Tensor]:
    """The maps ReviewKD works on, shallow to deep: the stage outputs ``features[1:]`` (or
    ``preact_features[1:]`` when ``preact`` and the model provides them) followed, when
    ``embedding``, by the pooled embedding as a ``B x C x 1 x 1`` map."""
    feats = out.preact_features if preact and out.preact_features else out.features
    levels = list(feats[1:])
    if not embedding:
        return levels
    return levels + [pooled_embedding(out)[:, :, None, None]]


@register_method
class ReviewKD(Distiller[ReviewKDParams]):
    """ReviewKD with ABF modules sized from the probes and the HCL loss, linear warm-up.

    Levels (shallow to deep) are ``features[1:] + [embedding]`` on both sides; the student's are
    post-activation, the teacher's pre-activation (official code). When the two models have
    different numbers of stages, the DEEPEST ``n = min(n_s, n_t)`` levels of each are paired
    (the review path starts from the pooled embedding, so depth alignment keeps the pooled
    vectors and the last stages together); the shallowest extra stages are unused.
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
        n = min(len(s_levels), len(t_levels))
        self.num_levels = n
        s_levels, t_levels = s_levels[-n:], t_levels[-n:]
        in_channels = [int(f.shape[1]) for f in s_levels]
        out_channels = [int(f.shape[1]) for f in t_levels]
        mid = min(p.max_mid_channels, in_channels[-1])
        # Built deepest first: abfs[0] takes the pooled embedding and does not fuse.
        self.abfs = nn.ModuleList(
            ABF(in_channels[i], mid, out_channels[i], fuse=i < n - 1) for i in reversed(range(n))
        )
        #: probe shapes (C, H, W) per level, shallow to deep, for the record.
        self.student_shapes = [tuple(int(v) for v in f.shape[1:]) for f in s_levels]
        self.teacher_shapes = [tuple(int(v) for v in f.shape[1:]) for f in t_levels]

    def review(self, out_s: ModelOutput, teacher_sizes: list[tuple[int, int]]) -> list[Tensor]:
        """The student's reviewed maps, shallow to deep, each at the teacher level's size."""
        p = self.params
        levels = review_levels(out_s, p.student_preact, p.embedding_level)[-self.num_levels :]
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
        t_levels = review_levels(out_t, p.teacher_preact, p.embedding_level)[-self.num_levels :]
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in t_levels]
        loss = hcl_loss(self.review(out_s, sizes), t_levels)
        return {"reviewkd": p.weight * warmup_factor(epoch, p.warmup_epochs) * loss}
