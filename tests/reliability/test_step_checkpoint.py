"""Step checkpoints (``runtime.checkpoint_every_steps``): a preempted run loses minutes, not an
epoch. ``--resume`` continues mid-epoch, and the finished run equals the uninterrupted reference
bit for bit (weights, CRD memory, optimizer, RNG, metrics)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.data import DeviceLoader, make_synthetic_dataset

from .conftest import (
    STEPS_PER_EPOCH,
    assert_runs_equal,
    child_env,
    cli,
    load,
    run_faulty_child,
)

EVERY = ["--set", "runtime.checkpoint_every_steps=3"]


@pytest.mark.e2e
def test_sigkill_mid_epoch_resumes_from_the_step_checkpoint(cfg_path: Path, reference: Path,
                                                            tmp_path: Path) -> None:
    run = tmp_path / "run"
    # killed at the start of epoch 2's 5th step: the step checkpoint after its 3rd step exists
    run_faulty_child(f"step:{STEPS_PER_EPOCH + 5}",
                     ["distill", str(cfg_path), "--run-dir", str(run), *EVERY])
    step = load(run / "checkpoints" / "step.pt")
    assert (step["epoch"], step["mid_epoch"]["epoch"], step["mid_epoch"]["step"]) == (1, 2, 3)
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 1
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume", *EVERY]) == 0
    assert_runs_equal(reference, run)
    assert not (run / "checkpoints" / "step.pt").exists()  # superseded by the epoch's


@pytest.mark.e2e
def test_resume_mid_epoch_without_step_checkpoints_configured(cfg_path: Path, reference: Path,
                                                              tmp_path: Path) -> None:
    """The option is a runtime knob: the resumed process need not set it to use the file."""
    run = tmp_path / "run"
    run_faulty_child("step:7", ["distill", str(cfg_path), "--run-dir", str(run), *EVERY])
    assert load(run / "checkpoints" / "step.pt")["mid_epoch"]["step"] == 6
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)


@pytest.mark.e2e
def test_sigterm_writes_a_step_checkpoint_and_resume_is_exact(cfg_path: Path, reference: Path,
                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    # many more steps per epoch than the reference would make the run another run: keep the
    # config, and only checkpoint on the signal (every 10^6 steps)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdlab", "-q", "distill", str(cfg_path), "--run-dir", str(run),
         "--no-progress", "--set", "runtime.checkpoint_every_steps=1000000"],
        stderr=subprocess.PIPE, text=True, env=child_env())
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("kdlab:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == "SIGTERM"
    last = load(run / "checkpoints" / "last.pt")["epoch"]
    assert status["epoch"] == last
    if (run / "checkpoints" / "step.pt").exists():  # stopped inside an epoch
        assert load(run / "checkpoints" / "step.pt")["epoch"] == last
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)


@pytest.mark.parametrize("start", [0, 1, 3])
def test_device_loader_starts_mid_epoch_with_the_same_batches(start: int) -> None:
    ds = make_synthetic_dataset(40, num_classes=4, size=8, seed=0)
    loader = DeviceLoader(ds, batch_size=8, train=True, seed=5)
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(3, start_batch=start)
    tail = list(loader)
    assert len(tail) == len(full) - start
    for a, b in zip(full[start:], tail, strict=True):
        assert a.images.equal(b.images) and a.labels.equal(b.labels) and a.index.equal(b.index)
    assert len(list(loader)) == len(full)  # one-shot: the next iteration is whole again
