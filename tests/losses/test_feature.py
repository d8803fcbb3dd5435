"""FitNet, AT, RKD, SP and PKT losses against independent float64 NumPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlab.losses.feature import (
    at_loss,
    fitnet_loss,
    pkt_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    sp_loss,
)

# ----------------------------------------------------------------------------- references


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def ref_fitnet(s: np.ndarray, t: np.ndarray) -> float:
    return float(np.mean((s - t) ** 2))


def ref_block_pool(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Average pooling of B x C x H x W to h x w when H, W are multiples of h, w."""
    b, c, hh, ww = x.shape
    return x.reshape(b, c, h, hh // h, w, ww // w).mean(axis=(3, 5))


def ref_at(fs: list[np.ndarray], ft: list[np.ndarray], p: float = 2.0) -> float:
    total = 0.0
    for s, t in zip(fs, ft, strict=True):
        if s.shape[2] > t.shape[2]:
            s = ref_block_pool(s, t.shape[2], t.shape[3])
        elif s.shape[2] < t.shape[2]:
            t = ref_block_pool(t, s.shape[2], s.shape[3])
        maps = []
        for f in (s, t):
            a = (np.abs(f) ** p).mean(axis=1).reshape(f.shape[0], -1)
            norm = np.sqrt((a**2).sum(axis=1, keepdims=True))
            maps.append(a / np.maximum(norm, 1e-12))
        total += float(np.mean((maps[0] - maps[1]) ** 2))
    return total


def huber(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax < 1.0, 0.5 * x**2, ax - 0.5)


def ref_rkd_distance(s: np.ndarray, t: np.ndarray) -> float:
    def psi(e: np.ndarray) -> np.ndarray:
        b = e.shape[0]
        d = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                if i != j:
                    d[i, j] = np.sqrt(max(((e[i] - e[j]) ** 2).sum(), 1e-12))
        return d / d[d > 0].mean()

    return float(huber(psi(s) - psi(t)).mean())


def ref_rkd_angle(s: np.ndarray, t: np.ndarray) -> float:
    def psi(e: np.ndarray) -> np.ndarray:
        b = e.shape[0]
        a = np.zeros((b, b, b))
        for i in range(b):  # vertex
            for j in range(b):
                for k in range(b):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    if nu > 0 and nv > 0:
                        a[i, j, k] = u @ v / (nu * nv)
        return a

    return float(huber(psi(s) - psi(t)).mean())


def ref_sp(s: np.ndarray, t: np.ndarray) -> float:
    b = s.shape[0]

    def g(f: np.ndarray) -> np.ndarray:
        q = f.reshape(b, -1)
        m = q @ q.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    return float(((g(t) - g(s)) ** 2).sum() / b**2)


def ref_pkt(s: np.ndarray, t: np.ndarray, eps: float = 1e-7) -> float:
    def prob(e: np.ndarray) -> np.ndarray:
        b = e.shape[0]
        k = np.zeros((b, b))
        for i in range(b):
            for j in range(b):
                ui = e[i] / (np.linalg.norm(e[i]) + eps)
                uj = e[j] / (np.linalg.norm(e[j]) + eps)
                k[i, j] = (ui @ uj + 1.0) / 2.0
        return k / k.sum(axis=1, keepdims=True)

    ps, pt = prob(s), prob(t)
    return float(np.mean(pt * np.log((pt + eps) / (ps + eps))))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ----------------------------------------------------------------------------- values


def test_fitnet_matches_reference(gen: torch.Generator) -> None:
    s, t = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    assert fitnet_loss(s, t).item() == pytest.approx(ref_fitnet(_np(s), _np(t)), rel=1e-5)


def test_fitnet_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        fitnet_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_matches_reference_with_spatial_mismatch(gen: torch.Generator, p: float) -> None:
    fs = [torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 6, 2, 2, generator=gen)]
    ft = [torch.randn(3, 5, 4, 4, generator=gen), torch.randn(3, 7, 4, 4, generator=gen)]
    got = at_loss(fs, ft, p=p).item()
    want = ref_at([_np(f) for f in fs], [_np(f) for f in ft], p=p)
    assert got == pytest.approx(want, rel=1e-5)


def test_at_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        at_loss([torch.zeros(1, 1, 2, 2)], [])


def test_rkd_matches_reference(gen: torch.Generator) -> None:
    s, t = torch.randn(6, 5, generator=gen), 3 * torch.randn(6, 7, generator=gen)
    d = ref_rkd_distance(_np(s), _np(t))
    a = ref_rkd_angle(_np(s), _np(t))
    assert rkd_distance_loss(s, t).item() == pytest.approx(d, rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(a, rel=1e-5)
    assert rkd_loss(s, t).item() == pytest.approx(25 * d + 50 * a, rel=1e-5)
    assert rkd_loss(s, t, 2.0, 0.0).item() == pytest.approx(2 * d, rel=1e-5)


def test_rkd_huber_linear_branch(gen: torch.Generator) -> None:
    # A teacher with one far outlier makes some normalised distance gaps exceed 1.
    s = torch.randn(5, 3, generator=gen)
    t = torch.randn(5, 3, generator=gen)
    t[0] += 40.0
    assert rkd_distance_loss(s, t).item() == pytest.approx(
        ref_rkd_distance(_np(s), _np(t)), rel=1e-5
    )


def test_sp_matches_reference(gen: torch.Generator) -> None:
    s, t = torch.randn(5, 3, 4, 4, generator=gen), torch.randn(5, 8, 2, 2, generator=gen)
    assert sp_loss(s, t).item() == pytest.approx(ref_sp(_np(s), _np(t)), rel=1e-5)


def test_pkt_matches_reference(gen: torch.Generator) -> None:
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 9, generator=gen)
    assert pkt_loss(s, t).item() == pytest.approx(ref_pkt(_np(s), _np(t)), rel=1e-5)


