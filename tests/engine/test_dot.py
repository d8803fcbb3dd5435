"""DOT (``optim.name: dot``) against a test-side re-implementation of the official update.

``RefDOT`` below follows megvii-research/mdistiller ``mdistiller/engine/dot.py`` operation by
operation, driven as ``class DOT`` in ``mdistiller/engine/trainer.py`` drives it:
``zero_grad(set_to_none=True); loss_kd.backward(retain_graph=True); step_kd();
zero_grad(set_to_none=True); loss_ce.backward(); step()``. It is written here, not imported.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import OptimConfig, validate_config
from kdlab.core.errors import ConfigError
from kdlab.engine.dot import DistillationOrientedSGD
from kdlab.engine.optimizers import DOT, build_optimizer, get_optimizer, list_optimizers
from kdlab.methods.base import total_loss

T = 4.0


# ----------------------------------------------------------------------------- the reference
class RefDOT:
    """The official DistillationOrientedTrainer's bookkeeping and its ``dot`` function."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float, momentum_kd: float,
                 weight_decay: float) -> None:
        self.params = params
        self.lr, self.m, self.m_kd, self.wd = lr, momentum, momentum_kd, weight_decay
        self.state: dict[int, dict[str, Tensor | None]] = {id(p): {} for p in params}
        self.kd_grads: list[Tensor] = []
        self.kd_params: list[Tensor] = []
        self.kd_bufs: list[Tensor | None] = []

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step_kd(self) -> None:
        self.kd_params = [p for p in self.params if p.grad is not None]
        self.kd_grads = [p.grad for p in self.kd_params]
        self.kd_bufs = [self.state[id(p)].get("momentum_kd_buffer") for p in self.kd_params]

    @staticmethod
    def _member(t: Tensor, seq: list[Tensor]) -> bool:
        return any(t is s for s in seq)

    @torch.no_grad()
    def step(self) -> None:
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        bufs = [self.state[id(p)].get("momentum_buffer") for p in params]
        avg = (self.m_kd + self.m) / 2.0
        for i, p in enumerate(params):
            d_p = grads[i]
            if self.wd != 0:
                d_p = d_p.add(p, alpha=self.wd)
            if self.m != 0:
                if bufs[i] is None:
                    bufs[i] = torch.clone(d_p).detach()
                elif self._member(p, self.kd_params):
                    bufs[i].mul_(self.m).add_(d_p, alpha=1)
                else:
                    bufs[i].mul_(avg).add_(d_p, alpha=1)
                d_p = bufs[i]
            p.add_(d_p, alpha=-self.lr)
        for i, (d_p, p) in enumerate(zip(self.kd_grads, self.kd_params, strict=True)):
            if self.kd_bufs[i] is None:
                self.kd_bufs[i] = torch.clone(d_p).detach()
            elif self._member(p, params):
                self.kd_bufs[i].mul_(self.m_kd).add_(d_p, alpha=1)
            else:
                if self.wd != 0:
                    d_p = d_p.add(p, alpha=self.wd)
                self.kd_bufs[i].mul_(avg).add_(d_p, alpha=1)
            p.add_(self.kd_bufs[i], alpha=-self.lr)
        for p, b in zip(params, bufs, strict=True):
            self.state[id(p)]["momentum_buffer"] = b
        for p, b in zip(self.kd_params, self.kd_bufs, strict=True):
            self.state[id(p)]["momentum_kd_buffer"] = b
        self.kd_grads, self.kd_params, self.kd_bufs = [], [], []


# ----------------------------------------------------------------------------- a small model
class Net(nn.Module):
    """Parameters of every kind: ``body``/``head`` get both gradients, ``task_bias`` only the
    task gradient (CE only), ``helper`` only the distillation gradient (a CRD-like head),
    ``unused`` none."""

    def __init__(self, helper: bool = True, task_only: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        # the kinds interleave in parameters() order: helper's (kd only) between both-kinds
        self.helper = nn.Linear(8, 3) if helper else None
        self.head = nn.Linear(8, 5)
        self.task_bias = nn.Parameter(torch.randn(5) * 0.1) if task_only else None
        self.unused = nn.Parameter(torch.ones(2))

    def terms(self, x: Tensor, y: Tensor, zt: Tensor, kd_scale: float = 1.0) -> dict[str, Tensor]:
        h = torch.tanh(self.body(x))
        z = self.head(h)
        zc = z + self.task_bias if self.task_bias is not None else z
        kd = T**2 * F.kl_div(F.log_softmax(z / T, 1), F.softmax(zt / T, 1),
                             reduction="batchmean")
        if self.helper is not None:
            kd = kd + 0.5 * self.helper(h).pow(2).mean()
        return {"ce": F.cross_entropy(zc, y), "kd": kd_scale * kd}


def batches(n: int, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 5, (8,), generator=g),
             3 * torch.randn(8, 5, generator=g)) for _ in range(n)]


