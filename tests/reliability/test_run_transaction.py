"""A run is a transaction: one process per run directory (its lock), a start that fails leaves
nothing behind, a run that never completed an epoch does not block its folder, a refusal names
what differs, a multistep run can be extended to more epochs, and derived run folders stay
inside ``output_dir``."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from kdlab.config import load_config
from kdlab.runs.rundir import RunDir
from support import one_error_line

from .conftest import assert_runs_equal, child_env, cli, run_faulty_child
from .test_non_finite import _poison

HOLDER = """
import sys
from kdlab.runs.rundir import RunDir
rd = RunDir(sys.argv[1])
rd.acquire_lock()
print("locked", flush=True)
sys.stdin.read()
rd.release_lock()
"""




# --------------------------------------------------------------------------- the lock
@pytest.mark.e2e
def test_second_process_is_refused_naming_the_holder(cfg_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Another live process holds the run directory: a second ``kdlab distill`` refuses, with
    and without ``--resume``, naming the holder's pid and host, and writes nothing."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"]):
            capsys.readouterr()
            assert cli(["distill", str(cfg_path), "--run-dir", str(run), *extra]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert (f"run directory {run} is in use by pid {holder.pid} on host "
                    f"{socket.gethostname()} since ") in line
            assert line.endswith("; wait for it or stop it")
            assert [p.name for p in run.iterdir()] == ["lock.json"]
    finally:
        holder.communicate(input="", timeout=60)
    assert holder.returncode == 0
    assert not run.exists()  # the holder made the folder and removed it again


@pytest.mark.e2e
def test_stale_lock_of_a_killed_run_is_taken_over(write_cfg: Callable[..., Path], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """``kill -9`` leaves ``lock.json`` behind; ``--resume`` takes it over with a warning
    naming the dead pid, then continues the run."""
    cfg = write_cfg(tmp_path, optim={"epochs": 1})
    run = tmp_path / "run"
    run_faulty_child("step:3", ["distill", str(cfg), "--run-dir", str(run)])
    dead = json.loads((run / "lock.json").read_text())["pid"]
    assert cli(["distill", str(cfg), "--run-dir", str(run), "--resume"]) == 0
    assert f"taking over the lock of pid {dead}, which is no longer running" in caplog.text
    assert (run / "summary.json").exists() and not (run / "lock.json").exists()


# --------------------------------------------------------------------------- --resume needs a run
def test_resume_on_a_missing_path_or_an_empty_folder(cfg_path: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    missing, empty = tmp_path / "missing" / "run", tmp_path / "empty"
    empty.mkdir()
    for run in (missing, empty):
        capsys.readouterr()
        assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"--resume: {run} holds no kdlab run; drop --resume to start it" in line
    assert not (tmp_path / "missing").exists()  # never a new run
    assert empty.is_dir() and not any(empty.iterdir())  # the user's folder is left as it was


# --------------------------------------------------------------------------- failed starts
@pytest.mark.e2e
def test_rerun_after_a_failure_in_epoch_1_needs_no_resume(reference: Path, cfg_path: Path,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped by a NaN in epoch 1 never completed an epoch: the same command again starts
    it afresh (no ``--resume``, nothing stale kept) and gives the reference run."""
    run = tmp_path / "run"
    _poison(monkeypatch, {2})
    assert cli(["distill", str(cfg_path), "--run-dir", str(run)]) == 3
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    monkeypatch.undo()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run)]) == 0
    assert_runs_equal(reference, run)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.e2e
