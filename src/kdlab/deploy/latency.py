"""Teacher-vs-student inference latency on the CPU (``kdlab latency``), measured fairly.

The protocol (one row = one model x runtime x batch size):

1. **One process per row.** Each row is timed in a fresh worker (``python -m kdlab.deploy.latency
   --worker SPEC``), started only after the previous one ended, so no two thread pools (torch's
   OpenMP pool, onnxruntime's) compete and no row inherits another's caches or allocator state.
2. **Threads fixed**: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` = N in the worker's environment
   and ``torch.set_num_threads(N)``, one inter-op thread; onnxruntime with
   ``intra_op_num_threads = N``, ``inter_op_num_threads = 1``, sequential execution and
   ``session.intra_op.allow_spinning = 0``.
3. ``eval()`` + ``torch.inference_mode()``, a fixed input shape ``(bs, C, H, W)`` of seeded
   random values; at least :data:`MIN_WARMUP` untimed runs, then at least :data:`MIN_RUNS`
   timed runs, each timed alone with ``time.perf_counter``. Reported: p50 and p90 (numpy's
   linear-interpolation percentiles) and the minimum, in ms; images/s = bs / p50.
4. bs = 1 (latency) and a throughput batch (default 64) are separate rows; parameters and
   multiply-accumulates (MACs per image: ``FlopCounterMode`` FLOPs / 2 of one image's forward
   pass, convolutions, linear layers and attention's matrix products, the usual convention;
   :func:`count_macs`) are given per model.
5. Teacher and student run in the same runtime and precision: ``eager`` (PyTorch fp32),
   ``torchscript`` (the traced fp32 artefact of ``kdlab export``), ``onnxruntime`` (the fp32
   ONNX artefact), ``int8`` (FX post-training static int8 for x86, TorchScript) and
   ``onnxruntime_int8`` (onnxruntime's static int8, QDQ ONNX, :mod:`kdlab.deploy.onnx_int8`);
   both int8 rows are calibrated on the same clean training images as ``kdlab export --int8``.
6. The machine is recorded: CPU model, the ``lscpu`` flags that matter (AVX2, AVX-512,
   VNNI, AVX512-BF16, AMX), torch and onnxruntime versions, date, and the 1-minute load average
   before and after each row; a load above the thread count is warned about (re-run then).

Runtimes whose package is missing are skipped with a note. Results: ``latency.json`` and
``latency.md`` in ``RUN_DIR/latency`` (or ``--out``). onnxruntime is imported only by the worker
that times it; an onnxruntime worker imports torch (with :mod:`kdlab.deploy.export`) but runs no
torch operation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kdlab.core.env import machine_info, named_cpu_flags
from kdlab.core.errors import CheckpointError, KdlabError
from kdlab.core.io import atomic_write
from kdlab.data.build import clean_train_loader
from kdlab.deploy import export as ex
from kdlab.deploy.export import INSTALL_HINT, LogitsOnly, read_student
from kdlab.deploy.onnx_int8 import OnnxInt8Error, quantize_onnx_int8
from kdlab.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BATCH_SIZES",
    "DEFAULT_THREADS",
    "MIN_RUNS",
    "MIN_WARMUP",
    "PRECISION",
    "ROLES",
    "RUNTIMES",
    "WORKER_TIMEOUT_S",
    "LatencyError",
    "LatencySettings",
    "count_macs",
    "format_markdown",
    "measure",
    "run_latency",
    "summarize",
]

#: the runtimes, in table order.
RUNTIMES = ("eager", "torchscript", "onnxruntime", "int8", "onnxruntime_int8")
PRECISION = {"eager": "fp32", "torchscript": "fp32", "onnxruntime": "fp32", "int8": "int8",
             "onnxruntime_int8": "int8"}
_SUFFIX = {"eager": ".pt", "torchscript": ".ts", "onnxruntime": ".onnx", "int8": ".int8.ts",
           "onnxruntime_int8": ".int8.onnx"}
#: the runtimes an onnxruntime session times.
_ORT_RUNTIMES = ("onnxruntime", "onnxruntime_int8")
#: the protocol's minimum timed runs and warm-up runs (``allow_short`` lowers them, for tests).
MIN_RUNS = 30
MIN_WARMUP = 5
DEFAULT_BATCH_SIZES = (1, 64)
DEFAULT_THREADS = 1
#: one worker may run this long before it is stopped (its row then records the timeout).
WORKER_TIMEOUT_S = 1800.0
ROLES = ("teacher", "student")


class LatencyError(KdlabError):
    """A latency measurement cannot be set up (bad settings, no runtime left to time)."""


@dataclass
class LatencySettings:
    """What ``kdlab latency`` measures; see the module docstring for the protocol."""

    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    runs: int = MIN_RUNS
    warmup: int = MIN_WARMUP
    threads: int = DEFAULT_THREADS
    runtimes: tuple[str, ...] = RUNTIMES
    calibration_batches: int = 10
    #: allow fewer than MIN_RUNS timed / MIN_WARMUP warm-up runs (tests and smoke checks only)
    allow_short: bool = False
    timeout_s: float = WORKER_TIMEOUT_S

    def check(self) -> None:
        """Raise :class:`LatencyError` (one line) for settings outside the protocol."""
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise LatencyError(f"unknown runtime {unknown[0]!r}; choose from "
                               f"{', '.join(RUNTIMES)}")
        if not self.runtimes or len(set(self.runtimes)) != len(self.runtimes):
            raise LatencyError("--runtimes needs one or more distinct runtimes")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise LatencyError("--batch-sizes needs one or more batch sizes >= 1")
        if self.threads < 1:
            raise LatencyError(f"--threads must be >= 1, got {self.threads}")
        if self.runs < 1 or self.warmup < 0:
            raise LatencyError("--runs must be >= 1 and --warmup >= 0")
        if not self.allow_short and (self.runs < MIN_RUNS or self.warmup < MIN_WARMUP):
            raise LatencyError(f"the protocol needs --runs >= {MIN_RUNS} and --warmup >= "
                               f"{MIN_WARMUP} (got {self.runs} and {self.warmup})")
        if self.calibration_batches < 1:
            raise LatencyError(f"--batches must be >= 1, got {self.calibration_batches}")


def _load() -> float:
    try:
        return round(float(os.getloadavg()[0]), 2)
    except (OSError, AttributeError):
        return float("nan")


# --------------------------------------------------------------------------- the worker side
def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """p50, p90 (numpy linear-interpolation percentiles), min and mean of ``times_ms``."""
    arr = np.asarray(times_ms, dtype=np.float64)
    p50, p90 = np.percentile(arr, [50, 90])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "min_ms": float(arr.min()),
            "mean_ms": float(arr.mean())}


def _ort_callable(path: str, threads: int, shape: list[int]
                  ) -> tuple[Callable[[], Any], AbstractContextManager[Any]]:
    import onnxruntime as ort  # optional heavy dependency: onnxruntime

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return (lambda: session.run(None, {name: x})), nullcontext()


def _torch_callable(runtime: str, path: str, threads: int, shape: list[int],
                    plugins: list[str]) -> tuple[Callable[[], Any], AbstractContextManager[Any]]:
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    if runtime == "eager":
        model: Any = LogitsOnly(read_student(path, plugins)).eval()
    else:
        if runtime == "int8":
            torch.backends.quantized.engine = "x86"
        model = torch.jit.load(path, map_location="cpu").eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return (lambda: model(x)), torch.inference_mode()


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one configuration in this process (the worker's job; see the module docstring).

    ``spec``: ``runtime``, ``path`` (the artefact), ``input_shape`` (``[bs, C, H, W]``),
    ``threads``, ``warmup``, ``runs`` and, for eager models of plugins, ``plugins``.
    Returns :func:`summarize`'s figures plus the raw ``times_ms``.
    """
    threads = int(spec["threads"])
    shape = [int(s) for s in spec["input_shape"]]
    if spec["runtime"] in _ORT_RUNTIMES:
        fn, ctx = _ort_callable(spec["path"], threads, shape)
    else:
        fn, ctx = _torch_callable(spec["runtime"], spec["path"], threads, shape,
                                  list(spec.get("plugins", [])))
    return time_calls(fn, ctx, int(spec["warmup"]), int(spec["runs"]))


