"""Optimizers and learning-rate schedules by config (``optim.name``, ``optim.scheduler``,
``optim.warmup_epochs``): registry, validation, and the schedules' values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import Field
from torch import Tensor

from kdlab.config import OptimConfig, validate_config
from kdlab.core.errors import ConfigError
from kdlab.engine.optimizers import (
    OPTIMIZERS,
    OptimizerArgs,
    TrainOptimizer,
    build_optimizer,
    list_optimizers,
    register_optimizer,
)
from kdlab.engine.schedules import build_schedule, list_schedules
from kdlab.engine.trainer import Trainer


def _params() -> list[Tensor]:
    return [torch.nn.Parameter(torch.zeros(3))]


def test_builtins_are_registered() -> None:
    assert {"sgd", "adamw"} <= set(list_optimizers())
    assert {"multistep", "cosine", "poly"} <= set(list_schedules())


def test_sgd_default_is_the_protocol() -> None:
    opt = build_optimizer(OptimConfig(), _params(), lr=0.05).optimizer
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"]) == (0.05, 0.9, 5e-4, False)


def test_adamw_takes_its_arguments() -> None:
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    opt = build_optimizer(cfg, _params(), lr=1e-3).optimizer
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.99), 1e-6, 0.05)


@pytest.mark.parametrize("optim, needle", [
    ({"name": "adamw", "momentum": 0.5}, "momentum not used by optimizer 'adamw'"),
    ({"betas": [0.5, 0.9]}, "betas not used by optimizer 'sgd'"),
    ({"scheduler": "cosine", "milestones": [3]}, "milestones not used by scheduler 'cosine'"),
    ({"min_lr": 0.001}, "min_lr not used by scheduler 'multistep'"),
    ({"name": "adam"}, "unknown optimizer 'adam'; did you mean adamw"),
    ({"scheduler": "cosin"}, "unknown scheduler 'cosin'; did you mean cosine"),
    ({"args": {"delta": 1}}, "optim.args.delta"),
    ({"warmup_epochs": 300}, "warmup_epochs (300.0) exceeds epochs (240)"),
    ({"betas": [0.9, 1.5]}, "betas must be two numbers in [0, 1)"),
    ({"scheduler": "poly", "power": 0}, "'optim.power': Input should be greater than 0"),
    ({"scheduler": "poly", "power": -0.5}, "'optim.power': Input should be greater than 0"),
    ({"power": 1.0}, "power not used by scheduler 'multistep'"),
    ({"scheduler": "cosine", "power": 1.0}, "power not used by scheduler 'cosine'"),
    ({"scheduler": "poly", "milestones": [3]}, "milestones not used by scheduler 'poly'"),
])
def test_bad_optim_keys_are_one_line_errors(optim: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config({"student": {"arch": "resnet8"}, "optim": optim}, "test")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_a_resolved_config_with_every_key_validates() -> None:
    """config.yaml of a run lists every key at its default: that is not 'setting' them."""
    cfg = validate_config({"student": {"arch": "resnet8"}}, "test")
    again = validate_config(cfg.to_dict(), "test")
    assert again == cfg


@pytest.mark.parametrize("milestones, gamma", [([150, 180, 210], 0.1), ([2, 2, 5], 0.2),
                                               ([1, 3], 0.37), ([], 0.1)])
def test_multistep_is_bit_identical_to_torch_multisteplr(milestones: list[int],
                                                         gamma: float) -> None:
    epochs, spe, lr = 240, 3, 0.05
    cfg = OptimConfig(epochs=epochs, milestones=milestones, gamma=gamma, lr=lr)
    sched = build_schedule(cfg, spe)
    opt = torch.optim.SGD(_params(), lr=lr)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=gamma)
    for epoch in range(1, epochs + 1):
        torch_lr = opt.param_groups[0]["lr"]
        for i in range(spe):
            assert sched.lr(lr, (epoch - 1) * spe + i) == torch_lr  # exact, not approx
        opt.step()
        ref.step()


def test_cosine_values_and_warmup() -> None:
    cfg = OptimConfig(scheduler="cosine", epochs=10, warmup_epochs=2, min_lr=0.001, lr=0.1)
    spe = 5
    s = build_schedule(cfg, spe)
    warm = 2 * spe
    # linear warm-up (t + 1) / W of the schedule value, which is the base lr during warm-up
    assert [s.lr(0.1, t) for t in range(warm)] == pytest.approx(
        [0.1 * (t + 1) / warm for t in range(warm)])
    assert s.lr(0.1, warm) == pytest.approx(0.1)
    total = 10 * spe
    mid = warm + (total - warm) // 2
    assert s.lr(0.1, mid) == pytest.approx(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr(0.1, total) == pytest.approx(0.001)
    lrs = [s.lr(0.1, t) for t in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # monotone decay


def test_fractional_warmup_epochs_round_to_steps() -> None:
    s = build_schedule(OptimConfig(warmup_epochs=0.5, milestones=[]), steps_per_epoch=7)
    assert s.warmup_steps == 4  # round(3.5) = 4 (banker's rounding)
    assert s.lr(1.0, 0) == pytest.approx(0.25) and s.lr(1.0, 4) == 1.0


def test_apply_sets_every_group_from_its_initial_lr() -> None:
    s = build_schedule(OptimConfig(milestones=[1], gamma=0.5), steps_per_epoch=2)
    opt = torch.optim.SGD([{"params": _params(), "lr": 0.2},
                           {"params": _params(), "lr": 0.02}])
    s.apply(opt, 1)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.02]
    s.apply(opt, 2)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    s.apply(opt, 0)  # a function of t, not of the calls before
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.02]


class _SignArgs(OptimizerArgs):
    scale: float = Field(1.0, gt=0)


def test_a_registered_optimizer_is_usable_from_a_config() -> None:
    class SignSGD(TrainOptimizer):
        name: ClassVar[str] = "test_sign_sgd"
        Args = _SignArgs
        uses = frozenset({"momentum"})

        def create(self, params: list[Tensor], cfg: OptimConfig, lr: float
                   ) -> torch.optim.Optimizer:
            return torch.optim.SGD(params, lr=lr * self.args.scale, momentum=cfg.momentum)

    register_optimizer(SignSGD)
    try:
        cfg = validate_config({"student": {"arch": "resnet8"},
                               "optim": {"name": "test_sign_sgd", "args": {"scale": 2.0},
                                         "momentum": 0.5}}, "test")
        opt = build_optimizer(cfg.optim, _params(), lr=0.1).optimizer
        assert opt.param_groups[0]["lr"] == 0.2 and opt.param_groups[0]["momentum"] == 0.5
        with pytest.raises(ConfigError, match="optim.args.scale"):
            validate_config({"student": {"arch": "resnet8"},
                             "optim": {"name": "test_sign_sgd", "args": {"scale": -1}}}, "t")
    finally:
        OPTIMIZERS.unregister("test_sign_sgd")


def test_fingerprint_unchanged_by_new_keys_at_their_defaults() -> None:
    """Runs made before optim.name/scheduler/warmup_epochs existed keep their fingerprint."""
    base = {"student": {"arch": "resnet8"}, "method": {"name": "dkd", "params": {"warmup": 5}}}
    old = validate_config(base, "t").fingerprint()
    # computed by kdlab 0.1.0 (commit 3d31f07) for the same two configs
    assert old == "bf01d8ccc7efd9103ee842dcad146f9dca3f133a3608eb9b8e4208cdb0988de2"
    assert validate_config({"student": {"arch": "resnet8"}}, "t").fingerprint() == (
        "500da687460e98ec8b7426d33f2184ed236b7848b198d51a78bec5dfc2114256")
    explicit = validate_config({**base, "optim": {"name": "sgd", "scheduler": "multistep",
                                                  "warmup_epochs": 0}, "task": "classification",
                                "method": {"name": "dkd", "params": {"warmup_epochs": 5}}},
                               "t").fingerprint()
    assert explicit == old
    changed = validate_config({**base, "optim": {"warmup_epochs": 1}}, "t").fingerprint()
    assert changed != old


# ------------------------------------------------------------------ poly
# golden factors (1 - t / T) ** 0.9, computed as exp(0.9 * ln x) by hand, not by the code
_P075, _P050, _P025, _P005 = (0.7718895067235705, 0.5358867312681466, 0.2871745887492588,
                              0.06746414238367818)


def test_poly_golden_values_without_warmup() -> None:
    """T = epochs * steps_per_epoch = 4 * 5 = 20 steps; lr(t) = 0.1 * (1 - t / 20) ** 0.9."""
    s = build_schedule(OptimConfig(scheduler="poly", epochs=4, lr=0.1), steps_per_epoch=5)
    assert s.total_steps == 20 and s.warmup_steps == 0
    assert s.lr(0.1, 0) == 0.1  # the first step runs at the base rate
    assert s.lr(0.1, 5) == pytest.approx(0.1 * _P075, rel=1e-12)
    assert s.lr(0.1, 10) == pytest.approx(0.1 * _P050, rel=1e-12)
    assert s.lr(0.1, 15) == pytest.approx(0.1 * _P025, rel=1e-12)
    assert s.lr(0.1, 19) == pytest.approx(0.1 * _P005, rel=1e-12)  # the last step: > 0
    assert s.lr(0.1, 20) == 0.0 and s.lr(0.1, 25) == 0.0  # past the run: clamped
    lrs = [s.lr(0.1, t) for t in range(20)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))


def test_poly_is_bit_identical_to_cirkd_adjust_lr() -> None:
    """CIRKD (train_kd.py) sets ``base_lr * (1 - float(iter) / max_iter) ** power`` before step
    ``iter`` (0-based) of ``max_iter``: the same floats, exactly."""
    spe, epochs, lr = 37, 6, 0.02
    s = build_schedule(OptimConfig(scheduler="poly", epochs=epochs, lr=lr), spe)
    total = spe * epochs
    for t in range(total):
        assert s.lr(lr, t) == lr * ((1 - float(t) / total) ** 0.9)


def test_poly_power_and_min_lr() -> None:
    s = build_schedule(OptimConfig(scheduler="poly", epochs=2, lr=0.01, power=2.0,
                                   min_lr=1e-4), steps_per_epoch=5)
    assert s.lr(0.01, 0) == 0.01
    assert s.lr(0.01, 5) == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.25, rel=1e-12)
    assert s.lr(0.01, 10) == pytest.approx(1e-4)
    assert OptimConfig().power == 0.9


def test_poly_composes_with_warmup_as_cosine_does() -> None:
    """W = 5 warm-up steps of ``lr * (t + 1) / W``, then poly over S = T - W = 20 steps."""
    cfg = OptimConfig(scheduler="poly", epochs=5, warmup_epochs=1, lr=0.1)
    s = build_schedule(cfg, steps_per_epoch=5)
    assert (s.total_steps, s.warmup_steps) == (25, 5)
    assert [s.lr(0.1, t) for t in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert s.lr(0.1, 5) == 0.1
    assert s.lr(0.1, 10) == pytest.approx(0.1 * _P075, rel=1e-12)  # s = 5 of S = 20
    assert s.lr(0.1, 15) == pytest.approx(0.1 * _P050, rel=1e-12)
    assert s.lr(0.1, 24) == pytest.approx(0.1 * _P005, rel=1e-12)  # the last step
    cos = build_schedule(cfg.model_copy(update={"scheduler": "cosine"}), steps_per_epoch=5)
    assert [s.lr(0.1, t) for t in range(6)] == [cos.lr(0.1, t) for t in range(6)]


def test_poly_resumes_from_the_step_alone() -> None:
    """A rebuilt schedule (as after resume) sets the rates an uninterrupted one does, whatever
    steps were applied before; its state_dict holds no running state."""
    cfg = OptimConfig(scheduler="poly", epochs=3, warmup_epochs=0.5, lr=0.05, min_lr=1e-3)
    full, opt = build_schedule(cfg, 7), torch.optim.SGD(_params(), lr=0.05)
    seen = []
    for t in range(21):
        full.apply(opt, t)
        seen.append(opt.param_groups[0]["lr"])
    resumed, opt2 = build_schedule(cfg, 7), torch.optim.SGD(_params(), lr=0.05)
    after = []
    for t in range(9, 21):  # resumed at step 9 (mid-epoch 2)
        resumed.apply(opt2, t)
        after.append(opt2.param_groups[0]["lr"])
    assert after == seen[9:]
    assert resumed.state_dict() == full.state_dict() == {
        "name": "poly", "steps_per_epoch": 7, "warmup_steps": 4, "total_steps": 21}


def test_poly_default_power_keeps_the_fingerprint() -> None:
    base = {"student": {"arch": "resnet8"}, "optim": {"scheduler": "poly"}}
    fp = validate_config(base, "t").fingerprint()
    same = validate_config({**base, "optim": {"scheduler": "poly", "power": 0.9}}, "t")
    other = validate_config({**base, "optim": {"scheduler": "poly", "power": 1.0}}, "t")
    assert same.fingerprint() == fp != other.fingerprint()


_RUN: dict[str, object] = {
    "name": "poly",
    "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 64,
             "synthetic": {"n_train": 64, "n_test": 16, "num_classes": 4, "size": 16}},
    "student": {"arch": "resnet8"},
    "optim": {"epochs": 3, "scheduler": "poly", "warmup_epochs": 0.5, "lr": 0.05},
    "runtime": {"threads": 1, "amp": "off", "deterministic": True},
}


@pytest.mark.e2e
def test_poly_run_stopped_and_resumed_is_exact(tmp_path: Path) -> None:
    """3 epochs of 4 steps under poly with warm-up: stopped after epoch 1 and resumed, the
    run's rates, weights and optimizer state equal an uninterrupted run's."""
    cfg = validate_config(_RUN, "t")
    Trainer(cfg, tmp_path / "full").run()
    Trainer(cfg, tmp_path / "part", stop_after=1).run()
    Trainer(cfg, tmp_path / "part", resume="required").run()
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "part" / "metrics.jsonl").read_text()
           .splitlines()]
    # each epoch's first step: t = 0 (warm-up 1 / 2), 4, 8; T = 12, W = 2, S = 10, s = t - 2
    assert lrs == pytest.approx([0.025, 0.05 * 0.8 ** 0.9, 0.05 * 0.4 ** 0.9], rel=1e-12)
