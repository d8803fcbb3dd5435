"""SIGTERM to a run's whole process group, as SLURM and most schedulers send it on pre-emption
(``kill -TERM -- -PGID``), with loader workers (``data.num_workers: 2``) and step checkpoints on.

The workers ignore it, so the run ends exactly as after a SIGTERM to the main process alone: at
the next step boundary, with a step checkpoint, exit 143, one stderr line, status "interrupted",
no process of the group left behind, and ``--resume`` equal bit for bit to the uninterrupted run.
The same holds when a worker dies (SIGKILL) while the run is stopping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import child_env, cli, load
from .test_resume_with_workers import (
    assert_equal_to,
    start_until_step_checkpoint,
    write_config,
    write_folder,
)

pytestmark = [
    pytest.mark.e2e,  # kills real runs and resumes them
    pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc"),
]

STOPPED = re.compile(r"stopped at epoch (\d+), step (\d+) of \d+ \(step checkpoint written\)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The config (2 workers) and its uninterrupted run."""
    base = tmp_path_factory.mktemp("group")
    cfg = write_config(base, write_folder(base / "data"), 2)
    assert cli(["train", str(cfg), "--run-dir", str(base / "reference")]) == 0
    return cfg, base / "reference"


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (the loader workers of a run)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def group_alive(pgid: int) -> list[int]:
    """The processes of group ``pgid`` that have not ended (zombies do not count)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def stop_the_group(cfg: Path, run: Path, kill_a_worker: bool) -> tuple[int, str]:
    """Start the run in its own session; once its step checkpoint after step 2 exists, SIGTERM
    the whole group (then SIGKILL one worker if asked). Returns the exit status and stderr,
    after every process of the group is gone."""
    proc = start_until_step_checkpoint(cfg, run)
    try:
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.killpg(proc.pid, signal.SIGTERM)
        if kill_a_worker:
            os.kill(workers[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 30
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(proc.pid), "processes of the group were left behind"
    finally:
        if proc.poll() is None or group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, err


def assert_stopped_at_a_step_boundary(run: Path, code: int, err: str) -> None:
    assert code == 143, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("kdlab:")]
    assert lines == ["kdlab: interrupted by SIGTERM; a run continues from its last checkpoint "
                     "with --resume"], err
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["signal"]) == ("interrupted", "SIGTERM"), status
    last = run / "checkpoints" / "last.pt"
    assert status["epoch"] == (load(last)["epoch"] if last.exists() else 0)
    stopped = STOPPED.search(err)
    if stopped is not None:  # inside an epoch (else the signal came as the epoch ended)
        mid = load(run / "checkpoints" / "step.pt")["mid_epoch"]
        assert (mid["epoch"], mid["step"]) == (int(stopped[1]), int(stopped[2]))
    assert not (run / "lock.json").exists()


#: Run in a fresh interpreter, so that no state of the test process (its threads, handlers or
#: signal mask, left by earlier tests) is inherited by the forked worker.
WORKER_CHECK = r"""
import multiprocessing, os, signal, subprocess, sys, time
from kdlab.core.signals import worker_ignores_stop_signals

def work(ready):
    worker_ignores_stop_signals(0)
    ready.set()
    time.sleep(60)

fork = multiprocessing.get_context("fork")
ready = fork.Event()
worker = fork.Process(target=work, args=(ready,), daemon=True)
worker.start()
try:
    assert ready.wait(30), "the worker did not start"
    os.kill(worker.pid, signal.SIGINT)
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    worker.join(0.5)
    assert worker.is_alive(), f"SIGINT or another process's SIGTERM ended it: {worker.exitcode}"
    worker.terminate()
    worker.join(10)
    assert worker.exitcode == 0, f"its parent's SIGTERM gave exit code {worker.exitcode}"
finally:
    if worker.is_alive():
        worker.kill()
"""


def test_a_worker_ignores_stop_signals_except_its_parents_sigterm() -> None:
    """SIGINT, and SIGTERM from another process (``kill``), leave the worker running; SIGTERM
    from its parent (``Process.terminate``, as torch and multiprocessing end workers) ends it at
    once with status 0."""
    proc = subprocess.run([sys.executable, "-c", WORKER_CHECK], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_sigterm_to_the_process_group_stops_at_a_step_boundary(
        setup: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, reference = setup
    run = tmp_path / "run"
    code, err = stop_the_group(cfg, run, kill_a_worker=False)
    assert_stopped_at_a_step_boundary(run, code, err)
    assert "DataLoader worker" not in err, err  # no worker was killed
    assert STOPPED.search(err), err  # the group's SIGTERM came after step 2 of 6 of epoch 1
    assert cli(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert_equal_to(reference, run)


def test_a_worker_dying_while_the_run_stops(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGKILL to a worker right after the group's SIGTERM: still a stop at a step boundary."""
    cfg, reference = setup
    run = tmp_path / "run"
    code, err = stop_the_group(cfg, run, kill_a_worker=True)
    assert_stopped_at_a_step_boundary(run, code, err)
    assert cli(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert_equal_to(reference, run)
