"""Every partner method on heterogeneous and ViT pairs (docs/methods/heterogeneous.md).

Built through the normal path (``DistillContext.from_models`` -> ``build_method``, a partner
alone being composed with ``vanilla``) on kdlab zoo models at 32 px: a CNN student with a ViT
teacher (resnet8 <- vit_lite_7), a ViT student with a CNN teacher (vit_tiny <- resnet14) and two
ViTs (vit_tiny <- vit_lite_7). Each partner either runs one step (finite terms, gradients of its
own terms reach the student and its helper modules, none reach the teacher) or is refused at
build time with the exact one-line ``MethodError``; the pairing and resizing rules are checked
one by one.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import MethodConfig
from kdlab.core.errors import MethodError
from kdlab.methods import Batch, DistillContext, build_method, list_methods
from kdlab.methods.base import Distiller
from kdlab.methods.feature import (
    ConvRegressor,
    GridRegressor,
    relative_stage,
    resize_to_grid,
    stage_pairs,
)
from kdlab.methods.reviewkd import ABF, level_pairs, review_levels
from kdlab.models import create_model
from kdlab.models.output import KdModel

K = 10
SIZE = 32
N_TRAIN = 40

#: pair id -> (student arch, teacher arch, input channels)
PAIRS: dict[str, tuple[str, str, int]] = {
    "cnn_student-vit_teacher": ("resnet8", "vit_lite_7", 1),
    "vit_student-cnn_teacher": ("vit_tiny", "resnet14", 3),
    "vit_student-vit_teacher": ("vit_tiny", "vit_lite_7", 1),
}
PARTNERS = list_methods("partner")
#: small CRD (the default 16384 negatives exceed these 40 training samples)
PARAMS: dict[str, dict[str, Any]] = {"crd": {"nce_k": 16, "feat_dim": 8, "seed": 0}}
HAS_HELPERS = {"fitnet", "crd", "reviewkd"}

AT_REFUSAL = (
    "at: a {s} student with a {t} teacher: attention transfer equates raw activation-energy maps "
    "of different kinds with nothing trainable between them; use fitnet (projected hint), rkd, "
    "pkt, sp or crd, or set cross_architecture: true to pair stages by relative depth anyway"
)
VIT, CNN = "ViT (token grid)", "CNN"
#: (partner, pair) -> the exact MethodError of a refusal; every other combination runs.
REFUSED = {
    ("at", "cnn_student-vit_teacher"): AT_REFUSAL.format(s=CNN, t=VIT),
    ("at", "vit_student-cnn_teacher"): AT_REFUSAL.format(s=VIT, t=CNN),
}


@pytest.fixture(scope="module")
def contexts() -> dict[str, DistillContext]:
    """One context per pair (models built once: vit_lite_7 is the largest model here)."""
    out = {}
    for name, (s_arch, t_arch, c) in PAIRS.items():
        torch.manual_seed(0)
        student = create_model(s_arch, num_classes=K, in_channels=c)
        teacher = create_model(t_arch, num_classes=K, in_channels=c).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        out[name] = DistillContext.from_models(
            student, teacher, num_classes=K, train_labels=torch.arange(N_TRAIN) % K,
            input_size=SIZE)
    return out


def build(ctx: DistillContext, name: str, **params: Any) -> Distiller[Any]:
    """The partner ``name`` built as a run builds it; the partner part of the composite."""
    torch.manual_seed(1)
    composite = build_method(MethodConfig(name=name, params={**PARAMS.get(name, {}), **params}),
                             ctx)
    assert composite.logit.name == "vanilla" and len(composite.partners) == 1
    return composite.partners[0]  # type: ignore[return-value]


def step(ctx: DistillContext, d: Distiller[Any], b: int = 4) -> dict[str, Tensor]:
    """One training step's partner terms (student with gradients, frozen teacher)."""
    student, teacher = ctx.student, ctx.teacher
    assert teacher is not None
    g = torch.Generator().manual_seed(2)
    images = torch.randn(b, student.in_channels, SIZE, SIZE, generator=g)
    index = torch.arange(b)
    student.train()
    student.zero_grad(set_to_none=True)
    d.zero_grad(set_to_none=True)
    out_s = student(images)
    with torch.no_grad():
        out_t = teacher(images)
    return d(out_s, out_t.detach(), Batch(images, index % K, index), 30)


