"""Optimizers by name (``optim.name``): a registry, so a new optimizer is one registered class.

A registered optimizer builds a :class:`torch.optim.Optimizer` from the trainable tensors, the
run's :class:`~kdlab.config.schema.OptimConfig` and the learning rate after ``optim.lr_scaling``. It
declares which keys of ``optim`` it reads besides ``lr`` and ``weight_decay`` (``uses``), so
that a key set for another optimizer is an error rather than silently ignored, and the schema
of its own extra arguments (``Args``, given as ``optim.args``). ``backward`` and
``clip_grad_norm`` are the hooks an optimizer that needs the loss terms separately overrides (the
distillation-oriented trainer, DOT); the defaults back-propagate the total loss and clip the
gradient norm with ``torch.nn.utils.clip_grad_norm_``.

Built in: ``sgd`` (momentum, Nesterov; the protocols' default), ``adamw`` (decoupled weight
decay, Loshchilov & Hutter, ICLR 2019) and ``dot`` (DOT, Zhao et al., ICCV 2023: SGD with
separate momenta for the task and the distillation gradient, :mod:`kdlab.engine.dot`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from kdlab.config import OptimConfig
from kdlab.core.errors import ConfigError
from kdlab.core.registries import OPTIMIZERS
from kdlab.engine.dot import DistillationOrientedSGD

log = logging.getLogger(__name__)

__all__ = ["DOT", "AdamW", "DOTArgs", "OptimizerArgs", "SGD", "TrainOptimizer",
           "build_optimizer", "get_optimizer", "list_optimizers", "register_optimizer"]


class OptimizerArgs(BaseModel):
    """Schema of ``optim.args`` for an optimizer with no extra arguments (unknown keys fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainOptimizer(ABC):
    """Base of a registered optimizer: subclasses set ``name``, ``uses``, ``Args`` and
    implement :meth:`create`."""

    name: ClassVar[str]
    #: keys of ``optim`` this optimizer reads besides ``lr`` and ``weight_decay``.
    uses: ClassVar[frozenset[str]] = frozenset()
    Args: ClassVar[type[OptimizerArgs]] = OptimizerArgs

    def __init__(self, params: list[Tensor], cfg: OptimConfig, lr: float) -> None:
        self.args = self.Args.model_validate(cfg.args)
        self.optimizer = self.create(params, cfg, lr)

    @abstractmethod
    def create(self, params: list[Tensor], cfg: OptimConfig, lr: float
               ) -> torch.optim.Optimizer:
        """The torch optimizer over ``params`` at learning rate ``lr``."""

    def backward(self, terms: dict[str, Tensor], loss: Tensor,
                 scaler: torch.amp.GradScaler) -> None:
        """Back-propagate one step's loss (``terms`` are its named parts, ``loss`` their sum)."""
        scaler.scale(loss).backward()

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> None:
        """Clip the gradient of ``params`` to total 2-norm ``max_norm`` (after unscaling):
        ``torch.nn.utils.clip_grad_norm_``."""
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)




def register_optimizer(cls: type[TrainOptimizer]) -> type[TrainOptimizer]:
    """Class decorator registering a :class:`TrainOptimizer` under ``cls.name``."""
    return OPTIMIZERS.register(cls.name, cls)


def get_optimizer(name: str) -> type[TrainOptimizer]:
    """The optimizer class registered as ``name``."""
    return OPTIMIZERS.get(name)


def list_optimizers() -> list[str]:
    """Registered optimizer names."""
    return OPTIMIZERS.names()


@register_optimizer
class SGD(TrainOptimizer):
    """SGD with (Nesterov) momentum and L2 weight decay: ``torch.optim.SGD``."""

    name = "sgd"
    uses = frozenset({"momentum", "nesterov"})

    def create(self, params: list[Tensor], cfg: OptimConfig, lr: float
               ) -> torch.optim.Optimizer:
        """``torch.optim.SGD(params, lr, momentum, weight_decay, nesterov)``."""
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


@register_optimizer
class AdamW(TrainOptimizer):
    """AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019)."""

    name = "adamw"
    uses = frozenset({"betas", "eps"})

    def create(self, params: list[Tensor], cfg: OptimConfig, lr: float
               ) -> torch.optim.Optimizer:
        """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)``."""
        return torch.optim.AdamW(params, lr=lr, betas=(cfg.betas[0], cfg.betas[1]),
                                 eps=cfg.eps, weight_decay=cfg.weight_decay)


class DOTArgs(OptimizerArgs):
    """``optim.args`` of ``dot``: the momentum split and which loss terms are the task loss."""

    delta: float = Field(0.075, gt=-1.0, lt=1.0, description="momentum split: the task "
                         "gradient's momentum is optim.momentum - delta, the distillation "
                         "gradient's optim.momentum + delta (official CIFAR/ImageNet: 0.075)")
    task_terms: tuple[str, ...] = Field(("ce",), min_length=1, description="loss terms whose "
                                        "sum is the task loss; every other term is the "
                                        "distillation loss")


