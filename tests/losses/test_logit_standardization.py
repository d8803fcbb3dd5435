"""Logit standardization (LS; Sun et al., CVPR 2024) on every logit method.

The references below are written here, step by step after the official code
(sunshangquan/logit-standardization-KD @ f6e5aa5, ``mdistiller/distillers/KD.py`` and ``DKD.py``:
``normalize``, ``kd_loss``, ``dkd_loss`` with ``_get_gt_mask``/``_get_other_mask``/``cat_mask``),
and never call the kdlab function under test. The official per-method settings are those of
``tools/train.py`` with ``--logit-stand --base-temp 2 --kd-weight 9``: KD with T 2, KD weight 9,
CE 0.1; DKD with T 2, alpha and beta multiplied by 9, CE 1 and the 20-epoch warm-up.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdlab.methods.logit  # noqa: F401  (registers the methods)
import kdlab.methods.sdd  # noqa: F401
from kdlab.losses.dckd import dckd_loss
from kdlab.losses.logit import kd_loss, nkd_loss
from kdlab.losses.sdd import multiscale_logits, sdd_loss
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.registry import get_method
from kdlab.models.output import ModelOutput
from support import TinyNet

K = 10
B = 8


# ----------------------------------------------------------------------- official operations
def off_normalize(logit: Tensor) -> Tensor:
    """The official ``normalize``: z-score over the last dim, unbiased std, +1e-7."""
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def off_kd_loss(ls: Tensor, lt: Tensor, temperature: float, logit_stand: bool) -> Tensor:
    """The official ``kd_loss`` (KD.py)."""
    s = off_normalize(ls) if logit_stand else ls
    t = off_normalize(lt) if logit_stand else lt
    log_pred_student = F.log_softmax(s / temperature, dim=1)
    pred_teacher = F.softmax(t / temperature, dim=1)
    loss = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    return loss * temperature**2


def _gt_mask(logits: Tensor, target: Tensor) -> Tensor:
    return torch.zeros_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 1).bool()


def _other_mask(logits: Tensor, target: Tensor) -> Tensor:
    return torch.ones_like(logits).scatter_(1, target.reshape(-1).unsqueeze(1), 0).bool()


def _cat_mask(t: Tensor, mask1: Tensor, mask2: Tensor) -> Tensor:
    t1 = (t * mask1).sum(dim=1, keepdims=True)
    t2 = (t * mask2).sum(1, keepdims=True)
    return torch.cat([t1, t2], dim=1)


def off_dkd_loss(ls: Tensor, lt: Tensor, target: Tensor, alpha: float, beta: float,
                 temperature: float, logit_stand: bool) -> Tensor:
    """The official ``dkd_loss`` (DKD.py): normalize, then the masks, ``torch.log`` of the
    binary distribution and ``kl_div(sum) * T^2 / B``."""
    s = off_normalize(ls) if logit_stand else ls
    t = off_normalize(lt) if logit_stand else lt
    gt_mask, other_mask = _gt_mask(s, target), _other_mask(s, target)
    pred_student = _cat_mask(F.softmax(s / temperature, dim=1), gt_mask, other_mask)
    pred_teacher = _cat_mask(F.softmax(t / temperature, dim=1), gt_mask, other_mask)
    log_pred_student = torch.log(pred_student)
    tckd = (F.kl_div(log_pred_student, pred_teacher, reduction="sum") * temperature**2
            / target.shape[0])
    pred_teacher_part2 = F.softmax(t / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(s / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum")
            * temperature**2 / target.shape[0])
    return alpha * tckd + beta * nckd


# ----------------------------------------------------------------------------------- helpers

def _context(b: int = B) -> tuple[DistillContext, Batch]:
    student, teacher = TinyNet(6, 4, 0, K, 30.0), TinyNet(10, 4, 1, K, 30.0)
    ctx = DistillContext.from_models(
        student, teacher, num_classes=K, train_labels=torch.randint(0, K, (20,)), input_size=16
    )
    g = torch.Generator().manual_seed(3)
    images = torch.randn(b, 3, 16, 16, generator=g)
    batch = Batch(images=images, labels=torch.randint(0, K, (b,), generator=g),
                  index=torch.arange(b))
    return ctx, batch


def _build(name: str, ctx: DistillContext, **params: Any):
    cls = get_method(name)
    return cls(cls.Params(**params), ctx)


def _logits(scale: float, seed: int, b: int = B) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(b, K, generator=g, dtype=torch.float64)).requires_grad_()
    zt = scale * torch.randn(b, K, generator=g, dtype=torch.float64) + 2.0
    y = torch.randint(0, K, (b,), generator=g)
    return zs, zt, y


def _out(logits: Tensor) -> ModelOutput:
    return ModelOutput(logits=logits, feature_map=torch.zeros(logits.shape[0], 1, 1, 1))


def _assert_close(a: Tensor, b: Tensor) -> None:
    """1e-5 relative; dtypes may differ (kdlab's CE term is float32 whatever the input)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, check_dtype=False)


# ------------------------------------------------------------------ equality with the official
@pytest.mark.parametrize("scale", [3.0, 30.0])
def test_kd_ls_equals_official(scale: float) -> None:
    ctx, _ = _context()
    zs, zt, y = _logits(scale, seed=0)
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    kd = _build("kd", ctx, logit_standardization=True, temperature=2.0, kd_weight=9.0,
                ce_weight=0.1)
    terms = kd(_out(zs), _out(zt), batch, epoch=1)
    ours = terms["ce"] + terms["kd"]
    g_ours = torch.autograd.grad(ours, zs)[0]
    ref = 0.1 * F.cross_entropy(zs, y) + 9.0 * off_kd_loss(zs, zt, 2.0, True)
    g_ref = torch.autograd.grad(ref, zs)[0]
    _assert_close(ours, ref)
    _assert_close(g_ours, g_ref)
    # the CE term reads the RAW logits (standardizing it too would give another value)
    _assert_close(terms["ce"], 0.1 * F.cross_entropy(zs, y))
    assert not torch.allclose(terms["ce"].double(), 0.1 * F.cross_entropy(off_normalize(zs), y))


@pytest.mark.parametrize("scale", [3.0, 30.0])
@pytest.mark.parametrize("epoch", [5, 30])
def test_dkd_ls_equals_official(scale: float, epoch: int) -> None:
    ctx, _ = _context()
    zs, zt, y = _logits(scale, seed=1)
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    # the official rule: alpha, beta times kd-weight (9), T = base-temp (2), CE 1, warm-up 20
    dkd = _build("dkd", ctx, logit_standardization=True, temperature=2.0, alpha=9.0,
                 beta=72.0, ce_weight=1.0, warmup_epochs=20)
    terms = dkd(_out(zs), _out(zt), batch, epoch=epoch)
    ours = terms["ce"] + terms["dkd"]
    g_ours = torch.autograd.grad(ours, zs)[0]
    ref = F.cross_entropy(zs, y) + min(epoch / 20, 1.0) * off_dkd_loss(
        zs, zt, y, 9.0, 72.0, 2.0, True)
    g_ref = torch.autograd.grad(ref, zs)[0]
    _assert_close(ours, ref)
    _assert_close(g_ours, g_ref)


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_float32_agrees_with_official(name: str) -> None:
    """The same at float32, the precision training runs at."""
    ctx, _ = _context()
    zs64, zt64, y = _logits(3.0, seed=4)
    zs = zs64.detach().float().requires_grad_()
    zt = zt64.float()
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    if name == "kd":
        method = _build("kd", ctx, logit_standardization=True, temperature=2.0, kd_weight=9.0)
        ref = 9.0 * off_kd_loss(zs, zt, 2.0, True)
    else:
        method = _build("dkd", ctx, logit_standardization=True, temperature=2.0, alpha=9.0,
                        beta=18.0, warmup_epochs=0)
        ref = off_dkd_loss(zs, zt, y, 9.0, 18.0, 2.0, True)
    ours = method(_out(zs), _out(zt), batch, epoch=1)[name]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, zs)[0], torch.autograd.grad(ref, zs)[0],
                               rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("name", ["kd", "dkd", "nkd", "dckd"])
