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

Under torchrun each rank's pixel terms are means over ITS labelled pixels, which DDP averages; a
rank's labelled-pixel count varies with its crops' padding, so the student's pixel rows and
auxiliary logits pass through :class:`_ScaleGrad`, which multiplies their gradient by the rank's
share ``W n_r / N`` (``n_r`` its labelled pixels, ``N`` the global batch's, ``W`` ranks): the
averaged gradient of every row-mean term is then exactly that of the mean over the global
batch's labelled pixels, as one process would compute it (the logged values stay per-rank).

Evaluation builds the ``K x K`` confusion matrix of the split (summed over the ranks under
torchrun) and reports mIoU (deciding the best epoch), pixel accuracy, mean class accuracy and
per-class IoU (:mod:`kdlab.tasks.segmentation.metrics`). The training metric is the pixel
accuracy of the training crops.

Supported methods: vanilla, kd, dkd, nkd, dckd, dist, cwd (logit maps or the heads'
``feature_map``), sd_map. Partners: fitnet, at and reviewkd (``embedding_level: false``) on the
backbone's stage maps ``features`` (the pixel view keeps them whole). FitNet's hint
``features[hint_layer]`` of the student is resized to the spatial size of the teacher's hint
(:func:`align_hints`: adaptive average pooling when larger, bilinear when smaller) in the probes
and in every step, so its regressor is a 1x1 convolution whatever the crop size and the two
output strides (RepDistiller's size-dependent regressor kernels would be sized on the probe's
image size); AT pools the larger map of a pair to the smaller itself, ReviewKD resizes in its
fusions. The partners that relate whole images through image-level vectors (rkd, sp, pkt, crd)
are refused with one line; docs/segmentation.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.config import (
    SEGMENTATION_DATASETS,
    DataConfig,
    ExperimentConfig,
    MethodConfig,
    SegmentationConfig,
)
from kdlab.core.distributed import DistInfo, all_reduce_sum
from kdlab.core.errors import ConfigError
from kdlab.data.batch import Batch
from kdlab.losses.dense import pixels_as_rows
from kdlab.methods.base import DistillContext
from kdlab.methods.compose import build_params
from kdlab.methods.feature import FitNetParams, resize_to_grid
from kdlab.methods.reviewkd import ReviewKDParams
from kdlab.models import load_pretrained
from kdlab.models.output import KdModel, ModelOutput
from kdlab.tasks.base import Mark, Metric, Task, register_task
from kdlab.tasks.segmentation.data import SegmentationData, build_segmentation_data
from kdlab.tasks.segmentation.evaluation import evaluate_segmentation
from kdlab.tasks.segmentation.model import SegmentationOutput, build_segmenter

__all__ = ["SEGMENTATION_METHODS", "SEGMENTATION_PARTNERS", "PixelAccuracyMeter",
           "SegmentationTask", "align_hints", "hint_pairs", "pixel_view", "scale_grad"]

#: logit methods that distil pixel logits (they read only logits and labels).
SEGMENTATION_METHODS = ("vanilla", "kd", "dkd", "nkd", "dckd", "dist", "cwd", "sd_map")
#: partners that work unchanged on the backbone's ``B x C x H x W`` stage maps.
SEGMENTATION_PARTNERS = ("fitnet", "at", "reviewkd")
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
                       preact_features=list(out.preact_features), dense_logits=out.logits,
                       pixel_mask=keep)


