"""The argument parser of the ``kdlab`` command: one small builder per command (or group).

Each builder adds its subcommand to the main parser's subparsers and attaches the command's
handler from :mod:`kdlab.cli.commands` with ``set_defaults(fn=...)``; :func:`build_parser`
assembles them in the order ``kdlab --help`` lists the commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeAlias

from kdlab.cli.commands import (
    cmd_bench,
    cmd_config_check,
    cmd_config_reference,
    cmd_config_show,
    cmd_demo,
    cmd_distill,
    cmd_doctor,
    cmd_eval,
    cmd_export,
    cmd_latency,
    cmd_methods,
    cmd_models,
    cmd_predict,
    cmd_report,
    cmd_sweep,
    cmd_train,
)
from kdlab.cli.detection_data import add_detection_data_parser
from kdlab.cli.segmentation_data import add_segmentation_data_parser
from kdlab.core.version import __version__
from kdlab.deploy.latency import RUNTIMES

__all__ = ["build_parser"]

_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
_Handler: TypeAlias = Callable[[argparse.Namespace], int]


def _add_plugin_arg(p: argparse.ArgumentParser, reads_runs: bool = False) -> None:
    """``--plugin`` (repeatable). ``reads_runs``: the command reads run directories, whose
    plugins are trusted only through this flag (or ``KDLAB_PLUGINS``)."""
    text = ("import this module (dotted name, or a .py file) first, so that it can register "
            "methods, models and datasets (repeatable; KDLAB_PLUGINS=a,b adds more)")
    if reads_runs:
        text += ("; also how the plugins a run names are trusted: kdlab never imports a plugin "
                 "named by a run's config.yaml unless it is given here or in KDLAB_PLUGINS")
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=text)


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


def _add_command(sub: _Subparsers, name: str, fn: _Handler, help_: str
                 ) -> argparse.ArgumentParser:
    """Subcommand ``name`` (``help_`` is its help and description) running ``fn``."""
    p = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(fn=fn)
    return p


def _add_train(sub: _Subparsers) -> None:
    """``kdlab train`` and ``kdlab distill``."""
    _add_run_args(_add_command(sub, "train", cmd_train,
                               "train a network alone (teacher or baseline)"))
    _add_run_args(_add_command(sub, "distill", cmd_distill, "distil a teacher into a student"))


def _add_eval(sub: _Subparsers) -> None:
    p = _add_command(sub, "eval", cmd_eval,
                     "evaluate a run directory's best weights or a checkpoint")
    p.add_argument("target", help="run directory, or experiment YAML file")
    p.add_argument("--checkpoint", help="weights to evaluate (default: the run's best.pt)")
    p.add_argument("--out", help="folder for scores.json (and, for detection, detections.json "
                   "in the COCO results format); default: <run>/eval for a run directory")
    p.add_argument("--regions", metavar="SCALES", type=_scales,
                   help="also measure SDD's local logits: top-1 of the classifier on each cell "
                   "of each m x m grid of the final map, and their agreement with the model, "
                   "e.g. --regions 1,2,4 (classification)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    _add_plugin_arg(p, reads_runs=True)


def _scales(text: str) -> list[int]:
    """``"1,2,4"`` as ``[1, 2, 4]`` (argparse reports a ValueError as a usage error)."""
    return [int(part) for part in text.split(",") if part.strip()]


def _add_listings(sub: _Subparsers) -> None:
    """``kdlab models`` and ``kdlab methods``."""
    _add_plugin_arg(_add_command(sub, "models", cmd_models, "list the model zoo"))
    _add_plugin_arg(_add_command(sub, "methods", cmd_methods,
                                 "list methods and their default hyperparameters"))


def _add_config(sub: _Subparsers) -> None:
    """``kdlab config show|check|reference``."""
    p = _add_command(sub, "config", lambda a: 2, "show, check or document configs")
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


def _add_demo(sub: _Subparsers) -> None:
    p = _add_command(sub, "demo", cmd_demo,
                     "the main job on real Fashion-MNIST (about 5 minutes on 2 cores)")
    p.add_argument("--out", help="where the demo's runs go (default: runs/demo, or "
                                 "runs/demo-quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a much shorter demo: a smoke test, its numbers are not results")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a log line every 20 steps instead")
    p.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                   help="runtime.amp of every run (auto: bf16 where the CPU has native bf16; "
                        "off: fp32, the same numbers on any machine)")


def _add_report(sub: _Subparsers) -> None:
    p = _add_command(sub, "report", cmd_report, "aggregate finished runs into tables and plots")
    p.add_argument("runs_dir", help="folder searched recursively for run directories")
    p.add_argument("--out", help="report folder (default: RUNS_DIR/report)")
    p.add_argument("--paper", metavar="CSV", help="published numbers (default: the packaged CSV)")


def _add_sweep(sub: _Subparsers) -> None:
    p = _add_command(sub, "sweep", cmd_sweep,
                     "run configs x seeds in worker processes (resumable)")
    p.add_argument("spec", help="sweep spec YAML (name, output_dir, configs, seeds, ...)")
    _add_plugin_arg(p)
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="runs at a time (local launcher)")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local worker processes, or a submitit job per run (the spec's "
                        "`slurm:` section; pip install -e '.[cluster]')")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--dry-run", action="store_true", help="show the runs, start nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_doctor(sub: _Subparsers) -> None:
    p = _add_command(sub, "doctor", cmd_doctor,
                     "check the environment, datasets and a run directory")
    p.add_argument("--run-dir", help="where runs will write (default: the current folder)")
    p.add_argument("--config", help="also validate this experiment YAML and its teacher")
    p.add_argument("--arch", help="model whose checkpoints must fit (default: config's student)")
    p.add_argument("--checkpoints", type=int, default=4, metavar="N",
                   help="checkpoints that must fit on the disk (default 4)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_bench(sub: _Subparsers) -> None:
    p = _add_command(sub, "bench", cmd_bench, "measure training-step speed on synthetic data")
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


def _add_export(sub: _Subparsers) -> None:
    p = _add_command(sub, "export", cmd_export,
                     "export a run's student alone (state_dict, torchscript, "
                     "exported, onnx, hub; optionally int8) and check its parity")
    p.add_argument("run_dir", help="run directory (its checkpoints/best.pt is exported)")
    p.add_argument("--format", required=True, metavar="FORMAT",
                   help="state_dict, torchscript, exported (torch.export), onnx, or hub (a "
                        "folder: model.safetensors, config.json, README.md model card)")
    p.add_argument("--out", metavar="FILE", help="default: RUN_DIR/export/student.<ext> "
                   "(hub: RUN_DIR/export/hub)")
    p.add_argument("--include-preprocessing", action="store_true",
                   help="onnx: uint8 pixels in (after the resize and crop of the run's input "
                        "description), padding and normalisation inside the graph")
    p.add_argument("--probabilities", action="store_true",
                   help="with --include-preprocessing: softmax probabilities out, not logits")
    p.add_argument("--int8", action="store_true",
                   help="post-training static int8 for x86 CPUs, calibrated on clean training "
                        "images: --format torchscript (torch FX) or onnx (onnxruntime "
                        "quantize_static, QDQ)")
    p.add_argument("--batches", type=int, default=10, metavar="N",
                   help="training batches that calibrate --int8 (default 10)")
    p.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"],
                   help="--format onnx --int8: how activation ranges are chosen (default minmax)")
    p.add_argument("--per-tensor", action="store_true",
                   help="--format onnx --int8: one weight scale per tensor instead of per "
                        "output channel")
    p.add_argument("--tolerance", type=float, metavar="X",
                   help="fp32 parity: max |logit difference| allowed (default 1e-3)")
    p.add_argument("--min-agreement", type=float, metavar="PCT",
                   help="parity: minimum top-1 agreement in %% (default 99.9; 95 with --int8)")
    p.add_argument("--checkpoint", help="weights to export (default: the run's best.pt)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config, e.g. data.root=... (repeatable)")
    _add_plugin_arg(p, reads_runs=True)


def _add_latency(sub: _Subparsers) -> None:
    p = _add_command(sub, "latency", cmd_latency,
                     "teacher-vs-student inference latency table (CPU, one "
                     "process per configuration)")
    p.add_argument("run_dir", help="run directory (student: best.pt; teacher: its config)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], metavar="BS")
    p.add_argument("--runs", type=int, default=30, help="timed runs per row (>= 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (>= 5)")
    p.add_argument("--threads", type=int, default=1, help="threads per worker (default 1)")
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), metavar="RUNTIME",
                   help=f"{', '.join(RUNTIMES)} (default: all; int8 is torch FX int8 in "
                        "TorchScript, onnxruntime_int8 the static QDQ int8 ONNX file)")
    p.add_argument("--batches", type=int, default=10, metavar="N",
                   help="training batches that calibrate the int8 models (default 10)")
    p.add_argument("--out", metavar="DIR", help="default: RUN_DIR/latency")
    p.add_argument("--allow-short", action="store_true",
                   help="allow fewer runs / warm-ups than the protocol's (tests, smoke checks)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the run's config (repeatable)")
    _add_plugin_arg(p, reads_runs=True)


def _add_predict(sub: _Subparsers) -> None:
    p = _add_command(sub, "predict", cmd_predict,
                     "classify (top-k classes) or detect (COCO JSON + drawn boxes) in image "
                     "files with a trained student: a run, hub folder, .pt, .ts, .pt2 or .onnx")
    p.add_argument("source", help="run directory, hub folder, or exported student file")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="most probable classes shown per image (default 5)")
    p.add_argument("--output-format", choices=["table", "csv", "json"], default="table",
                   help="table (default), csv (a row per image and rank) or json")
    p.add_argument("--out", metavar="PATH",
                   help="classifier: write the predictions to this file (default: stdout); "
                        "detector: the folder for detections.json, images.json and the drawn "
                        "PNGs (default: predictions)")
    p.add_argument("--min-score", type=float, default=0.5, metavar="S",
                   help="detector: leave out detections scoring below S (default 0.5)")
    p.add_argument("--no-draw", action="store_true",
                   help="detector: write the JSON files only, no PNGs with drawn boxes")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per forward pass (default 32)")
    p.add_argument("--checkpoint", default="best",
                   help="for a run: best (default), last, or a weights file of the run")
    _add_plugin_arg(p, reads_runs=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``kdlab`` parser: global options, then every command in ``kdlab --help`` order."""
    parser = argparse.ArgumentParser(
        prog="kdlab", description="Knowledge distillation lab: SDD, DCKD and friends.")
    parser.add_argument("--version", action="version", version=f"kdlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_eval, _add_listings, _add_config, _add_demo, _add_report,
                _add_sweep, _add_doctor, _add_bench, _add_export, _add_latency, _add_predict,
                add_detection_data_parser, add_segmentation_data_parser):
        add(sub)
    return parser