def time_calls(fn: Callable[[], Any], ctx: AbstractContextManager[Any], warmup: int,
               runs: int) -> dict[str, Any]:
    """``warmup`` untimed then ``runs`` timed calls of ``fn`` inside ``ctx``:
    :func:`summarize`'s figures plus the raw ``times_ms``."""
    times: list[float] = []
    with ctx:
        for _ in range(warmup):
            fn()
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {**summarize(times), "times_ms": times}


def run_worker(argv: Sequence[str], prog: str,
               measure_fn: Callable[[dict[str, Any]], dict[str, Any]]) -> int:
    """The body of a latency worker process: ``--worker SPEC_JSON`` names the spec file; the
    result of ``measure_fn(spec)`` is written to ``spec["result"]`` as JSON."""
    parser = argparse.ArgumentParser(prog=prog, description="time one configuration (a kdlab "
                                     "latency worker; run `kdlab latency` instead)")
    parser.add_argument("--worker", required=True, metavar="SPEC_JSON")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.worker).read_text())
    Path(spec["result"]).write_text(json.dumps(measure_fn(spec)))
    return 0


def _worker_main(argv: Sequence[str]) -> int:
    return run_worker(argv, "python -m kdlab.deploy.latency", measure)


# --------------------------------------------------------------------------- the parent side
def count_macs(model: Any, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one image's forward pass: ``FlopCounterMode`` FLOPs / 2.

    FlopCounterMode counts 2 FLOPs per multiply-add of convolutions and matrix products (bias,
    BatchNorm, LayerNorm, activations, softmax and pooling are not counted), so this is the usual
    MAC count: sum over convolutions of ``C_out x H_out x W_out x C_in/groups x k_h x k_w``, plus
    ``in x out`` per linear layer and token, plus, for attention, the two matrix products
    ``q k^T`` and ``attn v`` (``2 x N^2 x C`` per block for ``N`` tokens of width ``C``).
    The count runs with SDPA's math backend: FlopCounterMode has no formula for the fused CPU
    kernel (``_scaled_dot_product_flash_attention_for_cpu``) and would leave attention out;
    the math backend computes the same function through counted batched matrix products.
    """
    x = torch.zeros(1, *[int(s) for s in input_shape])
    was_training = model.training
    model.eval()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, \
            torch.no_grad():
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _unavailable(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (a one-line note), or None."""
    if runtime in _ORT_RUNTIMES:
        missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
                   if importlib.util.find_spec(m) is None]
        if missing:
            return f"{runtime} skipped: {', '.join(missing)} not installed ({INSTALL_HINT})"
    if runtime == "int8":
        if "x86" not in torch.backends.quantized.supported_engines:
            return "int8 skipped: this torch build has no x86 quantized engine"
    return None


