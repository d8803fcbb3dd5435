"""SIGTERM (what cluster schedulers send) and SIGINT (Ctrl-C) to a training run: exit 143 / 130
with one stderr line, ``status.json`` says "interrupted" at the last completed epoch, the lock is
released, and ``--resume`` ends bit-for-bit equal to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.runs.checkpoint import load_latest

from .conftest import assert_runs_equal, child_env, cli

pytestmark = pytest.mark.e2e  # kills real runs and resumes them


def _default_sigint() -> None:
    """The child handles SIGINT as Python does by default, even when this shell ignores it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(("sig", "code", "said"), [
    (signal.SIGTERM, 143, "kdlab: interrupted by SIGTERM; "),
    (signal.SIGINT, 130, "kdlab: interrupted; "),
])
def test_signal_marks_the_run_interrupted_and_resume_is_exact(
        sig: signal.Signals, code: int, said: str, reference: Path, cfg_path: Path,
        tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "-q", "distill", str(cfg_path), "--run-dir", str(run),
         "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=child_env(), preexec_fn=_default_sigint)
    deadline = time.monotonic() + 150
    try:
        while not (run / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        lock = json.loads((run / "lock.json").read_text())
        assert lock["pid"] == proc.pid and "distill" in lock["command"]
        time.sleep(0.3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run ended before the signal; machine too fast for this test")
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(said), err
    assert "--resume" in lines[0]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted", status
    found = load_latest(run / "checkpoints" / "last.pt")
    assert found is not None
    assert status["epoch"] == found[0]["epoch"] < 4
    assert not (run / "lock.json").exists()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)
