"""Tests of kd_loss, dkd_loss, nkd_loss against independent float64 re-derivations.

The reference functions below are written from the equations in the kdlab methods spec with plain
loops over numpy arrays; they never call kdlab.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdlab.core.errors import MethodError
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss


def softmax(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    pairs = zip(p, q, strict=True)
    return float(sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in pairs if pi > 0))


def kd_row(s: np.ndarray, t: np.ndarray, T: float) -> float:
    return T * T * kl(softmax(t / T), softmax(s / T))


def dkd_row(s, t, y, alpha, beta, T) -> float:
    ps, pt = softmax(s / T), softmax(t / T)
    bs = np.array([ps[y], 1.0 - ps[y]])
    bt = np.array([pt[y], 1.0 - pt[y]])
    others = [c for c in range(len(s)) if c != y]
    qs = softmax(np.array([s[c] / T for c in others]))
    qt = softmax(np.array([t[c] / T for c in others]))
    return T * T * (alpha * kl(bt, bs) + beta * kl(qt, qs))


def nkd_row(s, t, y, T, gamma, legacy=False) -> float:
    target = -softmax(t)[y] * math.log(softmax(s)[y])
    classes = list(range(len(s))) if legacy else [c for c in range(len(s)) if c != y]
    qs = softmax(np.array([s[c] / T for c in classes]))
    qt = softmax(np.array([t[c] / T for c in classes]))
    non = -gamma * T * T * sum(a * math.log(b) for a, b in zip(qt, qs, strict=True))
    return target + non


def batch_mean(fn, s, t, *args, **kwargs) -> float:
    """Mean over rows of ``fn(s[i], t[i], ...)``; args that are arrays of length B are per-row."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    vals = []
    for i in range(s.shape[0]):
        row_args = [a[i] if isinstance(a, np.ndarray) else a for a in args]
        vals.append(fn(s[i], t[i], *row_args, **kwargs))
    return float(np.mean(vals))


# ----------------------------------------------------------------------------- fixtures


