"""A run leaves the process as it found it: threads, deterministic kernels, cudnn.benchmark,
the global RNGs and the signal handlers are restored after ``kdlab.run`` (Reliability III)."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import kdlab
from kdlab.core.runtime import process_state_preserved

pytestmark = pytest.mark.e2e

CONFIG = {
    "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
             "synthetic": {"n_train": 16, "n_test": 8, "num_classes": 4, "size": 16}},
    "student": {"arch": "resnet8"},
    "optim": {"epochs": 1, "milestones": []},
    "runtime": {"amp": "off", "threads": 1, "deterministic": True},
}


def _snapshot() -> tuple[object, ...]:
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark, torch.get_rng_state().clone(), random.getstate(),
            np.random.get_state()[1].copy(), signal.getsignal(signal.SIGTERM),
            signal.getsignal(signal.SIGINT))


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> None:
    assert a[:3] == b[:3]
    assert torch.equal(a[3], b[3]) and a[4] == b[4] and np.array_equal(a[5], b[5])
    assert a[6] is b[6] and a[7] is b[7]


def test_kdlab_run_restores_the_process_state(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(7)
    before = _snapshot()
    kdlab.run(CONFIG, run_dir=tmp_path / "run")
    _same(before, _snapshot())


def test_state_is_restored_when_the_block_raises() -> None:
    before = _snapshot()
    with pytest.raises(RuntimeError), process_state_preserved():
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(0)
        raise RuntimeError("boom")
    _same(before, _snapshot())
