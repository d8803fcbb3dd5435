"""Optimizers by name (``optim.name``): a registry, so a new optimizer is one registered class.

A registered optimizer builds a :class:`torch.optim.Optimizer` from the trainable tensors, the
run's :class:`~kdlab.config.OptimConfig` and the learning rate after ``optim.lr_scaling``. It
declares which keys of ``optim`` it reads besides ``lr`` and ``weight_decay`` (``uses``), so
that a key set for another optimizer is an error rather than silently ignored, and the schema
of its own extra arguments (``Args``, given as ``optim.args``). ``backward`` is the hook an
optimizer that needs the loss terms separately (the distillation-oriented trainer, DOT) will
override; the default back-propagates the total loss.

Built in: ``sgd`` (momentum, Nesterov; the protocols' default) and ``adamw`` (decoupled weight
decay, Loshchilov & Hutter, ICLR 2019).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from kdlab.config import OptimConfig
from kdlab.errors import ConfigError
from kdlab.registry import Registry, check_keys_in_use

__all__ = ["AdamW", "OptimizerArgs", "SGD", "TrainOptimizer", "build_optimizer",
           "get_optimizer", "list_optimizers", "register_optimizer"]


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


OPTIMIZERS: Registry[type[TrainOptimizer]] = Registry(
    "optimizer", ConfigError)


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


def build_optimizer(cfg: OptimConfig, params: list[Tensor], lr: float) -> TrainOptimizer:
    """The registered optimizer ``cfg.name`` over ``params`` at learning rate ``lr``."""
    return get_optimizer(cfg.name)(params, cfg, lr)


def check_optimizer_keys(name: str, explicitly_set: set[str], args: dict[str, Any]) -> None:
    """Raise ``ValueError`` when a key read only by other optimizers is set, or ``args`` do not
    fit optimizer ``name``'s schema (used by :class:`~kdlab.config.OptimConfig`'s validator)."""
    check_keys_in_use(OPTIMIZERS, name, explicitly_set)
    cls = get_optimizer(name)
    from pydantic import ValidationError

    try:
        cls.Args.model_validate(args)
    except ValidationError as e:
        from kdlab.config import format_validation_error

        raise ValueError(format_validation_error(e, cls.Args, prefix="optim.args")) from e