LRS = [0.1, 0.1, 0.05, 0.05, 0.01, 0.2, 0.1]


def run_reference(model: Net, momentum: float, delta: float, wd: float,
                  data: list[tuple[Tensor, Tensor, Tensor]]) -> RefDOT:
    params = list(model.parameters())
    ref = RefDOT(params, LRS[0], momentum - delta, momentum + delta, wd)
    for i, (x, y, zt) in enumerate(data):
        ref.lr = LRS[i]
        terms = model.terms(x, y, zt)
        ref.zero_grad()
        terms["kd"].backward(retain_graph=True)
        ref.step_kd()
        ref.zero_grad()
        terms["ce"].backward()
        ref.step()
    return ref


def make_dot(model: Net, momentum: float, delta: float, wd: float, **args: object) -> DOT:
    cfg = OptimConfig(name="dot", lr=LRS[0], momentum=momentum, weight_decay=wd,
                      args={"delta": delta, **args})
    optim = build_optimizer(cfg, list(model.parameters()), LRS[0])
    assert isinstance(optim, DOT)
    return optim


def train_step(optim, model: Net, batch: tuple[Tensor, Tensor, Tensor], lr: float,
               scaler: torch.amp.GradScaler | None = None, clip: float | None = None,
               kd_scale: float = 1.0) -> None:
    """What ``Trainer.backward_step`` does around the optimizer's hooks."""
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    for group in optim.optimizer.param_groups:
        group["lr"] = lr
    terms = model.terms(*batch, kd_scale=kd_scale)
    optim.optimizer.zero_grad(set_to_none=True)
    optim.backward(terms, total_loss(terms), scaler)
    if clip is not None:
        scaler.unscale_(optim.optimizer)
        optim.clip_grad_norm(list(model.parameters()), clip)
    scaler.step(optim.optimizer)
    scaler.update()


def run_kdlab(model: Net, momentum: float, delta: float, wd: float,
              data: list[tuple[Tensor, Tensor, Tensor]], **kw: object) -> DOT:
    optim = make_dot(model, momentum, delta, wd)
    for i, batch in enumerate(data):
        train_step(optim, model, batch, LRS[i], **kw)  # type: ignore[arg-type]
    return optim


def assert_params_close(a: nn.Module, b: nn.Module, tol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol, msg=name)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize(("momentum", "delta", "wd"),
                         [(0.9, 0.075, 5e-4), (0.9, 0.0, 5e-4), (0.9, -0.05, 1e-2),
                          (0.4, 0.4, 5e-4), (0.9, 0.075, 0.0)])
def test_dot_equals_the_official_update(momentum: float, delta: float, wd: float) -> None:
    data = batches(len(LRS))
    ours, theirs = Net(), Net()
    optim = run_kdlab(ours, momentum, delta, wd, data)
    ref = run_reference(theirs, momentum, delta, wd, data)
    assert_params_close(ours, theirs)
    # the buffers too, under the official names
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        state, ref_state = optim.optimizer.state[p], ref.state[id(q)]
        for key in ("momentum_buffer", "momentum_kd_buffer"):
            if ref_state.get(key) is None:
                assert state.get(key) is None
            else:
                torch.testing.assert_close(state[key], ref_state[key], rtol=1e-6, atol=1e-7)
    assert torch.equal(ours.unused, torch.ones(2))  # no gradient: untouched, no state
    assert not optim.optimizer.state.get(ours.unused)


