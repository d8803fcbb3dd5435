"""OFA-KD: one-for-all distillation through branch projectors into the logit space (``ofa``).

Hao, Guo, Han, Tang, Hu, Wang, Xu, "One-for-All: Bridge the Gap Between Heterogeneous
Architectures in Knowledge Distillation", NeurIPS 2023 (arXiv:2310.19444). Official code:
Hao840/OFAKD, ``distillers/ofa.py`` (``OFA.__init__`` builds the projectors, ``OFA.forward`` the
loss), ``distillers/utils.py`` (``SepConv``, ``PatchMerging``, ``init_weights``) and ``train.py``
(the defaults).

Every chosen student stage ``i`` gets a projector ``P_i`` from its feature map to class logits;
with ``L_OFA`` the loss of :func:`kdlab.losses.ofa_loss` (the teacher's target-enhanced
distribution, exponent ``eps``, temperature ``T``):

    L = ce_weight * CE_ls(z_s, y)
      + ofa_weight * sum_i L_OFA(P_i(F_s^i), z_t, y, eps_i, T)
      + kd_weight * L_OFA(z_s, z_t, y, eps_last, T)

as the official ``OFA.forward`` (``loss_gt``, ``loss_ofa``, ``loss_kd``). The projectors are the
official ones, built from the student's probe shapes:

* convolutional students: ``n - i`` separable-convolution downsamplings (``n`` stages; the
  official ``4 - stage``), the channels doubling and the last one going to ``max(C_s, C_t)``
  (the two models' pooled widths), or one 1x1 convolution for the last stage; then global average
  pooling and a linear layer;
* token-grid students (``KdModel.token_grid``: ViTs): ``floor(log2(grid / final_patch_grid))``
  patch mergings (at least 0) to the student's pooled width ``C_s``, ``max(4 - s, 1)`` transformer
  blocks (``s`` the official stage 1-4 of the chosen block, 4 heads), the class token (students
  that have one) or the token mean, and a linear layer.

kdlab's adaptations are listed in ``docs/methods/ofa.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, field_validator
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.losses.ofa import ofa_loss
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams
from kdlab.methods.feature import is_token_grid, pooled_embedding
from kdlab.methods.registry import register_method
from kdlab.models.output import KdModel, ModelOutput
from kdlab.models.vit import Block

__all__ = [
    "OFA",
    "CNNProjectorPlan",
    "OFAParams",
    "PatchMerging",
    "SepConv",
    "TokenProjectorPlan",
    "build_projector",
    "cnn_projector_plan",
    "default_stages",
    "official_vit_stage",
    "token_projector_plan",
]

#: the official projector blocks: ``Block(dim=feature_dim_s, num_heads=4)`` (timm's default
#: MLP ratio 4).
PROJECTOR_HEADS = 4
PROJECTOR_MLP_RATIO = 4.0
#: the official ViT stage split: a 12-block ViT's stages 1-4 end at blocks 2, 4, 10, 12
#: (``custom_forward/vision_transformer.py``, ``stage_info``: indices 1, 3, 9, 11).
OFFICIAL_VIT_STAGE_ENDS = (2, 4, 10, 12)


class OFAParams(MethodParams):
    """OFA-KD's settings; the defaults are the official ``train.py`` ones (``--gt-loss-weight``,
    ``--kd-loss-weight``, ``--ofa-loss-weight``, ``--ofa-eps``, ``--ofa-temperature``: 1 each;
    ``--ofa-stage 1 2 3 4``: every stage of its four-stage students), except label smoothing
    (official ``--smoothing 0.1``; kdlab's CE terms are plain unless a config sets it)."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term (official "
                             "--gt-loss-weight, default 1)")
    ofa_weight: float = Field(1.0, ge=0, description="weight of the summed branch OFA terms "
                              "(official --ofa-loss-weight, default 1; 0.1 in the authors' "
                              "CIFAR-100 CNN runs)")
    kd_weight: float = Field(1.0, ge=0, description="weight of the OFA term on the student's own "
                             "logits (official --kd-loss-weight, default 1)")
    stages: list[int] | None = Field(
        None, description="student stages (indices of ModelOutput.features, 1 = first stage) "
        "that get a branch projector; null: every stage of a CNN (official --ofa-stage 1 2 3 4), "
        "the official four of a ViT (blocks 2, 4, 10, 12 of 12, scaled to the depth)")
    eps: PositiveFloat | list[PositiveFloat] = Field(
        1.0, description="target-enhancement exponent: one value for every term, or one per "
        "stage followed by the one of the final logits (official --ofa-eps; README: 1.0 on "
        "CIFAR-100, 1.5 on ImageNet)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of every OFA term "
                               "(official --ofa-temperature, default 1)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the CE term "
                                   "(the official recipes: 0.1, --smoothing)")
    final_patch_grid: int = Field(7, ge=1, description="ViT students: the token grid is halved "
                                  "max(floor(log2(grid / final_patch_grid)), 0) times (official "
                                  "final_patch_grid = 7)")

    @field_validator("stages")
    @classmethod
    def _distinct_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(s < 1 for s in v) or len(set(v)) != len(v)):
            raise ValueError("stages must be distinct stage numbers >= 1 (0 is the stem), or null")
        return v

    @field_validator("eps")
    @classmethod
    def _non_empty(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, list) and not v:
            raise ValueError("eps must be a number or a non-empty list")
        return v