def test_identical_inputs_give_zero(gen: torch.Generator) -> None:
    x = torch.randn(4, 3, 4, 4, generator=gen)
    e = torch.randn(4, 6, generator=gen)
    assert fitnet_loss(x, x).item() == 0.0
    assert at_loss([x], [x]).item() == pytest.approx(0.0, abs=1e-12)
    assert rkd_loss(e, e).item() == pytest.approx(0.0, abs=1e-10)
    assert sp_loss(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert pkt_loss(e, e).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- gradients


def _gradcheck(fn, s: torch.Tensor, t: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    s = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(x, t.double()), (s,), eps=1e-6, atol=1e-5)


def test_gradcheck(gen: torch.Generator) -> None:
    m_s, m_t = torch.randn(3, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)
    e_s, e_t = torch.randn(5, 3, generator=gen), torch.randn(5, 4, generator=gen)
    _gradcheck(fitnet_loss, m_s, m_t)
    _gradcheck(lambda a, b: at_loss([a], [b]), m_s, torch.randn(3, 5, 2, 2, generator=gen))
    _gradcheck(rkd_distance_loss, e_s, e_t)
    _gradcheck(rkd_angle_loss, e_s, e_t)
    _gradcheck(sp_loss, m_s, m_t)
    _gradcheck(pkt_loss, e_s, e_t)


def test_teacher_is_detached(gen: torch.Generator) -> None:
    s = torch.randn(4, 3, generator=gen, requires_grad=True)
    t = torch.randn(4, 3, generator=gen, requires_grad=True)
    for fn in (rkd_loss, pkt_loss, sp_loss):
        fn(s, t).backward()
    assert t.grad is None and s.grad is not None


# ----------------------------------------------------------------------------- invariances


def test_per_sample_means_invariant_to_batch_duplication(gen: torch.Generator) -> None:
    s, t = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    s2, t2 = torch.cat([s, s]), torch.cat([t, t])
    assert fitnet_loss(s2, s2.flip(0)).item() == pytest.approx(
        fitnet_loss(s, s.flip(0)).item(), rel=1e-6
    )
    assert at_loss([s2], [t2]).item() == pytest.approx(at_loss([s], [t]).item(), rel=1e-6)


def test_relation_losses_invariant_to_batch_permutation(gen: torch.Generator) -> None:
    # RKD, SP and PKT compare relations within the batch: duplicating the batch changes them,
    # but permuting it (the same permutation on both sides) must not.
    e_s, e_t = torch.randn(7, 5, generator=gen), torch.randn(7, 6, generator=gen)
    m_s, m_t = torch.randn(7, 2, 3, 3, generator=gen), torch.randn(7, 4, 2, 2, generator=gen)
    perm = torch.randperm(7, generator=gen)
    for fn, a, b in (
        (rkd_distance_loss, e_s, e_t),
        (rkd_angle_loss, e_s, e_t),
        (pkt_loss, e_s, e_t),
        (sp_loss, m_s, m_t),
    ):
        assert fn(a[perm], b[perm]).item() == pytest.approx(fn(a, b).item(), rel=1e-5)


# ----------------------------------------------------------------------------- robustness


def test_finite_for_large_and_bf16_inputs(gen: torch.Generator) -> None:
    m_s, m_t = torch.randn(4, 3, 4, 4, generator=gen), torch.randn(4, 5, 4, 4, generator=gen)
    e_s, e_t = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    for scale in (1e3, 1e4):
        for dtype in (torch.float32, torch.bfloat16):
            ms, mt = (scale * m_s).to(dtype), (scale * m_t).to(dtype)
            es, et = (scale * e_s).to(dtype), (scale * e_t).to(dtype)
            values = [
                fitnet_loss(ms, (scale * m_s.flip(0)).to(dtype)),
                at_loss([ms], [mt]),
                rkd_loss(es, et),
                sp_loss(ms, mt),
                pkt_loss(es, et),
            ]
            for v in values:
                assert v.dtype == torch.float32
                assert torch.isfinite(v), (scale, dtype, v)


def test_batch_of_one_is_finite() -> None:
    e = torch.randn(1, 4)
    assert torch.isfinite(rkd_loss(e, e + 1))
    assert torch.isfinite(pkt_loss(e, e + 1))
    assert torch.isfinite(sp_loss(e, e + 1))
