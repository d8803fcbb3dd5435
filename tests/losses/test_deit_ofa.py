"""DeiT's distillation term and the OFA-KD loss against test-side transcriptions of the official
operations (written here, not imported):

* DeiT: facebookresearch/deit ``losses.py``, ``DistillationLoss.forward``: ``soft`` is
  ``kl_div(log_softmax(z_d / T), log_softmax(z_t / T), reduction="sum", log_target=True)``
  times ``T * T`` divided by ``z_d.numel()``; ``hard`` is ``cross_entropy(z_d, z_t.argmax(1))``;
* OFA: Hao840/OFAKD ``distillers/ofa.py``, ``ofa_loss`` with the mask ``F.one_hot(label, K)``
  built as ``OFA.forward`` does: ``prod = (softmax(z_t / T) + mask) ** eps``,
  ``sum(-(prod - mask) * log(softmax(z_s / T)), -1).mean()``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdlab.core.errors import MethodError
from kdlab.losses import deit_loss, kd_loss, ofa_loss


# ----------------------------------------------------------------------------- references
def ref_deit(outputs_kd: torch.Tensor, teacher_outputs: torch.Tensor, kind: str,
             tau: float) -> torch.Tensor:
    if kind == "soft":
        t = tau
        return F.kl_div(F.log_softmax(outputs_kd / t, dim=1),
                        F.log_softmax(teacher_outputs / t, dim=1),
                        reduction="sum", log_target=True) * (t * t) / outputs_kd.numel()
    return F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))


def ref_ofa(logits_student: torch.Tensor, logits_teacher: torch.Tensor, label: torch.Tensor,
            eps: float, temperature: float = 1.0) -> torch.Tensor:
    target_mask = F.one_hot(label, logits_student.size(-1))
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    loss = torch.sum(-(prod - target_mask) * torch.log(pred_student), dim=-1)
    return loss.mean()


# ----------------------------------------------------------------------------- helpers
def logits(std: float, seed: int, b: int, k: int,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zs = (torch.randn(b, k, generator=g) * std).to(dtype)
    zt = (torch.randn(b, k, generator=g) * std + torch.randn(b, k, generator=g)).to(dtype)
    y = torch.randint(0, k, (b,), generator=g)
    return zs, zt, y


def value_and_grad(fn, zs: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    zs = zs.clone().requires_grad_(True)
    out = fn(zs, zt)
    (grad,) = torch.autograd.grad(out, zs)
    return out.detach(), grad


def in_float64(fn, zs: torch.Tensor, zt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's value and gradient computed in float64, returned in ``zs``'s dtype."""
    v, g = value_and_grad(fn, zs.double(), zt.double())
    return v.to(zs.dtype), g.to(zs.dtype)


def assert_equal_rel(ours: tuple[torch.Tensor, torch.Tensor],
                     ref: tuple[torch.Tensor, torch.Tensor], rtol: float,
                     grad_floor: float = 0.0) -> None:
    """Values to ``rtol`` relative (or ``rtol`` absolute near 0), gradients to ``rtol`` relative
    to the largest entry, or to ``grad_floor`` absolute if that is larger."""
    assert ours[0].dtype == ref[0].dtype and ours[1].dtype == ref[1].dtype
    torch.testing.assert_close(ours[0], ref[0], rtol=rtol, atol=rtol)
    scale = ref[1].abs().max().item()
    torch.testing.assert_close(ours[1], ref[1], rtol=rtol,
                               atol=max(rtol * scale, grad_floor, 1e-30))


SHAPES = [(1, 2), (2, 3), (8, 10), (16, 100), (32, 1000)]
DTYPES = [(torch.float64, 1e-12), (torch.float32, 1e-5)]


# ----------------------------------------------------------------------------- DeiT
@pytest.mark.parametrize(("b", "k"), SHAPES)
@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("tau", [1.0, 3.0])
@pytest.mark.parametrize("kind", ["soft", "hard"])
@pytest.mark.parametrize(("dtype", "rtol"), DTYPES)
def test_deit_equals_official(b: int, k: int, std: float, tau: float, kind: str,
                              dtype: torch.dtype, rtol: float) -> None:
    zs, zt, _ = logits(std, b * k, b, k, dtype)
    ours = value_and_grad(lambda a, t: deit_loss(a, t, kind, tau), zs, zt)
    ref = value_and_grad(lambda a, t: ref_deit(a, t, kind, tau), zs, zt)
    assert ours[0].dtype == dtype
    assert_equal_rel(ours, ref, rtol)