# ------------------------------------------------------------------------------ the modules
class SepConv(nn.Module):
    """The official ``SepConv``: a stride-2 separable convolution block, ``C_in -> C_out``.

    ``dw3x3/2 -> pw1x1 -> BN -> ReLU -> dw3x3 -> pw1x1(C_in -> C_out) -> BN -> ReLU`` (no biases),
    halving the map (Hao et al., NeurIPS 2023, ``distillers/utils.py``).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class PatchMerging(nn.Module):
    """Swin's patch merging on a ``B x H x W x C`` grid: ``B x H/2 x W/2 x C_out``.

    The 2x2 neighbours are concatenated in the official order ``(0,0), (1,0), (0,1), (1,1)``
    (row, column offsets), then ``act(Linear(LayerNorm(4C)))`` without bias, as the official
    ``PatchMerging`` (Hao et al., NeurIPS 2023; Liu et al., Swin, ICCV 2021).
    """

    def __init__(self, dim: int, out_dim: int, gelu: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act: nn.Module = nn.GELU() if gelu else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.act(self.reduction(self.norm(x)))


class _TokenProjector(nn.Module):
    """A ViT branch: grid -> tokens (merged, projected) -> [class token] -> blocks -> pool."""

    def __init__(self, plan: TokenProjectorPlan, num_classes: int) -> None:
        super().__init__()
        self.merges = nn.Sequential(*(PatchMerging(d_in, d_out, gelu)
                                      for _, d_in, d_out, gelu in plan.merges))
        self.proj = nn.Identity() if plan.proj is None else nn.Linear(*plan.proj)
        self.cls_token = (nn.Parameter(torch.zeros(1, 1, plan.dim))
                          if plan.pool == "cls" else None)
        self.blocks = nn.Sequential(*(Block(plan.dim, PROJECTOR_HEADS, PROJECTOR_MLP_RATIO)
                                      for _ in range(plan.blocks)))
        self.head = nn.Linear(plan.dim, num_classes)

    def forward(self, grid: Tensor) -> Tensor:
        x = self.proj(self.merges(grid.permute(0, 2, 3, 1))).flatten(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x)
        return self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))


# ------------------------------------------------------------------------------ the plans
@dataclass(frozen=True)
class CNNProjectorPlan:
    """A CNN branch: ``sepconvs`` ``(C_in, C_out)`` in order, or the 1x1 ``pointwise`` conv;
    then global average pooling and ``Linear(head_in, K)``."""

    sepconvs: tuple[tuple[int, int], ...]
    pointwise: tuple[int, int] | None
    head_in: int


@dataclass(frozen=True)
class TokenProjectorPlan:
    """A ViT branch: ``merges`` ``(grid_in, C_in, C_out, gelu)`` in order; ``proj`` a linear
    ``(C_in, C_out)`` when no merge reaches the width (kdlab); ``blocks`` transformer blocks of
    width ``dim``; ``pool`` "cls" or "mean"; then ``Linear(dim, K)``."""

    merges: tuple[tuple[int, int, int, bool], ...]
    proj: tuple[int, int] | None
    blocks: int
    dim: int
    pool: Literal["cls", "mean"]


def cnn_projector_plan(in_chans: int, stage: int, num_stages: int, student_dim: int,
                       teacher_dim: int) -> CNNProjectorPlan:
    """The official CNN projector of ``stage`` (Hao et al., NeurIPS 2023, ``OFA.__init__``).

    ``d = num_stages - stage`` SepConv downsamplings (the official ``4 - stage``); the ``j``-th
    maps ``in_chans * 2^j`` to ``in_chans * 2^(j+1)``, the last one to ``max(C_s, C_t)``; the last
    stage (``d = 0``) gets a 1x1 convolution ``in_chans -> max(C_s, C_t)``. The head is
    ``Linear(max(C_s, C_t), K)``.
    """
    width = max(student_dim, teacher_dim)
    down = num_stages - stage
    if down <= 0:
        return CNNProjectorPlan((), (in_chans, width), width)
    convs = tuple((in_chans * 2**j, width if j == down - 1 else in_chans * 2 ** (j + 1))
                  for j in range(down))
    return CNNProjectorPlan(convs, None, width)


def official_vit_stage(block: int, depth: int) -> int:
    """The official stage (1-4) of a ViT's ``block`` (1-based) among ``depth`` blocks.

    The official code splits a 12-block ViT into stages ending at blocks 2, 4, 10, 12; kdlab
    scales those ends to ``depth`` (``floor(depth * e / 12 + 1/2)``), so ``depth = 12`` gives the
    official split. Hao et al., NeurIPS 2023, ``custom_forward/vision_transformer.py``.
    """
    ends = [math.floor(depth * e / 12 + 0.5) for e in OFFICIAL_VIT_STAGE_ENDS[:3]]
    return 1 + sum(1 for e in ends if e < block)


def token_projector_plan(grid: tuple[int, int], dim_in: int, official_stage: int,
                         student_dim: int, class_token: bool,
                         final_patch_grid: int = 7) -> TokenProjectorPlan:
    """The official ViT projector of a stage (Hao et al., NeurIPS 2023, ``OFA.__init__``).

    ``m = max(floor(log2(g / final_patch_grid)), 0)`` patch mergings (``g`` the grid side), the
    first ``dim_in -> C_s`` with GELU, the others ``C_s -> C_s`` with GELU except the last (no
    activation), as the official loop; ``max(4 - s, 1)`` blocks of width ``C_s``; the class token
    when the student has one, else the mean of the tokens. With no merging and ``dim_in != C_s``
    (a hierarchical student) kdlab adds a linear projection, which the official code lacks.

    Raises:
        MethodError: when a merge would halve an odd grid side.
    """
    side = min(grid)
    merges = max(math.floor(math.log2(side / final_patch_grid)), 0)
    steps = []
    h, w, d = grid[0], grid[1], dim_in
    for j in range(merges):
        if h % 2 or w % 2:
            raise MethodError(f"ofa: patch merging needs an even token grid, got {h}x{w}; set "
                              f"method.params.final_patch_grid larger than {final_patch_grid}")
        steps.append((h, d, student_dim, j == 0 or j != merges - 1))
        h, w, d = h // 2, w // 2, student_dim
    proj = (dim_in, student_dim) if not steps and dim_in != student_dim else None
    return TokenProjectorPlan(tuple(steps), proj, max(4 - official_stage, 1), student_dim,
                              "cls" if class_token else "mean")


def build_projector(plan: CNNProjectorPlan | TokenProjectorPlan, num_classes: int) -> nn.Module:
    """The branch module ``P_i`` of ``plan``: ``B x C x H x W`` stage features -> ``B x K``
    logits (Hao et al., NeurIPS 2023), initialised as the official ``init_weights`` (conv:
    Kaiming normal, fan-out, ReLU; BN 1/0; linear: truncated normal std 0.02, bias 0; kdlab's
    projector class token: truncated normal std 0.02)."""
    module: nn.Module
    if isinstance(plan, TokenProjectorPlan):
        module = _TokenProjector(plan, num_classes)
        if module.cls_token is not None:
            nn.init.trunc_normal_(module.cls_token, std=0.02)
    else:
        convs: list[nn.Module] = [SepConv(c_in, c_out) for c_in, c_out in plan.sepconvs]
        if plan.pointwise is not None:
            convs.append(nn.Conv2d(*plan.pointwise, kernel_size=1))
        module = nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(plan.head_in, num_classes))
    module.apply(_init_official)
    return module


def _init_official(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------ the method
def default_stages(num_stages: int, token_grid: bool) -> list[int]:
    """The stages that get a branch by default (Hao et al., NeurIPS 2023): every stage ``1..n``
    of a CNN (the official ``--ofa-stage 1 2 3 4`` of four-stage students); for a ViT of ``n``
    blocks, the last block ``b`` of each official stage, ``stage(b + 1) != stage(b)``
    (:func:`official_vit_stage`: blocks 2, 4, 10, 12 of 12)."""
    if not token_grid:
        return list(range(1, num_stages + 1))
    ends = {b for b in range(1, num_stages + 1)
            if b == num_stages or official_vit_stage(b + 1, num_stages)
            != official_vit_stage(b, num_stages)}
    return sorted(ends)


def _has_class_token(model: KdModel) -> bool:
    """Whether a ViT has a class token (a ``cls_token`` parameter, kdlab's or timm's)."""
    return any(isinstance(getattr(m, "cls_token", None), nn.Parameter) for m in model.modules())


def _check_stages(stages: list[int], num_stages: int) -> None:
    if num_stages < 1:
        raise MethodError("ofa: the student exposes no stage features (ModelOutput.features "
                          "needs the stem followed by one map per stage); use a kdlab zoo model "
                          "or an adapter that fills `features`")
    bad = [s for s in stages if s > num_stages]
    if bad:
        raise MethodError(f"ofa: stages {bad} out of range: the student has {num_stages} stages; "
                          f"choose method.params.stages from 1..{num_stages}")


def _resolve_eps(eps: float | list[float], num_stages: int) -> list[float]:
    if not isinstance(eps, list):
        return [float(eps)] * (num_stages + 1)
    if len(eps) == 1:
        return [float(eps[0])] * (num_stages + 1)
    if len(eps) != num_stages + 1:
        raise MethodError(f"ofa: eps has {len(eps)} values but {num_stages} stages need "
                          f"{num_stages + 1} (one per stage, then the final logits) or one")
    return [float(e) for e in eps]


@register_method
class OFA(Distiller[OFAParams]):
    """OFA-KD (Hao et al., NeurIPS 2023): ``ce_weight * CE_ls + ofa_weight * sum_i
    L_OFA(P_i(F_s^i), z_t) + kd_weight * L_OFA(z_s, z_t)``, one projector ``P_i`` per stage.

    The projectors (``self.projectors``, keyed by stage) are trained with the student and saved
    in its checkpoint. Terms: ``"ce"``, ``"ofa_stage<i>"`` per stage and ``"ofa_logits"``.
    """

    name = "ofa"
    kind = "logit"
    needs_stage_features = True

    def __init__(self, params: OFAParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        feats = ctx.student_probe.features
        num_stages = len(feats) - 1
        token_grid = is_token_grid(ctx.student)
        self.stages = params.stages or default_stages(max(num_stages, 0), token_grid)
        _check_stages(self.stages, num_stages)
        self.eps = _resolve_eps(params.eps, len(self.stages))
        dim_s = pooled_embedding(ctx.student_probe).shape[1]
        dim_t = pooled_embedding(ctx.require_teacher_probe(self.name)).shape[1]
        self.projectors = nn.ModuleDict()
        for stage in self.stages:
            plan = self._plan(feats[stage], stage, num_stages, (dim_s, dim_t), token_grid)
            self.projectors[str(stage)] = build_projector(plan, ctx.num_classes)

    def _plan(self, feat: Tensor, stage: int, num_stages: int, dims: tuple[int, int],
              token_grid: bool) -> CNNProjectorPlan | TokenProjectorPlan:
        """The projector plan of one stage from its probe feature ``B x C x H x W``."""
        if feat.dim() != 4:
            raise MethodError(f"ofa: student features[{stage}] must be a B x C x H x W map, got "
                              f"shape {tuple(feat.shape)}")
        _, c, h, w = (int(v) for v in feat.shape)
        if not token_grid:
            return cnn_projector_plan(c, stage, num_stages, *dims)
        if dims[0] % PROJECTOR_HEADS:
            raise MethodError(f"ofa: the ViT projector blocks have {PROJECTOR_HEADS} heads, so "
                              f"the student's width {dims[0]} must be divisible by it")
        return token_projector_plan((h, w), c, official_vit_stage(stage, num_stages), dims[0],
                                    _has_class_token(self.ctx.student),
                                    self.params.final_patch_grid)

    def describe(self) -> dict[str, Any]:
        """The name, the params and the resolved ``stages``, ``eps`` (stages, then the final
        logits) and each projector's parameter count (recorded in the run's method.json)."""
        sizes = {s: sum(p.numel() for p in self.projectors[str(s)].parameters())
                 for s in self.stages}
        return {**super().describe(), "resolved": {
            "stages": list(self.stages), "eps": list(self.eps), "projector_params": sizes}}

    def branch_logits(self, out_s: ModelOutput) -> dict[int, Tensor]:
        """Each chosen stage's branch logits ``z_i = P_i(F_s^i)`` (``B x K``; Hao et al.,
        NeurIPS 2023), computed in the projectors' dtype (float32 under autocast)."""
        out = {}
        for stage in self.stages:
            proj = self.projectors[str(stage)]
            dtype = next(proj.parameters()).dtype
            out[stage] = proj(out_s.features[stage].to(dtype))
        return out

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        """``{"ce": ce_weight * CE_ls(z_s, y), "ofa_stage<i>": ofa_weight * L_OFA(z_i, z_t, y,
        eps_i, T), "ofa_logits": kd_weight * L_OFA(z_s, z_t, y, eps_last, T)}``, every term
        already weighted (Hao et al., NeurIPS 2023, the official ``OFA.forward``)."""
        p = self.params
        y, zt = batch.labels, out_t.logits
        terms = {"ce": p.ce_weight * F.cross_entropy(out_s.logits.float(), y,
                                                     label_smoothing=p.label_smoothing)}
        branches = self.branch_logits(out_s)
        for (stage, logits), eps in zip(branches.items(), self.eps[:-1], strict=True):
            terms[f"ofa_stage{stage}"] = p.ofa_weight * ofa_loss(logits, zt, y, eps,
                                                                 p.temperature)
        terms["ofa_logits"] = p.kd_weight * ofa_loss(out_s.logits, zt, y, self.eps[-1],
                                                     p.temperature)
        return terms
