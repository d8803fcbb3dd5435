"""MLKD (Jin, Wang, Lin, CVPR 2023) under torchrun: the global batch's logits on every rank.

The exact check (2 gloo ranks against one process on the concatenated batch, BatchNorm-free
models, 1e-5) is in ``tests/engine/test_methods_distributed.py``; here: the gather itself (values,
rank order, the gradient every rank's copy sends back) and ``kdlab distill`` under torchrun end
to end with real (BatchNorm) models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from kdlab.core.distributed import gather_batch, group_world_size
from kdlab.methods.mlkd import global_views
from kdlab.models import create_model

WORLD, B, C = 2, 3, 5


def _local(rank: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a fixed global ``WORLD * B x C`` batch."""
    full = torch.arange(WORLD * B * C, dtype=torch.float64).view(WORLD * B, C) / 7.0
    return full[rank * B:(rank + 1) * B].clone()


def _gather_rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=WORLD)
    try:
        z = _local(rank).requires_grad_(True)
        glob = gather_batch(z, differentiable=True)
        weights = torch.arange(glob.numel(), dtype=glob.dtype).view_as(glob)
        (glob * weights).sum().backward()  # every rank: the same loss of the global batch
        zs, zt, zs2, zt2, y = global_views(z, 2 * z, 3 * z, 4 * z, torch.arange(B) + 10 * rank)
        torch.save({"glob": glob.detach(), "grad": z.grad, "world": group_world_size(),
                    "views": [zs.detach(), zt, zs2.detach(), zt2, y],
                    "plain_grad": gather_batch(z).requires_grad}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_gather_batch_concatenates_in_rank_order_and_sums_the_gradients(tmp_path: Path) -> None:
    mp.start_processes(_gather_rank, args=(str(tmp_path),), nprocs=WORLD, start_method="fork")
    full = torch.cat([_local(r) for r in range(WORLD)])
    weights = torch.arange(full.numel(), dtype=full.dtype).view_as(full)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["world"] == WORLD
        torch.testing.assert_close(got["glob"], full, rtol=0, atol=0)
        # d/dz of the loss computed on WORLD ranks: WORLD times this rank's rows of the weights
        torch.testing.assert_close(got["grad"], WORLD * weights[rank * B:(rank + 1) * B],
                                   rtol=0, atol=0)
        zs, zt, zs2, zt2, y = got["views"]
        for view, factor in ((zs, 1), (zt, 2), (zs2, 3), (zt2, 4)):
            torch.testing.assert_close(view, factor * full, rtol=0, atol=0)
        assert y.tolist() == [0, 1, 2, 10, 11, 12]
        assert got["plain_grad"] is False


def test_one_process_passes_the_tensors_through() -> None:
    z = torch.randn(4, 3, requires_grad=True)
    assert group_world_size() == 1
    assert gather_batch(z, differentiable=True) is z
    out = global_views(z, z, z, z, torch.arange(4))
    assert all(o is z for o in out[:4])


CONFIG = {
    "name": "mlkd_ddp",
    "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 32,
             "synthetic": {"n_train": 64, "n_test": 32, "num_classes": 4}},
    "student": {"arch": "vit_tiny"},  # LayerNorm: no per-rank batch statistics
    "method": {"name": "mlkd"},
    "optim": {"epochs": 1, "milestones": [1], "lr": 0.05},
    "runtime": {"threads": 1, "amp": "off", "deterministic": True, "log_every": 2},
}


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_mlkd_trains_on_the_global_batch(tmp_path: Path) -> None:
    """2 gloo ranks against one process: the same epoch (every term, the final weights) to
    float32 rounding. The student is BatchNorm-free (a ViT) and the teacher runs on its running
    statistics, so nothing depends on the split; the strong views are the same whatever the
    number of ranks (the device-resident loader's per-position draws)."""
    torch.manual_seed(0)
    teacher = tmp_path / "t.pth"
    torch.save({"model": create_model("resnet14", num_classes=4).state_dict()}, teacher)
    cfg = dict(CONFIG, teacher={"arch": "resnet14", "checkpoint": str(teacher)})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["-m", "kdlab", "-q", "distill", str(cfg_path), "--no-progress", "--run-dir"]
    subprocess.run([sys.executable, *common, str(tmp_path / "single")], check=True, env=env,
                   timeout=300)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", *common, str(tmp_path / "ddp")],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[0])
            for run in ("single", "ddp")]
    single, ddp = (r["train_terms"] for r in rows)
    assert set(single) == set(ddp) >= {"ce", "kd", "cc", "bc"}
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-4), key
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.pt", weights_only=True)["model"]
               for run in ("single", "ddp")]
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=1e-4, atol=1e-5)
