"""``kdlab sweep``: many runs (configs x seeds x an optional override matrix), crash-proof.

A sweep spec is a YAML file::

    name: cifar_main                # the sweep's folder under output_dir
    output_dir: runs                # relative to the current directory (like a config's)
    configs: [../configs/cifar100/kd/*.yaml, ../configs/cifar100/dkd/resnet32x4_resnet8x4.yaml]
    seeds: [0, 1, 2]
    overrides: [optim.epochs=240]   # dotted key=value, applied to every run
    matrix:                         # optional: the cartesian product of extra overrides
      method.params.beta: [4, 8]

``configs`` are paths or globs relative to the spec file (glob matches starting with ``_`` are
bases, skipped). Every (config, matrix point, seed) is one run in
``<output_dir>/<name>/<config name>[/<matrix tag>]/seed<seed>``.

Each run executes in its own worker process (``python -m kdlab train|distill CONFIG --run-dir
DIR [--resume] --set ...``; ``--resume`` once the run has progress), so a worker that crashes or
is killed cannot take the sweep down; the worker holds the run directory's lock. A worker that
exits non-zero marks its run ``failed`` with the tail of its output while the other
runs go on. ``<sweep dir>/sweep.json`` (written atomically) records every run's status
(pending/running/finished/failed), attempts and error; worker output goes to
``<sweep dir>/logs/``. Restarting a sweep (even after ``kill -9`` of it and its workers) skips
finished runs (their ``summary.json`` is the truth), resumes interrupted ones from their last
checkpoint, and re-runs failed ones only with ``retry_failed``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from kdlab.config import (
    format_validation_error,
    load_config,
    parse_override,
    read_yaml_file,
)
from kdlab.core.errors import ConfigError, RunError
from kdlab.core.io import atomic_write
from kdlab.core.signals import sigterm_raises
from kdlab.runs.rundir import RunDir, run_folder

__all__ = [
    "LOCK_FILE", "POLL_S", "PlannedRun", "STATE_FILE", "Status", "Sweep", "SweepProgress",
    "SweepResult", "SweepRunner", "SweepSpec", "TAIL_CHARS", "TAIL_LINES", "TqdmSweepProgress",
    "initial_states", "load_spec", "matrix_tag", "plan_sweep", "read_state", "resolve_configs",
    "run_sweep", "usable_cores", "worker_command", "write_json_atomic",
]

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
LOCK_FILE = "sweep.lock"
TAIL_LINES = 20
TAIL_CHARS = 4000
POLL_S = 0.2

Status = Literal["pending", "running", "finished", "failed"]


# --------------------------------------------------------------------------- the spec
class SweepSpec(BaseModel):
    """The sweep spec file (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    output_dir: str = "runs"
    configs: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    overrides: list[str] = Field(default_factory=list)
    matrix: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _one_segment(cls, v: str) -> str:
        if not v or "/" in v or "\\" in v or v in (".", ".."):
            raise ValueError("must be a plain folder name (no '/', not '.' or '..')")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("seeds must be distinct")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        for text in v:
            try:
                parse_override(text)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not key or "=" in key or not all(key.split(".")):
                raise ValueError(f"matrix key {key!r} must be a dotted config key")
            if not values:
                raise ValueError(f"matrix key {key!r} needs at least one value")
        return v


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep spec; any problem is a :class:`ConfigError` naming the key."""
    p = Path(path)
    data = read_yaml_file(p, "sweep spec")  # the config loader: duplicate keys are errors
    if not isinstance(data, dict):
        raise ConfigError(f"sweep spec {p} must hold a mapping with name, configs, seeds, ...")
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"sweep spec {p}: {format_validation_error(e, SweepSpec)}") from e


# --------------------------------------------------------------------------- the plan
@dataclass
class PlannedRun:
    """One run of the sweep: its config, seed, matrix point and worker command."""

    id: str
    config: Path
    seed: int
    matrix: dict[str, Any]
    run_dir: Path
    command: list[str]


@dataclass
class Sweep:
    """A validated spec resolved into its runs."""

    spec: SweepSpec
    spec_path: Path
    sweep_dir: Path
    runs: list[PlannedRun]
    jobs: int
    threads: int | None

    @property
    def state_path(self) -> Path:
        return self.sweep_dir / STATE_FILE


def _format_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "-".join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return "-".join(f"{k}{_format_value(v)}" for k, v in sorted(value.items()))
    return value if isinstance(value, str) else json.dumps(value)  # false, null, 0.1


def matrix_tag(point: dict[str, Any]) -> str:
    """Folder name of a matrix point: ``key=value`` by sorted key, joined with ``,``."""
    return ",".join(re.sub(r"[^A-Za-z0-9_.+=-]+", "-", f"{k}={_format_value(v)}")
                    for k, v in sorted(point.items()))


def _override_text(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is valid YAML: types survive the round trip


def resolve_configs(spec: SweepSpec, spec_dir: Path) -> list[Path]:
    """The config files of the spec (paths and globs relative to the spec file), in order."""
    out: list[Path] = []
    for i, entry in enumerate(spec.configs):
        pattern = spec_dir / entry
        if glob.has_magic(entry):
            found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True)
                           if Path(p).is_file() and not Path(p).name.startswith("_"))
            if not found:
                raise ConfigError(f"sweep spec key 'configs.{i}': {entry!r} matches no file "
                                  f"(relative to {spec_dir})")
        else:
            if not pattern.is_file():
                raise ConfigError(f"sweep spec key 'configs.{i}': config file not found: "
                                  f"{pattern}")
            found = [pattern]
        for p in found:
            p = p.resolve()
            if p not in out:
                out.append(p)
    return out


def usable_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_sweep(spec_path: str | Path, jobs: int = 1, plugins: Sequence[str] = ()) -> Sweep:
    """Validate the spec and every run's config; return the runs with their commands.

    ``plugins`` (``kdlab sweep --plugin``) are imported here and passed on to every worker
    (``--plugin``), whose ``load_config`` adds them to the run's config ``plugins``.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    spec_dir = spec_path.resolve().parent

    sweep_dir = run_folder(spec.output_dir, spec.name, what="sweep spec key 'name'").absolute()
    configs = resolve_configs(spec, spec_dir)
    keys = list(spec.matrix)
    points = [dict(zip(keys, combo, strict=True))
              for combo in itertools.product(*(spec.matrix[k] for k in keys))]
    user_keys = {".".join(parse_override(o)[0]) for o in spec.overrides} | set(keys)
    threads = None if "runtime.threads" in user_keys else max(1, usable_cores() // jobs)
    runs: list[PlannedRun] = []
    seen: dict[Path, Path] = {}
    for cfg_path in configs:
        for point in points:
            sets = [*spec.overrides, *(_override_text(k, v) for k, v in point.items())]
            if threads is not None:
                sets.append(f"runtime.threads={threads}")
            for seed in spec.seeds:
                all_sets = [*sets, f"seed={seed}"]
                try:
                    cfg = load_config(cfg_path, all_sets, plugins=list(plugins))
                except ConfigError as e:
                    raise ConfigError(f"sweep {spec.name}: {e}") from e
                parts = cfg.name.split("/")
                if any(p in ("", ".", "..") for p in parts):
                    raise ConfigError(f"{cfg_path}: config name {cfg.name!r} cannot be a folder "
                                      "path (empty, '.' or '..' parts)")
                rel = Path(*parts, *([matrix_tag(point)] if point else []), f"seed{seed}")
                run_dir = run_folder(sweep_dir, *rel.parts,
                                     what=f"{cfg_path}: config key 'name'")
                if run_dir in seen:
                    raise ConfigError(f"configs {seen[run_dir]} and {cfg_path} both give run "
                                      f"{rel.as_posix()}: give them distinct `name`s")
                seen[run_dir] = cfg_path
                command = [sys.executable, "-m", "kdlab",
                           "distill" if cfg.teacher is not None else "train", str(cfg_path),
                           "--run-dir", str(run_dir), "--resume", "--no-progress"]
                for s in all_sets:
                    command += ["--set", s]
                for plugin in plugins:
                    command += ["--plugin", plugin]
                runs.append(PlannedRun(rel.as_posix(), cfg_path, seed, point, run_dir, command))
    return Sweep(spec, spec_path, sweep_dir, runs, jobs, threads)


def worker_command(run: PlannedRun) -> list[str]:
    """The run's worker command now: with ``--resume`` only when its folder holds progress (a
    checkpoint, metrics or a summary). ``--resume`` on a folder without a run is an error, and
    a run that never completed an epoch starts afresh (with a corrected config, too)."""

    if RunDir(run.run_dir).has_progress():
        return run.command
    return [a for a in run.command if a != "--resume"]


# --------------------------------------------------------------------------- state
def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file, fsync and rename (and fsync the folder)."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_state(path: Path) -> dict[str, Any]:
    """The runs of a sweep state file (``{}`` when absent or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable sweep state %s (%s); run folders decide", path, e)
        return {}
    runs = data.get("runs") if isinstance(data, dict) else None
    return runs if isinstance(runs, dict) else {}


def _new_entry(run: PlannedRun) -> dict[str, Any]:
    return {"status": "pending", "attempts": 0, "config": str(run.config), "seed": run.seed,
            "matrix": run.matrix, "run_dir": str(run.run_dir), "error": None,
            "error_tail": None, "returncode": None, "pid": None, "log": None,
            "started": None, "ended": None}


def _pid_runs(pid: int, run_dir: Path) -> bool:
    """Whether process ``pid`` is alive and is a worker of ``run_dir``."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(run_dir).encode() in cmdline


def initial_states(sweep: Sweep, retry_failed: bool) -> dict[str, dict[str, Any]]:
    """Each run's state at (re)start: the state file, corrected by what the run folders say."""
    old = read_state(sweep.state_path)
    states: dict[str, dict[str, Any]] = {}
    for run in sweep.runs:
        entry = {**_new_entry(run), **old.get(run.id, {})}
        entry.update(config=str(run.config), run_dir=str(run.run_dir))
        if (run.run_dir / "summary.json").is_file():
            entry["status"] = "finished"
        elif entry["status"] == "running":
            pid = entry.get("pid")
            if isinstance(pid, int) and _pid_runs(pid, run.run_dir):
                raise RunError(f"run {run.id}: its worker (pid {pid}) from an earlier sweep is "
                               "still running; wait for it to end or stop it, then restart")
            log.info("run %s was interrupted: it resumes from its last checkpoint", run.id)
            entry["status"] = "pending"
        elif entry["status"] == "finished":  # summary.json gone: run it again
            entry["status"] = "pending"
        elif entry["status"] == "failed" and retry_failed:
            entry["status"] = "pending"
        states[run.id] = entry
    return states


# --------------------------------------------------------------------------- workers
def _die_with_parent_fn() -> Any:
    """A ``preexec_fn`` that has Linux kill the worker when the sweep process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the sweep died before prctl
            os._exit(1)

    return preexec


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tail(path: Path, offset: int) -> tuple[str | None, str | None]:
    """(the error line, the last lines) of a worker's output from ``offset`` on."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None, None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None, None
    tail = "\n".join(lines[-TAIL_LINES:])[-TAIL_CHARS:]
    errors = [ln for ln in lines if ln.startswith("kdlab: error:")]
    return (errors[-1] if errors else lines[-1]), tail


class SweepProgress(Protocol):
    """What the sweep reports to a progress display (the CLI's tqdm bar)."""

    def update(self, done: int, total: int, failed: int, running: list[str]) -> None: ...


@dataclass
class _Worker:
    run: PlannedRun
    proc: subprocess.Popen[bytes]
    log_path: Path
    offset: int


@dataclass
class SweepResult:
    """The outcome of :func:`run_sweep` (also of a dry run: nothing started)."""

    sweep_dir: Path
    state_path: Path
    states: dict[str, dict[str, Any]]
    started: list[str] = field(default_factory=list)
    dry_run: bool = False

    def ids(self, status: Status) -> list[str]:
        return [k for k, v in self.states.items() if v["status"] == status]

    @property
    def total(self) -> int:
        return len(self.states)

    @property
    def finished(self) -> list[str]:
        return self.ids("finished")

    @property
    def failed(self) -> list[str]:
        return self.ids("failed")

    @property
    def exit_code(self) -> int:
        """0 when every run finished, 1 otherwise."""
        return 0 if len(self.finished) == self.total else 1


class _Interrupted(KeyboardInterrupt):
    """SIGTERM to the sweep: stop the workers, keep their runs resumable."""


class SweepRunner:
    """Executes a planned sweep: up to ``jobs`` worker processes at a time."""

    def __init__(self, sweep: Sweep, retry_failed: bool = False,
                 progress: SweepProgress | None = None) -> None:
        self.sweep = sweep
        self.retry_failed = retry_failed
        self.progress = progress
        self.states: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, _Worker] = {}
        self.started: list[str] = []

    # ------------------------------------------------------------------ state
    def save(self) -> None:
        sw = self.sweep
        write_json_atomic(sw.state_path, {
            "name": sw.spec.name, "spec": str(sw.spec_path.resolve()), "jobs": sw.jobs,
            "updated": time.time(), "runs": self.states})

    def _report(self) -> None:
        if self.progress is not None:
            done = sum(1 for s in self.states.values() if s["status"] == "finished")
            failed = sum(1 for s in self.states.values() if s["status"] == "failed")
            self.progress.update(done, len(self.states), failed, sorted(self.workers))

    # ------------------------------------------------------------------ workers
    def _start(self, run: PlannedRun) -> None:
        entry = self.states[run.id]
        logs = self.sweep.sweep_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / (run.id.replace("/", "__") + ".log")
        entry["attempts"] = int(entry.get("attempts") or 0) + 1
        command = worker_command(run)
        with open(log_path, "ab") as f:
            f.write(f"=== attempt {entry['attempts']} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                    f"{' '.join(command)}\n".encode())
            offset = f.tell()
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, env=_worker_env(),
                                    preexec_fn=_die_with_parent_fn())
        entry.update(status="running", pid=proc.pid, started=time.time(), ended=None,
                     log=str(log_path), returncode=None)
        self.workers[run.id] = _Worker(run, proc, log_path, offset)
        self.started.append(run.id)
        log.info("started %s (attempt %d, pid %d)", run.id, entry["attempts"], proc.pid)
        self.save()

    def _finish(self, w: _Worker, rc: int) -> None:
        entry = self.states[w.run.id]
        entry.update(returncode=rc, ended=time.time(), pid=None)
        error, tail = _tail(w.log_path, w.offset)
        if rc == 0 and (w.run.run_dir / "summary.json").is_file():
            entry.update(status="finished", error=None, error_tail=None)
            log.info("finished %s", w.run.id)
        else:
            if rc == 0:
                error = "the worker exited without writing summary.json"
            elif rc < 0:
                error = f"the worker was killed by signal {-rc}" + (f"; {error}" if error else "")
            entry.update(status="failed", error=error or f"exit status {rc}", error_tail=tail)
            log.warning("run %s failed (exit %d): %s", w.run.id, rc, entry["error"])
        del self.workers[w.run.id]
        self.save()

    def _stop_workers(self) -> None:
        for w in self.workers.values():
            with contextlib.suppress(OSError):
                w.proc.terminate()
        deadline = time.monotonic() + 10
        for w in self.workers.values():
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
            entry = self.states[w.run.id]
            done = (w.run.run_dir / "summary.json").is_file()
            entry.update(status="finished" if done else "pending", pid=None, ended=time.time(),
                         returncode=w.proc.returncode)
        self.workers.clear()
        self.save()

    # ------------------------------------------------------------------ loop
    def run(self) -> SweepResult:
        sw = self.sweep
        sw.sweep_dir.mkdir(parents=True, exist_ok=True)
        with _lock(sw.sweep_dir / LOCK_FILE), _sigterm_interrupts():
            self.states = initial_states(sw, self.retry_failed)
            self.save()
            skipped = [k for k, v in self.states.items() if v["status"] == "failed"]
            if skipped:
                log.warning("%d failed run(s) not retried (use --retry-failed): %s",
                            len(skipped), ", ".join(skipped))
            queue = [r for r in sw.runs if self.states[r.id]["status"] == "pending"]
            log.info("sweep %s: %d run(s), %d to run, %d finished, %d failed", sw.spec.name,
                     len(sw.runs), len(queue), sum(v["status"] == "finished"
                                                   for v in self.states.values()), len(skipped))
            self._report()
            try:
                while queue or self.workers:
                    while queue and len(self.workers) < sw.jobs:
                        self._start(queue.pop(0))
                        self._report()
                    for w in list(self.workers.values()):
                        rc = w.proc.poll()
                        if rc is not None:
                            self._finish(w, rc)
                            self._report()
                    if self.workers:
                        time.sleep(POLL_S)
            except BaseException:
                self._stop_workers()
                raise
        return SweepResult(sw.sweep_dir, sw.state_path, self.states, self.started)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[IO[str]]:
    """An exclusive lock on the sweep folder (one sweep process at a time)."""
    f = open(path, "a+")
    try:
        try:
            # POSIX only: fcntl does not exist on Windows
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            raise RunError(f"another sweep process is running in {path.parent}") from None
        yield f
    finally:
        f.close()


def _sigterm_interrupts() -> contextlib.AbstractContextManager[None]:
    """Within the main thread, SIGTERM raises :class:`_Interrupted` (workers are stopped)."""
    return sigterm_raises(lambda signum: _Interrupted())


def run_sweep(spec_path: str | Path, jobs: int = 1, retry_failed: bool = False,
              dry_run: bool = False, progress: SweepProgress | None = None,
              plugins: Sequence[str] = ()) -> SweepResult:
    """Plan and run a sweep (or, with ``dry_run``, only report what would run)."""
    sweep = plan_sweep(spec_path, jobs, plugins)
    if dry_run:
        states = initial_states(sweep, retry_failed)
        return SweepResult(sweep.sweep_dir, sweep.state_path, states, dry_run=True)
    return SweepRunner(sweep, retry_failed, progress).run()


class TqdmSweepProgress:
    """The CLI's sweep progress: one tqdm bar of runs done (finished or failed) out of all."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def update(self, done: int, total: int, failed: int, running: list[str]) -> None:
        if not self.enabled:
            return
        if self.bar is None:

            tqdm.monitor_interval = 0  # no monitor thread: workers are forked from this process
            self.bar = tqdm(total=total, desc="sweep", unit="run", dynamic_ncols=True,
                            file=sys.stderr)
        self.bar.n = done + failed
        self.bar.set_postfix(finished=done, failed=failed, running=len(running), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