def test_ls_loss_is_invariant_to_per_sample_affine_maps(name: str) -> None:
    """Z(a z + b) = Z(z) for a > 0, per sample: the LS loss ignores the logits' range."""
    ctx, _ = _context()
    zs, zt, y = _logits(3.0, seed=5)
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    g = torch.Generator().manual_seed(6)
    a_s, b_s = torch.rand(B, 1, generator=g, dtype=torch.float64) * 20 + 0.1, \
        torch.randn(B, 1, generator=g, dtype=torch.float64) * 50
    a_t, b_t = torch.rand(B, 1, generator=g, dtype=torch.float64) * 20 + 0.1, \
        torch.randn(B, 1, generator=g, dtype=torch.float64) * 50
    method = _build(name, ctx, logit_standardization=True)
    plain = method(_out(zs), _out(zt), batch, epoch=30)[name]
    mapped = method(_out(a_s * zs + b_s), _out(a_t * zt + b_t), batch, epoch=30)[name]
    _assert_close(plain, mapped)
    # without LS the loss does depend on the range (the invariance is LS's doing)
    raw = _build(name, ctx)
    assert not torch.allclose(raw(_out(zs), _out(zt), batch, epoch=30)[name],
                              raw(_out(a_s * zs + b_s), _out(a_t * zt + b_t), batch,
                                  epoch=30)[name])


