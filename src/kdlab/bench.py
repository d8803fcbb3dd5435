"""Speed benchmark of the real training step (``kdlab bench``).

A :class:`TrainBench` builds a real :class:`~kdlab.engine.trainer.Trainer` on synthetic data of
the requested size in a temporary run directory and measures:

* **throughput**: steady-state images/s of the full training step (device-resident gather +
  crop/flip/normalise, teacher forward, student forward, loss terms, backward, clip, SGD step),
  timed over :meth:`Trainer.train_epoch` itself (an "epoch" of exactly ``steps`` batches) after
  ``warmup`` untimed steps. That pass has no host synchronisation inside the step; the device
  is synchronised once before and once after it.
* **parts**: the share of data / teacher forward / student forward / loss / backward+step,
  from a separate instrumented pass that synchronises the device between the parts (so its
  step time is a little longer than the fast pass's).
* **memory**: peak RSS of the process on CPU (``resource.getrusage``: a lifetime peak, so run
  one configuration per process for a clean figure), ``torch.cuda.max_memory_allocated`` on GPU.
* **evaluation**: the time of one evaluation pass of the student over a synthetic test set.
* **FLOPs**: matmul/conv FLOPs of one training step (teacher forward + student forward and
  backward, counted once with :class:`torch.utils.flop_counter.FlopCounterMode`) divided by the
  measured step time; on a GPU listed in :data:`BF16_DENSE_PEAK_TFLOPS` also the fraction of
  the chip's dense bf16 peak.

Nothing here prints; the CLI formats :func:`format_table` to stdout.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from kdlab.config import MethodConfig, apply_overrides, validate_config
from kdlab.core.env import load_average, machine_info
from kdlab.core.runtime import autocast
from kdlab.data import DeviceLoader
from kdlab.data.synthetic import make_synthetic_dataset
from kdlab.engine.trainer import Trainer
from kdlab.methods.base import Batch, DistillContext
from kdlab.methods.compose import build_method
from kdlab.models import create_model
from kdlab.tasks.classification.evaluate import evaluate

__all__ = [
    "BF16_DENSE_PEAK_TFLOPS",
    "BenchSettings",
    "TrainBench",
    "check_losses",
    "current_rss_mb",
    "format_table",
    "peak_rss_mb",
    "peak_tflops",
    "run_bench",
    "synchronize",
    "wait_for_quiet",
]

#: Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, matched by substring of
#: ``torch.cuda.get_device_name()`` in this order (the first match wins). Vendor datasheets.
BF16_DENSE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),
    ("L40S", 362.1),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L4", 121.0),
)

PART_NAMES = ("data", "teacher_fwd", "student_fwd", "loss", "backward_step")


# --------------------------------------------------------------------------- machine
def wait_for_quiet(max_load: float = 1.5, timeout_s: float = 600.0, poll_s: float = 30.0
                   ) -> tuple[float, bool]:
    """Poll the 1-minute load average until it is at most ``max_load`` or ``timeout_s`` passed.

    Returns ``(load, quiet)``: the last load seen and whether it was at most ``max_load``.
    """
    deadline = time.monotonic() + timeout_s
    load = load_average()
    while load > max_load and time.monotonic() < deadline:
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        load = load_average()
    return load, load <= max_load


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB (Linux ``/proc``; ``nan`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak of a GPU by name (see :data:`BF16_DENSE_PEAK_TFLOPS`); None if unknown."""
    if not device_name:
        return None
    for key, value in BF16_DENSE_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU, where every op is synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    """One benchmark configuration (the ``kdlab bench`` arguments)."""

    teacher: str = "resnet32x4"
    student: str = "resnet8x4"
    method: str = "sd_dkd"
    #: dotted config overrides, e.g. ``["method.params.scales=[1, 2]"]``.
    overrides: list[str] = field(default_factory=list)
    batch_size: int = 64
    input_size: int = 32
    num_classes: int = 100
    device: str = "cpu"
    amp: str = "auto"
    channels_last: bool = True
    #: torch.compile mode ("default", "reduce-overhead", ...); None: eager.
    compile: str | None = None
    threads: int | None = None
    steps: int = 20
    warmup: int = 5
    #: steps of the instrumented (synchronised) pass; None: ``min(steps, 10)``.
    part_steps: int | None = None
    eval_size: int = 1000
    eval_batch_size: int = 256
    flops: bool = True
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        """The experiment config (a plain dict, overrides applied) this benchmark trains."""

        n_train = self.batch_size * max(self.steps, 1)
        data = {
            "name": "synthetic",
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            # The test split only feeds the trainer's one-off teacher check; the timed
            # evaluation uses its own set of ``eval_size`` images.
            "synthetic": {"n_train": n_train, "n_test": min(self.batch_size, 64),
                          "num_classes": self.num_classes, "size": self.input_size,
                          "seed": self.seed},
        }
        cfg: dict[str, Any] = {
            "name": "bench",
            "seed": self.seed,
            "data": data,
            "student": {"arch": self.student},
            "teacher": {"arch": self.teacher, "random_init": True},
            "method": {"name": self.method},
            "optim": {"epochs": 1_000_000, "milestones": []},
            "runtime": {"device": self.device, "amp": self.amp,
                        "channels_last": self.channels_last,
                        "compile": self.compile is not None,
                        "compile_mode": self.compile or "default",
                        "threads": self.threads, "log_every": 1_000_000},
        }
        return apply_overrides(cfg, self.overrides)


