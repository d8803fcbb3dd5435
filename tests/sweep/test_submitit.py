"""`kdlab sweep --launcher submitit` with submitit's local executor: a 2-run sweep finishes with
sweep.json as its record, and a pre-empted job is requeued and resumes its run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.core.errors import ConfigError
from kdlab.sweep import SweepJob, plan_sweep, run_sweep

pytest.importorskip("submitit")

SLURM = {"cluster": "local", "gpus_per_run": 0, "cpus_per_task": 1, "time_min": 10}


def write_config(folder: Path, name: str, epochs: int = 1, n_train: int = 32,
                 **runtime: Any) -> Path:
    """A tiny `kdlab train` config (synthetic data, resnet8, CPU)."""
    cfg = {
        "name": name,
        "data": {"name": "synthetic", "batch_size": 8,
                 "synthetic": {"n_train": n_train, "n_test": 16, "num_classes": 4, "size": 32}},
        "student": {"arch": "resnet8"},
        "method": {"name": "vanilla"},
        "optim": {"epochs": epochs, "milestones": []},
        "runtime": {"threads": 1, "amp": "off", "device": "cpu", **runtime},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_spec(folder: Path, configs: list[str], seeds: list[int], **extra: Any) -> Path:
    spec = {"name": "sw", "output_dir": str(folder / "out"), "configs": configs,
            "seeds": seeds, **extra}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submitit_needs_a_slurm_section_and_valid_keys(tmp_path: Path) -> None:
    write_config(tmp_path / "cfg", "a")
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0])
    with pytest.raises(ConfigError, match="needs a `slurm:` section"):
        plan_sweep(spec, launcher="submitit")
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0], slurm={**SLURM, "gpus": 2})
    with pytest.raises(ConfigError, match="gpus"):
        plan_sweep(spec, launcher="submitit")
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0], slurm={**SLURM, "cpus_per_task": 6,
                                                           "gpus_per_run": 2})
    sweep = plan_sweep(spec, launcher="submitit")
    assert sweep.threads == 3  # cpus_per_task shared by the run's 2 processes
    job = SweepJob(sweep.runs[0], tmp_path / "x.log", gpus=2)
    assert job.command()[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2", "-m"]


@pytest.mark.e2e
def test_submitit_local_sweep_of_two_runs(tmp_path: Path) -> None:
    write_config(tmp_path / "cfg", "a")
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0, 1], slurm=SLURM)
    result = run_sweep(spec, launcher="submitit")
    assert result.exit_code == 0, result.states
    saved = json.loads((tmp_path / "out" / "sw" / "sweep.json").read_text())["runs"]
    assert set(saved) == {"a/seed0", "a/seed1"}
    for entry in saved.values():
        assert entry["status"] == "finished" and entry["launcher"] == "submitit"
        assert entry["job_id"] and entry["returncode"] == 0
        assert (Path(entry["run_dir"]) / "summary.json").is_file()
        assert not (Path(entry["run_dir"]) / "lock.json").exists()  # the worker released it
    # a restart submits nothing: sweep.json and the run folders say both are finished
    again = run_sweep(spec, launcher="submitit")
    assert again.started == [] and again.exit_code == 0


@pytest.mark.e2e
def test_preempted_job_is_requeued_and_resumes(tmp_path: Path) -> None:
    """The job is interrupted (submitit's pre-emption signal) after its worker's first epoch:
    it is requeued, its worker resumes from last.pt, and every epoch is trained once."""
    import submitit

    write_config(tmp_path / "cfg", "a", epochs=6, n_train=384)
    spec = write_spec(tmp_path, ["cfg/a.yaml"], [0], slurm=SLURM)
    sweep = plan_sweep(spec, launcher="submitit")
    run = sweep.runs[0]
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    executor.update_parameters(timeout_min=5, gpus_per_node=0, cpus_per_task=1)
    log_path = tmp_path / "a.log"
    job = executor.submit(SweepJob(run, log_path))
    metrics = run.run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert time.monotonic() < deadline and not job.done(), log_path.read_text()
        time.sleep(0.1)
    # what SLURM's pre-emption does: USR2 to the job's task, the parent of the run's worker
    worker = json.loads((run.run_dir / "lock.json").read_text())["pid"]
    task = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
    os.kill(task, signal.SIGUSR2)
    result = job.result()
    assert result["returncode"] == 0 and result["attempt"] == 2, log_path.read_text()
    text = log_path.read_text()
    assert "requeued" in text and "--resume" in text.split("job attempt 2")[1]
    epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert (run.run_dir / "summary.json").is_file()