def test_one_gradient_parameters_follow_the_official_rules() -> None:
    """A task-only parameter keeps only the task buffer, a distillation-only one only the
    distillation buffer, both with the averaged momentum; the distillation-only parameter gets
    weight decay from its second step on (the official order of operations)."""
    model = Net()
    momentum, delta, wd = 0.9, 0.075, 0.1
    optim = make_dot(model, momentum, delta, wd)
    assert model.helper is not None and model.task_bias is not None
    state = optim.optimizer.state
    w0 = model.helper.weight.detach().clone()
    data = batches(2)
    # step 1: the helper moves by its bare distillation gradient (no weight decay)
    terms = model.terms(*data[0])
    (g_kd,) = torch.autograd.grad(terms["kd"], model.helper.weight, retain_graph=True)
    train_step(optim, model, data[0], 0.1)
    torch.testing.assert_close(model.helper.weight, w0 - 0.1 * g_kd)
    assert set(state[model.helper.weight]) == {"momentum_kd_buffer"}
    assert set(state[model.task_bias]) == {"momentum_buffer"}
    assert set(state[model.head.weight]) == {"momentum_buffer", "momentum_kd_buffer"}
    # step 2: averaged momentum and weight decay for the helper
    w1, buf1 = model.helper.weight.detach().clone(), state[model.helper.weight][
        "momentum_kd_buffer"].clone()
    terms = model.terms(*data[1])
    (g_kd,) = torch.autograd.grad(terms["kd"], model.helper.weight, retain_graph=True)
    train_step(optim, model, data[1], 0.1)
    avg = ((momentum + delta) + (momentum - delta)) / 2
    torch.testing.assert_close(model.helper.weight, w1 - 0.1 * (avg * buf1 + g_kd + wd * w1))


def test_delta_zero_is_plain_sgd_on_the_total_loss() -> None:
    """delta = 0: every momentum is mu, and the two buffers add up to SGD's (weight decay on a
    distillation-only parameter differs on its first step only, so it is off here for that
    model)."""
    for helper, wd in ((False, 5e-4), (True, 0.0)):
        data = batches(len(LRS), seed=3)
        ours, sgd_model = Net(helper=helper), Net(helper=helper)
        run_kdlab(ours, 0.9, 0.0, wd, data)
        sgd = torch.optim.SGD(list(sgd_model.parameters()), lr=LRS[0], momentum=0.9,
                              weight_decay=wd)
        for i, batch in enumerate(data):
            sgd.param_groups[0]["lr"] = LRS[i]
            sgd.zero_grad(set_to_none=True)
            total_loss(sgd_model.terms(*batch)).backward()
            sgd.step()
        assert_params_close(ours, sgd_model)


def test_clipping_scales_both_gradients_by_the_total_norm() -> None:
    """With delta = 0, DOT + clipping equals SGD + ``clip_grad_norm_`` on the total gradient
    (the clip is active: the norm is far above 0.05)."""
    data = batches(4, seed=4)
    ours, sgd_model = Net(), Net()
    optim = make_dot(ours, 0.9, 0.0, 0.0)
    sgd = torch.optim.SGD(list(sgd_model.parameters()), lr=0.1, momentum=0.9)
    for batch in data:
        train_step(optim, ours, batch, 0.1, clip=0.05)
        sgd.zero_grad(set_to_none=True)
        total_loss(sgd_model.terms(*batch)).backward()
        norm = torch.nn.utils.clip_grad_norm_(list(sgd_model.parameters()), 0.05)
        assert norm > 0.5
        sgd.step()
    assert_params_close(ours, sgd_model)


def test_state_dict_round_trip_is_bit_exact() -> None:
    data = batches(6, seed=5)
    a = Net()
    optim_a = make_dot(a, 0.9, 0.075, 5e-4)
    for batch in data[:3]:
        train_step(optim_a, a, batch, 0.1)
    b = copy.deepcopy(a)
    optim_b = make_dot(b, 0.9, 0.075, 5e-4)
    optim_b.optimizer.load_state_dict(copy.deepcopy(optim_a.optimizer.state_dict()))
    saved = optim_a.optimizer.state_dict()["state"]
    assert {"momentum_buffer", "momentum_kd_buffer"} <= {k for s in saved.values() for k in s}
    for batch in data[3:]:
        train_step(optim_a, a, batch, 0.1)
        train_step(optim_b, b, batch, 0.1)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grad_scaler_unscales_both_gradients_and_skips_on_overflow() -> None:
    data = batches(3, seed=6)
    plain, scaled = Net(), Net()
    optim_p, optim_s = make_dot(plain, 0.9, 0.075, 5e-4), make_dot(scaled, 0.9, 0.075, 5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for batch in data:
        train_step(optim_p, plain, batch, 0.1)
        train_step(optim_s, scaled, batch, 0.1, scaler=scaler, clip=100.0)
    assert_params_close(plain, scaled)
    # an overflow in the distillation gradient alone: the step is skipped, the scale backs off
    before = [p.detach().clone() for p in scaled.parameters()]
    scale = scaler.get_scale()
    train_step(optim_s, scaled, data[0], 0.1, scaler=scaler, kd_scale=1e36)
    assert scaler.get_scale() == scale / 2
    for p, q in zip(scaled.parameters(), before, strict=True):
        assert torch.equal(p, q)
    train_step(optim_s, scaled, data[1], 0.1, scaler=scaler)
    assert all(torch.isfinite(p).all() for p in scaled.parameters())


def test_registry_and_one_line_config_errors() -> None:
    assert "dot" in list_optimizers() and get_optimizer("dot") is DOT
    cfg = validate_config({"student": {"arch": "resnet8"},
                           "optim": {"name": "dot", "args": {"delta": 0.05}}}, "t")
    opt = build_optimizer(cfg.optim, [nn.Parameter(torch.zeros(2))], 0.05).optimizer
    assert isinstance(opt, DistillationOrientedSGD)
    g = opt.param_groups[0]
    assert (g["momentum"], g["momentum_kd"], g["weight_decay"]) == pytest.approx(
        (0.85, 0.95, 5e-4))
    for optim, needle in [
        ({"name": "dot", "nesterov": True}, "nesterov not used by optimizer 'dot'"),
        ({"name": "dot", "args": {"delta": 0.1, "beta": 1}}, "optim.args.beta"),
        ({"name": "dto"}, "unknown optimizer 'dto'; did you mean dot"),
    ]:
        with pytest.raises(ConfigError) as e:
            validate_config({"student": {"arch": "resnet8"}, "optim": optim}, "t")
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"optim.args.delta.*must be in \[0, 1\)") as e:
        build_optimizer(OptimConfig(name="dot", args={"delta": 0.2}), [nn.Parameter(
            torch.zeros(2))], 0.05)
    assert "\n" not in str(e.value)