def _teacher(run: Any, notes: list[str]) -> Any:
    """The run's teacher (config ``teacher.arch`` + ``teacher.checkpoint``) or None."""

    tcfg = run.cfg.teacher
    if tcfg is None:
        notes.append("the run has no teacher: student rows only")
        return None
    model = run.task.create_model(tcfg.arch, run.data)
    if not tcfg.checkpoint:
        notes.append(f"teacher {tcfg.arch} has no checkpoint in the config: timed with random "
                     "weights (the latency does not depend on them)")
    else:
        try:
            load_checkpoint(model, tcfg.checkpoint)
        except CheckpointError as e:
            notes.append(f"teacher checkpoint unusable ({e}): timed with random weights of "
                         f"{tcfg.arch}")
    return model.eval()


def _spawn(spec: dict[str, Any], work: Path, index: int, timeout_s: float,
           module: str = "kdlab.deploy.latency") -> dict[str, Any]:
    """Run one worker process (``python -m module --worker SPEC``: this module's, or
    :mod:`kdlab.deploy.detection`'s for detectors); its figures, or ``{"error": ...}``."""
    spec_path = work / f"spec-{index}.json"
    spec = {**spec, "result": str(work / f"result-{index}.json")}
    spec_path.write_text(json.dumps(spec))
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    src = str(Path(__file__).resolve().parents[2])  # kdlab importable without installing
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    before = _load()
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", module, "--worker",
                               str(spec_path)], env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        error = None
        if proc.returncode != 0 or not Path(spec["result"]).is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            error = (lines[-1] if lines else f"worker exited with {proc.returncode}")[:300]
    except subprocess.TimeoutExpired:
        error = f"worker timed out after {timeout_s:.0f} s"
    out: dict[str, Any] = {"load_before": before, "load_after": _load(),
                           "wall_s": round(time.monotonic() - t0, 2)}
    if error is not None:
        return {**out, "error": error}
    return {**out, **json.loads(Path(spec["result"]).read_text())}


