"""Deployment artefacts of a detection run's student (``kdlab export`` / ``kdlab latency`` on a
``task: detection`` run), each checked against the eager detector by COCO mAP.

The student of a detection run is kdlab's :class:`~kdlab.tasks.detection.model.Detector`:
torchvision's Faster R-CNN with FPN around a zoo backbone. Every artefact holds the whole
detector, postprocessing included, and keeps torchvision's eval-mode convention:

* **input**: a list of float images ``3 x H x W`` in ``[0, 1]`` (RGB), any size, one size per
  image; the model's own transform resizes each (shorter side to ``detection.min_size``, longer
  side at most ``detection.max_size``), normalises it with ``detection.image_mean`` /
  ``image_std`` and pads the batch;
* **output**: per image ``{"boxes": N x 4, "scores": N, "labels": N}``: ``(x1, y1, x2, y2)``
  boxes in pixels of the input image, scores after the box head's softmax, score threshold,
  per-class NMS and the top ``detection.box_detections_per_img``; labels ``1..K`` (0 is the
  background and never returned) name the dataset's categories: label ``k`` is the ``k``-th
  smallest COCO category id (``categories`` in the metadata).

==============  ==================  =========================================================
format          default file        how it is made / read back
==============  ==================  =========================================================
``state_dict``  ``student.pt``      :func:`save_detector`: weights + ``arch``/``num_classes``
                                    + the run's ``detection`` config section, no pickled code;
                                    :func:`read_detector` rebuilds the detector from it
``torchscript`` ``student.ts``      :func:`save_detector_torchscript`: ``torch.jit.script`` of
                                    torchvision's Faster R-CNN (with the zoo backbone traced
                                    inside it); where scripting fails, a per-image
                                    ``torch.jit.trace`` wrapped in a scripted loop over the
                                    list. The file's ``kdlab.json`` says which. Read back with
                                    ``torch.jit.load`` after torchvision is imported (its
                                    ``nms`` / ``roi_align`` operators)
``onnx``        ``student.onnx``    :func:`save_detector_onnx`: ``torch.onnx.export(...,
                                    dynamo=False, opset_version=17)``, ONE image per run:
                                    input ``image`` (``3 x height x width``, both dynamic),
                                    outputs ``boxes``, ``scores``, ``labels`` (``N`` dynamic);
                                    onnxruntime CPU
==============  ==================  =========================================================

Refused: ``exported`` (``torch.export`` in torch 2.13 stops at data-dependent branches of
torchvision's postprocessing, e.g. ``boxes.numel() == 0`` in ``batched_nms``) and ``--int8``
(kdlab's int8 paths quantise classifiers: FX quantisation cannot trace the detector's Python
control flow, and the ONNX int8 calibration feeds batched image tensors). Both say so in one
line.

Which TorchScript path a file took: torchvision's detection models are scriptable, so
:func:`save_detector_torchscript` tries ``torch.jit.script`` first. With kdlab's torchvision shim
(a CUDA torchvision next to a CPU torch, docs/torchvision-shim.md) scripting fails, because
``torchvision.ops.box_iou`` (compiled in the training branch) names the operator
``torchvision::box_iou_rotated`` that only torchvision's C++ library defines; the per-image trace
is used there. Both take any image size (the trace follows torchvision's tracing-aware resize,
anchor and postprocessing code, the same path as the ONNX export), and both are checked below.

**Parity check** (:func:`check_detector_parity`): the artefact is read back from disk and run over
the run's whole test split beside the eager detector. Reported: COCO box AP/AP50/.../AR100 of both
(kdlab's pycocotools evaluation, :func:`~kdlab.tasks.detection.evaluation.coco_metrics`) and the
change of AP; detection-level agreement: the detections of each image are matched greedily (eager
score order, same label, highest IoU, IoU >= :data:`MATCH_IOU`), giving the max |box coordinate
difference| (px) and max |score difference| over matched pairs, the images whose detection sets
differ (a detection left unmatched on either side) and the images whose outputs are bit-identical.
It fails (:class:`~kdlab.deploy.export.ParityError`, after ``FILE.parity.json`` is written) when
|AP change| exceeds ``tolerance`` (default :data:`DEFAULT_AP_TOLERANCE` AP points) or the
artefact returns non-finite boxes or scores, or labels outside ``1..K``.

**Latency** (:func:`run_detector_latency`): ``kdlab latency``'s protocol
(:mod:`kdlab.deploy.latency`: one worker process per row, fixed threads, warm-ups, p50/p90) for
the detector and, when the run has one, its teacher: one image per call (the first test image;
the model resizes it to the configured size), in ``eager``, ``torchscript`` and ``onnxruntime``;
rows give ms per image and images/s. The int8 runtimes are refused for detectors.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdlab.config import DetectionConfig
from kdlab.core.errors import CheckpointError
from kdlab.core.io import atomic_write
from kdlab.core.torchvision_shim import import_torchvision_for_detection, ops_backend
from kdlab.deploy import export as ex
from kdlab.deploy import latency as lat
from kdlab.runs.open import open_run
from kdlab.runs.student import read_student_file
from kdlab.tasks.detection.evaluation import coco_metrics, detections_to_coco
from kdlab.tasks.detection.model import Detector, PyramidBackbone

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_AP_TOLERANCE",
    "FORMATS",
    "IMAGE_NAME",
    "MATCH_IOU",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "TASK",
    "check_detector_parity",
    "detector_macs",
    "detector_metadata",
    "export_detector",
    "export_summary",
    "is_detection_run",
    "load_detector_artefact",
    "load_detector_run",
    "match_detections",
    "measure_detector",
    "read_detector",
    "refuse_request",
    "run_detector_latency",
    "save_detector",
    "save_detector_onnx",
    "save_detector_torchscript",
]

#: the task whose runs this module exports.
TASK = "detection"
#: the formats a detector is exported to, in the CLI's order.
FORMATS = ("state_dict", "torchscript", "onnx")
#: the ONNX opset of :func:`save_detector_onnx` (the legacy exporter's torchvision symbolics for
#: ``nms`` and ``roi_align`` need >= 11; 17 is the opset the detector was checked with).
ONNX_OPSET = 17
#: the ONNX graph's input and outputs.
IMAGE_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels")
#: parity: the largest |AP change| (COCO AP, in points) an fp32 artefact may show. Measured on
#: the synthetic Fashion-MNIST detection run of docs/deployment.md (300 test images): state
#: dict and TorchScript 0.000, ONNX 0.005 (onnxruntime orders exactly tied RPN scores
#: differently, which changes a few low-score detections); an export bug (wrong weights, a
#: broken box regression, a dropped normalisation) moves AP by whole points.
DEFAULT_AP_TOLERANCE = 0.1
#: parity: two detections of an image are the same object when they share a label and their
#: IoU is at least this.
MATCH_IOU = 0.5
#: the model's convention, recorded in every artefact's metadata.
INPUT_CONVENTION = {
    "name": IMAGE_NAME, "layout": "list of CHW images (ONNX: one CHW image per run)",
    "dtype": "float32", "range": "[0, 1] RGB (pixel / 255)", "size": "any (dynamic)",
    "normalisation": "inside the model: resize to min_size/max_size, then (x - image_mean) / "
                     "image_std (the detection section)",
}
OUTPUT_CONVENTION = {
    "names": list(OUTPUT_NAMES),
    "boxes": "N x 4 float (x1, y1, x2, y2) in pixels of the input image",
    "scores": "N float above detection.box_score_thresh, in descending order",
    "labels": "N int64 in 1..K (0 = background, never returned); label k = categories[k - 1]",
}
#: why ``exported`` is refused (one line).
EXPORTED_REFUSAL = (
    "--format exported is not available for detectors: torch.export (torch {torch}) stops at "
    "data-dependent branches of torchvision's detection postprocessing (batched_nms); export "
    "--format onnx, torchscript or state_dict instead")
INT8_REFUSAL = (
    "--int8 is not available for detectors: kdlab's int8 paths quantise classifiers (FX cannot "
    "trace torchvision's Faster R-CNN; the ONNX calibration feeds batched image tensors); export "
    "the detector in fp32 (--format onnx, torchscript or state_dict)")
LATENCY_INT8_NOTE = ("{rt} skipped: kdlab's int8 paths quantise classifiers, not detectors; "
                     "time eager, torchscript or onnxruntime")


# --------------------------------------------------------------------------- the run
def is_detection_run(run_dir: str | Path, overrides: Sequence[str] = (),
                     plugins: Sequence[str] = ()) -> bool:
    """Whether ``run_dir`` is a ``task: detection`` run (reads and validates its config only).

    Raises what :func:`~kdlab.runs.open.open_run` raises for a folder that is no run."""
    return bool(open_run(run_dir, overrides, plugins).cfg.task == TASK)


def load_detector_run(run_dir: str | Path, overrides: Sequence[str] = (),
                      plugins: Sequence[str] = (), checkpoint: str | Path | None = None
                      ) -> ex.StudentRun:
    """The trained detector of the detection run ``run_dir`` (``checkpoints/best.pt`` unless
    ``checkpoint``) on the CPU in eval mode, with the run's config (plus ``overrides``) and its
    data on the CPU, as :class:`~kdlab.deploy.export.StudentRun` (``data`` is the run's
    :class:`~kdlab.tasks.detection.data.DetectionData`).

    Raises :class:`~kdlab.deploy.export.ExportError` for a run of another task, and what
    :func:`~kdlab.deploy.export.load_run` raises for missing runs, plugins or checkpoints."""
    run = open_run(run_dir, overrides, plugins)
    if run.cfg.task != TASK:
        raise ex.ExportError(f"run {run_dir} is a {run.cfg.task!r} run, not a detection run; "
                             "use kdlab.deploy.export.export_run for it")
    student, state, path = run.student_and_record(checkpoint or "best")
    record = {k: v for k, v in state.items() if isinstance(v, int | float | str)}
    return ex.StudentRun(run_dir=run.path, cfg=run.cfg, task=run.task, checkpoint=path,
                         record=record, data=run.data(), student=student)


def detector_metadata(run: ex.StudentRun, arch: str | None = None) -> dict[str, Any]:
    """What a deployment needs besides the weights: ``arch`` (the student's unless given),
    ``num_classes`` K, the run's ``detection`` config section (sizes, normalisation,
    thresholds: enough to rebuild the detector), the ``categories`` that labels ``1..K`` name,
    the input and output conventions, and where the weights come from."""
    det_cfg: DetectionConfig = run.data.detection
    ds = run.data.test_loader.dataset
    categories = [{"label": label, "id": int(cid), "name": str(cat.get("name", cid))}
                  for (label, cid), cat in zip(sorted(ds.label_to_category_id.items()),
                                               ds.categories, strict=True)]
    return {
        "kind": ex.STUDENT_KIND,
        "format_version": ex.STUDENT_FORMAT_VERSION,
        "task": TASK,
        "arch": arch or run.cfg.student.arch,
        "num_classes": int(run.data.num_classes),
        "in_channels": 3,
        "input_size": int(det_cfg.min_size),
        "plugins": list(run.cfg.plugins),
        "detection": det_cfg.model_dump(mode="json"),
        "categories": categories,
        "classes": [c["name"] for c in categories],
        "input_spec": run.data.input_spec.to_dict(),
        "input": {**INPUT_CONVENTION, "min_size": det_cfg.min_size,
                  "max_size": det_cfg.max_size, "image_mean": list(det_cfg.image_mean),
                  "image_std": list(det_cfg.image_std)},
        "output": OUTPUT_CONVENTION,
        "source": run.source("AP"),
    }


# --------------------------------------------------------------------------- state dict
def save_detector(detector: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write the detector-only weights file (:func:`~kdlab.deploy.export.save_student`'s
    format: ``metadata`` plus ``"model"``, the state dict, with the sha256 integrity key).
    ``metadata`` must hold ``task: detection`` and the ``detection`` section
    (:func:`detector_metadata`), which :func:`read_detector` rebuilds the detector from.
    ``kdlab eval RUN --checkpoint FILE`` reads it too (weights under ``"model"``)."""
    ex.save_task_student(detector, path, metadata, TASK)


