"""Atomic checkpoint writes and the fall-back to the previous checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.core.errors import CheckpointError
from kdlab.runs import checkpoint as ckpt_mod
from kdlab.runs.checkpoint import load_latest, save_atomic


def test_save_keeps_previous_and_loads_latest(tmp_path: Path) -> None:
    p = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.ones(3)}, p)
    save_atomic({"epoch": 2, "w": torch.zeros(3)}, p)
    state, used = load_latest(p)
    assert used == p and state["epoch"] == 2
    assert (tmp_path / "last.pt.prev").exists()
    assert not (tmp_path / "last.pt.tmp").exists()


def test_truncated_latest_falls_back_to_previous(tmp_path: Path, caplog) -> None:
    p = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, p)
    save_atomic({"epoch": 2}, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    state, used = load_latest(p)
    assert state["epoch"] == 1 and used.name == "last.pt.prev"
    assert "unreadable" in caplog.text


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "last.pt"
    save_atomic({"epoch": 1}, p)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="previous checkpoint is kept"):
        save_atomic({"epoch": 2}, p)
    monkeypatch.undo()
    state, used = load_latest(p)
    assert used == p and state["epoch"] == 1
    assert not (tmp_path / "last.pt.tmp").exists()


def test_nothing_to_load_and_all_corrupt(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "last.pt") is None
    (tmp_path / "last.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest(tmp_path / "last.pt")


def test_code_carrying_pickle_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    with pytest.raises(CheckpointError):
        load_latest(p)
    assert not (tmp_path / "pwned").exists()


def test_flipped_bits_that_still_load_are_detected(tmp_path: Path, caplog) -> None:
    """A bit flip inside tensor data keeps the file loadable; the stored sha256 catches it."""
    p = tmp_path / "last.pt"
    save_atomic({"epoch": 1, "w": torch.zeros(1000)}, p)
    save_atomic({"epoch": 2, "w": torch.ones(1000)}, p)
    data = bytearray(p.read_bytes())
    marker = torch.ones(1000).numpy().tobytes()[:16]
    at = bytes(data).find(marker)
    assert at > 0
    data[at + 3] ^= 0x01
    p.write_bytes(bytes(data))
    assert torch.load(p, weights_only=True)["epoch"] == 2  # still loads
    state, used = load_latest(p)
    assert state["epoch"] == 1 and used.name == "last.pt.prev"
    assert "sha256" in caplog.text
    assert "integrity_sha256" not in state
