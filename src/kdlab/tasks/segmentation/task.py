"""Semantic segmentation: a kdlab backbone with a torchvision head, scored by mIoU.

A training batch is :class:`kdlab.data.batch.Batch` whose ``labels`` are ``B x H x W`` label
maps (:mod:`kdlab.tasks.segmentation.data`); the models are
:class:`~kdlab.tasks.segmentation.model.SegmentationModel`, whose ``logits`` are ``B x K x H x W``
at the input resolution. The methods see the per-pixel view (:meth:`SegmentationTask.
distill_inputs`): every labelled pixel is one row of ``K`` logits with its label, pixels labelled
``ignore_index`` left out, so the registered logit methods distil pixel logits with the same loss
functions as classification (pixel-wise KD: Liu et al., "Structured Knowledge Distillation for
Semantic Segmentation", CVPR 2019; DIST's segmentation code also treats every pixel as a
sample). The method's ``ce`` term is then exactly the pixel cross-entropy with ``ignore_index``
(the mean over the labelled pixels, as ``F.cross_entropy(..., ignore_index=255)``); the
auxiliary head's cross-entropy, weighted by ``aux_weight``, is the task term ``aux_ce``.

Evaluation builds the ``K x K`` confusion matrix of the split (summed over the ranks under
torchrun) and reports mIoU (deciding the best epoch), pixel accuracy, mean class accuracy and
per-class IoU (:mod:`kdlab.tasks.segmentation.metrics`). The training metric is the pixel
accuracy of the training crops.

Supported methods: vanilla, kd, dkd, nkd, dckd, dist; partners: none yet (the feature partners'
image-level shapes do not apply unchanged); docs/segmentation.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import (
    SEGMENTATION_DATASETS,
    DataConfig,
    ExperimentConfig,
    SegmentationConfig,
)
from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.core.errors import ConfigError
from kdlab.data.batch import Batch
from kdlab.losses.dense import pixels_as_rows
from kdlab.methods.base import DistillContext
from kdlab.models import load_pretrained
from kdlab.models.output import KdModel, ModelOutput
from kdlab.tasks.base import Mark, Metric, Task, register_task
from kdlab.tasks.segmentation.data import SegmentationData, build_segmentation_data
from kdlab.tasks.segmentation.evaluation import evaluate_segmentation
from kdlab.tasks.segmentation.model import SegmentationOutput, build_segmenter

__all__ = ["SEGMENTATION_METHODS", "PixelAccuracyMeter", "SegmentationTask", "pixel_view"]

#: logit methods that distil pixel logits (they read only logits and labels).
SEGMENTATION_METHODS = ("vanilla", "kd", "dkd", "nkd", "dckd", "dist", "cwd", "sd_map")
#: the probe side of the methods' context (pixel rows of a small image suffice).
_PROBE = 32


def pixel_view(out: ModelOutput, keep: Tensor | None) -> ModelOutput:
    """``out`` with ``logits`` as pixel rows ``(B H W) x K`` (b, h, w order,
    :func:`kdlab.losses.dense.pixels_as_rows`), only the rows where ``keep`` (flat bool) holds;
    ``feature_map`` and ``features`` are the model's own; ``dense_logits`` / ``pixel_mask`` keep
    the map and which of its pixels the rows are, for the methods on maps (CWD, SDD)."""
    rows = pixels_as_rows(out.logits)
    if keep is not None:
        rows = rows[keep]
    return ModelOutput(logits=rows, feature_map=out.feature_map, features=list(out.features),
                       dense_logits=out.logits, pixel_mask=keep)


class PixelAccuracyMeter:
    """Training pixel accuracy of one epoch (labelled pixels only), counted on the device;
    ``samples`` counts images (for images/s)."""

    def __init__(self, device: torch.device, ignore_index: int = 255) -> None:
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.pixels = torch.zeros((), dtype=torch.long, device=device)
        self.ignore_index = ignore_index
        self._samples = 0

    def update(self, output: Any, batch: Any) -> None:
        """Count the batch's correctly classified labelled pixels (no host synchronisation)."""
        labels = batch.labels
        valid = labels != self.ignore_index
        pred = output.logits.detach().argmax(dim=1)
        self.correct += (pred.eq(labels) & valid).sum()
        self.pixels += valid.sum()
        self._samples += int(labels.shape[0])

    def reduce(self, dist: DistInfo) -> None:
        """Global counts over the ranks."""
        if not dist.enabled:
            return
        counts = all_reduce_sum(torch.stack([
            self.correct, self.pixels, torch.tensor(self._samples, device=self.correct.device)]),
            dist)
        self.correct, self.pixels, self._samples = counts[0], counts[1], int(counts[2])

    @property
    def samples(self) -> int:
        """Images seen so far."""
        return self._samples

    def accuracy(self) -> float:
        """Pixel accuracy in % (synchronises the host)."""
        return 100.0 * float(self.correct) / max(int(self.pixels), 1)

    def progress(self) -> dict[str, float]:
        """``{"pix_acc": %}`` for the progress bar."""
        return {"pix_acc": self.accuracy()}

    def summary(self) -> dict[str, float]:
        """``{"train_pixel_acc": %}``."""
        return {"train_pixel_acc": self.accuracy()}

    def state_dict(self) -> dict[str, Any]:
        """Counts so far."""
        return {"correct": self.correct.cpu(), "pixels": self.pixels.cpu(),
                "samples": self._samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.correct = state["correct"].to(self.correct.device)
        self.pixels = state["pixels"].to(self.pixels.device)
        self._samples = int(state["samples"])


@register_task
class SegmentationTask(Task[SegmentationData, Batch, SegmentationOutput]):
    """Semantic segmentation with pixel-logit distillation (see the module docstring)."""

    name = "segmentation"
    metrics = (Metric("mIoU", "mIoU"), Metric("pixel_acc", "pixel acc"), Metric("mAcc", "mAcc"))
    best_metric = "mIoU"
    train_metric = Metric("pixel_acc", "pixel acc")
    report_metrics = ("mIoU", "pixel_acc", "mAcc")
    metric_note = ("Task: segmentation. mIoU = mean over classes of the intersection over union "
                   "of the split's confusion matrix (classes with an empty union left out), "
                   "pixel acc = correct labelled pixels, mAcc = mean class accuracy, all in %; "
                   "pixels labelled ignore_index are not scored.")
    config_section = "segmentation"
    data_sets = SEGMENTATION_DATASETS
    data_description = "semantic segmentation data"
    supported_methods = SEGMENTATION_METHODS
    supported_partners: tuple[str, ...] = ()
    unsupported_partner_reason = " (no feature partner is adapted to segmentation maps yet)"

    def __init__(self) -> None:
        self.seg = SegmentationConfig()

    def configure(self, cfg: ExperimentConfig) -> None:
        """The segmentation settings, the method check, and (DOT with an auxiliary head) that
        ``aux_ce`` is a task term."""
        self.seg = cfg.segmentation or SegmentationConfig()
        self.check_method(cfg)
        if cfg.optim.name == "dot" and self.seg.aux_head:
            terms = set(cfg.optim.args.get("task_terms", ["ce"]))
            if "aux_ce" not in terms:
                raise ConfigError("config key 'optim.args.task_terms': with DOT and an auxiliary "
                                  "head, aux_ce is a task term too; add it (e.g. task_terms: "
                                  "[ce, aux_ce])")

    def build_data(self, cfg: DataConfig, *, seed: int, device: torch.device,
                   channels_last: bool, rank: int, world_size: int) -> SegmentationData:
        """Loaders of the segmentation set ``data.name`` at ``data.root``
        (:func:`kdlab.tasks.segmentation.data.build_segmentation_data`)."""
        data = build_segmentation_data(cfg, self.seg, seed=seed, device=device, rank=rank,
                                       world_size=world_size, channels_last=channels_last)
        data.dataset_label = self.dataset_label(cfg)
        return data

    def create_model(self, arch: str, data: SegmentationData) -> KdModel:
        """Backbone ``arch`` with the configured head for the dataset's classes."""
        return build_segmenter(arch, data.num_classes, self.seg, data.in_channels)

    def model_from_checkpoint(self, arch: str, state: dict[str, Any]) -> KdModel | None:
        """The segmentation model sized by the checkpoint's ``num_classes``."""
        classes = self.recorded_classes(state)
        if classes is None:
            return None
        return build_segmenter(arch, classes, self.seg, int(state.get("in_channels", 3)))

    def load_pretrained(self, model: nn.Module) -> None:
        """The backbone's library weights (``torchvision:``/``timm:`` archs)."""
        load_pretrained(model.backbone)  # type: ignore[arg-type]

    def distill_context(self, student: KdModel, teacher: KdModel | None,
                        data: SegmentationData) -> DistillContext:
        """Pixel-view probes of both models (rows of ``K`` logits), the class count; no
        image-level labels."""
        probe_s = pixel_view(student.probe(_PROBE), None)
        probe_t = None if teacher is None else pixel_view(teacher.probe(_PROBE), None)
        return DistillContext(student=student, teacher=teacher, student_probe=probe_s,
                              teacher_probe=probe_t, num_classes=data.num_classes,
                              train_labels=data.train_labels, input_size=_PROBE)

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Batch,
                mark: Mark | None = None) -> tuple[SegmentationOutput, SegmentationOutput | None]:
        """Teacher forward (no gradients), then the student's; the auxiliary head's weighted
        cross-entropy is computed here, where the labels are (:meth:`task_terms`)."""
        out_t = None
        if teacher is not None:
            with torch.no_grad():
                out_t = teacher(batch.images)
        if mark is not None:
            mark("teacher_fwd")
        out_s = student(batch.images)
        if out_s.aux_logits is not None:
            out_s.task_losses["aux_ce"] = self.seg.aux_weight * F.cross_entropy(
                out_s.aux_logits.float(), batch.labels, ignore_index=self.seg.ignore_index)
        if mark is not None:
            mark("student_fwd")
        return out_s, out_t

    def distill_inputs(self, out_s: SegmentationOutput, out_t: SegmentationOutput | None,
                       batch: Batch) -> tuple[ModelOutput, ModelOutput | None, Batch]:
        """The pixel view: the labelled pixels' logit rows of both models and a Batch of their
        labels (``index`` numbers the rows)."""
        labels = batch.labels.reshape(-1)
        keep = labels != self.seg.ignore_index
        kept = labels[keep]
        rows = Batch(batch.images, kept, torch.arange(kept.shape[0], device=kept.device))
        return (pixel_view(out_s, keep), None if out_t is None else pixel_view(out_t, keep),
                rows)

    def task_terms(self, out_s: SegmentationOutput) -> dict[str, Tensor]:
        """``{"aux_ce": aux_weight * CE(aux logits)}`` with an auxiliary head, else none (the
        main cross-entropy is the method's ``ce`` on the pixel view)."""
        return dict(out_s.task_losses)

    def train_meter(self, device: torch.device) -> PixelAccuracyMeter:
        """Pixel accuracy of one epoch's training crops."""
        return PixelAccuracyMeter(device, self.seg.ignore_index)

    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device,
                 amp_dtype: torch.dtype | None, dist: DistInfo | None = None
                 ) -> dict[str, float]:
        """mIoU, pixel accuracy, mAcc and per-class ``IoU_<k>`` (%), global over the ranks
        (:func:`kdlab.tasks.segmentation.evaluation.evaluate_segmentation`)."""
        num_classes = int(getattr(_unwrap(model), "num_classes"))  # noqa: B009
        scores, _ = evaluate_segmentation(model, batches, device, self.seg, num_classes,
                                          amp_dtype, dist)
        return scores


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP or torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)  # type: ignore[no-any-return]