def test_failed_start_leaves_no_run_directory(write_cfg: Callable[..., Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A start that fails before training (an unreadable teacher checkpoint) leaves no run
    folder at all; the corrected config then starts without ``--resume``."""
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"this is not a checkpoint")
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, teacher={"checkpoint": str(bad)}, output_dir=str(out),
                    optim={"epochs": 1})
    capsys.readouterr()
    assert cli(["distill", str(cfg)]) == 2
    one_error_line(capsys.readouterr().err)
    assert not out.exists()
    fixed = write_cfg(tmp_path, output_dir=str(out), optim={"epochs": 1})
    assert cli(["distill", str(fixed)]) == 0
    assert (out / "reliability" / "seed0" / "summary.json").exists()


# --------------------------------------------------------------------------- a different run
def _copy_of(reference: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    return run


@pytest.mark.e2e
def test_different_run_names_the_differing_keys(reference: Path, cfg_path: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = _copy_of(reference, tmp_path)
    capsys.readouterr()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume",
                "--set", "optim.lr=0.1", "--set", "method.params.beta=6",
                "--set", "runtime.threads=2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("holds a different run (method.params.beta: (unset) -> 6, optim.lr: 0.05 -> 0.1); "
            "choose another --run-dir or delete it") in line


def _fake_finished_run(tmp_path: Path, cfg: Path) -> Path:
    """A run directory of ``cfg`` that completed its epochs (no training needed to refuse)."""
    rd = RunDir(tmp_path / "run")
    rd.prepare(load_config(cfg), resume=False)
    rd.last_checkpoint.write_bytes(b"a checkpoint")
    rd.write_json("summary.json", {})
    return rd.path


@pytest.mark.e2e
def test_extension_of_a_multistep_run_equals_the_longer_run(
        reference: Path, cfg_path: Path, tmp_path: Path) -> None:
    """A finished 2-epoch multistep run, resumed with 4 epochs, continues to epoch 4 and equals
    the uninterrupted 4-epoch reference bit for bit."""
    run = tmp_path / "run"
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--set", "optim.epochs=2"]) == 0
    assert (run / "summary.json").exists()
    assert cli(["distill", str(cfg_path), "--run-dir", str(run), "--resume"]) == 0
    assert_runs_equal(reference, run)
    meta = json.loads((run / "run.json").read_text())
    assert len(meta["fingerprints"]) == 2 and meta["fingerprints"][-1] == meta["fingerprint"]
    assert [(e["from_epochs"], e["to_epochs"]) for e in meta["extensions"]] == [(2, 4)]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 4


def test_extension_refused_for_cosine_or_another_key(write_cfg: Callable[..., Path],
                                                     tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cosine = write_cfg(tmp_path / "cos",  # milestones back at their default: cosine reads none
                       optim={"scheduler": "cosine", "milestones": [150, 180, 210]})
    run = _fake_finished_run(tmp_path / "cos", cosine)
    capsys.readouterr()
    assert cli(["distill", str(cosine), "--run-dir", str(run), "--resume",
                "--set", "optim.epochs=8"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot be extended to 8: the cosine schedule's past learning rates depend on " \
           "optim.epochs" in line

    multistep = write_cfg(tmp_path / "ms")
    run = _fake_finished_run(tmp_path / "ms", multistep)
    assert cli(["distill", str(multistep), "--run-dir", str(run), "--resume",
                "--set", "optim.epochs=8", "--set", "optim.gamma=0.2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds a different run (optim.epochs: 4 -> 8, optim.gamma: 0.1 -> 0.2)" in line
    assert (run / "summary.json").exists()  # refused: nothing changed
    assert cli(["distill", str(multistep), "--run-dir", str(run),
                "--set", "optim.epochs=8"]) == 2
    assert "pass --resume to extend it to 8 epochs" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- paths
@pytest.mark.parametrize("name", ["../x", "/abs"])
def test_config_name_cannot_leave_output_dir(name: str, write_cfg: Callable[..., Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    cfg = write_cfg(tmp_path, output_dir=str(out))
    data = yaml.safe_load(cfg.read_text())
    data["name"] = name  # (write_cfg's own `name` is the file name)
    cfg.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    assert cli(["distill", str(cfg)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"config key 'name': {name!r} must stay inside {out}" in line
    assert not out.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["spec", "config"])
def test_sweep_names_cannot_leave_output_dir(where: str, write_cfg: Callable[..., Path],
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path)
    if where == "config":
        data = yaml.safe_load(cfg.read_text())
        data["name"] = "../escaped"
        cfg.write_text(yaml.safe_dump(data))
    spec = tmp_path / "s.sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "../x" if where == "spec" else "sw",
                                    "output_dir": str(tmp_path / "out"),
                                    "configs": [cfg.name], "seeds": [0]}))
    capsys.readouterr()
    assert cli(["sweep", str(spec), "--dry-run", "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "name" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()
