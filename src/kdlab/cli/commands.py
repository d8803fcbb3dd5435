"""The handlers of the ``kdlab`` commands (``cmd_*``): each takes the parsed arguments and
returns the exit status.

:mod:`kdlab.cli.parsers` attaches them to their subcommands (``set_defaults(fn=...)``) and
:func:`kdlab.cli.main.main` runs the chosen one, turning kdlab errors into one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from kdlab import bench
from kdlab.api import default_run_dir, load_experiment, train
from kdlab.bench import BenchSettings, run_bench
from kdlab.cli import doctor
from kdlab.cli.demo import default_out, results_markdown, run_demo
from kdlab.cli.doctor import run_doctor
from kdlab.config import (
    dump_yaml,
    load_config,
)
from kdlab.config.reference import config_reference
from kdlab.core.errors import ConfigError, KdlabError
from kdlab.core.io import atomic_write
from kdlab.core.plugins import import_plugins, trusted_plugins
from kdlab.core.runtime import resolve_amp, resolve_device
from kdlab.deploy.detection import (
    export_detector,
    export_summary,
    is_detection_run,
    run_detector_latency,
)
from kdlab.deploy.export import ExportError, export_run
from kdlab.deploy.hub import export_hub
from kdlab.deploy.latency import LatencySettings, format_markdown, run_latency
from kdlab.deploy.onnx_int8 import OnnxInt8Settings
from kdlab.deploy.predict import (
    expand_images,
    format_rows,
    open_detector,
    open_predictor,
    predict_detections,
    predict_files,
)
from kdlab.deploy.preprocessing import export_with_preprocessing
from kdlab.deploy.segmentation import export_segmenter, is_segmentation_run
from kdlab.deploy.segmentation import export_summary as segmentation_summary
from kdlab.engine.build import build_model
from kdlab.engine.progress import TqdmProgress
from kdlab.methods.compose import build_params
from kdlab.methods.registry import get_method, list_methods
from kdlab.models import list_models
from kdlab.report.build import build_report
from kdlab.runs.open import open_run
from kdlab.sweep import TqdmSweepProgress, plan_sweep, run_sweep
from kdlab.tasks import get_task, task_for
from kdlab.tasks.detection.evaluation import write_coco_results
from kdlab.tasks.segmentation.evaluation import format_class_iou, named_class_iou

__all__ = [
    "cmd_bench",
    "cmd_config_check",
    "cmd_config_reference",
    "cmd_config_show",
    "cmd_demo",
    "cmd_distill",
    "cmd_doctor",
    "cmd_eval",
    "cmd_export",
    "cmd_latency",
    "cmd_methods",
    "cmd_models",
    "cmd_report",
    "cmd_sweep",
    "cmd_train",
]

log = logging.getLogger("kdlab")


def _load_cfg(args: argparse.Namespace) -> Any:
    return load_experiment(args.config, args.set, args.plugin)


def _train(args: argparse.Namespace, require_teacher: bool) -> int:
    """``kdlab train`` / ``kdlab distill``: the Python API's path (:mod:`kdlab.api`)."""

    cfg = _load_cfg(args)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    summary = train(cfg, run_dir, resume="required" if args.resume else False,
                    progress=TqdmProgress(enabled=not args.no_progress),
                    require_teacher=require_teacher, stop_after=args.stop_after,
                    allow_teacher_change=args.allow_teacher_change)
    task = get_task(cfg.task)
    metric = task.best_metric
    name = task.metric(metric).label
    if summary.get(f"test_{metric}_at_best") is not None:  # best epoch chosen on validation
        log.info("run %s: best val %s %.2f (epoch %d), test %s there %.2f, last test "
                 "%s %.2f", run_dir, name, summary[f"best_val_{metric}"], summary["best_epoch"],
                 name, summary[f"test_{metric}_at_best"], name, summary[f"last_{metric}"])
    else:
        log.info("run %s: best %s %.2f (epoch %d), last %s %.2f", run_dir, name,
                 summary[f"best_{metric}"], summary["best_epoch"], name,
                 summary[f"last_{metric}"])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a network alone (teacher or student baseline)."""
    return _train(args, require_teacher=False)


def cmd_distill(args: argparse.Namespace) -> int:
    """Distil a teacher into a student with the configured method."""
    return _train(args, require_teacher=True)


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (or a run's best weights) on the configured test set."""

    if args.target and Path(args.target).is_dir():
        run = open_run(args.target, args.set, args.plugin)
        cfg, task = run.cfg, run.task
        device = resolve_device(cfg.runtime.device)
        model = run.student(args.checkpoint or "best", device)
        checkpoint = args.checkpoint or str(run.rundir.best_checkpoint)
        out = Path(args.out) if args.out else run.path / "eval"
    else:
        cfg = load_config(args.target, args.set, plugins=args.plugin)
        checkpoint = args.checkpoint or cfg.student.checkpoint
        out = Path(args.out) if args.out else None
        if not checkpoint:
            raise ConfigError("no checkpoint to evaluate: pass --checkpoint or set "
                              "student.checkpoint")
        task, device = task_for(cfg), resolve_device(cfg.runtime.device)
        model = None
    data = task.build_data(cfg.data, seed=cfg.seed, device=device,
                           channels_last=cfg.runtime.channels_last, rank=0, world_size=1)
    if model is None:
        model = build_model(task, cfg.student.model_copy(update={"checkpoint": checkpoint}),
                            data, device)
    res = task.evaluate(model, data.test_loader, device, resolve_amp(cfg.runtime.amp, device))
    shown = "  ".join(f"{task.metric(k).label} {v:.4f}" if k == "loss" else
                      f"{task.metric(k).label} {v:.2f}" for k, v in res.items() if k != "count")
    sys.stdout.write(f"{cfg.student.arch} {checkpoint}: {shown}  ({res['count']} images)\n")
    extra: dict[str, Any] = {}
    if cfg.task == "segmentation":  # per-class IoU named by the data set's classes
        extra["per_class_iou"] = named_class_iou(res, data.class_names)
        sys.stdout.write(format_class_iou(extra["per_class_iou"]))
    if args.regions:
        res.update(_eval_regions(task, model, data.test_loader, device, args.regions,
                                 resolve_amp(cfg.runtime.amp, device)))
    if out is not None:
        _write_eval(out, cfg, checkpoint, res, getattr(task, "last_detections", None), extra)
    return 0


