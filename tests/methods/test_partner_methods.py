"""Partner distillers (fitnet, at, rkd, sp, pkt, crd, reviewkd) on tiny fake KdModels.

The generic tests run every partner of the registry at collection time
(``list_methods("partner")``); ``EXTRA`` and ``HAS_HELPERS`` are per-name overrides only.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.methods.base import Batch, DistillContext, Distiller
from kdlab.methods.crd import CRD, CRDParams
from kdlab.methods.feature import AT, PKT, RKD, SP, ConvRegressor, FitNet
from kdlab.methods.registry import get_method, list_methods
from kdlab.methods.reviewkd import ReviewKD, review_levels
from kdlab.models.output import KdModel, ModelOutput

INPUT = 16
N_TRAIN = 60
N_CLASSES = 4


class TinyNet(KdModel):
    """Stem + conv stages (conv-BN, ReLU) + linear classifier, exposing a full ModelOutput."""

    def __init__(self, widths: list[int], strides: list[int], stem_stride: int = 1) -> None:
        super().__init__()
        self.num_classes, self.in_channels = N_CLASSES, 3
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stem_stride, 1), nn.BatchNorm2d(4))
        chans = [4, *widths]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, s, 1), nn.BatchNorm2d(chans[i + 1]))
            for i, s in enumerate(strides)
        )
        self.classifier = nn.Linear(widths[-1], N_CLASSES)

    def forward(self, x: Tensor) -> ModelOutput:
        pre = self.stem(x)
        f = F.relu(pre)
        feats, preacts = [f], [pre]
        for stage in self.stages:
            pre = stage(f)
            f = F.relu(pre)
            feats.append(f)
            preacts.append(pre)
        emb = f.mean(dim=(2, 3))
        return ModelOutput(
            logits=self.classifier(emb),
            feature_map=f,
            features=feats,
            embedding=emb,
            preact_features=preacts,
        )


# student/teacher pairs: 3 vs 4 stages, larger/smaller/equal hint maps, a 2x2 final map
PAIRS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "3v4": (
        {"widths": [6, 8, 12], "strides": [1, 2, 2]},
        {"widths": [8, 10, 14, 16], "strides": [1, 2, 2, 2]},
    ),
    "4v3": (
        {"widths": [4, 6, 8, 10], "strides": [1, 2, 2, 2]},
        {"widths": [8, 12, 16], "strides": [2, 2, 2]},
    ),
    "smaller": (
        {"widths": [6, 8, 12], "strides": [2, 2, 2]},
        {"widths": [10, 12, 20], "strides": [1, 2, 2]},
    ),
    "tiny_map": (
        {"widths": [6, 8, 12], "strides": [2, 2, 2], "stem_stride": 2},
        {"widths": [10, 12, 20], "strides": [1, 1, 2]},
    ),
}

#: every registered partner method, by name.
METHODS: dict[str, type[Distiller]] = {n: get_method(n) for n in list_methods("partner")}
# keep CRD small and quiet in the generic tests (nce_k warnings are tested separately)
EXTRA: dict[str, dict[str, Any]] = {"crd": {"nce_k": 16, "feat_dim": 8, "seed": 3}}
# partners known to train helper modules (the others of this list have none)
HAS_HELPERS = {"fitnet": True, "crd": True, "reviewkd": True,
               "at": False, "rkd": False, "sp": False, "pkt": False}


def make_models(pair: str) -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    s_cfg, t_cfg = PAIRS[pair]
    return TinyNet(**s_cfg), TinyNet(**t_cfg).eval()


def make_ctx(student: KdModel, teacher: KdModel, labels: Tensor | None = None) -> DistillContext:
    if labels is None:
        labels = torch.arange(N_TRAIN) % N_CLASSES
    return DistillContext.from_models(
        student, teacher, num_classes=N_CLASSES, train_labels=labels, input_size=INPUT
    )


def build(name: str, ctx: DistillContext, **params: Any) -> Distiller:
    cls = METHODS[name]
    torch.manual_seed(1)
    return cls(cls.Params(**{**EXTRA.get(name, {}), **params}), ctx)


def run(
    student: KdModel, teacher: KdModel, b: int = 6, seed: int = 0
) -> tuple[ModelOutput, ModelOutput, Batch]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, INPUT, INPUT, generator=g)
    index = torch.randperm(N_TRAIN, generator=g)[:b]
    out_s = student(images)
    with torch.no_grad():
        out_t = teacher(images)
    return out_s, out_t.detach(), Batch(images, index % N_CLASSES, index)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", list(METHODS))
def test_forward_backward_and_weight_linearity(name: str, pair: str) -> None:
    student, teacher = make_models(pair)
    ctx = make_ctx(student, teacher)
    d = build(name, ctx)
    assert d.kind == "partner" and d.name == name
    out_s, out_t, batch = run(student, teacher)
    terms = d(out_s, out_t, batch, epoch=30)
    assert terms
    for key, v in terms.items():
        assert v.dim() == 0 and v.dtype == torch.float32, key
        assert torch.isfinite(v), key
    total = sum(terms.values())
    assert isinstance(total, Tensor)
    total.backward()
    helpers = list(d.parameters())
    if name in HAS_HELPERS:
        assert bool(helpers) == HAS_HELPERS[name], name
    if helpers:  # an unknown partner's helpers are checked too
        assert all(p.grad is not None for p in helpers), name
        assert sum(float(p.grad.abs().sum()) for p in helpers if p.grad is not None) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    # the term is linear in `weight` (fresh distillers with identical initial state)
    w0 = d.params.weight  # type: ignore[attr-defined]
    vals = []
    for w in (0.5 * w0, 2 * w0, 0.0):
        dw = build(name, ctx, weight=w)
        o_s, o_t, bt = run(student, teacher)
        vals.append(sum(v.item() for v in dw(o_s, o_t, bt, epoch=30).values()))
    assert vals[1] == pytest.approx(4 * vals[0], rel=1e-4)
    assert vals[2] == 0.0


@pytest.mark.parametrize("name", list(METHODS))
def test_float32_terms_under_bf16_autocast(name: str) -> None:
    student, teacher = make_models("3v4")
    d = build(name, make_ctx(student, teacher))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s, out_t, batch = run(student, teacher)
        terms = d(out_s, out_t, batch, epoch=30)
    for key, v in terms.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), key


@pytest.mark.parametrize("name", list(METHODS))
def test_params_reject_unknown_keys_and_bad_values(name: str) -> None:
    params_cls = METHODS[name].Params
    p = params_cls()
    assert p.weight >= 0  # type: ignore[attr-defined]
    with pytest.raises(ValidationError):
        params_cls(not_an_option=1)
    with pytest.raises(ValidationError):
        params_cls(weight=-1.0)
    with pytest.raises(ValidationError):
        params_cls(weight="heavy")
    with pytest.raises(ValidationError):
        p.weight = 2.0  # type: ignore[misc]


def test_defaults_match_the_spec() -> None:
    assert FitNet.Params().weight == 100 and FitNet.Params().hint_layer == 2
    assert AT.Params().weight == 1000 and AT.Params().p == 2
    r = RKD.Params()
    assert (r.weight, r.distance_weight, r.angle_weight) == (1, 25, 50)
    assert SP.Params().weight == 3000
    assert PKT.Params().weight == 30000
    c = CRDParams()
    assert (c.weight, c.feat_dim, c.nce_k, c.nce_t, c.nce_m, c.mode) == (
        0.8,
        128,
        16384,
        0.07,
        0.5,
        "exact",
    )
    rv = ReviewKD.Params()
    assert (rv.weight, rv.warmup_epochs) == (1.0, 20)


@pytest.mark.parametrize(
    ("bad", "cls"),
    [
        ({"hint_layer": -1}, FitNet),
        ({"p": 0}, AT),
        ({"angle_weight": -1}, RKD),
        ({"nce_m": 1.0}, CRD),
        ({"nce_t": 0}, CRD),
        ({"nce_k": 0}, CRD),
        ({"mode": "relax"}, CRD),
        ({"warmup_epochs": -1}, ReviewKD),
    ],
)
def test_method_specific_bad_values(bad: dict[str, Any], cls: type[Distiller]) -> None:
    with pytest.raises(ValidationError):
        cls.Params(**bad)


# ----------------------------------------------------------------------------- FitNet


@pytest.mark.parametrize("pair", list(PAIRS))
def test_fitnet_regressor_matches_teacher_hint(pair: str) -> None:
    student, teacher = make_models(pair)
    ctx = make_ctx(student, teacher)
    d = build("fitnet", ctx)
    assert isinstance(d, FitNet)
    out = d.regressor(ctx.student_probe.features[2])
    assert out.shape == ctx.teacher_probe.features[2].shape


@pytest.mark.parametrize(
    ("s", "t", "kind"),
    [
        ((2, 3, 8, 8), (2, 5, 4, 4), nn.Conv2d),
        ((2, 3, 4, 4), (2, 5, 8, 8), nn.ConvTranspose2d),
        ((2, 3, 6, 6), (2, 5, 4, 4), nn.Conv2d),
        ((2, 3, 2, 2), (2, 5, 8, 8), nn.Conv2d),
        ((2, 3, 4, 4), (2, 5, 4, 4), nn.Conv2d),
    ],
)
def test_conv_regressor_shapes(s: tuple[int, ...], t: tuple[int, ...], kind: type) -> None:
    reg = ConvRegressor(s, t)
    assert isinstance(reg.conv, kind)
    assert reg(torch.randn(*s)).shape == t


def test_fitnet_bad_hint_layer_raises() -> None:
    student, teacher = make_models("3v4")
    with pytest.raises(MethodError, match="hint_layer"):
        build("fitnet", make_ctx(student, teacher), hint_layer=4)


# ----------------------------------------------------------------------------- CRD


def test_crd_reduces_nce_k_with_a_warning() -> None:
    student, teacher = make_models("3v4")
    ctx = make_ctx(student, teacher)
    with pytest.warns(UserWarning, match="nce_k"):
        d = CRD(CRDParams(feat_dim=8), ctx)  # default 16384 negatives
    assert d.nce_k == N_TRAIN - N_TRAIN // N_CLASSES
    out_s, out_t, batch = run(student, teacher)
    assert torch.isfinite(d(out_s, out_t, batch, 1)["crd"])


def test_crd_single_class_raises() -> None:
    student, teacher = make_models("3v4")
    ctx = make_ctx(student, teacher, labels=torch.zeros(10, dtype=torch.long))
    with pytest.raises(MethodError, match="classes"):
        CRD(CRDParams(nce_k=4), ctx)


def test_crd_memory_update_and_normalisation_constants() -> None:
    student, teacher = make_models("3v4")
    d = build("crd", make_ctx(student, teacher))
    assert isinstance(d, CRD)
    assert d.memory_s.shape == (N_TRAIN, 8) and d.memory_t.shape == (N_TRAIN, 8)
    out_s, out_t, batch = run(student, teacher)
    old_s, old_t = d.memory_s.clone(), d.memory_t.clone()
    with torch.no_grad():
        e_s = F.normalize(d.embed_s(out_s.embedding), dim=1)  # type: ignore[arg-type]
        e_t = F.normalize(d.embed_t(out_t.embedding), dim=1)  # type: ignore[arg-type]
    assert float(d.z_s) < 0 and float(d.z_t) < 0
    d(out_s, out_t, batch, 1)
    assert float(d.z_s) > 0 and float(d.z_t) > 0
    idx = batch.index
    m = 0.5
    want_s = m * old_s[idx] + (1 - m) * e_s
    want_t = m * old_t[idx] + (1 - m) * e_t
    assert torch.allclose(d.memory_s[idx], want_s / want_s.norm(dim=1, keepdim=True), atol=1e-6)
    assert torch.allclose(d.memory_t[idx], want_t / want_t.norm(dim=1, keepdim=True), atol=1e-6)
    rest = torch.ones(N_TRAIN, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(d.memory_s[rest], old_s[rest])
    # Z is fixed after the first batch; eval mode leaves the bank untouched
    z = float(d.z_s)
    d.eval()
    snapshot = d.memory_s.clone()
    out_s, out_t, batch = run(student, teacher, seed=1)
    d(out_s, out_t, batch, 1)
    assert torch.equal(d.memory_s, snapshot) and float(d.z_s) == z


def test_crd_negatives_are_other_classes_and_resume_exactly() -> None:
    student, teacher = make_models("3v4")
    ctx = make_ctx(student, teacher)
    d = build("crd", ctx)
    assert isinstance(d, CRD)
    index = torch.arange(12)
    neg = d.draw_negatives(index)
    labels = ctx.train_labels
    assert neg.shape == (12, d.nce_k)
    assert not bool((labels[neg] == labels[index].unsqueeze(1)).any())
    out_s, out_t, batch = run(student, teacher)
    d(out_s, out_t, batch, 1)
    state = d.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(state)
    assert "train_labels" not in state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh = CRD(CRDParams(nce_k=16, feat_dim=8, seed=99), ctx)
    fresh.load_state_dict(state)
    assert fresh.seed == d.seed and fresh.step == d.step == 1
    assert torch.equal(fresh.draw_negatives(index), d.draw_negatives(index))
    o_s, o_t, b = run(student, teacher, seed=2)
    assert fresh(o_s, o_t, b, 2)["crd"].item() == pytest.approx(d(o_s, o_t, b, 2)["crd"].item())


def test_crd_with_replacement_sampling() -> None:
    student, teacher = make_models("3v4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = build(
            "crd", make_ctx(student, teacher), negative_sampling="with_replacement", nce_k=100
        )
    assert isinstance(d, CRD) and d.nce_k == 100  # i.i.d. draws may exceed the pool
    labels = d.train_labels
    neg = d.draw_negatives(torch.arange(8))
    assert neg.shape == (8, 100)
    assert not bool((labels[neg] == labels[:8].unsqueeze(1)).any())
    out_s, out_t, batch = run(student, teacher)
    assert torch.isfinite(d(out_s, out_t, batch, 1)["crd"])


# ----------------------------------------------------------------------------- ReviewKD


@pytest.mark.parametrize("pair", list(PAIRS))
def test_reviewkd_outputs_match_teacher_levels(pair: str) -> None:
    student, teacher = make_models(pair)
    ctx = make_ctx(student, teacher)
    d = build("reviewkd", ctx)
    assert isinstance(d, ReviewKD)
    n_s = len(ctx.student_probe.features) - 1
    n_t = len(ctx.teacher_probe.features) - 1
    assert d.num_levels == min(n_s, n_t) + 1
    t_levels = review_levels(ctx.teacher_probe, preact=True)[-d.num_levels :]
    sizes = [tuple(f.shape[-2:]) for f in t_levels]
    out = d.review(student(torch.randn(2, 3, INPUT, INPUT)), sizes)  # type: ignore[arg-type]
    assert [o.shape[1:] for o in out] == [f.shape[1:] for f in t_levels]


def test_reviewkd_uses_teacher_preact_and_warms_up() -> None:
    student, teacher = make_models("3v4")
    ctx = make_ctx(student, teacher)
    d = build("reviewkd", ctx)
    out_s, out_t, batch = run(student, teacher)
    v20 = d(out_s, out_t, batch, 20)["reviewkd"].item()
    v5 = d(out_s, out_t, batch, 5)["reviewkd"].item()
    v40 = d(out_s, out_t, batch, 40)["reviewkd"].item()
    assert v5 == pytest.approx(v20 * 5 / 20, rel=1e-5)
    assert v40 == pytest.approx(v20, rel=1e-5)
    d_post = build("reviewkd", ctx, teacher_preact=False)
    assert d_post(out_s, out_t, batch, 20)["reviewkd"].item() != pytest.approx(v20)


def test_partners_reject_models_without_stage_features() -> None:
    student, teacher = make_models("3v4")
    ctx = make_ctx(student, teacher)
    ctx.student_probe = ModelOutput(
        logits=ctx.student_probe.logits, feature_map=ctx.student_probe.feature_map
    )
    for name in ("at", "sp", "reviewkd", "fitnet"):
        with pytest.raises(MethodError):
            build(name, ctx)
