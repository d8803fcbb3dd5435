"""Step checkpoints under torchrun (docs/distributed.md, "Step checkpoints and pre-emption").

Two gloo processes train a tiny classifier (4 steps per epoch, 2 epochs). Each step every rank
also draws ``rank + 1`` numbers from torch's global RNG, so the two ranks' streams differ and
only per-rank RNG state can resume them exactly. The job runs under
``KDLAB_AUTO_RESUME=1 torchrun --nproc_per_node=2 --standalone --max-restarts=1``: SIGTERM to
rank 1 alone after the 6th step stops BOTH ranks at that step boundary with one step checkpoint
holding every rank's RNG streams and meter sums; torchrun restarts the workers with the same
command line, they continue from that checkpoint (no ``--resume``), and the job ends bit for
bit where an uninterrupted 2-rank run ends: weights, epoch records (loss sums of both ranks)
and each rank's RNG stream. At the restart, rank 0 snapshots the run folder (to check what the
stop left, and that one process refuses to continue a 2-process epoch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from kdlab.engine.trainer import AUTO_RESUME_ENV, auto_resume_mode

CONFIG: dict[str, Any] = {
    "name": "ddp-steps",
    "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
             "synthetic": {"n_train": 32, "n_test": 16, "num_classes": 4}},
    "student": {"arch": "resnet8"},
    "optim": {"epochs": 2, "milestones": [2], "lr": 0.05},
    # step checkpoints only when a stop is asked for (every 1000 steps otherwise)
    "runtime": {"threads": 1, "amp": "off", "deterministic": True, "log_every": 1,
                "checkpoint_every_steps": 1000},
}

#: one rank of the job: argv = config, run dir, global step after which rank 1 gets SIGTERM.
WORKER = """
import hashlib, os, shutil, signal, sys
import torch
from kdlab.config import load_config
from kdlab.core.errors import RunInterrupted
from kdlab.engine.trainer import Trainer

rank, kill_at = int(os.environ["RANK"]), int(sys.argv[3])
step = Trainer.step

def noisy_step(self, batch, epoch, **kw):
    out = step(self, batch, epoch, **kw)
    torch.rand(rank + 1)  # this rank's own use of the global RNG
    if rank == 1 and self.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's pre-emption of one rank
    return out

Trainer.step = noisy_step
if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and rank == 0:
    shutil.copytree(sys.argv[2], sys.argv[2] + ".at-restart")  # what the stop left
try:
    Trainer(load_config(sys.argv[1]), sys.argv[2], require_teacher=False).run()
    code = 0
except RunInterrupted:
    code = 3
digest = hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()
with open(f"{sys.argv[2]}.rng{rank}", "w") as f:
    f.write(digest)
sys.exit(code)
"""

TIMES = ("train_time_s", "train_img_per_s", "eval_time_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(cfg: Path, run: Path, kill_at: int = 0, **env: str) -> list[int]:
    """Both ranks of the job (as torchrun starts them); their exit codes."""
    base = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), **env)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(cfg), str(run), str(kill_at)],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    codes = [p.returncode for p in procs]
    if any(c not in (0, 3) for c in codes):
        raise AssertionError("\n".join(e[-2000:] for e in errors))
    return codes


def _torchrun(cfg: Path, run: Path, kill_at: int) -> None:
    """The job under torchrun with one restart allowed and auto-resume on (docs/distributed.md,
    "Step checkpoints and pre-emption")."""
    worker = run.parent / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", **{AUTO_RESUME_ENV: "1"})
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "--max-restarts=1", str(worker), str(cfg), str(run), str(kill_at)],
        env=env, timeout=150, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _records(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMES}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


@pytest.mark.e2e
def test_sigterm_to_one_rank_stops_all_and_auto_resume_is_bit_exact(tmp_path: Path) -> None:
    from kdlab.config import load_config
    from kdlab.core.errors import CheckpointError
    from kdlab.engine.trainer import Trainer

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert _launch(cfg, reference) == [0, 0]

    # SIGTERM to rank 1 after global step 6 (epoch 2, step 2): both ranks stop there, and
    # torchrun's restart continues the run from the step checkpoint
    _torchrun(cfg, run, kill_at=6)
    stopped = Path(f"{run}.at-restart")
    status = json.loads((stopped / "status.json").read_text())
    assert (status["state"], status["signal"], status["epoch"]) == ("interrupted", "SIGTERM", 1)
    step = _load(stopped / "checkpoints" / "step.pt")
    mid = step["mid_epoch"]
    assert (step["epoch"], mid["epoch"], mid["step"], mid["world_size"]) == (1, 2, 2, 2)
    assert len(mid["ranks"]) == 2
    rng = [r["rng"]["torch"] for r in mid["ranks"]]
    assert not torch.equal(rng[0], rng[1])  # the ranks' streams are their own
    assert [r["meter"]["steps"] for r in mid["ranks"]] == [2, 2]
    sums = [r["meter"]["term_sums"] for r in mid["ranks"]]
    assert not torch.equal(sums[0], sums[1])  # each rank's own half-batch losses

    # one process cannot continue a 2-process epoch: refused, the checkpoint kept
    with pytest.raises(CheckpointError, match="resume it with 2"):
        Trainer(load_config(cfg), stopped, resume="required", require_teacher=False).run()
    assert (stopped / "checkpoints" / "step.pt").exists()

    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert _records(run) == _records(reference)
    got, want = (_load(r / "checkpoints" / "last.pt")["model"] for r in (run, reference))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    for rank in range(2):
        assert (Path(f"{run}.rng{rank}").read_text()
                == Path(f"{reference}.rng{rank}").read_text())
    assert not (run / "checkpoints" / "step.pt").exists()  # superseded by the epoch's


@pytest.mark.parametrize(("resume", "env", "want"), [
    (False, {AUTO_RESUME_ENV: "1"}, True),
    (False, {AUTO_RESUME_ENV: "true"}, True),
    (False, {AUTO_RESUME_ENV: "0"}, False),
    (False, {}, False),
    ("required", {AUTO_RESUME_ENV: "1"}, "required"),
    (True, {}, True),
])
def test_auto_resume_is_opt_in(resume: Any, env: dict[str, str], want: Any) -> None:
    assert auto_resume_mode(resume, env) == want
