"""The run directory (architecture contract 4): everything a report needs, nothing re-run.

Layout::

    RUN/
      config.yaml        resolved config (what the numbers depend on)
      run.json           the accepted config fingerprints (oldest first) and extensions
      env.json           versions, device, git commit, host
      lock.json          while a process works in the run: its pid, host, start and command
      metrics.jsonl      one JSON object per evaluated epoch
      checkpoints/last.pt (+ last.pt.prev)   full training state, written atomically every epoch
      checkpoints/best.pt                    student weights at the best epoch (validation if any)
      teacher.json       teacher accuracy and checkpoint sha256 (distillation runs)
      summary.json       written when the run finishes
      status.json        "running" / "stopped" / "finished" / "failed" / "interrupted", details

A run directory is a transaction: :meth:`RunDir.acquire_lock` gives one process the folder,
:meth:`RunDir.inspect` decides (writing nothing) whether the config starts, continues or is
refused, :meth:`RunDir.create` writes the start records, and a start that fails before training
leaves nothing behind (:meth:`RunDir.release_lock` with ``abandon``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from kdlab.config import ExperimentConfig, dict_fingerprint, dump_yaml, fingerprint_dict
from kdlab.core.env import environment_info
from kdlab.core.errors import ConfigError, RunError
from kdlab.core.io import atomic_write
from kdlab.runs.lock import LOCK_FILE, FolderLock

__all__ = [
    "EXTENSIBLE_SCHEDULES", "PROGRESS_FILES", "RUN_FILES", "Resume", "RunDir", "SHOWN_DIFFERENCES",
    "UNSET", "config_differences", "find_run_dirs", "flatten_config", "run_folder",
    "show_config_value",
]

log = logging.getLogger(__name__)

#: how a start treats an existing run: False (start one), True (continue it if there is one,
#: else start), "required" (continue it; no run there is an error: the CLI's ``--resume``).
Resume = bool | Literal["required"]

#: files a run writes at its top level: a run that never completed an epoch is restarted
#: afresh with none of them kept.
RUN_FILES = ("config.yaml", "run.json", "env.json", "metrics.jsonl", "status.json",
             "teacher.json", "method.json", "summary.json", "input.json")
#: training checkpoints: any of them means the run has progress worth keeping (``step.pt`` is
#: the mid-epoch checkpoint of ``runtime.checkpoint_every_steps``).
PROGRESS_FILES = ("last.pt", "last.pt.prev", "step.pt", "step.pt.prev")
#: the schedules whose past learning rates do not depend on ``optim.epochs``: a finished or
#: unfinished run with one of them may be extended to more epochs (docs/decisions.md).
EXTENSIBLE_SCHEDULES = frozenset({"multistep"})
#: differing keys shown in a "holds a different run" refusal before "and N more".
SHOWN_DIFFERENCES = 5


class RunDir(FolderLock):
    """A run's directory: one process at a time (its lock: :class:`FolderLock`), and never two
    runs in one folder."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        #: whether this instance wrote a new run's start records (create)
        self._created = False

    def _abandon(self) -> None:
        """A start that failed before training: remove the new run's start records."""
        if self._created and not self.has_progress():
            self._remove_run_files()

    # ----------------------------------------------------------------- paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def last_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def step_checkpoint(self) -> Path:
        """The mid-epoch checkpoint (``runtime.checkpoint_every_steps``), beside ``last.pt``."""
        return self.path / "checkpoints" / "step.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.path / "checkpoints" / "best.pt"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    def inside(self, name: str) -> Path:
        """A path inside the run directory; refuses names that would escape it."""
        target = (self.path / name).resolve()
        if not target.is_relative_to(self.path.resolve()):
            raise RunError(f"path {name!r} escapes the run directory {self.path}")
        return target

    # ----------------------------------------------------------------- state
    def exists(self) -> bool:
        return self.config_path.exists()

    def is_finished(self) -> bool:
        return self.summary_path.exists()

    def has_progress(self) -> bool:
        """Whether the run completed an epoch: a training checkpoint (``last.pt``, its
        ``.prev``, a step checkpoint), a metrics line or a summary exists."""
        folder = self.path / "checkpoints"
        if any((folder / name).exists() for name in PROGRESS_FILES):
            return True
        if self.is_finished():
            return True
        try:
            return self.metrics_path.stat().st_size > 0
        except OSError:
            return False

    def _run_meta(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def stored_fingerprint(self) -> str | None:
        """The fingerprint of the run's current config (run.json; else config.yaml's)."""
        fp = self._run_meta().get("fingerprint")
        if isinstance(fp, str):
            return fp
        stored = self._stored_config()
        return dict_fingerprint(stored) if stored is not None else None

    def accepted_fingerprints(self) -> list[str]:
        """Every config fingerprint the run's checkpoints may carry, oldest first: the start's
        and one per extension (``--resume --set optim.epochs=N``)."""
        meta = self._run_meta()
        fps = [f for f in meta.get("fingerprints", []) if isinstance(f, str)]
        current = self.stored_fingerprint()
        if current is not None and current not in fps:
            fps.append(current)
        return fps

    def _stored_config(self) -> dict[str, Any] | None:
        try:
            data = self.load_config_dict()
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def differences(self, cfg: ExperimentConfig) -> list[str]:
        """The keys (dotted) in which ``cfg`` differs from the stored config, as
        ``key: stored -> new``, compared on the fingerprint's canonical form."""
        stored = self._stored_config()
        if stored is None:
            return []
        return config_differences(stored, cfg.to_dict())

    # ----------------------------------------------------------------- decide, then write
    def inspect(self, cfg: ExperimentConfig, resume: Resume) -> str:
        """Decide what starting ``cfg`` here means, writing nothing.

        ``resume``: False starts a run; "required" (the CLI's ``--resume``) continues the run
        in the folder and refuses a folder without one; True continues the run if there is one
        and starts it otherwise (sweeps, the demo).

        Returns "new" (start it; a run that never completed an epoch is started afresh),
        "resume" (continue it, also after an allowed extension to more epochs) or "finished".
        Raises :class:`RunError` when the folder is not a kdlab run, holds a different run,
        holds an unfinished run without ``resume``, or holds no run with "required".
        """
        return self._decide(cfg, resume)[0]

    def _decide(self, cfg: ExperimentConfig, resume: Resume) -> tuple[str, bool]:
        """(the mode, whether it is an extension of the stored run to more epochs)."""
        required = resume == "required"
        if not self.exists():
            leftovers = self._foreign_entries()
            if leftovers:
                raise RunError(f"run directory {self.path} exists and is not a kdlab run "
                               f"(it holds {leftovers[0]}); choose another --run-dir")
            if required:
                raise RunError(f"--resume: {self.path} holds no kdlab run; drop --resume to "
                               "start it")
            return "new", False
        started = self.has_progress()
        if self.stored_fingerprint() != cfg.fingerprint():
            if not started and not required:
                return "new", False  # never completed an epoch: start it afresh
            self._check_extension(cfg, bool(resume), started)
            return "resume", True
        if self.is_finished():
            return "finished", False
        if not started:
            return ("resume" if resume else "new"), False
        if not resume:
            raise RunError(f"run directory {self.path} holds an unfinished run; pass --resume to "
                           "continue it, or choose another --run-dir")
        return "resume", False

    def _check_extension(self, cfg: ExperimentConfig, resume: bool, started: bool) -> None:
        """Allow a different config only as an extension of the run to more epochs (with
        ``resume``, a multistep schedule, and ``optim.epochs`` the only difference)."""
        stored = self._stored_config() or {}
        diffs = config_differences(stored, cfg.to_dict())
        keys = [d.split(":", 1)[0] for d in diffs]
        old_epochs = stored.get("optim", {}).get("epochs") if isinstance(
            stored.get("optim"), dict) else None
        new_epochs = cfg.optim.epochs
        extends = (keys == ["optim.epochs"] and isinstance(old_epochs, int)
                   and new_epochs > old_epochs)
        if extends and started and cfg.optim.scheduler not in EXTENSIBLE_SCHEDULES:
            raise RunError(
                f"run directory {self.path} holds a run of {old_epochs} epochs, which cannot be "
                f"extended to {new_epochs}: the {cfg.optim.scheduler} schedule's past learning "
                "rates depend on optim.epochs (only multistep runs can be extended); start a "
                "new run in another --run-dir")
        if extends and resume and started:
            return
        shown = _shown(diffs) if diffs else "its config differs"
        if not started:
            hint = "it never completed an epoch: drop --resume to start it afresh"
        elif extends:
            hint = f"pass --resume to extend it to {new_epochs} epochs"
        else:
            hint = "choose another --run-dir or delete it"
        raise RunError(f"run directory {self.path} holds a different run ({shown}); {hint}")

    def _foreign_entries(self) -> list[str]:
        """What the folder holds besides the lock and a run's own files (empty if missing)."""
        if not self.path.is_dir():
            return []
        foreign = []
        for entry in sorted(self.path.iterdir()):
            if (entry.name in (LOCK_FILE, *RUN_FILES) or entry.name.endswith(".tmp")
                    or entry.name.startswith(f"{LOCK_FILE}.stale-")):
                continue
            if entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir()):
                continue  # made by a start killed before it wrote config.yaml
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
        return foreign

    def create(self, cfg: ExperimentConfig) -> None:
        """Write a new run's start records: config.yaml, run.json, env.json, checkpoints/.

        Any files of an earlier start that never completed an epoch are removed first.
        """
        self._remove_run_files()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {self.path}: {e.strerror}") from e
        self._created = True
        fp = cfg.fingerprint()
        self.write_json("env.json", environment_info())
        atomic_write(self.path / "run.json", json.dumps(
            {"fingerprint": fp, "fingerprints": [fp], "created": time.time(), "extensions": []},
            indent=2))
        atomic_write(self.config_path, dump_yaml(cfg))  # last: the run exists from here on

    def extend(self, cfg: ExperimentConfig) -> None:
        """Record the extension of the stored run to ``cfg`` (more epochs): the run becomes
        unfinished, ``cfg``'s fingerprint is accepted, and config.yaml is ``cfg``."""
        stored = self._stored_config() or {}
        old_epochs = stored.get("optim", {}).get("epochs")
        meta = self._run_meta()
        fp = cfg.fingerprint()
        fps = self.accepted_fingerprints()
        log.info("extending run %s from %s to %d epochs", self.path, old_epochs,
                 cfg.optim.epochs)
        self.summary_path.unlink(missing_ok=True)  # first: unfinished, whatever happens next
        meta.update(fingerprint=fp, fingerprints=[*[f for f in fps if f != fp], fp],
                    extensions=[*meta.get("extensions", []),
                                {"time": time.time(), "from_epochs": old_epochs,
                                 "to_epochs": cfg.optim.epochs, "fingerprint": fp}])
        atomic_write(self.path / "run.json", json.dumps(meta, indent=2))
        atomic_write(self.config_path, dump_yaml(cfg))

    def prepare(self, cfg: ExperimentConfig, resume: Resume) -> str:
        """:meth:`inspect`, then write what the verdict needs (:meth:`create` for a new run,
        :meth:`extend` for an extension). Returns "new", "resume" or "finished"."""
        mode, extension = self._decide(cfg, resume)
        if mode == "new":
            self.create(cfg)
        elif extension:
            self.extend(cfg)
        elif mode == "resume" and self._run_meta().get("extensions"):
            stored = self._stored_config()
            if stored is None or dict_fingerprint(stored) != cfg.fingerprint():
                # an extension killed after run.json was written and before config.yaml
                atomic_write(self.config_path, dump_yaml(cfg))
        return mode

    def _remove_run_files(self) -> None:
        """Remove a run's own files (never a checkpoint of progress, never foreign files)."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        folder = self.path / "checkpoints"
        if folder.is_dir():
            for entry in folder.iterdir():
                if entry.name not in PROGRESS_FILES and entry.is_file():
                    entry.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def write_json(self, name: str, obj: Any) -> None:
        """Write ``obj`` as JSON into the run directory atomically."""
        atomic_write(self.inside(name), json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str) -> Any:
        return json.loads(self.inside(name).read_text())

    def set_status(self, state: str, **extra: Any) -> None:
        self.write_json("status.json", {"state": state, "time": time.time(), **extra})

    # ----------------------------------------------------------------- metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """The metrics records; a torn last line (killed mid-write) is ignored."""
        if not self.metrics_path.exists():
            return []
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def read_status(self) -> dict[str, Any]:
        """``status.json`` (state, time, epoch, error); ``{}`` when missing or unreadable."""
        try:
            status = self.read_json("status.json")
        except (OSError, json.JSONDecodeError, RunError):
            return {}
        return status if isinstance(status, dict) else {}

    def read_summary(self) -> dict[str, Any]:
        """``summary.json`` of a finished run.

        Raises:
            OSError, ValueError: missing, unreadable or not a JSON object.
        """
        summary = self.read_json("summary.json")
        if not isinstance(summary, dict):
            raise ValueError("summary.json is not a JSON object")
        return summary

    def read_teacher(self) -> dict[str, Any] | None:
        """``teacher.json`` (the teacher's evaluation and checkpoint sha256), or None."""
        path = self.path / "teacher.json"
        return self.read_json("teacher.json") if path.is_file() else None

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only the records of epochs <= ``last_epoch`` (used on resume)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        atomic_write(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                for r in kept))

    def load_config_dict(self) -> dict[str, Any]:
        """The stored ``config.yaml`` as a plain dict (``{}`` for an empty file)."""
        return yaml.safe_load(self.config_path.read_text()) or {}


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every run directory under ``root`` (``root`` included): a folder holding ``config.yaml``
    or ``summary.json``, sorted by path."""
    root = Path(root)
    found = {p.parent for pattern in ("config.yaml", "summary.json")
             for p in root.rglob(pattern) if p.is_file()}
    if root.is_dir() and any((root / name).is_file() for name in ("config.yaml", "summary.json")):
        found.add(root)
    return sorted(found, key=lambda p: p.as_posix())


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"dotted.key": value}`` (an empty mapping adds no key)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


#: the value :func:`show_config_value` writes as ``(unset)``: a key one config lacks.
UNSET: Any = object()


def show_config_value(value: Any) -> str:
    """A config value as text: strings as they are, ``UNSET`` as ``(unset)``, else JSON."""
    if value is UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def config_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each dotted key in which two resolved config dicts differ, both
    reduced to the fingerprint's canonical form (:func:`kdlab.config.schema.fingerprint_dict`)."""
    a, b = flatten_config(fingerprint_dict(stored)), flatten_config(fingerprint_dict(new))
    keys = [*b, *(k for k in a if k not in b)]
    return [f"{k}: {show_config_value(a.get(k, UNSET))} -> {show_config_value(b.get(k, UNSET))}"
            for k in keys if a.get(k, UNSET) != b.get(k, UNSET)]


def _shown(diffs: Sequence[str]) -> str:
    text = ", ".join(diffs[:SHOWN_DIFFERENCES])
    more = len(diffs) - SHOWN_DIFFERENCES
    return f"{text}, and {more} more" if more > 0 else text


def run_folder(root: str | Path, *parts: str, what: str = "config key 'name'") -> Path:
    """``root/part/...``, refusing parts that would leave ``root``: absolute paths, ``..``.

    The check is on the path's text (symbolic links the user placed inside ``root`` are the
    user's choice). Raises :class:`ConfigError` naming ``what``.
    """
    for part in parts:
        if Path(part).is_absolute() or ".." in Path(part).parts or "\\" in part:
            raise ConfigError(f"{what}: {part!r} must stay inside {root} (no absolute path, no "
                              "'..' parts)")
    target = Path(os.path.normpath(Path(root, *parts)))
    base = Path(os.path.normpath(Path(root)))
    if target == base or not target.is_relative_to(base):
        raise ConfigError(f"{what}: {'/'.join(parts)!r} must name a folder inside {root}")
    return Path(root, *parts)
