"""Builders: models, method, optimizer and schedule of a run from its config.

Each builder takes the config section it needs and returns one object, so the trainer's setup
reads as a list of parts and ``kdlab bench``, the benchmarks and the tests build the same parts
the same way.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.config import ExperimentConfig, ModelConfig, OptimConfig
from kdlab.core.errors import ConfigError
from kdlab.engine.optimizers import TrainOptimizer, build_optimizer
from kdlab.engine.schedules import LRSchedule, build_schedule
from kdlab.methods.base import Distiller
from kdlab.methods.compose import CompositeDistiller, build_method
from kdlab.models import KdModel, load_checkpoint
from kdlab.tasks.base import Task

log = logging.getLogger(__name__)

__all__ = ["build_distiller", "build_model", "build_optimizer", "build_schedule",
           "build_teacher", "scaled_lr", "trainable_parameters", "warn_long_warmups"]


def build_model(task: Task[Any, Any, Any], cfg: ModelConfig, data: Any, device: torch.device,
                memory_format: torch.memory_format = torch.contiguous_format) -> KdModel:
    """Network ``cfg.arch`` for ``data`` on ``device``, loaded from ``cfg.checkpoint`` if set,
    else from its library's published weights with ``cfg.pretrained`` (torchvision:/timm:)."""
    model = task.create_model(cfg.arch, data)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    elif cfg.pretrained:
        task.load_pretrained(model)
    return model.to(device, memory_format=memory_format)


def build_teacher(task: Task[Any, Any, Any], cfg: ModelConfig | None, data: Any,
                  device: torch.device, memory_format: torch.memory_format
                  ) -> KdModel | None:
    """The frozen teacher (eval mode, no gradients), or None without a teacher section."""
    if cfg is None:
        return None
    if not cfg.checkpoint and not cfg.pretrained:
        if not cfg.random_init:
            raise ConfigError(
                f"teacher {cfg.arch} has no weights: set teacher.checkpoint (a trained teacher), "
                "teacher.pretrained: true (torchvision:/timm: archs), or teacher.random_init: "
                "true to distil from a random teacher on purpose (speed and smoke tests)")
        log.warning("teacher %s is randomly initialised (teacher.random_init: only meaningful "
                    "for speed and smoke tests)", cfg.arch)
    teacher = build_model(task, cfg, data, device, memory_format)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_distiller(cfg: ExperimentConfig, task: Task[Any, Any, Any], student: KdModel,
                    teacher: KdModel | None, data: Any, device: torch.device
                    ) -> CompositeDistiller:
    """The configured method (and partners) for these models, on ``device``."""
    ctx = task.distill_context(student, teacher, data)
    distiller = build_method(cfg.method, ctx).to(device)
    warn_long_warmups(distiller, cfg.optim.epochs)
    return distiller


def warn_long_warmups(distiller: nn.Module, epochs: int) -> list[str]:
    """Log (and return) a warning per method whose loss warm-up (``warmup_epochs``, the linear
    ramp of DKD, CVPR 2022, and its followers) is longer than the ``epochs`` of the schedule: its
    distillation term never reaches full weight."""
    warnings = []
    for module in distiller.modules():
        warmup = getattr(getattr(module, "params", None), "warmup_epochs", 0)
        if isinstance(module, Distiller) and isinstance(warmup, int | float) and warmup > epochs:
            warnings.append(
                f"method {module.name}: warmup_epochs {warmup} is longer than the {epochs}-epoch "
                f"schedule, so its loss never reaches full weight; set "
                f"method.params.warmup_epochs (e.g. {max(1, epochs // 5)})")
            log.warning("%s", warnings[-1])
    return warnings


def trainable_parameters(student: nn.Module, distiller: nn.Module) -> list[Tensor]:
    """What the optimizer updates: the student's parameters and the method's trainable helpers
    (regressors, embeddings), in that order."""
    return list(student.parameters()) + [p for p in distiller.parameters() if p.requires_grad]


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The learning rate after ``optim.lr_scaling`` (an explicit rule, never implicit).

    ``none``: ``lr``; ``linear``: ``lr * global_batch / base_batch_size`` (Goyal et al., 2017);
    ``sqrt``: ``lr * sqrt(global_batch / base_batch_size)``.
    """
    ratio = global_batch / optim.base_batch_size
    if optim.lr_scaling == "linear":
        return optim.lr * ratio
    if optim.lr_scaling == "sqrt":
        return optim.lr * math.sqrt(ratio)
    return optim.lr


def build_training_optimizer(cfg: ExperimentConfig, params: list[Tensor]) -> TrainOptimizer:
    """The registered optimizer ``cfg.optim.name`` at the batch-scaled learning rate."""
    return build_optimizer(cfg.optim, params, scaled_lr(cfg.optim, cfg.data.batch_size))


def build_lr_schedule(cfg: ExperimentConfig, steps_per_epoch: int) -> LRSchedule:
    """The registered schedule ``cfg.optim.scheduler`` (warm-up included)."""
    return build_schedule(cfg.optim, steps_per_epoch)
