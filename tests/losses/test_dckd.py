"""Tests of dckd_loss, kdlab's reconstruction of DCKD (Wang, Dong, Zhu, Li, PLOS ONE 2025)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab.core.errors import MethodError
from kdlab.losses.dckd import dckd_loss
from kdlab.losses.logit import dkd_loss


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _kl(p, q) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0)


def _dckd_ref(s, t, y, alpha, beta, T, rule, source) -> float:
    """Independent float64 batch mean of the spec's L_DCKD, one sample at a time."""
    vals = []
    for i in range(s.shape[0]):
        zs, zt, yi = s[i], t[i], int(y[i])
        ps, pt = _softmax(zs / T), _softmax(zt / T)
        if rule == "max":
            m = max(pt[yi], ps[yi])
        elif rule == "correct":
            m = ps[yi] if int(np.argmax(zs)) == yi else pt[yi]
        else:
            m = pt[yi]
        others = [c for c in range(len(zs)) if c != yi]
        qs = _softmax(zs[others] / T)
        qt = qs if source == "student" else _softmax(zt[others] / T)
        bs, bstar = [ps[yi], 1 - ps[yi]], [m, 1 - m]
        vals.append(T * T * (alpha * _kl(bstar, bs) + beta * _kl(qt, qs)))
    return float(np.mean(vals))


def _inputs(b=8, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g, dtype=dtype) * 3
    t = torch.randn(b, k, generator=g, dtype=dtype) * 3
    y = torch.randint(0, k, (b,), generator=g)
    return s, t, y


RULES = ["max", "correct", "teacher"]
SOURCES = ["teacher", "student"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("source", SOURCES)
def test_matches_reference(rule: str, source: str) -> None:
    s, t, y = _inputs()
    got = dckd_loss(s, t, y, 1.0, 8.0, 4.0, target_rule=rule, nontarget_source=source)
    ref = _dckd_ref(s.numpy(), t.numpy(), y.numpy(), 1.0, 8.0, 4.0, rule, source)
    assert got.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_teacher_rule_is_exactly_dkd() -> None:
    for dtype in (torch.float32, torch.float64):
        s, t, y = _inputs(dtype=dtype)
        for alpha, beta, T in ((1.0, 8.0, 4.0), (2.0, 0.5, 1.0)):
            s1 = s.clone().requires_grad_(True)
            s2 = s.clone().requires_grad_(True)
            a = dckd_loss(s1, t, y, alpha, beta, T, target_rule="teacher")
            b = dkd_loss(s2, t, y, alpha, beta, T)
            assert torch.equal(a, b)
            a.backward()
            b.backward()
            assert torch.equal(s1.grad, s2.grad)


def _student_ahead():
    """Student's target probability above the teacher's in every sample."""
    s, t, y = _inputs()
    s = s.scatter(1, y[:, None], 12.0)
    t = t.scatter(1, y[:, None], 0.0)
    return s, t, y


def test_max_rule_target_term_zero_when_student_ahead() -> None:
    s, t, y = _student_ahead()
    s.requires_grad_(True)
    # target term only (beta = 0): zero in value and in gradient
    loss = dckd_loss(s, t, y, 1.0, 0.0, 4.0, target_rule="max")
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12
    # with beta > 0 only the non-target (DKD NCKD) term is left
    torch.testing.assert_close(
        dckd_loss(s, t, y, 1.0, 8.0, 4.0, target_rule="max"), dkd_loss(s, t, y, 0.0, 8.0, 4.0)
    )


def test_max_rule_equals_dkd_when_student_lags() -> None:
    s, t, y = _student_ahead()
    s, t = t, s  # now the teacher is ahead everywhere
    torch.testing.assert_close(
        dckd_loss(s, t, y, 1.0, 8.0, 4.0, target_rule="max"), dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    )


def test_correct_rule_on_constructed_example() -> None:
    y = torch.tensor([0, 0])
    # sample 0: student correct (argmax 0) but less confident than the teacher
    # sample 1: student wrong (argmax 1) yet more confident in class 0 than the teacher
    s = torch.tensor([[2.0, 1.0, 0.0], [3.0, 4.0, -5.0]], dtype=torch.float64)
    t = torch.tensor([[9.0, 0.0, 0.0], [-5.0, 0.0, 5.0]], dtype=torch.float64)
    T = 1.0
    kw = {"alpha": 1.0, "beta": 0.0, "temperature": T}
    correct = dckd_loss(s, t, y, **kw, target_rule="correct", reduction="none")
    maxrule = dckd_loss(s, t, y, **kw, target_rule="max", reduction="none")
    dkd = dkd_loss(s, t, y, **kw, reduction="none")
    assert correct[0].item() == 0.0  # fixed: the student already classifies it correctly
    assert maxrule[0].item() > 0.0  # max: pulled up towards the teacher's 0.9998
    torch.testing.assert_close(maxrule[0], dkd[0])
    torch.testing.assert_close(correct[1], dkd[1])  # wrong: pulled to the teacher
    assert correct[1].item() > 0.0
    assert maxrule[1].item() == 0.0  # max: the student is already ahead of the teacher


def test_student_nontarget_source_makes_nontarget_term_zero() -> None:
    s, t, y = _inputs()
    s.requires_grad_(True)
    loss = dckd_loss(s, t, y, 0.0, 8.0, 4.0, nontarget_source="student")
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.abs().max().item() < 1e-12
    torch.testing.assert_close(
        dckd_loss(s, t, y, 1.0, 8.0, 4.0, target_rule="teacher", nontarget_source="student"),
        dkd_loss(s, t, y, 1.0, 0.0, 4.0),
    )


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("source", SOURCES)
def test_gradcheck(rule: str, source: str) -> None:
    s, t, y = _inputs(b=3, k=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: dckd_loss(x, t, y, 1.0, 2.0, 2.0, target_rule=rule, nontarget_source=source),
        (s,),
    )


@pytest.mark.parametrize("rule", RULES)
def test_batch_invariance_and_finiteness(rule: str) -> None:
    s, t, y = _inputs(dtype=torch.float32)
    one = dckd_loss(s, t, y, target_rule=rule)
    two = dckd_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([y, y]), target_rule=rule)
    torch.testing.assert_close(one, two)
    big = (torch.sign(s) * 1e4).requires_grad_(True)
    loss = dckd_loss(big, torch.sign(t) * 1e4, y, target_rule=rule)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()
    bf = s.bfloat16().requires_grad_(True)
    loss_bf = dckd_loss(bf, t.bfloat16(), y, target_rule=rule)
    loss_bf.backward()
    assert loss_bf.dtype == torch.float32
    assert torch.isfinite(loss_bf) and torch.isfinite(bf.grad).all()


def test_bad_options_raise_method_error() -> None:
    s, t, y = _inputs()
    with pytest.raises(MethodError):
        dckd_loss(s, t, y, target_rule="min")  # type: ignore[arg-type]
    with pytest.raises(MethodError):
        dckd_loss(s, t, y, nontarget_source="both")  # type: ignore[arg-type]
