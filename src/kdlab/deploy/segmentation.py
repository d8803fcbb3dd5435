"""Deployment artefacts of a segmentation run's student (``kdlab export`` on a ``task:
segmentation`` run), each checked against the eager model on the run's test split.

The student of a segmentation run is :class:`~kdlab.tasks.segmentation.model.SegmentationModel`:
a kdlab backbone with torchvision's DeepLabV3, FCN or LR-ASPP head. Every artefact holds the
whole network as ``images -> logits``:

* **input** ``images``: float32 ``B x 3 x H x W``, RGB normalised ``(pixel / 255 - mean) / std``
  with the run's ``segmentation.image_mean`` / ``image_std`` (the metadata's ``input``); any
  batch size and, where the exporter allows it, any ``H x W`` of at least ``min_height x
  min_width`` (the metadata's ``input``; measured at export time by ``torch.export``);
* **output** ``logits``: float32 ``B x K x H x W``, bilinearly upsampled to the input size
  inside the graph (torchvision's ``_SimpleSegmentationModel`` convention); channel ``k`` is
  class ``classes[k]`` of the metadata, the prediction is the argmax over dimension 1.

==============  ==================  =========================================================
format          default file        how it is made / read back
==============  ==================  =========================================================
``state_dict``  ``student.pt``      :func:`save_segmenter`: weights + ``arch``, ``num_classes``,
                                    ``in_channels``, the class names and the run's
                                    ``segmentation`` section, no pickled code;
                                    :func:`read_segmenter` rebuilds the model from it
``torchscript`` ``student.ts``      ``torch.jit.trace``; ``torch.jit.load``
``exported``    ``student.pt2``     ``torch.export.export`` with a dynamic batch, height and
                                    width; ``torch.export.load``
``onnx``        ``student.onnx``    ``torch.onnx.export(..., dynamo=True)`` with the same
                                    dynamic axes; onnxruntime
==============  ==================  =========================================================

Refused, each in one line naming the formats that work: ``--int8`` (kdlab's int8 paths
calibrate and bound classifiers) and ``--format hub`` (the hub folder holds classifiers).

**Parity check** (:func:`check_segmenter_parity`): the artefact is read back from disk and run
over the whole test split beside the eager student, with the run's inference (whole images or
sliding windows, :func:`~kdlab.tasks.segmentation.evaluation.predict_logits`). Reported: the max
|logit difference| over every pixel and class, the pixel agreement of the argmax maps (%), and
the test mIoU, pixel accuracy and per-class IoU of both, scored by the evaluation's own
confusion-matrix code (:func:`~kdlab.tasks.segmentation.evaluation.label_confusion`). A probe
batch of another batch size and image size checks the dynamic axes. It fails
(:class:`~kdlab.deploy.export.ParityError`, after ``FILE.parity.json`` is written) when the
difference exceeds ``tolerance`` (default :data:`~kdlab.deploy.export.DEFAULT_TOLERANCE`), the
pixel agreement is below ``min_agreement`` (default
:data:`~kdlab.deploy.export.DEFAULT_MIN_AGREEMENT` %), or an output has the wrong shape or a
non-finite value.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from kdlab.config import SegmentationConfig
from kdlab.core.errors import CheckpointError
from kdlab.core.io import atomic_write
from kdlab.deploy import export as ex
from kdlab.runs.open import open_run
from kdlab.runs.student import read_student_file
from kdlab.tasks.segmentation.evaluation import label_confusion, named_class_iou, predict_logits
from kdlab.tasks.segmentation.metrics import segmentation_scores
from kdlab.tasks.segmentation.model import SegmentationModel

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "TASK",
    "check_segmenter_parity",
    "export_segmenter",
    "export_summary",
    "image_dims",
    "is_segmentation_run",
    "load_segmenter_artefact",
    "load_segmenter_run",
    "probe_shapes",
    "read_segmenter",
    "refuse_request",
    "save_segmenter",
    "save_segmenter_exported",
    "save_segmenter_onnx",
    "segmenter_metadata",
    "traceable_segmenter",
]

#: the task whose runs this module exports.
TASK = "segmentation"
#: the formats a segmentation student is exported to, in the CLI's order.
FORMATS = ("state_dict", "torchscript", "exported", "onnx")
#: the probe batch of the dynamic-axes check: this many images, the example's side plus these.
PROBE_BATCH = 3
PROBE_GROWTH = (16, 8)
OUTPUT_MEANING = ("class logits B x num_classes x H x W at the input resolution; channel k is "
                  "classes[k], the prediction is the argmax over dimension 1")
INT8_REFUSAL = (
    "--int8 is not available for segmentation students: kdlab's int8 paths calibrate and bound "
    "classifiers (per-image top-1); export in fp32 with --format state_dict, torchscript, "
    "exported or onnx")
HUB_REFUSAL = (
    "--format hub holds classifiers in this kdlab version; for a segmentation student use "
    "--format state_dict (weights, class names and the segmentation section, no pickled code), "
    "exported or onnx")


# --------------------------------------------------------------------------- the run
def is_segmentation_run(run_dir: str | Path, overrides: Sequence[str] = (),
                        plugins: Sequence[str] = ()) -> bool:
    """Whether ``run_dir`` is a ``task: segmentation`` run (reads and validates its config
    only). Raises what :func:`~kdlab.runs.open.open_run` raises for a folder that is no run."""
    return bool(open_run(run_dir, overrides, plugins).cfg.task == TASK)


def load_segmenter_run(run_dir: str | Path, overrides: Sequence[str] = (),
                       plugins: Sequence[str] = (), checkpoint: str | Path | None = None
                       ) -> ex.StudentRun:
    """The trained student of the segmentation run ``run_dir`` (``checkpoints/best.pt`` unless
    ``checkpoint``) on the CPU in eval mode, with the run's config (plus ``overrides``), its
    data on the CPU (:class:`~kdlab.tasks.segmentation.data.SegmentationData`) and its input
    description, as :class:`~kdlab.deploy.export.StudentRun`.

    Raises :class:`~kdlab.deploy.export.ExportError` for a run of another task, and what
    :func:`~kdlab.deploy.export.load_run` raises for missing runs, plugins or checkpoints."""
    run = open_run(run_dir, overrides, plugins)
    if run.cfg.task != TASK:
        raise ex.ExportError(f"run {run_dir} is a {run.cfg.task!r} run, not a segmentation run; "
                             "use kdlab.deploy.export.export_run for it")
    student, state, path = run.student_and_record(checkpoint or "best")
    record = {k: v for k, v in state.items() if isinstance(v, int | float | str)}
    return ex.StudentRun(run_dir=run.path, cfg=run.cfg, task=run.task, checkpoint=path,
                         record=record, data=run.data(), student=student,
                         input_spec=run.input_spec(state))


def segmenter_metadata(run: ex.StudentRun) -> dict[str, Any]:
    """What a deployment needs besides the weights: ``arch``, ``num_classes`` K,
    ``in_channels``, the run's ``segmentation`` section (head, output stride, ASPP sizes,
    normalisation, inference: enough to rebuild the model with
    :func:`~kdlab.tasks.segmentation.model.build_segmenter`), the ``classes`` that the logit
    channels name, the input description and where the weights come from."""
    seg: SegmentationConfig = run.data.segmentation
    spec = run.input_spec or run.data.input_spec
    return {
        "kind": ex.STUDENT_KIND,
        "format_version": ex.STUDENT_FORMAT_VERSION,
        "task": TASK,
        "arch": run.cfg.student.arch,
        "num_classes": int(run.data.num_classes),
        "in_channels": int(run.data.in_channels),
        "input_size": int(run.data.input_size),  # a rectangular crop: its shorter side
        "plugins": list(run.cfg.plugins),
        "segmentation": seg.model_dump(mode="json"),
        "classes": list(run.data.class_names),
        "input_spec": spec.to_dict(),
        "input": {"name": ex.INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                  "normalisation": "(pixel / 255 - mean) / std", "mean": list(seg.image_mean),
                  "std": list(seg.image_std), "size": "any (dynamic) where the format allows"},
        "output": {"name": ex.OUTPUT_NAME, "meaning": OUTPUT_MEANING},
        "source": run.source("mIoU"),
    }


# --------------------------------------------------------------------------- state dict
def save_segmenter(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write the student-only weights file (:func:`~kdlab.deploy.export.save_student`'s
    format: ``metadata`` plus ``"model"``, the state dict, with the sha256 integrity key).
    ``metadata`` must hold ``task: segmentation`` and the ``segmentation`` section
    (:func:`segmenter_metadata`), which :func:`read_segmenter` rebuilds the model from.
    ``kdlab eval RUN --checkpoint FILE`` reads it too (weights under ``"model"``, class count
    and task recorded)."""
    ex.save_task_student(model, path, metadata, TASK)


