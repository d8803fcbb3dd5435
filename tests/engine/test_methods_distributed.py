"""Every method family under torchrun: 2 gloo ranks with batch b make the same parameter update
as one process with batch 2b (to 1e-5), over two steps (momentum, memory bank and temperature
state carried from the first step into the second).

The models are BatchNorm-free (per-rank BatchNorm statistics differ by design); the ranks wrap
the student and the method's trainable helpers in DDP exactly as the trainer does, and run the
trainer's step: the task's forward (both views for MLKD), the method's terms, the optimizer's
backward (DOT: two passes) and its update.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdlab.config import MethodConfig, OptimConfig
from kdlab.data.batch import Batch
from kdlab.engine.build import build_optimizer, trainable_parameters
from kdlab.methods.base import DistillContext, total_loss
from kdlab.methods.compose import build_method
from kdlab.models.output import KdModel, ModelOutput
from kdlab.tasks.classification.task import ClassificationTask

WORLD, B, K, N, SIZE, STEPS = 2, 4, 4, 16, 8, 2

CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # family: (method config, optimizer config)
    "logit_kd": ({"name": "kd"}, {}),
    "logit_dkd": ({"name": "dkd", "params": {"warmup": 1}}, {}),
    "ctkd_temperature": ({"name": "kd", "params": {"learned_temperature": {}}}, {}),
    "dot_optimizer": ({"name": "kd"}, {"name": "dot", "args": {"delta": 0.075}}),
    "crd_memory_bank": ({"name": "kd", "partners": [{"name": "crd",
                                                     "params": {"nce_k": 4, "seed": 3}}]}, {}),
    "reviewkd": ({"name": "reviewkd"}, {}),
    "partners_fitnet_at": ({"name": "kd", "partners": [{"name": "fitnet"}, {"name": "at"}]},
                           {"lr": 0.01}),
    "partner_fitnet": ({"name": "kd", "partners": [{"name": "fitnet"}]}, {}),
    "partner_at": ({"name": "kd", "partners": [{"name": "at"}]}, {}),
    # MLKD gathers both views' logits of both models over the ranks (the global batch's masks,
    # class- and batch-level terms)
    "mlkd": ({"name": "mlkd"}, {}),
    "mlkd_code_exact": ({"name": "mlkd", "params": {"code_exact": True,
                                                    "logit_standardization": True}}, {}),
    "mlkd_dot": ({"name": "mlkd"}, {"name": "dot", "args": {"delta": 0.075}}),
}

#: families whose method modules hold BatchNorm (FitNet's regressor, ReviewKD's fusions): per-rank
#: batch statistics differ from the global batch's by design (as the student's own BN), so the
#: equality is checked with those BN layers on their running statistics (eval mode), which is
#: what SyncBatchNorm would make equal on GPUs (runtime.sync_batchnorm).
FROZEN_BN = {"reviewkd", "partners_fitnet_at", "partner_fitnet"}
#: FitNet + AT together run at lr 0.01 (every other case at 0.1): at lr 0.1 their weights (100
#: and 1000) make the two steps diverge, the parameters reach 4e4 (the stem's 4e3 from 0.3),
#: where one float32 spacing is up to 4e-3, so the 1e-5 comparison measured float32 rounding
#: (2 ranks vs 1 process: 1e-3 = one spacing at 1.1e4; 1 process float32 vs float64: 3e-2),
#: not the distribution: in float64 the 2-rank and the 1-process run agree to 4e-12 (relative
#: 4e-14), and at lr 0.01 (parameters below 2) to 3e-8 in float32 (issue 21).


class Net(KdModel):
    """Three BatchNorm-free convolution stages, pooled, a linear head."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.num_classes = 3, K
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.s1 = nn.Conv2d(width, width, 3, padding=1)
        self.s2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.classifier = nn.Linear(2 * width, K)

    def forward(self, x: Tensor) -> ModelOutput:
        a0 = self.stem(x)
        a1 = self.s1(F.relu(a0))
        a2 = self.s2(F.relu(a1))
        fmap = F.relu(a2)
        emb = fmap.mean(dim=(2, 3))
        return ModelOutput(logits=self.classifier(emb), feature_map=fmap,
                           features=[F.relu(a0), F.relu(a1), fmap], embedding=emb,
                           preact_features=[a0, a1, a2])


def data() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, SIZE, SIZE, generator=g)
    strong = torch.randn(N, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(N) % K
    return images, strong, labels


def train(case: str, rank: int, world: int) -> Tensor:
    """Two steps of ``case`` on this rank's share of each global batch; the trained parameters
    (student, then the method's helpers) flattened."""
    method, optim = CASES[case]
    torch.manual_seed(0)
    student, teacher = Net(4, seed=1), Net(8, seed=2)
    teacher.eval().requires_grad_(False)
    images, strong, labels = data()
    ctx = DistillContext.from_models(student, teacher, num_classes=K, train_labels=labels,
                                     input_size=SIZE)
    distiller = build_method(MethodConfig.model_validate(method), ctx)
    if case in FROZEN_BN:
        for m in distiller.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    params = trainable_parameters(student, distiller)
    cfg = OptimConfig.model_validate({"lr": 0.1, **optim})
    opt = build_optimizer(cfg, params, cfg.lr)
    student_fwd: nn.Module = student
    distiller_fwd: nn.Module = distiller
    if world > 1:  # as Trainer._wrap_for_speed
        student_fwd = DistributedDataParallel(student)
        if any(p.requires_grad for p in distiller.parameters()):
            distiller_fwd = DistributedDataParallel(distiller, broadcast_buffers=False)
    task = ClassificationTask()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    per = 2 * B // world
    for step in range(STEPS):
        lo = step * 2 * B + rank * per
        sl = slice(lo, lo + per)
        batch = Batch(images[sl], labels[sl], torch.arange(N)[sl])
        if case.startswith("mlkd"):
            batch = batch.with_strong(strong[sl])
        out_s, out_t = task.forward(student_fwd, teacher, batch)
        terms = {**task.task_terms(out_s),
                 **distiller_fwd(*task.distill_inputs(out_s, out_t, batch), step + 1)}
        opt.optimizer.zero_grad(set_to_none=True)
        opt.backward(terms, total_loss(terms), scaler)
        scaler.step(opt.optimizer)
        scaler.update()
    state = [p.detach().flatten() for p in params]
    if case.startswith("crd"):  # the memory bank: replicated, so equal to one process's
        state += [b.flatten() for n, b in distiller.named_buffers() if "memory" in n]
    return torch.cat(state)


def _rank(rank: int, case: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=WORLD)
    try:
        torch.save(train(case, rank, WORLD), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_on_the_global_batch(case: str, tmp_path: Path) -> None:
    single = train(case, 0, 1)
    mp.start_processes(_rank, args=(case, str(tmp_path)), nprocs=WORLD, start_method="fork")
    for rank in range(WORLD):
        ddp = torch.load(tmp_path / f"rank{rank}.pt")
        assert ddp.shape == single.shape
        torch.testing.assert_close(ddp, single, rtol=0, atol=1e-5)
    # the update is not trivially zero: the parameters moved
    torch.manual_seed(0)
    assert not torch.equal(single[:10], Net(4, seed=1).stem.weight.flatten()[:10])
