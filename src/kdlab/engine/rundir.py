"""The run directory (architecture contract 4): everything a report needs, nothing re-run.

Layout::

    RUN/
      config.yaml        resolved config (what the numbers depend on)
      env.json           versions, device, git commit, host
      metrics.jsonl      one JSON object per evaluated epoch
      checkpoints/last.pt (+ last.pt.prev)   full training state, written atomically every epoch
      checkpoints/best.pt                    student weights at the best test accuracy
      teacher.json       teacher accuracy and checkpoint sha256 (distillation runs)
      summary.json       written when the run finishes
      status.json        "running" / "finished" / "failed" with the error
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from kdlab.atomic import atomic_write
from kdlab.config import ExperimentConfig, dump_yaml
from kdlab.errors import RunError


class RunDir:
    """A run's directory. ``prepare`` refuses a folder that holds a different run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

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

    def stored_fingerprint(self) -> str | None:
        meta = self.path / "run.json"
        if not meta.exists():
            return None
        try:
            return json.loads(meta.read_text()).get("fingerprint")
        except (OSError, json.JSONDecodeError):
            return None

    def prepare(self, cfg: ExperimentConfig, resume: bool) -> str:
        """Create or re-open the run directory for ``cfg``.

        Returns "new", "resume" or "finished". Raises :class:`RunError` when the folder holds a
        different run (other config) or an unfinished run without ``resume``.
        """
        fp = cfg.fingerprint()
        if self.exists():
            stored = self.stored_fingerprint()
            if stored is not None and stored != fp:
                raise RunError(
                    f"run directory {self.path} holds a different run (its config differs); "
                    "choose another --run-dir or delete it"
                )
            if self.is_finished():
                return "finished"
            if not resume:
                raise RunError(
                    f"run directory {self.path} holds an unfinished run; pass --resume to "
                    "continue it, or choose another --run-dir"
                )
            return "resume"
        if self.path.exists() and any(self.path.iterdir()):
            raise RunError(f"run directory {self.path} exists and is not a kdlab run; "
                           "choose another --run-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot create run directory {self.path}: {e.strerror}") from e
        atomic_write(self.config_path, dump_yaml(cfg))
        atomic_write(self.path / "run.json",
                     json.dumps({"fingerprint": fp, "created": time.time()}, indent=2))
        self.write_json("env.json", environment_info())
        return "new"

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
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def truncate_metrics(self, last_epoch: int) -> None:
        """Keep only the records of epochs <= ``last_epoch`` (used on resume)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        atomic_write(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                for r in kept))

    def load_config_dict(self) -> dict[str, Any]:
        return yaml.safe_load(self.config_path.read_text())


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_info() -> dict[str, Any]:
    """Versions, hardware and git commit, recorded in every run."""
    from kdlab import __version__
    from kdlab.engine.runtime import cpu_supports_bf16

    info: dict[str, Any] = {
        "kdlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_supports_bf16(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info
