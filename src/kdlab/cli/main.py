"""The ``kdlab`` command line.

Every user error (bad config, missing dataset, wrong checkpoint, ...) ends with one line on
stderr and a non-zero exit code; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdlab import bench
from kdlab.api import default_run_dir, load_experiment, train
from kdlab.bench import BenchSettings, run_bench
from kdlab.cli import doctor
from kdlab.cli.demo import default_out, results_markdown, run_demo
from kdlab.cli.detection_data import add_detection_data_parser
from kdlab.cli.doctor import run_doctor
from kdlab.config import (
    dump_yaml,
    load_config,
)
from kdlab.config.reference import config_reference
from kdlab.core.errors import ConfigError, KdlabError
from kdlab.core.io import atomic_write
from kdlab.core.plugins import import_plugins
from kdlab.core.runtime import resolve_amp, resolve_device
from kdlab.deploy.export import export_run
from kdlab.deploy.latency import LatencySettings, format_markdown, run_latency
from kdlab.engine.build import build_model
from kdlab.engine.progress import TqdmProgress
from kdlab.methods.compose import build_params
from kdlab.methods.registry import get_method, list_methods
from kdlab.models import list_models
from kdlab.report.build import build_report
from kdlab.runs.open import open_run
from kdlab.sweep import TqdmSweepProgress, plan_sweep, run_sweep
from kdlab.tasks import task_for
from kdlab.tasks.detection.evaluation import write_coco_results

log = logging.getLogger("kdlab")


# --------------------------------------------------------------------------- commands
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
    metric = "AP" if cfg.task == "detection" else "top1"
    name = "AP" if cfg.task == "detection" else "top-1"
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
        cfg = run.cfg
        checkpoint = args.checkpoint or str(run.rundir.best_checkpoint)
        out = Path(args.out) if args.out else run.path / "eval"
    else:
        cfg = load_config(args.target, args.set, plugins=args.plugin)
        checkpoint = args.checkpoint or cfg.student.checkpoint
        out = Path(args.out) if args.out else None
        if not checkpoint:
            raise ConfigError("no checkpoint to evaluate: pass --checkpoint or set "
                              "student.checkpoint")
    device = resolve_device(cfg.runtime.device)
    task = task_for(cfg)
    data = task.build_data(cfg.data, seed=cfg.seed, device=device,
                           channels_last=cfg.runtime.channels_last, rank=0, world_size=1)
    model = build_model(task, cfg.student.model_copy(update={"checkpoint": checkpoint}), data,
                        device)
    res = task.evaluate(model, data.test_loader, device, resolve_amp(cfg.runtime.amp, device))
    shown = "  ".join(f"{_METRIC_LABELS.get(k, k)} {v:.4f}" if k == "loss" else
                      f"{_METRIC_LABELS.get(k, k)} {v:.2f}" for k, v in res.items() if k != "count")
    sys.stdout.write(f"{cfg.student.arch} {checkpoint}: {shown}  ({res['count']} images)\n")
    if out is not None:
        _write_eval(out, cfg, checkpoint, res, getattr(task, "last_detections", None))
    return 0


def _write_eval(out: Path, cfg: Any, checkpoint: str, scores: dict[str, float],
                detections: list[dict[str, Any]] | None) -> None:
    """``scores.json`` (and ``detections.json``, COCO results format, for detection) in ``out``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    record = {"arch": cfg.student.arch, "checkpoint": str(checkpoint), "dataset": cfg.data.name,
              "task": cfg.task, "scores": scores}
    atomic_write(out / "scores.json", json.dumps(record, indent=2, allow_nan=True))
    if detections is not None:
        write_coco_results(out / "detections.json", detections)
    sys.stdout.write(f"wrote {out / 'scores.json'}"
                     + ("" if detections is None else f" and {out / 'detections.json'}") + "\n")


#: how ``kdlab eval`` names the metrics of a task's evaluation.
_METRIC_LABELS = {"top1": "top-1", "top5": "top-5"}


