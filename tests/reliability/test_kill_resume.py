"""kill -9 at any point of a run, then ``--resume``: the run continues from its last complete
checkpoint and ends bit-for-bit equal to an uninterrupted run (CPU, deterministic settings).

Each child is a real ``kdlab distill`` process that dies by SIGKILL (no handler, no cleanup):
either killed from outside while it runs, or killing itself at an exact point through
``_faulty_child.py`` (mid-epoch, inside and between the renames of a checkpoint write, in the
middle of writing the temporary file, in the middle of the metrics line).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import (
    STEPS_PER_EPOCH,
    assert_runs_equal,
    child_env,
    cli,
    load,
    metrics,
    run_faulty_child,
)

pytestmark = pytest.mark.e2e  # kills real runs and resumes them

# fault -> (what it simulates, checkpoint epoch that must be loaded on resume)
FAULTS = {
    # SIGKILL in the middle of epoch 2 (step 4 of 8): last.pt holds epoch 1.
    f"step:{STEPS_PER_EPOCH + 4}": 1,
    # epoch 2's temporary file is complete, the old last.pt not yet moved to .prev.
    "replace:last.pt>last.pt.prev:1": 1,
    # between the two renames of epoch 2: no last.pt, .prev holds epoch 1, .tmp holds epoch 2.
    "replace:last.pt.tmp>last.pt:2": 1,
    # epoch 3's temporary file torn in half (killed while torch.save writes it).
    "partial-save:last.pt.tmp:3": 2,
    # last.pt of epoch 2 is in place but its metrics line is torn in half.
    "torn-metrics:2": 2,
    # the very first checkpoint is never completed: resume starts from scratch.
    "replace:last.pt.tmp>last.pt:1": 0,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_sigkill_then_resume_is_bit_exact(fault: str, reference: Path, cfg_path: Path,
                                          tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    run = tmp_path / "run"
    run_faulty_child(fault, ["distill", str(cfg_path), "--run-dir", str(run)])
    assert not (run / "summary.json").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "running"

    caplog.set_level("INFO", logger="kdlab")
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    expected = FAULTS[fault]
    if expected:
        assert f"at epoch {expected}" in caplog.text  # "resumed ... from last.pt(.prev) at epoch"
    else:
        assert "no checkpoint" in caplog.text
    assert_runs_equal(reference, run)


def test_sigkill_from_outside_while_training(reference: Path, cfg_path: Path,
                                             tmp_path: Path) -> None:
    """A real ``python -m kdlab distill`` killed with ``kill -9`` once its first checkpoint
    exists (wherever that lands: mid-epoch, mid-write), then resumed."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "-q", "distill", str(cfg_path), "--run-dir", str(run),
         "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
    deadline = time.monotonic() + 150
    try:
        while not (run / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
    finally:
        rc = proc.wait(timeout=60)
        if proc.stderr:
            proc.stderr.close()
    if rc != -signal.SIGKILL:
        pytest.skip(f"the run ended before the kill (rc {rc}); machine too fast for this test")
    killed_at = load(run / "checkpoints" / "last.pt")["epoch"] if (
        run / "checkpoints" / "last.pt").exists() else None
    assert killed_at is None or killed_at < 4
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)


def test_resume_twice_and_resume_finished_is_noop(reference: Path, cfg_path: Path,
                                                  tmp_path: Path) -> None:
    """A run killed, resumed and killed again still ends equal; resuming a finished run changes
    nothing."""
    run = tmp_path / "run"
    run_faulty_child("step:3", ["distill", str(cfg_path), "--run-dir", str(run)])
    run_faulty_child(f"step:{2 * STEPS_PER_EPOCH + 2}",
                     ["distill", str(cfg_path), "--run-dir", str(run), "--resume"])
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert metrics(run) == metrics(reference)
