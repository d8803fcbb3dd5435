"""A corrupt latest checkpoint and a full disk: the previous checkpoint stays usable and the run,
resumed, still ends bit-for-bit equal to the uninterrupted reference."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kdlab.runs import checkpoint as ckpt_mod
from support import one_error_line

from .conftest import assert_runs_equal, cli, load

pytestmark = pytest.mark.e2e  # damages checkpoints of real runs and resumes them


def _disk_full_sizes(line: str, run: Path) -> tuple[float, float]:
    """Checks a disk-full line (cause, path, kept checkpoint); returns (MB needed, MB free).

    Epoch 2's checkpoint holds the same tensors as epoch 1's (still in ``last.pt``), so the
    size the line gives must be about the size of that file."""
    last = run / "checkpoints" / "last.pt"
    assert f"could not write checkpoint {last}:" in line, line
    assert "No space left on device" in line and "previous checkpoint is kept" in line
    m = re.search(r"it needs about ([0-9.]+) MB, ([0-9.]+) MB free on that disk", line)
    assert m, line
    needs, free = float(m.group(1)), float(m.group(2))
    assert needs == pytest.approx(last.stat().st_size / 1e6, rel=0.05, abs=0.05), line
    return needs, free


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_last_checkpoint_falls_back_to_prev(damage: str, reference: Path, cfg_path: Path,
                                                    tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--stop-after", "2"]) == 0
    last = run / "checkpoints" / "last.pt"
    assert load(last)["epoch"] == 2 and load(last.with_name("last.pt.prev"))["epoch"] == 1
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3] if damage == "truncated" else os.urandom(4096))
    caplog.set_level("INFO", logger="kdlab")
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert "unreadable" in caplog.text and "trying the previous one" in caplog.text
    assert "from last.pt.prev at epoch 1" in caplog.text
    assert_runs_equal(reference, run)


def test_both_checkpoints_corrupt_is_a_one_line_error(cfg_path: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--stop-after", "1"]) == 0
    (run / "checkpoints" / "last.pt").write_bytes(b"\x00" * 100)
    (run / "checkpoints" / "last.pt.prev").write_bytes(b"PK\x03\x04broken")
    capsys.readouterr()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 2
    assert "no readable checkpoint" in one_error_line(capsys.readouterr().err)


def test_disk_full_during_checkpoint_keeps_previous(reference: Path, cfg_path: Path,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """ENOSPC injected into epoch 2's last.pt write (after half the bytes are on disk)."""
    run = tmp_path / "run"
    real_save = ckpt_mod.torch.save
    calls = {"n": 0}

    def full_disk(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if Path(f.name).name == "last.pt.tmp":
            calls["n"] += 1
            if calls["n"] == 2:
                f.write(b"\x00" * 1000)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    capsys.readouterr()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run)]) == 2
    line = one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    _disk_full_sizes(line, run)
    ckpts = run / "checkpoints"
    assert load(ckpts / "last.pt")["epoch"] == 1
    assert not (ckpts / "last.pt.tmp").exists()
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and status["epoch"] == 1
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)


def _mount_tmpfs(where: Path, size: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def test_real_full_disk_on_small_tmpfs(reference: Path, cfg_path: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A real ENOSPC: the run directory on a tmpfs that holds epoch 1's files but not a second
    full set; then the filesystem is enlarged and the run resumed."""
    last = (reference / "checkpoints" / "last.pt").stat().st_size
    best = (reference / "checkpoints" / "best.pt").stat().st_size
    size = (last + 2 * best + last // 2 + 64 * 1024) // 4096 * 4096
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, size):
        pytest.skip("cannot mount a tmpfs here (needs root and mount permission)")
    try:
        run = mnt / "run"
        capsys.readouterr()
        assert cli(["distill", str(cfg_path), "--run-dir", str(run)]) == 2
        line = one_error_line(capsys.readouterr().err)
        needs, free = _disk_full_sizes(line, run)
        assert free <= needs, line  # measured after the temporary file was removed
        assert load(run / "checkpoints" / "last.pt")["epoch"] == 1
        assert not (run / "checkpoints" / "last.pt.tmp").exists()
        subprocess.run(["mount", "-o", f"remount,size={8 * size}", str(mnt)], check=True,
                       timeout=20)
        assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
        assert_runs_equal(reference, run)
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=20)