def read_segmenter(path: str | Path, plugins: Sequence[str] = ()) -> SegmentationModel:
    """The model of a :func:`save_segmenter` file (eval mode, CPU): ``build_segmenter(arch,
    num_classes, SegmentationConfig(**segmentation), in_channels)`` loaded strictly, with
    ``kdlab_meta`` (plus ``segmentation``) and ``preprocess`` attached
    (:func:`~kdlab.runs.student.attach_input`). The file is data: the plugins it lists are never
    imported; each must be among ``plugins`` / ``$KDLAB_PLUGINS``.

    Raises :class:`~kdlab.core.errors.CheckpointError` (one line) for a file that is not a
    kdlab segmentation student file, has an unusable ``segmentation`` section or weights that do
    not fit, and :class:`~kdlab.core.errors.PluginError` for an untrusted plugin."""
    model = read_student_file(path, plugins)
    if model.kdlab_meta.get("task") != TASK:
        raise CheckpointError(f"{path} is not a kdlab segmentation student file (task "
                              f"{model.kdlab_meta.get('task')!r}); make one with `kdlab export "
                              "RUN --format state_dict` on a segmentation run")
    return model  # type: ignore[return-value]


# --------------------------------------------------------------------------- traced formats
def traceable_segmenter(model: SegmentationModel) -> nn.Module:
    """``images -> logits`` (:class:`~kdlab.deploy.export.LogitsOnly`) of a copy of ``model``
    whose backbone name-based tracers can walk (:func:`~kdlab.deploy.export.deployable`: zoo
    backbones that alias their head, e.g. MobileNetV2's ``classifier.1``). ``model`` is not
    changed."""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # a shallow copy shares the dict of submodules
    twin.backbone = ex.deployable(model.backbone)
    return ex.LogitsOnly(twin).eval()


