"""SDD's ``consistent_weight`` switch (paper Table 6: consistent-only / complementary-only).

``sdd_loss(..., beta=0)`` keeps the consistent regions only, ``consistent_weight=0`` the
complementary regions only; the global region 0 always weighs 1 and the normaliser stays N * B.
"""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kdlab.core.errors import MethodError
from kdlab.losses.sdd import sdd_loss
from kdlab.methods.sdd import SDDDKDParams, SDDKDParams, SDDNKDParams

BASES = {
    "kd": {"temperature": 4.0},
    "dkd": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
    "nkd": {"temperature": 4.0, "gamma": 8.0, "legacy": True},
}


def _local(b=6, k=5, n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, n, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, k, n, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, k, (b,), generator=g)
    return s, t, y


def _complementary(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """B x N mask of complementary regions (correctness criterion), computed independently."""
    ok = t.argmax(dim=1) == y.view(-1, 1)  # B x N
    return ok != ok[:, :1]


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("criterion", ["correctness", "class"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_consistent_weight_one_is_unchanged(base, criterion, reduction):
    s, t, y = _local()
    kw = {"base": base, "base_kwargs": BASES[base], "criterion": criterion,
          "reduction": reduction}
    default = sdd_loss(s, t, y, **kw)
    explicit = sdd_loss(s, t, y, consistent_weight=1.0, **kw)
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("base", sorted(BASES))
def test_consistent_weight_zero_removes_consistent_local_regions(base):
    s, t, y = _local(seed=1)
    comp = _complementary(t, y)
    assert comp.any() and (~comp[:, 1:]).any(), "the example needs both kinds of region"
    s = s.clone().requires_grad_(True)
    loss = sdd_loss(s, t, y, base=base, base_kwargs=BASES[base], consistent_weight=0.0)
    loss.backward()
    grad_norm = s.grad.abs().sum(dim=1)  # B x N
    consistent_local = ~comp
    consistent_local[:, 0] = False
    # consistent local regions no longer contribute ...
    assert torch.all(grad_norm[consistent_local] == 0)
    # ... while the global region and the complementary regions still do.
    assert torch.all(grad_norm[:, 0] > 0)
    assert torch.all(grad_norm[comp] > 0)


def test_both_ablations_sum_to_the_full_loss_plus_the_global_term():
    """full = consistent-only + complementary-only - global (all share the N * B normaliser)."""
    s, t, y = _local(seed=2)
    kw = {"base": "kd", "base_kwargs": {"temperature": 4.0}}
    full = sdd_loss(s, t, y, **kw)
    cons_only = sdd_loss(s, t, y, beta=0.0, **kw)
    comp_only = sdd_loss(s, t, y, consistent_weight=0.0, **kw)
    glob = sdd_loss(s[..., :1], t[..., :1], y, **kw) / s.shape[-1]  # region 0 over N * B
    torch.testing.assert_close(full, cons_only + comp_only - glob)
    # with every weight of a local region at zero only the global term is left
    only_global = sdd_loss(s, t, y, beta=0.0, consistent_weight=0.0, **kw)
    torch.testing.assert_close(only_global, glob)


def _f(d: float) -> float:
    """KL(softmax([d, 0]) || uniform over 2 classes) at T = 1, by hand."""
    p = 1.0 / (1.0 + math.exp(-d))
    return math.log(2.0) + p * math.log(p) + (1.0 - p) * math.log(1.0 - p)


def test_constructed_example_values():
    # One sample, two classes, label 0, M = {1, 2}: N = 5 regions; the student outputs zeros.
    # Teacher: global [2, 0] (correct); r1 [1, 0] correct -> consistent; r2 [0, 1] wrong ->
    # complementary; r3 [0, 3] wrong -> complementary; r4 [3, 0] correct -> consistent.
    t = torch.tensor([[2.0, 1.0, 0.0, 0.0, 3.0], [0.0, 0.0, 1.0, 3.0, 0.0]],
                     dtype=torch.float64).unsqueeze(0)  # 1 x 2 x 5
    s = torch.zeros_like(t)
    y = torch.tensor([0])
    kw = {"base": "kd", "base_kwargs": {"temperature": 1.0}}
    f1, f2, f3 = _f(1.0), _f(2.0), _f(3.0)
    full = sdd_loss(s, t, y, **kw)  # weights 1, 1, 2, 2, 1
    comp_only = sdd_loss(s, t, y, consistent_weight=0.0, **kw)  # weights 1, 0, 2, 2, 0
    cons_only = sdd_loss(s, t, y, beta=0.0, **kw)  # weights 1, 1, 0, 0, 1
    half = sdd_loss(s, t, y, consistent_weight=0.5, **kw)  # weights 1, .5, 2, 2, .5
    assert full.item() == pytest.approx((f2 + f1 + 2 * f1 + 2 * f3 + f3) / 5, rel=1e-12)
    assert comp_only.item() == pytest.approx((f2 + 2 * f1 + 2 * f3) / 5, rel=1e-12)
    assert cons_only.item() == pytest.approx((f2 + f1 + f3) / 5, rel=1e-12)
    assert half.item() == pytest.approx((f2 + 0.5 * f1 + 2 * f1 + 2 * f3 + 0.5 * f3) / 5,
                                        rel=1e-12)
    # the numbers themselves (f1 = 0.11094..., f2 = 0.32781..., f3 = 0.50228...)
    assert comp_only.item() == pytest.approx(0.3108532, abs=1e-6)
    # sum reduction: N times the mean
    comp_sum = sdd_loss(s, t, y, consistent_weight=0.0, reduction="sum", **kw)
    assert comp_sum.item() == pytest.approx(5 * comp_only.item(), rel=1e-12)


def test_negative_consistent_weight_is_rejected():
    s, t, y = _local()
    with pytest.raises(MethodError, match="consistent_weight"):
        sdd_loss(s, t, y, consistent_weight=-1.0)


@pytest.mark.parametrize("cls", [SDDKDParams, SDDDKDParams, SDDNKDParams])
def test_params_field(cls):
    assert cls().consistent_weight == 1.0
    assert cls(consistent_weight=0).consistent_weight == 0.0
    with pytest.raises(ValidationError):
        cls(consistent_weight=-0.5)
