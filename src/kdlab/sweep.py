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

``--launcher submitit`` runs every run as a job of submitit's executor instead (SLURM, or
submitit's local executor for a test on one machine), configured by the spec's ``slurm:``
section (:class:`SlurmSpec`). Each job runs the same worker command (so the run's worker holds
the run directory's lock, as with the local launcher); on pre-emption or at its time limit the
job stops its worker (SIGTERM: a step checkpoint where ``runtime.checkpoint_every_steps`` is
set) and submitit requeues the same call, which resumes the run from its newest checkpoint.
The sweep process polls the jobs and is the only writer of ``sweep.json``, whichever launcher
runs the runs (entries gain ``launcher``, ``job_id`` and ``job_state``).
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
import socket
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
    "Launcher", "SlurmSpec", "SweepJob", "SubmititRunner",
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
Launcher = Literal["local", "submitit"]
#: seconds between two looks at the submitit jobs (SLURM: submitit caches sacct for a while)
SUBMITIT_POLL_S = {"local": 0.5, "slurm": 15.0}
#: seconds a pre-empted job gives its worker to write a step checkpoint and exit
STOP_GRACE_S = 60.0
CLUSTER_HINT = "pip install -e '.[cluster]' in the kdlab clone"


# --------------------------------------------------------------------------- the spec
class SlurmSpec(BaseModel):
    """The ``slurm:`` section of a sweep spec: the jobs of ``--launcher submitit``."""

    model_config = ConfigDict(extra="forbid")

    #: "slurm" (sbatch through submitit), or "local": submitit's local executor, which runs the
    #: jobs as processes of this machine (a test of the spec and of requeueing)
    cluster: Literal["slurm", "local"] = "slurm"
    partition: str | None = None
    #: GPUs of each run (one job, one node); more than 1 runs the worker under torchrun
    gpus_per_run: int = Field(1, ge=0)
    cpus_per_task: int = Field(8, ge=1)
    #: the job's time limit; a run that needs longer is requeued and resumes
    time_min: int = Field(24 * 60, ge=1)
    mem_gb: int | None = Field(None, ge=1)
    #: how many jobs of the sweep's job array run at a time
    array_parallelism: int = Field(64, ge=1)
    #: extra ``#SBATCH`` parameters (submitit's ``slurm_additional_parameters``)
    extra: dict[str, Any] = Field(default_factory=dict)
    #: shell lines run before the worker (``module load ...``, activating the environment)
    setup: list[str] = Field(default_factory=list)


class SweepSpec(BaseModel):
    """The sweep spec file (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    output_dir: str = "runs"
    configs: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    overrides: list[str] = Field(default_factory=list)
    matrix: dict[str, list[Any]] = Field(default_factory=dict)
    #: the jobs of ``kdlab sweep --launcher submitit`` (ignored by the local launcher)
    slurm: SlurmSpec | None = None

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


def plan_sweep(spec_path: str | Path, jobs: int = 1, plugins: Sequence[str] = (),
               launcher: Launcher = "local") -> Sweep:
    """Validate the spec and every run's config; return the runs with their commands.

    ``plugins`` (``kdlab sweep --plugin``) are imported here and passed on to every worker
    (``--plugin``), whose ``load_config`` adds them to the run's config ``plugins``.
    ``launcher="submitit"`` needs the spec's ``slurm:`` section; each run's threads then come
    from its ``cpus_per_task`` instead of this machine's cores.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    spec_dir = spec_path.resolve().parent
    if launcher == "submitit" and spec.slurm is None:
        raise ConfigError(f"sweep spec {spec_path}: --launcher submitit needs a `slurm:` section "
                          "(partition, gpus_per_run, cpus_per_task, time_min, ...)")

    sweep_dir = run_folder(spec.output_dir, spec.name, what="sweep spec key 'name'").absolute()
    configs = resolve_configs(spec, spec_dir)
    keys = list(spec.matrix)
    points = [dict(zip(keys, combo, strict=True))
              for combo in itertools.product(*(spec.matrix[k] for k in keys))]
    user_keys = {".".join(parse_override(o)[0]) for o in spec.overrides} | set(keys)
    if "runtime.threads" in user_keys:
        threads = None
    elif launcher == "submitit" and spec.slurm is not None:
        threads = max(1, spec.slurm.cpus_per_task // max(1, spec.slurm.gpus_per_run))
    else:
        threads = max(1, usable_cores() // jobs)
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
            "started": None, "ended": None, "launcher": None, "job_id": None,
            "job_state": None}


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

    def _start_states(self) -> tuple[list[str], list[PlannedRun]]:
        """Read the runs' states (:func:`initial_states`), record them, warn about the failed
        runs not retried; ``(those failed run ids, the pending runs)``."""
        sw = self.sweep
        self.states = initial_states(sw, self.retry_failed)
        self.save()
        skipped = [k for k, v in self.states.items() if v["status"] == "failed"]
        if skipped:
            log.warning("%d failed run(s) not retried (use --retry-failed): %s",
                        len(skipped), ", ".join(skipped))
        return skipped, [r for r in sw.runs if self.states[r.id]["status"] == "pending"]

    def _report(self) -> None:
        if self.progress is not None:
            done = sum(1 for s in self.states.values() if s["status"] == "finished")
            failed = sum(1 for s in self.states.values() if s["status"] == "failed")
            running = sorted(k for k, v in self.states.items() if v["status"] == "running")
            self.progress.update(done, len(self.states), failed, running)

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
                     log=str(log_path), returncode=None, launcher="local", job_id=None,
                     job_state=None)
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
            skipped, queue = self._start_states()
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
              plugins: Sequence[str] = (), launcher: Launcher = "local") -> SweepResult:
    """Plan and run a sweep (or, with ``dry_run``, only report what would run).

    ``launcher``: "local" (worker processes of this machine, ``jobs`` at a time) or "submitit"
    (a job per run through submitit, configured by the spec's ``slurm:`` section;
    :class:`SubmititRunner`). Either way the call returns when every run has ended.
    """
    if launcher not in ("local", "submitit"):
        raise ConfigError(f"--launcher must be local or submitit (got {launcher!r})")
    sweep = plan_sweep(spec_path, jobs, plugins, launcher)
    if dry_run:
        states = initial_states(sweep, retry_failed)
        return SweepResult(sweep.sweep_dir, sweep.state_path, states, dry_run=True)
    if launcher == "submitit":
        return SubmititRunner(sweep, retry_failed, progress).run()
    return SweepRunner(sweep, retry_failed, progress).run()