def _inputs(b: int = 6, k: int = 7, seed: int = 0, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    t = torch.randn(b, k, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, k, (b,), generator=g)
    return s, t, y


LOSSES = {
    "kd": lambda s, t, y, **kw: kd_loss(s, t, 4.0, **kw),
    "dkd": lambda s, t, y, **kw: dkd_loss(s, t, y, 1.0, 8.0, 4.0, **kw),
    "nkd": lambda s, t, y, **kw: nkd_loss(s, t, y, 1.0, 1.5, **kw),
    "nkd_T4": lambda s, t, y, **kw: nkd_loss(s, t, y, 4.0, 8.0, **kw),
    "nkd_legacy": lambda s, t, y, **kw: nkd_loss(s, t, y, 4.0, 8.0, legacy=True, **kw),
}


# ----------------------------------------------------------------------------- values


def test_kd_hand_computed() -> None:
    # T = 1, p_t = [3/4, 1/4], p_s = [1/2, 1/2]: KL = 3/4 ln(3/2) + 1/4 ln(1/2).
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(s, t, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # T = 2 multiplies the (temperature-softened) KL by T^2 = 4.
    t2 = torch.tensor([[2 * math.log(3.0), 0.0]])
    assert kd_loss(s, t2, 2.0).item() == pytest.approx(4 * expected, abs=1e-6)


def test_kd_matches_reference() -> None:
    s, t, _ = _inputs()
    for T in (1.0, 4.0):
        assert kd_loss(s, t, T).item() == pytest.approx(
            batch_mean(kd_row, s.numpy(), t.numpy(), T), rel=1e-10
        )


def test_dkd_hand_computed() -> None:
    # K = 3, T = 1, y = 0. Student uniform: b_s = [1/3, 2/3], q_s = [1/2, 1/2].
    # Teacher logits [ln 2, ln 1, ln 1]: p_t = [1/2, 1/4, 1/4], b_t = [1/2, 1/2], q_t = q_s.
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    y = torch.tensor([0])
    tckd = 0.5 * math.log(0.5 / (1 / 3)) + 0.5 * math.log(0.5 / (2 / 3))
    assert dkd_loss(s, t, y, 1.0, 8.0, 1.0).item() == pytest.approx(tckd, abs=1e-6)
    assert dkd_loss(s, t, y, 3.0, 8.0, 1.0).item() == pytest.approx(3 * tckd, abs=1e-6)


def test_dkd_matches_reference() -> None:
    s, t, y = _inputs()
    for alpha, beta, T in ((1.0, 8.0, 4.0), (0.5, 2.0, 1.0)):
        ref = batch_mean(dkd_row, s.numpy(), t.numpy(), y.numpy(), alpha, beta, T)
        assert dkd_loss(s, t, y, alpha, beta, T).item() == pytest.approx(ref, rel=1e-10)


def test_nkd_hand_computed() -> None:
    # K = 3, y = 0, T = 1, gamma = 1. Student uniform: p_s(y) = 1/3, q_s = [1/2, 1/2].
    # Teacher [ln 2, 0, 0]: p_t(y) = 1/2, q_t = [1/2, 1/2].
    s = torch.zeros(1, 3)
    t = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    y = torch.tensor([0])
    expected = -0.5 * math.log(1 / 3) - 1.0 * (2 * 0.5 * math.log(0.5))
    assert nkd_loss(s, t, y, 1.0, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # Legacy: the second sum runs over all 3 classes, p_t = [1/2, 1/4, 1/4], p_s uniform.
    legacy = -0.5 * math.log(1 / 3) - 1.0 * math.log(1 / 3)
    assert nkd_loss(s, t, y, 1.0, 1.0, legacy=True).item() == pytest.approx(legacy, abs=1e-6)


@pytest.mark.parametrize("legacy", [False, True])
def test_nkd_matches_reference(legacy: bool) -> None:
    s, t, y = _inputs()
    for T, gamma in ((1.0, 1.5), (4.0, 8.0)):
        ref = batch_mean(nkd_row, s.numpy(), t.numpy(), y.numpy(), T, gamma, legacy=legacy)
        got = nkd_loss(s, t, y, T, gamma, legacy=legacy).item()
        assert got == pytest.approx(ref, rel=1e-10)


def test_nkd_target_term_uses_temperature_one() -> None:
    # With gamma = 0 only the target term is left; it must not depend on T.
    s, t, y = _inputs()
    a = nkd_loss(s, t, y, 1.0, 0.0)
    b = nkd_loss(s, t, y, 4.0, 0.0)
    torch.testing.assert_close(a, b)


def test_reduction_none_gives_per_sample_values() -> None:
    s, t, y = _inputs()
    for name, fn in LOSSES.items():
        per = fn(s, t, y, reduction="none")
        assert per.shape == (s.shape[0],), name
        torch.testing.assert_close(per.mean(), fn(s, t, y), msg=name)
    with pytest.raises(MethodError):
        kd_loss(s, t, 4.0, reduction="sum")  # type: ignore[arg-type]


def test_teacher_is_detached_and_shape_checked() -> None:
    s, t, y = _inputs()
    t = t.clone().requires_grad_(True)
    s = s.clone().requires_grad_(True)
    for fn in LOSSES.values():
        fn(s, t, y).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(MethodError):
        kd_loss(s, t[:, :-1], 4.0)
    with pytest.raises(MethodError):
        kd_loss(s, t, 0.0)


# ----------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradcheck(name: str) -> None:
    s, t, y = _inputs(b=3, k=5, scale=1.0)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, t, y), (s,))


@pytest.mark.parametrize("name", list(LOSSES))
def test_batch_size_invariance(name: str) -> None:
    s, t, y = _inputs()
    one = LOSSES[name](s, t, y)
    two = LOSSES[name](torch.cat([s, s]), torch.cat([t, t]), torch.cat([y, y]))
    torch.testing.assert_close(one, two)


@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_for_huge_logits(name: str) -> None:
    s, t, y = _inputs()
    s = (torch.sign(torch.randn(s.shape)) * 1e4).float().requires_grad_(True)
    t = (torch.sign(torch.randn(t.shape)) * 1e4).float()
    loss = LOSSES[name](s, t, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # the target logit alone at +-1e4 (the hardest case for log(1 - p_y))
    s2 = torch.zeros_like(s).scatter(1, y[:, None], 1e4).requires_grad_(True)
    t2 = torch.zeros_like(t).scatter(1, y[:, None], -1e4)
    loss2 = LOSSES[name](s2, t2, y)
    loss2.backward()
    assert torch.isfinite(loss2) and torch.isfinite(s2.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_bf16_inputs_give_float32_finite_loss(name: str) -> None:
    s, t, y = _inputs()
    s = (s * 10).bfloat16().requires_grad_(True)
    loss = LOSSES[name](s, (t * 10).bfloat16(), y)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
