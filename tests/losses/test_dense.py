"""Losses on logit maps equal the official segmentation code's computations (CIRKD's
``CriterionKD`` and ``CriterionCWD(norm_type='channel', divergence='kl')``, DIST_KD's
segmentation ``DIST``), re-stated here in the official operation order, in values and gradients
to 1e-5; plus float64 loops over the definitions and the edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.core.errors import MethodError
from kdlab.losses.dense import (
    cwd_loss,
    dist_pixel_loss,
    pixel_kd_loss,
    pixel_sdd_loss,
    pixels_as_rows,
    window_logits,
)
from kdlab.losses.logit import dkd_loss, kd_loss
from kdlab.losses.sdd import sdd_loss

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


def test_window_logits_are_window_means() -> None:
    """Every pixel gets the mean logits of its s x s window (float64 loop), the border windows
    of a 5 x 7 map averaging only their existing pixels."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    local = window_logits(z, (1, 2, 4))
    assert local.shape == (2, 3, 3, 5, 7)
    assert torch.equal(local[:, :, 0], z)
    for i, s in enumerate((1, 2, 4)):
        for h in range(5):
            for w in range(7):
                r0, c0 = (h // s) * s, (w // s) * s
                want = z[:, :, r0:r0 + s, c0:c0 + s].mean(dim=(2, 3))
                assert torch.allclose(local[:, :, i, h, w], want, atol=1e-12), (s, h, w)


def test_window_logits_are_the_head_on_window_features() -> None:
    """A 1x1 convolution head is linear: a window's mean logit is the head on the window's mean
    feature (SDD's local logit: the classifier on a pooled region)."""
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(1, 6, 8, 8, generator=g, dtype=torch.float64)
    head = torch.nn.Conv2d(6, 4, 1).double()
    with torch.no_grad():
        local = window_logits(head(feats), (1, 4))[:, :, 1]
        pooled = head(F.avg_pool2d(feats, 4))
    assert torch.allclose(local[:, :, ::4, ::4], pooled, atol=1e-12)


def test_pixel_sdd_reduces_to_the_base_and_matches_sdd_loss() -> None:
    s, te = _maps(7)
    labels = torch.randint(0, K, (B, H, W), generator=torch.Generator().manual_seed(7))
    labels[0, 0, :2] = 255
    keep = labels.reshape(-1) != 255
    rows_s, rows_t = pixels_as_rows(s)[keep], pixels_as_rows(te)[keep]
    target = labels.reshape(-1)[keep]
    # scales (1,): the base loss over the labelled pixels
    assert torch.allclose(pixel_sdd_loss(s, te, labels, (1,), base="kd",
                                         base_kwargs={"temperature": 4.0}),
                          kd_loss(rows_s, rows_t, temperature=4.0), atol=1e-6)
    assert torch.allclose(pixel_sdd_loss(s, te, labels, (1,), base="dkd"),
                          dkd_loss(rows_s, rows_t, target), atol=1e-6)
    # scales (1, 2): sdd_loss on the pixels' window logits, built by hand
    local_s = torch.stack([s, _upsampled_means(s, 2)], 2).permute(0, 3, 4, 1, 2)
    local_t = torch.stack([te, _upsampled_means(te, 2)], 2).permute(0, 3, 4, 1, 2)
    want = sdd_loss(local_s.reshape(-1, K, 2)[keep], local_t.reshape(-1, K, 2)[keep], target,
                    base="dkd", beta=2.0)
    assert torch.allclose(pixel_sdd_loss(s, te, labels, (1, 2), base="dkd"), want, atol=1e-6)
    assert pixel_sdd_loss(s, te, torch.full_like(labels, 255)).item() == 0.0


def _upsampled_means(z: torch.Tensor, s: int) -> torch.Tensor:
    """Each pixel's s x s window mean, computed window by window."""
    out = torch.empty_like(z)
    for r in range(0, z.shape[2], s):
        for c in range(0, z.shape[3], s):
            out[:, :, r:r + s, c:c + s] = z[:, :, r:r + s, c:c + s].mean(dim=(2, 3),
                                                                        keepdim=True)
    return out