# --------------------------------------------------------------------------- benchmark
class TrainBench:
    """A real :class:`Trainer` on synthetic data, with timed and instrumented passes.

    Use as a context manager (the temporary run directory is removed on exit)::

        with TrainBench(BenchSettings(steps=10)) as b:
            b.warmup(3)
            seconds = b.timed_pass()
    """

    def __init__(self, settings: BenchSettings) -> None:
        self.settings = settings
        self.cfg = validate_config(settings.config_dict(), "kdlab bench")
        self._tmp = tempfile.TemporaryDirectory(prefix="kdlab-bench-")
        self.rss_before_mb = current_rss_mb()
        self.trainer = Trainer(self.cfg, Path(self._tmp.name) / "run", require_teacher=True)
        self.trainer.setup()
        self.device: torch.device = self.trainer.device
        self.amp_dtype: torch.dtype | None = self.trainer.amp_dtype
        self.batch_size = settings.batch_size
        self.steps = len(self.trainer.train_loader)
        self._epoch = 0
        self._batches: Iterator[Any] | None = None

    def __enter__(self) -> TrainBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary run directory."""
        self._tmp.cleanup()

    # ---------------------------------------------------------------- batches
    def _next_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    def _endless(self) -> Iterator[Any]:
        loader = self.trainer.train_loader
        while True:
            loader.set_epoch(self._next_epoch())
            yield from loader

    def next_batch(self) -> Any:
        """The next training batch (gathered and augmented on the device), cycling epochs."""
        if self._batches is None:
            self._batches = self._endless()
        return next(self._batches)

    def _train_mode(self) -> None:
        self.trainer.student.train()
        self.trainer.distiller.train()

    # ---------------------------------------------------------------- passes
    def warmup(self, steps: int) -> None:
        """``steps`` untimed training steps (:meth:`Trainer.step`, as in the timed pass)."""
        self._train_mode()
        for _ in range(steps):
            self.trainer.step(self.next_batch(), self._epoch)
        synchronize(self.device)

    def timed_pass(self) -> float:
        """Seconds of one :meth:`Trainer.train_epoch` (``self.steps`` full training steps).

        The production loop, unmodified: it synchronises the host only on its last step.
        """
        synchronize(self.device)
        t0 = time.perf_counter()
        self.trainer.train_epoch(self._next_epoch())
        synchronize(self.device)
        return time.perf_counter() - t0

    def part_pass(self, steps: int) -> dict[str, float]:
        """Mean seconds per step of each part, synchronising the device between the parts.

        Runs :meth:`Trainer.step` itself; its ``mark`` callback synchronises the device and
        reads the clock at each part boundary. Keys: :data:`PART_NAMES`.
        """
        dev = self.device
        self._train_mode()
        sums = dict.fromkeys(PART_NAMES, 0.0)
        for _ in range(steps):
            synchronize(dev)
            last = time.perf_counter()
            batch = self.next_batch()

            def mark(part: str) -> None:
                nonlocal last
                synchronize(dev)
                now = time.perf_counter()
                sums[part] += now - last
                last = now

            mark("data")
            self.trainer.step(batch, self._epoch, mark=mark)
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def count_flops(self) -> int:
        """FLOPs of one :meth:`Trainer.step`: teacher forward + student forward + loss +
        backward (matmuls and convolutions; the optimizer's element-wise update counts none)."""

        self._train_mode()
        batch = self.next_batch()
        with FlopCounterMode(display=False) as counter:
            self.trainer.step(batch, self._epoch)
        return int(counter.get_total_flops())

    def eval_pass(self, size: int, batch_size: int) -> dict[str, float]:
        """Seconds of one evaluation pass of the student over ``size`` synthetic test images."""

        s = self.settings
        ds = make_synthetic_dataset(size, num_classes=s.num_classes, size=s.input_size,
                                    seed=s.seed, split="test")
        loader = DeviceLoader(ds, batch_size=batch_size, device=self.device, train=False,
                              channels_last=self.cfg.runtime.channels_last)
        evaluate(self.trainer.student, [next(iter(loader))], self.device, self.amp_dtype)
        synchronize(self.device)
        t0 = time.perf_counter()
        res = evaluate(self.trainer.student, loader, self.device, self.amp_dtype)
        dt = time.perf_counter() - t0
        return {"images": int(res["count"]), "time_s": dt, "img_per_s": res["count"] / dt}


def run_bench(settings: BenchSettings, rounds: int = 1) -> dict[str, Any]:
    """Run every measurement of ``settings``; returns the JSON-serialisable result.

    ``rounds`` > 1 repeats the timed pass and reports the median step time.
    """
    load_start = load_average()
    with TrainBench(settings) as b:
        dev = b.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        b.warmup(settings.warmup)
        times = [b.timed_pass() for _ in range(max(rounds, 1))]
        step_s = statistics.median(times) / b.steps
        part_steps = settings.part_steps or min(settings.steps, 10)
        parts = b.part_pass(part_steps)
        part_total = sum(parts.values())
        if dev.type == "cuda":
            memory = {"kind": "cuda_max_memory_allocated",
                      "peak_mb": torch.cuda.max_memory_allocated(dev) / 2**20}
        else:
            memory = {"kind": "peak_rss", "peak_mb": peak_rss_mb(),
                      "rss_before_setup_mb": b.rss_before_mb}
        flops: dict[str, Any] = {}
        if settings.flops:
            per_step = b.count_flops()
            achieved = per_step / step_s / 1e12
            flops = {"per_step": per_step, "per_image": per_step / settings.batch_size,
                     "tflops_achieved": achieved}
            gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
            peak = peak_tflops(gpu)
            if peak is not None:
                flops["peak_bf16_dense_tflops"] = peak
                flops["fraction_of_peak"] = achieved / peak
        ev = b.eval_pass(settings.eval_size, settings.eval_batch_size) if settings.eval_size else {}
        amp_dtype = None if b.amp_dtype is None else str(b.amp_dtype).replace("torch.", "")
        config = asdict(settings)
        config.update({"amp_dtype": amp_dtype, "resolved_device": str(dev)})
    return {
        "kind": "kdlab-bench",
        "config": config,
        "machine": machine_info(dev),
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": load_average(),
        "train": {"img_per_s": settings.batch_size / step_s, "step_ms": 1e3 * step_s,
                  "steps_per_round": b.steps, "rounds": len(times), "round_s": times},
        "parts": {"step_ms": 1e3 * part_total, "steps": part_steps,
                  "ms": {k: 1e3 * v for k, v in parts.items()},
                  "share": {k: v / part_total for k, v in parts.items()}},
        "memory": memory,
        "eval": ev,
        "flops": flops,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a :func:`run_bench` result."""
    c, m, tr, parts = result["config"], result["machine"], result["train"], result["parts"]
    lines = [
        f"kdlab bench: {c['teacher']} -> {c['student']}, {c['method']}, batch {c['batch_size']},"
        f" {c['input_size']}x{c['input_size']}, {c['resolved_device']}, amp {c['amp']} "
        f"({c['amp_dtype'] or 'fp32'}), channels_last {c['channels_last']}, "
        f"compile {c['compile'] or 'off'}",
        f"machine: {m['cpu_model']} ({m['cpu_count']} cpus, {m['torch_threads']} threads)"
        + (f", GPU {m['gpu']}" if m["gpu"] else "")
        + f", torch {m['torch']}, {m['date']}",
        f"load average (1 min): {result['load_avg_1m_start']:.2f} at start, "
        f"{result['load_avg_1m_end']:.2f} at end",
        "",
        f"{'train step':<22}{tr['step_ms']:10.1f} ms   {tr['img_per_s']:10.1f} img/s"
        f"   ({tr['rounds']} x {tr['steps_per_round']} steps after {c['warmup']} warm-up)",
        f"{'instrumented step':<22}{parts['step_ms']:10.1f} ms   (synchronised between parts, "
        f"{parts['steps']} steps)",
    ]
    for name in PART_NAMES:
        ms, share = parts["ms"][name], 100 * parts["share"][name]
        lines.append(f"  {name:<20}{ms:10.1f} ms   {share:9.1f} %")
    mem = result["memory"]
    lines.append(f"{'peak memory':<22}{mem['peak_mb']:10.1f} MiB  ({mem['kind']})")
    if result["eval"]:
        ev = result["eval"]
        lines.append(f"{'eval pass':<22}{1e3 * ev['time_s']:10.1f} ms   {ev['img_per_s']:10.1f} "
                     f"img/s   ({ev['images']} images)")
    fl = result["flops"]
    if fl:
        line = (f"{'FLOPs / step':<22}{fl['per_step'] / 1e9:10.2f} GF   "
                f"{fl['tflops_achieved']:10.3f} TFLOP/s achieved")
        if "fraction_of_peak" in fl:
            line += (f" = {100 * fl['fraction_of_peak']:.1f} % of "
                     f"{fl['peak_bf16_dense_tflops']:.0f} bf16 dense peak")
        lines.append(line)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- loss check
def check_losses(
    method: str,
    teacher: str = "resnet14",
    student: str = "resnet8",
    batch_size: int = 16,
    input_size: int = 32,
    num_classes: int = 100,
    params: dict[str, Any] | None = None,
    fast_dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Loss terms of one batch on the fast path vs the plain fp32 NCHW path.

    The same models (identical weights), the same batch and the same method; the fast path
    runs the models in ``fast_dtype`` autocast with channels_last weights and input, the plain
    path in fp32 contiguous layout (the loss functions compute in fp32 on both). A third
    variant, fp32 channels_last, separates the layout's effect from the precision's. Returns
    per-term values and the max absolute / relative differences of each variant.
    """

    dev = torch.device(device)
    torch.manual_seed(seed)
    t_model = create_model(teacher, num_classes=num_classes).to(dev).eval()
    s_model = create_model(student, num_classes=num_classes).to(dev).train()
    ds = make_synthetic_dataset(batch_size * 2, num_classes=num_classes, size=input_size,
                                seed=seed)
    loader = DeviceLoader(ds, batch_size=batch_size, device=dev, seed=seed)
    images, labels, index = next(iter(loader))
    ctx = DistillContext.from_models(s_model, t_model, num_classes=num_classes,
                                     train_labels=ds.labels.to(dev), input_size=input_size)
    distiller = build_method(MethodConfig(name=method, params=params or {}), ctx).to(dev)
    s_state = {k: v.clone() for k, v in s_model.state_dict().items()}

    def terms_of(dtype: torch.dtype | None, channels_last: bool) -> dict[str, float]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        s_model.load_state_dict(s_state)  # undo the BN running-stat update of a previous pass
        t_model.to(memory_format=fmt)
        s_model.to(memory_format=fmt)
        x = images.contiguous(memory_format=fmt)
        with torch.no_grad():
            with autocast(dev, dtype):
                out_t = t_model(x)
                out_s = s_model(x)
            # epoch large enough that warm-ups are over (every term at full weight)
            terms = distiller(out_s, out_t, Batch(x, labels, index), 10_000)
        out = {k: float(v) for k, v in terms.items()}
        out["total"] = sum(out.values())
        return out

    plain = terms_of(None, False)
    variants = {"fp32_channels_last": terms_of(None, True),
                "fast": terms_of(fast_dtype, True)}
    result: dict[str, Any] = {"method": method, "teacher": teacher, "student": student,
                              "batch_size": batch_size, "fast_dtype": str(fast_dtype),
                              "plain": plain}
    for name, vals in variants.items():
        abs_d = {k: abs(vals[k] - plain[k]) for k in plain}
        rel_d = {k: abs_d[k] / max(abs(plain[k]), 1e-12) for k in plain}
        result[name] = {"terms": vals, "max_abs": max(abs_d.values()),
                        "max_rel": max(rel_d.values()), "abs": abs_d, "rel": rel_d}
    return result
