"""Learning-rate schedules by name (``optim.scheduler``), applied per optimizer step.

The learning rate of a step is a pure function of its position in the run, ``t`` (optimizer
steps before it, counted as ``(epoch - 1) * steps_per_epoch + step_in_epoch``), so a resumed
run needs no scheduler state and skipped steps do not shift the schedule:

``lr(t) = warmup(t) * schedule(t)``, ``warmup(t) = min(1, (t + 1) / W)`` with
``W = round(optim.warmup_epochs * steps_per_epoch)`` (linear warm-up, Goyal et al., 2017; none
when ``W = 0``).

* ``multistep``: ``lr * gamma`` for each milestone epoch passed. The products are formed one
  milestone at a time, in the order of :class:`torch.optim.lr_scheduler.MultiStepLR`, so the
  values are bit-identical to it (the CRD protocol: epochs 150, 180, 210, gamma 0.1).
* ``cosine``: ``min_lr + (lr - min_lr) * (1 + cos(pi * s / S)) / 2`` over the ``S`` steps after
  the warm-up (Loshchilov & Hutter, SGDR, ICLR 2017, without restarts), ``s = t - W``.
* ``poly``: ``min_lr + (lr - min_lr) * (1 - s / S) ** power`` over the same ``S`` steps (Chen
  et al., DeepLab, TPAMI 2018; the schedule of CIRKD, CWD and mmseg, power 0.9). Without
  warm-up and with ``min_lr = 0`` it is ``lr * (1 - t / T) ** power``, bit-identical to CIRKD's
  ``adjust_lr(iter=t, max_iter=T)``.

``T = optim.epochs * steps_per_epoch`` is the run's number of optimizer steps (``t`` runs over
``0 .. T - 1``; with ``min_lr = 0`` the last step's rate is ``lr * (1 / S) ** power > 0``)
and ``S = T - W``.
``steps_per_epoch`` is the training loader's length on one rank (a global batch is one step).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, ClassVar

import torch

from kdlab.config import OptimConfig
from kdlab.core.registries import SCHEDULES

__all__ = ["Cosine", "LRSchedule", "MultiStep", "Poly", "build_schedule", "get_schedule",
           "list_schedules", "register_schedule"]


class LRSchedule(ABC):
    """A registered schedule; subclasses set ``name``, ``uses`` and implement :meth:`value`."""

    name: ClassVar[str]
    #: keys of ``optim`` this schedule reads.
    uses: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: OptimConfig, steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)

    @abstractmethod
    def value(self, base_lr: float, t: int) -> float:
        """The schedule's learning rate at step ``t`` (before the warm-up factor)."""

    def lr(self, base_lr: float, t: int) -> float:
        """The learning rate of step ``t`` (0-based), warm-up included."""
        lr = self.value(base_lr, t)
        if t < self.warmup_steps:
            lr = lr * ((t + 1) / self.warmup_steps)
        return lr

    def apply(self, optimizer: torch.optim.Optimizer, t: int) -> None:
        """Set every parameter group's learning rate for step ``t`` (from its ``initial_lr``)."""
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = self.lr(group["initial_lr"], t)

    def state_dict(self) -> dict[str, Any]:
        """What defines the schedule (recorded in checkpoints; it holds no running state)."""
        return {"name": self.name, "steps_per_epoch": self.steps_per_epoch,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}




def register_schedule(cls: type[LRSchedule]) -> type[LRSchedule]:
    """Class decorator registering an :class:`LRSchedule` under ``cls.name``."""
    return SCHEDULES.register(cls.name, cls)


def get_schedule(name: str) -> type[LRSchedule]:
    """The schedule class registered as ``name``."""
    return SCHEDULES.get(name)


def list_schedules() -> list[str]:
    """Registered schedule names."""
    return SCHEDULES.names()


@register_schedule
class MultiStep(LRSchedule):
    """Step decay: ``lr * gamma`` at each of ``optim.milestones`` (epochs)."""

    name = "multistep"
    uses = frozenset({"milestones", "gamma"})

    def value(self, base_lr: float, t: int) -> float:
        """``base_lr`` times ``gamma`` once per milestone epoch completed before step ``t``."""
        epochs_done = t // self.steps_per_epoch
        lr = base_lr
        for milestone, count in sorted(Counter(self.cfg.milestones).items()):
            if milestone <= epochs_done:
                lr = lr * self.cfg.gamma ** count
        return lr


@register_schedule
class Cosine(LRSchedule):
    """Cosine decay from ``lr`` to ``optim.min_lr`` over the steps after the warm-up."""

    name = "cosine"
    uses = frozenset({"min_lr"})

    def value(self, base_lr: float, t: int) -> float:
        """Half a cosine period from ``base_lr`` (at ``t = W``) to ``min_lr`` (at the end)."""
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(t - self.warmup_steps, 0) / span, 1.0)
        min_lr = self.cfg.min_lr
        return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_schedule
class Poly(LRSchedule):
    """Polynomial decay from ``lr`` to ``optim.min_lr`` over the steps after the warm-up."""

    name = "poly"
    uses = frozenset({"power", "min_lr"})

    def value(self, base_lr: float, t: int) -> float:
        """``min_lr + (base_lr - min_lr) * (1 - s / S) ** power`` with ``s = t - W`` clamped to
        ``[0, S]`` and ``S = T - W`` (DeepLab's "poly" policy, Chen et al., TPAMI 2018)."""
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min(max(t - self.warmup_steps, 0) / span, 1.0)
        min_lr = self.cfg.min_lr
        return min_lr + (base_lr - min_lr) * (1.0 - progress) ** self.cfg.power


def build_schedule(cfg: OptimConfig, steps_per_epoch: int) -> LRSchedule:
    """The registered schedule ``cfg.scheduler`` for a run of ``steps_per_epoch``."""
    return get_schedule(cfg.scheduler)(cfg, steps_per_epoch)
