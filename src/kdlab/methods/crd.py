"""CRD partner distiller (Tian, Krishnan & Isola, "Contrastive Representation Distillation",
ICLR 2020), with its embedding heads, memory bank and "exact" negative sampling.

Negatives are drawn on the fly from ``ctx.train_labels`` (RepDistiller's
``CIFAR100InstanceSample(mode="exact")``: the positive is the sample itself, negatives are
samples of other classes), so the data pipeline needs nothing but ``Batch.index``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdlab.core.errors import MethodError
from kdlab.losses.crd import (
    class_layout,
    contrast_scores,
    estimate_partition,
    memory_update_rows,
    nce_loss,
    sample_negatives,
)
from kdlab.methods.base import Batch, DistillContext, Distiller, MethodParams
from kdlab.methods.feature import pooled_embedding
from kdlab.methods.registry import register_method
from kdlab.models.output import ModelOutput

__all__ = ["CRD", "CRDParams", "Embed"]

_SEED_MOD = 2**62


class CRDParams(MethodParams):
    """CRD hyperparameters (defaults: RepDistiller/mdistiller CIFAR-100)."""

    weight: float = Field(0.8, ge=0, description="lambda_f (RepDistiller beta=0.8)")
    feat_dim: int = Field(128, ge=1, description="dimension of the embedding heads")
    nce_k: int = Field(16384, ge=1, description="negatives per anchor")
    nce_t: float = Field(0.07, gt=0, description="NCE temperature tau")
    nce_m: float = Field(0.5, ge=0, lt=1, description="memory-bank momentum")
    mode: Literal["exact"] = Field(
        "exact", description="positive = the sample itself, negatives from other classes"
    )
    negative_sampling: Literal["without_replacement", "with_replacement"] = Field(
        "without_replacement",
        description="distinct negatives per anchor (reference) or i.i.d. draws (cheaper for "
        "ImageNet-sized training sets)",
    )
    seed: int | None = Field(
        None, ge=0, description="seed of the negative sampler (None: drawn from torch's RNG)"
    )


class Embed(nn.Module):
    """Linear embedding head followed by L2 normalisation (CRD's ``Embed``)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), p=2.0, dim=1)


@register_method
class CRD(Distiller[CRDParams]):
    """Contrastive representation distillation on the pooled embeddings.

    Helper state: two trainable heads ``embed_s``/``embed_t`` (student / teacher embedding ->
    ``feat_dim``, L2-normalised), two persistent memory buffers ``memory_s``/``memory_t``
    (``N x feat_dim``), the normalisation constants ``z_s``/``z_t`` (persistent, -1 until set
    from the first training batch), and the sampler's seed and step counter (saved as the
    module's extra state, so a resumed run draws the same negatives).

    ``forward`` in training mode also updates the memory rows of the batch's samples (momentum
    ``nce_m``, renormalised), after the loss has been computed from the old rows; in eval mode
    the bank is left untouched.

    When sampling without replacement (the default) and the training set is too small for
    ``nce_k`` distinct negatives of other classes, ``nce_k`` is lowered to the largest feasible
    value with a warning (``self.nce_k`` holds the value used); i.i.d. sampling
    (``with_replacement``) keeps ``nce_k``.

    Under torchrun the memory bank is replicated, not sharded: every rank gathers the global
    batch's indices and embeddings, writes all of their rows, draws the negatives of the global
    batch (the same seeded draw on every rank) and keeps its own slice, and ``Z`` is estimated
    from the mean over the ranks; the banks stay identical, and a step equals the one-process
    step on the global batch.
    """

    name = "crd"
    kind = "partner"

    # buffers (registered in __init__), declared for the type checker
    memory_s: Tensor
    memory_t: Tensor
    z_s: Tensor
    z_t: Tensor
    train_labels: Tensor
    _order: Tensor
    _counts: Tensor
    _starts: Tensor

    def __init__(self, params: CRDParams, ctx: DistillContext) -> None:
        super().__init__(params, ctx)
        p = self.params
        labels = ctx.train_labels.detach().flatten().long().cpu()
        n = int(labels.numel())
        if n == 0:
            raise MethodError("crd: the training set is empty (ctx.train_labels has no labels)")
        if int(labels.min()) < 0:
            raise MethodError("crd: train_labels must be non-negative class indices")
        counts = torch.bincount(labels)
        pool = n - int(counts.max())
        if pool < 1:
            raise MethodError(
                "crd: every training sample has the same class, so 'exact' mode has no "
                "negatives; CRD needs a training set with at least two classes"
            )
        self.nce_k = p.nce_k
        if p.nce_k > pool and p.negative_sampling == "without_replacement":
            warnings.warn(
                f"crd: nce_k={p.nce_k} exceeds the {pool} samples of other classes available to "
                f"the largest class; using nce_k={pool} (set crd nce_k <= {pool} to silence "
                "this)",
                stacklevel=2,
            )
            self.nce_k = pool
        self.n_data = n

        dim_s = pooled_embedding(ctx.student_probe).shape[1]
        dim_t = pooled_embedding(ctx.require_teacher_probe(self.name)).shape[1]
        self.embed_s = Embed(dim_s, p.feat_dim)
        self.embed_t = Embed(dim_t, p.feat_dim)

        # RepDistiller's initialisation: uniform in [-s, s], s = 1/sqrt(D/3) (rows of ~unit norm).
        stdv = 1.0 / math.sqrt(p.feat_dim / 3.0)
        self.register_buffer("memory_s", torch.rand(n, p.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(n, p.feat_dim).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.register_buffer("train_labels", labels, persistent=False)
        order, cnt, starts = class_layout(labels)
        self.register_buffer("_order", order, persistent=False)
        self.register_buffer("_counts", cnt, persistent=False)
        self.register_buffer("_starts", starts, persistent=False)

        self.seed = (
            int(p.seed) if p.seed is not None else int(torch.randint(0, _SEED_MOD, (1,)).item())
        )
        self.step = 0
        self._generators: dict[str, torch.Generator] = {}

    # -- sampler state (saved in the state dict as extra state) --------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed, "step": self.step, "nce_k": self.nce_k}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict):
            return
        self.seed = int(state.get("seed", self.seed))
        self.step = int(state.get("step", self.step))

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            self._generators[key] = g
        # One deterministic stream per step: resuming at step s redraws exactly step s's batch.
        g.manual_seed((self.seed * 1_000_003 + self.step) % _SEED_MOD)
        return g

    def draw_negatives(self, index: Tensor) -> Tensor:
        """``B x nce_k`` negative indices for the samples at ``index`` (other classes only)."""
        p = self.params
        labels = self.train_labels
        anchors = labels[index.to(labels.device)]
        g = self._generator(labels.device)
        replacement = p.negative_sampling == "with_replacement"
        return sample_negatives(
            labels,
            anchors,
            self.nce_k,
            generator=g,
            replacement=replacement,
            layout=(self._order, self._counts, self._starts),
            validate=False,
        )

    # -- loss ---------------------------------------------------------------------------------

    def forward(
        self, out_s: ModelOutput, out_t: ModelOutput, batch: Batch, epoch: int
    ) -> dict[str, Tensor]:
        p = self.params
        index = batch.index.to(self.memory_s.device).long()
        e_s = self.embed_s(pooled_embedding(out_s).float())
        # The teacher's feature is frozen; its embedding head is trained by this loss.
        f_t = pooled_embedding(out_t).detach()
        if f_t.is_inference():
            f_t = f_t.clone()
        e_t = self.embed_t(f_t.float())

        world, rank = _world()
        global_index = _gather(index, world)
        neg = self.draw_negatives(global_index)  # the global batch's draw, identical on all ranks
        if world > 1:
            neg = neg[rank * index.shape[0]:(rank + 1) * index.shape[0]]
        idx = torch.cat([index.unsqueeze(1), neg], dim=1)  # positive first
        b, k1 = idx.shape
        rows_t = self.memory_t.index_select(0, idx.flatten()).view(b, k1, -1)
        rows_s = self.memory_s.index_select(0, idx.flatten()).view(b, k1, -1)
        scores_s = contrast_scores(e_s, rows_t, p.nce_t)  # student anchor vs teacher memory
        scores_t = contrast_scores(e_t, rows_s, p.nce_t)  # teacher anchor vs student memory

        # Z: fixed from the first batch (RepDistiller), kept on device (no host sync).
        with torch.no_grad():
            est_s = _mean_over_ranks(estimate_partition(scores_s, self.n_data), world)
            est_t = _mean_over_ranks(estimate_partition(scores_t, self.n_data), world)
            z_s = torch.where(self.z_s < 0, est_s, self.z_s)
            z_t = torch.where(self.z_t < 0, est_t, self.z_t)
        loss = nce_loss(scores_s / z_s, self.n_data) + nce_loss(scores_t / z_t, self.n_data)

        if self.training:
            with torch.no_grad():
                self.z_s.copy_(z_s)
                self.z_t.copy_(z_t)
                # every rank writes the global batch's rows: the bank stays replicated
                g_s = _gather(e_s.detach().float(), world)
                g_t = _gather(e_t.detach().float(), world)
                self.memory_s.index_copy_(
                    0, global_index, memory_update_rows(self.memory_s[global_index], g_s, p.nce_m)
                )
                self.memory_t.index_copy_(
                    0, global_index, memory_update_rows(self.memory_t[global_index], g_t, p.nce_m)
                )
            self.step += 1
        return {"crd": p.weight * loss}


def _world() -> tuple[int, int]:
    """``(world size, rank)`` of the running torch.distributed job, ``(1, 0)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _gather(t: Tensor, world: int) -> Tensor:
    """``t`` of every rank, concatenated in rank order (``t`` itself in one process). Every rank
    passes the same shape (torchrun splits the global batch evenly)."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _mean_over_ranks(t: Tensor, world: int) -> Tensor:
    """The mean of ``t`` over the ranks (``t`` in one process)."""
    if world == 1:
        return t
    out = t.detach().clone()
    torch.distributed.all_reduce(out)
    return out / world