def _eval_regions(task: Any, model: Any, loader: Any, device: Any, scales: list[int],
                  amp: Any) -> dict[str, float]:
    """``kdlab eval --regions``: print and return the ``region_*`` scores of SDD's local logits."""
    regions = {k: v for k, v in task.evaluate_regions(model, loader, device, scales, amp).items()
               if k.startswith("region_")}
    sys.stdout.write("scale  local top-1  agrees with the model\n")
    for m in sorted({int(k.rsplit("_", 1)[1]) for k in regions}):
        sys.stdout.write(f"{m}x{m:<4} {regions[f'region_top1_{m}']:10.2f}  "
                         f"{regions[f'region_agree_{m}']:10.2f}\n")
    return regions


def _write_eval(out: Path, cfg: Any, checkpoint: str, scores: dict[str, float],
                detections: list[dict[str, Any]] | None,
                extra: dict[str, Any] | None = None) -> None:
    """``scores.json`` (and ``detections.json``, COCO results format, for detection) in ``out``;
    ``extra``: more top-level entries (segmentation: ``per_class_iou``)."""
    out.mkdir(parents=True, exist_ok=True)
    record = {"arch": cfg.student.arch, "checkpoint": str(checkpoint), "dataset": cfg.data.name,
              "task": cfg.task, "scores": scores, **(extra or {})}
    atomic_write(out / "scores.json", json.dumps(record, indent=2, allow_nan=True))
    if detections is not None:
        write_coco_results(out / "detections.json", detections)
    sys.stdout.write(f"wrote {out / 'scores.json'}"
                     + ("" if detections is None else f" and {out / 'detections.json'}") + "\n")


