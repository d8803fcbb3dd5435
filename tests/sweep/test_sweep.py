"""`kdlab sweep`: spec validation, real tiny runs in worker processes, kill -9 and restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.cli.main import main
from kdlab.core.errors import ConfigError
from kdlab.sweep import load_spec, matrix_tag, plan_sweep, run_sweep


def write_config(folder: Path, name: str, arch: str = "resnet8", epochs: int = 2) -> Path:
    """A tiny `kdlab train` config (synthetic data, resnet8, CPU-friendly)."""
    cfg = {
        "name": name,
        "data": {"name": "synthetic", "batch_size": 8,
                 "synthetic": {"n_train": 32, "n_test": 16, "num_classes": 4, "size": 32}},
        "student": {"arch": arch},
        "method": {"name": "vanilla"},
        "optim": {"epochs": epochs, "milestones": []},
        "runtime": {"threads": 1, "amp": "off", "device": "cpu"},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_spec(folder: Path, configs: list[str], seeds: list[int], name: str = "sw",
               **extra: Any) -> Path:
    spec = {"name": name, "output_dir": str(folder / "out"), "configs": configs,
            "seeds": seeds, **extra}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def state(spec: Path, name: str = "sw") -> dict[str, Any]:
    return json.loads((spec.parent / "out" / name / "sweep.json").read_text())["runs"]


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and content of the files a finished run would change if it were redone."""
    return {n: ((run_dir / n).stat().st_mtime_ns, (run_dir / n).read_bytes())
            for n in ("metrics.jsonl", "summary.json", "status.json")}


# --------------------------------------------------------------------------- no workers
def test_spec_validation(tmp_path: Path) -> None:
    write_config(tmp_path / "cfg", "a")
    spec = write_spec(tmp_path, ["cfg/*.yaml"], [0], seed=[1])
    with pytest.raises(ConfigError, match="unknown config key 'seed'"):
        load_spec(spec)
    spec = write_spec(tmp_path, ["nope/*.yaml"], [0])
    with pytest.raises(ConfigError, match="configs.0"):
        plan_sweep(spec)
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0], overrides=["optim.bogus=1"])
    with pytest.raises(ConfigError, match="optim.bogus"):
        plan_sweep(spec)
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0, 0])
    with pytest.raises(ConfigError, match="seeds"):
        load_spec(spec)
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0], name="a/b")
    with pytest.raises(ConfigError, match="'name'"):
        load_spec(spec)
    (tmp_path / "cfg2").mkdir()
    (tmp_path / "cfg2" / "other.yaml").write_text((tmp_path / "cfg" / "a.yaml").read_text())
    spec = write_spec(tmp_path, ["cfg/a.yaml", "cfg2/other.yaml"], [0])
    with pytest.raises(ConfigError, match="distinct `name`s"):
        plan_sweep(spec)


