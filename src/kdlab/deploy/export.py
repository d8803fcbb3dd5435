"""Deployment artefacts of a run's student (``kdlab export``), each checked against the eager model.

A run's ``checkpoints/best.pt`` holds the student's weights alone (no teacher, no distiller helper
modules). :func:`export_run` loads them into the student, wraps it in :class:`LogitsOnly` (images
in, plain ``B x K`` logits out: no :class:`~kdlab.models.output.ModelOutput`) and writes one
artefact:

==============  ==================  =========================================================
format          default file        how it is made / read back
==============  ==================  =========================================================
``state_dict``  ``student.pt``      weights + ``arch``/``num_classes``/``in_channels`` metadata
                                    (:func:`save_student` / :func:`read_student`); ``kdlab eval
                                    --checkpoint`` reads it too
``torchscript`` ``student.ts``      :func:`torch.jit.trace`; :func:`torch.jit.load`
``exported``    ``student.pt2``     :func:`torch.export.export` with a dynamic batch dimension,
                                    :func:`torch.export.save`; :func:`torch.export.load`
``onnx``        ``student.onnx``    ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch
                                    dimension (needs onnx + onnxscript); onnxruntime
==============  ==================  =========================================================

The default folder is ``RUN_DIR/export``. ``--int8`` is post-training static quantisation for
x86 CPUs, calibrated on the first N batches (``--batches``) of clean training images: the
training split through the evaluation transform, no augmentation, in a seeded order
(:func:`~kdlab.data.build.clean_train_loader`). Two formats take it (:data:`INT8_FORMATS`):

- ``--format torchscript --int8`` (``student.int8.ts``): FX graph mode
  (``torch.ao.quantization.quantize_fx`` ``prepare_fx``/``convert_fx`` with the ``"x86"``
  qconfig mapping, i.e. the oneDNN/FBGEMM x86 kernels), saved as TorchScript, the only torch
  format that can carry the quantised modules in torch 2.13;
- ``--format onnx --int8`` (``student.int8.onnx``): the fp32 ONNX export, then onnxruntime's
  ``quantize_static`` in the QDQ format (:mod:`kdlab.deploy.onnx_int8`), run in onnxruntime.

**Parity check.** Every artefact is read back from disk and run over the run's whole test set
next to the eager fp32 student: top-1 agreement (% of test images whose argmax matches), the
maximum absolute logit difference, and the top-1 accuracy of both. The figures are logged and
written beside the file as ``FILE.parity.json`` with versions, date and machine. An fp32
artefact fails when the agreement is below ``min_agreement`` (default 99.9 %) or the difference
above ``tolerance`` (default 1e-3); an int8 one when the agreement is below 95 %. A failure
raises :class:`ParityError` after the files are written (they are kept for inspection).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.export import Dim

from kdlab.core.env import machine_info, named_cpu_flags
from kdlab.core.errors import KdlabError
from kdlab.core.io import atomic_write, file_sha256
from kdlab.core.version import __version__
from kdlab.core.weights_file import read_verified
from kdlab.data.build import clean_train_loader
from kdlab.data.input_spec import InputSpec
from kdlab.deploy.onnx_int8 import (
    CALIBRATION_DATA,
    OnnxInt8Error,
    OnnxInt8Settings,
    quantize_onnx_int8,
)
from kdlab.runs.checkpoint import save_atomic
from kdlab.runs.open import open_run
from kdlab.runs.student import read_student_file

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CALIBRATION_BATCHES",
    "DEFAULT_MIN_AGREEMENT",
    "DEFAULT_MIN_AGREEMENT_INT8",
    "DEFAULT_TOLERANCE",
    "EXTENSIONS",
    "FORMATS",
    "INPUT_NAME",
    "INSTALL_HINT",
    "INT8_BACKEND",
    "INT8_FORMATS",
    "METADATA_KEY",
    "OUTPUT_NAME",
    "STUDENT_FORMAT_VERSION",
    "STUDENT_KIND",
    "ExportError",
    "ExportResult",
    "LogitsOnly",
    "ParityError",
    "StudentRun",
    "calibration_images",
    "check_parity",
    "deployable",
    "default_path",
    "export_run",
    "load_artefact",
    "load_run",
    "ort_session_options",
    "parity_path",
    "quantize_int8",
    "read_student",
    "save_exported",
    "save_onnx",
    "save_student",
    "save_torchscript",
    "set_onnx_metadata",
    "versions",
]

#: the export formats, in the order the CLI lists them.
FORMATS = ("state_dict", "torchscript", "exported", "onnx")
#: file name extension of each format (``student`` + extension is the default file name).
EXTENSIONS = {"state_dict": ".pt", "torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx"}
#: formats that can hold the int8 model: TorchScript (torch FX quantisation) and ONNX
#: (onnxruntime's ``quantize_static``, :mod:`kdlab.deploy.onnx_int8`). In torch 2.13
#: ``torch.export`` fails on FX-quantised modules (``Conv2dPackedParamsBase`` has no
#: ``__obj_flatten__``), and a state dict of packed parameters cannot be loaded without
#: re-running ``prepare_fx``/``convert_fx`` on the exact float graph.
INT8_FORMATS = ("torchscript", "onnx")
#: ``kind`` of the student-only weights file written by :func:`save_student`.
STUDENT_KIND = "kdlab-student"
STUDENT_FORMAT_VERSION = 1
#: fp32 parity: max |logit difference| allowed. Kernel differences between runtimes are ~1e-6
#: on trained CIFAR-size models; an export bug (train-mode BatchNorm, a dropped layer, other
#: weights) moves logits by far more.
DEFAULT_TOLERANCE = 1e-3
#: parity: minimum top-1 agreement (%) with the eager fp32 student.
DEFAULT_MIN_AGREEMENT = 99.9
DEFAULT_MIN_AGREEMENT_INT8 = 95.0
#: what to try when an int8 artefact of a format fails its parity check (appended to the error).
INT8_KNOBS = {
    "torchscript": (
        "; to close the gap: calibrate on more batches (--batches N), keep the model in "
        "fp32 (drop --int8) or export ONNX and run it in fp32, or fine-tune the student "
        "longer, since an undertrained student's close logits flip under int8 rounding"),
    "onnx": (
        "; to close the gap: calibrate on more batches (--batches N), change the calibration "
        "method (--calibration-method percentile or entropy) or the weight scales "
        "(--per-tensor), keep the model in fp32 (drop --int8), or fine-tune the student "
        "longer, since an undertrained student's close logits flip under int8 rounding"),
}
#: training batches that calibrate the int8 observers.
DEFAULT_CALIBRATION_BATCHES = 10
#: the quantisation backend and qconfig mapping of ``--int8``.
INT8_BACKEND = "x86"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
#: the name of kdlab's metadata in every artefact: the ``kdlab.json`` extra file of TorchScript
#: and ``torch.export`` files, the ONNX ``metadata_props`` key ``kdlab``.
METADATA_KEY = "kdlab"
INSTALL_HINT = "pip install -e '.[export]' in the kdlab clone"


class ExportError(KdlabError):
    """An artefact cannot be made: unsupported format or combination, a missing optional
    package, or a model the exporter cannot trace."""


class ParityError(ExportError):
    """An artefact's outputs differ from the eager student's beyond the allowed bounds (its files
    are kept). Exit status 4."""

    exit_code = 4


class LogitsOnly(nn.Module):
    """``images -> model(images).logits``: the deployable view of a kdlab classifier.

    kdlab models return a :class:`~kdlab.models.output.ModelOutput` (logits, features, ...) for
    the distillation methods; a deployed student needs only the ``B x K`` logits. The wrapped
    model is the attribute ``model`` (state-dict keys gain the prefix ``model.``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images).logits