def _symbolic_side(program: torch.export.ExportedProgram, dim: int) -> int | None:
    """The lower bound of input dimension ``dim`` of ``program``'s first user input (None when
    the exporter specialised it to a constant)."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    size = node.meta["val"].shape[dim]
    if isinstance(size, int):
        return None
    bound = program.range_constraints[size.node.expr].lower
    return int(bound)


def image_dims(module: nn.Module, example: Tensor) -> tuple[int, int] | None:
    """``(min_height, min_width)`` the exported graph accepts, or None when ``torch.export``
    cannot keep the image size dynamic: ``module`` is exported with ``Dim.AUTO`` height and
    width, and the bounds the exporter derives from the network's shape guards (each
    convolution's output must be at least one pixel, ...) are read back."""
    dims = {ex.INPUT_NAME: {0: Dim("batch", min=1), 2: Dim.AUTO, 3: Dim.AUTO}}
    try:
        with ex._quiet_exporters():
            program = torch.export.export(module.eval(), (example,), dynamic_shapes=dims)
    except Exception as e:  # the exporter raises many types
        raise ex.ExportError(f"torch.export failed: {ex._first_line(e)}") from e
    h, w = _symbolic_side(program, 2), _symbolic_side(program, 3)
    return None if h is None or w is None else (max(h, 1), max(w, 1))


def _dynamic_shapes(sides: tuple[int, int] | None) -> dict[str, dict[int, Any]]:
    """Dynamic batch, and dynamic height and width of at least ``sides`` (None: static)."""
    dims: dict[int, Any] = {0: Dim("batch", min=1)}
    if sides is not None:
        dims.update({2: Dim("height", min=sides[0]), 3: Dim("width", min=sides[1])})
    return {ex.INPUT_NAME: dims}


def save_segmenter_exported(module: nn.Module, path: str | Path, example: Tensor,
                            sides: tuple[int, int] | None,
                            metadata: dict[str, Any] | None = None) -> None:
    """``torch.export.export`` of ``module`` (``images -> logits``) with a dynamic batch and,
    unless ``sides`` is None, a dynamic height and width of at least ``sides``;
    ``torch.export.save``d to ``path`` with ``metadata`` as the extra file ``kdlab.json``."""
    try:
        with ex._quiet_exporters():
            program = torch.export.export(module.eval(), (example,),
                                          dynamic_shapes=_dynamic_shapes(sides))
    except Exception as e:  # the exporter raises many types
        raise ex.ExportError(f"torch.export failed: {ex._first_line(e)}") from e
    extra = {"kdlab.json": json.dumps(metadata or {})}
    ex._write_via_tmp(Path(path), lambda p: torch.export.save(program, str(p),
                                                              extra_files=extra))