def cmd_models(args: argparse.Namespace) -> int:
    """List the model zoo (and the models of ``--plugin`` modules)."""

    import_plugins(args.plugin)
    sys.stdout.write("\n".join(list_models()) + "\n")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    """List the registered methods (and those of ``--plugin`` modules) with their defaults."""

    import_plugins(args.plugin)
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
    table = results_markdown(run_demo(out, quick=args.quick, progress=not args.no_progress),
                             quick=args.quick)
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
    from tqdm.contrib.logging import logging_redirect_tqdm

    progress = TqdmSweepProgress(enabled=not args.no_progress and not args.dry_run)
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            result = run_sweep(args.spec, jobs=args.jobs, retry_failed=args.retry_failed,
                               dry_run=args.dry_run, progress=progress, plugins=args.plugin)
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
    import json

    report = run_doctor(args.run_dir, config=args.config, n_checkpoints=args.checkpoints,
                        arch=args.arch)
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write(doctor.format_table(report))
    return 1 if report.failed else 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Measure the speed of the full training step on synthetic data (see kdlab.bench)."""
    import json

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


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's student alone, checked for parity with the eager model
    (:mod:`kdlab.deploy.export`)."""

    res = export_run(args.run_dir, args.format, args.out, int8=args.int8,
                     calibration_batches=args.batches, tolerance=args.tolerance,
                     min_agreement=args.min_agreement, overrides=args.set, plugins=args.plugin,
                     checkpoint=args.checkpoint)
    r = res.report
    sys.stdout.write(f"{res.path}: {r['precision']} {r['format']}, top-1 agreement "
                     f"{r['top1_agreement']:.2f}%, max |logit diff| "
                     f"{r['max_abs_logit_diff']:.3g}, top-1 {r['top1_eager']:.2f}% eager, "
                     f"{r['top1_exported']:.2f}% {'int8' if args.int8 else 'exported'} "
                     f"({r['top1_change']:+.2f} pp; {r['test_images']} test images); "
                     f"{res.parity_path}\n")
    return 0


def cmd_latency(args: argparse.Namespace) -> int:
    """Teacher-vs-student latency, one process per configuration (kdlab.deploy.latency)."""

    settings = LatencySettings(
        batch_sizes=tuple(args.batch_sizes), runs=args.runs, warmup=args.warmup,
        threads=args.threads, runtimes=tuple(args.runtimes),
        calibration_batches=args.batches, allow_short=args.allow_short)
    result = run_latency(args.run_dir, settings, args.out, overrides=args.set,
                         plugins=args.plugin)
    sys.stdout.write(format_markdown(result) + f"\n{result['markdown']}\n")
    return 1 if any("error" in r for r in result["rows"]) else 0


