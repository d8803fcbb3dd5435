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
import torch.distributed.nn.functional as dist_nn

from kdlab.core.errors import ConfigError

__all__ = [
    "DistInfo", "all_reduce_max_int", "all_reduce_sum", "barrier", "broadcast_object",
    "gather_batch", "gather_objects", "group_world_size", "init_distributed",
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
        backend = "nccl" if use_cuda else "gloo"
        store = _attempt_store(world)
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def _attempt_store(world: int) -> dist.Store | None:
    """Under a torchrun agent's store, a client of it whose keys are prefixed by the restart
    count; None otherwise (plain ``env://`` rendezvous).

    torchrun ``--max-restarts`` keeps the agent's store across restarts; the process group's
    keys (every rank's address) would then be those of the failed attempt for whichever rank
    reads them before its peer rewrote them, and the restarted group cannot connect."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                           is_master=False)
    return dist.PrefixStore(f"kdlab/attempt_{attempt}", client)


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


def gather_objects(obj: object, info: DistInfo) -> list[object] | None:
    """Every rank's ``obj`` on rank 0, in rank order; None on the other ranks.

    A collective: every rank must call it. A single process gets ``[obj]``. The objects travel
    pickled (``torch.distributed.gather_object``), so keep them to plain data and CPU tensors.
    """
    if not info.enabled:
        return [obj]
    box: list[object] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box


def all_reduce_max_int(value: int, info: DistInfo, device: torch.device | None = None) -> int:
    """The largest ``value`` over the ranks (``value`` itself for a single process).

    A collective: every rank must call it. ``device``: where the one-element tensor lives
    (a CUDA device for NCCL; default CPU, which gloo needs)."""
    if not info.enabled:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def group_world_size() -> int:
    """The number of processes of the running torch.distributed job (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_batch(t: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
    """Every rank's ``t`` concatenated along dim 0 in rank order: the global batch of a
    per-rank batch tensor (``t`` itself without a multi-process job).

    A collective: every rank must call it with the same shape (torchrun splits the global batch
    evenly, :func:`split_batch`). ``differentiable``: gather with
    ``torch.distributed.nn.functional.all_gather``, whose backward pass SUMS the gradients that
    every rank's copy of the global batch receives for this rank's rows. A loss ``L`` of the
    global batch computed identically on all ``W`` ranks then gives each rank ``W dL/dt`` for its
    own rows, and DDP's average over the ranks turns that into exactly the gradient of ``L`` on
    one process with the concatenated batch. Without it the result carries no gradient to ``t``.
    """
    world = group_world_size()
    if world == 1:
        return t
    if differentiable:
        return torch.cat(dist_nn.all_gather(t.contiguous()))
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def shutdown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