def deployable(model: nn.Module) -> nn.Module:
    """``model`` as name-based tracers (``torch.export``, FX) can walk it.

    :class:`~kdlab.models.cifar._common.AliasedHeadModel` keeps a head stored at a dotted path
    (MobileNetV2: ``classifier.0``; the ImageNet MobileNetV2: ``classifier.1``) and exposes it as
    the property ``classifier``, which shadows the stored ``classifier`` container: the tracers
    resolve ``model.classifier.0`` by ``getattr`` and fail ("Linear has no attribute `0`"). The
    copy returned here resolves ``classifier`` to the stored container instead. That container
    holds only the head (plus, for ImageNet, a dropout that is the identity in eval mode), so the
    function is unchanged; this is checked on a probe batch, and ``model`` itself is returned
    when the outputs differ. Other models are returned as they are.
    """
    cls = type(model)
    path = getattr(cls, "_head_path", None)
    if not isinstance(path, str) or not path.startswith("classifier."):
        return model
    twin = copy.deepcopy(model).eval()
    twin.__class__ = type(cls.__name__, (cls,), {
        "__module__": cls.__module__,
        "classifier": property(lambda self: self._modules["classifier"]),
    })
    size = 32
    probe = torch.randn(2, int(getattr(model, "in_channels", 3)), size, size,
                        generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        same = torch.equal(twin(probe).logits, model(probe).logits)
    model.train(was_training)
    return twin if same else model


# --------------------------------------------------------------------------- versions, machine
def versions() -> dict[str, str | None]:
    """Installed versions of kdlab, torch and the optional export packages (None: missing).

    Read from the package metadata, so nothing is imported."""
    out: dict[str, str | None] = {"kdlab": __version__, "torch": torch.__version__}
    for name in ("numpy", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _machine() -> dict[str, Any]:
    info = machine_info(torch.device("cpu"))
    info["cpu_flags"] = named_cpu_flags()
    return info


def _require(*modules: str, what: str) -> None:
    """Import ``modules`` or raise :class:`ExportError` naming the extra to install."""
    for name in modules:
        try:
            __import__(name)
        except ImportError as e:
            raise ExportError(f"{what} needs the {name} package, which is not installed: "
                              f"{INSTALL_HINT}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


#: loggers whose INFO lines (ONNX optimiser passes) and registry warnings ("torchvision is not
#: installed") are noise for a kdlab user.
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' known noise (not their real warnings): torch's own FutureWarnings,
    the torch.ao and quantized-tensor deprecation notices (docs/deployment.md records them),
    observer ``reduce_range`` notices, and the ONNX optimiser's log lines."""
    quiet = {name: logging.getLogger(name) for name in _NOISY_LOGGERS}
    levels = {name: lg.level for name, lg in quiet.items()}
    for lg in quiet.values():
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            yield
    finally:
        for name, lg in quiet.items():
            lg.setLevel(levels[name])


def _write_via_tmp(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``path.tmp`` and a rename: a reader never sees a torn file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # torch.export wants a .pt2 name
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the run's student
@dataclass
class StudentRun:
    """A run's trained student (eval mode, CPU) with its config, data and checkpoint record."""

    run_dir: Path
    cfg: Any
    task: Any
    checkpoint: Path
    record: dict[str, Any]
    data: Any
    student: nn.Module
    input_spec: InputSpec | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        return (int(self.data.in_channels), int(self.data.input_size), int(self.data.input_size))

    def metadata(self) -> dict[str, Any]:
        """What a deployment needs to know besides the weights: architecture, class count,
        input layout and normalisation, where the weights come from."""
        ds = getattr(self.data.test_loader, "dataset", None)
        mean, std = getattr(ds, "mean", None), getattr(ds, "std", None)
        return {
            "kind": STUDENT_KIND,
            "format_version": STUDENT_FORMAT_VERSION,
            "arch": self.cfg.student.arch,
            "num_classes": int(self.data.num_classes),
            "in_channels": int(self.data.in_channels),
            "input_size": int(self.data.input_size),
            "task": self.cfg.task,
            "plugins": list(self.cfg.plugins),
            "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                      "normalisation": "(pixel / 255 - mean) / std",
                      "mean": None if mean is None else list(mean),
                      "std": None if std is None else list(std)},
            "output": {"name": OUTPUT_NAME, "meaning": "class logits (B x num_classes)"},
            "classes": None if self.input_spec is None else list(self.input_spec.classes),
            "input_spec": None if self.input_spec is None else self.input_spec.to_dict(),
            "source": self.source("top1"),
        }

    def source(self, metric: str) -> dict[str, Any]:
        """Where the exported weights come from: the run, the checkpoint, its epoch and its
        ``metric`` (the task's best metric: top1, AP, mIoU)."""
        return {"run_dir": str(self.run_dir), "checkpoint": str(self.checkpoint),
                "epoch": self.record.get("epoch"), metric: self.record.get(metric)}


def load_run(run_dir: str | Path, overrides: Sequence[str] = (), plugins: Sequence[str] = (),
             checkpoint: str | Path | None = None) -> StudentRun:
    """The trained student of ``run_dir`` (``checkpoints/best.pt`` unless ``checkpoint``), on the
    CPU in eval mode, with the run's config (plus ``overrides``) and its data on the CPU.
    ``plugins`` (with ``$KDLAB_PLUGINS``) are the plugins the caller trusts: the ones the run's
    config names are never imported (:func:`~kdlab.runs.open.open_run`).

    Raises :class:`~kdlab.core.errors.RunError` for a folder that is no run,
    :class:`~kdlab.core.errors.PluginError` for a run naming a plugin not trusted,
    :class:`~kdlab.core.errors.CheckpointError` for a missing, corrupt or mismatching checkpoint and
    :class:`ExportError` for a task other than classification.
    """
    run = open_run(run_dir, overrides, plugins)
    if run.cfg.task == "detection":  # kdlab.deploy.detection imports this module, not back
        raise ExportError(f"run {run_dir} is a detection run: `kdlab export` / `kdlab latency` "
                          "take it, or call kdlab.deploy.detection.export_detector / "
                          "run_detector_latency")
    if run.cfg.task == "segmentation":  # kdlab.deploy.segmentation imports this module, not back
        raise ExportError(f"run {run_dir} is a segmentation run: `kdlab export` takes it, or call "
                          "kdlab.deploy.segmentation.export_segmenter (`kdlab latency` does not "
                          "time segmentation students yet)")
    if not run.task.exportable:
        raise ExportError(f"run {run_dir} is a {run.cfg.task!r} run; export handles "
                          "classification students (images in, logits out)")
    student, state, path = run.student_and_record(checkpoint or "best")
    record = {k: v for k, v in state.items() if isinstance(v, int | float | str)}
    return StudentRun(run_dir=run.path, cfg=run.cfg, task=run.task, checkpoint=path,
                      record=record, data=run.data(), student=student,
                      input_spec=run.input_spec(state))


# --------------------------------------------------------------------------- the four formats
def save_student(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write the student-only weights file: ``metadata`` (``arch``, ``num_classes``,
    ``in_channels``, ...) plus ``"model"``: the state dict, with kdlab's sha256 integrity key.

    ``kdlab eval RUN --checkpoint FILE`` reads it (its weights sit under ``"model"``, like a
    run's ``best.pt``), and :func:`read_student` rebuilds the model from it alone.
    """

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({**metadata, "kind": STUDENT_KIND, "model": state}, path, keep_previous=False)


def save_task_student(model: nn.Module, path: str | Path, metadata: dict[str, Any],
                      task: str) -> None:
    """:func:`save_student` for a task whose model is rebuilt from its config section
    (``detection``, ``segmentation``): ``metadata`` must hold ``task`` and that section, which
    :func:`kdlab.runs.student.read_student_file` rebuilds the model from."""
    if metadata.get("task") != task or not isinstance(metadata.get(task), dict):
        raise ExportError(f"a {task} student file needs metadata with task {task!r} and the "
                          f"{task!r} config section (the run's metadata from kdlab.deploy."
                          f"{task})")
    save_student(model, path, metadata)


def read_student(path: str | Path, plugins: Sequence[str] = ()) -> nn.Module:
    """The model of a :func:`save_student` file (eval mode, CPU), rebuilt from its metadata
    and loaded strictly, with ``kdlab_meta`` and ``preprocess`` attached
    (:func:`kdlab.runs.student.read_student_file`, which also reads detector files).

    The file is data: the plugins it lists are never imported. Models of plugins need the
    caller to trust them: ``plugins`` and ``$KDLAB_PLUGINS`` are imported, and every plugin
    the file lists must be among them.

    Raises:
        CheckpointError: not a kdlab student file, or its weights do not fit.
        PluginError: one line, when the file lists a plugin the caller did not trust (nothing
            is imported then), or a trusted plugin cannot be imported.
    """
    return read_student_file(path, plugins)


def _dynamic_batch() -> dict[str, dict[int, Any]]:
    return {INPUT_NAME: {0: Dim("batch", min=1)}}


def save_torchscript(module: nn.Module, path: str | Path, example: Tensor,
                     metadata: dict[str, Any] | None = None, quantized: bool = False) -> None:
    """``torch.jit.trace(module, example)`` saved to ``path`` (``metadata`` as the extra file
    ``kdlab.json``). The traced graph takes any batch size. ``quantized``: ``module`` comes from
    :func:`quantize_int8`, whose scales and zero points are meant to become constants (the
    tracer's warnings about that are silenced).

    TorchScript is deprecated in torch 2.13 (``torch.jit.trace/save/load`` warn so) and not
    supported on Python 3.14+; prefer ``exported`` for fp32 artefacts."""
    try:
        with _quiet_exporters(), torch.no_grad(), warnings.catch_warnings():
            if quantized:
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(module.eval(), example)
    except Exception as e:  # the tracer raises many types
        raise ExportError(f"TorchScript tracing failed: {_first_line(e)}") from e
    extra = {"kdlab.json": json.dumps(metadata or {})}

    def write(p: Path) -> None:
        with _quiet_exporters():
            torch.jit.save(traced, str(p), _extra_files=extra)

    _write_via_tmp(Path(path), write)


def save_exported(module: nn.Module, path: str | Path, example: Tensor,
                  metadata: dict[str, Any] | None = None) -> None:
    """``torch.export.export`` with a dynamic batch dimension (``Dim("batch", min=1)``),
    ``torch.export.save``d to ``path`` with ``metadata`` as the extra file ``kdlab.json``."""
    try:
        with _quiet_exporters():
            program = torch.export.export(module.eval(), (example,),
                                          dynamic_shapes=_dynamic_batch())
    except Exception as e:
        raise ExportError(f"torch.export failed: {_first_line(e)}") from e
    extra = {"kdlab.json": json.dumps(metadata or {})}
    _write_via_tmp(Path(path), lambda p: torch.export.save(program, str(p), extra_files=extra))


def save_onnx(module: nn.Module, path: str | Path, example: Tensor,
              metadata: dict[str, Any] | None = None) -> None:
    """``torch.onnx.export(..., dynamo=True)`` with a dynamic batch dimension: input
    ``images`` (``batch x C x H x W``), output ``logits``, ``metadata`` as the JSON of the
    model's ``metadata_props`` entry ``kdlab`` (:func:`set_onnx_metadata`). Needs onnx and
    onnxscript."""
    _require("onnx", "onnxscript", what="ONNX export")
    try:
        with _quiet_exporters():
            program = torch.onnx.export(module.eval(), (example,), dynamo=True,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=_dynamic_batch(), verbose=False)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"ONNX export failed: {_first_line(e)}") from e
    if program is None:  # pragma: no cover - only the legacy exporter returns None
        raise ExportError("ONNX export returned no program")
    _write_via_tmp(Path(path), lambda p: program.save(str(p)))
    if metadata is not None:
        set_onnx_metadata(path, metadata)


def set_onnx_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Store ``metadata`` (JSON) in the ONNX file's ``metadata_props`` under the key
    ``kdlab`` (what :func:`read_metadata` returns), keeping the other entries."""
    import onnx  # optional heavy dependency: onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = json.dumps(metadata)
    onnx.helper.set_model_props(model, props)
    _write_via_tmp(Path(path), lambda p: onnx.save(model, str(p)))


def quantize_int8(model: nn.Module, calibration: Iterable[Tensor], example: Tensor
                  ) -> nn.Module:
    """Post-training static int8 quantisation of ``LogitsOnly(model)`` for x86 CPUs.

    FX graph mode (``prepare_fx`` with ``get_default_qconfig_mapping("x86")``: per-channel
    symmetric int8 weights, affine uint8 activations with histogram observers), the observers
    calibrated on the ``calibration`` images, then ``convert_fx``. ``model`` is not changed.
    Uses ``torch.ao.quantization``, which torch deprecates in favour of torchao but which still
    works in torch 2.13 (its pt2e entry point ``quantize_pt2e`` is gone there).
    """
    if INT8_BACKEND not in torch.backends.quantized.supported_engines:
        raise ExportError(f"int8 needs torch's {INT8_BACKEND!r} quantized engine, which this "
                          f"build lacks (it has {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = INT8_BACKEND
    float_model = LogitsOnly(copy.deepcopy(deployable(model)).cpu()).eval()
    with _quiet_exporters():
        try:
            prepared = prepare_fx(float_model, get_default_qconfig_mapping(INT8_BACKEND),
                                  example_inputs=(example,))
        except Exception as e:
            raise ExportError(f"int8: FX cannot trace this model: {_first_line(e)}") from e
        seen = 0
        with torch.no_grad():
            for images in calibration:
                prepared(images)
                seen += 1
        if seen == 0:
            raise ExportError("int8: no calibration batch (empty training set?)")
        return convert_fx(prepared).eval()


def load_artefact(path: str | Path, fmt: str, threads: int | None = None,
                  plugins: Sequence[str] = ()) -> Callable[[Tensor], Tensor]:
    """Read an artefact back from disk as ``images -> logits`` (CPU tensors): the state-dict
    file through :func:`read_student` (trusting ``plugins``), TorchScript (fp32 or int8)
    through ``torch.jit.load``, a program through ``torch.export.load``, ONNX through an
    onnxruntime CPU session returning the graph's output (``logits``, or ``probabilities`` for
    a graph made with ``--include-preprocessing --probabilities``)."""
    path = Path(path)
    if fmt == "state_dict":
        return LogitsOnly(read_student(path, plugins)).eval()
    if fmt == "torchscript":
        if INT8_BACKEND in torch.backends.quantized.supported_engines:
            torch.backends.quantized.engine = INT8_BACKEND  # int8 packed weights unpack for it
        with _quiet_exporters():
            return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "exported":
        with _quiet_exporters():
            return torch.export.load(str(path)).module()
    if fmt == "onnx":
        _require("onnxruntime", what="running ONNX models")
        import onnxruntime as ort  # optional heavy dependency: onnxruntime

        session = ort.InferenceSession(str(path), ort_session_options(threads),
                                       providers=["CPUExecutionProvider"])
        output = session.get_outputs()[0].name

        def run(images: Tensor) -> Tensor:
            out = session.run([output], {INPUT_NAME: images.detach().contiguous().numpy()})
            return torch.from_numpy(out[0])

        return run
    raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def ort_session_options(threads: int | None = None) -> Any:
    """onnxruntime CPU session options: ``threads`` intra-op threads (None: onnxruntime's
    default), one inter-op thread, sequential execution, no spinning threads."""
    import onnxruntime as ort  # optional heavy dependency: onnxruntime

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only
    return so


# --------------------------------------------------------------------------- parity
def check_parity(reference: Callable[[Tensor], Tensor], candidate: Callable[[Tensor], Tensor],
                 batches: Iterable[Any]) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` on every ``(images, labels, ...)`` batch.

    Returns ``test_images``; ``top1_agreement``: 100 * #{argmax candidate == argmax reference}
    / N; ``max_abs_logit_diff``: max over images and classes of |candidate - reference| (NaN
    if the candidate gave a non-finite logit); ``top1_eager`` / ``top1_exported``: top-1
    accuracy (%) of each against the labels, and ``top1_change`` = exported - eager.
    """
    n = agree = hit_ref = hit_cand = 0
    max_diff = 0.0
    with torch.inference_mode():
        for batch in batches:
            images, labels = batch[0].contiguous(), batch[1]
            ref = reference(images).float()
            got = candidate(images).float()
            if tuple(got.shape) != tuple(ref.shape):
                raise ExportError(f"the artefact returned logits of shape {tuple(got.shape)}, "
                                  f"the eager student {tuple(ref.shape)}")
            d = float((got - ref).abs().max()) if got.isfinite().all() else math.nan
            if math.isnan(d):
                max_diff = math.nan
            elif not math.isnan(max_diff):
                max_diff = max(max_diff, d)
            pr, pg = ref.argmax(1), got.argmax(1)
            agree += int((pr == pg).sum())
            hit_ref += int((pr == labels).sum())
            hit_cand += int((pg == labels).sum())
            n += int(labels.shape[0])
    if n == 0:
        raise ExportError("the test set is empty: nothing to check the artefact on")
    top1_ref, top1_cand = 100.0 * hit_ref / n, 100.0 * hit_cand / n
    return {"test_images": n, "top1_agreement": 100.0 * agree / n,
            "max_abs_logit_diff": max_diff, "top1_eager": top1_ref,
            "top1_exported": top1_cand, "top1_change": top1_cand - top1_ref}


def parity_path(path: str | Path) -> Path:
    """Where the parity report of artefact ``path`` goes: ``path`` + ``.parity.json``."""
    path = Path(path)
    return path.with_name(path.name + ".parity.json")


def _tensor_elements(path: Path, fmt: str) -> int | None:
    """Elements of all weight tensors stored in an fp32 artefact (parameters and buffers; the
    ONNX exporter folds BatchNorm into the convolutions, so there it is smaller)."""
    if fmt == "state_dict":
        return sum(int(v.numel()) for v in read_verified(path)["model"].values())
    if fmt == "torchscript":
        with _quiet_exporters():
            module = torch.jit.load(str(path))
        return sum(int(v.numel()) for v in module.state_dict().values())
    if fmt == "exported":
        with _quiet_exporters():
            return sum(int(v.numel()) for v in torch.export.load(str(path)).state_dict.values())
    if fmt == "onnx":
        import onnx  # optional heavy dependency: onnx

        return sum(math.prod(t.dims) for t in onnx.load(str(path)).graph.initializer)
    return None


# --------------------------------------------------------------------------- the command
@dataclass
class ExportResult:
    """What :func:`export_run` wrote: the artefact, its parity report and the report's content."""

    path: Path
    parity_path: Path
    report: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])


def default_path(run_dir: str | Path, fmt: str, int8: bool = False) -> Path:
    """``RUN_DIR/export/student<.int8><ext>``."""
    return Path(run_dir) / "export" / f"student{'.int8' if int8 else ''}{EXTENSIONS[fmt]}"


def calibration_images(loader: Any, n_batches: int) -> Iterator[Tensor]:
    """The images of the first ``n_batches`` batches of ``loader`` (a training loader: epoch 0
    of its order and augmentation, so the calibration set is reproducible)."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(0)
    for i, batch in enumerate(loader):
        if i >= n_batches:
            return
        yield batch[0].contiguous()


def _check_request(fmt: str, int8: bool, calibration_batches: int) -> None:
    """Raise :class:`ExportError` for a request that cannot succeed, before loading anything."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if int8 and fmt not in INT8_FORMATS:
        raise ExportError(f"--int8 supports --format {' or '.join(INT8_FORMATS)} only: in torch "
                          f"{torch.__version__.split('+')[0]} the FX-quantised model cannot be "
                          f"saved as {fmt}")
    if int8 and calibration_batches < 1:
        raise ExportError(f"--batches must be >= 1, got {calibration_batches}")
    if fmt == "onnx":  # fail before loading anything
        _require("onnx", "onnxscript", what="ONNX export")
        _require("onnxruntime", what="the ONNX parity check")
        if int8:
            _require("onnxruntime.quantization", what="int8 ONNX")


#: where ``--int8`` takes its calibration images from, and why (the parity report's
#: ``int8.calibration_data`` / ``calibration_reason``; docs/deployment.md has the measurement).
CALIBRATION_ORDER = "first N of a seeded shuffle (the training loader's epoch-0 order)"
CALIBRATION_REASON = (
    "the deployed model sees un-augmented images; on a trained Fashion-MNIST resnet14 the "
    "top-1 agreement was the same as with augmented training batches (FX: 99.25 % both, ORT: "
    "99.67 vs 99.66 %, means of 9 calibration sets), so the input distribution decides; it "
    "matters more where augmentation is strong (random resized crops of streamed data sets)")


def _write_int8(run: StudentRun, path: Path, example: Tensor, meta: dict[str, Any],
                calibration_batches: int) -> dict[str, Any]:
    """Quantise the student with torch FX (calibrated on clean training images: the training
    split through the evaluation transform, :func:`~kdlab.data.build.clean_train_loader`),
    save it as TorchScript at ``path``; the ``int8`` section of the parity report."""
    loader = clean_train_loader(run.data)
    n_cal = min(calibration_batches, len(loader))
    log.info("int8: calibrating on %d batches of clean training images", n_cal)
    calib = list(calibration_images(loader, n_cal))
    qmodel = quantize_int8(run.student, calib, example)
    save_torchscript(qmodel, path, example, meta, quantized=True)
    return {"api": "torch.ao.quantization.quantize_fx (prepare_fx, convert_fx)",
            "qconfig_mapping": INT8_BACKEND, "engine": INT8_BACKEND,
            "calibration_batches": n_cal,
            "calibration_images": sum(int(x.shape[0]) for x in calib),
            "calibration_data": CALIBRATION_DATA, "calibration_order": CALIBRATION_ORDER,
            "calibration_reason": CALIBRATION_REASON}


def _write_onnx_int8(run: StudentRun, traceable: nn.Module, path: Path, example: Tensor,
                     meta: dict[str, Any], calibration_batches: int,
                     settings: OnnxInt8Settings | None) -> dict[str, Any]:
    """Export the fp32 ONNX model to a temporary file, quantise it with onnxruntime's
    ``quantize_static`` (:func:`~kdlab.deploy.onnx_int8.quantize_onnx_int8`, calibrated on
    clean training images) into ``path`` and store ``meta`` in it; the ``int8`` section of the
    parity report. onnxruntime failures become :class:`ExportError`."""
    loader = clean_train_loader(run.data)
    n_cal = min(calibration_batches, len(loader))
    log.info("int8 ONNX: calibrating on %d batches of clean training images", n_cal)
    with tempfile.TemporaryDirectory(prefix="kdlab-export-") as work:
        fp32 = Path(work) / "student.fp32.onnx"
        save_onnx(traceable, fp32, example)
        try:
            info = quantize_onnx_int8(fp32, path, calibration_images(loader, n_cal), settings)
        except OnnxInt8Error as e:
            raise ExportError(str(e)) from e
    set_onnx_metadata(path, meta)
    return {**info, "calibration_data": CALIBRATION_DATA, "calibration_order": CALIBRATION_ORDER,
            "calibration_reason": CALIBRATION_REASON}


def _write_fp32(student: nn.Module, traceable: nn.Module, fmt: str, path: Path,
                example: Tensor, meta: dict[str, Any]) -> None:
    """Save the fp32 student as ``fmt`` at ``path`` (``traceable``: its :func:`deployable`
    :class:`LogitsOnly` view, which the tracing formats take)."""
    if fmt == "state_dict":
        save_student(student, path, meta)
    elif fmt == "torchscript":
        save_torchscript(traceable, path, example, meta)
    elif fmt == "exported":
        save_exported(traceable, path, example, meta)
    else:
        save_onnx(traceable, path, example, meta)


def _parity_failures(figures: dict[str, Any], int8: bool, tolerance: float,
                     min_agreement: float) -> list[str]:
    """Why the parity figures fail their bounds (empty: they pass)."""
    failures = []
    if not figures["top1_agreement"] >= min_agreement:
        failures.append(f"top-1 agreement {figures['top1_agreement']:.2f}% < "
                        f"{min_agreement:g}%")
    diff = figures["max_abs_logit_diff"]
    if not int8 and not diff <= tolerance:
        failures.append(f"max |logit diff| {diff:.3g} > {tolerance:g}")
    return failures


def parity_record(run: StudentRun, fmt: str, path: Path, meta: dict[str, Any], *,
                  precision: str = "fp32", tensor_elements: bool = True,
                  versions_of: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """The content of an artefact's ``FILE.parity.json``: what every task's report holds (the
    file, its size and sha256, the student's arch, classes, source and sizes, the library
    versions, the machine and the date) around the task's own ``fields`` (its figures, tolerances
    and verdict). ``tensor_elements``: count the artefact's tensor elements (False for int8)."""
    report: dict[str, Any] = {
        "kind": "kdlab-export-parity",
        "format": fmt,
        "precision": precision,
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "arch": meta["arch"],
        "num_classes": meta["num_classes"],
        "source": meta["source"],
        "student_parameters": sum(int(p.numel()) for p in run.student.parameters()),
        "student_tensor_elements": sum(int(v.numel())
                                       for v in run.student.state_dict().values()),
        "artefact_tensor_elements": _tensor_elements(path, fmt) if tensor_elements else None,
        **fields,
        "versions": versions() if versions_of is None else versions_of,
        "machine": _machine(),
    }
    report["date"] = report["machine"]["date"]
    return report


def _parity_report(run: StudentRun, fmt: str, path: Path, meta: dict[str, Any], *,
                   figures: dict[str, Any], failures: list[str],
                   int8_info: dict[str, Any] | None, tolerance: float,
                   min_agreement: float) -> dict[str, Any]:
    """The content of a classifier's ``FILE.parity.json`` (:func:`parity_record`)."""
    int8 = int8_info is not None
    return parity_record(
        run, fmt, path, meta, precision=meta["precision"], tensor_elements=not int8,
        in_channels=meta["in_channels"], input_size=meta["input_size"], input=meta["input"],
        dynamic_batch=fmt != "state_dict", **figures, tolerance=None if int8 else tolerance,
        min_agreement=min_agreement, passed=not failures, failures=failures, int8=int8_info)


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, *,
               int8: bool = False, calibration_batches: int = DEFAULT_CALIBRATION_BATCHES,
               tolerance: float | None = None, min_agreement: float | None = None,
               overrides: Sequence[str] = (), plugins: Sequence[str] = (),
               checkpoint: str | Path | None = None,
               onnx_int8: OnnxInt8Settings | None = None) -> ExportResult:
    """Export the trained student of ``run_dir`` as ``fmt`` (see the module docstring), check
    its parity with the eager student on the test set, write ``FILE.parity.json``.
    ``plugins``: the plugins the caller trusts (``--plugin``; see :func:`load_run`).
    ``onnx_int8``: how ``fmt="onnx", int8=True`` quantises (default: the measured defaults of
    :class:`~kdlab.deploy.onnx_int8.OnnxInt8Settings`).

    Raises :class:`ExportError` (unknown format, ``int8`` with a format other than
    TorchScript or ONNX, missing package, untraceable model) before writing anything, and
    :class:`ParityError` after writing when the check fails.
    """
    _check_request(fmt, int8, calibration_batches)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    if min_agreement is None:
        min_agreement = DEFAULT_MIN_AGREEMENT_INT8 if int8 else DEFAULT_MIN_AGREEMENT
    run = load_run(run_dir, overrides, plugins, checkpoint)
    path = Path(out) if out else default_path(run.run_dir, fmt, int8)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = run.metadata()
    meta["precision"] = "int8" if int8 else "fp32"
    example = torch.randn(2, *run.input_shape, generator=torch.Generator().manual_seed(0))
    eager = LogitsOnly(run.student).eval()  # the reference of the parity check
    traceable = LogitsOnly(deployable(run.student)).eval()
    int8_info: dict[str, Any] | None = None
    if int8 and fmt == "onnx":
        int8_info = _write_onnx_int8(run, traceable, path, example, meta, calibration_batches,
                                     onnx_int8)
    elif int8:
        int8_info = _write_int8(run, path, example, meta, calibration_batches)
    else:
        _write_fp32(run.student, traceable, fmt, path, example, meta)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)
    figures = check_parity(eager, load_artefact(path, fmt, plugins=plugins), run.data.test_loader)
    failures = _parity_failures(figures, int8, tolerance, min_agreement)
    report = _parity_report(run, fmt, path, meta, figures=figures, failures=failures,
                            int8_info=int8_info, tolerance=tolerance,
                            min_agreement=min_agreement)
    ppath = parity_path(path)
    atomic_write(ppath, json.dumps(report, indent=2) + "\n")
    change = f", change {figures['top1_change']:+.2f} pp" if int8 else ""
    log.info("parity on %d test images: top-1 agreement %.2f%%, max |logit diff| %.3g, top-1 "
             "eager %.2f%% vs %s %.2f%%%s", figures["test_images"], figures["top1_agreement"],
             figures["max_abs_logit_diff"], figures["top1_eager"], meta["precision"],
             figures["top1_exported"], change)
    if failures:
        raise ParityError(f"parity check of {path} failed: {'; '.join(failures)} (files kept; "
                          f"see {ppath.name})" + (INT8_KNOBS[fmt] if int8 else ""))
    return ExportResult(path=path, parity_path=ppath, report=report)
