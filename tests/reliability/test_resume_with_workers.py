"""Exact resume whatever ``data.num_workers`` is: the loaders never draw from torch's global RNG.

A DataLoader draws its workers' base seed from the global RNG once per iterator unless it has its
own generator; that shifted the stream the student's dropout uses, so a run resumed with loader
workers (and one resumed mid-epoch without them) ended with other weights than an uninterrupted
run. The runs here: a class-folder (streamed) data set of 16 px images and MobileNetV2_imagenet
(dropout 0.2), 2 epochs of 6 steps of 4 images, 1 thread. Each is compared with the
uninterrupted run of the same number of workers; those do not depend on the number of workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from kdlab.data import DeviceLoader, make_synthetic_dataset
from kdlab.data.stream import load_stream_dataset, make_stream_loader
from support import assert_same

from .conftest import child_env, cli, load, metrics

pytestmark = pytest.mark.e2e  # trains, stops and resumes real runs

EPOCHS = 2


def write_folder(root: Path) -> Path:
    """train/ (3 classes x 8) and val/ (3 x 2) random 20x20 PNGs."""
    from PIL import Image  # optional dependency (streamed datasets)

    for split, n in (("train", 8), ("val", 2)):
        for c in range(3):
            for k in range(n):
                rng = np.random.default_rng([c, k, split == "val"])
                path = root / split / f"class{c}" / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(path)
    return root


def write_config(folder: Path, root: Path, workers: int) -> Path:
    cfg: dict[str, Any] = {
        "name": "workers",
        "data": {"name": "folder", "root": str(root), "image_size": 16, "resize": 18,
                 "num_workers": workers, "batch_size": 4, "eval_batch_size": 6,
                 "crop_scale": [0.08, 1.0]},  # the stream these tests were written against
        "student": {"arch": "MobileNetV2_imagenet"},
        "optim": {"epochs": EPOCHS, "milestones": [], "lr": 0.01},
        "runtime": {"threads": 1, "amp": "off", "deterministic": True},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cfg{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder"))


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, folder_root: Path) -> dict[int, Path]:
    """The uninterrupted runs with 0 and with 2 workers."""
    runs = {}
    for workers in (0, 2):
        base = tmp_path_factory.mktemp(f"reference{workers}")
        runs[workers] = base / "run"
        cfg = write_config(base, folder_root, workers)
        assert cli(["train", str(cfg), "--run-dir", str(runs[workers])]) == 0
    return runs


def assert_equal_to(reference: Path, run: Path) -> None:
    """Weights, optimizer, scheduler and RNG state bit for bit; metrics without timings."""
    assert (run / "summary.json").exists(), "run did not finish"
    a, b = load(reference / "checkpoints" / "last.pt"), load(run / "checkpoints" / "last.pt")
    assert b["epoch"] == EPOCHS
    for key in ("model", "optimizer", "scheduler", "rng"):
        assert_same(a[key], b[key], key)
    assert metrics(reference) == metrics(run)


def test_uninterrupted_runs_do_not_depend_on_the_number_of_workers(
        references: dict[int, Path]) -> None:
    assert_equal_to(references[0], references[2])


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_after_then_resume_is_exact(workers: int, references: dict[int, Path],
                                         folder_root: Path, tmp_path: Path) -> None:
    cfg, run = write_config(tmp_path, folder_root, workers), tmp_path / "run"
    assert cli(["train", str(cfg), "--run-dir", str(run), "--stop-after", "1"]) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    assert cli(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert_equal_to(references[workers], run)


def start_until_step_checkpoint(cfg: Path, run: Path, *flags: str) -> subprocess.Popen[str]:
    """``kdlab [flags] train cfg`` with step checkpoints every 2 steps, in its own session
    (process group); returns once its first step checkpoint exists (within 120 s)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdlab", *flags, "train", str(cfg), "--run-dir", str(run),
         "--no-progress", "--set", "runtime.checkpoint_every_steps=2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
        start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "step.pt").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no step checkpoint within the time limit: "
                                 + (proc.stderr.read() if proc.stderr else ""))
        time.sleep(0.005)
    return proc


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_mid_epoch_then_resume_is_exact(workers: int, references: dict[int, Path],
                                                folder_root: Path, tmp_path: Path) -> None:
    """SIGTERM to the main process once the step checkpoint after step 2 of epoch 1 exists;
    it stops at the next step boundary (with a step checkpoint when that is inside an epoch),
    and ``--resume`` continues there."""
    cfg, run = write_config(tmp_path, folder_root, workers), tmp_path / "run"
    proc = start_until_step_checkpoint(cfg, run, "-q")
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    assert cli(["train", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert_equal_to(references[workers], run)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_loader_leaves_the_global_rng_alone(workers: int, folder_root: Path) -> None:
    """Training (whole epochs, and from a batch inside one) and evaluation iterations."""
    kw: dict[str, Any] = {"image_size": 16, "resize": 18}
    train = make_stream_loader(load_stream_dataset("folder", folder_root, True, **kw), 4,
                               train=True, num_workers=workers, seed=3)
    test = make_stream_loader(load_stream_dataset("folder", folder_root, False, **kw), 6,
                              train=False, num_workers=workers, seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = []
    for epoch, start in ((1, 0), (2, 0), (2, 4)):
        train.set_epoch(epoch, start_batch=start)
        batches.append([b.index.tolist() for b in train])
        assert len(list(test)) == 1
    assert torch.equal(torch.get_rng_state(), before)
    assert batches[2] == batches[1][4:]  # mid-epoch start: the same batches from there


def test_device_loader_leaves_the_global_rng_alone() -> None:
    """In-memory data: the device loader (both views, whole and from a batch inside the epoch)
    draws only from its own generators."""
    ds = make_synthetic_dataset(24, num_classes=4, size=8, seed=0)
    loader = DeviceLoader(ds, batch_size=8, train=True, seed=5)
    loader.set_views(("weak", "strong"))
    evaluation = DeviceLoader(ds, batch_size=8, train=False)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for epoch, start in ((1, 0), (2, 1)):
        loader.set_epoch(epoch, start_batch=start)
        assert len(list(loader)) == 3 - start
        assert len(list(evaluation)) == 3
    assert torch.equal(torch.get_rng_state(), before)