# --------------------------------------------------------------------------- submitit
def _import_submitit() -> Any:
    """The submitit module, or a one-line :class:`ConfigError` naming the extra to install."""
    try:
        # optional dependency (extra `cluster`): only `--launcher submitit` needs it
        import submitit
    except ImportError:
        raise ConfigError(f"--launcher submitit needs submitit: {CLUSTER_HINT}") from None
    return submitit


#: the worker process of the submitit job running in this process (for :meth:`SweepJob.
#: checkpoint`, which runs in submitit's signal handler); None between workers
_CHILD: subprocess.Popen[bytes] | None = None


def _stop_child(pid: int, grace_s: float) -> None:
    """SIGTERM the worker ``pid`` (a step checkpoint where configured), SIGKILL it after
    ``grace_s`` seconds, and reap it. Uses ``os.waitpid``: this runs in a signal handler that may
    have interrupted ``Popen.poll`` (whose lock it must not wait for)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    try:
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return
            time.sleep(0.2)
    except ChildProcessError:  # reaped already
        return


def _drop_dead_lock(run_dir: Path) -> None:
    """Remove the run directory's lock when its holder was a process of this host that is gone
    (the stopped worker). A requeued job may start on another host, which could not tell that
    holder is dead and would refuse the run."""
    rd = RunDir(run_dir)
    holder = rd.lock_holder()
    if not holder or holder.get("host") != socket.gethostname():
        return
    pid = holder.get("pid")
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
            return  # alive: not ours to remove
        except ProcessLookupError:
            pass
        except OSError:
            return
    log.warning("run directory %s: removing the lock of its stopped worker (pid %s) before "
                "the job is requeued", run_dir, pid)
    rd.lock_path.unlink(missing_ok=True)


class SweepJob:
    """One run of a sweep as a submitit job: runs the run's worker command (as the local
    launcher does, so the worker holds the run directory's lock) and returns its outcome.

    Checkpointable: on pre-emption or at the time limit submitit calls :meth:`checkpoint`,
    which stops the worker and returns the same call, requeued; the worker command then has
    ``--resume`` and continues from the newest checkpoint (``last.pt`` or a step checkpoint).
    Picklable (cloudpickle): it holds the planned run and the log path only.
    """

    def __init__(self, run: PlannedRun, log_path: Path, gpus: int = 0) -> None:
        self.run = run
        self.log_path = log_path
        self.gpus = gpus
        #: how many times this job has started its worker (requeues included)
        self.attempt = 0

    def command(self) -> list[str]:
        """The worker command now (``--resume`` once the run has progress); with more than one
        GPU the worker runs under torchrun on this node."""
        command = worker_command(self.run)
        if self.gpus > 1:
            command = [command[0], "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={self.gpus}", *command[1:]]
        return command

    def __call__(self) -> dict[str, Any]:
        """Run the worker to its end: ``{"returncode", "error", "error_tail", "attempt"}``."""
        global _CHILD
        self.attempt += 1
        command = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as f:
            f.write(f"=== job attempt {self.attempt} at {time.strftime('%Y-%m-%d %H:%M:%S')} on "
                    f"{socket.gethostname()}: {' '.join(command)}\n".encode())
            offset = f.tell()
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, env=_worker_env())
        _CHILD = proc
        try:
            while (rc := proc.poll()) is None:
                time.sleep(0.5)
        finally:
            _CHILD = None
        error, tail = _tail(self.log_path, offset)
        return {"returncode": rc, "error": error, "error_tail": tail, "attempt": self.attempt}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's pre-emption/time-out hook: stop the worker (it writes a step checkpoint
        where configured), free the run directory's lock, requeue this same call."""
        submitit = _import_submitit()
        child = _CHILD
        if child is not None:
            _stop_child(child.pid, STOP_GRACE_S)
            _drop_dead_lock(self.run.run_dir)
        with open(self.log_path, "ab") as f:
            f.write(f"=== job attempt {self.attempt} stopped (pre-empted or timed out): "
                    "requeued, the run resumes from its newest checkpoint\n".encode())
        return submitit.helpers.DelayedSubmission(self)