# --------------------------------------------------------------------------- parser
def _add_plugin_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import this module (dotted name, or a .py file) first, so that it can "
                        "register methods, models and datasets (repeatable)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key (repeatable)")
    _add_plugin_arg(p)
    p.add_argument("--run-dir", help="run directory (default: OUTPUT_DIR/NAME/seedSEED)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last complete checkpoint (it "
                        "must hold one); with a larger optim.epochs, extend a multistep run")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a log line every runtime.log_every steps instead")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop after this epoch (continue later with --resume)")
    p.add_argument("--allow-teacher-change", action="store_true",
                   help="--resume even though the teacher checkpoint's sha256 differs from the "
                        "one recorded at the start (the change is recorded in teacher.json)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab", description="Knowledge distillation lab: SDD, DCKD and friends.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str
            ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        return p

    _add_run_args(add("train", cmd_train, "train a network alone (teacher or baseline)"))
    _add_run_args(add("distill", cmd_distill, "distil a teacher into a student"))
    p = add("eval", cmd_eval, "evaluate a run directory's best weights or a checkpoint")
    p.add_argument("target", help="run directory, or experiment YAML file")
    p.add_argument("--checkpoint", help="weights to evaluate (default: the run's best.pt)")
    p.add_argument("--out", help="folder for scores.json (and, for detection, detections.json "
                   "in the COCO results format); default: <run>/eval for a run directory")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_plugin_arg(p)
    _add_plugin_arg(add("models", cmd_models, "list the model zoo"))
    _add_plugin_arg(add("methods", cmd_methods, "list methods and their default hyperparameters"))
    p = add("config", lambda a: 2, "show, check or document configs")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_plugin_arg(show)
    show.set_defaults(fn=cmd_config_show)
    check = csub.add_parser("check", help="validate every config under a folder")
    check.add_argument("path")
    _add_plugin_arg(check)
    check.set_defaults(fn=cmd_config_check)
    reference = csub.add_parser("reference", help="print the reference of every config key "
                                                  "(markdown: docs/config-reference.md)")
    reference.set_defaults(fn=cmd_config_reference)
    p = add("demo", cmd_demo, "the main job on real Fashion-MNIST (about 10 minutes on 2 cores)")
    p.add_argument("--out", help="where the demo's runs go (default: runs/demo, or "
                                 "runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a much shorter demo: a smoke test, its numbers are not results")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a log line every 20 steps instead")
    p = add("report", cmd_report, "aggregate finished runs into tables and plots")
    p.add_argument("runs_dir", help="folder searched recursively for run directories")
    p.add_argument("--out", help="report folder (default: RUNS_DIR/report)")
    p.add_argument("--paper", metavar="CSV", help="published numbers (default: the packaged CSV)")
    p = add("sweep", cmd_sweep, "run configs x seeds in worker processes (resumable)")
    p.add_argument("spec", help="sweep spec YAML (name, output_dir, configs, seeds, ...)")
    _add_plugin_arg(p)
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--dry-run", action="store_true", help="show the runs, start nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add("doctor", cmd_doctor, "check the environment, datasets and a run directory")
    p.add_argument("--run-dir", help="where runs will write (default: the current folder)")
    p.add_argument("--config", help="also validate this experiment YAML and its teacher")
    p.add_argument("--arch", help="model whose checkpoints must fit (default: config's student)")
    p.add_argument("--checkpoints", type=int, default=4, metavar="N",
                   help="checkpoints that must fit on the disk (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = add("bench", cmd_bench, "measure training-step speed on synthetic data")
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--method", default="sd_dkd")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. method.params.scales=[1,2] (repeatable)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune",
                            "max-autotune-no-cudagraphs"],
                   help="torch.compile teacher and student (MODE: default, reduce-overhead "
                        "= CUDA graphs, max-autotune, max-autotune-no-cudagraphs)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds (median reported)")
    p.add_argument("--part-steps", type=int, help="steps of the synchronised per-part pass")
    p.add_argument("--eval-size", type=int, default=1000, help="test images (0: no eval)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON")
    p = add("export", cmd_export, "export a run's student alone (state_dict, torchscript, "
                                  "exported, onnx; optionally int8) and check its parity")
    p.add_argument("run_dir", help="run directory (its checkpoints/best.pt is exported)")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="state_dict, torchscript, exported (torch.export) or onnx")
    p.add_argument("--out", metavar="FILE", help="default: RUN_DIR/export/student.<ext>")
    p.add_argument("--int8", action="store_true",
                   help="post-training static int8 for x86 CPUs (FX; --format torchscript)")
    p.add_argument("--batches", type=int, default=10, metavar="N",
                   help="training batches that calibrate --int8 (default 10)")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="fp32 parity: max |logit difference| allowed (default 1e-3)")
    p.add_argument("--min-agreement", type=float, metavar="PCT",
                   help="parity: minimum top-1 agreement in %% (default 99.9; 95 with --int8)")
    p.add_argument("--checkpoint", help="weights to export (default: the run's best.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. data.root=... (repeatable)")
    _add_plugin_arg(p)
    p = add("latency", cmd_latency, "teacher-vs-student inference latency table (CPU, one "
                                    "process per configuration)")
    p.add_argument("run_dir", help="run directory (student: best.pt; teacher: its config)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], metavar="BS")
    p.add_argument("--runs", type=int, default=30, help="timed runs per row (>= 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (>= 5)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    p.add_argument("--runtimes", nargs="+", default=["eager", "torchscript", "onnxruntime",
                                                     "int8"], metavar="RUNTIME",
                   help="eager, torchscript, onnxruntime, int8 (default: all)")
    p.add_argument("--batches", type=int, default=10, metavar="N",
                   help="training batches that calibrate the int8 models (default 10)")
    p.add_argument("--out", metavar="DIR", help="default: RUN_DIR/latency")
    p.add_argument("--allow-short", action="store_true",
                   help="allow fewer runs / warm-ups than the protocol's (tests, smoke checks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config (repeatable)")
    _add_plugin_arg(p)

    add_detection_data_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kdlab`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return int(args.fn(args))
    except KdlabError as e:
        if args.debug:
            raise
        sys.stderr.write(f"kdlab: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt as e:  # Ctrl-C, or RunInterrupted (SIGTERM during a run)
        signum = int(getattr(e, "signum", signal.SIGINT))
        how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
        sys.stderr.write(f"kdlab: interrupted{how}; a run continues from its last checkpoint "
                         "with --resume\n")
        return 128 + signum
    except OSError as e:
        if args.debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        sys.stderr.write(f"kdlab: error: {e.strerror or e}{where}\n")
        return 2
