"""MLKD's loss (Jin, Wang, Lin, CVPR 2023): ``code_exact`` against a step-by-step re-implementation
of the official ``KD_ours.py`` (and of the LS repository's ``MLKD.py``), the default variant
against an independent float64 NumPy derivation, gradients, and how each level scales with the
batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdlab.core.errors import MethodError
from kdlab.losses import mlkd_loss
from kdlab.losses.mlkd import class_confidence_mask, confidence_mask

C = 100
OFFICIAL_T = [4.0, 3.0, 5.0, 2.0, 6.0]


# ----------------------------------------------------------------------------- the official code
# Written from Jin-Ying/Multi-Level-Logit-Distillation, mdistiller/distillers/KD_ours.py (and the
# LS repository's mdistiller/distillers/MLKD.py for `logit_stand`), operation by operation.
def off_normalize(logit):
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def off_kd(ls, lt, temperature, logit_stand=False):
    ls = off_normalize(ls) if logit_stand else ls
    lt = off_normalize(lt) if logit_stand else lt
    log_pred_student = F.log_softmax(ls / temperature, dim=1)
    pred_teacher = F.softmax(lt / temperature, dim=1)
    loss_kd = F.kl_div(log_pred_student, pred_teacher, reduction="none").sum(1).mean()
    loss_kd *= temperature**2
    return loss_kd


def off_cc(ls, lt, temperature):
    batch_size, class_num = lt.shape
    pred_student = F.softmax(ls / temperature, dim=1)
    pred_teacher = F.softmax(lt / temperature, dim=1)
    student_matrix = torch.mm(pred_student.transpose(1, 0), pred_student)
    teacher_matrix = torch.mm(pred_teacher.transpose(1, 0), pred_teacher)
    return ((teacher_matrix - student_matrix) ** 2).sum() / class_num


def off_bc(ls, lt, temperature):
    batch_size, class_num = lt.shape
    pred_student = F.softmax(ls / temperature, dim=1)
    pred_teacher = F.softmax(lt / temperature, dim=1)
    student_matrix = torch.mm(pred_student, pred_student.transpose(1, 0))
    teacher_matrix = torch.mm(pred_teacher, pred_teacher.transpose(1, 0))
    return ((teacher_matrix - student_matrix) ** 2).sum() / batch_size


def official(sw, tw, ss, ts, base_t=4.0, kd_weight=0.9, logit_stand=False):
    """KD_ours.forward_train's losses, after the four forward passes (minus CE)."""
    w = kd_weight
    pred_teacher_weak = F.softmax(tw.detach(), dim=1)
    confidence, pseudo_labels = pred_teacher_weak.max(dim=1)
    confidence = confidence.detach()
    conf_thresh = np.percentile(confidence.cpu().numpy().flatten(), 50)
    mask = confidence.le(conf_thresh).bool()
    class_confidence = torch.sum(pred_teacher_weak, dim=0).detach()
    class_confidence_thresh = np.percentile(class_confidence.cpu().numpy().flatten(), 50)
    class_conf_mask = class_confidence.le(class_confidence_thresh).bool()
    temps = [base_t, 3.0, 5.0, 2.0, 6.0]

    def kd(a, b, t):
        return off_kd(a, b, t, logit_stand=logit_stand)

    loss_kd_weak = sum(w * ((kd(sw, tw, t) * mask).mean()) for t in temps)
    loss_kd_strong = (w * kd(ss, ts, base_t) + w * kd(ss, ts, 3.0) + w * kd(ss, ts, 5.0)
                      + w * kd(sw, tw, 2.0) + w * kd(sw, tw, 6.0))
    loss_cc_weak = sum(w * ((off_cc(sw, tw, t) * class_conf_mask).mean()) for t in temps)
    loss_bc_weak = sum(w * ((off_bc(sw, tw, t) * mask).mean()) for t in temps)
    return {"kd": loss_kd_weak + loss_kd_strong, "cc": loss_cc_weak, "bc": loss_bc_weak}


