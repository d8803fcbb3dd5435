"""Image classification: the first task (CIFAR, ImageNet, CUB-200, Fashion-MNIST, folders).

A batch is :class:`~kdlab.data.batch.Batch` ``(images, labels, index)``; the models are zoo (or
adapted) classifiers returning :class:`~kdlab.models.output.ModelOutput`; the training metric is
top-1 accuracy on the training batches; evaluation gives top-1, top-5 (in %) and the mean
cross-entropy, and top-1 decides the best epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.config import DataConfig
from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.core.errors import ConfigError
from kdlab.data.batch import Batch
from kdlab.data.build import DataBundle, build_data
from kdlab.methods.base import DistillContext
from kdlab.models import create_model
from kdlab.models.output import KdModel, ModelOutput
from kdlab.tasks.base import Mark, Metric, Task, register_task
from kdlab.tasks.classification.evaluate import evaluate
from kdlab.tasks.classification.regions import region_accuracy

__all__ = ["AccuracyMeter", "ClassificationTask"]


class AccuracyMeter:
    """Training top-1 of one epoch: correct predictions counted on the device."""

    def __init__(self, device: torch.device) -> None:
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self._samples = 0

    def update(self, output: ModelOutput, batch: Batch) -> None:
        """Count the batch's correct top-1 predictions (no host synchronisation)."""
        self.correct += output.logits.detach().argmax(dim=1).eq(batch.labels).sum()
        self._samples += batch.labels.shape[0]

    def reduce(self, dist: DistInfo) -> None:
        """Global counts over the ranks."""
        if not dist.enabled:
            return
        counts = all_reduce_sum(
            torch.stack([self.correct, torch.tensor(self._samples, device=self.correct.device)]),
            dist)
        self.correct, self._samples = counts[0], int(counts[1])

    @property
    def samples(self) -> int:
        """Images seen so far."""
        return self._samples

    def top1(self) -> float:
        """Top-1 accuracy in % (synchronises the host)."""
        return 100.0 * float(self.correct) / max(self._samples, 1)

    def progress(self) -> dict[str, float]:
        """``{"acc": top-1 %}`` for the progress bar."""
        return {"acc": self.top1()}

    def summary(self) -> dict[str, float]:
        """``{"train_top1": top-1 %}``."""
        return {"train_top1": self.top1()}

    def state_dict(self) -> dict[str, Any]:
        """Correct predictions and images so far."""
        return {"correct": self.correct.cpu(), "samples": self._samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.correct = state["correct"].to(self.correct.device)
        self._samples = int(state["samples"])


@register_task
class ClassificationTask(Task[DataBundle, Batch, ModelOutput]):
    """Image classification with a teacher and a student classifier (see module docstring)."""

    name = "classification"
    metrics = (Metric("top1", "top-1"), Metric("top5", "top-5"),
               Metric("loss", "loss", higher_is_better=False))
    best_metric = "top1"
    train_metric = Metric("top1", "top-1")
    report_metrics = ("top1", "top5")
    exportable = True

    def dataset_label(self, cfg: DataConfig) -> str:
        """``data.name``; a class-folder dataset is ``folder:<its root's folder name>`` (every
        user folder is ``folder``, so two of them would otherwise share a name)."""
        if cfg.name == "folder" and cfg.root:
            return f"folder:{Path(cfg.root).resolve().name}"
        return cfg.name

    def build_data(self, cfg: DataConfig, *, seed: int, device: torch.device,
                   channels_last: bool, rank: int, world_size: int) -> DataBundle:
        """Device-resident or streamed loaders (:func:`kdlab.data.build.build_data`)."""
        data = build_data(cfg, seed=seed, device=device, channels_last=channels_last,
                          rank=rank, world_size=world_size)
        if data.input_spec is not None:
            data.input_spec = dataclasses.replace(data.input_spec,
                                                  dataset=self.dataset_label(cfg))
        return data

    def create_model(self, arch: str, data: DataBundle) -> KdModel:
        """A zoo model with the dataset's class count and input channels."""
        return create_model(arch, num_classes=data.num_classes, in_channels=data.in_channels)

    def model_from_checkpoint(self, arch: str, state: dict[str, Any]) -> KdModel | None:
        """The zoo model sized by the checkpoint's ``num_classes`` and ``in_channels`` (every
        checkpoint kdlab 0.3 writes; last.pt of earlier versions)."""
        classes = self.recorded_classes(state)
        if classes is None:
            return None
        return create_model(arch, num_classes=classes, in_channels=int(state.get("in_channels", 3)))

    def distill_context(self, student: KdModel, teacher: KdModel | None, data: DataBundle
                        ) -> DistillContext:
        """Probes at the dataset's input size, the class count and the training labels."""
        return DistillContext.from_models(student, teacher, num_classes=data.num_classes,
                                          train_labels=data.train_labels,
                                          input_size=data.input_size)

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Batch,
                mark: Mark | None = None) -> tuple[ModelOutput, ModelOutput | None]:
        """Teacher forward (no grad) then student forward, on the batch's images.

        A batch with a strong view (:attr:`Batch.strong`, for methods such as MLKD) runs each
        model on it too, in a separate call after the weak one (as the official MLKD code does,
        so BatchNorm sees each view's own statistics); those outputs are ``out.views["strong"]``.
        """
        strong = batch.strong
        out_t = None
        if teacher is not None:
            with torch.no_grad():
                out_t = teacher(batch.images)
                if strong is not None:
                    out_t.views["strong"] = teacher(strong)
        if mark is not None:
            mark("teacher_fwd")
        out_s = student(batch.images)
        if strong is not None:
            out_s.views["strong"] = student(strong)
        if mark is not None:
            mark("student_fwd")
        return out_s, out_t

    def train_meter(self, device: torch.device) -> AccuracyMeter:
        """Training top-1 of one epoch."""
        return AccuracyMeter(device)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch], device: torch.device,
                 amp_dtype: torch.dtype | None, dist: DistInfo | None = None
                 ) -> dict[str, float]:
        """Top-1 / top-5 (%) and mean cross-entropy
        (:func:`kdlab.tasks.classification.evaluate.evaluate`)."""
        return evaluate(model, batches, device, amp_dtype, dist)

    def evaluate_regions(self, model: nn.Module, batches: Iterable[Batch], device: torch.device,
                         scales: Sequence[int], amp_dtype: torch.dtype | None
                         ) -> dict[str, float]:
        """Top-1 and agreement of SDD's local logits per scale
        (:func:`kdlab.tasks.classification.regions.region_accuracy`)."""
        if not isinstance(model, KdModel):
            raise ConfigError("kdlab eval --regions needs a kdlab classifier (a KdModel)")
        return region_accuracy(model, batches, device, scales, amp_dtype)
