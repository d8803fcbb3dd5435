"""CRD's NCE pieces: sampling, memory update, NCE loss against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.losses.crd import (
    contrast_scores,
    crd_loss,
    estimate_partition,
    memory_update_rows,
    nce_loss,
    sample_negatives,
)


def ref_nce(p: np.ndarray, n_data: int, eps: float = 1e-7) -> float:
    b, k1 = p.shape
    m = k1 - 1
    mpn = m / n_data
    total = 0.0
    for i in range(b):
        total += math.log(p[i, 0] / (p[i, 0] + mpn + eps))
        for j in range(1, k1):
            total += math.log(mpn / (p[i, j] + mpn + eps))
    return -total / b


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_memory_update_momentum_and_renormalisation() -> None:
    old = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    new = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    got = memory_update_rows(old, new, momentum=0.5)
    r = 1 / math.sqrt(2)
    # row 0: (0.5, 0.5) / |.| ; row 1: (0, 1 + 0.5) / 1.5
    assert torch.allclose(got, torch.tensor([[r, r], [0.0, 1.0]]))
    got = memory_update_rows(old, new, momentum=0.75)
    v = torch.tensor([0.75, 0.25])
    assert torch.allclose(got[0], v / v.norm())
    assert torch.allclose(got.norm(dim=1), torch.ones(2))


def test_exact_negatives_never_share_the_anchor_class(gen: torch.Generator) -> None:
    labels = torch.randint(0, 5, (200,), generator=gen)
    anchors_idx = torch.arange(0, 200, 7)
    anchor_labels = labels[anchors_idx]
    pool = 200 - int(torch.bincount(labels).max())
    for replacement in (False, True):
        k = pool if not replacement else 3 * pool
        neg = sample_negatives(labels, anchor_labels, k, generator=gen, replacement=replacement)
        assert neg.shape == (anchors_idx.numel(), k)
        assert neg.dtype == torch.int64
        assert int(neg.min()) >= 0 and int(neg.max()) < 200
        assert not bool((labels[neg] == anchor_labels.unsqueeze(1)).any())
        # the anchor itself (same class) is never a negative
        assert not bool((neg == anchors_idx.unsqueeze(1)).any())
        if not replacement:
            for row in neg:
                assert row.unique().numel() == k


def test_sampling_covers_the_whole_negative_pool_uniformly() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    g = torch.Generator().manual_seed(1)
    anchor = torch.zeros(4000, dtype=torch.long)
    for replacement in (False, True):
        neg = sample_negatives(labels, anchor, 2, generator=g, replacement=replacement)
        counts = torch.bincount(neg.flatten(), minlength=8).double()
        assert counts[:2].sum() == 0
        freq = counts[2:] / counts[2:].sum()
        assert torch.allclose(freq, torch.full((6,), 1 / 6, dtype=torch.float64), atol=0.02)


def test_sampling_is_reproducible_with_a_generator() -> None:
    labels = torch.randint(0, 3, (50,), generator=torch.Generator().manual_seed(3))
    a = sample_negatives(labels, labels[:4], 10, generator=torch.Generator().manual_seed(7))
    b = sample_negatives(labels, labels[:4], 10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_too_many_negatives_without_replacement_raises() -> None:
    labels = torch.tensor([0, 0, 0, 1])
    with pytest.raises(ValueError):
        sample_negatives(labels, torch.tensor([0]), 2)


def test_nce_loss_matches_reference(gen: torch.Generator) -> None:
    p = torch.rand(4, 6, generator=gen) * 1e-3
    assert nce_loss(p, n_data=100).item() == pytest.approx(
        ref_nce(p.double().numpy(), 100), rel=1e-5
    )
    # per-sample mean: duplicating the batch leaves it unchanged
    assert nce_loss(torch.cat([p, p]), 100).item() == pytest.approx(
        nce_loss(p, 100).item(), rel=1e-6
    )


def test_nce_loss_gradcheck(gen: torch.Generator) -> None:
    p = (torch.rand(3, 5, generator=gen, dtype=torch.float64) * 0.1 + 0.01).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: nce_loss(x, 50), (p,))


def test_contrast_scores_and_partition(gen: torch.Generator) -> None:
    a = F.normalize(torch.randn(2, 4, generator=gen), dim=1)
    rows = F.normalize(torch.randn(2, 3, 4, generator=gen), dim=2)
    s = contrast_scores(a, rows, 0.5)
    want = np.exp(np.einsum("bkd,bd->bk", rows.double().numpy(), a.double().numpy()) / 0.5)
    assert np.allclose(s.double().numpy(), want, rtol=1e-5)
    assert estimate_partition(s, 10).item() == pytest.approx(float(want.mean() * 10), rel=1e-5)


def _bank(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=gen), dim=1)


def test_crd_loss_lower_for_aligned_embeddings(gen: torch.Generator) -> None:
    n, d, b, k = 64, 16, 8, 20
    labels = torch.arange(n) % 4
    mem_s, mem_t = _bank(n, d, gen), _bank(n, d, gen)
    index = torch.arange(b)
    neg = sample_negatives(labels, labels[index], k, generator=gen)
    idx = torch.cat([index.unsqueeze(1), neg], dim=1)
    rows_s, rows_t = mem_s[idx], mem_t[idx]
    z = 1.0 * n  # any fixed constant: the comparison is at equal Z
    aligned = crd_loss(mem_t[index], mem_s[index], rows_s, rows_t, z, z, n, 0.07)
    rand_s, rand_t = _bank(b, d, gen), _bank(b, d, gen)
    random = crd_loss(rand_s, rand_t, rows_s, rows_t, z, z, n, 0.07)
    assert aligned.item() < random.item()

    # and equals the sum of the two NCE directions computed independently
    def direction(anchor: torch.Tensor, rows: torch.Tensor) -> float:
        sc = np.exp(np.einsum("bkd,bd->bk", rows.double().numpy(), anchor.double().numpy()) / 0.07)
        return ref_nce(sc / z, n)

    want = direction(rand_s, rows_t) + direction(rand_t, rows_s)
    assert random.item() == pytest.approx(want, rel=1e-4)


def test_crd_loss_gradients_reach_both_embeddings(gen: torch.Generator) -> None:
    n, d = 30, 8
    mem_s, mem_t = _bank(n, d, gen), _bank(n, d, gen)
    idx = torch.randint(0, n, (4, 6), generator=gen)
    e_s = _bank(4, d, gen).requires_grad_(True)
    e_t = _bank(4, d, gen).requires_grad_(True)
    crd_loss(e_s, e_t, mem_s[idx], mem_t[idx], 5.0, 5.0, n).backward()
    assert e_s.grad is not None and e_t.grad is not None
    assert e_s.grad.abs().sum() > 0 and e_t.grad.abs().sum() > 0


def test_crd_loss_finite_for_bf16(gen: torch.Generator) -> None:
    n, d = 30, 8
    mem = _bank(n, d, gen)
    idx = torch.randint(0, n, (4, 6), generator=gen)
    e = _bank(4, d, gen).to(torch.bfloat16)
    v = crd_loss(e, e, mem[idx], mem[idx], 30.0, 30.0, n)
    assert v.dtype == torch.float32 and torch.isfinite(v)
