"""``kdlab export RUN --format hub``: a self-describing model folder, readable without pickle.

The folder (default ``RUN_DIR/export/hub``) holds:

* ``model.safetensors``: the student's weights (every tensor its own contiguous copy);
* ``config.json``: ``kind: "kdlab-hub"``, the architecture, class count, ``classes`` and the
  input description (:class:`~kdlab.data.input_spec.InputSpec`), the kdlab version, the
  teacher, the method, the run's metrics, the results of every seed of the experiment found
  beside the run, the parity check and an in-process latency figure, and the sha256 of the
  weights file;
* ``README.md``: a model card with the same facts in prose and tables, and the intended use.

:func:`kdlab.load_student` reads the folder back (:func:`kdlab.runs.student.read_hub_folder`):
JSON and raw tensors only, so nothing in the folder can execute code. The folder is written
beside the target and renamed into place, so a failed export leaves no half-written folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.core.env import cpu_model
from kdlab.core.io import atomic_write, file_sha256
from kdlab.core.version import __version__
from kdlab.data.input_spec import InputSpec
from kdlab.deploy.export import (
    DEFAULT_MIN_AGREEMENT,
    DEFAULT_TOLERANCE,
    ExportError,
    ExportResult,
    LogitsOnly,
    ParityError,
    StudentRun,
    _parity_failures,
    check_parity,
    load_run,
    versions,
)
from kdlab.deploy.latency import time_calls
from kdlab.methods.compose import method_display_name
from kdlab.runs.identity import experiment_fingerprint, resolved_config
from kdlab.runs.rundir import RunDir, find_run_dirs
from kdlab.runs.student import HUB_CONFIG, HUB_KIND, HUB_WEIGHTS, read_hub_folder

log = logging.getLogger(__name__)

__all__ = ["HUB_FORMAT_VERSION", "export_hub", "measure_latency_ms", "model_card",
           "seed_results"]

HUB_FORMAT_VERSION = 1
#: timed forward passes of the card's latency figure (after as many warm-up passes / 5).
LATENCY_RUNS = 50


def _save_safetensors(model: nn.Module, path: Path, arch: str) -> None:
    try:
        from safetensors.torch import save_file  # optional dependency: safetensors
    except ImportError as e:
        raise ExportError("--format hub needs safetensors: pip install -e '.[export]' in the "
                          "kdlab clone") from e
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "kdlab_arch": arch})


def seed_results(run_dir: Path, metric: str) -> list[dict[str, Any]]:
    """Every finished run beside ``run_dir`` (in its parent folder) that is a seed of the same
    experiment (equal :func:`~kdlab.runs.identity.experiment_fingerprint`), ``run_dir``
    included: ``{"seed", "run", "best_<metric>"}`` sorted by seed."""
    own = experiment_fingerprint(resolved_config(RunDir(run_dir).load_config_dict(),
                                                 str(run_dir)))
    rows = []
    for folder in find_run_dirs(run_dir.parent):
        rd = RunDir(folder)
        if not (rd.summary_path.is_file() and rd.config_path.is_file()):
            continue
        stored = resolved_config(rd.load_config_dict(), str(folder))
        if experiment_fingerprint(stored) != own:
            continue
        try:
            summary = rd.read_summary()
        except (OSError, ValueError):
            continue
        rows.append({"seed": stored.get("seed"), "run": folder.name,
                     f"best_{metric}": summary.get(f"best_{metric}")})
    return sorted(rows, key=lambda r: (r["seed"] is None, r["seed"]))


def measure_latency_ms(model: nn.Module, shape: Sequence[int], threads: int = 1,
                       runs: int = LATENCY_RUNS) -> dict[str, Any]:
    """Median and p90 milliseconds of one eager forward pass of a ``shape`` batch on the CPU
    with ``threads`` torch threads, under ``inference_mode`` (``runs`` timed passes after
    ``runs // 5`` warm-up passes), with the CPU model. In-process and quick: ``kdlab
    latency`` is the careful measurement (separate processes, several runtimes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(*shape)
    try:
        figures = time_calls(lambda: model(x), torch.inference_mode(), runs // 5, runs)
    finally:
        torch.set_num_threads(before)
    return {"median_ms": figures["p50_ms"], "p90_ms": figures["p90_ms"],
            "batch": int(shape[0]), "threads": threads, "runtime": "torch eager (fp32)",
            "cpu": cpu_model(), "runs": runs}


def _teacher(run: StudentRun) -> dict[str, Any] | None:
    if run.cfg.teacher is None:
        return None
    recorded = RunDir(run.run_dir).read_teacher() or {}
    return {"arch": run.cfg.teacher.arch, "checkpoint": run.cfg.teacher.checkpoint,
            **{k: v for k, v in recorded.items() if k in ("sha256", "top1", "test_top1")}}


def _hub_config(run: StudentRun, meta: dict[str, Any], weights: Path,
                parity: dict[str, Any], latency: dict[str, Any]) -> dict[str, Any]:
    metric = run.task.best_metric
    rd = RunDir(run.run_dir)
    summary = rd.read_summary() if rd.summary_path.is_file() else {}
    return {
        "kind": HUB_KIND,
        "format_version": HUB_FORMAT_VERSION,
        "kdlab_version": __version__,
        "arch": meta["arch"], "num_classes": meta["num_classes"],
        "in_channels": meta["in_channels"], "input_size": meta["input_size"],
        "task": meta["task"], "plugins": meta["plugins"],
        "classes": meta["classes"], "input_spec": meta["input_spec"],
        "output": meta["output"],
        "teacher": _teacher(run),
        "method": (method_display_name(run.cfg.method) if run.cfg.teacher is not None
                   else "vanilla (trained alone)"),
        "method_config": run.cfg.method.model_dump() if run.cfg.teacher is not None else None,
        "data": {"dataset": summary.get("dataset", run.cfg.data.name),
                 "train_images": int(run.data.train_size),
                 "test_images": parity["test_images"]},
        "metrics": {"checkpoint_epoch": run.record.get("epoch"),
                    **{k: v for k, v in run.record.items() if k != "epoch"},
                    "epochs": summary.get("epochs"), "seed": run.cfg.seed},
        "seeds": seed_results(run.run_dir, metric),
        "metric": metric,
        "parity": parity,
        "latency": latency,
        "source": meta["source"],
        "versions": versions(),
        "files": {HUB_WEIGHTS: {"sha256": file_sha256(weights),
                                "size_bytes": weights.stat().st_size}},
    }


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def model_card(config: dict[str, Any]) -> str:
    """The ``README.md`` of a hub folder from its ``config.json`` content."""
    metric = config["metric"]
    spec = config["input_spec"]
    seeds = config["seeds"]
    values = [r[f"best_{metric}"] for r in seeds if isinstance(r.get(f"best_{metric}"), float)]
    spread = (f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} over "
              f"{len(values)} seeds" if len(values) > 1 else "one seed")
    teacher = config["teacher"]
    parity, lat = config["parity"], config["latency"]
    lines = [
        f"# {config['arch']} on {config['data']['dataset']}: "
        + (f"student of {teacher['arch']} ({config['method']})" if teacher
           else "trained alone"), "",
        f"A {config['arch']} classifier of {config['num_classes']} classes trained with kdlab "
        f"{config['kdlab_version']}"
        + (f" by distillation ({config['method']}) from a {teacher['arch']} teacher."
           if teacher else " alone (no teacher)."), "",
        "## Use", "",
        "```python", "import kdlab, torch",
        'student = kdlab.load_student("THIS_FOLDER")  # safetensors + JSON, no pickle',
        'x = torch.stack([student.preprocess("image.png")])',
        'probs = student(x).logits.softmax(1)',
        'print(student.kdlab_meta["classes"][int(probs.argmax())])', "```", "",
        "or `kdlab predict THIS_FOLDER IMAGES...`.", "",
        "## Input", "",
        f"- classes (logit order): {', '.join(config['classes'] or [])}",
        f"- preprocessing: {InputSpec.from_dict(spec).describe() if spec else 'not recorded'}",
        f"- tensor: float32 N x {config['in_channels']} x {config['input_size']} x "
        f"{config['input_size']}", "",
        "## Results", "",
        f"Test {metric} of this checkpoint (epoch {config['metrics'].get('checkpoint_epoch')}): "
        f"{_fmt(config['metrics'].get(metric))}; the experiment: {spread}.", "",
        f"| seed | run | best {metric} |", "|---|---|---|",
        *[f"| {r['seed']} | {r['run']} | {_fmt(r[f'best_{metric}'])} |" for r in seeds], "",
        "## Parity and latency", "",
        f"Read back from `{HUB_WEIGHTS}` and run on the {parity['test_images']} test images: "
        f"top-1 agreement {parity['top1_agreement']:.2f}% with the trained model, max |logit "
        f"difference| {parity['max_abs_logit_diff']:.3g}.", "",
        f"Latency (batch {lat['batch']}, {lat['threads']} thread, {lat['runtime']}, measured "
        f"in-process at export on {lat['cpu']}): median {lat['median_ms']:.2f} ms, p90 "
        f"{lat['p90_ms']:.2f} ms. `kdlab latency RUN` measures it carefully.", "",
        "## Data, teacher, method", "",
        f"- data: {config['data']['dataset']} ({config['data']['train_images']} training "
        "images)",
        f"- teacher: {json.dumps(teacher) if teacher else 'none'}",
        f"- method: {config['method']}", "",
        "## Intended use", "",
        "Research and evaluation of knowledge distillation, and deployment on images like the "
        "training data, preprocessed as above. It was validated only on the test split named "
        "here: check it on your own data before relying on it, and do not use it for decisions "
        "about people.", "",
    ]
    return "\n".join(lines)


def _replace_folder(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``; an existing hub folder there is
    replaced, anything else refused."""
    if target.exists():
        if not (target / HUB_CONFIG).is_file():
            raise ExportError(f"{target} exists and is not a kdlab hub folder; choose another "
                              "--out or remove it")
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def export_hub(run_dir: str | Path, out: str | Path | None = None, *,
               tolerance: float | None = None, min_agreement: float | None = None,
               overrides: Sequence[str] = (), plugins: Sequence[str] = (),
               checkpoint: str | Path | None = None) -> ExportResult:
    """Write the hub folder of ``run_dir``'s student (see the module docstring), check its
    parity with the eager student on the test set (read back through
    :func:`~kdlab.runs.student.read_hub_folder`) and return the folder as ``path``.

    Raises :class:`ExportError` (no safetensors, a non-hub folder in the way, a run without
    an input description) before writing, and :class:`ParityError` when the read-back model
    disagrees (the folder is kept beside the target as ``<name>.failed``)."""
    run = load_run(run_dir, overrides, plugins, checkpoint)
    if run.input_spec is None:
        raise ExportError(f"run {run_dir} records no input description; hub folders need one")
    target = Path(out) if out else run.run_dir / "export" / "hub"
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = run.metadata()
    weights = tmp / HUB_WEIGHTS
    _save_safetensors(run.student, weights, meta["arch"])
    atomic_write(tmp / HUB_CONFIG, json.dumps({**meta, "kind": HUB_KIND, "files": {
        HUB_WEIGHTS: {"sha256": file_sha256(weights)}}}))
    reloaded = LogitsOnly(read_hub_folder(tmp, plugins)).eval()
    figures = check_parity(LogitsOnly(run.student).eval(), reloaded, run.data.test_loader)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    min_agreement = DEFAULT_MIN_AGREEMENT if min_agreement is None else float(min_agreement)
    failures = _parity_failures(figures, False, tolerance, min_agreement)
    parity = {**figures, "tolerance": tolerance, "min_agreement": min_agreement,
              "passed": not failures, "failures": failures}
    latency = measure_latency_ms(LogitsOnly(run.student).eval(), (1, *run.input_shape))
    config = _hub_config(run, meta, weights, parity, latency)
    atomic_write(tmp / HUB_CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write(tmp / "README.md", model_card(config))
    if failures:
        failed = target.with_name(target.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        tmp.rename(failed)
        raise ParityError(f"parity check of the hub folder failed: {'; '.join(failures)} "
                          f"(kept in {failed})")
    _replace_folder(tmp, target)
    log.info("wrote %s (%s, %.2f MB); parity on %d test images: agreement %.2f%%, max |logit "
             "diff| %.3g", target, HUB_WEIGHTS, config["files"][HUB_WEIGHTS]["size_bytes"] / 1e6,
             figures["test_images"], figures["top1_agreement"], figures["max_abs_logit_diff"])
    return ExportResult(path=target, parity_path=target / HUB_CONFIG, report=config)

