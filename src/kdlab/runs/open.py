"""Reading a run directory: its config, task, checkpoints and rebuilt models, in one place.

Every reader of a run (``kdlab eval``, ``kdlab export``, ``kdlab latency``,
:func:`kdlab.load_student`) goes through :func:`open_run`, so the run's config is validated one
way, a checkpoint is read with one integrity check (:func:`~kdlab.runs.checkpoint.read_verified`)
and a network is rebuilt one way: by the run's task from what the checkpoint records
(:meth:`~kdlab.tasks.base.Task.model_from_checkpoint`), else sized by the run's data.

A run directory is data, so it never chooses code to run: the plugins its ``config.yaml`` names
are not imported. Only the plugins the reader trusts are (``plugins``: ``--plugin``, and
``$KDLAB_PLUGINS``); a run that names one the reader did not trust is refused in one line
(:class:`~kdlab.core.errors.PluginError`) before anything is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlab.config import ExperimentConfig, apply_overrides, read_yaml_file
from kdlab.config.yaml_io import validate_stored_config
from kdlab.core.errors import CheckpointError, RunError
from kdlab.data.input_spec import InputSpec
from kdlab.models.checkpoint import extract_state_dict, load_state_dict_strict
from kdlab.runs.checkpoint import load_latest, read_verified
from kdlab.runs.rundir import RunDir, find_run_dirs
from kdlab.tasks.base import Task, task_for

__all__ = ["OpenRun", "open_run", "runs_inside_hint"]

log = logging.getLogger(__name__)


class OpenRun:
    """A run directory opened for reading (see :func:`open_run`)."""

    def __init__(self, rundir: RunDir, cfg: ExperimentConfig, task: Task[Any, Any, Any]) -> None:
        self.rundir = rundir
        self.cfg = cfg
        self.task = task
        self._data: dict[str, Any] = {}

    @property
    def path(self) -> Path:
        """The run's folder."""
        return self.rundir.path

    def read_checkpoint(self, which: str | Path = "best") -> tuple[dict[str, Any], Path]:
        """``(state, path)`` of checkpoint ``which``: ``"best"`` (``checkpoints/best.pt``),
        ``"last"`` (``checkpoints/last.pt``, or its ``.prev`` when the latest is unreadable) or
        the path of a weights file. Its stored sha256 is checked.

        Raises:
            CheckpointError: missing (with what to do instead), unreadable or changed on disk.
        """
        if which == "last":
            found = load_latest(self.rundir.last_checkpoint)
            if found is None:
                raise CheckpointError(f"run {self.path} has no readable checkpoints/last.pt yet "
                                      "(no completed epoch)")
            return found
        path = self.rundir.best_checkpoint if which == "best" else Path(which)
        if which == "best" and not path.is_file():
            raise CheckpointError(f"run {self.path} has no best.pt ({path}) yet: no evaluated "
                                  "epoch; train it further, or read checkpoint='last' or a "
                                  "weights file (--checkpoint FILE)")
        return read_verified(path), path

    def data(self, device: torch.device | None = None) -> Any:
        """The run's data bundle (its task's loaders) on ``device`` (CPU), built once."""
        device = device or torch.device("cpu")
        key = str(device)
        if key not in self._data:
            self._data[key] = self.task.build_data(self.cfg.data, seed=self.cfg.seed,
                                                   device=device, channels_last=False, rank=0,
                                                   world_size=1)
        return self._data[key]

    def build_model(self, arch: str, state: dict[str, Any] | None = None) -> nn.Module:
        """A fresh network ``arch`` of this run: sized from ``state`` when the task can read it
        there (:meth:`Task.model_from_checkpoint`), otherwise from the run's data."""
        for candidate in self._size_records(state):
            model = self.task.model_from_checkpoint(arch, candidate)
            if model is not None:
                return model
        return self.task.create_model(arch, self.data())

    def _size_records(self, state: dict[str, Any] | None) -> list[dict[str, Any]]:
        """Checkpoint records that may hold the network's size: ``state``, then ``last.pt``
        (the best.pt of kdlab 0.2 and earlier does not record it)."""
        records = [state] if state is not None else []
        if not any("num_classes" in r for r in records):
            found = load_latest(self.rundir.last_checkpoint)
            if found is not None:
                records.append(found[0])
        return records

    def input_spec(self, state: dict[str, Any] | None = None) -> InputSpec | None:
        """The run's input description: from the checkpoint ``state`` (``best.pt`` records it),
        else the run's ``input.json``, else rebuilt from the run's data (runs of kdlab 0.3
        and earlier recorded none); None for a task whose data has none."""
        recorded = (state or {}).get("input")
        if not isinstance(recorded, dict) and self.rundir.inside("input.json").is_file():
            recorded = self.rundir.read_json("input.json")
        if isinstance(recorded, dict):
            return InputSpec.from_dict(recorded)
        return getattr(self.data(), "input_spec", None)

    def student(self, which: str | Path = "best", device: str | torch.device = "cpu"
                ) -> nn.Module:
        """The run's student with the weights of checkpoint ``which`` (strict), in eval mode."""
        return self.student_and_record(which, device)[0]

    def student_and_record(self, which: str | Path = "best",
                           device: str | torch.device = "cpu"
                           ) -> tuple[nn.Module, dict[str, Any], Path]:
        """:meth:`student` with the checkpoint's content and path (its epoch and metrics)."""
        state, path = self.read_checkpoint(which)
        model = self.build_model(self.cfg.student.arch, state)
        load_state_dict_strict(model, extract_state_dict(state, path), str(path))
        if not self.rundir.is_finished():
            log.info("run %s is not finished: using %s (epoch %s)", self.path, path.name,
                     state.get("epoch", "?"))
        return model.to(torch.device(device)).eval(), state, path