def test_plan_matrix_threads_and_dry_run(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path / "cfg", "a")
    write_config(tmp_path / "cfg", "_base")  # glob matches starting with _ are bases
    spec = write_spec(tmp_path, ["cfg/*.yaml"], [0, 1], overrides=["optim.lr=0.1"],
                      matrix={"optim.momentum": [0.8, 0.9], "data.hflip": [False]})
    sweep = plan_sweep(spec, jobs=2)
    assert [r.id for r in sweep.runs] == [
        "a/data.hflip=false,optim.momentum=0.8/seed0",
        "a/data.hflip=false,optim.momentum=0.8/seed1",
        "a/data.hflip=false,optim.momentum=0.9/seed0",
        "a/data.hflip=false,optim.momentum=0.9/seed1",
    ]
    cmd = sweep.runs[1].command
    assert cmd[1:4] == ["-m", "kdlab", "train"] and "--resume" in cmd
    sets = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
    assert sets[0] == "optim.lr=0.1" and sets[-1] == "seed=1"
    assert "optim.momentum=0.8" in sets and "data.hflip=false" in sets
    assert sweep.threads is not None and f"runtime.threads={sweep.threads}" in sets
    assert matrix_tag({"method.params.scales": [1, 2]}) == "method.params.scales=1-2"
    # the spec sets the threads itself: no automatic value
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0], overrides=["runtime.threads=3"])
    assert plan_sweep(spec, jobs=2).threads is None
    # dry run: lists the runs, starts and writes nothing
    assert main(["sweep", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pending  a/seed0" in out and "1 of 1 run(s) would run" in out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real runs
@pytest.mark.e2e
def test_sweep_runs_then_skips(tmp_path: Path) -> None:
    write_config(tmp_path / "cfg", "a")
    write_config(tmp_path / "cfg", "b")
    spec = write_spec(tmp_path, ["cfg/*.yaml"], [0, 1])
    result = run_sweep(spec, jobs=2)
    assert result.exit_code == 0, result.states
    ids = ["a/seed0", "a/seed1", "b/seed0", "b/seed1"]
    assert sorted(result.started) == ids
    runs = state(spec)
    assert list(runs) == ids
    for run_id in ids:
        assert runs[run_id]["status"] == "finished" and runs[run_id]["attempts"] == 1
        run_dir = tmp_path / "out" / "sw" / run_id
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["seed"] == int(run_id[-1]) and summary["epochs"] == 2
    before = {i: snapshot(tmp_path / "out" / "sw" / i) for i in ids}
    again = run_sweep(spec, jobs=2)
    assert again.exit_code == 0 and again.started == []
    assert {i: snapshot(tmp_path / "out" / "sw" / i) for i in ids} == before
    assert all(v["attempts"] == 1 for v in state(spec).values())


@pytest.mark.e2e
def test_failing_worker_and_retry(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_config(tmp_path / "cfg", "good")
    write_config(tmp_path / "cfg", "bad", arch="no_such_net")
    spec = write_spec(tmp_path, ["cfg/good.yaml", "cfg/bad.yaml"], [0])
    assert main(["sweep", str(spec), "--jobs", "2", "--no-progress"]) == 1
    runs = state(spec)
    assert runs["good/seed0"]["status"] == "finished"
    bad = runs["bad/seed0"]
    assert bad["status"] == "failed" and bad["attempts"] == 1 and bad["returncode"] == 2
    assert "unknown model 'no_such_net'" in bad["error"]
    assert "no_such_net" in bad["error_tail"]
    assert "FAILED bad/seed0" in caplog.text
    good = snapshot(tmp_path / "out" / "sw" / "good" / "seed0")
    # without --retry-failed: reported and skipped
    result = run_sweep(spec, jobs=2)
    assert result.exit_code == 1 and result.started == [] and result.failed == ["bad/seed0"]
    # with it: run again (and fail again)
    assert main(["sweep", str(spec), "--jobs", "2", "--retry-failed", "--no-progress"]) == 1
    runs = state(spec)
    assert runs["bad/seed0"]["attempts"] == 2 and runs["bad/seed0"]["status"] == "failed"
    assert runs["good/seed0"]["attempts"] == 1
    assert snapshot(tmp_path / "out" / "sw" / "good" / "seed0") == good


def _wait_for(cond: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _dead(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in text or "\nState:\tX" in text


@pytest.mark.e2e
def test_sweep_survives_kill_9(tmp_path: Path) -> None:
    epochs = 8
    write_config(tmp_path / "cfg", "k", epochs=epochs)
    # one thread: several threads per tiny run are much slower on a busy machine
    spec = write_spec(tmp_path, ["cfg/k.yaml"], [0, 1], overrides=["runtime.threads=1"])
    out = tmp_path / "out" / "sw"
    first, second = out / "k" / "seed0", out / "k" / "seed1"
    with open(tmp_path / "sweep.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kdlab", "sweep", str(spec), "--jobs",
                                 "1", "--no-progress"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for(lambda: (first / "summary.json").exists()
                  and (second / "metrics.jsonl").exists()
                  and (second / "metrics.jsonl").read_text().count("\n") >= 1,
                  240, "one run finished and the next one mid-way", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (second / "summary.json").exists(), "the second run ended before the kill"
    runs = state(spec)
    assert runs["k/seed0"]["status"] == "finished" and runs["k/seed1"]["status"] == "running"
    worker = runs["k/seed1"]["pid"]
    deadline = time.monotonic() + 10
    while not _dead(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _dead(worker)
    done = snapshot(first)

    result = run_sweep(spec, jobs=1)
    assert result.exit_code == 0, result.states
    assert result.started == ["k/seed1"]
    assert snapshot(first) == done
    runs = state(spec)
    assert runs["k/seed1"]["attempts"] == 2 and runs["k/seed0"]["attempts"] == 1
    epochs_logged = [json.loads(line)["epoch"]
                     for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert epochs_logged == list(range(1, epochs + 1))
    log_text = Path(runs["k/seed1"]["log"]).read_text()
    assert "resumed" in log_text.split("=== attempt 2")[1]