# ----------------------------------------------------------------------------- helpers
def logits(b: int, std: float, seed: int, dtype=torch.float32, c: int = C):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, c, generator=g, dtype=torch.float64) * std).to(dtype)
            for _ in range(4)]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` relative to the larger magnitude of the compared tensor."""
    scale = max(float(b.detach().abs().max()), 1e-30)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------- code_exact
@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("b", [64, 7])
def test_code_exact_equals_the_official_code(std: float, b: int) -> None:
    sw, tw, ss, ts = logits(b, std, seed=int(std) + b)
    mine_in = [t.clone().requires_grad_(True) for t in (sw, ss)]
    ref_in = [t.clone().requires_grad_(True) for t in (sw, ss)]
    mine = {k: 0.9 * v for k, v in mlkd_loss(mine_in[0], tw, mine_in[1], ts, OFFICIAL_T,
                                             code_exact=True).items()}
    ref = official(ref_in[0], tw, ref_in[1], ts)
    assert mine.keys() == ref.keys()
    for key in ref:
        close(mine[key], ref[key])
        # gradients of each term with respect to both views' student logits
        g_mine = torch.autograd.grad(mine[key], mine_in, allow_unused=True, retain_graph=True)
        g_ref = torch.autograd.grad(ref[key], ref_in, allow_unused=True, retain_graph=True)
        for gm, gr in zip(g_mine, g_ref, strict=True):
            if gr is None:
                assert gm is None or not gm.any()
            else:
                close(gm, gr)


@pytest.mark.parametrize("std", [3.0, 30.0])
def test_code_exact_with_logit_standardization_equals_the_ls_code(std: float) -> None:
    """The LS repository's MLKD with --logit-stand --base-temp 2 --kd-weight 9."""
    sw, tw, ss, ts = logits(32, std, seed=5)
    mine_in = [t.clone().requires_grad_(True) for t in (sw, ss)]
    ref_in = [t.clone().requires_grad_(True) for t in (sw, ss)]
    mine = mlkd_loss(mine_in[0], tw, mine_in[1], ts, [2.0, 3.0, 5.0, 2.0, 6.0],
                     code_exact=True, logit_standardization=True)
    ref = official(ref_in[0], tw, ref_in[1], ts, base_t=2.0, kd_weight=9.0, logit_stand=True)
    for key in ref:
        close(9.0 * mine[key], ref[key])
    g_mine = torch.autograd.grad(sum(9.0 * v for v in mine.values()), mine_in)
    g_ref = torch.autograd.grad(sum(ref.values()), ref_in)
    for gm, gr in zip(g_mine, g_ref, strict=True):
        close(gm, gr)


def test_code_exact_quirks_are_what_the_official_code_computes() -> None:
    """Each quirk, isolated: the kept fraction is a factor (not per-sample weights), the strong
    KD sum reads the weak logits at its 4th and 5th temperature, no strong class/batch terms."""
    sw, tw, ss, ts = logits(10, 3.0, seed=9, dtype=torch.float64)
    out = mlkd_loss(sw, tw, ss, ts, OFFICIAL_T, code_exact=True)
    # the strong view reaches the loss only through kd, and only at T = 4, 3, 5
    ss2 = ss + torch.randn(ss.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    out2 = mlkd_loss(sw, tw, ss2, ts, OFFICIAL_T, code_exact=True)
    assert torch.equal(out["cc"], out2["cc"]) and torch.equal(out["bc"], out2["bc"])
    assert not torch.equal(out["kd"], out2["kd"])
    # the mask is the kept fraction times the batch mean (here 5 of 10 samples: 0.5)
    assert int(confidence_mask(tw).sum()) == 5
    per = [F.kl_div(F.log_softmax(sw / t, 1), F.softmax(tw / t, 1), reduction="none").sum(1)
           * t * t for t in OFFICIAL_T]
    weak = 0.5 * sum(p.mean() for p in per)
    strong = (sum(F.kl_div(F.log_softmax(ss / t, 1), F.softmax(ts / t, 1),
                           reduction="none").sum(1).mean() * t * t for t in OFFICIAL_T[:3])
              + per[3].mean() + per[4].mean())
    close(out["kd"], weak + strong, rtol=1e-12)


def test_code_exact_needs_five_temperatures() -> None:
    sw, tw, ss, ts = logits(4, 3.0, seed=0)
    with pytest.raises(MethodError, match="5 temperatures"):
        mlkd_loss(sw, tw, ss, ts, [4.0, 3.0], code_exact=True)
    with pytest.raises(MethodError, match="at least one"):
        mlkd_loss(sw, tw, ss, ts, [])
    with pytest.raises(MethodError, match="temperature must be > 0"):
        mlkd_loss(sw, tw, ss, ts, [4.0, 0.0])
    with pytest.raises(MethodError, match="strong view"):
        mlkd_loss(sw, tw, ss[:2], ts[:2], [4.0])


# ----------------------------------------------------------------------------- paper default
def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def derived_default(sw, tw, ss, ts, temps) -> dict[str, float]:
    """The default variant from its definition, in float64 NumPy with explicit loops:
    per-sample (per-class) masks of the weak view, every level on the strong view too."""
    sw, tw, ss, ts = (t.detach().double().numpy() for t in (sw, tw, ss, ts))
    b, c = sw.shape
    conf = np_softmax(tw).max(axis=1)
    m = (conf <= np.percentile(conf, 50)).astype(np.float64)
    cconf = np_softmax(tw).sum(axis=0)
    cm = (cconf <= np.percentile(cconf, 50)).astype(np.float64)

    def kl_rows(zs, zt, t):
        ps, pt = np_softmax(zs / t), np_softmax(zt / t)
        return np.array([t * t * sum(pt[i, k] * (np.log(pt[i, k]) - np.log(ps[i, k]))
                                     for k in range(c) if pt[i, k] > 0) for i in range(b)])

    def gram_cls(p):
        return sum(np.outer(p[i], p[i]) for i in range(b))  # sum_i p_i p_i^T = P^T P

    def gram_bat(p):
        return np.array([[p[i] @ p[j] for j in range(b)] for i in range(b)])

    kd = cc = bc = 0.0
    for t in temps:
        kd += (m * kl_rows(sw, tw, t)).sum() / b + kl_rows(ss, ts, t).sum() / b
        for (zs, zt, wc, wb) in ((sw, tw, cm, m), (ss, ts, np.ones(c), np.ones(b))):
            ps, pt = np_softmax(zs / t), np_softmax(zt / t)
            dc, db = gram_cls(pt) - gram_cls(ps), gram_bat(pt) - gram_bat(ps)
            cc += sum(wc[k] * dc[j, k] ** 2 for j in range(c) for k in range(c)) / c
            bc += sum(wb[j] * db[i, j] ** 2 for i in range(b) for j in range(b)) / b
    return {"kd": kd, "cc": cc, "bc": bc}


@pytest.mark.parametrize("std", [3.0, 30.0])
def test_default_equals_an_independent_derivation(std: float) -> None:
    sw, tw, ss, ts = logits(9, std, seed=3, dtype=torch.float64, c=12)
    temps = [4.0, 3.0, 5.0, 2.0, 6.0]
    mine = mlkd_loss(sw, tw, ss, ts, temps)
    ref = derived_default(sw, tw, ss, ts, temps)
    for key in ref:
        assert float(mine[key]) == pytest.approx(ref[key], rel=1e-10), key


def test_default_gradients_pass_gradcheck() -> None:
    sw, tw, ss, ts = logits(5, 2.0, seed=4, dtype=torch.float64, c=4)

    def total(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = mlkd_loss(a, tw, b, ts, [4.0, 2.0], logit_standardization=False)
        return out["kd"] + out["cc"] + out["bc"]

    assert torch.autograd.gradcheck(total, (sw.requires_grad_(True), ss.requires_grad_(True)))


def test_default_masks_per_sample_where_code_exact_scales() -> None:
    """Where the masked-out samples hold all the divergence, the default ignores it and
    code_exact still counts half of it (the official quirk 1)."""
    b = 8
    tw = torch.zeros(b, 4, dtype=torch.float64)
    tw[:4, 0] = 10.0  # confident teacher rows 0-3 (masked out), flat rows 4-7 (kept)
    sw = tw.clone()
    sw[:4] = torch.tensor([0.0, 10.0, 0.0, 0.0], dtype=torch.float64)  # student disagrees there
    assert confidence_mask(tw).tolist() == [False] * 4 + [True] * 4
    t = [4.0]
    default = mlkd_loss(sw, tw, tw, tw, t)
    exact = mlkd_loss(sw, tw, tw, tw, [4.0, 4.0, 4.0, 4.0, 4.0], code_exact=True)
    assert float(default["kd"]) == 0.0
    assert float(exact["kd"]) > 0.0


def test_masks_follow_numpy_percentile() -> None:
    for b in (1, 2, 7, 64):
        _, tw, _, _ = logits(b, 3.0, seed=b)
        conf = F.softmax(tw, 1).amax(1)
        want = conf.numpy() <= np.percentile(conf.numpy(), 50)
        assert confidence_mask(tw).numpy().tolist() == want.tolist()
        cconf = F.softmax(tw, 1).sum(0)
        want_c = cconf.numpy() <= np.percentile(cconf.numpy(), 50)
        assert class_confidence_mask(tw).numpy().tolist() == want_c.tolist()


# ----------------------------------------------------------------------------- batch size
@pytest.mark.parametrize("code_exact", [False, True])
def test_how_each_level_scales_with_a_repeated_batch(code_exact: bool) -> None:
    """Repeating the batch (B -> 2B, the same samples twice) keeps the masks and the
    instance-level term (a batch mean), multiplies the class level by 4 (``P^T P`` doubles) and
    the batch level by 2 (four equal blocks, divided by 2B): MLKD's class and batch terms are not
    batch-size invariant."""
    sw, tw, ss, ts = logits(10, 3.0, seed=11, dtype=torch.float64, c=20)
    one = mlkd_loss(sw, tw, ss, ts, OFFICIAL_T, code_exact=code_exact)
    two = mlkd_loss(*(torch.cat([t, t]) for t in (sw, tw, ss, ts)), OFFICIAL_T,
                    code_exact=code_exact)
    torch.testing.assert_close(two["kd"], one["kd"], rtol=1e-12, atol=0)
    torch.testing.assert_close(two["cc"], 4 * one["cc"], rtol=1e-12, atol=0)
    torch.testing.assert_close(two["bc"], 2 * one["bc"], rtol=1e-12, atol=0)


def test_every_term_ignores_the_order_of_the_samples() -> None:
    sw, tw, ss, ts = logits(12, 3.0, seed=12, dtype=torch.float64)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    for exact in (False, True):
        a = mlkd_loss(sw, tw, ss, ts, OFFICIAL_T, code_exact=exact)
        b = mlkd_loss(sw[perm], tw[perm], ss[perm], ts[perm], OFFICIAL_T, code_exact=exact)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0)


def test_half_precision_inputs_are_computed_in_float32() -> None:
    sw, tw, ss, ts = logits(16, 3.0, seed=13)
    out = mlkd_loss(*(t.bfloat16() for t in (sw, tw, ss, ts)))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    huge = mlkd_loss(*(t * 1e3 for t in (sw, tw, ss, ts)))
    assert all(torch.isfinite(v) for v in huge.values())