#: submitit job states (SLURM's words) of a job that is running; other live states are pending
_RUNNING_STATES = frozenset({"RUNNING", "COMPLETING"})
#: states of a job that is still queued or running
_LIVE_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING",
                          "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"})


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else text


class SubmititRunner(SweepRunner):
    """Executes a planned sweep as submitit jobs (one job per run, one job array).

    The sweep process submits the pending runs, polls their jobs and records each state change
    in ``sweep.json`` (it stays the only writer, as with the local launcher). Interrupting it
    (Ctrl-C, SIGTERM) cancels its jobs and leaves their runs resumable; a restart refuses runs
    whose job from an earlier sweep process is still queued or running.
    """

    def _executor(self, submitit: Any) -> Any:
        sw = self.sweep
        slurm = sw.spec.slurm
        assert slurm is not None
        params: dict[str, Any] = {
            "name": f"kdlab-{sw.spec.name}", "timeout_min": slurm.time_min,
            "gpus_per_node": slurm.gpus_per_run, "cpus_per_task": slurm.cpus_per_task,
            "tasks_per_node": 1, "nodes": 1,
            "slurm_array_parallelism": slurm.array_parallelism,
            "slurm_additional_parameters": dict(slurm.extra), "slurm_setup": list(slurm.setup)}
        if slurm.partition:
            params["slurm_partition"] = slurm.partition
        if slurm.mem_gb:
            params["mem_gb"] = slurm.mem_gb
        try:
            executor = submitit.AutoExecutor(folder=sw.sweep_dir / "submitit" / "%j",
                                             cluster=slurm.cluster)
            executor.update_parameters(**params)
        except (RuntimeError, ValueError, OSError) as e:
            raise RunError(f"sweep {sw.spec.name}: cannot use submitit's {slurm.cluster} "
                           f"executor: {_last_line(str(e))}") from e
        return executor

    def _job_alive(self, submitit: Any, job_id: str) -> bool:
        slurm = self.sweep.spec.slurm
        assert slurm is not None
        if slurm.cluster == "local":  # the job id is the pid of submitit's local controller
            try:
                os.kill(int(job_id), 0)
            except (ValueError, ProcessLookupError):
                return False
            except OSError:
                return True
            return True
        job = submitit.SlurmJob(folder=self.sweep.sweep_dir / "submitit" / "%j", job_id=job_id)
        return str(job.state).upper() in _LIVE_STATES

    def _refuse_live_jobs(self, submitit: Any) -> None:
        for run_id, entry in read_state(self.sweep.state_path).items():
            job_id = entry.get("job_id")
            if (entry.get("launcher") == "submitit" and job_id
                    and entry.get("status") in ("pending", "running")
                    and self._job_alive(submitit, str(job_id))):
                raise RunError(f"run {run_id}: its job {job_id} from an earlier sweep is still "
                               "queued or running; wait for it or cancel it (scancel), then "
                               "restart")

    def _submit(self, executor: Any, queue: list[PlannedRun]) -> dict[str, tuple[PlannedRun, Any]]:
        logs = self.sweep.sweep_dir / "logs"
        slurm = self.sweep.spec.slurm
        assert slurm is not None
        submitted: list[tuple[PlannedRun, Any]] = []
        with executor.batch():
            for run in queue:
                log_path = logs / (run.id.replace("/", "__") + ".log")
                submitted.append((run, executor.submit(
                    SweepJob(run, log_path, slurm.gpus_per_run))))
        jobs = {}
        for run, job in submitted:
            entry = self.states[run.id]
            entry.update(status="pending", launcher="submitit", job_id=str(job.job_id),
                         job_state="SUBMITTED", attempts=int(entry.get("attempts") or 0) + 1,
                         pid=None, started=None, ended=None, returncode=None,
                         log=str(logs / (run.id.replace("/", "__") + ".log")))
            jobs[run.id] = (run, job)
            self.started.append(run.id)
            log.info("submitted %s as job %s", run.id, job.job_id)
        self.save()
        return jobs

    def _finish_job(self, run: PlannedRun, job: Any) -> None:
        entry = self.states[run.id]
        try:
            result = job.result()
            rc, error, tail = result["returncode"], result["error"], result["error_tail"]
        except Exception as e:  # the job itself failed: submitit's error (time limit, crash)
            rc, error, tail = None, _last_line(str(e)), str(e)[-TAIL_CHARS:]
        entry.update(returncode=rc, ended=time.time(), job_state=str(job.state))
        if rc == 0 and (run.run_dir / "summary.json").is_file():
            entry.update(status="finished", error=None, error_tail=None)
            log.info("finished %s (job %s)", run.id, entry["job_id"])
            return
        if rc == 0:
            error = "the worker exited without writing summary.json"
        elif rc is not None and rc < 0:
            error = f"the worker was killed by signal {-rc}" + (f"; {error}" if error else "")
        entry.update(status="failed", error=error or f"exit status {rc}", error_tail=tail)
        log.warning("run %s failed (job %s): %s", run.id, entry["job_id"], entry["error"])

    def _poll(self, jobs: dict[str, tuple[PlannedRun, Any]]) -> bool:
        """One look at the jobs: record ended jobs and state changes; True if any changed."""
        changed = False
        for run_id, (run, job) in list(jobs.items()):
            entry = self.states[run_id]
            if job.done():
                self._finish_job(run, job)
                del jobs[run_id]
                changed = True
                continue
            state = str(job.state).upper()
            status = "running" if state in _RUNNING_STATES else "pending"
            if (status, state) != (entry["status"], entry.get("job_state")):
                if status == "running" and entry["status"] != "running":
                    entry["started"] = time.time()
                entry.update(status=status, job_state=state)
                changed = True
        return changed

    def _cancel(self, jobs: dict[str, tuple[PlannedRun, Any]]) -> None:
        for run_id, (run, job) in jobs.items():
            with contextlib.suppress(Exception):
                job.cancel(check=False)
            done = (run.run_dir / "summary.json").is_file()
            self.states[run_id].update(status="finished" if done else "pending",
                                       ended=time.time(), job_state="CANCELLED")
        jobs.clear()
        self.save()

    def run(self) -> SweepResult:
        """Submit the pending runs, wait for their jobs, return the sweep's outcome."""
        sw = self.sweep
        assert sw.spec.slurm is not None
        submitit = _import_submitit()
        sw.sweep_dir.mkdir(parents=True, exist_ok=True)
        poll_s = SUBMITIT_POLL_S[sw.spec.slurm.cluster]
        with _lock(sw.sweep_dir / LOCK_FILE), _sigterm_interrupts():
            self._refuse_live_jobs(submitit)
            skipped, queue = self._start_states()
            log.info("sweep %s: %d run(s), %d to submit (submitit, %s)", sw.spec.name,
                     len(sw.runs), len(queue), sw.spec.slurm.cluster)
            self._report()
            jobs: dict[str, tuple[PlannedRun, Any]] = {}
            try:
                if queue:
                    jobs = self._submit(self._executor(submitit), queue)
                while jobs:
                    if self._poll(jobs):
                        self.save()
                        self._report()
                    if jobs:
                        time.sleep(poll_s)
            except BaseException:
                self._cancel(jobs)
                raise
        return SweepResult(sw.sweep_dir, sw.state_path, self.states, self.started)


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
