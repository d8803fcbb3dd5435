"""Object detection: Faster R-CNN with FPN on COCO-format data, scored by COCO mAP.

A batch is :class:`~kdlab.tasks.detection.data.DetectionBatch` (images and box targets); the
models are :class:`~kdlab.tasks.detection.model.Detector` (torchvision's Faster R-CNN around a
kdlab backbone); the
training pass (:func:`kdlab.tasks.detection.model.roi_forward`) gives the detector's RPN and
box-regression losses as task terms (weight 1) and, for the method, the (K+1)-way class logits of
the student's sampled RoIs with their labels and the teacher's logits on the same RoIs. So the
registered logit methods distil RoI logits with the same loss functions as classification (the DKD
detection recipe, Zhao et al., CVPR 2022), and their ``ce`` term IS Faster R-CNN's RoI
classification loss. Evaluation is COCO mAP through pycocotools (AP decides the best epoch).

Supported methods: vanilla, kd, dkd, nkd, dckd, sd_kd, sd_dkd, sd_nkd, dist, ttm, wttm, with the
partners fitnet, at and reviewkd on the FPN levels. The image-level relation partners (rkd, sp,
pkt, crd) and MLKD's two views are refused with a clear error; see docs/detection.md.

Under torchrun the loaders shard by rank (:mod:`kdlab.tasks.detection.data`), the student's
training pass runs through its DDP wrapper (so gradients are averaged over the ranks), the RoI
accuracy counts are summed over the ranks, and evaluation gathers every rank's detections on
rank 0, which runs COCOeval once and shares the metrics with the other ranks
(docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdlab.config import DETECTION_DATASETS, DataConfig, DetectionConfig, ExperimentConfig
from kdlab.core.distributed import DistInfo, all_reduce_sum, broadcast_object, gather_objects
from kdlab.core.errors import ConfigError, DatasetError, KdlabError
from kdlab.methods.base import Batch, DistillContext
from kdlab.models import load_pretrained
from kdlab.models.output import KdModel
from kdlab.tasks.base import Mark, Metric, Task, register_task
from kdlab.tasks.detection.data import build_detection_data
from kdlab.tasks.detection.evaluation import METRIC_NAMES, coco_metrics
from kdlab.tasks.detection.model import build_detector, probe_output, roi_forward
from kdlab.tasks.detection.predict import predict_coco

log = logging.getLogger(__name__)

__all__ = ["DETECTION_METHODS", "DETECTION_PARTNERS", "DETECTOR_TERMS", "DetectionTask",
           "RoIAccuracyMeter"]

#: logit methods that distil RoI logits (they read only logits and labels, or SDD's regions).
DETECTION_METHODS = ("vanilla", "kd", "dkd", "nkd", "dckd", "sd_kd", "sd_dkd", "sd_nkd", "dist",
                     "ttm", "wttm")
#: the detector's task terms: the RoI classification loss (the method's ``ce``) and
#: :meth:`DetectionTask.task_terms`.
DETECTOR_TERMS = ("ce", "rpn_objectness", "rpn_box_reg", "roi_box_reg")
#: partners that work on the FPN levels (``features[1:]``).
DETECTION_PARTNERS = ("fitnet", "at", "reviewkd")


def _unwrap(model: nn.Module) -> Any:
    """The detector inside a DDP or torch.compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _ddp(model: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper of ``model`` (also inside a torch.compile wrapper), or None."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


@contextlib.contextmanager
def _forward_is(module: nn.Module, forward: Any) -> Iterator[None]:
    """During the block ``module(...)`` runs ``forward`` (an instance attribute shadowing the
    class's ``forward``), so that a DDP wrapper around ``module`` runs the RoI training pass
    with its gradient-synchronisation hooks."""
    module.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.forward


class RoIAccuracyMeter:
    """Training accuracy of the RoI classifier (K+1 classes, background included) over an
    epoch, counted on the device; ``samples`` counts images (for images/s)."""

    def __init__(self, device: torch.device) -> None:
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.rois = 0
        self._samples = 0

    def update(self, output: Any, batch: Any) -> None:
        """Count the batch's correctly classified RoIs (no host synchronisation)."""
        self.correct += output.roi.logits.detach().argmax(dim=1).eq(output.labels).sum()
        self.rois += int(output.labels.shape[0])
        self._samples += len(batch.images)

    def reduce(self, dist: DistInfo) -> None:
        """Global counts (correct RoIs, RoIs, images) over the ranks."""
        if not dist.enabled:
            return
        device = self.correct.device
        counts = all_reduce_sum(torch.stack([
            self.correct, torch.tensor(self.rois, device=device),
            torch.tensor(self._samples, device=device)]), dist)
        self.correct, self.rois, self._samples = counts[0], int(counts[1]), int(counts[2])

    @property
    def samples(self) -> int:
        """Images seen so far."""
        return self._samples

    def accuracy(self) -> float:
        """RoI classification accuracy in % (synchronises the host)."""
        return 100.0 * float(self.correct) / max(self.rois, 1)

    def progress(self) -> dict[str, float]:
        """``{"roi_acc": %}`` for the progress bar."""
        return {"roi_acc": self.accuracy()}

    def summary(self) -> dict[str, float]:
        """``{"train_roi_acc": %}``."""
        return {"train_roi_acc": self.accuracy()}

    def state_dict(self) -> dict[str, Any]:
        """Counts so far."""
        return {"correct": self.correct.cpu(), "rois": self.rois, "samples": self._samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`."""
        self.correct = state["correct"].to(self.correct.device)
        self.rois, self._samples = int(state["rois"]), int(state["samples"])


@register_task
class DetectionTask(Task[Any, Any, Any]):
    """Faster R-CNN FPN detection with RoI-logit distillation (see the module docstring)."""

    name = "detection"
    metrics = tuple(Metric(name, name) for name in METRIC_NAMES)
    best_metric = "AP"
    train_metric = Metric("roi_acc", "RoI acc")
    report_metrics = ("AP", "AP50", "AP75")
    metric_note = ("Task: detection. AP = COCO box mAP over IoU 0.50:0.95 (pycocotools, at most "
                   "100 detections per image), AP50 / AP75 at IoU 0.50 / 0.75, all in %; the "
                   "statistics are those of top-1 in classification tables (best-on-test, "
                   "last-epoch, at best-val epoch).")
    config_section = "detection"
    data_sets = DETECTION_DATASETS
    data_description = "COCO-format data"
    supported_methods = DETECTION_METHODS
    supported_partners = DETECTION_PARTNERS
    unsupported_partner_reason = " (it relates whole images; partners here work on the FPN levels)"
    #: under torchrun the student's DDP wrapper looks for unused parameters each step: the
    #: backbone body's last stage and classifier take no part in the RoI training pass.
    ddp_find_unused_parameters = True

    def __init__(self) -> None:
        self.detection = DetectionConfig()
        self.last_detections: list[dict[str, Any]] | None = None

    def configure(self, cfg: ExperimentConfig) -> None:
        """The detector settings, a check that the method and partners apply to RoIs, and
        that DOT treats the detector's own losses as task terms."""
        self.detection = cfg.detection or DetectionConfig()
        self.check_method(cfg)
        if cfg.optim.name == "dot":
            terms = set(cfg.optim.args.get("task_terms", ["ce"]))
            missing = sorted(set(DETECTOR_TERMS) - terms)
            if missing:
                raise ConfigError("config key 'optim.args.task_terms': with DOT on detection the "
                                  f"detector's own losses are task terms too; add {missing} "
                                  f"(e.g. task_terms: {list(DETECTOR_TERMS)})")

    def dataset_label(self, cfg: DataConfig) -> str:
        """``coco:<folder>`` (e.g. ``coco:fm-detection``): every COCO-format set is ``coco``."""
        return f"{cfg.name}:{Path(cfg.root or '.').resolve().name}"

    def build_data(self, cfg: DataConfig, *, seed: int, device: torch.device,
                   channels_last: bool, rank: int, world_size: int) -> Any:
        """Loaders of the COCO-format dataset at ``data.root``, sharded for ``rank`` of
        ``world_size`` processes (:func:`kdlab.tasks.detection.data.build_detection_data`)."""
        data = build_detection_data(cfg, self.detection, seed=seed, device=device, rank=rank,
                                    world_size=world_size)
        data.dataset_label = self.dataset_label(cfg)
        return data

    def create_model(self, arch: str, data: Any) -> KdModel:
        """Faster R-CNN FPN with backbone ``arch`` for the dataset's classes."""
        return build_detector(arch, data.num_classes, data.detection)  # type: ignore[return-value]

    def model_from_checkpoint(self, arch: str, state: dict[str, Any]) -> KdModel | None:
        """The detector sized by the checkpoint's ``num_classes`` (no data set needed)."""
        classes = self.recorded_classes(state)
        if classes is None:
            return None
        return build_detector(arch, classes, self.detection)  # type: ignore[return-value]

    def load_pretrained(self, model: nn.Module) -> None:
        """The backbone's library weights (``torchvision:``/``timm:`` archs)."""
        load_pretrained(model.backbone.body)  # type: ignore[union-attr, arg-type]

    def distill_context(self, student: KdModel, teacher: KdModel | None, data: Any
                        ) -> DistillContext:
        """RoI-level probes of both detectors (K+1 classes; no image-level labels)."""
        size = data.detection.min_size
        return DistillContext(
            student=student, teacher=teacher,
            student_probe=probe_output(student, size),
            teacher_probe=None if teacher is None else probe_output(teacher, size),
            num_classes=data.num_classes + 1, train_labels=data.train_labels, input_size=size)

    def forward(self, student: nn.Module, teacher: nn.Module | None, batch: Any,
                mark: Mark | None = None) -> tuple[Any, Any]:
        """:func:`kdlab.tasks.detection.model.roi_forward` (the teacher on the student's RoIs).

        A student in DDP (torchrun) runs the pass through its wrapper, so that its gradients
        are averaged over the ranks in the backward pass."""
        detector = _unwrap(student)
        t = None if teacher is None else _unwrap(teacher)
        wrapper = _ddp(student)
        if wrapper is None:
            out_s, out_t = roi_forward(detector, t, batch.images, batch.targets)
        else:
            with _forward_is(detector, lambda images, targets: roi_forward(
                    detector, t, images, targets)):
                out_s, out_t = wrapper(batch.images, batch.targets)
        if mark is not None:
            mark("student_fwd")
        return out_s, out_t

    def distill_inputs(self, out_s: Any, out_t: Any, batch: Any) -> tuple[Any, Any, Any]:
        """The RoI view: RoI outputs and a Batch of the RoIs' labels (0 = background)."""
        labels = out_s.labels
        rois = Batch(out_s.roi.feature_map, labels,
                     torch.arange(labels.shape[0], device=labels.device))
        return out_s.roi, None if out_t is None else out_t.roi, rois

    def task_terms(self, out_s: Any) -> dict[str, torch.Tensor]:
        """Faster R-CNN's RPN objectness, RPN box and RoI box losses (weight 1)."""
        return dict(out_s.losses)

    def train_meter(self, device: torch.device) -> RoIAccuracyMeter:
        """RoI classification accuracy of one epoch."""
        return RoIAccuracyMeter(device)

    def evaluate(self, model: nn.Module, batches: Iterable[Any], device: torch.device,
                 amp_dtype: torch.dtype | None, dist: DistInfo | None = None
                 ) -> dict[str, float]:
        """COCO box AP, AP50, AP75, APs/m/l and AR1/10/100 (%), pycocotools' COCOeval.

        In a distributed run (``dist`` enabled) every rank predicts its block of the split; the
        detections are gathered on rank 0 in rank order (the single-process order), rank 0 runs
        COCOeval once over all of them, and every rank returns rank 0's metrics: the same
        numbers as a one-process evaluation of the same weights. A collective then: every rank
        must call it."""
        detections = predict_coco(model, batches, device, amp_dtype)
        dataset = batches.dataset  # type: ignore[attr-defined]
        if dist is not None and dist.enabled:
            shards = gather_objects(detections, dist)
            if shards is not None:  # rank 0: every rank's, in rank (= single-process) order
                detections = [d for shard in shards for d in shard]  # type: ignore[attr-defined]
            result: tuple[Any, str | None] = (None, None)
            if dist.is_main:  # its error reaches every rank (none waits for it in vain)
                try:
                    result = (coco_metrics(dataset.annotation_file, detections), None)
                except KdlabError as e:
                    result = (None, f"{type(e).__name__}: {e}")
            metrics, error = broadcast_object(result, dist)  # type: ignore[misc]
            if error is not None:
                raise DatasetError(f"COCO evaluation on rank 0 failed: {error}")
        else:
            metrics = coco_metrics(dataset.annotation_file, detections)  # type: ignore[assignment]
        #: the last evaluation's detections, all ranks' on rank 0 and the rank's own elsewhere
        #: (``kdlab eval`` writes them as detections.json)
        self.last_detections = detections
        metrics["count"] = float(len(dataset))
        return dict(metrics)
