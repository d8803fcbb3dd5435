"""Losses on logit maps equal the official segmentation code's computations (CIRKD's
``CriterionKD`` and ``CriterionCWD(norm_type='channel', divergence='kl')``, DIST_KD's
segmentation ``DIST``), re-stated here in the official operation order, in values and gradients
to 1e-5; plus float64 loops over the definitions and the edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.core.errors import MethodError
from kdlab.losses.dense import cwd_loss, dist_pixel_loss, pixel_kd_loss

B, K, H, W = 2, 5, 3, 4


def _maps(seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, K, H, W, generator=g) * scale,
            torch.randn(B, K, H, W, generator=g) * scale)


def official_kd(pred: torch.Tensor, soft: torch.Tensor, t: float) -> torch.Tensor:
    """CIRKD CriterionKD: rows per pixel, kl_div(log_softmax, softmax, 'batchmean') * T^2."""
    c = soft.shape[1]
    p_s = F.log_softmax(pred.permute(0, 2, 3, 1).reshape(-1, c) / t, dim=1)
    p_t = F.softmax(soft.permute(0, 2, 3, 1).reshape(-1, c) / t, dim=1)
    return F.kl_div(p_s, p_t, reduction="batchmean") * t**2


def official_cwd(s: torch.Tensor, t_map: torch.Tensor, t: float) -> torch.Tensor:
    """CIRKD CriterionCWD, channel norm + KL: softmax over H*W of x / T, log of the student's,
    KLDivLoss(sum) / (n * c) * T^2."""
    n, c = s.shape[:2]
    norm_s = (s / t).reshape(n, c, -1).softmax(dim=-1)
    norm_t = (t_map.detach() / t).reshape(n, c, -1).softmax(dim=-1)
    return F.kl_div(norm_s.log(), norm_t, reduction="sum") / (n * c) * t**2


def official_dist(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """DIST_KD segmentation DIST (beta = gamma = 1, no temperature): transpose(1, 3) rows."""
    k = y_s.shape[1]
    y_s = y_s.transpose(1, 3).reshape(-1, k).softmax(dim=1)
    y_t = y_t.transpose(1, 3).reshape(-1, k).softmax(dim=1)

    def pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(1, keepdim=True)
        y = y - y.mean(1, keepdim=True)
        return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1) + 1e-8)

    return (1 - pearson(y_s, y_t).mean()) + (1 - pearson(y_s.t(), y_t.t()).mean())


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_pixel_kd_equals_cirkd(t: float) -> None:
    s, te = _maps()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours, ref = pixel_kd_loss(s1, te, t), official_kd(s2, te, t)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_cwd_equals_cirkd(t: float) -> None:
    s, te = _maps(1)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours, ref = cwd_loss(s1, te, t), official_cwd(s2, te, t)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_dist_pixels_equals_dist_kd_segmentation() -> None:
    s, te = _maps(2)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours, ref = dist_pixel_loss(s1, te), official_dist(s2, te)
    assert torch.allclose(ours, ref, atol=1e-5)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_float64_loops_over_the_definitions() -> None:
    s, te = (m.double() for m in _maps(3))
    t = 2.0
    kd = cw = 0.0
    for b in range(B):
        for h in range(H):
            for w in range(W):
                p = torch.softmax(te[b, :, h, w] / t, 0)
                q = torch.softmax(s[b, :, h, w] / t, 0)
                kd += float((p * (p.log() - q.log())).sum())
        for c in range(K):
            p = torch.softmax(te[b, c].flatten() / t, 0)
            q = torch.softmax(s[b, c].flatten() / t, 0)
            cw += float((p * (p.log() - q.log())).sum())
    assert pixel_kd_loss(s, te, t).item() == pytest.approx(kd / (B * H * W) * t**2, rel=1e-12)
    assert cwd_loss(s, te, t).item() == pytest.approx(cw / (B * K) * t**2, rel=1e-12)


def test_mask_and_invariants() -> None:
    s, te = _maps(4)
    assert pixel_kd_loss(te, te).item() == pytest.approx(0.0, abs=1e-6)
    assert cwd_loss(te, te).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 0, 0] = True
    rows = [(0, 1, 2), (1, 0, 0)]
    expected = sum(pixel_kd_loss(s[b:b + 1, :, h:h + 1, w:w + 1], te[b:b + 1, :, h:h + 1,
                                                                        w:w + 1])
                   for b, h, w in rows) / 2
    assert torch.allclose(pixel_kd_loss(s, te, mask=mask), expected, atol=1e-6)
    assert pixel_kd_loss(s, te, mask=torch.zeros(B, H, W, dtype=torch.bool)).item() == 0.0
    # the teacher gets no gradient; bf16 maps are computed in float32
    te_req = te.clone().requires_grad_()
    pixel_kd_loss(s.clone().requires_grad_(), te_req).backward()
    assert te_req.grad is None
    assert cwd_loss(s.bfloat16(), te.bfloat16()).dtype == torch.float32


def test_refusals_are_one_line() -> None:
    s, te = _maps()
    with pytest.raises(MethodError, match="same shape"):
        cwd_loss(s, te[:, :3])
    with pytest.raises(MethodError, match="B x K x H x W"):
        pixel_kd_loss(s[0], te[0])
    with pytest.raises(MethodError, match="temperature must be > 0"):
        pixel_kd_loss(s, te, 0.0)
    with pytest.raises(MethodError, match="mask must be"):
        pixel_kd_loss(s, te, mask=torch.ones(B, H, W + 1, dtype=torch.bool))