def test_a_method_without_the_task_term_is_a_one_line_error() -> None:
    model = Net()
    optim = make_dot(model, 0.9, 0.075, 5e-4, task_terms=["task"])
    terms = model.terms(*batches(1)[0])
    with pytest.raises(ConfigError, match="optim.args.task_terms.*its terms: ce, kd") as e:
        optim.backward(terms, total_loss(terms), torch.amp.GradScaler("cpu", enabled=False))
    assert "\n" not in str(e.value)


def test_several_task_terms_and_partner_terms_are_classified() -> None:
    """``task_terms`` lists the task loss's terms (their sum); every other term, a partner's
    included, is the distillation loss."""
    model = Net()
    optim = make_dot(model, 0.9, 0.075, 0.0, task_terms=["ce", "ce2"])
    x, y, zt = batches(1)[0]
    t = model.terms(x, y, zt)
    terms = {"ce": t["ce"], "kd": t["kd"], "ce2": 0.5 * t["ce"], "crd": 0.1 * t["kd"]}
    task, kd = optim.split_terms(terms)
    assert task is not None and kd is not None
    torch.testing.assert_close(task, 1.5 * t["ce"])
    torch.testing.assert_close(kd, 1.1 * t["kd"])
    # vanilla: no distillation loss (every parameter is task-only: averaged momentum)
    assert optim.split_terms({"ce": t["ce"]})[1] is None


def test_dot_builds_under_distributed_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """DOT is no longer refused under torchrun: its task gradients are averaged over the ranks
    (the 2-rank equality is tested in tests/engine/test_methods_distributed.py)."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    opt = build_optimizer(OptimConfig(name="dot"), [nn.Parameter(torch.zeros(2))], 0.05)
    assert opt.name == "dot"


def test_without_distillation_terms_dot_is_sgd_with_momentum_mu() -> None:
    """``vanilla`` (CE only): every parameter is task-only and uses the averaged momentum
    ``((mu + delta) + (mu - delta)) / 2 = mu``, whatever delta."""
    data = batches(4, seed=8)
    ours, sgd_model = Net(helper=False), Net(helper=False)
    optim = make_dot(ours, 0.9, 0.075, 5e-4)
    sgd = torch.optim.SGD(list(sgd_model.parameters()), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y, _ in data:
        for model, opt in ((ours, optim.optimizer), (sgd_model, sgd)):
            z = model.head(torch.tanh(model.body(x)))
            terms = {"ce": F.cross_entropy(z + model.task_bias, y)}
            opt.zero_grad(set_to_none=True)
            if model is ours:
                optim.backward(terms, total_loss(terms), torch.amp.GradScaler("cpu",
                                                                               enabled=False))
            else:
                terms["ce"].backward()
            opt.step()
    assert_params_close(ours, sgd_model)
    assert all(set(s) == {"momentum_buffer"} for s in optim.optimizer.state.values() if s)
