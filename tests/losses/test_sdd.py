"""Tests of SDD's multiscale_logits and sdd_loss (Wei, Luo, Luo, CVPR 2024)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdlab.core.errors import MethodError
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss
from kdlab.losses.sdd import multiscale_logits, sdd_loss

BASES = {
    "kd": ({"temperature": 4.0}, lambda s, t, y, kw: kd_loss(s, t, **kw)),
    "dkd": (
        {"alpha": 1.0, "beta": 8.0, "temperature": 4.0},
        lambda s, t, y, kw: dkd_loss(s, t, y, **kw),
    ),
    "nkd": (
        {"temperature": 1.0, "gamma": 1.5},
        lambda s, t, y, kw: nkd_loss(s, t, y, **kw),
    ),
    "nkd_legacy": (
        {"temperature": 4.0, "gamma": 8.0, "legacy": True},
        lambda s, t, y, kw: nkd_loss(s, t, y, **kw),
    ),
}


def _base_name(key: str) -> str:
    return key.split("_")[0]


def _kd_row(s: np.ndarray, t: np.ndarray, T: float) -> float:
    """Independent float64 T^2 * KL(softmax(t/T) || softmax(s/T)) with a plain loop."""
    ps = np.exp(s / T - (s / T).max())
    ps /= ps.sum()
    pt = np.exp(t / T - (t / T).max())
    pt /= pt.sum()
    return T * T * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps, strict=True))


def _map_and_head(b=3, c=5, h=8, w=8, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    fmap = torch.randn(b, c, h, w, generator=g, dtype=dtype).relu()
    head = nn.Linear(c, k).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(k, c, generator=g, dtype=dtype))
        head.bias.copy_(torch.randn(k, generator=g, dtype=dtype))
    y = torch.randint(0, k, (b,), generator=g)
    return fmap, head, y


def _local(b=4, k=6, n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, k, n, generator=g, dtype=dtype) * 2
    t = torch.randn(b, k, n, generator=g, dtype=dtype) * 2
    y = torch.randint(0, k, (b,), generator=g)
    return s, t, y


# ----------------------------------------------------------------------------- multiscale logits


def test_region_zero_is_the_models_own_logits() -> None:
    fmap, head, _ = _map_and_head(h=8, w=8)
    own = head(fmap.mean(dim=(2, 3)))
    for pooling in ("nested", "direct"):
        local = multiscale_logits(fmap, head, (1, 2, 4), pooling=pooling)
        assert local.shape == (3, 6, 21)
        torch.testing.assert_close(local[:, :, 0], own)
    fmap7, head7, _ = _map_and_head(h=7, w=7)
    local7 = multiscale_logits(fmap7, head7, (1, 2, 4), pooling="direct")
    torch.testing.assert_close(local7[:, :, 0], head7(fmap7.mean(dim=(2, 3))))


@pytest.mark.parametrize("side", [8, 4])
def test_nested_equals_direct_on_multiples_of_four(side: int) -> None:
    fmap, head, _ = _map_and_head(h=side, w=side)
    a = multiscale_logits(fmap, head, (1, 2, 4), pooling="nested")
    b = multiscale_logits(fmap, head, (1, 2, 4), pooling="direct")
    torch.testing.assert_close(a, b)


def test_nested_differs_from_direct_on_7x7() -> None:
    fmap, head, _ = _map_and_head(h=7, w=7)
    a = multiscale_logits(fmap, head, (1, 2, 4), pooling="nested")
    b = multiscale_logits(fmap, head, (1, 2, 4), pooling="direct")
    torch.testing.assert_close(a[:, :, 5:], b[:, :, 5:])  # the 4x4 grid is pooled from F in both
    assert not torch.allclose(a[:, :, :5], b[:, :, :5])
    # nested_grid=4 with M={1,2}: the official code's 7x7 -> 4x4 -> 2x2 route.
    c = multiscale_logits(fmap, head, (1, 2), pooling="nested", nested_grid=4)
    torch.testing.assert_close(c, a[:, :, :5])


def test_region_order_hand_built() -> None:
    # One channel holding 4 * i + j at (i, j); the identity "classifier" keeps the pooled values.
    fmap = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4)
    local = multiscale_logits(fmap, lambda x: x, (4, 1, 2))  # scales are sorted
    expected = [7.5, 2.5, 4.5, 10.5, 12.5, *range(16)]
    assert local.shape == (1, 1, 21)
    assert local[0, 0].tolist() == expected
    local12 = multiscale_logits(fmap, lambda x: x, (1, 2), pooling="direct")
    assert local12[0, 0].tolist() == expected[:5]


def test_classifier_applied_per_cell() -> None:
    fmap, head, _ = _map_and_head(h=4, w=4)
    local = multiscale_logits(fmap, head, (1, 2, 4))
    for i in range(4):
        for j in range(4):
            torch.testing.assert_close(local[:, :, 5 + 4 * i + j], head(fmap[:, :, i, j]))
    # 2x2 cell (1, 0): rows 2-3, columns 0-1 of the 4x4 map
    torch.testing.assert_close(local[:, :, 3], head(fmap[:, :, 2:4, 0:2].mean(dim=(2, 3))))


def test_two_by_two_map_repeats_cells_under_four_by_four() -> None:
    fmap, head, _ = _map_and_head(h=2, w=2)
    for pooling in ("nested", "direct"):
        local = multiscale_logits(fmap, head, (1, 2, 4), pooling=pooling)
        for i in range(4):
            for j in range(4):
                torch.testing.assert_close(
                    local[:, :, 5 + 4 * i + j], head(fmap[:, :, i // 2, j // 2])
                )
        torch.testing.assert_close(local[:, :, 1:5], head(fmap.flatten(2).transpose(1, 2)).mT)


def test_bad_scales_raise_method_error() -> None:
    fmap, head, _ = _map_and_head(h=3, w=3)
    with pytest.raises(MethodError, match="does not fit"):
        multiscale_logits(fmap, head, (1, 2, 4))
    multiscale_logits(fmap, head, (1, 2, 3))  # fine
    fmap8, head8, _ = _map_and_head(h=8, w=8)
    for bad in ((2, 4), (1, 1, 2), (0, 1), ()):
        with pytest.raises(MethodError):
            multiscale_logits(fmap8, head8, bad)
    with pytest.raises(MethodError):
        multiscale_logits(fmap8, head8, (1, 2, 4), pooling="max")  # type: ignore[arg-type]
    with pytest.raises(MethodError):
        multiscale_logits(fmap8, head8, (1, 2, 4), nested_grid=2)


# ----------------------------------------------------------------------------- sdd loss


@pytest.mark.parametrize("key", list(BASES))
def test_single_scale_equals_base_loss(key: str) -> None:
    kw, base_fn = BASES[key]
    fmap_s, head_s, y = _map_and_head(seed=1)
    fmap_t, head_t, _ = _map_and_head(seed=2)
    ls = multiscale_logits(fmap_s, head_s, (1,))
    lt = multiscale_logits(fmap_t, head_t, (1,))
    got = sdd_loss(ls, lt, y, base=_base_name(key), base_kwargs=kw)
    want = base_fn(head_s(fmap_s.mean(dim=(2, 3))), head_t(fmap_t.mean(dim=(2, 3))), y, kw)
    torch.testing.assert_close(got, want)
    got_sum = sdd_loss(ls, lt, y, base=_base_name(key), base_kwargs=kw, reduction="sum")
    torch.testing.assert_close(got_sum, want)


def _constructed_example():
    """B = 2, K = 3, N = 3 regions; teacher predictions chosen by hand.

    sample 0 (label 0): teacher global -> 0 (correct), region 1 -> 1 (wrong), region 2 -> 0.
    sample 1 (label 2): teacher global -> 1 (wrong), region 1 -> 0 (wrong), region 2 -> 2.
    """
    y = torch.tensor([0, 2])
    preds = [[0, 1, 0], [1, 0, 2]]
    t = torch.zeros(2, 3, 3, dtype=torch.float64)
    for b in range(2):
        for r in range(3):
            t[b, preds[b][r], r] = 2.0 + 0.3 * r
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    return s, t, y


@pytest.mark.parametrize(
    ("criterion", "weights"),
    [
        # correctness: complementary when correctness differs from the global region's
        ("correctness", [[1, 2, 1], [1, 1, 2]]),
        # class: complementary when the predicted class differs from the global prediction
        ("class", [[1, 2, 1], [1, 2, 2]]),
    ],
)
def test_consistent_and_complementary_weights(criterion: str, weights: list) -> None:
    s, t, y = _constructed_example()
    beta, T = 3.0, 2.0
    n, b = 3, 2
    total = 0.0
    for i in range(b):
        for r in range(n):
            w = beta if weights[i][r] == 2 else 1.0
            total += w * _kd_row(s[i, :, r].numpy(), t[i, :, r].numpy(), T)
    got = sdd_loss(s, t, y, "kd", {"temperature": T}, beta=beta, criterion=criterion)
    assert got.item() == pytest.approx(total / (n * b), rel=1e-10)
    got_sum = sdd_loss(
        s, t, y, "kd", {"temperature": T}, beta=beta, criterion=criterion, reduction="sum"
    )
    assert got_sum.item() == pytest.approx(total / b, rel=1e-10)


@pytest.mark.parametrize("key", list(BASES))
def test_per_region_targets_are_the_sample_labels(key: str) -> None:
    kw, base_fn = BASES[key]
    s, t, y = _local(n=5)
    # all weights 1 (beta = 1): L = mean over (region, sample) of the base loss of that cell
    got = sdd_loss(s, t, y, _base_name(key), kw, beta=1.0)
    cells = [base_fn(s[:, :, r], t[:, :, r], y, {**kw, "reduction": "none"}) for r in range(5)]
    torch.testing.assert_close(got, torch.cat(cells).mean())


@pytest.mark.parametrize("key", list(BASES))
def test_sum_is_n_times_mean(key: str) -> None:
    kw, _ = BASES[key]
    s, t, y = _local(n=5)
    mean = sdd_loss(s, t, y, _base_name(key), kw)
    total = sdd_loss(s, t, y, _base_name(key), kw, reduction="sum")
    torch.testing.assert_close(total, 5 * mean)


@pytest.mark.parametrize("key", list(BASES))
def test_gradcheck(key: str) -> None:
    kw, _ = BASES[key]
    s, t, y = _local(b=2, k=4, n=3)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sdd_loss(x, t, y, _base_name(key), kw, criterion="class"), (s,)
    )


def test_gradcheck_through_multiscale_logits() -> None:
    fmap, head, y = _map_and_head(b=2, c=3, h=4, w=4, k=4)
    fmap_t, head_t, _ = _map_and_head(b=2, c=3, h=4, w=4, k=4, seed=5)
    lt = multiscale_logits(fmap_t, head_t)
    fmap.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f: sdd_loss(multiscale_logits(f, head), lt, y, "dkd"), (fmap,)
    )


@pytest.mark.parametrize("key", list(BASES))
def test_batch_size_invariance(key: str) -> None:
    kw, _ = BASES[key]
    s, t, y = _local()
    one = sdd_loss(s, t, y, _base_name(key), kw)
    two = sdd_loss(torch.cat([s, s]), torch.cat([t, t]), torch.cat([y, y]), _base_name(key), kw)
    torch.testing.assert_close(one, two)


@pytest.mark.parametrize("key", list(BASES))
def test_finite_for_huge_logits_and_bf16(key: str) -> None:
    kw, _ = BASES[key]
    s, t, y = _local(dtype=torch.float32)
    s_big = (torch.sign(s) * 1e4).requires_grad_(True)
    loss = sdd_loss(s_big, torch.sign(t) * 1e4, y, _base_name(key), kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s_big.grad).all()
    s_bf = (s * 10).bfloat16().requires_grad_(True)
    loss_bf = sdd_loss(s_bf, (t * 10).bfloat16(), y, _base_name(key), kw)
    loss_bf.backward()
    assert loss_bf.dtype == torch.float32
    assert torch.isfinite(loss_bf) and torch.isfinite(s_bf.grad).all()


def test_bad_arguments_raise_method_error() -> None:
    s, t, y = _local()
    with pytest.raises(MethodError):
        sdd_loss(s, t[:, :, :3], y)
    with pytest.raises(MethodError):
        sdd_loss(s, t, y, base="crd")  # type: ignore[arg-type]
    with pytest.raises(MethodError):
        sdd_loss(s, t, y, criterion="other")  # type: ignore[arg-type]
    with pytest.raises(MethodError):
        sdd_loss(s, t, y, reduction="none")  # type: ignore[arg-type]
