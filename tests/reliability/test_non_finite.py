"""A NaN/Inf loss stops the run naming the epoch, step and loss term, keeping the last good
checkpoint (exit code 3); ``runtime.non_finite: skip`` skips such steps up to
``max_skipped_steps``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kdlab.cli.main import main
from kdlab.core.errors import NonFiniteLossError
from kdlab.engine import trainer as trainer_mod
from support import one_error_line

from .conftest import STEPS_PER_EPOCH, cli, load

pytestmark = pytest.mark.e2e  # trains runs end to end


def _poison(monkeypatch: pytest.MonkeyPatch, calls: set[int], term: str = "crd") -> None:
    """Make loss term ``term`` NaN at the given (1-based) forward calls of the process."""
    real = trainer_mod.Trainer.forward_terms
    count = {"n": 0}

    def forward_terms(self: Any, *a: Any, **k: Any) -> Any:
        terms, logits = real(self, *a, **k)
        count["n"] += 1
        if count["n"] in calls:
            terms = dict(terms)
            terms[term] = terms[term] * float("nan")
        return terms, logits

    monkeypatch.setattr(trainer_mod.Trainer, "forward_terms", forward_terms)




def test_nan_stops_with_step_and_term_keeping_last_good(cfg_path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    run = tmp_path / "run"
    _poison(monkeypatch, {STEPS_PER_EPOCH + 3})  # epoch 2, step 3
    capsys.readouterr()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss at epoch 2, step 3 in term(s) crd;" in line
    assert "last good checkpoint (epoch 1)" in line
    ckpt = load(run / "checkpoints" / "last.pt")  # loadable, weights-only
    assert ckpt["epoch"] == 1
    assert all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())
    assert load(run / "checkpoints" / "best.pt")["epoch"] == 1
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_huge_learning_rate_stops_with_exit_code_3(write_cfg: Callable[..., Path],
                                                   tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, optim={"lr": 1e30})
    capsys.readouterr()
    assert cli(["distill", str(cfg), "--run-dir", str(tmp_path / "run")]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss at epoch 1, step" in line and "in term(s)" in line
    assert "no checkpoint was written yet" in line
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_nan_with_debug_raises(cfg_path: Path, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, {2})
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 2 in term"):
        main(["--debug", "-q", "distill", str(cfg_path), "--run-dir", str(tmp_path / "run"),
              "--no-progress"])


def test_skip_mode_counts_skipped_steps(write_cfg: Callable[..., Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_cfg(tmp_path, optim={"epochs": 2},
                    runtime={"non_finite": "skip", "max_skipped_steps": 3})
    _poison(monkeypatch, {2, STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH + 5})
    run = tmp_path / "run"
    assert cli(["distill", str(cfg), "--run-dir", str(run)]) == 0
    per_epoch = [json.loads(x)["skipped_steps"]
                 for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert per_epoch == [1, 2]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 3
    ckpt = load(run / "checkpoints" / "last.pt")
    assert ckpt["skipped_steps"] == 3
    assert all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())


def test_skip_mode_stops_after_max_skipped_steps(write_cfg: Callable[..., Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path, optim={"epochs": 2},
                    runtime={"non_finite": "skip", "max_skipped_steps": 1})
    _poison(monkeypatch, {3, STEPS_PER_EPOCH + 6}, term="sdd")
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli(["distill", str(cfg), "--run-dir", str(run)]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "non-finite loss at epoch 2, step 6 in term(s) sdd;" in line
    assert load(run / "checkpoints" / "last.pt")["epoch"] == 1