def cmd_models(args: argparse.Namespace) -> int:
    """List the model zoo (and the models of ``--plugin`` and ``$KDLAB_PLUGINS`` modules)."""

    import_plugins(trusted_plugins(args.plugin))
    sys.stdout.write("\n".join(list_models()) + "\n")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods (and those of ``--plugin`` and ``$KDLAB_PLUGINS`` modules)
    with their defaults."""

    import_plugins(trusted_plugins(args.plugin))
    for kind in ("logit", "partner"):
        sys.stdout.write(f"{kind} methods:\n")
        for name in list_methods(kind):
            defaults = get_method(name).Params().model_dump()
            shown = ", ".join(f"{k}={v}" for k, v in defaults.items())
            sys.stdout.write(f"  {name:10s} {shown}\n")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    """Print the fully resolved config as YAML."""

    sys.stdout.write(dump_yaml(_load_cfg(args)))
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    """Print the config reference (every key, type, default, allowed values) as markdown."""

    sys.stdout.write(config_reference())
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    """Validate every YAML config under a folder (method hyperparameters included).

    Files named ``*.sweep.yaml`` are sweep specs and are validated as such; files whose name
    starts with ``_`` are bases, checked through the configs that inherit from them.
    """

    root = Path(args.path)
    files = [root] if root.is_file() else sorted(root.rglob("*.yaml"))
    files = [f for f in files if not f.name.startswith("_")]
    bad = 0
    for f in files:
        try:
            if f.name.endswith(".sweep.yaml"):
                plan_sweep(f, plugins=args.plugin)  # validates the spec and every run's config
                continue
            cfg = load_config(f, plugins=args.plugin)
            build_params(cfg.method.name, cfg.method.params, "method.params")
            for i, p in enumerate(cfg.method.partners):
                if get_method(p.name).kind != "partner":
                    raise KdlabError(f"method.partners.{i}: {p.name!r} is not a partner method")
                build_params(p.name, p.params, f"method.partners.{i}.params")
        except KdlabError as e:
            bad += 1
            sys.stdout.write(f"FAIL {f}: {e}\n")
    sys.stdout.write(f"{len(files) - bad} of {len(files)} configs valid\n")
    return 1 if bad else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: real Fashion-MNIST, a teacher, and distillation with the main methods."""

    out = Path(args.out) if args.out else default_out(args.quick)
    rows = run_demo(out, quick=args.quick, progress=not args.no_progress, amp=args.amp)
    table = results_markdown(rows, quick=args.quick)
    (out / "results.md").write_text(table)
    title = "quick demo (smoke test)" if args.quick else "demo results"
    sys.stdout.write(f"\nFashion-MNIST {title} ({out / 'results.md'}):\n\n")
    sys.stdout.write(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Aggregate finished runs into results.md/.csv/.html and plots (never re-runs training)."""

    report = build_report(args.runs_dir, args.out, args.paper)
    if report.unfinished:
        log.warning("%d unfinished or failed run(s) listed separately in %s",
                    len(report.unfinished), report.markdown)
    sys.stdout.write(f"{report.markdown}\n")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run configs x seeds (x a matrix) in worker processes; resumable, crash-proof."""
    progress = TqdmSweepProgress(enabled=not args.no_progress and not args.dry_run)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            result = run_sweep(args.spec, jobs=args.jobs, retry_failed=args.retry_failed,
                               dry_run=args.dry_run, progress=progress, plugins=args.plugin,
                               launcher=args.launcher)
    finally:
        progress.close()
    if args.dry_run:
        for run_id, state in result.states.items():
            sys.stdout.write(f"{state['status']:8s} {run_id}\n")
        sys.stdout.write(f"{len(result.ids('pending'))} of {result.total} run(s) would run "
                         f"({result.sweep_dir})\n")
        return 0
    for run_id in result.failed:
        log.warning("FAILED %s: %s", run_id, result.states[run_id]["error"])
    log.info("sweep %s: %d of %d run(s) finished, %d failed; state in %s", args.spec,
             len(result.finished), result.total, len(result.failed), result.state_path)
    return result.exit_code


def cmd_doctor(args: argparse.Namespace) -> int:
    """Environment, datasets, disk and run-safety checks; exit 1 when a check fails."""
    report = run_doctor(args.run_dir, config=args.config, n_checkpoints=args.checkpoints,
                        arch=args.arch)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(doctor.format_table(report))
    return 1 if report.failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure the speed of the full training step on synthetic data (see kdlab.bench)."""
    settings = BenchSettings(
        teacher=args.teacher, student=args.student, method=args.method, overrides=args.set,
        batch_size=args.batch_size, input_size=args.input_size, num_classes=args.num_classes,
        device=args.device, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, threads=args.threads, steps=args.steps, warmup=args.warmup,
        part_steps=args.part_steps, eval_size=args.eval_size,
        eval_batch_size=args.eval_batch_size, flops=not args.no_flops)
    result = run_bench(settings, rounds=args.rounds)
    sys.stdout.write(bench.format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _onnx_int8_settings(args: argparse.Namespace) -> OnnxInt8Settings | None:
    """The ``--calibration-method`` / ``--per-tensor`` knobs of ``--format onnx --int8``."""
    if args.calibration_method is None and not args.per_tensor:
        return None
    if not (args.int8 and args.format == "onnx"):
        raise ExportError("--calibration-method and --per-tensor go with --format onnx --int8")
    kw: dict[str, Any] = {"per_channel": not args.per_tensor}
    if args.calibration_method:
        kw["calibration_method"] = args.calibration_method
    return OnnxInt8Settings(**kw)


def _special_export(args: argparse.Namespace, common: dict[str, Any]) -> int | None:
    """``--format hub`` and ``--include-preprocessing`` (their own exporters); None for the
    plain formats."""
    if args.probabilities and not args.include_preprocessing:
        raise ExportError("--probabilities goes with --include-preprocessing")
    if args.format == "hub":
        if args.int8 or args.include_preprocessing:
            raise ExportError("--format hub holds the fp32 weights: drop --int8 and "
                              "--include-preprocessing")
        res = export_hub(args.run_dir, args.out, **common)
        p = res.report["parity"]
        sys.stdout.write(f"{res.path}: hub folder ({', '.join(sorted(os.listdir(res.path)))}), "
                         f"top-1 agreement {p['top1_agreement']:.2f}%, max |logit diff| "
                         f"{p['max_abs_logit_diff']:.3g} on {p['test_images']} test images\n")
        return 0
    if not args.include_preprocessing:
        return None
    if args.format != "onnx" or args.int8:
        raise ExportError("--include-preprocessing makes an fp32 ONNX file: use --format onnx "
                          "without --int8")
    res = export_with_preprocessing(args.run_dir, args.out, probabilities=args.probabilities,
                                    **common)
    r = res.report
    sys.stdout.write(f"{res.path}: onnx with preprocessing (uint8 {r['input']['shape']} in, "
                     f"{r['output']} out), top-1 agreement {r['top1_agreement']:.2f}%, max "
                     f"|diff| {r['max_abs_logit_diff']:.3g} on {r['test_images']} test images; "
                     f"{res.parity_path}\n")
    return 0


#: (is it this task's run, export it, summarise the result, why --include-preprocessing does
#: not apply) of the tasks with their own export module (kdlab.deploy.detection/.segmentation).
_TASK_EXPORTS: tuple[tuple[Any, Any, Any, str], ...] = (
    (is_detection_run, export_detector, export_summary,
     "a detector's resize and normalisation are inside every artefact already"),
    (is_segmentation_run, export_segmenter, segmentation_summary,
     "a segmentation student takes normalised images (the metadata's input)"),
)


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's student alone, checked for parity with the eager model
    (:mod:`kdlab.deploy.export`)."""

    common = dict(tolerance=args.tolerance, min_agreement=args.min_agreement,
                  overrides=args.set, plugins=args.plugin, checkpoint=args.checkpoint)
    for is_task, export, summary, why_not in _TASK_EXPORTS:
        if is_task(args.run_dir, args.set, args.plugin):
            if getattr(args, "include_preprocessing", False):
                raise ExportError(f"--include-preprocessing is for classifiers: {why_not}")
            res = export(args.run_dir, args.format, args.out, int8=args.int8, **common)
            sys.stdout.write(summary(res) + "\n")
            return 0
    special = _special_export(args, common)
    if special is not None:
        return special
    res = export_run(args.run_dir, args.format, args.out, int8=args.int8,
                     calibration_batches=args.batches, onnx_int8=_onnx_int8_settings(args),
                     **common)
    r = res.report
    sys.stdout.write(f"{res.path}: {r['precision']} {r['format']}, top-1 agreement "
                     f"{r['top1_agreement']:.2f}%, max |logit diff| "
                     f"{r['max_abs_logit_diff']:.3g}, top-1 {r['top1_eager']:.2f}% eager, "
                     f"{r['top1_exported']:.2f}% {'int8' if args.int8 else 'exported'} "
                     f"({r['top1_change']:+.2f} pp; {r['test_images']} test images); "
                     f"{res.parity_path}\n")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Top-k classes, or detections, of image files (:mod:`kdlab.deploy.predict`)."""
    images = expand_images(args.images)
    detector = open_detector(args.source, plugins=args.plugin, checkpoint=args.checkpoint)
    if detector is not None:
        done = predict_detections(detector, images, Path(args.out or "predictions"),
                                  min_score=args.min_score, draw=not args.no_draw)
        sys.stdout.write(f"{done['detections']} detections (score >= {args.min_score:g}) in "
                         f"{done['images']} images: {done['json']}"
                         + (f", {len(done['drawn'])} drawn PNGs" if done["drawn"] else "") + "\n")
        return 0
    predictor = open_predictor(args.source, plugins=args.plugin, checkpoint=args.checkpoint)
    rows = predict_files(predictor, images, top_k=args.top_k, batch_size=args.batch_size)
    text = format_rows(rows, args.output_format)
    if args.out:
        atomic_write(Path(args.out), text)
        log.info("wrote %d predictions (%s) to %s", len(rows), predictor.fmt, args.out)
    else:
        sys.stdout.write(text)
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    """Teacher-vs-student latency, one process per configuration (kdlab.deploy.latency)."""

    settings = LatencySettings(
        batch_sizes=tuple(args.batch_sizes), runs=args.runs, warmup=args.warmup,
        threads=args.threads, runtimes=tuple(args.runtimes),
        calibration_batches=args.batches, allow_short=args.allow_short)
    detector = is_detection_run(args.run_dir, args.set, args.plugin)
    result = (run_detector_latency if detector else run_latency)(
        args.run_dir, settings, args.out, overrides=args.set, plugins=args.plugin)
    sys.stdout.write(format_markdown(result) + f"\n{result['markdown']}\n")
    return 1 if any("error" in r for r in result["rows"]) else 0