def grad_norm(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", PARTNERS)
def test_partner_runs_or_is_refused(contexts: dict[str, DistillContext], name: str,
                                    pair: str) -> None:
    ctx = contexts[pair]
    refusal = REFUSED.get((name, pair))
    if refusal is not None:
        assert "\n" not in refusal
        with pytest.raises(MethodError, match=f"^{re.escape(refusal)}$"):
            build(ctx, name)
        return
    d = build(ctx, name)
    terms = step(ctx, d)
    assert terms
    for key, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    torch.stack(list(terms.values())).sum().backward()
    assert grad_norm(ctx.student) > 0
    assert ctx.teacher is not None
    assert all(p.grad is None for p in ctx.teacher.parameters())
    if name in HAS_HELPERS:
        helpers = [p for p in d.parameters() if p.requires_grad]
        assert helpers and all(p.grad is not None for p in helpers), name
        assert grad_norm(d) > 0


# ----------------------------------------------------------------------------- the rules


def test_relative_stage_and_stage_pairs() -> None:
    assert [relative_stage(i, 3, 7) for i in range(4)] == [0, 2, 5, 7]
    assert [relative_stage(i, 4, 3) for i in range(5)] == [0, 1, 2, 2, 3]
    assert [relative_stage(i, 4, 7) for i in range(5)] == [0, 2, 4, 5, 7]
    assert [relative_stage(i, 3, 3) for i in range(4)] == [0, 1, 2, 3]
    assert stage_pairs(3, 7) == [(1, 2), (2, 5), (3, 7)]
    assert stage_pairs(4, 3) == [(1, 1), (3, 2), (4, 3)]
    assert stage_pairs(4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    with pytest.raises(ValueError):
        relative_stage(4, 3, 7)


def test_resize_to_grid_pools_down_and_interpolates_up() -> None:
    x = torch.randn(2, 3, 32, 32)
    down = resize_to_grid(x, (8, 8))
    blocks = x.reshape(2, 3, 8, 4, 8, 4).mean(dim=(3, 5))  # the mean of each 4x4 patch
    torch.testing.assert_close(down, blocks)
    small = torch.randn(2, 3, 8, 8)
    up = resize_to_grid(small, (16, 16))
    torch.testing.assert_close(
        up, F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False))
    assert resize_to_grid(small, (8, 8)) is small


@pytest.mark.parametrize(
    ("pair", "teacher_hint", "relu"),
    [("cnn_student-vit_teacher", 5, False),  # stage 2 of 3 -> block 5 of 7 (4.67)
     ("vit_student-cnn_teacher", 2, True),  # block 2 of 4 -> stage 2 of 3 (1.5)
     ("vit_student-vit_teacher", 4, False)],  # block 2 of 4 -> block 4 of 7 (3.5)
)
def test_fitnet_hint_at_relative_depth_through_a_grid_regressor(
        contexts: dict[str, DistillContext], pair: str, teacher_hint: int, relu: bool) -> None:
    ctx = contexts[pair]
    assert ctx.teacher_probe is not None
    d = build(ctx, "fitnet")
    assert d.teacher_hint_layer == teacher_hint  # type: ignore[attr-defined]
    reg = d.regressor  # type: ignore[attr-defined]
    assert isinstance(reg, GridRegressor) and reg.use_relu is relu
    assert isinstance(reg.conv, nn.Conv2d) and reg.conv.kernel_size == (1, 1)
    hint = ctx.student_probe.features[2]
    target = ctx.teacher_probe.features[teacher_hint]
    out = reg.eval()(hint)
    assert out.shape == target.shape
    if not relu:  # a ViT teacher's tokens are signed: the regressor must reach negative values
        assert bool((target < 0).any()) and bool((out < 0).any())
    resolved = d.describe()["resolved"]
    assert resolved == {"hint_layer": 2, "teacher_hint_layer": teacher_hint,
                        "regressor": "GridRegressor", "regressor_relu": relu}


def test_fitnet_explicit_teacher_hint_and_relu(contexts: dict[str, DistillContext]) -> None:
    ctx = contexts["cnn_student-vit_teacher"]
    d = build(ctx, "fitnet", hint_layer=3, teacher_hint_layer=7, regressor_relu=True)
    assert d.teacher_hint_layer == 7 and d.regressor.use_relu  # type: ignore[attr-defined]
    with pytest.raises(MethodError, match=r"teacher_hint_layer <= 7$"):
        build(ctx, "fitnet", teacher_hint_layer=8)
    with pytest.raises(MethodError, match=r"choose hint_layer <= 3 "):
        build(ctx, "fitnet", hint_layer=4)


def test_two_cnns_keep_the_reference_rules() -> None:
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=K, in_channels=1)
    teacher = create_model("resnet14", num_classes=K, in_channels=1).eval()
    ctx = DistillContext.from_models(student, teacher, num_classes=K,
                                     train_labels=torch.arange(N_TRAIN) % K, input_size=SIZE)
    fitnet = build(ctx, "fitnet")
    assert fitnet.teacher_hint_layer == 2  # type: ignore[attr-defined]
    assert isinstance(fitnet.regressor, ConvRegressor)  # type: ignore[attr-defined]
    assert fitnet.regressor.use_relu  # type: ignore[attr-defined]
    assert build(ctx, "at").pairs == [(1, 1), (2, 2), (3, 3)]  # type: ignore[attr-defined]
    review = build(ctx, "reviewkd")
    assert review.pairs == [(0, 0), (1, 1), (2, 2), (3, 3)]  # type: ignore[attr-defined]
    assert not any(abf.smooth_resize for abf in review.abfs)  # type: ignore[attr-defined]


