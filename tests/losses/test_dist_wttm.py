"""DIST, TTM and WTTM losses against test-side re-implementations of the official code.

The references below follow the official operations step by step (written here, not imported):

* DIST: hunto/image_classification_sota ``lib/models/losses/dist_kd.py`` (cosine similarity of
  mean-centred rows with ``eps`` added to the product of the norms; inter-class relation over
  the rows, intra-class relation over the transposed matrices; ``tau^2`` on each term, then
  ``beta * inter + gamma * intra``);
* TTM / WTTM: zkxufo/TTM ``distiller_zoo/ttm.py``, ``wttm.py`` (``softmax(z_t) ** l``,
  normalised by its row sum; ``kl_div(log_softmax(z_s), p_t, reduction="none").sum(1)``; WTTM
  multiplies by the row sum before the batch mean).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.core.errors import MethodError
from kdlab.losses import dist_loss, kd_loss, ttm_loss, wttm_loss
from kdlab.losses.dist import pearson_correlation

B, K = 16, 100


# ----------------------------------------------------------------------------- references
def ref_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(1).unsqueeze(1)
    b = b - b.mean(1).unsqueeze(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def ref_dist(zs: torch.Tensor, zt: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
             tau: float = 4.0) -> torch.Tensor:
    ys = (zs / tau).softmax(dim=1)
    yt = (zt / tau).softmax(dim=1)
    inter = tau**2 * (1 - ref_pearson(ys, yt).mean())
    intra = tau**2 * (1 - ref_pearson(ys.transpose(0, 1), yt.transpose(0, 1)).mean())
    return beta * inter + gamma * intra


def ref_ttm_parts(zs: torch.Tensor, zt: torch.Tensor, l: float) -> tuple[torch.Tensor, ...]:
    log_ps = F.log_softmax(zs, dim=1)
    pt = torch.pow(torch.softmax(zt, dim=1), l)
    norm = torch.sum(pt, dim=1)
    pt = pt / norm.unsqueeze(1)
    kl = torch.sum(F.kl_div(log_ps, pt, reduction="none"), dim=1)
    return norm, kl


def ref_ttm(zs: torch.Tensor, zt: torch.Tensor, l: float) -> torch.Tensor:
    return torch.mean(ref_ttm_parts(zs, zt, l)[1])


def ref_wttm(zs: torch.Tensor, zt: torch.Tensor, l: float) -> torch.Tensor:
    norm, kl = ref_ttm_parts(zs, zt, l)
    return torch.mean(norm * kl)


def logits(std: float, seed: int, b: int = B, k: int = K,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(b, k, generator=g) * std).to(dtype)
    zt = (torch.randn(b, k, generator=g) * std + torch.randn(b, k, generator=g)).to(dtype)
    return zs, zt


def value_and_grad(fn, zs: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zs = zs.clone().requires_grad_(True)
    out = fn(zs, zt)
    (grad,) = torch.autograd.grad(out, zs)
    return out.detach(), grad


def assert_equal_rel(ours: tuple[torch.Tensor, torch.Tensor],
                     ref: tuple[torch.Tensor, torch.Tensor], rtol: float = 1e-5) -> None:
    """Values to ``rtol`` relative; gradients to ``rtol`` relative to the largest entry (entries
    of order 1e-30 differ between an underflowed official ``softmax ** l`` and the exact value)."""
    torch.testing.assert_close(ours[0], ref[0], rtol=rtol, atol=0.0)
    scale = ref[1].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(ours[1], ref[1], rtol=rtol, atol=rtol * scale)


CASES = [(3.0, 0), (3.0, 1), (30.0, 2), (30.0, 3)]


# ----------------------------------------------------------------------------- DIST
@pytest.mark.parametrize(("std", "seed"), CASES)
@pytest.mark.parametrize(("beta", "gamma", "tau"), [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
def test_dist_equals_official(std: float, seed: int, beta: float, gamma: float,
                              tau: float) -> None:
    zs, zt = logits(std, seed)
    ours = value_and_grad(lambda a, b: dist_loss(a, b, beta, gamma, tau), zs, zt)
    ref = value_and_grad(lambda a, b: ref_dist(a, b, beta, gamma, tau), zs, zt)
    assert_equal_rel(ours, ref)


def test_dist_equals_official_in_float64() -> None:
    zs, zt = logits(5.0, 7, dtype=torch.float64)
    ours = value_and_grad(dist_loss, zs, zt)
    ref = value_and_grad(ref_dist, zs, zt)
    assert ours[0].dtype == torch.float64
    assert_equal_rel(ours, ref, rtol=1e-12)


def test_pearson_golden_values() -> None:
    """By hand: centred [1, 2, 3] is [-1, 0, 1], centred [1, 3, 2] is [-1, 1, 0]: dot 1, norms
    sqrt(2) each, rho = 1/2; rho(a, -a) = -1; rho is invariant to a positive affine map."""
    a = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
    assert pearson_correlation(a, b, eps=0.0).item() == pytest.approx(0.5, abs=1e-12)
    assert pearson_correlation(a, b).item() == pytest.approx(1 / (2 + 1e-8), abs=1e-12)
    assert pearson_correlation(a, -a).item() == pytest.approx(-1.0, abs=1e-7)
    assert pearson_correlation(a, 2 * a + 5).item() == pytest.approx(1.0, abs=1e-7)


def test_dist_invariants() -> None:
    zs, zt = logits(3.0, 11)
    base = dist_loss(zs, zt)
    # softmax ignores a per-row constant
    shift = torch.randn(B, 1) * 10
    torch.testing.assert_close(dist_loss(zs + shift, zt - shift), base, rtol=1e-5, atol=1e-6)
    # the same permutation of the classes, and of the samples, in student and teacher
    pc, pb = torch.randperm(K), torch.randperm(B)
    torch.testing.assert_close(dist_loss(zs[:, pc], zt[:, pc]), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dist_loss(zs[pb], zt[pb]), base, rtol=1e-5, atol=1e-6)
    # a student equal to the teacher (up to per-row shifts) has zero loss; bounds of Pearson
    # a student equal to the teacher: 0 without the official eps; with it, the classes whose
    # probabilities hardly vary over the batch (centred norms of order sqrt(eps)) keep a rho < 1
    z64, s64 = zt.double(), shift.double()
    assert dist_loss(z64 + s64, z64, eps=0.0).item() == pytest.approx(0.0, abs=1e-9)
    torch.testing.assert_close(dist_loss(z64 + s64, z64), dist_loss(z64, z64))
    assert dist_loss(z64, z64).item() > 1e-6
    assert 0.0 <= base.item() <= 16.0 * 4.0


def test_dist_inter_term_is_batch_size_invariant_but_intra_is_not() -> None:
    """The inter-class relation is a mean of per-sample values; the intra-class relation
    correlates over the batch, so DIST as a whole depends on the batch composition."""
    zs, zt = logits(3.0, 5)
    h = B // 2
    inter = lambda a, b: dist_loss(a, b, beta=1.0, gamma=0.0)  # noqa: E731
    torch.testing.assert_close(inter(zs, zt), (inter(zs[:h], zt[:h]) + inter(zs[h:], zt[h:])) / 2,
                               rtol=1e-5, atol=1e-6)
    intra = lambda a, b: dist_loss(a, b, beta=0.0, gamma=1.0)  # noqa: E731
    halves = (intra(zs[:h], zt[:h]) + intra(zs[h:], zt[h:])) / 2
    assert abs(intra(zs, zt).item() - halves.item()) > 1e-3


def test_dist_is_finite_for_extreme_and_low_precision_inputs() -> None:
    zs, zt = logits(1e4, 3)
    zs.requires_grad_(True)
    out = dist_loss(zs, zt)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zs.grad).all()
    bf = dist_loss(*(t.to(torch.bfloat16) for t in logits(3.0, 4)))
    assert bf.dtype == torch.float32 and torch.isfinite(bf)
    one = dist_loss(*logits(3.0, 4, b=1))  # a batch of one: constant intra term (rho = 0)
    assert torch.isfinite(one)


def test_dist_teacher_is_detached_and_errors_are_one_line() -> None:
    zs, zt = logits(3.0, 6)
    zt.requires_grad_(True)
    dist_loss(zs.requires_grad_(True), zt).backward()
    assert zt.grad is None
    with pytest.raises(MethodError, match="temperature must be > 0"):
        dist_loss(zs, zt, temperature=0.0)
    with pytest.raises(MethodError, match="same shape"):
        dist_loss(zs, zt[:, :10])


# ----------------------------------------------------------------------------- TTM / WTTM
def in_float64(fn, zs: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's value and gradient computed in float64, returned in ``zs``'s dtype."""
    v, g = value_and_grad(fn, zs.double(), zt.double())
    return v.to(zs.dtype), g.to(zs.dtype)