class _ScaleGrad(torch.autograd.Function):
    """The identity whose backward multiplies the incoming gradient by a scale tensor."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale.to(grad.dtype), None


def scale_grad(x: Tensor, scale: Tensor | None) -> Tensor:
    """``x`` whose gradient is multiplied by ``scale`` (``x`` itself when ``scale`` is None)."""
    return x if scale is None else _ScaleGrad.apply(x, scale)  # type: ignore[no-any-return]


def hint_pairs(method: MethodConfig) -> dict[int, int]:
    """``{student hint index: teacher hint index}`` of the configured FitNet partners
    (``teacher_hint_layer``, or ``hint_layer`` when null: RepDistiller's rule for two CNNs);
    a one-line :class:`ConfigError` for invalid FitNet parameters or two FitNet partners that
    pair one student stage with two teacher stages (one resize per stage)."""
    pairs: dict[int, int] = {}
    for i, partner in enumerate(method.partners):
        if partner.name != "fitnet":
            continue
        key = f"method.partners.{i}.params"
        p = cast(FitNetParams, build_params("fitnet", partner.params, key))
        t = p.hint_layer if p.teacher_hint_layer is None else p.teacher_hint_layer
        if pairs.setdefault(p.hint_layer, t) != t:
            raise ConfigError(f"config key '{key}.teacher_hint_layer': on segmentation the "
                              f"student's features[{p.hint_layer}] can be hinted by one teacher "
                              "stage only; give the FitNet partners different hint_layer values")
    return pairs


def _check_reviewkd(method: MethodConfig) -> None:
    """ReviewKD partners must review the stage maps only (no pooled image-level vector)."""
    for i, partner in enumerate(method.partners):
        if partner.name != "reviewkd":
            continue
        key = f"method.partners.{i}.params"
        if cast(ReviewKDParams, build_params("reviewkd", partner.params, key)).embedding_level:
            raise ConfigError(f"config key '{key}.embedding_level': reviewkd on segmentation "
                              "reviews the backbone's stage maps only; set it to false")


def align_hints(out_s: ModelOutput, out_t: ModelOutput, pairs: dict[int, int]) -> ModelOutput:
    """``out_s`` with each hinted stage ``features[i]`` resized to the spatial size of the
    teacher's ``features[pairs[i]]`` (:func:`~kdlab.methods.feature.resize_to_grid`: adaptive
    average pooling when it is larger, bilinear interpolation when smaller; unchanged when the
    sizes match), so that FitNet (Romero et al., ICLR 2015) compares maps of one size and its
    regressor is a 1x1 convolution at any crop size. Indices beyond either model's features
    are left for FitNet to refuse."""
    feats = list(out_s.features)
    for i, j in pairs.items():
        if i < len(feats) and j < len(out_t.features) and feats[i].dim() == 4 \
                and out_t.features[j].dim() == 4:
            feats[i] = resize_to_grid(feats[i], out_t.features[j].shape[-2:])
    return dataclasses.replace(out_s, features=feats)


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
    supported_partners = SEGMENTATION_PARTNERS
    unsupported_partner_reason = (" (it relates whole images through image-level vectors; "
                                  "partners here work on the backbone's stage maps)")

    def __init__(self) -> None:
        self.seg = SegmentationConfig()
        #: FitNet's ``{student hint: teacher hint}`` indices (:func:`align_hints`).
        self.hints: dict[int, int] = {}
        #: the ranks of the training loaders (:meth:`build_data`).
        self.dist = DistInfo()
        self._share: tuple[Tensor, Tensor] | None = None

    def configure(self, cfg: ExperimentConfig) -> None:
        """The segmentation settings, the method and partner checks, the FitNet hint pairs,
        and (DOT with an auxiliary head) that ``aux_ce`` is a task term."""
        self.seg = cfg.segmentation or SegmentationConfig()
        self.check_method(cfg)
        _check_reviewkd(cfg.method)
        self.hints = hint_pairs(cfg.method)
        if cfg.optim.name == "dot" and self.seg.for_arch(cfg.student.arch).aux_head:
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
        self.dist = DistInfo(rank=rank, world_size=world_size)
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
        """Pixel-view probes of both models (rows of ``K`` logits; the student's FitNet hints
        resized to the teacher's, :func:`align_hints`), the class count; no image-level
        labels."""
        probe_s = pixel_view(student.probe(_PROBE), None)
        probe_t = None if teacher is None else pixel_view(teacher.probe(_PROBE), None)
        if probe_t is not None:
            probe_s = align_hints(probe_s, probe_t, self.hints)
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
            aux = scale_grad(out_s.aux_logits, self.pixel_share(batch.labels))
            out_s.task_losses["aux_ce"] = self.seg.aux_weight * F.cross_entropy(
                aux.float(), batch.labels, ignore_index=self.seg.ignore_index)
        if mark is not None:
            mark("student_fwd")
        return out_s, out_t

    def distill_inputs(self, out_s: SegmentationOutput, out_t: SegmentationOutput | None,
                       batch: Batch) -> tuple[ModelOutput, ModelOutput | None, Batch]:
        """The pixel view: the labelled pixels' logit rows of both models and a Batch of their
        labels (``index`` numbers the rows); the student's FitNet hints resized to the
        teacher's (:func:`align_hints`) and, under torchrun, its rows' gradient scaled by the
        rank's share (:meth:`pixel_share`)."""
        labels = batch.labels.reshape(-1)
        keep = labels != self.seg.ignore_index
        kept = labels[keep]
        rows = Batch(batch.images, kept, torch.arange(kept.shape[0], device=kept.device))
        view_s = pixel_view(out_s, keep)
        share = self.pixel_share(batch.labels)
        if share is not None:
            view_s = dataclasses.replace(view_s, logits=scale_grad(view_s.logits, share))
        if out_t is None:
            return view_s, None, rows
        view_t = pixel_view(out_t, keep)
        return align_hints(view_s, view_t, self.hints), view_t, rows

    def pixel_share(self, labels: Tensor) -> Tensor | None:
        """This rank's gradient share ``W n_r / N`` of a training batch's ``labels`` under
        torchrun (module docstring; one all-reduce per batch, kept for the batch's second
        call), None for one process or without gradients (evaluation)."""
        if not self.dist.enabled or not torch.is_grad_enabled():
            return None
        if self._share is not None and self._share[0] is labels:
            return self._share[1]
        local = (labels != self.seg.ignore_index).sum()
        total = all_reduce_sum(local.clone(), self.dist).clamp(min=1)
        share = (self.dist.world_size * local.double() / total.double()).float()
        self._share = (labels, share)
        return share

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