def save_segmenter_onnx(module: nn.Module, path: str | Path, example: Tensor,
                        sides: tuple[int, int] | None,
                        metadata: dict[str, Any] | None = None) -> None:
    """``torch.onnx.export(..., dynamo=True)`` of ``module``: input ``images`` (``batch x C x
    height x width``: batch dynamic, height and width too unless ``sides`` is None), output
    ``logits`` (``batch x K x height x width``), ``metadata`` as the model property ``kdlab``
    (:func:`~kdlab.deploy.export.set_onnx_metadata`). Needs onnx and onnxscript."""
    ex._require("onnx", "onnxscript", what="ONNX export")
    try:
        with ex._quiet_exporters():
            program = torch.onnx.export(module.eval(), (example,), dynamo=True,
                                        input_names=[ex.INPUT_NAME],
                                        output_names=[ex.OUTPUT_NAME],
                                        dynamic_shapes=_dynamic_shapes(sides), verbose=False)
    except Exception as e:  # the exporter raises many types
        raise ex.ExportError(f"ONNX export failed: {ex._first_line(e)}") from e
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise ex.ExportError("ONNX export returned no program")
    ex._write_via_tmp(Path(path), lambda p: program.save(str(p)))
    if metadata is not None:
        ex.set_onnx_metadata(path, metadata)


def load_segmenter_artefact(path: str | Path, fmt: str, threads: int | None = None,
                            plugins: Sequence[str] = ()) -> Callable[[Tensor], Tensor]:
    """Read a segmentation artefact back from disk as ``images -> logits`` (``B x K x H x W``
    CPU tensors): the state-dict file through :func:`read_segmenter`, the others as
    :func:`~kdlab.deploy.export.load_artefact` reads them (TorchScript, ``torch.export``,
    onnxruntime with ``threads`` intra-op threads)."""
    if fmt == "state_dict":
        return ex.LogitsOnly(read_segmenter(path, plugins)).eval()
    if fmt not in FORMATS:
        raise ex.ExportError(f"unknown segmentation format {fmt!r}; choose one of "
                             f"{', '.join(FORMATS)}")
    return ex.load_artefact(path, fmt, threads=threads, plugins=plugins)


# --------------------------------------------------------------------------- parity
class _AsOutput:
    """``images -> .logits``: an ``images -> logits`` callable in the model interface that
    :func:`~kdlab.tasks.segmentation.evaluation.predict_logits` calls."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn
        self.logits: Tensor | None = None

    def __call__(self, images: Tensor) -> _AsOutput:
        out = _AsOutput(self.fn)
        out.logits = torch.as_tensor(self.fn(images.contiguous())).float()
        return out


def _groups(batch: Any) -> Iterator[tuple[Tensor, list[Tensor]]]:
    """The images of an evaluation batch stacked by size (as the evaluation runs them), with
    their label maps."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(batch.images):
        groups.setdefault(tuple(image.shape), []).append(i)
    for idx in groups.values():
        yield (torch.stack([batch.images[i] for i in idx]).cpu(),
               [batch.labels[i].cpu() for i in idx])


class _Tally:
    """Running parity figures: two confusion matrices, agreeing pixels, the max difference."""

    def __init__(self, num_classes: int) -> None:
        self.conf_ref = torch.zeros((num_classes, num_classes), dtype=torch.long)
        self.conf_got = torch.zeros_like(self.conf_ref)
        self.images = self.pixels = self.agree = 0
        self.max_diff = 0.0

    def add(self, ref: Tensor, got: Tensor, labels: list[Tensor], num_classes: int,
            ignore_index: int) -> None:
        """Count one group of ``B x K x H x W`` logit maps and their ``B`` label maps."""
        d = float((got - ref).abs().max()) if bool(got.isfinite().all()) else math.nan
        self.max_diff = d if math.isnan(d) or math.isnan(self.max_diff) else max(self.max_diff,
                                                                                    d)
        self.agree += int((ref.argmax(1) == got.argmax(1)).sum())
        self.pixels += int(ref[:, 0].numel())
        self.images += len(labels)
        for z_ref, z_got, label in zip(ref, got, labels, strict=True):
            self.conf_ref += label_confusion(z_ref, label, num_classes, ignore_index)
            self.conf_got += label_confusion(z_got, label, num_classes, ignore_index)


