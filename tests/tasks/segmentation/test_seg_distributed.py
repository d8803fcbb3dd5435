"""Segmentation under torchrun: 2 gloo ranks (forked, as tests/engine/test_methods_distributed.py)
against one process on the same synthetic set.

(a) Each rank's training loader takes a disjoint share of every global batch of an epoch, the
    union being the one-process epoch, with the same seeded crops.
(b) Evaluation: every rank scores its block of the test split; the confusion matrices summed
    over the ranks equal the one-process matrix, so every rank reports the one-process mIoU.
(c) Two training steps (SGD with momentum) of 2 ranks with per-rank batch b, the student and
    the method's helpers in DDP as the trainer wraps them, make the same parameter update as one
    process with batch 2b (to 1e-5), for DKD + FitNet (the study row) and CWD on feature maps
    with its learnable projection. BatchNorm and dropout run in eval mode (per-rank batch
    statistics and dropout masks differ by design). The crops are rescaled by 0.5-1 and padded
    with ignored pixels, so the ranks' labelled-pixel counts differ: the task's gradient share
    (``SegmentationTask.pixel_share``) is what makes the per-rank pixel means average to the
    global mean (docs/segmentation.md, "Under torchrun"; without it the update differs by
    ~1e-3 here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from kdlab.config import DataConfig, MethodConfig, OptimConfig, SegmentationConfig
from kdlab.core.distributed import DistInfo
from kdlab.engine.build import build_optimizer, trainable_parameters
from kdlab.methods.base import total_loss
from kdlab.methods.compose import build_method
from kdlab.tasks.segmentation.data import SegmentationData
from kdlab.tasks.segmentation.evaluation import evaluate_segmentation
from kdlab.tasks.segmentation.model import build_segmenter
from kdlab.tasks.segmentation.task import SegmentationTask, scale_grad

WORLD, GLOBAL_BATCH, STEPS, SEED = 2, 4, 2, 3
#: crops of the canvas size from canvases shrunk by 0.5-1: padded with ignored pixels
SEG = SegmentationConfig(head="fcn", aux_head=True, crop_size=32, base_size=32,
                         scale_range=(0.5, 1.0))
CASES: dict[str, dict[str, Any]] = {
    "dkd_fitnet": {"name": "dkd", "params": {"beta": 0.25, "temperature": 1.0,
                                             "warmup_epochs": 0},
                   "partners": [{"name": "fitnet"}]},
    "cwd_feature_map": {"name": "cwd", "params": {"maps": "feature_map"}},
}


def _data(root: str, rank: int, world: int) -> tuple[SegmentationTask, SegmentationData]:
    """The task and its data for ``rank`` of ``world`` processes, as the trainer builds them."""
    task = SegmentationTask()
    task.seg = SEG
    cfg = DataConfig(name="fm_segmentation", root=root, batch_size=GLOBAL_BATCH,
                     eval_batch_size=2, num_workers=0)
    data = task.build_data(cfg, seed=SEED, device=torch.device("cpu"), channels_last=False,
                           rank=rank, world_size=world)
    return task, data


def _freeze_statistics(module: nn.Module) -> None:
    """BatchNorm on its running statistics and dropout off (the module stays in training)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout):
            m.eval()


def _train(case: str, task: SegmentationTask, data: SegmentationData, world: int) -> Tensor:
    """Two steps of ``case`` on this process's batches; the trained parameters (student, then
    the method's helpers) flattened."""
    torch.manual_seed(0)
    student, teacher = build_segmenter("resnet8", 11, SEG), build_segmenter("resnet8x4", 11, SEG)
    teacher.eval().requires_grad_(False)
    distiller = build_method(MethodConfig.model_validate(CASES[case]),
                             task.distill_context(student, teacher, data))
    _freeze_statistics(student)
    _freeze_statistics(distiller)
    params = trainable_parameters(student, distiller)
    opt = build_optimizer(OptimConfig(lr=0.05), params, 0.05)
    student_fwd: nn.Module = student
    distiller_fwd: nn.Module = distiller
    if world > 1:  # as Trainer._wrap_for_speed
        student_fwd = DistributedDataParallel(student)
        distiller_fwd = DistributedDataParallel(distiller, broadcast_buffers=False)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = data.train_loader
    loader.set_epoch(1)
    for step, batch in zip(range(STEPS), loader, strict=False):
        out_s, out_t = task.forward(student_fwd, teacher, batch)
        terms = {**task.task_terms(out_s),
                 **distiller_fwd(*task.distill_inputs(out_s, out_t, batch), step + 1)}
        opt.optimizer.zero_grad(set_to_none=True)
        opt.backward(terms, total_loss(terms), scaler)
        scaler.step(opt.optimizer)
        scaler.update()
    return torch.cat([p.detach().flatten() for p in params])