def read_detector(path: str | Path, plugins: Sequence[str] = ()) -> Detector:
    """The detector of a :func:`save_detector` file (eval mode, CPU): ``build_detector(arch,
    num_classes, DetectionConfig(**detection))`` loaded strictly. The file is data: the
    plugins it lists are never imported; each must be among ``plugins`` /
    ``$KDLAB_PLUGINS`` (as :func:`~kdlab.deploy.export.read_student`).

    Raises :class:`~kdlab.core.errors.CheckpointError` (one line) for a file that is not a
    kdlab detector file, has an invalid ``detection`` section or weights that do not fit, and
    :class:`~kdlab.core.errors.PluginError` for an untrusted plugin."""
    model = read_student_file(path, plugins)
    if model.kdlab_meta.get("task") != TASK:
        raise CheckpointError(f"{path} is not a kdlab detector file (task "
                              f"{model.kdlab_meta.get('task')!r}); make one with `kdlab export "
                              "RUN --format state_dict` on a detection run")
    return model  # type: ignore[return-value]


# --------------------------------------------------------------------------- TorchScript, ONNX
class _Pyramid(nn.Module):
    """The FPN backbone as a pure function ``tensor -> {level: features}`` (no ``last_stem``
    side effect), so it can be traced."""

    def __init__(self, backbone: PyramidBackbone) -> None:
        super().__init__()
        self.body = backbone.body
        self.fpn = backbone.fpn
        self.stage_indices = list(backbone.stage_indices)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x).features
        return self.fpn(OrderedDict((str(k), feats[i]) for k, i in enumerate(self.stage_indices)))


