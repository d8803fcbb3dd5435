"""Multi-process training with torch.distributed (torchrun + DistributedDataParallel).

``torchrun --nproc_per_node=N -m kdlab distill CONFIG`` (and multi-node with torchrun's usual
rendezvous flags) sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; kdlab then joins the process
group (NCCL on GPUs, gloo on CPUs), shards the data by rank, wraps the student (and trainable
helper modules) in DDP, reduces metrics across ranks, and lets only rank 0 write logs and
checkpoints. ``data.batch_size`` is the GLOBAL batch (the protocols' "batch 512 total"); each
rank processes ``batch_size / world_size`` samples per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdlab.core.errors import ConfigError

__all__ = [
    "DistInfo", "all_reduce_sum", "barrier", "broadcast_object", "init_distributed",
    "launched_with_torchrun", "per_rank_batch", "shutdown", "split_batch",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_with_torchrun() -> bool:
    """True when the environment of a torchrun worker is present with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_name: str) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for a single process.

    The backend is NCCL when the run uses CUDA, gloo otherwise.
    """
    if not launched_with_torchrun():
        return DistInfo()
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def split_batch(global_batch: int, world_size: int, key: str = "data.batch_size") -> int:
    """The per-rank batch of a global batch split over ``world_size`` processes.

    It must divide evenly, so that the ranks' batches of one step together are exactly the
    single-process batch; otherwise a :class:`ConfigError` naming config key ``key``.
    """
    if global_batch % world_size:
        raise ConfigError(f"config key {key!r}: the global batch {global_batch} must be a "
                          f"multiple of the number of processes ({world_size})")
    return global_batch // world_size


def per_rank_batch(global_batch: int, info: DistInfo, key: str = "data.batch_size") -> int:
    """The per-rank batch of ``global_batch`` for the ranks of ``info`` (:func:`split_batch`)."""
    return split_batch(global_batch, info.world_size, key)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity for a single process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for a single process)."""
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