def runs_inside_hint(folder: Path, shown: int = 3) -> str:
    """``"; the runs inside it: a, b, c (+N more)"`` for a folder that holds run directories (a
    sweep's or a method's folder, e.g. ``runs/x/sd_dkd`` holding ``seed0``), else ``""``."""
    inside = [p for p in find_run_dirs(folder) if p != folder]
    if not inside:
        return ""
    names = ", ".join(str(p) for p in inside[:shown])
    more = f" (+{len(inside) - shown} more)" if len(inside) > shown else ""
    return f"; it holds runs: {names}{more}"


def open_run(run_dir: str | Path, overrides: Sequence[str] = (),
             plugins: Sequence[str] = ()) -> OpenRun:
    """Open the run in ``run_dir``: its recorded ``config.yaml`` with ``overrides`` applied,
    validated, and its configured task.

    Plugins: only ``plugins`` (``--plugin``) and ``$KDLAB_PLUGINS`` are imported, and the
    opened config's ``plugins`` are those; the plugins ``config.yaml`` names are never imported,
    they must each be matched by a trusted one
    (:func:`~kdlab.config.yaml_io.validate_stored_config`).

    Raises:
        RunError: ``run_dir`` does not exist or is not a kdlab run (no ``config.yaml``).
        PluginError: the config names a plugin the caller did not trust (one line: which, and
            ``--plugin NAME`` to trust it), or a trusted plugin cannot be imported.
        ConfigError: the recorded config is unreadable or no longer valid.
    """
    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise RunError(f"{run_dir} is not a kdlab run directory (it does not exist)")
    if not rd.exists():
        raise RunError(f"{run_dir} is not a kdlab run directory (no config.yaml)"
                       + runs_inside_hint(rd.path))
    stored = read_yaml_file(rd.config_path, "run config")
    if not isinstance(stored, dict):
        raise RunError(f"{rd.config_path} does not hold a config mapping")
    cfg = validate_stored_config(apply_overrides(stored, list(overrides)), str(rd.config_path),
                                 list(plugins), owner=f"run {run_dir}",
                                 file=rd.config_path.name)
    return OpenRun(rd, cfg, task_for(cfg))
