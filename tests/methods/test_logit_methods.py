"""Tests of the logit distillers (vanilla, kd, dkd, nkd, dckd) and the SDD ones (sd_*).

The SDD distillers are built on tiny fake KdModels (a conv + a linear classifier), so these tests
do not depend on the model zoo.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import kdlab.methods.logit  # noqa: F401  (registers the methods)
import kdlab.methods.sdd  # noqa: F401
from kdlab.core.errors import MethodError
from kdlab.losses.dckd import dckd_loss
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss
from kdlab.losses.sdd import multiscale_logits, sdd_loss
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.logit import DKDParams
from kdlab.methods.registry import get_method, list_methods
from support import TinyNet

K = 5
#: every registered logit method at collection time, but those that need a student with a DeiT
#: distillation token or with stage features, which TinyNet lacks (test_deit_method.py and
#: test_ofa_method.py test them)
NAMES = [n for n in list_methods("logit")
         if not (get_method(n).needs_distillation_token or get_method(n).needs_stage_features
                 or get_method(n).needs_dense_maps)]
SDD_NAMES = ["sd_kd", "sd_dkd", "sd_nkd"]



def _setup(s_side: int = 8, t_side: int = 8, b: int = 4):
    student, teacher = TinyNet(6, s_side, 0, K), TinyNet(10, t_side, 1, K)
    ctx = DistillContext.from_models(
        student, teacher, num_classes=K, train_labels=torch.randint(0, K, (20,)), input_size=32
    )
    g = torch.Generator().manual_seed(2)
    images = torch.randn(b, 3, 32, 32, generator=g)
    batch = Batch(images=images, labels=torch.randint(0, K, (b,), generator=g),
                  index=torch.arange(b))
    out_s = student(images)
    with torch.no_grad():
        out_t = teacher(images).detach()
    return ctx, batch, out_s, out_t


def _build(name: str, ctx: DistillContext, **params):
    cls = get_method(name)
    return cls(cls.Params(**params), ctx)


@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_finite_scalar_terms(name: str) -> None:
    ctx, batch, out_s, out_t = _setup()
    method = _build(name, ctx)
    assert method.kind == "logit"
    terms = method(out_s, out_t, batch, epoch=5)
    assert "ce" in terms
    assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
    sum(terms.values()).backward()
    assert ctx.student.classifier.weight.grad is not None
    assert ctx.teacher.classifier.weight.grad is None
    assert list(method.parameters()) == []  # the models are not submodules
    expected_clip = 40.0 if name in SDD_NAMES else None
    assert method.default_clip_grad_norm == expected_clip


def test_terms_equal_the_losses_with_default_weights() -> None:
    ctx, batch, out_s, out_t = _setup()
    zs, zt, y = out_s.logits, out_t.logits, batch.labels
    ce = torch.nn.functional.cross_entropy(zs, y)
    kd = _build("kd", ctx)(out_s, out_t, batch, 1)
    torch.testing.assert_close(kd["ce"], 0.1 * ce)
    torch.testing.assert_close(kd["kd"], 0.9 * kd_loss(zs, zt, 4.0))
    nkd = _build("nkd", ctx)(out_s, out_t, batch, 40)
    torch.testing.assert_close(nkd["nkd"], nkd_loss(zs, zt, y, 1.0, 1.5))
    dckd = _build("dckd", ctx)(out_s, out_t, batch, 40)
    torch.testing.assert_close(dckd["dckd"], dckd_loss(zs, zt, y, 1.0, 8.0, 4.0))
    van = _build("vanilla", ctx)(out_s, None, batch, 1)
    assert set(van) == {"ce"}
    torch.testing.assert_close(van["ce"], ce)


@pytest.mark.parametrize("name", ["dkd", "nkd", "dckd", "sd_dkd", "sd_nkd"])
def test_warmup_scaling(name: str) -> None:
    ctx, batch, out_s, out_t = _setup()
    method = _build(name, ctx)
    key = next(k for k in method(out_s, out_t, batch, 40) if k != "ce")
    full = method(out_s, out_t, batch, 40)[key]
    for epoch, factor in ((1, 0.05), (10, 0.5), (20, 1.0), (40, 1.0)):
        terms = method(out_s, out_t, batch, epoch)
        torch.testing.assert_close(terms[key], factor * full)
    no_warmup = _build(name, ctx, warmup_epochs=0)
    torch.testing.assert_close(no_warmup(out_s, out_t, batch, 1)[key], full)


def test_sd_kd_has_no_warmup() -> None:
    ctx, batch, out_s, out_t = _setup()
    method = _build("sd_kd", ctx)
    torch.testing.assert_close(
        method(out_s, out_t, batch, 1)["sdd"], method(out_s, out_t, batch, 40)["sdd"]
    )


@pytest.mark.parametrize("name", SDD_NAMES)
def test_sdd_term_matches_loss_functions(name: str) -> None:
    ctx, batch, out_s, out_t = _setup()
    method = _build(name, ctx, scales=[1, 2])
    ls = multiscale_logits(out_s.feature_map, ctx.student.classifier, (1, 2))
    lt = multiscale_logits(out_t.feature_map, ctx.teacher.classifier, (1, 2))
    base, kw, weight = {
        "sd_kd": ("kd", {"temperature": 4.0}, 0.9),
        "sd_dkd": ("dkd", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}, 1.0),
        "sd_nkd": ("nkd", {"temperature": 1.0, "gamma": 1.5, "legacy": False}, 1.0),
    }[name]
    want = weight * sdd_loss(ls, lt, batch.labels, base, kw)
    torch.testing.assert_close(method(out_s, out_t, batch, 40)["sdd"], want)


@pytest.mark.parametrize("name", SDD_NAMES)
def test_sdd_single_scale_is_the_base_method(name: str) -> None:
    ctx, batch, out_s, out_t = _setup(s_side=7, t_side=7)
    sdd = _build(name, ctx, scales=[1])(out_s, out_t, batch, 40)["sdd"]
    zs, zt, y = out_s.logits, out_t.logits, batch.labels
    want = {
        "sd_kd": lambda: 0.9 * kd_loss(zs, zt, 4.0),
        "sd_dkd": lambda: dkd_loss(zs, zt, y, 1.0, 8.0, 4.0),
        "sd_nkd": lambda: nkd_loss(zs, zt, y, 1.0, 1.5),
    }[name]()
    torch.testing.assert_close(sdd, want)


def test_sdd_accepts_two_by_two_student_map() -> None:
    # The MobileNetV2 case: a 2x2 student map under the 4x4 grid (cells repeat exactly).
    ctx, batch, out_s, out_t = _setup(s_side=2, t_side=8)
    terms = _build("sd_dkd", ctx)(out_s, out_t, batch, 40)
    assert torch.isfinite(terms["sdd"])


@pytest.mark.parametrize(("s_side", "t_side"), [(3, 8), (8, 3), (1, 8)])
def test_sdd_rejects_scale_larger_than_map(s_side: int, t_side: int) -> None:
    ctx, *_ = _setup(s_side=s_side, t_side=t_side)
    if s_side == 1:  # a 1x1 map: every cell would be the global one, so SD-KD would be KD
        with pytest.raises(MethodError, match="student TinyNet has a 1x1 final feature map"):
            _build("sd_kd", ctx)
        _build("sd_kd", ctx, scales=[1])  # no local regions asked for: the base loss, as chosen
        return
    who = "student" if s_side == 3 else "teacher"
    with pytest.raises(MethodError, match=who):
        _build("sd_kd", ctx)
    _build("sd_kd", ctx, scales=[1, 2])  # fits a 3x3 map
    with pytest.raises(MethodError):
        _build("sd_kd", ctx, scales=[1, 2, 3, 4])
    _build("sd_kd", ctx, scales=[1, 2, 3], pooling="direct")  # 3 fits a 3x3 map


def test_sdd_nested_grid_must_cover_scales() -> None:
    ctx, *_ = _setup()
    with pytest.raises(MethodError):
        _build("sd_kd", ctx, scales=[1, 2, 4], nested_grid=2)
    _build("sd_kd", ctx, scales=[1, 2], nested_grid=4)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("vanilla", {"ce_weight": -1.0}),
        ("vanilla", {"unknown": 1}),
        ("kd", {"temperature": 0.0}),
        ("kd", {"kd_weight": -0.5}),
        ("kd", {"T": 4.0}),
        ("dkd", {"warmup": -1}),
        ("dkd", {"warmup_epochs": -1}),
        ("dkd", {"beta": -8.0}),
        ("nkd", {"gamma": -1.0}),
        ("nkd", {"temperature": -1.0}),
        ("dckd", {"target_rule": "min"}),
        ("dckd", {"nontarget_source": "both"}),
        ("sd_kd", {"scales": [0, 1]}),
        ("sd_kd", {"scales": [2, 4]}),
        ("sd_kd", {"scales": [1, 1, 2]}),
        ("sd_kd", {"scales": [1, 2.5]}),
        ("sd_dkd", {"pooling": "max"}),
        ("sd_dkd", {"criterion": "region"}),
        ("sd_nkd", {"reduction": "none"}),
        ("sd_nkd", {"sdd_beta": -2.0}),
        ("sd_nkd", {"beta": 2.0}),  # NKD has gamma, not beta
    ],
)
def test_params_reject_bad_values(name: str, bad: dict) -> None:
    with pytest.raises(ValidationError):
        get_method(name).Params(**bad)


def test_params_defaults() -> None:
    kd = get_method("kd").Params()
    assert (kd.temperature, kd.ce_weight, kd.kd_weight) == (4.0, 0.1, 0.9)
    dkd = get_method("dkd").Params()
    assert (dkd.alpha, dkd.beta, dkd.temperature, dkd.warmup_epochs, dkd.ce_weight) == (
        1, 8, 4, 20, 1
    )
    nkd = get_method("nkd").Params()
    assert (nkd.temperature, nkd.gamma, nkd.legacy, nkd.warmup_epochs, nkd.ce_weight) == (
        1.0, 1.5, False, 20, 1.0
    )
    dckd = get_method("dckd").Params()
    assert (dckd.target_rule, dckd.nontarget_source, dckd.beta) == ("max", "teacher", 8.0)
    sdd = get_method("sd_dkd").Params(scales=[4, 1, 2])
    assert sdd.scales == [1, 2, 4]
    assert (sdd.pooling, sdd.sdd_beta, sdd.criterion, sdd.reduction) == (
        "nested", 2.0, "correctness", "mean"
    )
    assert get_method("sd_kd").Params().scales == [1, 2, 4]
    with pytest.raises(ValidationError):  # frozen
        kd.temperature = 2.0  # type: ignore[misc]


@pytest.mark.parametrize("name", ["dkd", "nkd", "dckd", "sd_dkd", "sd_nkd"])
def test_warmup_epochs_accepts_former_key(name: str) -> None:
    # Configs written before the rename say `warmup`; the field is `warmup_epochs`.
    params_cls = get_method(name).Params
    assert params_cls(warmup=5).warmup_epochs == 5
    assert params_cls.model_validate({"warmup": 5}) == params_cls(warmup_epochs=5)
    dumped = params_cls(warmup=5).model_dump()
    assert dumped["warmup_epochs"] == 5 and "warmup" not in dumped
    with pytest.raises(ValidationError):  # unknown keys are still errors
        params_cls.model_validate({"warmup_epoch": 5})


def test_dkd_params_former_warmup_key() -> None:
    assert DKDParams(warmup=5).warmup_epochs == 5