class _ScriptedDetector(nn.Module):
    """``images -> detections`` of a scripted torchvision detector (which returns ``(losses,
    detections)`` in TorchScript)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        return self.model(images)[1]


class _OneImage(nn.Module):
    """``image -> (boxes, scores, labels)`` of one ``3 x H x W`` image: the traced and ONNX
    view of the detector."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model([image])[0]
        return out["boxes"], out["scores"], out["labels"]


class _PerImage(nn.Module):
    """``images -> detections`` through a traced one-image detector, one call per image."""

    def __init__(self, one: nn.Module) -> None:
        super().__init__()
        self.one = one

    def forward(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = []
        for image in images:
            boxes, scores, labels = self.one(image)
            out.append({"boxes": boxes, "scores": scores, "labels": labels})
        return out


def _frcnn_copy(detector: Detector) -> nn.Module:
    """A deep copy of the detector's torchvision model, in eval mode."""
    return copy.deepcopy(detector.model).cpu().eval()


def _example(detector: Detector) -> Tensor:
    """A seeded ``3 x S x S`` image in [0, 1] (S: the detector's ``min_size``) to trace with."""
    size = detector.model.transform.min_size  # torchvision keeps a tuple
    side = int(size[-1] if isinstance(size, list | tuple) else size)
    return torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))


