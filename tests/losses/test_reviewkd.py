"""ReviewKD: HCL against an independent computation, ABF shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlab.losses.reviewkd import hcl_loss
from kdlab.methods.reviewkd import ABF


def ref_pool(x: np.ndarray, l: int) -> np.ndarray:
    """Adaptive average pooling to l x l (PyTorch's bin edges: floor/ceil)."""
    b, c, h, w = x.shape
    out = np.zeros((b, c, l, l))
    for i in range(l):
        h0, h1 = (i * h) // l, -((-(i + 1) * h) // l)
        for j in range(l):
            w0, w1 = (j * w) // l, -((-(j + 1) * w) // l)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def ref_hcl(fs: list[np.ndarray], ft: list[np.ndarray]) -> float:
    total = 0.0
    for s, t in zip(fs, ft, strict=True):
        h = s.shape[2]
        num = np.mean((s - t) ** 2)
        den = 1.0
        weight = 1.0
        for l in (4, 2, 1):
            if l < h:
                weight /= 2
                num += weight * np.mean((ref_pool(s, l) - ref_pool(t, l)) ** 2)
                den += weight
        total += num / den
    return float(total)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _maps(gen: torch.Generator) -> list[torch.Tensor]:
    shapes = [(2, 3, 8, 8), (2, 4, 5, 5), (2, 5, 2, 2), (2, 6, 1, 1)]
    return [torch.randn(*s, generator=gen) for s in shapes]


def test_hcl_matches_reference(gen: torch.Generator) -> None:
    fs, ft = _maps(gen), _maps(gen)
    want = ref_hcl([f.double().numpy() for f in fs], [f.double().numpy() for f in ft])
    assert hcl_loss(fs, ft).item() == pytest.approx(want, rel=1e-5)


def test_hcl_single_level_weights() -> None:
    # For a 4x4 map the pyramid is {2, 1}: (mse + mse2/2 + mse1/4) / 1.75
    s = torch.zeros(1, 1, 4, 4)
    t = torch.ones(1, 1, 4, 4)
    assert hcl_loss([s], [t]).item() == pytest.approx(1.0)
    t = torch.zeros(1, 1, 4, 4)
    t[0, 0, 0, 0] = 4.0  # mse = 1, 2x2 pooled mse = 1/4, 1x1 pooled mse = 1/16
    want = (1.0 + 0.5 * 0.25 + 0.25 * (1 / 16)) / 1.75
    assert hcl_loss([s], [t]).item() == pytest.approx(want)


def test_hcl_gradcheck_and_detach(gen: torch.Generator) -> None:
    s = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: hcl_loss([x], [t]), (s,))
    hcl_loss([s], [t]).backward()
    assert t.grad is None


def test_hcl_batch_duplication_invariant_and_finite(gen: torch.Generator) -> None:
    fs, ft = _maps(gen), _maps(gen)
    dup = hcl_loss([torch.cat([f, f]) for f in fs], [torch.cat([f, f]) for f in ft])
    assert dup.item() == pytest.approx(hcl_loss(fs, ft).item(), rel=1e-6)
    big = hcl_loss([(1e4 * f).bfloat16() for f in fs], [(1e4 * f).bfloat16() for f in ft])
    assert big.dtype == torch.float32 and torch.isfinite(big)


def test_hcl_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        hcl_loss([torch.zeros(1, 2, 4, 4)], [torch.zeros(1, 3, 4, 4)])


@pytest.mark.parametrize(
    ("s_shape", "t_shape"),
    [((8, 4, 4), (16, 8, 8)), ((8, 2, 2), (16, 4, 4)), ((8, 8, 8), (16, 4, 4))],
)
def test_abf_output_matches_teacher_shape(
    gen: torch.Generator, s_shape: tuple[int, int, int], t_shape: tuple[int, int, int]
) -> None:
    x = torch.randn(2, *s_shape, generator=gen)
    deep = ABF(12, 6, 20, fuse=False)
    y0, res = deep(torch.randn(2, 12, 1, 1, generator=gen), None, (1, 1))
    assert y0.shape == (2, 20, 1, 1) and res.shape == (2, 6, 1, 1)
    abf = ABF(s_shape[0], 6, t_shape[0], fuse=True)
    y, res2 = abf(x, res, t_shape[1:])
    assert y.shape == (2, *t_shape)
    assert res2.shape == (2, 6, *t_shape[1:])
    with pytest.raises(ValueError):
        abf(x, None, t_shape[1:])