def _available_runtimes(wanted: Sequence[str], notes: list[str]) -> list[str]:
    """The runtimes of ``wanted`` that can run here; a note (and a warning) for each other."""
    runtimes = []
    for rt in wanted:
        why = _unavailable(rt)
        if why is None:
            runtimes.append(rt)
        else:
            notes.append(why)
            log.warning("%s", why)
    if not runtimes:
        raise LatencyError(f"no runtime left to time ({'; '.join(notes)})")
    return runtimes


def _models(run: Any, notes: list[str]) -> dict[str, Any]:
    """The models to time by role: the teacher (when the run has one), then the student."""
    models: dict[str, Any] = {}
    teacher = _teacher(run, notes)
    if teacher is not None:
        models["teacher"] = teacher
    models["student"] = run.student
    return models


def _model_info(run: Any, models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per role: ``arch``, ``parameters`` and ``macs_per_image``."""
    c, h, w = run.input_shape
    return {role: {"arch": (run.cfg.teacher.arch if role == "teacher"
                            else run.cfg.student.arch),
                   "parameters": sum(int(p.numel()) for p in m.parameters()),
                   "macs_per_image": count_macs(m, (c, h, w))}
            for role, m in models.items()}


def _machine_warnings(threads: int, load_start: float) -> list[str]:
    """Warnings (also logged) about an oversubscribed or busy machine."""
    warn: list[str] = []
    cpu_count = os.cpu_count() or 1
    if threads > cpu_count:
        warn.append(f"{threads} threads on {cpu_count} logical CPUs: oversubscribed")
    if load_start > threads:
        warn.append(f"load average {load_start:.2f} > {threads} thread(s) at the start:"
                    " other processes compete for the CPU, so the figures are slow and noisy; "
                    "re-run on a quiet machine")
    for line in warn:
        log.warning("%s", line)
    return warn


def _save_artefact(rt: str, model: Any, path: Path, meta: dict[str, Any], example: Any,
                   calib: list[Any]) -> None:
    """Write ``model`` as the artefact that runtime ``rt`` times."""
    if rt == "eager":
        ex.save_student(model, path, meta)
    elif rt == "torchscript":
        ex.save_torchscript(ex.LogitsOnly(ex.deployable(model)), path, example)
    elif rt == "onnxruntime":
        ex.save_onnx(ex.LogitsOnly(ex.deployable(model)), path, example)
    elif rt == "onnxruntime_int8":
        fp32 = path.with_name(f"{path.name}.fp32.onnx")
        ex.save_onnx(ex.LogitsOnly(ex.deployable(model)), fp32, example)
        try:
            quantize_onnx_int8(fp32, path, calib)
        except OnnxInt8Error as e:
            raise ex.ExportError(str(e)) from e
        finally:
            fp32.unlink(missing_ok=True)
    else:
        ex.save_torchscript(ex.quantize_int8(model, calib, example), path, example,
                            quantized=True)


def _write_artefacts(run: Any, models: dict[str, Any], info: dict[str, dict[str, Any]],
                     runtimes: list[str], work: Path, notes: list[str],
                     calibration_batches: int) -> dict[tuple[str, str], Path]:
    """Every model in every runtime, written to ``work``; the paths by ``(role, runtime)``.
    A model a runtime cannot take is skipped with a note."""
    c, h, w = run.input_shape
    example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    calib: list[Any] = []
    if any(PRECISION[rt] == "int8" for rt in runtimes):  # clean images, as kdlab export --int8
        loader = clean_train_loader(run.data)
        calib = list(ex.calibration_images(loader, min(calibration_batches, len(loader))))
    artefacts: dict[tuple[str, str], Path] = {}
    for role, model in models.items():
        meta = {"arch": info[role]["arch"], "num_classes": int(run.data.num_classes),
                "in_channels": c, "input_size": h, "plugins": list(run.cfg.plugins)}
        for rt in runtimes:
            path = work / f"{role}{_SUFFIX[rt]}"
            try:
                _save_artefact(rt, model, path, meta, example, calib)
            except ex.ExportError as e:
                notes.append(f"{role} {rt} skipped: {e}")
                log.warning("%s %s skipped: %s", role, rt, e)
                continue
            artefacts[(role, rt)] = path
    return artefacts


def _time_artefacts(run: Any, info: dict[str, dict[str, Any]], runtimes: list[str],
                    artefacts: dict[tuple[str, str], Path], settings: LatencySettings,
                    work: Path) -> list[dict[str, Any]]:
    """One worker per runtime x batch size x model (in that nesting); the table's rows."""
    c, h, w = run.input_shape
    rows: list[dict[str, Any]] = []
    index = 0
    for rt in runtimes:
        for bs in settings.batch_sizes:
            for role in info:
                path = artefacts.get((role, rt))
                if path is None:
                    continue
                spec = {"runtime": rt, "path": str(path), "input_shape": [bs, c, h, w],
                        "threads": settings.threads, "warmup": settings.warmup,
                        "runs": settings.runs, "plugins": list(run.cfg.plugins)}
                log.info("timing %s %s (%s) bs %d", role, info[role]["arch"], rt, bs)
                res = _spawn(spec, work, index, settings.timeout_s)
                index += 1
                row = {"model": role, "arch": info[role]["arch"], "runtime": rt,
                       "precision": PRECISION[rt], "batch_size": bs,
                       "threads": settings.threads, "warmup": settings.warmup,
                       "runs": settings.runs, **info[role],
                       "artefact_mb": round(path.stat().st_size / 1e6, 3), **res}
                if "p50_ms" in row:
                    row["images_per_s"] = bs * 1e3 / row["p50_ms"]
                else:
                    log.warning("%s %s bs %d failed: %s", role, rt, bs, row["error"])
                rows.append(row)
    return rows


def _result(run: Any, settings: LatencySettings, info: dict[str, dict[str, Any]],
            rows: list[dict[str, Any]], notes: list[str], warn: list[str],
            load_start: float) -> dict[str, Any]:
    """The ``latency.json`` record (without its ``json`` and ``markdown`` paths)."""
    load_end = _load()
    machine = machine_info(torch.device("cpu"))
    machine["cpu_flags"] = named_cpu_flags()
    machine["load_avg_1m"] = load_start
    return {
        "kind": "kdlab-latency",
        "run_dir": str(run.run_dir),
        "date": machine["date"],
        "settings": {**asdict(settings), "batch_sizes": list(settings.batch_sizes),
                     "runtimes": list(settings.runtimes)},
        "protocol": ("one process per row; fixed threads (OMP/MKL env, torch.set_num_threads, "
                     "1 inter-op thread; onnxruntime intra_op=N, inter_op=1, no spinning); "
                     "eval + inference_mode, fixed shape; warm-ups then timed runs with "
                     "perf_counter; p50/p90/min"),
        "machine": machine,
        "versions": ex.versions(),
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "models": info,
        "rows": rows,
        "speedup": _speedups(rows),
        "notes": notes,
        "warnings": warn,
    }


def run_latency(run_dir: str | Path, settings: LatencySettings | None = None,
                out: str | Path | None = None, overrides: Sequence[str] = (),
                plugins: Sequence[str] = ()) -> dict[str, Any]:
    """Time the run's teacher and student in every runtime and batch size (module docstring),
    write ``latency.json`` and ``latency.md`` to ``out`` (default ``RUN_DIR/latency``) and
    return the result (its ``markdown`` and ``json`` keys give the files).

    Rows whose worker failed carry an ``error``; the CLI exits 1 when there is one.
    ``plugins`` (``--plugin``, with ``$KDLAB_PLUGINS``) are the plugins trusted to rebuild the
    run's models; those the run's config names are never imported by themselves
    (:func:`kdlab.deploy.export.load_run`).
    """
    settings = settings or LatencySettings()
    settings.check()
    run = ex.load_run(run_dir, overrides, plugins)
    out_dir = Path(out) if out else run.run_dir / "latency"
    notes: list[str] = []
    runtimes = _available_runtimes(settings.runtimes, notes)
    models = _models(run, notes)
    info = _model_info(run, models)
    load_start = _load()
    warn = _machine_warnings(settings.threads, load_start)
    with tempfile.TemporaryDirectory(prefix="kdlab-latency-") as tmp:
        work = Path(tmp)
        artefacts = _write_artefacts(run, models, info, runtimes, work, notes,
                                     settings.calibration_batches)
        rows = _time_artefacts(run, info, runtimes, artefacts, settings, work)
    result = _result(run, settings, info, rows, notes, warn, load_start)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["json"] = str(out_dir / "latency.json")
    result["markdown"] = str(out_dir / "latency.md")
    atomic_write(out_dir / "latency.json", json.dumps(result, indent=2) + "\n")
    atomic_write(out_dir / "latency.md", format_markdown(result))
    return result


def _speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher p50 / student p50 for every runtime and batch size timed for both."""
    ok = {(r["model"], r["runtime"], r["batch_size"]): r for r in rows if "p50_ms" in r}
    out = []
    for (model, rt, bs), s in ok.items():
        t = ok.get(("teacher", rt, bs))
        if model == "student" and t is not None:
            out.append({"runtime": rt, "batch_size": bs, "teacher_p50_ms": t["p50_ms"],
                        "student_p50_ms": s["p50_ms"],
                        "speedup": t["p50_ms"] / s["p50_ms"]})
    return out


def format_markdown(result: dict[str, Any]) -> str:
    """``latency.md``: machine and protocol lines, the rows table, the speed-up table, notes."""
    m, s = result["machine"], result["settings"]
    flags = ", ".join(k for k, v in m.get("cpu_flags", {}).items() if v) or "unknown"
    ort = result["versions"].get("onnxruntime") or "not installed"
    lines = [
        f"# Teacher vs student latency: {result['run_dir']}",
        "",
        f"- machine: {m['cpu_model']} ({m['cpu_count']} logical CPUs; flags: {flags})",
        f"- torch {result['versions']['torch']}, onnxruntime {ort}, {m['platform']}",
        f"- date {result['date']}; load average {result['load_avg_start']:.2f} at the start, "
        f"{result['load_avg_end']:.2f} at the end",
        f"- protocol: one process per row, {s['threads']} thread(s), {s['warmup']} warm-ups + "
        f"{s['runs']} timed runs (perf_counter), eval + inference_mode, fixed input shape",
        "",
        "| model | arch | params (M) | MMAC/img | runtime | bs | p50 ms | p90 ms | min ms "
        "| img/s | file MB |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        head = (f"| {r['model']} | {r['arch']} | {r['parameters'] / 1e6:.3f} | "
                f"{r['macs_per_image'] / 1e6:.2f} | {r['runtime']} | {r['batch_size']} |")
        if "p50_ms" in r:
            lines.append(f"{head} {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['min_ms']:.2f} | "
                         f"{r['images_per_s']:.0f} | {r['artefact_mb']:.2f} |")
        else:
            lines.append(f"{head} failed: {r['error']} | | | | {r['artefact_mb']:.2f} |")
    if result["speedup"]:
        lines += ["", "Student speed-up over the teacher (teacher p50 / student p50):", "",
                  "| runtime | bs | teacher p50 ms | student p50 ms | speed-up |",
                  "|---|---:|---:|---:|---:|"]
        for sp in result["speedup"]:
            lines.append(f"| {sp['runtime']} | {sp['batch_size']} | {sp['teacher_p50_ms']:.2f} "
                         f"| {sp['student_p50_ms']:.2f} | {sp['speedup']:.2f}x |")
    extra = [f"- warning: {w}" for w in result["warnings"]] + [f"- {n}" for n in result["notes"]]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
