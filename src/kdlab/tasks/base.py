"""Tasks: what differs between classification and other tasks (detection), and nothing else.

A :class:`Task` owns how a batch is formed (its loaders), what the models are and what they
return (its forward pass), the training-time metric, the evaluation metrics and which of them
decides the "best" epoch. The trainer, checkpointing, resume, DDP, sweeps and reports are shared
by every task and never look inside a batch or a model output themselves.

Tasks are registered by name (``task: classification`` in a config) with :func:`register_task`;
kdlab's own task modules in :mod:`kdlab.tasks` are discovered automatically.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from torch import nn

from kdlab.config import DataConfig, ExperimentConfig
from kdlab.core.distributed import DistInfo
from kdlab.core.errors import ConfigError
from kdlab.core.registries import TASKS
from kdlab.methods.base import DistillContext
from kdlab.methods.registry import get_method
from kdlab.models import load_pretrained
from kdlab.models.output import KdModel

__all__ = ["Mark", "Metric", "Task", "TrainMeter", "get_task", "list_tasks", "register_task",
           "task_for"]

#: A callback the training step calls with the name of each part it finishes ("teacher_fwd",
#: "student_fwd", "loss", "backward_step"); ``kdlab bench`` times the parts through it.
Mark = Callable[[str], None]

D = TypeVar("D")  # the task's data bundle
B = TypeVar("B")  # the task's batch
O = TypeVar("O")  # what the task's models return


@dataclass(frozen=True)
class Metric:
    """One evaluation metric of a task: its key in :meth:`Task.evaluate`'s result, the label
    shown in logs and tables, and its direction (which of two values is better)."""

    name: str
    label: str
    higher_is_better: bool = True

    def better(self, a: float, b: float | None) -> bool:
        """Whether ``a`` strictly beats ``b`` (None: nothing yet, so anything beats it)."""
        if b is None:
            return True
        return a > b if self.higher_is_better else a < b

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values`` in this metric's direction (``max`` or ``min``); NaN when
        there is none."""
        pick = max if self.higher_is_better else min
        return pick(values, default=math.nan)