def test_at_pairs_vits_by_relative_depth(contexts: dict[str, DistillContext]) -> None:
    d = build(contexts["vit_student-vit_teacher"], "at")
    assert d.pairs == [(1, 2), (2, 4), (3, 5), (4, 7)]  # type: ignore[attr-defined]
    assert d.describe()["resolved"] == {"pairs": [[1, 2], [2, 4], [3, 5], [4, 7]]}


@pytest.mark.parametrize(("pair", "pairs"), [
    ("cnn_student-vit_teacher", [(1, 2), (2, 5), (3, 7)]),
    ("vit_student-cnn_teacher", [(1, 1), (3, 2), (4, 3)]),
])
def test_at_cross_architecture_opt_in(contexts: dict[str, DistillContext], pair: str,
                                      pairs: list[tuple[int, int]]) -> None:
    ctx = contexts[pair]
    d = build(ctx, "at", cross_architecture=True)
    assert d.pairs == pairs  # type: ignore[attr-defined]
    terms = step(ctx, d)
    terms["at"].backward()
    assert torch.isfinite(terms["at"]) and grad_norm(ctx.student) > 0


@pytest.mark.parametrize(("pair", "pairs"), [
    # levels: stages 1..n (0-based), then the pooled embedding
    ("cnn_student-vit_teacher", [(0, 1), (1, 4), (2, 6), (3, 7)]),
    ("vit_student-cnn_teacher", [(0, 0), (2, 1), (3, 2), (4, 3)]),
    ("vit_student-vit_teacher", [(0, 1), (1, 3), (2, 4), (3, 6), (4, 7)]),
])
def test_reviewkd_levels_at_relative_depth_with_smooth_resizes(
        contexts: dict[str, DistillContext], pair: str, pairs: list[tuple[int, int]]) -> None:
    ctx = contexts[pair]
    d = build(ctx, "reviewkd")
    assert d.pairs == pairs  # type: ignore[attr-defined]
    assert all(abf.smooth_resize for abf in d.abfs)  # type: ignore[attr-defined]
    assert level_pairs(4, 8, False, True) == [(0, 4), (1, 5), (2, 6), (3, 7)]  # two CNNs
    assert ctx.teacher_probe is not None
    t_levels = review_levels(ctx.teacher_probe, preact=True)
    sizes = [(int(t_levels[j].shape[-2]), int(t_levels[j].shape[-1])) for _, j in pairs]
    assert sizes[-1] == (1, 1)  # the pooled embedding
    x = torch.randn(2, ctx.student.in_channels, SIZE, SIZE)
    out = d.review(ctx.student.eval()(x), sizes)  # type: ignore[operator]
    assert [o.shape[1:] for o in out] == [t_levels[j].shape[1:] for _, j in pairs]


def test_abf_smooth_resize_averages_instead_of_subsampling() -> None:
    torch.manual_seed(0)
    abf = ABF(4, 4, 4, fuse=False, smooth_resize=True).eval()
    x = torch.randn(1, 4, 32, 32)
    _, kept = abf(x, None, (8, 8))
    torch.testing.assert_close(kept, F.adaptive_avg_pool2d(abf.conv1(x), (8, 8)))
    nearest = ABF(4, 4, 4, fuse=False).eval()
    nearest.load_state_dict(abf.state_dict())
    _, sub = nearest(x, None, (8, 8))
    torch.testing.assert_close(sub, F.interpolate(abf.conv1(x), size=(8, 8), mode="nearest"))


def test_token_grid_flags_of_the_zoo(contexts: dict[str, DistillContext]) -> None:
    """The rules key on ``KdModel.token_grid``: kdlab's ViTs set it, its CNNs do not."""
    models: list[KdModel] = [contexts["vit_student-cnn_teacher"].student,
                             create_model("resnet8", num_classes=K)]
    assert [m.token_grid for m in models] == [True, False]


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", ["fitnet", "at", "reviewkd"])
def test_projected_partners_under_bf16_autocast(contexts: dict[str, DistillContext], name: str,
                                                pair: str) -> None:
    """The trainer runs the models under autocast and the distiller outside it: the regressors
    and fusions take bf16 maps and the terms stay float32."""
    ctx = contexts[pair]
    assert ctx.teacher is not None
    d = build(ctx, name, **({"cross_architecture": True} if name == "at" else {}))
    x = torch.randn(4, ctx.student.in_channels, SIZE, SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            out_t = ctx.teacher(x)
        out_s = ctx.student(x)
    terms = d(out_s, out_t, Batch(x, torch.arange(4) % K, torch.arange(4)), 30)
    for key, value in terms.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), key