@pytest.mark.parametrize("name", ["kd", "dkd", "nkd", "dckd"])
def test_ls_batch_size_invariance(name: str) -> None:
    """A batch mean: the loss of a batch is the mean of its two halves' losses (LS is per
    sample, so no statistic crosses samples)."""
    ctx, _ = _context()
    zs, zt, y = _logits(3.0, seed=7, b=2 * B)
    method = _build(name, ctx, logit_standardization=True)

    def loss(sl: slice) -> Tensor:
        batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y[sl], index=torch.arange(B))
        return method(_out(zs[sl]), _out(zt[sl]), batch, epoch=30)[name]

    _assert_close(loss(slice(0, 2 * B)), (loss(slice(0, B)) + loss(slice(B, 2 * B))) / 2)


def test_ls_off_is_bit_identical_to_the_raw_losses() -> None:
    """The switch's default changes nothing: the raw loss functions, bit for bit."""
    ctx, _ = _context()
    zs, zt, y = _logits(3.0, seed=8)
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    kd = _build("kd", ctx)
    assert torch.equal(kd(_out(zs), _out(zt), batch, epoch=1)["kd"], 0.9 * kd_loss(zs, zt, 4.0))


@pytest.mark.parametrize("legacy", [False, True])
def test_nkd_ls_is_nkd_on_standardized_logits(legacy: bool) -> None:
    ctx, _ = _context()
    zs, zt, y = _logits(3.0, seed=9)
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    nkd = _build("nkd", ctx, logit_standardization=True, temperature=4.0, gamma=8.0,
                 legacy=legacy, warmup_epochs=0)
    terms = nkd(_out(zs), _out(zt), batch, epoch=1)
    ref = nkd_loss(off_normalize(zs), off_normalize(zt), y, 4.0, 8.0, legacy=legacy)
    _assert_close(terms["nkd"], ref)
    _assert_close(torch.autograd.grad(terms["nkd"], zs)[0], torch.autograd.grad(ref, zs)[0])
    _assert_close(terms["ce"], F.cross_entropy(zs, y))