@pytest.mark.parametrize(("std", "seed"), CASES)
@pytest.mark.parametrize("gamma", [0.1, 0.2, 0.5, 1.0])
def test_ttm_and_wttm_equal_official(std: float, seed: int, gamma: float) -> None:
    """kdlab in float32 against the official operations evaluated in float64 (in float32 the
    official ``softmax(z_t) ** gamma`` underflows for logit gaps beyond ~100; see the next
    test)."""
    zs, zt = logits(std, seed)
    assert_equal_rel(value_and_grad(lambda a, b: ttm_loss(a, b, gamma), zs, zt),
                     in_float64(lambda a, b: ref_ttm(a, b, gamma), zs, zt))
    assert_equal_rel(value_and_grad(lambda a, b: wttm_loss(a, b, gamma), zs, zt),
                     in_float64(lambda a, b: ref_wttm(a, b, gamma), zs, zt))
    if std == 3.0:  # no underflow: the official float32 computation agrees as well
        assert_equal_rel(value_and_grad(lambda a, b: wttm_loss(a, b, gamma), zs, zt),
                         value_and_grad(lambda a, b: ref_wttm(a, b, gamma), zs, zt))


def test_official_float32_wttm_underflows_where_kdlab_is_exact() -> None:
    """With std-30 logits and gamma 0.1, teacher probabilities below float32's range (gaps of
    ~100 and more) become 0 before the power in the official code, although their 0.1-th
    powers (~1e-5) still count in the weight; kdlab's log-space form keeps them."""
    zs, zt = logits(30.0, 2)
    exact = ref_wttm(zs.double(), zt.double(), 0.1)
    official32 = ref_wttm(zs, zt, 0.1)
    ours = wttm_loss(zs, zt, 0.1)
    assert abs(official32.item() - exact.item()) / exact.item() > 1e-5
    assert abs(ours.item() - exact.item()) / exact.item() < 1e-6