def _script(detector: Detector, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of torchvision's Faster R-CNN with the zoo backbone traced inside."""
    frcnn = _frcnn_copy(detector)
    with torch.no_grad():
        frcnn.backbone = torch.jit.trace(_Pyramid(frcnn.backbone).eval(), example[None],
                                         strict=False)
    return torch.jit.script(_ScriptedDetector(frcnn).eval())


def _trace(detector: Detector, example: Tensor) -> torch.jit.ScriptModule:
    """A per-image ``torch.jit.trace`` of the detector inside a scripted loop over the list."""
    with torch.no_grad():
        one = torch.jit.trace(_OneImage(_frcnn_copy(detector)).eval(), (example,),
                              check_trace=False)
    return torch.jit.script(_PerImage(one).eval())


def save_detector_torchscript(detector: Detector, path: str | Path,
                              metadata: dict[str, Any] | None = None) -> str:
    """Save the detector as TorchScript at ``path`` (``metadata`` + ``"torchscript"``: the
    method, as the extra file ``kdlab.json``); returns the method, ``"script"`` or ``"trace"``.

    ``torch.jit.script`` of torchvision's Faster R-CNN first (the kdlab backbone traced inside
    it: zoo models return a :class:`~kdlab.models.output.ModelOutput`, which TorchScript cannot
    compile); where that fails (e.g. under kdlab's torchvision shim, see the module docstring)
    ``torch.jit.trace`` of one image wrapped in a scripted loop. Either takes a list of images
    of any size and returns torchvision's list of ``{"boxes", "scores", "labels"}``.

    Raises :class:`~kdlab.deploy.export.ExportError` when both fail."""
    example = _example(detector)
    with ex._quiet_exporters(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            module, method = _script(detector, example), "script"
        except Exception as e:  # TorchScript's frontend raises many types
            log.info("torch.jit.script of the detector failed (%s); tracing it per image",
                     ex._first_line(e))
            try:
                module, method = _trace(detector, example), "trace"
            except Exception as e2:  # the tracer raises many types
                raise ex.ExportError(f"TorchScript failed for the detector: script: "
                                     f"{ex._first_line(e)}; trace: {ex._first_line(e2)}") from e2
    extra = {"kdlab.json": json.dumps({**(metadata or {}), "torchscript": method})}

    def write(p: Path) -> None:
        with ex._quiet_exporters():
            torch.jit.save(module, str(p), _extra_files=extra)

    ex._write_via_tmp(Path(path), write)
    return method


def save_detector_onnx(detector: Detector, path: str | Path,
                       metadata: dict[str, Any] | None = None) -> None:
    """``torch.onnx.export(..., dynamo=False, opset_version=17)`` of the detector for ONE image:
    input ``image`` (``3 x height x width``, dynamic), outputs ``boxes`` (``N x 4``), ``scores``
    and ``labels`` (``N``, dynamic), postprocessing (NMS, top-k) in the graph. ``metadata`` is
    stored as the model property ``kdlab`` (JSON). The dynamo exporter is not used: it stops
    at the same data-dependent branches as ``torch.export``. Needs onnx.

    Raises :class:`~kdlab.deploy.export.ExportError` when the exporter fails."""
    ex._require("onnx", what="ONNX export")
    import onnx  # optional heavy dependency: onnx

    one = _OneImage(_frcnn_copy(detector)).eval()
    example = _example(detector)
    dynamic = {IMAGE_NAME: {1: "height", 2: "width"},
               **{name: {0: "detections"} for name in OUTPUT_NAMES}}

    def write(p: Path) -> None:
        try:
            with ex._quiet_exporters(), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.simplefilter("ignore", UserWarning)
                torch.onnx.export(one, (example,), str(p), dynamo=False,
                                  opset_version=ONNX_OPSET, input_names=[IMAGE_NAME],
                                  output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic)
        except Exception as e:  # the exporter raises many types
            raise ex.ExportError(f"ONNX export of the detector failed: {ex._first_line(e)}"
                                 ) from e
        if metadata is not None:
            model = onnx.load(str(p))
            props = {q.key: q.value for q in model.metadata_props}
            props["kdlab"] = json.dumps(metadata)
            onnx.helper.set_model_props(model, props)
            onnx.save(model, str(p))

    ex._write_via_tmp(Path(path), write)


Detections = list[dict[str, Tensor]]
#: the UserWarning a scripted torchvision detector gives when it runs.
_SCRIPTED_RCNN_WARNING = r".*always returns a \(Losses, Detections\) tuple in scripting"


def load_detector_artefact(path: str | Path, fmt: str, threads: int | None = None,
                           plugins: Sequence[str] = ()) -> Callable[[list[Tensor]], Detections]:
    """Read a detector artefact back as ``images -> detections`` (CPU tensors; torchvision's
    eval-mode convention): the state-dict file through :func:`read_detector`, TorchScript
    through ``torch.jit.load`` (torchvision imported first: its operators), ONNX through an
    onnxruntime CPU session run once per image (``threads`` intra-op threads)."""
    path = Path(path)
    if fmt == "state_dict":
        return read_detector(path, plugins)
    if fmt == "torchscript":
        import_torchvision_for_detection()  # registers torchvision::nms / roi_align
        with ex._quiet_exporters():
            module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_ts(images: list[Tensor]) -> Detections:
            with warnings.catch_warnings():  # a scripted torchvision detector says so per call
                warnings.filterwarnings("ignore", message=_SCRIPTED_RCNN_WARNING)
                return module(images)  # type: ignore[no-any-return]

        return run_ts
    if fmt == "onnx":
        ex._require("onnxruntime", what="running ONNX models")
        import onnxruntime as ort  # optional heavy dependency: onnxruntime

        session = ort.InferenceSession(str(path), ex.ort_session_options(threads),
                                       providers=["CPUExecutionProvider"])

        def run(images: list[Tensor]) -> Detections:
            out = []
            for image in images:
                got = session.run(list(OUTPUT_NAMES),
                                  {IMAGE_NAME: image.detach().float().contiguous().numpy()})
                out.append({k: torch.from_numpy(v) for k, v in zip(OUTPUT_NAMES, got,
                                                                    strict=True)})
            return out

        return run
    raise ex.ExportError(f"unknown detector format {fmt!r}; choose one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- parity
def _pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """``IoU[i, j]`` of ``A x 4`` and ``B x 4`` xyxy boxes (0 where the union is empty)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def match_detections(reference: dict[str, Tensor], candidate: dict[str, Tensor],
                     iou_threshold: float = MATCH_IOU) -> dict[str, Any]:
    """Match one image's candidate detections to the reference's: visiting the reference
    detections by descending score, each takes the unmatched candidate detection with the same
    label and the highest IoU, when that IoU is >= ``iou_threshold``.

    Returns ``matched``, ``reference`` / ``candidate`` (counts), ``max_abs_box_diff`` (px, max
    over matched pairs and coordinates), ``max_abs_score_diff`` (matched pairs), ``identical``
    (boxes, scores and labels bit-equal) and ``differ`` (a detection unmatched on either
    side)."""
    rb, rs, rl = (reference[k].detach().cpu() for k in OUTPUT_NAMES)
    gb, gs, gl = (candidate[k].detach().cpu() for k in OUTPUT_NAMES)
    identical = (rb.shape == gb.shape and rs.shape == gs.shape and rl.shape == gl.shape
                 and torch.equal(rb, gb) and torch.equal(rs, gs) and torch.equal(rl, gl))
    matched, max_box, max_score = 0, 0.0, 0.0
    if len(rb) and len(gb):
        rb64, gb64 = rb.double(), gb.double()
        iou = _pairwise_iou(rb64, gb64)
        iou[rl.long()[:, None] != gl.long()[None, :]] = -1.0
        taken = torch.zeros(len(gb), dtype=torch.bool)
        for i in torch.argsort(rs, descending=True, stable=True).tolist():
            row = iou[i].masked_fill(taken, -1.0)
            j = int(row.argmax())
            if not float(row[j]) >= iou_threshold:
                continue
            taken[j] = True
            matched += 1
            max_box = max(max_box, float((rb64[i] - gb64[j]).abs().max()))
            max_score = max(max_score, abs(float(rs[i]) - float(gs[j])))
    return {"matched": matched, "reference": len(rb), "candidate": len(gb),
            "max_abs_box_diff": max_box, "max_abs_score_diff": max_score,
            "identical": bool(identical), "differ": matched < max(len(rb), len(gb))}


def _checked(out: Any, num_classes: int) -> tuple[dict[str, Tensor], int]:
    """The artefact's detections of one image as float boxes/scores and int64 labels, with the
    usable ones only (finite, label in ``1..K``), and how many were dropped.

    Raises :class:`~kdlab.deploy.export.ExportError` for output that is not torchvision's
    ``{"boxes": N x 4, "scores": N, "labels": N}``."""
    if not isinstance(out, dict) or any(k not in out for k in OUTPUT_NAMES):
        raise ex.ExportError("the artefact's output is not a list of {'boxes', 'scores', "
                             "'labels'} per image")
    boxes, scores, labels = (torch.as_tensor(out[k]).detach().cpu() for k in OUTPUT_NAMES)
    n = int(boxes.shape[0]) if boxes.dim() == 2 else -1
    if n < 0 or boxes.shape[-1] != 4 or tuple(scores.shape) != (n,) \
            or tuple(labels.shape) != (n,):
        raise ex.ExportError(f"the artefact returned boxes {tuple(boxes.shape)}, scores "
                             f"{tuple(scores.shape)}, labels {tuple(labels.shape)}; expected "
                             "N x 4, N, N")
    boxes, scores, labels = boxes.float(), scores.float(), labels.long()
    ok = boxes.isfinite().all(1) & scores.isfinite() & (labels >= 1) & (labels <= num_classes)
    return ({"boxes": boxes[ok], "scores": scores[ok], "labels": labels[ok]},
            int((~ok).sum()))


def _coco(image_id: int, det: dict[str, Tensor], mapping: dict[int, int]) -> list[dict[str, Any]]:
    return detections_to_coco(image_id, det["boxes"], det["scores"], det["labels"], mapping)


def check_detector_parity(reference: Callable[[list[Tensor]], Detections],
                          candidate: Callable[[list[Tensor]], Detections],
                          batches: Iterable[Any], iou_threshold: float = MATCH_IOU
                          ) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` on every batch of a detection test loader
    (``images``, ``image_ids``; its ``dataset`` gives the annotation file and label mapping).

    Returns ``test_images``; ``coco_eager`` / ``coco_exported``: the COCO metrics of each
    (:data:`~kdlab.tasks.detection.evaluation.METRIC_NAMES`, in %); ``AP_eager``,
    ``AP_exported``, ``AP_change``; ``detections_eager`` / ``detections_exported``,
    ``matched_detections``, ``max_abs_box_diff`` (px), ``max_abs_score_diff`` (over matched
    pairs, :func:`match_detections`), ``images_differing`` (a detection unmatched on either
    side), ``images_identical`` (bit-equal outputs) and ``invalid_detections`` (candidate
    detections with a non-finite value or a label outside ``1..K``, left out of its COCO
    score)."""
    dataset = batches.dataset  # type: ignore[attr-defined]
    mapping = dict(dataset.label_to_category_id)
    k = len(mapping)
    ref_coco: list[dict[str, Any]] = []
    got_coco: list[dict[str, Any]] = []
    n = identical = differing = matched = n_ref = n_got = invalid = 0
    max_box = max_score = 0.0
    with torch.inference_mode():
        for batch in batches:
            images = [im.contiguous() for im in batch.images]
            ref_out, got_out = reference(images), candidate(images)
            if len(got_out) != len(images):
                raise ex.ExportError(f"the artefact returned {len(got_out)} results for "
                                     f"{len(images)} images")
            for image_id, r, g in zip(batch.image_ids, ref_out, got_out, strict=True):
                r, _ = _checked(r, k)
                g, dropped = _checked(g, k)
                invalid += dropped
                m = match_detections(r, g, iou_threshold)
                n += 1
                identical += int(m["identical"] and not dropped)
                differing += int(m["differ"] or dropped > 0)
                matched += m["matched"]
                n_ref += m["reference"]
                n_got += m["candidate"] + dropped
                max_box = max(max_box, m["max_abs_box_diff"])
                max_score = max(max_score, m["max_abs_score_diff"])
                ref_coco += _coco(image_id, r, mapping)
                got_coco += _coco(image_id, g, mapping)
    if n == 0:
        raise ex.ExportError("the test split is empty: nothing to check the artefact on")
    m_ref = coco_metrics(dataset.annotation_file, ref_coco)
    m_got = coco_metrics(dataset.annotation_file, got_coco)
    ap_ref, ap_got = m_ref["AP"], m_got["AP"]
    change = 0.0 if math.isnan(ap_ref) and math.isnan(ap_got) else ap_got - ap_ref
    return {"test_images": n, "coco_eager": m_ref, "coco_exported": m_got,
            "AP_eager": ap_ref, "AP_exported": ap_got, "AP_change": change,
            "detections_eager": n_ref, "detections_exported": n_got,
            "matched_detections": matched, "max_abs_box_diff": max_box,
            "max_abs_score_diff": max_score, "images_differing": differing,
            "images_identical": identical, "invalid_detections": invalid,
            "match_iou": iou_threshold}


def _parity_failures(figures: dict[str, Any], tolerance: float) -> list[str]:
    """Why the parity figures fail their bounds (empty: they pass)."""
    failures = []
    change = figures["AP_change"]
    if not abs(change) <= tolerance:
        failures.append(f"|AP change| {abs(change):.3f} > {tolerance:g} AP points (eager "
                        f"{figures['AP_eager']:.2f}, exported {figures['AP_exported']:.2f})")
    if figures["invalid_detections"]:
        failures.append(f"{figures['invalid_detections']} detections with a non-finite box or "
                        "score or a label outside 1..K")
    return failures


def _versions() -> dict[str, Any]:
    """:func:`~kdlab.deploy.export.versions` plus torchvision, pycocotools and which kernels
    serve ``nms`` / ``roi_align`` (torchvision's compiled ones or kdlab's shim)."""
    backend = ops_backend()
    return {**ex.versions(), "torchvision": backend.get("torchvision"),
            "pycocotools": backend.get("pycocotools"), "nms": backend.get("nms"),
            "roi_align": backend.get("roi_align")}


def _parity_report(run: ex.StudentRun, fmt: str, path: Path, meta: dict[str, Any],
                   method: str | None, figures: dict[str, Any], failures: list[str],
                   tolerance: float) -> dict[str, Any]:
    """The content of ``FILE.parity.json`` (:func:`kdlab.deploy.export.parity_record`)."""
    return ex.parity_record(
        run, fmt, path, meta, versions_of=_versions(), task=TASK,
        categories=meta["categories"], input=meta["input"], output=meta["output"],
        dynamic_image_size=True, torchscript=method,
        onnx_opset=ONNX_OPSET if fmt == "onnx" else None, **figures, ap_tolerance=tolerance,
        passed=not failures, failures=failures)


# --------------------------------------------------------------------------- the command
def refuse_request(fmt: str, int8: bool = False) -> None:
    """Raise :class:`~kdlab.deploy.export.ExportError` (one line) for a detector export that
    cannot succeed: an unknown format, ``exported`` or ``int8`` (see the module docstring), or
    ONNX without onnx / onnxruntime. Loads nothing."""
    if int8:
        raise ex.ExportError(INT8_REFUSAL)
    if fmt == "exported":
        raise ex.ExportError(EXPORTED_REFUSAL.format(torch=torch.__version__.split("+")[0]))
    if fmt == "hub":
        raise ex.ExportError("--format hub holds classifiers in this kdlab version; for a "
                             "detector use --format state_dict (weights and metadata, read "
                             "without the run by kdlab.load_student, no pickled code) or onnx")
    if fmt not in FORMATS:
        raise ex.ExportError(f"unknown format {fmt!r} for a detector; choose one of "
                             f"{', '.join(FORMATS)}")
    if fmt == "onnx":
        ex._require("onnx", what="ONNX export")
        ex._require("onnxruntime", what="the ONNX parity check")


def _write(run: ex.StudentRun, fmt: str, path: Path, meta: dict[str, Any]) -> str | None:
    """Write the run's detector as ``fmt`` at ``path``; the TorchScript method (or None)."""
    if fmt == "state_dict":
        save_detector(run.student, path, meta)
        return None
    if fmt == "torchscript":
        return save_detector_torchscript(run.student, path, meta)
    save_detector_onnx(run.student, path, meta)
    return None


def export_detector(run_dir: str | Path, fmt: str, out: str | Path | None = None, *,
                    tolerance: float | None = None, int8: bool = False,
                    min_agreement: float | None = None, overrides: Sequence[str] = (),
                    plugins: Sequence[str] = (), checkpoint: str | Path | None = None
                    ) -> ex.ExportResult:
    """Export the trained detector of the detection run ``run_dir`` as ``fmt`` (``state_dict``,
    ``torchscript`` or ``onnx``; default file ``RUN_DIR/export/student<ext>``), read it back,
    check its parity with the eager detector on the run's test split
    (:func:`check_detector_parity`) and write ``FILE.parity.json`` next to it.
    ``tolerance``: the largest |AP change| in AP points (default
    :data:`DEFAULT_AP_TOLERANCE`). ``min_agreement`` (a classification bound) and ``int8``
    are refused for detectors.

    Raises :class:`~kdlab.deploy.export.ExportError` (refused or unknown format, missing
    package, exporter failure) before writing anything, and
    :class:`~kdlab.deploy.export.ParityError` after writing both files when the check fails."""
    refuse_request(fmt, int8)
    if min_agreement is not None:
        raise ex.ExportError("--min-agreement is a classification bound (top-1 agreement); a "
                             "detector's parity bound is --tolerance in AP points")
    tolerance = DEFAULT_AP_TOLERANCE if tolerance is None else float(tolerance)
    run = load_detector_run(run_dir, overrides, plugins, checkpoint)
    path = Path(out) if out else ex.default_path(run.run_dir, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**detector_metadata(run), "precision": "fp32"}
    method = _write(run, fmt, path, meta)
    log.info("wrote %s (%.2f MB%s)", path, path.stat().st_size / 1e6,
             f", torch.jit.{method}" if method else "")
    figures = check_detector_parity(run.student, load_detector_artefact(path, fmt,
                                                                        plugins=plugins),
                                    run.data.test_loader)
    failures = _parity_failures(figures, tolerance)
    report = _parity_report(run, fmt, path, meta, method, figures, failures, tolerance)
    ppath = ex.parity_path(path)
    atomic_write(ppath, json.dumps(report, indent=2) + "\n")
    log.info("parity on %d test images: AP eager %.2f vs exported %.2f (%+.3f), %d images "
             "identical, %d differing, max |box diff| %.3g px, max |score diff| %.3g",
             figures["test_images"], figures["AP_eager"], figures["AP_exported"],
             figures["AP_change"], figures["images_identical"], figures["images_differing"],
             figures["max_abs_box_diff"], figures["max_abs_score_diff"])
    if failures:
        raise ex.ParityError(f"parity check of {path} failed: {'; '.join(failures)} (files "
                             f"kept; see {ppath.name})")
    return ex.ExportResult(path=path, parity_path=ppath, report=report)


def export_summary(result: ex.ExportResult) -> str:
    """One line for the CLI: file, format, AP of both, agreement, parity report."""
    r = result.report
    how = f" (torch.jit.{r['torchscript']})" if r.get("torchscript") else ""
    return (f"{result.path}: fp32 {r['format']}{how}, AP {r['AP_eager']:.2f} eager, "
            f"{r['AP_exported']:.2f} exported ({r['AP_change']:+.3f}); "
            f"{r['images_identical']}/{r['test_images']} test images identical, "
            f"{r['images_differing']} differing, max |box diff| {r['max_abs_box_diff']:.3g} px, "
            f"max |score diff| {r['max_abs_score_diff']:.3g}; {result.parity_path}")


# --------------------------------------------------------------------------- latency
#: the artefact file of each latency runtime.
_LATENCY_SUFFIX = {"eager": ".pt", "torchscript": ".ts", "onnxruntime": ".onnx"}


def detector_macs(model: nn.Module, image: Tensor) -> int:
    """Multiply-accumulates of the detector on ``image`` (``FlopCounterMode`` FLOPs / 2, as
    :func:`~kdlab.deploy.latency.count_macs`): backbone, FPN, RPN head and the box head on the
    image's proposals (their number depends on the image)."""
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model([image])
    model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _timing_callable(spec: dict[str, Any]) -> tuple[Callable[[], Any],
                                                    AbstractContextManager[Any]]:
    """The timed call of a worker (one image per call) and the context to run it in."""
    threads, runtime, path = int(spec["threads"]), spec["runtime"], spec["path"]
    image = np.load(spec["image"])
    if runtime == "onnxruntime":
        import onnxruntime as ort  # optional heavy dependency: onnxruntime

        session = ort.InferenceSession(path, ex.ort_session_options(threads),
                                       providers=["CPUExecutionProvider"])
        return (lambda: session.run(None, {IMAGE_NAME: image})), nullcontext()
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    x = torch.from_numpy(image)
    model: Any = (read_detector(path, list(spec.get("plugins", []))) if runtime == "eager"
                  else load_detector_artefact(path, "torchscript"))
    return (lambda: model([x])), torch.inference_mode()


def measure_detector(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one detector configuration in this process (a worker's job, one image per call).

    ``spec``: ``runtime`` (eager, torchscript, onnxruntime), ``path`` (the artefact),
    ``image`` (a ``.npy`` file of one ``3 x H x W`` float image), ``threads``, ``warmup``,
    ``runs`` and, for eager models of plugins, ``plugins``. Returns
    :func:`~kdlab.deploy.latency.summarize`'s figures plus the raw ``times_ms``."""
    fn, ctx = _timing_callable(spec)
    return lat.time_calls(fn, ctx, int(spec["warmup"]), int(spec["runs"]))


class _DetectorRows:
    """The artefacts and rows of one detector latency measurement (the parent side)."""

    def __init__(self, run: ex.StudentRun, settings: lat.LatencySettings, work: Path,
                 image: Tensor) -> None:
        self.run, self.settings, self.work, self.image = run, settings, work, image
        self.image_path = work / "image.npy"
        np.save(self.image_path, image.numpy())

    def write(self, models: dict[str, Detector], info: dict[str, dict[str, Any]],
              runtimes: list[str], notes: list[str]) -> dict[tuple[str, str], Path]:
        """Every model in every runtime in the work folder; a model a runtime cannot take is
        skipped with a note."""
        artefacts: dict[tuple[str, str], Path] = {}
        for role, model in models.items():
            meta = detector_metadata(self.run, arch=info[role]["arch"])
            for rt in runtimes:
                path = self.work / f"{role}{_LATENCY_SUFFIX[rt]}"
                try:
                    if rt == "eager":
                        save_detector(model, path, meta)
                    elif rt == "torchscript":
                        info[role]["torchscript"] = save_detector_torchscript(model, path, meta)
                    else:
                        save_detector_onnx(model, path, meta)
                except ex.ExportError as e:
                    notes.append(f"{role} {rt} skipped: {e}")
                    log.warning("%s %s skipped: %s", role, rt, e)
                    continue
                artefacts[(role, rt)] = path
        return artefacts

    def time(self, info: dict[str, dict[str, Any]], runtimes: list[str],
             artefacts: dict[tuple[str, str], Path]) -> list[dict[str, Any]]:
        """One worker per runtime x model; the table's rows (batch size 1)."""
        s = self.settings
        rows: list[dict[str, Any]] = []
        index = 0
        for rt in runtimes:
            for role in info:
                path = artefacts.get((role, rt))
                if path is None:
                    continue
                spec = {"runtime": rt, "path": str(path), "image": str(self.image_path),
                        "threads": s.threads, "warmup": s.warmup, "runs": s.runs,
                        "plugins": list(self.run.cfg.plugins)}
                log.info("timing %s %s (%s), one %dx%d image per call", role,
                         info[role]["arch"], rt, *self.image.shape[1:])
                res = lat._spawn(spec, self.work, index, s.timeout_s,
                                 module="kdlab.deploy.detection")
                index += 1
                row = {"model": role, "arch": info[role]["arch"], "runtime": rt,
                       "precision": "fp32", "batch_size": 1, "threads": s.threads,
                       "warmup": s.warmup, "runs": s.runs, **info[role],
                       "image_size": list(self.image.shape[1:]),
                       "artefact_mb": round(path.stat().st_size / 1e6, 3), **res}
                if "p50_ms" in row:
                    row["ms_per_image"] = row["p50_ms"]
                    row["images_per_s"] = 1e3 / row["p50_ms"]
                else:
                    log.warning("%s %s failed: %s", role, rt, row["error"])
                rows.append(row)
        return rows


def _latency_runtimes(wanted: Sequence[str], notes: list[str]) -> list[str]:
    """The fp32 runtimes of ``wanted`` that can run here; a note for each int8 one."""
    fp32 = [rt for rt in wanted if lat.PRECISION.get(rt) != "int8"]
    if not fp32:
        raise lat.LatencyError(f"{', '.join(wanted)}: kdlab's int8 paths quantise "
                               "classifiers, not detectors; use --runtimes eager torchscript "
                               "onnxruntime")
    for rt in wanted:
        if rt not in fp32:
            notes.append(LATENCY_INT8_NOTE.format(rt=rt))
            log.warning("%s", notes[-1])
    return lat._available_runtimes(fp32, notes)


def run_detector_latency(run_dir: str | Path, settings: lat.LatencySettings | None = None,
                         out: str | Path | None = None, overrides: Sequence[str] = (),
                         plugins: Sequence[str] = ()) -> dict[str, Any]:
    """``kdlab latency`` for a detection run: time the detector (and the run's teacher, when it
    has one) in each fp32 runtime of ``settings`` under :mod:`kdlab.deploy.latency`'s
    protocol, one image per call: the first test image (its size recorded as
    ``image_size``; the model resizes it to ``detection.min_size``/``max_size``). Writes
    ``latency.json`` and ``latency.md`` to ``out`` (default ``RUN_DIR/latency``) and returns
    the result, whose rows add ``ms_per_image`` (= p50) and ``images_per_s`` (= 1000 / p50).

    Batch sizes other than 1 are noted and not timed (the ONNX graph takes one image). The
    int8 runtimes are noted and skipped; :class:`~kdlab.deploy.latency.LatencyError` (one
    line) when nothing else is asked for. Rows whose worker failed carry an ``error``."""
    settings = settings or lat.LatencySettings()
    settings.check()
    notes: list[str] = []
    runtimes = _latency_runtimes(settings.runtimes, notes)
    run = load_detector_run(run_dir, overrides, plugins)
    if tuple(settings.batch_sizes) != (1,):
        notes.append("detectors are timed one image per call (batch size 1; the ONNX graph "
                     "takes one image): --batch-sizes is not used")
    out_dir = Path(out) if out else run.run_dir / "latency"
    models = lat._models(run, notes)
    image = next(iter(run.data.test_loader)).images[0].cpu().float().contiguous()
    info = {role: {"arch": (run.cfg.teacher.arch if role == "teacher" else run.cfg.student.arch),
                   "parameters": sum(int(p.numel()) for p in m.parameters()),
                   "macs_per_image": detector_macs(m, image)}
            for role, m in models.items()}
    load_start = lat._load()
    warn = lat._machine_warnings(settings.threads, load_start)
    with tempfile.TemporaryDirectory(prefix="kdlab-latency-") as tmp:
        rows_of = _DetectorRows(run, settings, Path(tmp), image)
        artefacts = rows_of.write(models, info, runtimes, notes)
        rows = rows_of.time(info, runtimes, artefacts)
    result = lat._result(run, settings, info, rows, notes, warn, load_start)
    result["task"] = TASK
    result["versions"] = _versions()
    result["input"] = {"image": "the first test image", "image_size": list(image.shape[1:]),
                       "min_size": run.data.detection.min_size,
                       "max_size": run.data.detection.max_size, "images_per_call": 1}
    out_dir.mkdir(parents=True, exist_ok=True)
    result["json"] = str(out_dir / "latency.json")
    result["markdown"] = str(out_dir / "latency.md")
    atomic_write(out_dir / "latency.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out_dir / "latency.md", lat.format_markdown(result))
    return result


def _worker_main(argv: Sequence[str]) -> int:
    return lat.run_worker(argv, "python -m kdlab.deploy.detection", measure_detector)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
