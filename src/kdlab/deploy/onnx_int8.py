"""int8 ONNX through onnxruntime's post-training static quantisation (``kdlab export --format
onnx --int8``).

The fp32 ONNX export of the student (:func:`kdlab.deploy.export.save_onnx`) is turned into an
int8 model that onnxruntime runs on x86 CPUs:

1. ``onnxruntime.quantization.shape_inference.quant_pre_process`` (symbolic shape inference,
   onnxruntime's basic graph optimisations, ONNX shape inference), as onnxruntime recommends
   before quantising (:data:`DEFAULT_PREPROCESS`; docs/deployment.md has the measurement);
2. ``onnxruntime.quantization.quantize_static`` in the **QDQ** format (``QuantizeLinear`` /
   ``DequantizeLinear`` pairs around the float operators, which onnxruntime's CPU provider fuses
   into int8 kernels): uint8 activations and int8 weights (:data:`ACTIVATION_TYPE`,
   :data:`WEIGHT_TYPE`), ``reduce_range=False``, per-channel weights
   (:data:`DEFAULT_PER_CHANNEL`) and MinMax calibration (:data:`DEFAULT_CALIBRATION_METHOD`);
3. calibration on **clean training images**: the training split through the evaluation
   transform, no augmentation (:func:`kdlab.data.build.clean_train_loader`), the first
   ``--batches`` batches of its seeded order, fed by :class:`CleanImageReader`.

The choices were measured on a trained student (docs/deployment.md, "int8 ONNX (onnxruntime
static quantization)"). This module knows nothing about runs or parity: :mod:`kdlab.deploy.export`
calls :func:`quantize_onnx_int8` and checks the result (this module does not import it, so
there is no import cycle). onnxruntime is optional and imported in the functions;
:func:`kdlab.deploy.export.export_run` checks it is installed (with the one-line install hint)
before it gets here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from kdlab.core.errors import KdlabError

log = logging.getLogger(__name__)

__all__ = [
    "ACTIVATION_TYPE",
    "API",
    "CALIBRATION_DATA",
    "CALIBRATION_METHODS",
    "DEFAULT_CALIBRATION_METHOD",
    "DEFAULT_PER_CHANNEL",
    "DEFAULT_PREPROCESS",
    "QUANT_FORMAT",
    "WEIGHT_TYPE",
    "CleanImageReader",
    "OnnxInt8Error",
    "OnnxInt8Settings",
    "qdq_node_counts",
    "quantize_onnx_int8",
]

API = "onnxruntime.quantization.quantize_static"
PREPROCESS_API = "onnxruntime.quantization.shape_inference.quant_pre_process"
#: ``QuantFormat.QDQ``: onnxruntime's recommended format for CPUs since 1.11.
QUANT_FORMAT = "QDQ"
#: ``QuantType`` names. uint8 activations with int8 weights (U8S8) is what onnxruntime's
#: ``quantize_static`` documentation recommends for x86-64 CPUs; with VNNI (AVX512-VNNI,
#: AVX-VNNI) ``reduce_range=False``. S8S8 is its default and the choice for ARM.
ACTIVATION_TYPE = "QUInt8"
WEIGHT_TYPE = "QInt8"
TYPES_REASON = ("uint8 activations + int8 weights (U8S8), reduce_range=False: onnxruntime's "
                "recommendation for x86-64 CPUs with VNNI (quantize_static docstring); measured "
                "on a trained resnet14: same agreement as int8 activations (S8S8), 3x faster "
                "(docs/deployment.md)")
#: ``--int8`` calibration methods (``CalibrationMethod`` members) by kdlab name.
CALIBRATION_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
DEFAULT_CALIBRATION_METHOD = "minmax"
DEFAULT_PER_CHANNEL = True
DEFAULT_PREPROCESS = True
DEFAULTS_REASON = (
    "measured on trained Fashion-MNIST students (docs/deployment.md): MinMax kept the top-1 "
    "agreement best (resnet14 99.67 % vs Percentile 99.62 %, means of 9 calibration sets; "
    "vit_tiny 94.82 vs 94.64 %) and is the fastest with the least memory; Entropy gave "
    "MinMax's scales exactly (quantize_static fixes its histogram at 128 bins); per-channel "
    "weights: +0.4 pp agreement on vit_tiny, equal on resnet14, 4-5 % slower; "
    "pre-processing: same agreement and speed, a 27 % smaller vit_tiny file")
CALIBRATION_DATA = "clean training images (evaluation transform)"
#: onnxruntime's quantiser logs through the root logger (a pre-processing hint, op notes).
_ORT_QUIET = ("root", "onnxruntime")


class OnnxInt8Error(KdlabError):
    """The int8 ONNX model cannot be made (missing onnxruntime, unknown setting, no calibration
    image, or an onnxruntime failure). :mod:`kdlab.deploy.export` re-raises it as
    :class:`~kdlab.deploy.export.ExportError`."""


@dataclass(frozen=True)
class OnnxInt8Settings:
    """How :func:`quantize_onnx_int8` quantises (the defaults are the measured choices).

    ``calibration_method``: a key of :data:`CALIBRATION_METHODS` (``minmax`` takes each
    activation's observed range; ``entropy`` and ``percentile`` clip outliers of its histogram);
    ``per_channel``: one weight scale per output channel instead of per tensor; ``preprocess``:
    run ``quant_pre_process`` first; ``reduce_range``: 7-bit weights (for CPUs without VNNI).
    """

    calibration_method: str = DEFAULT_CALIBRATION_METHOD
    per_channel: bool = DEFAULT_PER_CHANNEL
    preprocess: bool = DEFAULT_PREPROCESS
    reduce_range: bool = False
    activation_type: str = ACTIVATION_TYPE
    weight_type: str = WEIGHT_TYPE

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise :class:`OnnxInt8Error` (one line) for an unknown method or type."""
        if self.calibration_method not in CALIBRATION_METHODS:
            raise OnnxInt8Error(f"unknown calibration method {self.calibration_method!r}; "
                                f"choose one of {', '.join(CALIBRATION_METHODS)}")
        for what, name in (("activation", self.activation_type), ("weight", self.weight_type)):
            if name not in ("QUInt8", "QInt8"):
                raise OnnxInt8Error(f"{what} type {name!r}: int8 ONNX takes QUInt8 or QInt8")


class CleanImageReader:
    """An onnxruntime ``CalibrationDataReader`` over image batches (CPU tensors).

    ``get_next()`` returns ``{input_name: batch as a float32 C-contiguous array}`` for each batch
    of ``batches``, pulled lazily (a loader is iterated once), then None. It is a
    ``CalibrationDataReader`` by onnxruntime's own ``__subclasshook__`` (it has ``get_next``),
    so onnxruntime need not be imported to define it. ``batches_read`` / ``images_read`` count
    what was handed out; ``first_batch`` keeps the first array (what the tests check).
    """

    def __init__(self, batches: Iterable[Tensor], input_name: str) -> None:
        self._it: Iterator[Tensor] | None = iter(batches)
        self.input_name = input_name
        self.batches_read = 0
        self.images_read = 0
        self.first_batch: np.ndarray | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration input feed, or None when the batches are exhausted."""
        if self._it is None:
            return None
        batch = next(self._it, None)
        if batch is None:
            self._it = None
            return None
        array = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        if self.first_batch is None:
            self.first_batch = array
        self.batches_read += 1
        self.images_read += int(array.shape[0])
        return {self.input_name: array}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (feed := self.get_next()) is not None:
            yield feed


@contextlib.contextmanager
def _quiet_ort() -> Iterator[None]:
    """Silence the quantiser's INFO/WARNING log lines and the progress lines its histogram
    calibrators ``print`` to stdout (kdlab records the settings itself)."""
    loggers = [logging.getLogger(n if n != "root" else None) for n in _ORT_QUIET]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _input_name(model_path: Path) -> str:
    import onnx  # optional heavy dependency: onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in inits]
    if len(names) != 1:
        raise OnnxInt8Error(f"int8 ONNX: {model_path.name} has inputs {names}; "
                            "calibration feeds a model with exactly one (images)")
    return names[0]


def qdq_node_counts(path: str | Path) -> dict[str, int]:
    """Nodes of the ONNX file ``path`` by op type, for the quantisation ops only:
    ``QuantizeLinear``, ``DequantizeLinear`` (QDQ) and ``QLinear*`` / ``ConvInteger`` ops."""
    import onnx  # optional heavy dependency: onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear") or op.startswith("QLinear") \
                or op.endswith("Integer"):
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def quantize_onnx_int8(fp32_path: str | Path, out_path: str | Path,
                       calibration: Iterable[Tensor],
                       settings: OnnxInt8Settings | None = None) -> dict[str, Any]:
    """Quantise the fp32 ONNX model ``fp32_path`` into ``out_path`` (QDQ, see the module
    docstring), calibrated on the image batches ``calibration`` (CPU tensors, ``B x C x H x W``,
    normalised as the model expects; iterated once).

    Writes ``out_path`` through a temporary file and a rename (``fp32_path`` is not changed).
    Returns the settings and calibration record (``api``, ``quant_format``, ``activation_type``,
    ``weight_type``, ``per_channel``, ``reduce_range``, ``calibration_method``, ``preprocess``,
    ``calibration_batches``, ``calibration_images``, ``qdq_nodes``, ``onnxruntime``): the
    caller adds where the images came from. Raises :class:`OnnxInt8Error` (one line) for a bad
    setting, missing onnxruntime, no calibration image or a quantiser failure.
    """
    settings = settings or OnnxInt8Settings()
    settings.check()
    try:
        # optional heavy dependency: onnxruntime (its quantisation tools need onnx too)
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise OnnxInt8Error(f"int8 ONNX needs onnxruntime's quantisation tools: "
                            f"{_first_line(e)}") from e
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    reader = CleanImageReader(calibration, _input_name(fp32_path))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out_path.with_name(f"{out_path.stem}.tmp{out_path.suffix}")
    with tempfile.TemporaryDirectory(prefix="kdlab-int8-onnx-") as work, _quiet_ort():
        source = fp32_path
        try:
            if settings.preprocess:
                source = Path(work) / "preprocessed.onnx"
                quant_pre_process(str(fp32_path), str(source))
            quantize_static(
                str(source), str(tmp_out), reader, quant_format=QuantFormat.QDQ,
                per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                activation_type=getattr(QuantType, settings.activation_type),
                weight_type=getattr(QuantType, settings.weight_type),
                calibrate_method=getattr(CalibrationMethod,
                                         CALIBRATION_METHODS[settings.calibration_method]))
            if reader.images_read == 0:
                raise OnnxInt8Error("int8 ONNX: no calibration image (empty training set?)")
            os.replace(tmp_out, out_path)
        except OnnxInt8Error:
            raise
        except Exception as e:  # onnxruntime raises many types
            if reader.images_read == 0:
                raise OnnxInt8Error("int8 ONNX: no calibration image (empty training set?)"
                                    ) from e
            raise OnnxInt8Error(f"int8 ONNX: onnxruntime's quantize_static failed: "
                                f"{_first_line(e)}") from e
        finally:
            tmp_out.unlink(missing_ok=True)
    record = asdict(settings)
    record["calibration_method"] = CALIBRATION_METHODS[settings.calibration_method]
    record["preprocess"] = PREPROCESS_API if settings.preprocess else None
    chosen = "" if settings == OnnxInt8Settings() else "not the default, set by the caller; "
    return {"api": API, "quant_format": QUANT_FORMAT, **record,
            "types_reason": TYPES_REASON if (settings.activation_type, settings.weight_type) == (
                ACTIVATION_TYPE, WEIGHT_TYPE) else "set by the caller",
            "defaults_reason": chosen + DEFAULTS_REASON,
            "calibration_batches": reader.batches_read,
            "calibration_images": reader.images_read,
            "qdq_nodes": qdq_node_counts(out_path),
            "onnxruntime": importlib.metadata.version("onnxruntime")}
