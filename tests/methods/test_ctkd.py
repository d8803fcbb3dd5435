"""CTKD's learned global temperature (Li et al., AAAI 2023) on the logit methods.

The official operations are re-implemented here, step by step after zhengli97/CTKD @ 7d52522
(``models/temp_global.py``: ``Global_T`` and its GRL; ``helper/loops.py`` L132-137: ``T =
t_start + t_end * sigmoid(theta)``; ``distiller_zoo/KD.py``: ``DistillKL``; ``distiller_zoo/
DKD.py``; ``train_student.py``: ``CosineDecay``) and the LS fork's ``DistillKL_logit_stand``
(sunshangquan/logit-standardization-KD, ``CTKD/distiller_zoo/KD.py``), never calling kdlab.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

import kdlab.methods.logit  # noqa: F401  (registers the methods)
import kdlab.methods.sdd  # noqa: F401
from kdlab.config import MethodConfig
from kdlab.core.errors import MethodError
from kdlab.engine.build import trainable_parameters
from kdlab.losses.logit import dkd_loss, kd_loss, nkd_loss
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.compose import build_method
from kdlab.methods.ctkd import (
    CurriculumTemperature,
    CurriculumTemperatureParams,
    curriculum_lambda,
    gradient_reversal,
)
from kdlab.methods.registry import get_method
from kdlab.models import create_model
from kdlab.models.output import ModelOutput
from support import TinyNet, run_distill

K = 10
B = 8


# ----------------------------------------------------------------------- official operations
class OffGRL(torch.autograd.Function):
    """``GradientReversalFunction`` of models/temp_global.py."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grads: Tensor) -> tuple[Tensor, None]:
        lambda_ = grads.new_tensor(ctx.lambda_)
        return lambda_ * grads, None


class OffGlobalT(nn.Module):
    """``Global_T``: one parameter initialised to 1, returned through the GRL."""

    def __init__(self) -> None:
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1), requires_grad=True)

    def forward(self, lambda_: float) -> Tensor:
        return OffGRL.apply(self.global_T, lambda_)


class OffCosineDecay:
    """``CosineDecay`` of train_student.py."""

    def __init__(self, max_value: float, min_value: float, num_loops: float) -> None:
        self._max_value, self._min_value, self._num_loops = max_value, min_value, num_loops

    def get_value(self, i: int) -> float:
        if i < 0:
            i = 0
        if i >= self._num_loops:
            i = self._num_loops
        value = (math.cos(i * math.pi / self._num_loops) + 1.0) * 0.5
        return value * (self._max_value - self._min_value) + self._min_value


def off_normalize(logit: Tensor) -> Tensor:
    mean = logit.mean(dim=-1, keepdims=True)
    stdv = logit.std(dim=-1, keepdims=True)
    return (logit - mean) / (1e-7 + stdv)


def off_distill_kl(y_s: Tensor, y_t: Tensor, T: Tensor, logit_stand: bool = False) -> Tensor:
    """``DistillKL`` (and the LS fork's ``DistillKL_logit_stand``)."""
    if logit_stand:
        y_s, y_t = off_normalize(y_s), off_normalize(y_t)
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(y_s / T, dim=1),
                                               F.softmax(y_t / T, dim=1)) * T * T


def kl_div_sum_torch111(inp: Tensor, target: Tensor) -> Tensor:
    """``F.kl_div(inp, target, reduction="sum")`` as PyTorch 1.11 (CTKD's environment)
    differentiates it: the target's gradient is 0 where the target is 0. Since PyTorch 1.13
    (``xlogy``'s backward, pytorch/pytorch#82713, #89558) it is NaN there, which DKD's non-target
    term always meets (the target class's probability after ``- 1000`` underflows to 0) once the
    temperature is learned."""
    pos = target > 0
    safe = torch.where(pos, target, torch.ones_like(target))
    return torch.where(pos, target * (safe.log() - inp), torch.zeros_like(target)).sum()