def _results(root: str, rank: int, world: int, info: DistInfo | None) -> dict[str, Any]:
    """Everything one process reports: its epoch plans and first batch, its evaluation, and
    the trained parameters of every case."""
    task, data = _data(root, rank, world)
    plans = {}
    for epoch in (1, 2):
        data.train_loader.set_epoch(epoch)
        plans[epoch] = data.train_loader.plan()
    data.train_loader.set_epoch(1)
    first = next(iter(data.train_loader))
    torch.manual_seed(5)
    model = build_segmenter("resnet8", 11, SegmentationConfig(head="fcn"))
    scores, conf = evaluate_segmentation(model, data.test_loader, torch.device("cpu"), SEG, 11,
                                         dist=info)
    out = {"plans": plans, "first": (first.images, first.labels, first.index),
           "scores": scores, "conf": conf}
    for case in CASES:
        out[case] = _train(case, task, data, world)
    return out


def _rank(rank: int, root: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank,
                            world_size=WORLD)
    try:
        torch.save(_results(root, rank, WORLD, DistInfo(rank=rank, world_size=WORLD)),
                   f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(fm_root: Path, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One process's results and each of the 2 ranks'."""
    folder = tmp_path_factory.mktemp("seg_ddp")
    single = _results(str(fm_root), 0, 1, None)
    mp.start_processes(_rank, args=(str(fm_root), str(folder)), nprocs=WORLD,
                       start_method="fork")
    return single, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.e2e
def test_each_rank_gets_a_disjoint_seeded_share_of_every_epoch(runs: Any, fm_root: Path) -> None:
    single, ranks = runs
    per = GLOBAL_BATCH // WORLD
    for epoch in (1, 2):
        whole = single["plans"][epoch]
        shares = [r["plans"][epoch] for r in ranks]
        assert all(len(s) == len(whole) for s in shares)  # the same number of steps
        for step, batch in enumerate(whole):
            parts = [s[step] for s in shares]
            assert all(len(p) == per for p in parts)
            assert not set(parts[0]) & set(parts[1])           # disjoint
            assert parts[0] + parts[1] == batch                # together: the global batch
    assert single["plans"][1] != single["plans"][2]            # reshuffled every epoch
    again = _data(str(fm_root), 1, WORLD)[1].train_loader
    again.set_epoch(2)
    assert again.plan() == ranks[1]["plans"][2]                # seeded: reproducible
    # the same crops: rank r's first batch is its slice of the one-process batch
    for r, res in enumerate(ranks):
        sl = slice(r * per, (r + 1) * per)
        for got, want in zip(res["first"], single["first"], strict=True):
            assert torch.equal(got, want[sl])


@pytest.mark.e2e
def test_summed_confusion_matrices_give_the_one_process_miou(runs: Any) -> None:
    single, ranks = runs
    assert int(single["conf"].sum()) == 6 * 32 * 32                 # every test pixel scored
    assert int((single["conf"].sum(dim=0) > 0).sum()) > 1            # not one constant class
    for res in ranks:
        assert torch.equal(res["conf"], single["conf"])  # all-reduced: the global matrix
        assert res["scores"]["mIoU"] == pytest.approx(single["scores"]["mIoU"], abs=1e-9)
        assert res["scores"]["count"] == single["scores"]["count"] == 6


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_on_the_global_batch(runs: Any, case: str) -> None:
    single, ranks = runs
    labelled = [int((r["first"][1] != 255).sum()) for r in ranks]
    assert labelled[0] != labelled[1]  # the ranks' pixel means have different denominators
    for res in ranks:
        assert res[case].shape == single[case].shape
        torch.testing.assert_close(res[case], single[case], rtol=0, atol=1e-5)
    torch.manual_seed(0)
    start = build_segmenter("resnet8", 11, SEG)
    n = sum(p.numel() for p in start.parameters())
    moved = single[case][:n] - torch.cat([p.detach().flatten() for p in start.parameters()])
    assert moved.abs().max() > 1e-4  # the update is not trivially zero


def test_scale_grad_is_the_identity_with_a_scaled_gradient() -> None:
    x = torch.randn(5, 3, requires_grad=True)
    y = scale_grad(x, torch.tensor(0.25))
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.equal(x.grad, 0.25 * torch.arange(3.0).expand(5, 3))  # type: ignore[arg-type]
    assert scale_grad(x, None) is x
    assert SegmentationTask().pixel_share(torch.zeros(2, 4, 4)) is None  # one process: no share
