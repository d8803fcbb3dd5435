"""A Ctrl-C (SIGINT) or SIGTERM arriving while a checkpoint is written is held until the write is
complete, then delivered: the checkpoint on disk is whole and the run stops as interrupted, not as
a failed write (torch.save interrupted mid-stream reports "unexpected pos")."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.runs import checkpoint as ckpt
from kdlab.runs.checkpoint import load_latest, save_atomic, signals_deferred


@pytest.fixture(autouse=True)
def _python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) during each test, even when the suite was
    started with SIGINT ignored (e.g. as a background job of a non-interactive shell)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _interrupting_save(monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    """torch.save as used by save_atomic, with ``sig`` raised in the middle of the stream."""
    real = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        class Writer:
            def __init__(self) -> None:
                self.calls = 0

            def write(self, data: bytes) -> int:
                self.calls += 1
                if self.calls == 2:
                    signal.raise_signal(sig)
                return f.write(data)

            def flush(self) -> None:
                f.flush()

        real(obj, Writer(), *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)


def test_sigint_during_a_checkpoint_write_is_delivered_after_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.zeros(1000)}, path)
    _interrupting_save(monkeypatch, signal.SIGINT)
    state = {"epoch": 2, "w": torch.arange(100_000, dtype=torch.float32)}
    with pytest.raises(KeyboardInterrupt):
        save_atomic(state, path)
    monkeypatch.undo()
    found = load_latest(path)
    assert found is not None and found[1] == path and found[0]["epoch"] == 2
    assert torch.equal(found[0]["w"], state["w"])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_signals_reach_the_handlers_installed_before(tmp_path: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
            assert seen == []  # held inside the block
        assert seen == [signal.SIGTERM]  # once, after it
    finally:
        signal.signal(signal.SIGTERM, previous)