def off_dkd(ls: Tensor, lt: Tensor, target: Tensor, alpha: float, beta: float,
            temperature: Tensor) -> Tensor:
    """``DKDloss`` of distiller_zoo/DKD.py (``kl_div(reduction="sum")`` with PyTorch 1.11's
    gradient, :func:`kl_div_sum_torch111`)."""
    gt_mask = torch.zeros_like(ls).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(ls).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t: Tensor) -> Tensor:
        return torch.cat([(t * gt_mask).sum(1, keepdims=True),
                          (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(ls / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(lt / temperature, dim=1))
    tckd = (kl_div_sum_torch111(torch.log(pred_student), pred_teacher)
            * (temperature**2) / target.shape[0])
    pred_teacher_part2 = F.softmax(lt / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(ls / temperature - 1000.0 * gt_mask, dim=1)
    nckd = (kl_div_sum_torch111(log_pred_student_part2, pred_teacher_part2)
            * (temperature**2) / target.shape[0])
    return alpha * tckd + beta * nckd


def off_temperature(mlp: OffGlobalT, epoch: int) -> Tensor:
    """One step's temperature: loops.py with the script's curriculum (0 -> -1 over 10)."""
    lam = OffCosineDecay(0, -1, 10).get_value(epoch)
    return 1 + 20 * torch.sigmoid(mlp(lam))


# ----------------------------------------------------------------------------------- helpers

def _ctx() -> DistillContext:
    return DistillContext.from_models(TinyNet(6, 4, 0, K), TinyNet(8, 4, 1, K), num_classes=K,
                                      train_labels=torch.randint(0, K, (20,)), input_size=16)


def _build(name: str, ctx: DistillContext, **params: Any):
    cls = get_method(name)
    return cls(cls.Params.model_validate(params), ctx)


def _data(seed: int, scale: float = 3.0) -> tuple[Tensor, Tensor, Batch]:
    g = torch.Generator().manual_seed(seed)
    zs = (scale * torch.randn(B, K, generator=g, dtype=torch.float64)).requires_grad_()
    zt = scale * torch.randn(B, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=g)
    return zs, zt, Batch(images=torch.zeros(B, 3, 16, 16), labels=y, index=torch.arange(B))


def _out(logits: Tensor) -> ModelOutput:
    return ModelOutput(logits=logits, feature_map=torch.zeros(logits.shape[0], 1, 1, 1))


def _close(a: Tensor, b: Tensor) -> None:
    """1e-5 relative, in float64; the official 1-element tensors compare with 0-dim ones."""
    if a.numel() == 1:
        a, b = a.reshape(()), b.reshape(())
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-8)


# -------------------------------------------------------------------------- the curriculum
def test_curriculum_lambda_equals_official_cosine_decay() -> None:
    off = OffCosineDecay(0, -1, 10)
    for epoch in [0, 1, 2, 3, 5, 7, 9, 10, 11, 150, 240]:
        assert curriculum_lambda(epoch, 0.0, -1.0, 10) == off.get_value(epoch)
    # values: 0 before training, -1 from epoch 10 on, half way at 5, a slow start
    assert curriculum_lambda(0, 0.0, -1.0, 10) == 0.0
    assert curriculum_lambda(10, 0.0, -1.0, 10) == -1.0
    assert curriculum_lambda(240, 0.0, -1.0, 10) == -1.0
    assert curriculum_lambda(5, 0.0, -1.0, 10) == pytest.approx(-0.5, abs=1e-15)
    assert curriculum_lambda(1, 0.0, -1.0, 10) == pytest.approx(
        (math.cos(math.pi / 10) + 1) / 2 - 1)
    assert curriculum_lambda(1, 0.0, -1.0, 10) == pytest.approx(-0.0244717418524, abs=1e-12)
    # other ranges (an ablation): min and max swapped, another length
    off2 = OffCosineDecay(1.0, 0.0, 4)
    for epoch in range(7):
        assert curriculum_lambda(epoch, 1.0, 0.0, 4) == off2.get_value(epoch)


def test_gradient_reversal_sign_and_identity() -> None:
    x = torch.tensor(0.7, requires_grad=True)
    y = gradient_reversal(x, -0.5)
    assert torch.equal(y, x.detach())
    (3.0 * y).backward()
    assert x.grad is not None and x.grad.item() == pytest.approx(-1.5)
    x.grad = None
    (3.0 * gradient_reversal(x, 0.0)).backward()
    assert x.grad.item() == 0.0


def test_module_initial_temperature_and_metrics() -> None:
    module = CurriculumTemperature(CurriculumTemperatureParams())
    assert [name for name, _ in module.named_parameters()] == ["theta"]
    assert module.theta.dim() == 0 and module.theta.item() == 1.0
    t0 = 1 + 20 / (1 + math.exp(-1.0))  # 15.62
    assert module.current() == pytest.approx(t0, rel=1e-6)
    assert module.epoch_metrics() == {"temperature": pytest.approx(t0, rel=1e-6)}
    temp = module(3)
    assert temp.dim() == 0 and temp.item() == pytest.approx(t0, rel=1e-6)
    assert module.epoch_metrics()["ctkd_lambda"] == curriculum_lambda(3, 0.0, -1.0, 10)


def test_params_validation() -> None:
    with pytest.raises(ValidationError):
        CurriculumTemperatureParams(t_start=0.0)
    with pytest.raises(ValidationError):
        CurriculumTemperatureParams(lambda_epochs=0)
    with pytest.raises(ValidationError):
        get_method("kd").Params.model_validate({"learned_temperature": {"t_begin": 1}})


# ------------------------------------------------------------------ one step vs the official
@pytest.mark.parametrize("epoch", [1, 4, 12])
@pytest.mark.parametrize("logit_stand", [False, True])
def test_kd_ctkd_step_equals_official(epoch: int, logit_stand: bool) -> None:
    """KD + CTKD (``-r 0.1 -a 0.9``; the LS fork's CTKD + LS: ``-r 0.1 -a 9``): value, student
    gradient and theta gradient.

    theta is float64 on both sides: dL/dT is a small difference of large terms, so at float32 two
    correct implementations differ by up to ~1e-3 relative in it."""
    zs, zt, batch = _data(seed=epoch)
    kd_w = 9.0 if logit_stand else 0.9
    kd = _build("kd", _ctx(), kd_weight=kd_w, ce_weight=0.1, learned_temperature={},
                logit_standardization=logit_stand)
    kd.double()  # theta in float64 here, so that dL/dtheta compares at 1e-5 (see below)
    terms = kd(_out(zs), _out(zt), batch, epoch=epoch)
    ours = terms["ce"] + terms["kd"]
    theta = kd.learned_temperature.theta
    g_s, g_theta = torch.autograd.grad(ours, [zs, theta])

    mlp = OffGlobalT().double()
    temp = off_temperature(mlp, epoch)
    ref = 0.1 * F.cross_entropy(zs, batch.labels) + kd_w * off_distill_kl(zs, zt, temp,
                                                                           logit_stand)
    r_s, r_theta = torch.autograd.grad(ref.sum(), [zs, mlp.global_T])
    _close(ours, ref)
    _close(g_s, r_s)
    _close(g_theta, r_theta)
    assert g_theta.item() != 0.0  # the gradient reaches theta (lambda != 0 from epoch 1)


@pytest.mark.parametrize("epoch", [2, 10])
def test_dkd_ctkd_step_equals_official(epoch: int) -> None:
    """DKD + CTKD as the official script runs it: ``-r 1 -a 0 -b 1 --dkd_alpha 1 --dkd_beta 2``,
    the learned T passed to DKD, no warm-up (CTKD's loop has none)."""
    zs, zt, batch = _data(seed=20 + epoch)
    dkd = _build("dkd", _ctx(), alpha=1.0, beta=2.0, ce_weight=1.0, warmup_epochs=0,
                 learned_temperature={})
    dkd.double()
    terms = dkd(_out(zs), _out(zt), batch, epoch=epoch)
    ours = terms["ce"] + terms["dkd"]
    theta = dkd.learned_temperature.theta
    g_s, g_theta = torch.autograd.grad(ours, [zs, theta])

    mlp = OffGlobalT().double()
    temp = off_temperature(mlp, epoch)
    ref = (1.0 * F.cross_entropy(zs, batch.labels) + 0.0 * off_distill_kl(zs, zt, temp)
           + 1.0 * off_dkd(zs, zt, batch.labels, 1.0, 2.0, temp))
    r_s, r_theta = torch.autograd.grad(ref.sum(), [zs, mlp.global_T])
    _close(ours, ref)
    _close(g_s, r_s)
    _close(g_theta, r_theta)


def test_tensor_temperature_gradient_flows_through_both_factors() -> None:
    """dL/dT of ``kd_loss`` with a tensor T is the total derivative (through z/T and T^2): it
    equals the central finite difference of the float-temperature loss."""
    zs, zt, batch = _data(seed=30)
    for loss in (lambda t: kd_loss(zs, zt, t),
                 lambda t: dkd_loss(zs, zt, batch.labels, 1.0, 8.0, t),
                 lambda t: nkd_loss(zs, zt, batch.labels, t, 1.5)):
        t = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(loss(t), t)
        h = 1e-6
        fd = (loss(3.0 + h) - loss(3.0 - h)) / (2 * h)
        torch.testing.assert_close(g, fd.detach(), rtol=1e-6, atol=1e-9)
        # and the tensor path gives the float path's value
        torch.testing.assert_close(loss(torch.tensor(3.0, dtype=torch.float64)), loss(3.0))


def test_tensor_temperature_must_be_0_dim() -> None:
    zs, zt, _ = _data(seed=31)
    with pytest.raises(MethodError, match="0-dim"):
        kd_loss(zs, zt, torch.tensor([2.0]))
    with pytest.raises(MethodError, match="> 0"):
        kd_loss(zs, zt, 0.0)


# ----------------------------------------------------------------- composition and training
@pytest.mark.parametrize(("sdd", "base", "extra"), [
    ("sd_kd", "kd", {}),
    ("sd_dkd", "dkd", {"warmup_epochs": 0}),
    ("sd_nkd", "nkd", {"warmup_epochs": 0}),
])
def test_sdd_ctkd_with_scale_1_is_the_base_method_with_ctkd(sdd: str, base: str,
                                                            extra: dict) -> None:
    ctx = _ctx()
    g = torch.Generator().manual_seed(5)
    images = torch.randn(B, 3, 16, 16, generator=g)
    batch = Batch(images=images, labels=torch.randint(0, K, (B,), generator=g),
                  index=torch.arange(B))
    out_s = ctx.student(images)
    with torch.no_grad():
        out_t = ctx.teacher(images)
    a = _build(sdd, ctx, scales=[1], learned_temperature={}, **extra)
    b = _build(base, ctx, learned_temperature={}, **extra)
    la, lb = a(out_s, out_t, batch, epoch=6)["sdd"], b(out_s, out_t, batch, epoch=6)[base]
    _close(la, lb)
    ga = torch.autograd.grad(la, a.learned_temperature.theta)[0]
    gb = torch.autograd.grad(lb, b.learned_temperature.theta)[0]
    _close(ga, gb)
    assert ga.item() != 0.0


def test_temperature_ascends_the_loss_after_a_step() -> None:
    """With lambda < 0 an SGD step on theta (the student held fixed) INCREASES the KD loss:
    the temperature is adversarial; with the GRL's sign flipped it would decrease it."""
    zs, zt, batch = _data(seed=40)
    zs = zs.detach()
    for lambda_min, sign in ((-1.0, 1), (1.0, -1)):
        kd = _build("kd", _ctx(), learned_temperature={"lambda_min": lambda_min,
                                                       "init": -2.0})
        opt = torch.optim.SGD(kd.parameters(), lr=0.5)
        before = kd(_out(zs), _out(zt), batch, epoch=20)["kd"]
        opt.zero_grad()
        before.backward()
        opt.step()
        after = kd(_out(zs), _out(zt), batch, epoch=20)["kd"]
        assert sign * (after.item() - before.item()) > 0


def test_composite_owns_theta_trains_and_reports_it() -> None:
    ctx = _ctx()
    composite = build_method(MethodConfig(name="dkd", params={"learned_temperature": {}}), ctx)
    names = [n for n, _ in composite.named_parameters()]
    assert names == ["logit.learned_temperature.theta"]
    assert "logit.learned_temperature.theta" in composite.state_dict()
    params = trainable_parameters(ctx.student, composite)
    assert any(p is composite.logit.learned_temperature.theta for p in params)
    assert composite.epoch_metrics() == {"temperature": pytest.approx(15.621172, rel=1e-6)}
    plain = build_method(MethodConfig(name="dkd"), ctx)
    assert list(plain.parameters()) == [] and plain.epoch_metrics() == {}


@pytest.mark.e2e
def test_distill_records_the_temperature_and_checkpoints_theta(tmp_path: Path) -> None:
    """``kdlab distill`` (2 epochs, synthetic data): ``temperature`` and ``ctkd_lambda`` in every
    epoch record, theta trained (weight decay included) and in the checkpoint."""
    torch.manual_seed(0)
    teacher_ckpt = tmp_path / "t.pth"
    torch.save({"model": create_model("resnet8", num_classes=10).state_dict()}, teacher_ckpt)
    cfg = {
        "name": "ctkd_e2e",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 16, "n_test": 16, "num_classes": 10}},
        "student": {"arch": "resnet8"},
        "teacher": {"arch": "resnet8", "checkpoint": str(teacher_ckpt)},
        "method": {"name": "kd", "params": {"learned_temperature": {}}},
        "optim": {"epochs": 2, "milestones": [], "lr": 0.05},
        "runtime": {"threads": 2, "amp": "off"},
    }
    run_dir = run_distill(tmp_path, cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["ctkd_lambda"] for r in records] == [curriculum_lambda(e, 0.0, -1.0, 10)
                                                   for e in (1, 2)]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    theta = ckpt["distiller"]["logit.learned_temperature.theta"]
    assert theta.dim() == 0 and theta.item() != 1.0
    assert records[-1]["temperature"] == pytest.approx(1 + 20 * torch.sigmoid(theta).item(),
                                                       rel=1e-6)


def test_dckd_teacher_rule_with_ctkd_is_dkd_with_ctkd() -> None:
    """DCKD takes the learned temperature too (``target_rule: teacher`` is DKD bit for bit)."""
    zs, zt, batch = _data(seed=50)
    ctx = _ctx()
    a = _build("dckd", ctx, target_rule="teacher", learned_temperature={}, warmup_epochs=0)
    b = _build("dkd", ctx, learned_temperature={}, warmup_epochs=0)
    la = a(_out(zs), _out(zt), batch, epoch=3)["dckd"]
    lb = b(_out(zs), _out(zt), batch, epoch=3)["dkd"]
    assert torch.equal(la, lb)
    ga = torch.autograd.grad(la, [zs, a.learned_temperature.theta])
    gb = torch.autograd.grad(lb, [zs, b.learned_temperature.theta])
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