@register_optimizer
class DOT(TrainOptimizer):
    """DOT, the distillation-oriented trainer (Zhao, Cui, Song, Liang, ICCV 2023).

    SGD whose task gradient (the step's ``task_terms``, by default the ``ce`` term) and
    distillation gradient (every other term) keep separate momentum buffers, with momentum
    ``optim.momentum - delta`` and ``optim.momentum + delta``
    (:class:`~kdlab.engine.dot.DistillationOrientedSGD`, the official update). Each step runs two
    backward passes: the distillation loss (graph retained), then the task loss. No Nesterov
    (the official optimizer has none); fp16 autocast with a GradScaler
    works (both gradients are unscaled and checked for overflow). Under torchrun, DDP reduces the
    first (distillation) backward pass and the task gradients are averaged over the ranks
    explicitly (``_average_task_grads``). Gradient-norm clipping scales
    both gradients by one factor computed from the norm of their sum, the gradient of the total
    loss, so that ``delta = 0`` is exactly SGD with the same clipping.
    """

    name = "dot"
    uses = frozenset({"momentum"})
    Args = DOTArgs
    args: DOTArgs

    def create(self, params: list[Tensor], cfg: OptimConfig, lr: float
               ) -> torch.optim.Optimizer:
        """``DistillationOrientedSGD(params, lr, momentum - delta, momentum + delta, wd)``."""
        delta = self.args.delta
        m_task, m_kd = cfg.momentum - delta, cfg.momentum + delta
        if not (0.0 <= m_task < 1.0 and 0.0 <= m_kd < 1.0):
            raise ConfigError(
                f"config key 'optim.args.delta': {delta} with optim.momentum {cfg.momentum} "
                f"gives momenta {m_task:g} (task) and {m_kd:g} (distillation); both must be in "
                "[0, 1)")
        return DistillationOrientedSGD(params, lr=lr, momentum=m_task, momentum_kd=m_kd,
                                       weight_decay=cfg.weight_decay)

    @property
    def dot(self) -> DistillationOrientedSGD:
        """The torch optimizer, typed."""
        assert isinstance(self.optimizer, DistillationOrientedSGD)
        return self.optimizer

    def split_terms(self, terms: dict[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """``(task loss, distillation loss)``: the float32 sums of the ``task_terms`` and of
        every other term (None where there is none)."""
        task = [v.float() for k, v in terms.items() if k in self.args.task_terms]
        kd = [v.float() for k, v in terms.items() if k not in self.args.task_terms]
        if not task:
            raise ConfigError(
                f"config key 'optim.args.task_terms': none of {list(self.args.task_terms)} is a "
                f"loss term of this method (its terms: {', '.join(terms)}); name the task-loss "
                "term(s) there")
        return (torch.stack(task).sum(),
                torch.stack(kd).sum() if kd else None)

    def backward(self, terms: dict[str, Tensor], loss: Tensor,
                 scaler: torch.amp.GradScaler) -> None:
        """The distillation loss's backward pass (its gradients are stashed in the optimizer),
        then the task loss's (into ``.grad``), as the official ``DOT.train_iter``. With a
        GradScaler the stashed gradients are unscaled here; an overflow in them is passed on to
        the scaler (one task gradient is set to inf), which then skips the step as usual."""
        opt = self.dot
        opt.clear_kd_grads()
        task, kd = self.split_terms(terms)
        if kd is not None and kd.requires_grad:
            scaler.scale(kd).backward(retain_graph=True)
            opt.stash_kd_grads()
        if task is not None and task.requires_grad:
            scaler.scale(task).backward()
            _average_task_grads(opt)
        if scaler.is_enabled():
            self._unscale_kd_grads(scaler)

    def _unscale_kd_grads(self, scaler: torch.amp.GradScaler) -> None:
        """Unscale the stashed distillation gradients; make the scaler see their overflow."""
        opt = self.dot
        grads = opt.kd_grads()
        scale = getattr(scaler, "_scale", None)
        if not grads or scale is None:
            return
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for g in grads:
            by_kind.setdefault((g.device, g.dtype), []).append(g)
        found = torch.zeros(1, dtype=torch.float32, device=scale.device)
        inv_scale = scale.double().reciprocal().float()
        for (device, _), group in by_kind.items():
            found_here = torch.zeros(1, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found_here,
                                                             inv_scale.to(device))
            found += found_here.to(found.device)
        task = next((p.grad for group in opt.param_groups for p in group["params"]
                     if p.grad is not None), None)
        if task is not None:  # the GradScaler checks .grad: one inf there skips the step
            flat = task.view(-1)[:1]
            flat.add_(torch.where(found > 0, float("inf"), 0.0).to(flat.device, flat.dtype))
        elif found.item() > 0:  # no task gradient at all (a host sync, only in this case)
            log.warning("dot: the distillation gradient overflowed under fp16 and there is no "
                        "task gradient; the step's update is dropped")
            opt.clear_kd_grads()

    def clip_grad_norm(self, params: list[Tensor], max_norm: float) -> None:
        """Scale the task and the distillation gradient by one factor,
        ``min(1, max_norm / (||g_task + g_kd|| + 1e-6))``: the norm of the total loss's gradient,
        as ``torch.nn.utils.clip_grad_norm_`` computes it for plain SGD."""
        opt = self.dot
        sums, task, kd = [], [], []
        for p in params:
            g, k = p.grad, opt.kd_grad(p)
            if g is not None:
                task.append(g)
            if k is not None:
                kd.append(k)
            if g is not None or k is not None:
                sums.append(k if g is None else g if k is None else g + k)
        if not sums:
            return
        total = torch.nn.utils.get_total_norm(sums, 2.0, foreach=True)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in task + kd:
            g.mul_(coef.to(g.device))


def _average_task_grads(opt: torch.optim.Optimizer) -> None:
    """Under torchrun, average the task gradients (``.grad``) over the ranks.

    DOT's first backward pass (the distillation loss) is the one DistributedDataParallel
    reduces: its hooks fire once per forward, so the second pass (the task loss) leaves each
    rank's own gradient, which is averaged here, coalesced per device and dtype. Both momentum
    buffers then see the gradients of the global batch, identical on every rank.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                by_kind.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def build_optimizer(cfg: OptimConfig, params: list[Tensor], lr: float) -> TrainOptimizer:
    """The registered optimizer ``cfg.name`` over ``params`` at learning rate ``lr``."""
    return get_optimizer(cfg.name)(params, cfg, lr)