def test_deit_soft_golden_value_is_normalised_by_numel() -> None:
    """By hand, 2 x 3: student uniform; teacher row 1 softmax = [1/4, 1/4, 1/2], row 2 uniform.
    KL row 1 = 2 * 1/4 log(3/4) + 1/2 log(3/2) = log(9/8) / 2, row 2 = 0; the sum over the batch
    divided by numel = 6 gives log(9/8) / 12 at tau 1 (batchmean would give log(9/8) / 4), and
    tau^2 = 4 times that at tau = 2 with the teacher's logits doubled (same softmax)."""
    zs = torch.zeros(2, 3, dtype=torch.float64)
    zt = torch.log(torch.tensor([[1.0, 1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
    expected = math.log(9 / 8) / 12
    assert deit_loss(zs, zt, "soft", 1.0).item() == pytest.approx(expected, rel=1e-12)
    assert deit_loss(zs, 2 * zt, "soft", 2.0).item() == pytest.approx(4 * expected, rel=1e-12)
    # numel, not the batch size: kd_loss (batchmean, T^2) is K times larger
    zs, zt, _ = logits(3.0, 1, 8, 10, torch.float64)
    torch.testing.assert_close(deit_loss(zs, zt, "soft", 3.0) * 10, kd_loss(zs, zt, 3.0),
                               rtol=1e-12, atol=0.0)


def test_deit_hard_golden_value_and_equals_ce_with_teacher_argmax() -> None:
    """By hand: student softmax [1/4, 1/2, 1/4] in both rows, teacher top-1 classes 1 and 0:
    CE = (log 2 + log 4) / 2 = 1.5 log 2; tau does not matter."""
    zs = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]], dtype=torch.float64))
    zt = torch.tensor([[0.0, 5.0, 1.0], [7.0, -1.0, 2.0]], dtype=torch.float64)
    for tau in (1.0, 3.0):
        assert deit_loss(zs, zt, "hard", tau).item() == pytest.approx(1.5 * math.log(2),
                                                                        rel=1e-12)
    zs, zt, _ = logits(3.0, 2, 16, 100)
    torch.testing.assert_close(deit_loss(zs, zt, "hard", 1.0),
                               F.cross_entropy(zs, zt.argmax(dim=1)), rtol=0.0, atol=0.0)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_deit_teacher_detached_and_autocast_bf16_gives_float32(kind: str) -> None:
    zs, zt, _ = logits(3.0, 3, 8, 10)
    zt.requires_grad_(True)
    zs.requires_grad_(True)
    deit_loss(zs, zt, kind, 3.0).backward()
    assert zt.grad is None and zs.grad is not None and torch.isfinite(zs.grad).all()
    bs, bt = zs.detach().bfloat16(), zt.detach().bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = deit_loss(bs, bt, kind, 3.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref_deit(bs.float(), bt.float(), kind, 3.0),
                               rtol=1e-6, atol=1e-7)


def test_deit_unknown_kind_and_bad_tau_are_one_line_errors() -> None:
    zs, zt, _ = logits(3.0, 4, 4, 5)
    for kind in ("none", "SOFT", "kl"):
        with pytest.raises(MethodError, match="DeiT distillation kind must be 'soft' or 'hard'")\
                as info:
            deit_loss(zs, zt, kind, 1.0)  # type: ignore[arg-type]
        assert "\n" not in str(info.value)
    with pytest.raises(MethodError, match="temperature must be > 0"):
        deit_loss(zs, zt, "soft", 0.0)
    with pytest.raises(MethodError, match="same shape"):
        deit_loss(zs, zt[:, :3], "hard", 1.0)


# ----------------------------------------------------------------------------- OFA
@pytest.mark.parametrize(("b", "k"), SHAPES)
@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("eps", [1.0, 1.5])
@pytest.mark.parametrize(("dtype", "rtol"), DTYPES)
def test_ofa_equals_official(b: int, k: int, std: float, temperature: float, eps: float,
                             dtype: torch.dtype, rtol: float) -> None:
    """Against the official operations in float64 (in float32 the official ``log(softmax)`` is
    ``-inf`` for student logits ~100 below the row's maximum, which std-30 logits reach), and,
    for std 3 in float32, against the official float32 computation as well.

    The gradient ``(sum_c w_c * p_s - w) / (T * B)`` is a difference of O(1) terms: where the
    student and the weights saturate it is far below their size and float32 resolves it only to
    about ``1e-7 / (T * B)`` absolute, hence the floor ``0.1 * rtol / (T * B)``."""
    zs, zt, y = logits(std, 7 * b + k, b, k, dtype)
    ours = value_and_grad(lambda a, t: ofa_loss(a, t, y, eps, temperature), zs, zt)
    assert ours[0].dtype == dtype
    official = lambda a, t: ref_ofa(a, t, y, eps, temperature)  # noqa: E731
    floor = 0.1 * rtol / (temperature * b)
    assert_equal_rel(ours, in_float64(official, zs, zt), rtol, floor)
    if std == 3.0:
        assert_equal_rel(ours, value_and_grad(official, zs, zt), rtol, floor)