class TrainMeter(Protocol[B, O]):
    """The task's training-time metric of one epoch, accumulated on the device."""

    def update(self, output: O, batch: B) -> None:
        """Add one step (no host synchronisation)."""

    def reduce(self, dist: DistInfo) -> None:
        """Sum the per-rank counts over the ranks (distributed runs)."""

    @property
    def samples(self) -> int:
        """Samples seen so far (for images/s)."""

    def progress(self) -> dict[str, float]:
        """Short figures for the progress bar (synchronises the host)."""

    def summary(self) -> dict[str, float]:
        """The epoch's record entries, e.g. ``{"train_top1": ...}``."""

    def state_dict(self) -> dict[str, Any]:
        """The counts so far (saved in step checkpoints)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""


class Task(ABC, Generic[D, B, O]):
    """What one task type defines; the engine does the rest. See the module docstring."""

    name: ClassVar[str]
    #: every metric :meth:`evaluate` returns (``count`` aside), headline ones first.
    metrics: ClassVar[tuple[Metric, ...]]
    #: the evaluation metric (a key of :meth:`evaluate`'s result) that decides "best".
    best_metric: ClassVar[str]
    #: the training-time metric of :meth:`train_meter` (its summary key is ``train_<name>``).
    train_metric: ClassVar[Metric]
    #: the metrics a report shows for this task, in order (the first is :attr:`best_metric`).
    report_metrics: ClassVar[tuple[str, ...]]
    #: what a report table of this task says about its metrics (None: nothing to add).
    metric_note: ClassVar[str | None] = None
    #: the config section of this task's own settings (an :class:`ExperimentConfig` field), if any.
    config_section: ClassVar[str | None] = None
    #: the data sets this task reads (``data.name``); None: the in-memory and streamed image sets
    #: that no other task claims.
    data_sets: ClassVar[tuple[str, ...] | None] = None
    #: what the methods may read: the logit methods and the partners that apply to this task's
    #: outputs (None: every registered one), with why the others do not (for the error).
    supported_methods: ClassVar[tuple[str, ...] | None] = None
    supported_partners: ClassVar[tuple[str, ...] | None] = None
    unsupported_partner_reason: ClassVar[str] = ""
    #: how :attr:`data_sets` are described in errors ("COCO-format data").
    data_description: ClassVar[str] = "image classification data"
    #: whether ``kdlab export`` can write this task's student as images in, logits out.
    exportable: ClassVar[bool] = False
    #: whether the student's DDP wrapper must look for parameters a training step leaves unused
    #: (detection: the backbone's last stage and classifier take no part in the RoI pass)
    ddp_find_unused_parameters: ClassVar[bool] = False

    def configure(self, cfg: ExperimentConfig) -> None:
        """Read the run's task-specific settings (detection: its ``detection`` section) before
        any data or model is built, and check that the method and partners apply to this task
        (:meth:`check_method`). Default: only the check."""
        self.check_method(cfg)

    def check_method(self, cfg: ExperimentConfig) -> None:
        """Raise :class:`ConfigError` when the configured method or a partner is not among
        :attr:`supported_methods` / :attr:`supported_partners`."""
        methods, partners = self.supported_methods, self.supported_partners
        if self.name != "segmentation" and get_method(cfg.method.name).needs_dense_maps:
            raise ConfigError(f"method {cfg.method.name!r} distils segmentation logit maps; use "
                              "it with task: segmentation")
        if methods is not None and cfg.method.name not in methods:
            raise ConfigError(f"method {cfg.method.name!r} is not available for {self.name}; use "
                              f"one of {list(methods)}")
        for partner in cfg.method.partners:
            if partners is not None and partner.name not in partners:
                raise ConfigError(f"partner {partner.name!r} is not available for {self.name}"
                                  f"{self.unsupported_partner_reason}; use one of "
                                  f"{list(partners)}")

    def distill_inputs(self, out_s: O, out_t: O | None, batch: B
                       ) -> tuple[Any, Any, Any]:
        """What the method sees: ``(student output, teacher output, batch)``. Default: the
        task's own. Detection gives its RoI-level view (the RoI logits and their labels)."""
        return out_s, out_t, batch

    def task_terms(self, out_s: O) -> dict[str, torch.Tensor]:
        """The task's own loss terms beyond the method's (weight 1), e.g. the detector's RPN and
        box-regression losses. Default: none (classification's CE is the method's ``ce``)."""
        return {}

    def dataset_label(self, cfg: DataConfig) -> str:
        """The dataset's name in summaries and reports (``data.name``; detection adds the
        folder, as every COCO-format set is ``coco``)."""
        return cfg.name

    def load_pretrained(self, model: nn.Module) -> None:
        """Load the library weights of a ``pretrained: true`` model (classification: the
        torchvision/timm classifier's own)."""
        load_pretrained(model)  # type: ignore[arg-type]

    @abstractmethod
    def build_data(self, cfg: DataConfig, *, seed: int, device: torch.device,
                   channels_last: bool, rank: int, world_size: int) -> D:
        """The run's loaders; their batches are this task's batch type, on ``device``."""

    @abstractmethod
    def create_model(self, arch: str, data: D) -> KdModel:
        """A fresh (randomly initialised) network ``arch`` sized for ``data``."""

    def model_from_checkpoint(self, arch: str, state: dict[str, Any]) -> KdModel | None:
        """A fresh network ``arch`` sized by what checkpoint ``state`` records (its class count
        and input channels), so that a reader needs no data set; None when ``state`` does not
        record this task's model size (the reader then sizes it by the run's data)."""
        return None

    def recorded_classes(self, state: dict[str, Any]) -> int | None:
        """The class count checkpoint ``state`` records for a model of this task (checkpoints
        without a ``task`` entry are taken as this task's); None when it records none."""
        if "num_classes" not in state or state.get("task", self.name) != self.name:
            return None
        return int(state["num_classes"])

    @abstractmethod
    def distill_context(self, student: KdModel, teacher: KdModel | None, data: D
                        ) -> DistillContext:
        """What the methods may need to build their helper modules (one factory for all)."""

    @abstractmethod
    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: B,
                mark: Mark | None = None) -> tuple[O, O | None]:
        """Student output (with gradients) and teacher output (no gradients; None when
        ``teacher`` is None). Called under the run's autocast."""

    @abstractmethod
    def train_meter(self, device: torch.device) -> TrainMeter[B, O]:
        """A fresh training-metric accumulator for one epoch."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable[B], device: torch.device,
                 amp_dtype: torch.dtype | None, dist: DistInfo | None = None
                 ) -> dict[str, float]:
        """Evaluation metrics of ``model`` over ``batches`` (global over ranks); must hold
        :attr:`best_metric`. Every key but ``count`` is recorded as ``test_<key>``."""

    def evaluate_regions(self, model: nn.Module, batches: Iterable[B], device: torch.device,
                         scales: Sequence[int], amp_dtype: torch.dtype | None
                         ) -> dict[str, float]:
        """SDD's local logits judged on ``batches`` (``kdlab eval --regions``): per-scale scores
        keyed ``region_*``. Tasks without classifier-on-map local logits refuse."""
        raise ConfigError(f"kdlab eval --regions measures classifiers' local logits; the "
                          f"{self.name!r} task has none")

    def metric(self, name: str) -> Metric:
        """The declared :class:`Metric` ``name``; an undeclared key (a plugin task's extra
        figure) counts as higher-is-better and is shown by its name."""
        for m in self.metrics:
            if m.name == name:
                return m
        return Metric(name, name)

    @property
    def higher_is_better(self) -> bool:
        """The direction of :attr:`best_metric`."""
        return self.metric(self.best_metric).higher_is_better

    def is_better(self, value: float, best: float | None) -> bool:
        """Whether ``value`` of :attr:`best_metric` beats ``best`` (None: nothing yet)."""
        return self.metric(self.best_metric).better(value, best)




def register_task(cls: type[Task[Any, Any, Any]]) -> type[Task[Any, Any, Any]]:
    """Class decorator registering a :class:`Task` subclass under ``cls.name``."""
    return TASKS.register(cls.name, cls)


def get_task(name: str) -> Task[Any, Any, Any]:
    """A new instance of the task registered as ``name``."""
    return TASKS.get(name)()


def task_for(cfg: ExperimentConfig) -> Task[Any, Any, Any]:
    """The task of the run ``cfg``, configured with its settings (:meth:`Task.configure`)."""
    task = get_task(cfg.task)
    task.configure(cfg)
    return task


def list_tasks() -> list[str]:
    """Registered task names."""
    return TASKS.names()