@pytest.mark.parametrize("target_rule", ["max", "correct", "teacher"])
def test_dckd_ls_is_dckd_on_standardized_logits(target_rule: str) -> None:
    ctx, _ = _context()
    zs, zt, y = _logits(3.0, seed=10)
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    dckd = _build("dckd", ctx, logit_standardization=True, target_rule=target_rule,
                  warmup_epochs=0)
    got = dckd(_out(zs), _out(zt), batch, epoch=1)["dckd"]
    ref = dckd_loss(off_normalize(zs), off_normalize(zt), y, 1.0, 8.0, 4.0,
                    target_rule=target_rule)
    _assert_close(got, ref)
    _assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(ref, zs)[0])


# ------------------------------------------------------------------------------------- SDD
SDD_BASES = {"sd_kd": ("kd", {"temperature": 4.0}),
             "sd_dkd": ("dkd", {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}),
             "sd_nkd": ("nkd", {"temperature": 1.0, "gamma": 1.5, "legacy": False})}


@pytest.mark.parametrize("name", sorted(SDD_BASES))
def test_sdd_ls_is_sdd_on_standardized_region_logits(name: str) -> None:
    """SD-X + LS = L_SDD on the z-scores of every global and local logit vector (student and
    teacher); the region weights are unchanged (a z-score keeps the argmax)."""
    ctx, batch = _context()
    student, teacher = ctx.student, ctx.teacher
    assert teacher is not None
    out_s = student(batch.images)
    with torch.no_grad():
        out_t = teacher(batch.images)
    warmup = {} if name == "sd_kd" else {"warmup_epochs": 0}
    method = _build(name, ctx, logit_standardization=True, scales=[1, 2, 4], **warmup)
    got = method(out_s, out_t, batch, epoch=1)["sdd"]
    local_s = multiscale_logits(out_s.feature_map, student.classifier, [1, 2, 4])
    local_t = multiscale_logits(out_t.feature_map, teacher.classifier, [1, 2, 4]).detach()
    # z-score over the classes of every region's vector: B x K x N -> over dim 1
    zs = off_normalize(local_s.transpose(1, 2)).transpose(1, 2)
    zt = off_normalize(local_t.transpose(1, 2)).transpose(1, 2)
    base, kwargs = SDD_BASES[name]
    ref = sdd_loss(zs, zt, batch.labels, base=base, base_kwargs=kwargs)
    if name == "sd_kd":
        ref = 0.9 * ref
    _assert_close(got, ref)
    w = student.classifier.weight
    _assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(ref, w)[0])


@pytest.mark.parametrize(("sdd", "base"), [("sd_kd", "kd"), ("sd_dkd", "dkd"), ("sd_nkd", "nkd")])
def test_sdd_with_scale_1_and_ls_is_the_base_method_with_ls(sdd: str, base: str) -> None:
    ctx, batch = _context()
    assert ctx.teacher is not None
    out_s = ctx.student(batch.images)
    with torch.no_grad():
        out_t = ctx.teacher(batch.images)
    a = _build(sdd, ctx, logit_standardization=True, scales=[1])(out_s, out_t, batch, epoch=7)
    b = _build(base, ctx, logit_standardization=True)(out_s, out_t, batch, epoch=7)
    _assert_close(a["sdd"], b[base])
    _assert_close(a["ce"], b["ce"])
    w = ctx.student.classifier.weight
    _assert_close(torch.autograd.grad(a["sdd"], w)[0], torch.autograd.grad(b[base], w)[0])


def test_ls_under_bf16_autocast_is_computed_in_float32() -> None:
    """bf16 logits are standardized after the cast to float32: the result equals the float32
    computation on the same (bf16-rounded) values."""
    ctx, _ = _context()
    zs, zt, y = _logits(3.0, seed=11)
    zs16, zt16 = zs.detach().bfloat16(), zt.bfloat16()
    batch = Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))
    kd = _build("kd", ctx, logit_standardization=True, temperature=2.0)
    got = kd(_out(zs16), _out(zt16), batch, epoch=1)["kd"]
    assert got.dtype == torch.float32
    ref = 0.9 * off_kd_loss(zs16.float(), zt16.float(), 2.0, True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