def test_ofa_golden_values() -> None:
    """By hand, K = 2: student softmax [3/4, 1/4], teacher softmax [1/4, 3/4], target class 0.
    eps = 2: weights (1 + 1/4)^2 - 1 = 9/16 and (3/4)^2 = 9/16, loss
    -9/16 (log 3/4 + log 1/4) = 9/16 log(16/3); eps = 1: the soft-label cross-entropy
    -(1/4 log 3/4 + 3/4 log 1/4). A temperature T with logits scaled by T gives the same value
    (no T^2 factor). A second row with target 1 averages in: weights (1/4)^2 = 1/16 and
    (7/4)^2 - 1 = 33/16 on the student softmax [1/2, 1/2]: 34/16 log 2."""
    zs = torch.log(torch.tensor([[3.0, 1.0]], dtype=torch.float64))
    zt = torch.log(torch.tensor([[1.0, 3.0]], dtype=torch.float64))
    y = torch.tensor([0])
    eps2 = 9 / 16 * math.log(16 / 3)
    eps1 = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert ofa_loss(zs, zt, y, 2.0).item() == pytest.approx(eps2, rel=1e-12)
    assert ofa_loss(zs, zt, y, 1.0).item() == pytest.approx(eps1, rel=1e-12)
    assert ofa_loss(3 * zs, 3 * zt, y, 2.0, 3.0).item() == pytest.approx(eps2, rel=1e-12)
    zs2 = torch.cat([zs, torch.zeros(1, 2, dtype=torch.float64)])
    zt2 = torch.cat([zt, zt])
    y2 = torch.tensor([0, 1])
    second = 34 / 16 * math.log(2)
    assert ofa_loss(zs2, zt2, y2, 2.0).item() == pytest.approx((eps2 + second) / 2, rel=1e-12)


def test_ofa_with_eps_one_is_soft_label_cross_entropy() -> None:
    """eps = 1: weights are p_t exactly, so L = H(p_t, p_s) = KL(p_t || p_s) + H(p_t), i.e. KD at
    T = 1 plus the teacher's entropy (not 0 for a student equal to the teacher)."""
    zs, zt, y = logits(3.0, 21, 16, 100, torch.float64)
    pt = F.softmax(zt, dim=1)
    entropy = -(pt * F.log_softmax(zt, dim=1)).sum(1).mean()
    torch.testing.assert_close(ofa_loss(zs, zt, y, 1.0), kd_loss(zs, zt, 1.0) + entropy,
                               rtol=1e-12, atol=0.0)
    torch.testing.assert_close(ofa_loss(zt, zt, y, 1.0), entropy, rtol=1e-12, atol=0.0)


def test_ofa_finite_where_official_float32_log_softmax_underflows() -> None:
    """A student probability ~exp(-120) is 0 in float32: the official ``log(softmax)`` gives
    -inf there and the loss is inf (the teacher weight on that class is > 0); kdlab's
    ``log_softmax`` is finite and equals the official operations in float64."""
    zs = torch.tensor([[120.0, 0.0, 1.0], [0.0, 2.0, -1.0]])
    zt = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.5]])
    y = torch.tensor([1, 1])
    assert torch.isinf(ref_ofa(zs, zt, y, 1.5))
    ours = value_and_grad(lambda a, t: ofa_loss(a, t, y, 1.5), zs, zt)
    assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]).all()
    assert_equal_rel(ours, in_float64(lambda a, t: ref_ofa(a, t, y, 1.5), zs, zt), 1e-6)


def test_ofa_teacher_detached_and_autocast_bf16_gives_float32() -> None:
    zs, zt, y = logits(3.0, 22, 8, 10)
    zt.requires_grad_(True)
    zs.requires_grad_(True)
    ofa_loss(zs, zt, y, 1.5, 3.0).backward()
    assert zt.grad is None and zs.grad is not None and torch.isfinite(zs.grad).all()
    bs, bt = zs.detach().bfloat16(), zt.detach().bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ofa_loss(bs, bt, y, 1.5, 3.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out, ref_ofa(bs.float(), bt.float(), y, 1.5, 3.0),
                               rtol=1e-5, atol=1e-6)


def test_ofa_errors_are_one_line() -> None:
    zs, zt, y = logits(3.0, 23, 4, 5)
    for eps in (0.0, -1.0):
        with pytest.raises(MethodError, match=r"OFA eps .* must be > 0") as info:
            ofa_loss(zs, zt, y, eps)
        assert "\n" not in str(info.value)
    with pytest.raises(MethodError, match="temperature must be > 0"):
        ofa_loss(zs, zt, y, 1.0, -1.0)
    with pytest.raises(MethodError, match="target must be a vector of 4 class indices"):
        ofa_loss(zs, zt, F.one_hot(y, 5), 1.0)
    with pytest.raises(MethodError, match="same shape"):
        ofa_loss(zs, zt[:, :3], y, 1.0)
