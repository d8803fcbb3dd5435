"""Run directories refuse to mix runs; metrics survive torn writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import validate_config
from kdlab.core.errors import RunError
from kdlab.runs.rundir import RunDir


def cfg(**optim):
    return validate_config({"student": {"arch": "resnet8"}, "optim": optim})


def progress(rd: RunDir) -> None:
    """Make ``rd`` look like a run that completed an epoch (a ``last.pt`` exists)."""
    rd.last_checkpoint.write_bytes(b"epoch 1")


def test_new_then_unfinished_requires_resume(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert rd.prepare(cfg(), resume=False) == "new"
    assert (rd.path / "env.json").exists() and rd.config_path.exists()
    progress(rd)
    with pytest.raises(RunError, match="--resume"):
        rd.prepare(cfg(), resume=False)
    assert rd.prepare(cfg(), resume=True) == "resume"
    assert rd.prepare(cfg(), resume="required") == "resume"


def test_different_run_is_refused(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(lr=0.05), resume=False)
    progress(rd)
    with pytest.raises(RunError, match="different run"):
        rd.prepare(cfg(lr=0.1), resume=True)


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("x")
    with pytest.raises(RunError, match="not a kdlab run"):
        RunDir(tmp_path / "run").prepare(cfg(), resume=False)


def test_metrics_torn_line_and_truncate(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(), resume=False)
    for e in (1, 2, 3):
        rd.append_metrics({"epoch": e})
    with open(rd.metrics_path, "a") as f:
        f.write('{"epoch": 4, "tru')
    assert [r["epoch"] for r in rd.read_metrics()] == [1, 2, 3]
    rd.truncate_metrics(2)
    assert [r["epoch"] for r in rd.read_metrics()] == [1, 2]


def test_paths_cannot_escape(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(), resume=False)
    with pytest.raises(RunError, match="escapes"):
        rd.write_json("../outside.json", {})
    assert not (tmp_path / "outside.json").exists()


def test_resume_does_not_adopt_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a kdlab run"):
        RunDir(tmp_path / "run").prepare(cfg(), resume=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run" / "config.yaml").exists()


# --------------------------------------------------------------------------- decide, then write
def test_inspect_writes_nothing(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    assert rd.inspect(cfg(), resume=False) == "new"
    assert not rd.path.exists()
    rd.prepare(cfg(), resume=False)
    before = sorted(p.name for p in rd.path.rglob("*"))
    assert rd.inspect(cfg(lr=0.1), resume=False) == "new"  # never completed an epoch
    assert sorted(p.name for p in rd.path.rglob("*")) == before


def test_resume_required_on_missing_or_empty_folder(tmp_path: Path) -> None:
    for path in (tmp_path / "missing", tmp_path / "empty"):
        if path.name == "empty":
            path.mkdir()
        with pytest.raises(RunError, match=r"--resume: .* holds no kdlab run; drop --resume"):
            RunDir(path).inspect(cfg(), resume="required")
    assert RunDir(tmp_path / "missing").inspect(cfg(), resume=True) == "new"  # sweeps, demo


def test_never_completed_run_starts_afresh(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.prepare(cfg(lr=0.05), resume=False)
    for name in ("status.json", "teacher.json", "method.json"):
        rd.write_json(name, {"stale": True})
    (rd.path / "checkpoints" / "best.pt").write_bytes(b"stale")
    (rd.path / "notes.txt").write_text("mine")  # not kdlab's: kept
    assert rd.prepare(cfg(lr=0.1), resume=False) == "new"
    assert rd.load_config_dict()["optim"]["lr"] == 0.1
    assert sorted(p.name for p in rd.path.iterdir()) == [
        "checkpoints", "config.yaml", "env.json", "notes.txt", "run.json"]
    assert not any((rd.path / "checkpoints").iterdir())
    # the same config again, with --resume: from epoch 1; a corrected one needs no --resume
    assert rd.prepare(cfg(lr=0.1), resume="required") == "resume"
    with pytest.raises(RunError, match="never completed an epoch: drop --resume"):
        rd.prepare(cfg(lr=0.2), resume="required")


def test_differing_keys_are_named(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    base = {"student": {"arch": "resnet8"}, "method": {"name": "dkd", "params": {"beta": 8}},
            "optim": {"lr": 0.05}}
    rd.prepare(validate_config(base), resume=False)
    progress(rd)
    other = validate_config({**base, "method": {"name": "dkd", "params": {"beta": 6}},
                             "optim": {"lr": 0.1}, "runtime": {"threads": 3}})
    with pytest.raises(RunError) as e:
        rd.prepare(other, resume=True)
    msg = str(e.value)
    assert "holds a different run (method.params.beta: 8 -> 6, optim.lr: 0.05 -> 0.1);" in msg
    assert "threads" not in msg  # not part of the fingerprint
    many = validate_config({"student": {"arch": "resnet14"}, "seed": 3, "optim": {
        "lr": 0.2, "momentum": 0.8, "weight_decay": 0.001, "gamma": 0.2}})
    with pytest.raises(RunError, match=r", and \d+ more\); choose another --run-dir") as e:
        rd.prepare(many, resume=True)
    assert "\n" not in str(e.value)


def test_extension_of_a_multistep_run(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    short, longer = cfg(epochs=4, milestones=[2]), cfg(epochs=8, milestones=[2])
    rd.prepare(short, resume=False)
    progress(rd)
    rd.write_json("summary.json", {"epochs": 4})
    assert rd.inspect(longer, resume=True) == "resume"
    assert rd.summary_path.exists()  # inspect wrote nothing
    with pytest.raises(RunError, match="pass --resume to extend it to 8 epochs"):
        rd.prepare(longer, resume=False)
    assert rd.prepare(longer, resume="required") == "resume"
    assert not rd.summary_path.exists()
    assert rd.load_config_dict()["optim"]["epochs"] == 8
    assert rd.accepted_fingerprints() == [short.fingerprint(), longer.fingerprint()]
    meta = rd.read_json("run.json")
    assert meta["fingerprint"] == longer.fingerprint()
    assert [(x["from_epochs"], x["to_epochs"]) for x in meta["extensions"]] == [(4, 8)]
    assert rd.prepare(longer, resume=True) == "resume"  # now the run's own config
    with pytest.raises(RunError, match=r"optim.epochs: 8 -> 4"):  # never shortened
        rd.prepare(short, resume=True)


def test_extension_refused_for_cosine_and_other_keys(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "cos")
    rd.prepare(cfg(epochs=4, scheduler="cosine"), resume=False)
    progress(rd)
    with pytest.raises(RunError, match="cosine schedule's past learning rates depend on "
                                       "optim.epochs"):
        rd.prepare(cfg(epochs=8, scheduler="cosine"), resume=True)
    rd = RunDir(tmp_path / "lr")
    rd.prepare(cfg(epochs=4), resume=False)
    progress(rd)
    with pytest.raises(RunError, match=r"optim.lr: 0.05 -> 0.1, optim.epochs: 4 -> 8|"
                                       r"optim.epochs: 4 -> 8, optim.lr: 0.05 -> 0.1"):
        rd.prepare(cfg(epochs=8, lr=0.1), resume=True)
    assert rd.accepted_fingerprints() == [cfg(epochs=4).fingerprint()]


# --------------------------------------------------------------------------- the lock
def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    import os
    import socket

    a, b = RunDir(tmp_path / "deep" / "run"), RunDir(tmp_path / "deep" / "run")
    a.acquire_lock(command="kdlab distill x.yaml")
    holder = a.lock_holder()
    assert holder is not None and holder["pid"] == os.getpid()
    assert holder["host"] == socket.gethostname() and holder["command"] == "kdlab distill x.yaml"
    with pytest.raises(RunError, match=rf"is in use by pid {os.getpid()} on host "
                                       rf"{socket.gethostname()} since .*; wait for it or stop it"):
        b.acquire_lock()
    a.release_lock()
    assert not (tmp_path / "deep").exists()  # the folders the lock made are gone again
    with b.locked():
        assert b.lock_path.exists()
    assert not (tmp_path / "deep").exists()


def test_lock_of_another_host_is_respected(tmp_path: Path) -> None:
    import json

    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.lock_path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0,
                                        "started_at": "2024-01-01 00:00:00"}))
    with pytest.raises(RunError, match="pid 1 on host elsewhere since 2024-01-01 00:00:00"):
        rd.acquire_lock()
    assert rd.lock_path.exists()


def test_stale_lock_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.lock_path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                        "started": 0, "started_at": "then"}))
    with rd.locked():
        assert rd.lock_holder()["pid"] != dead.pid  # type: ignore[index]
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert rd.path.is_dir() and not rd.lock_path.exists()  # it existed before: kept


def test_failed_start_is_abandoned(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "out" / "run")
    rd.acquire_lock()
    rd.prepare(cfg(), resume=False)
    rd.write_json("method.json", {})
    rd.release_lock(abandon=True)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- derived paths
@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", ".."])
def test_run_folder_stays_inside(tmp_path: Path, name: str) -> None:
    from kdlab.core.errors import ConfigError
    from kdlab.runs.rundir import run_folder

    with pytest.raises(ConfigError, match="config key 'name'"):
        run_folder(tmp_path / "runs", name, "seed0")
    assert run_folder(tmp_path / "runs", "cifar/kd", "seed0") == tmp_path / "runs/cifar/kd/seed0"