def check_segmenter_parity(reference: Callable[[Tensor], Tensor],
                           candidate: Callable[[Tensor], Tensor], batches: Iterable[Any],
                           seg: SegmentationConfig, num_classes: int,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` (both ``images -> B x K x H x W logits``) on
    every batch of a segmentation test loader
    (:class:`~kdlab.tasks.segmentation.data.SegmentationEvalBatch`), run as the evaluation runs
    them (images of one size stacked, ``seg.inference`` whole or sliding).

    Returns ``test_images``; ``pixels`` (of the logit maps); ``pixel_agreement``: 100 *
    #{argmax candidate == argmax reference} / pixels, and ``pixels_differing`` (the pixels
    whose argmax differs); ``max_abs_logit_diff``: max over images,
    pixels and classes of |candidate - reference| (NaN if the candidate gave a non-finite
    logit); ``mIoU_eager`` / ``mIoU_exported`` / ``mIoU_change``, ``pixel_acc_eager`` /
    ``pixel_acc_exported`` and ``per_class_iou_eager`` / ``per_class_iou_exported`` (named by
    ``class_names``): each map scored against the labels by the evaluation's confusion matrix
    (:func:`~kdlab.tasks.segmentation.evaluation.label_confusion`; IoU as in the PASCAL VOC
    protocol, Everingham et al., IJCV 2010).

    Raises :class:`~kdlab.deploy.export.ExportError` for an output of the wrong shape or an
    empty split."""
    tally = _Tally(num_classes)
    ref_model, got_model = _AsOutput(reference), _AsOutput(candidate)
    with torch.inference_mode():
        for batch in batches:
            for images, labels in _groups(batch):
                ref = predict_logits(ref_model, images, seg, num_classes)  # type: ignore[arg-type]
                got = predict_logits(got_model, images, seg, num_classes)  # type: ignore[arg-type]
                if tuple(got.shape) != tuple(ref.shape):
                    raise ex.ExportError(f"the artefact returned logits of shape "
                                         f"{tuple(got.shape)}, the eager student "
                                         f"{tuple(ref.shape)}")
                tally.add(ref, got, labels, num_classes, seg.ignore_index)
    if tally.images == 0:
        raise ex.ExportError("the test split is empty: nothing to check the artefact on")
    names = list(class_names) if class_names is not None else [str(k) for k in
                                                                range(num_classes)]
    figures: dict[str, Any] = {"test_images": tally.images, "pixels": tally.pixels,
                               "pixel_agreement": 100.0 * tally.agree / tally.pixels,
                               "pixels_differing": tally.pixels - tally.agree,
                               "max_abs_logit_diff": tally.max_diff}
    for side, conf in (("eager", tally.conf_ref), ("exported", tally.conf_got)):
        scores, ious = segmentation_scores(conf)
        flat = {f"IoU_{k}": v for k, v in enumerate(ious) if v is not None}
        figures[f"mIoU_{side}"] = scores["mIoU"]
        figures[f"pixel_acc_{side}"] = scores["pixel_acc"]
        figures[f"per_class_iou_{side}"] = named_class_iou(flat, names)
    figures["mIoU_change"] = figures["mIoU_exported"] - figures["mIoU_eager"]
    return figures


def probe_shapes(reference: Callable[[Tensor], Tensor], candidate: Callable[[Tensor], Tensor],
                 example: Tensor, grow: bool = True) -> dict[str, Any]:
    """Run both on one seeded batch of :data:`PROBE_BATCH` images, grown by
    :data:`PROBE_GROWTH` pixels unless ``grow`` is False (an artefact of static image size):
    another batch size, and image size, than the export example. Returns its ``shape``, the
    ``output_shape`` of each and their max |logit difference|, or ``error`` (first line) when
    the artefact cannot run it."""
    _, c, h, w = example.shape
    dh, dw = PROBE_GROWTH if grow else (0, 0)
    shape = (PROBE_BATCH, c, h + dh, w + dw)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = reference(x).float()
        try:
            got = torch.as_tensor(candidate(x)).float()
        except Exception as e:  # the runtimes raise many types
            return {"shape": list(shape), "expected_shape": list(ref.shape),
                    "error": ex._first_line(e)}
    same = tuple(got.shape) == tuple(ref.shape)
    diff = float((got - ref).abs().max()) if same and bool(got.isfinite().all()) else math.nan
    return {"shape": list(shape), "output_shape": list(got.shape),
            "expected_shape": list(ref.shape), "max_abs_logit_diff": diff}


def _parity_failures(figures: dict[str, Any], probe: dict[str, Any], tolerance: float,
                     min_agreement: float) -> list[str]:
    """Why the parity figures fail their bounds (empty: they pass)."""
    failures = []
    if not figures["pixel_agreement"] >= min_agreement:
        failures.append(f"pixel agreement {figures['pixel_agreement']:.4f}% < "
                        f"{min_agreement:g}%")
    if not figures["max_abs_logit_diff"] <= tolerance:
        failures.append(f"max |logit diff| {figures['max_abs_logit_diff']:.3g} > {tolerance:g}")
    if "error" in probe:
        failures.append(f"the artefact cannot run a {probe['shape']} probe batch: "
                        f"{probe['error']}")
    elif probe["output_shape"] != probe["expected_shape"]:
        failures.append(f"on a {probe['shape']} probe batch the artefact returned "
                        f"{probe['output_shape']}, expected {probe['expected_shape']}")
    elif not probe["max_abs_logit_diff"] <= tolerance:
        failures.append(f"max |logit diff| {probe['max_abs_logit_diff']:.3g} > {tolerance:g} "
                        f"on a {probe['shape']} probe batch")
    return failures


def _dynamic_size(fmt: str, meta: dict[str, Any]) -> bool:
    """Whether the artefact takes any image size: the state dict and the trace always (the
    probe batch checks the trace), the exported and ONNX graphs when the exporter kept height
    and width symbolic (:func:`image_dims`)."""
    return fmt in ("state_dict", "torchscript") or meta["input"].get("min_height") is not None


def _parity_report(run: ex.StudentRun, fmt: str, path: Path, meta: dict[str, Any],
                   figures: dict[str, Any], probe: dict[str, Any], failures: list[str],
                   tolerance: float, min_agreement: float) -> dict[str, Any]:
    """The content of ``FILE.parity.json`` (:func:`kdlab.deploy.export.parity_record`)."""
    return ex.parity_record(
        run, fmt, path, meta, task=TASK, classes=meta["classes"],
        in_channels=meta["in_channels"], input_size=meta["input_size"],
        head=meta["segmentation"]["head"], inference=meta["segmentation"]["inference"],
        input=meta["input"], output=meta["output"], dynamic_batch=True,
        dynamic_image_size=_dynamic_size(fmt, meta), **figures, shape_probe=probe,
        tolerance=tolerance, min_agreement=min_agreement, passed=not failures,
        failures=failures)


# --------------------------------------------------------------------------- the command
def refuse_request(fmt: str, int8: bool = False) -> None:
    """Raise :class:`~kdlab.deploy.export.ExportError` (one line) for a segmentation export that
    cannot succeed: ``int8``, ``hub`` (see the module docstring), an unknown format, or ONNX
    without onnx / onnxscript / onnxruntime. Loads nothing."""
    if int8:
        raise ex.ExportError(INT8_REFUSAL)
    if fmt == "hub":
        raise ex.ExportError(HUB_REFUSAL)
    if fmt not in FORMATS:
        raise ex.ExportError(f"unknown format {fmt!r} for a segmentation student; choose one "
                             f"of {', '.join(FORMATS)}")
    if fmt == "onnx":
        ex._require("onnx", "onnxscript", what="ONNX export")
        ex._require("onnxruntime", what="the ONNX parity check")


def _write(run: ex.StudentRun, fmt: str, path: Path, example: Tensor,
           meta: dict[str, Any]) -> None:
    """Write the run's student as ``fmt`` at ``path``; for ``exported`` and ``onnx`` the input
    bounds the exporter derives are added to ``meta["input"]`` first."""
    if fmt == "state_dict":
        save_segmenter(run.student, path, meta)
        return
    traceable = traceable_segmenter(run.student)
    if fmt == "torchscript":
        ex.save_torchscript(traceable, path, example, meta)
        return
    sides = image_dims(traceable, example)
    if sides is None:
        log.warning("torch.export keeps this model's image size static: the %s artefact takes "
                    "%dx%d images only", fmt, *example.shape[-2:])
    meta["input"].update({"min_height": None if sides is None else sides[0],
                          "min_width": None if sides is None else sides[1],
                          "size": "dynamic" if sides else f"{list(example.shape[-2:])} only"})
    if fmt == "exported":
        save_segmenter_exported(traceable, path, example, sides, meta)
    else:
        save_segmenter_onnx(traceable, path, example, sides, meta)


def export_segmenter(run_dir: str | Path, fmt: str, out: str | Path | None = None, *,
                     tolerance: float | None = None, min_agreement: float | None = None,
                     int8: bool = False, overrides: Sequence[str] = (),
                     plugins: Sequence[str] = (), checkpoint: str | Path | None = None
                     ) -> ex.ExportResult:
    """Export the trained student of the segmentation run ``run_dir`` as ``fmt``
    (``state_dict``, ``torchscript``, ``exported`` or ``onnx``; default file
    ``RUN_DIR/export/student<ext>``), read it back, check its parity with the eager student on
    the run's test split (:func:`check_segmenter_parity`) and on a probe batch of another batch
    and image size (:func:`probe_shapes`), and write ``FILE.parity.json`` next to it.
    ``tolerance``: max |logit diff| (default :data:`~kdlab.deploy.export.DEFAULT_TOLERANCE`);
    ``min_agreement``: minimum pixel agreement in % (default
    :data:`~kdlab.deploy.export.DEFAULT_MIN_AGREEMENT`).

    Raises :class:`~kdlab.deploy.export.ExportError` (refused or unknown format, missing
    package, exporter failure) before writing anything, and
    :class:`~kdlab.deploy.export.ParityError` after writing both files when the check fails."""
    refuse_request(fmt, int8)
    tolerance = ex.DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    min_agreement = ex.DEFAULT_MIN_AGREEMENT if min_agreement is None else float(min_agreement)
    run = load_segmenter_run(run_dir, overrides, plugins, checkpoint)
    path = Path(out) if out else ex.default_path(run.run_dir, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**segmenter_metadata(run), "precision": "fp32"}
    example = torch.randn(2, *run.input_shape, generator=torch.Generator().manual_seed(0))
    _write(run, fmt, path, example, meta)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    eager = ex.LogitsOnly(run.student).eval()
    artefact = load_segmenter_artefact(path, fmt, plugins=plugins)
    figures = check_segmenter_parity(eager, artefact, run.data.test_loader,
                                     run.data.segmentation, int(run.data.num_classes),
                                     run.data.class_names)
    probe = probe_shapes(eager, artefact, example, grow=_dynamic_size(fmt, meta))
    failures = _parity_failures(figures, probe, tolerance, min_agreement)
    report = _parity_report(run, fmt, path, meta, figures, probe, failures, tolerance,
                            min_agreement)
    ppath = ex.parity_path(path)
    atomic_write(ppath, json.dumps(report, indent=2) + "\n")
    log.info("parity on %d test images: pixel agreement %.4f%% (%d pixels differ), max |logit "
             "diff| %.3g, mIoU eager %.2f vs exported %.2f", figures["test_images"],
             figures["pixel_agreement"], figures["pixels_differing"],
             figures["max_abs_logit_diff"], figures["mIoU_eager"], figures["mIoU_exported"])
    if failures:
        raise ex.ParityError(f"parity check of {path} failed: {'; '.join(failures)} (files "
                             f"kept; see {ppath.name})")
    return ex.ExportResult(path=path, parity_path=ppath, report=report)


def export_summary(result: ex.ExportResult) -> str:
    """One line for the CLI: file, format, pixel agreement, max difference, mIoU of both."""
    r = result.report
    return (f"{result.path}: fp32 {r['format']}, pixel agreement {r['pixel_agreement']:.4f}% "
            f"({r['pixels_differing']} of {r['pixels']} pixels differ), max |logit diff| "
            f"{r['max_abs_logit_diff']:.3g}, mIoU {r['mIoU_eager']:.2f} eager, "
            f"{r['mIoU_exported']:.2f} exported ({r['mIoU_change']:+.4f}; {r['test_images']} "
            f"test images); {result.parity_path}")