def test_wttm_equals_official_in_float64() -> None:
    zs, zt = logits(4.0, 8, dtype=torch.float64)
    ours = value_and_grad(lambda a, b: wttm_loss(a, b, 0.3), zs, zt)
    assert ours[0].dtype == torch.float64
    assert_equal_rel(ours, value_and_grad(lambda a, b: ref_wttm(a, b, 0.3), zs, zt), rtol=1e-12)


def test_wttm_with_gamma_one_is_kl_at_temperature_one() -> None:
    """gamma = 1: the weight sum_c p_t(c) is 1 and p~_t = p_t, so WTTM = TTM = KL(p_t || p_s),
    KD at T = 1 (whose T^2 factor is 1)."""
    zs, zt = logits(3.0, 9)
    kl = kd_loss(zs, zt, temperature=1.0)
    torch.testing.assert_close(wttm_loss(zs, zt, 1.0), kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ttm_loss(zs, zt, 1.0), kl, rtol=1e-5, atol=1e-6)


def test_ttm_is_teacher_side_temperature_and_wttm_its_weighted_form() -> None:
    zs, zt = logits(3.0, 10)
    gamma = 0.25
    # TTM: the teacher at temperature 1/gamma, the student at 1
    direct = F.kl_div(F.log_softmax(zs, 1), F.softmax(zt * gamma, 1), reduction="none").sum(1)
    torch.testing.assert_close(ttm_loss(zs, zt, gamma, reduction="none"), direct,
                               rtol=1e-5, atol=1e-6)
    # WTTM per sample = (sum_c p_t^gamma) * TTM per sample, and the weight is >= 1 for gamma < 1
    weight = F.softmax(zt, 1).pow(gamma).sum(1)
    assert (weight >= 1).all()
    torch.testing.assert_close(wttm_loss(zs, zt, gamma, reduction="none"), weight * direct,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn", [ttm_loss, wttm_loss])
def test_ttm_wttm_batch_size_and_shift_invariance(fn) -> None:
    zs, zt = logits(3.0, 12)
    h = B // 2
    whole = fn(zs, zt, 0.2)
    torch.testing.assert_close(whole, (fn(zs[:h], zt[:h], 0.2) + fn(zs[h:], zt[h:], 0.2)) / 2,
                               rtol=1e-5, atol=1e-6)
    per = fn(zs, zt, 0.2, reduction="none")
    assert per.shape == (B,)
    torch.testing.assert_close(per.mean(), whole)
    shift = torch.randn(B, 1) * 50
    torch.testing.assert_close(fn(zs + shift, zt - shift, 0.2), whole, rtol=1e-5, atol=1e-6)
    assert fn(zt, zt, 1.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fn", [ttm_loss, wttm_loss])
def test_ttm_wttm_finite_extreme_inputs_detached_teacher_and_errors(fn) -> None:
    zs, zt = logits(1e4, 13)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    out = fn(zs, zt, 0.2)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(zs.grad).all() and zt.grad is None
    bf = fn(*(t.to(torch.bfloat16) for t in logits(3.0, 4)), 0.2)
    assert bf.dtype == torch.float32 and torch.isfinite(bf)
    for bad in (0.0, -0.5):
        with pytest.raises(MethodError, match="gamma .* must be > 0"):
            fn(zs, zt, bad)
