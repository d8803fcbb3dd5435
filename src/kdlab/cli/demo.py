"""The main job (``make demo``): real Fashion-MNIST, a teacher, then the student distilled with
KD, DKD, SD-DKD and DCKD and compared with the student trained alone.

The student sees only a stratified fraction of the training set, a regime where a teacher's
knowledge matters. Runs go to ``OUT/`` (default ``runs/demo``; ``runs/demo-quick`` for
``--quick``, so the two never share a folder); running the demo again skips finished runs and
resumes interrupted ones. Sized for at most 5 minutes on 2 CPU cores in fp32 (``--quick``: a
smoke test of under a minute whose numbers are not results).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config import validate_config
from kdlab.core.errors import DatasetError
from kdlab.data import load_dataset
from kdlab.engine.progress import TqdmProgress
from kdlab.engine.trainer import Trainer
from kdlab.report.table import markdown_table

__all__ = [
    "DEBIAN_PACKAGE", "DEFAULT_OUT", "DemoPlan", "FULL", "QUICK", "QUICK_OUT", "RESULT_COLUMNS",
    "SMOKE_TEST_NOTE", "STUDENT_METHODS", "default_out", "ensure_fashion_mnist",
    "results_markdown", "run_demo",
]

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "dataset-fashion-mnist"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo (epochs, fractions, models)."""

    teacher: str = "resnet14"
    student: str = "resnet8"
    teacher_epochs: int = 3
    teacher_fraction: float = 0.4
    student_epochs: int = 6
    student_fraction: float = 0.05
    batch_size: int = 64
    #: test-set evaluation every N epochs (the last epoch always): the 10,000 test images cost
    #: a student nearly as much as its epoch of training (docs/performance.md, issue 26)
    teacher_eval_every: int = 3
    student_eval_every: int = 3


FULL = DemoPlan()
QUICK = DemoPlan(teacher_epochs=1, teacher_fraction=0.05, student_epochs=1, student_fraction=0.02)

#: default run folders of ``kdlab demo`` and ``kdlab demo --quick`` (separate: the two demos'
#: configs differ, so one folder cannot hold both).
DEFAULT_OUT = Path("runs/demo")
QUICK_OUT = Path("runs/demo-quick")
#: the line above the quick demo's table (printed and in its results.md).
SMOKE_TEST_NOTE = ("**Smoke test (`kdlab demo --quick`): one short epoch per run. These numbers "
                   "only show that everything runs; they are not results (`make demo` gives "
                   "those).**")

#: (label, method config) of every student run in the demo.
STUDENT_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("student alone", {"name": "vanilla"}),
    ("KD", {"name": "kd"}),
    ("DKD", {"name": "dkd"}),
    ("SD-DKD", {"name": "sd_dkd", "params": {"scales": [1, 2, 4]}}),
    ("DCKD", {"name": "dckd"}),
]


def ensure_fashion_mnist() -> None:
    """Make sure the real Fashion-MNIST is on disk, installing Debian's package as root."""
    try:
        load_dataset("fashion_mnist", train=False)
        return
    except DatasetError:
        pass
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise DatasetError(
            "Fashion-MNIST not found; install it with `sudo apt-get install "
            f"{DEBIAN_PACKAGE}` (Debian/Ubuntu) or put the four IDX files in "
            "$KDLAB_DATA/fashion-mnist"
        )
    log.info("installing Debian's %s (real Fashion-MNIST, 60k/10k images)", DEBIAN_PACKAGE)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", DEBIAN_PACKAGE]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise DatasetError(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}")
    load_dataset("fashion_mnist", train=False)


def _config(name: str, arch: str, epochs: int, fraction: float, plan: DemoPlan,
            method: dict[str, Any] | None = None, teacher: dict[str, Any] | None = None,
            eval_every: int = 1, amp: str = "auto") -> dict[str, Any]:
    # lr x0.1 after 60% and 80% of the epochs (the CRD schedule's shape), at least once
    milestones = [max(1, round(epochs * f)) for f in (0.6, 0.8)] if epochs >= 2 else []
    cfg: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "data": {"name": "fashion_mnist", "train_fraction": fraction,
                 "batch_size": plan.batch_size, "eval_batch_size": 500},
        "student": {"arch": arch},
        "optim": {"lr": 0.05, "epochs": epochs, "milestones": sorted(set(milestones))},
        "runtime": {"log_every": 20, "eval_every": eval_every, "amp": amp},
    }
    if method is not None:
        cfg["method"] = method
    if teacher is not None:
        cfg["teacher"] = teacher
    return cfg


def default_out(quick: bool) -> Path:
    """Where the demo's runs go without ``--out``: ``runs/demo``, or ``runs/demo-quick``."""
    return QUICK_OUT if quick else DEFAULT_OUT


def run_demo(out: Path, quick: bool = False, progress: bool = True, amp: str = "auto"
             ) -> list[dict[str, Any]]:
    """Run the demo into ``out`` with ``runtime.amp = amp`` and return one result row per run
    (see module docstring)."""
    plan = QUICK if quick else FULL
    ensure_fashion_mnist()
    bar = TqdmProgress(enabled=progress)
    rows: list[dict[str, Any]] = []

    t_dir = out / "teacher"
    t_cfg = validate_config(_config("teacher", plan.teacher, plan.teacher_epochs,
                                    plan.teacher_fraction, plan,
                                    eval_every=plan.teacher_eval_every, amp=amp),
                          "demo teacher")
    log.info("== teacher %s on Fashion-MNIST (%d epochs)", plan.teacher, plan.teacher_epochs)
    t_sum = Trainer(t_cfg, t_dir, resume=True, progress=bar, require_teacher=False).run()
    rows.append({"run": f"teacher {plan.teacher}", **t_sum})

    teacher = {"arch": plan.teacher, "checkpoint": str(t_dir / "checkpoints" / "best.pt")}
    for label, method in STUDENT_METHODS:
        slug = label.lower().replace(" ", "_").replace("-", "")
        is_kd = method["name"] != "vanilla"
        cfg = validate_config(_config(slug, plan.student, plan.student_epochs,
                                      plan.student_fraction, plan, method=method,
                                      teacher=teacher if is_kd else None,
                                      eval_every=plan.student_eval_every, amp=amp),
                        f"demo {label}")
        log.info("== student %s: %s (%.0f%% of the training set)", plan.student, label,
                 100 * plan.student_fraction)
        summary = Trainer(cfg, out / slug, resume=True, progress=bar,
                          require_teacher=is_kd).run()
        rows.append({"run": f"{plan.student} {label}", **summary})
    return rows


RESULT_COLUMNS = [
    ("run", "run", "s"),
    ("epochs", "epochs", "d"),
    ("best_top1", "best top-1 %", ".2f"),
    ("last_top1", "last top-1 %", ".2f"),
    ("train_img_per_s", "train img/s", ".0f"),
    ("wall_time_s", "time s", ".0f"),
]


def results_markdown(rows: list[dict[str, Any]], quick: bool = False) -> str:
    """The demo's results table as markdown (the quick demo's with :data:`SMOKE_TEST_NOTE`
    above it)."""
    table = markdown_table(rows, RESULT_COLUMNS)
    return f"{SMOKE_TEST_NOTE}\n\n{table}" if quick else table
