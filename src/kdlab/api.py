"""kdlab's Python API: train or distil from a config, and get the trained student back.

:func:`run` does what ``kdlab train`` / ``kdlab distill`` do, through the same functions
(:func:`load_experiment`, :func:`default_run_dir`, :func:`train`: the CLI calls them too), so a
config gives the same run, bit for bit, from Python or from the shell. :func:`load_student`
rebuilds a run's student from the run's recorded config and loads its best (or last) weights.

Example (synthetic images, a few seconds on a CPU)::

    import kdlab

    config = {
        "data": {"name": "synthetic", "batch_size": 16,
                 "synthetic": {"n_train": 64, "n_test": 32, "num_classes": 10}},
        "student": {"arch": "resnet8"},
        "optim": {"epochs": 2, "milestones": []},
        "runtime": {"amp": "off"},
    }
    summary = kdlab.run(config, run_dir="runs/api-demo")
    student = kdlab.load_student("runs/api-demo")   # eval mode, weights of best.pt
    print(summary["best_top1"], student.arch)

Both are reachable as ``kdlab.run`` and ``kdlab.load_student``; ``import kdlab`` itself stays
light (this module, and torch, load at the first use).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdlab.config import apply_overrides, load_config, validate_config_with_plugins
from kdlab.core.errors import ConfigError, RunInterrupted
from kdlab.core.runtime import process_state_preserved
from kdlab.core.signals import sigterm_raises
from kdlab.engine.progress import EpochLogProgress, TqdmProgress
from kdlab.engine.trainer import Trainer
from kdlab.runs.rundir import run_folder
from kdlab.runs.student import load_trained_student

if TYPE_CHECKING:
    from torch import nn

    from kdlab.config import ExperimentConfig
    from kdlab.engine.trainer import Progress
    from kdlab.runs.rundir import Resume

__all__ = ["default_run_dir", "load_experiment", "load_student", "run", "sigterm_interrupts",
           "train"]


def load_experiment(config: str | Path | Mapping[str, Any],
                    overrides: Sequence[str] | None = None,
                    plugins: Sequence[str] | None = None) -> ExperimentConfig:
    """The validated config of a run: a YAML file (``_base_`` inheritance) or a dict of config
    keys, with dotted ``key=value`` overrides applied and the plugin modules imported first
    (the config's ``plugins`` followed by ``plugins``).

    Raises:
        ConfigError: one line naming the bad key, file or value.
    """

    if isinstance(config, Mapping):
        if "_base_" in config:
            raise ConfigError("a config dict cannot use _base_ (it has no folder to resolve the "
                              "path from); pass the YAML file's path instead")
        data = apply_overrides(dict(config), list(overrides or []))
        return validate_config_with_plugins(data, "config dict", list(plugins or []))
    if not isinstance(config, str | Path):
        raise ConfigError(f"config must be a YAML file path or a dict of config keys, not a "
                          f"{type(config).__name__}")
    return load_config(config, list(overrides or []), plugins=list(plugins or []))


def default_run_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir/name/seedSEED``; a ``name`` that would leave ``output_dir`` (absolute,
    ``..``) is a :class:`~kdlab.core.errors.ConfigError`."""

    return run_folder(cfg.output_dir, cfg.name, f"seed{cfg.seed}")


def sigterm_interrupts() -> contextlib.AbstractContextManager[None]:
    """While a run trains, SIGTERM raises :class:`RunInterrupted`: the run ends "interrupted",
    like Ctrl-C, and can be continued with ``resume``. (Main thread only; elsewhere a no-op.)"""
    return sigterm_raises(RunInterrupted)


def train(cfg: ExperimentConfig, run_dir: str | Path, *, resume: Resume = False,
          progress: Progress | None = None, require_teacher: bool | None = None,
          stop_after: int | None = None, allow_teacher_change: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` (:class:`~kdlab.engine.trainer.Trainer`, SIGTERM as
    Ctrl-C) and return the run's summary. What ``kdlab train`` and ``kdlab distill`` run.

    ``resume``: False starts the run; "required" (the CLI's ``--resume``) continues the run in
    ``run_dir``; True continues it when there is one, else starts it. ``require_teacher``:
    True (``distill``) or False (``train``) checks the config's teacher section; None accepts
    either. The process-wide settings the run changes (threads, deterministic kernels,
    ``cudnn.benchmark``, the global RNGs) and the signal handlers it installs are restored when
    it returns or raises.
    """

    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress,
                      require_teacher=require_teacher, stop_after=stop_after,
                      allow_teacher_change=allow_teacher_change)
    with process_state_preserved(), sigterm_interrupts():
        return trainer.run()


def run(config: str | Path | Mapping[str, Any], overrides: Sequence[str] | None = None,
        run_dir: str | Path | None = None, resume: Resume = False,
        plugins: Sequence[str] = (), *, progress: bool | Literal["epochs"] = "epochs",
        stop_after: int | None = None,
        allow_teacher_change: bool = False) -> dict[str, Any]:
    """Train (no ``teacher`` section) or distil (with one) the run a config describes, as
    ``kdlab train`` / ``kdlab distill`` do, and return its summary.

    Args:
        config: a YAML file path, or a dict of config keys (the same keys as a file).
        overrides: dotted ``key=value`` strings, as ``--set`` (``["optim.lr=0.1"]``).
        run_dir: the run directory (default ``output_dir/name/seedSEED``, relative to the
            current folder, as the CLI).
        resume: False: start the run (an unfinished run there is an error, a finished one
            returns its summary); True: continue the run in ``run_dir`` if there is one, else
            start it; "required": continue it (``--resume``).
        plugins: modules to import first, as ``--plugin``.
        progress: ``"epochs"`` (default): one log line per finished epoch, shown on stderr
            when the program has configured no logging; True: the CLI's progress bar (and its
            log lines); False: nothing.
        stop_after: stop after this epoch (continue later with ``resume``).
        allow_teacher_change: as ``--allow-teacher-change``.

    Returns:
        The summary dict (``summary.json`` of a finished run): ``best_top1``, ``best_epoch``,
        ``last_top1``, ... (``best_<metric>`` for the task's metrics).

    Raises:
        KdlabError: a one-line error for a bad config, dataset, checkpoint or run directory.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the run continues from its last checkpoint with
            ``resume=True``.
    """
    cfg = load_experiment(config, overrides, plugins)
    folder = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    shown: Progress | None = None
    if progress == "epochs":
        shown = EpochLogProgress()
    elif progress:
        shown = TqdmProgress()
    with _kdlab_logs_shown(shown is not None):
        return train(cfg, folder, resume=resume, progress=shown, stop_after=stop_after,
                     allow_teacher_change=allow_teacher_change)


@contextlib.contextmanager
def _kdlab_logs_shown(enabled: bool) -> Iterator[None]:
    """While a run lasts, show the ``kdlab`` logger's INFO lines on stderr if the program has
    configured no logging of its own (no handler on ``kdlab`` or the root logger); the logger
    is left as it was afterwards."""
    logger = logging.getLogger("kdlab")
    if not enabled or logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def load_student(run_dir: str | Path, checkpoint: Literal["best", "last"] | str = "best",
                 device: str = "cpu", plugins: Sequence[str] = ()) -> nn.Module:
    """A trained student, in eval mode, on ``device``, with its classes and preprocessing.

    ``run_dir`` is a kdlab run directory, a hub folder (``kdlab export RUN --format hub``:
    ``config.json`` + ``model.safetensors``, read without pickle) or a student weights file
    (``kdlab export RUN --format state_dict``). For a run the network is rebuilt from the run's
    recorded ``config.yaml`` (its ``student.arch``, ``torchvision:``/``timm:`` names included)
    and the class count and input channels recorded in the checkpoint; the weights are loaded
    strictly.

    The returned module has ``student.kdlab_meta`` (``arch``, ``num_classes``, ``classes``:
    logit ``i`` is ``classes[i]``, ``input``: the input description, ``source``) and
    ``student.preprocess(image)``: a path, Pillow image or uint8 pixels in, exactly the
    ``C x H x W`` tensor the model saw at test time out (:mod:`kdlab.data.input_spec`)::

        student = kdlab.load_student("runs/flowers/sd_dkd/seed0")
        x = torch.stack([student.preprocess(p) for p in ["a.png", "b.png"]])
        names = [student.kdlab_meta["classes"][i] for i in student(x).logits.argmax(1)]

    Args:
        run_dir: a kdlab run directory, a hub folder or a student weights file.
        checkpoint: for a run: "best" (``checkpoints/best.pt``: the best evaluated epoch),
            "last" (``checkpoints/last.pt``, or its ``.prev`` when the latest is unreadable),
            or the path of a weights file of this run.
        device: where to put the model.
        plugins: plugin modules to trust and import, as ``--plugin`` (``$KDLAB_PLUGINS`` adds
            more). The plugins a run or file names are never imported by themselves: one
            naming a plugin not given here is refused.

    Returns:
        The student (a :class:`~kdlab.models.KdModel`: ``student(images).logits``).

    Raises:
        RunError: ``run_dir`` is neither a run, a hub folder nor a student file.
        PluginError: the run names a plugin not in ``plugins`` (one line: which, and how to
            trust it), or a trusted plugin cannot be imported.
        CheckpointError: the checkpoint is missing, corrupt, or does not fit the network.
    """
    return load_trained_student(run_dir, checkpoint, device, plugins=list(plugins))
