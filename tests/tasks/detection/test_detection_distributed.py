"""Detection under torchrun (docs/distributed.md, "Detection under torchrun").

(a) The loader's rank shards: for every epoch the 2 ranks' batches are disjoint, of half the
    global batch each, and step ``k``'s batches of both ranks together are exactly the
    single-process batch ``k`` (images and flips); evaluation blocks cover the split once.
(b) 2 gloo processes evaluate a fixed "detector" (boxes read off the coloured rectangles, so
    AP is far from 0) with :meth:`DetectionTask.evaluate`: the metrics gathered on rank 0, and
    returned on both ranks, equal the one-process evaluation's, and rank 0 holds all detections.
(c) One 2-process gloo ``torchrun ... kdlab train`` of the tiny detector (3 steps): it
    completes, rank 0 alone writes the run, and the COCO metrics it recorded equal a
    one-process evaluation of the saved weights (the tiny detector scores about 0 after 3
    steps, so this part checks the plumbing, (b) the numbers).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.core.errors import ConfigError, DatasetError
from kdlab.tasks.detection.coco import CocoDetection
from kdlab.tasks.detection.data import DetectionLoader

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def _split(root: Path, name: str) -> CocoDetection:
    return CocoDetection(root / name, root / "annotations" / f"instances_{name}.json")


def _plan(loader: DetectionLoader, epoch: int) -> list[list[tuple[int, bool]]]:
    """The epoch's batches as ``[(dataset index, flip)]`` (what ``__iter__`` yields from)."""
    loader.set_epoch(epoch)
    batches, flips = loader._plan()
    return [list(zip(b, f, strict=True)) for b, f in zip(batches, flips, strict=True)]


def test_rank_shards_are_disjoint_and_together_the_single_process_epoch(coco_root: Path
                                                                        ) -> None:
    train = _split(coco_root, "train")  # 12 images
    cpu = torch.device("cpu")
    single = DetectionLoader(train, 4, cpu, train=True, seed=5)
    ranks = [DetectionLoader(train, 2, cpu, train=True, seed=5, rank=r, world_size=2)
             for r in range(2)]
    assert len(single) == 3 and [len(x) for x in ranks] == [3, 3]
    for epoch in (1, 2):
        whole = _plan(single, epoch)
        shards = [_plan(x, epoch) for x in ranks]
        seen = [i for shard in shards for batch in shard for i, _ in batch]
        assert len(seen) == len(set(seen)) == 12  # disjoint, and nothing dropped
        for k, batch in enumerate(whole):  # step k of both ranks = single-process step k
            assert shards[0][k] + shards[1][k] == batch
    # the flips differ between epochs (so the equality above is not vacuous)
    assert _plan(single, 1) != _plan(single, 2)
    # the batches themselves (decoded images, flipped boxes) match too
    single.set_epoch(2)
    for loader in ranks:
        loader.set_epoch(2)
    pairs = zip(single, *ranks, strict=True)
    for whole_b, b0, b1 in pairs:
        assert whole_b.image_ids == b0.image_ids + b1.image_ids
        for a, b in zip(whole_b.targets, b0.targets + b1.targets, strict=True):
            assert torch.equal(a["boxes"], b["boxes"])


def test_evaluation_blocks_cover_the_split_once_in_order(coco_root: Path) -> None:
    test = _split(coco_root, "test")  # 6 images
    cpu = torch.device("cpu")
    ids = [[i for b in DetectionLoader(test, 2, cpu, train=False, rank=r, world_size=4)
            for i in b.image_ids] for r in range(4)]
    whole = [i for b in DetectionLoader(test, 2, cpu, train=False) for i in b.image_ids]
    assert [len(x) for x in ids] == [1, 2, 1, 2]
    assert [i for x in ids for i in x] == whole


def test_global_batch_must_divide_and_rank_must_exist(coco_root: Path, det_cfg: Any) -> None:
    from kdlab.config import DataConfig
    from kdlab.tasks.detection.data import build_detection_data

    cfg = DataConfig(name="coco", root=str(coco_root), batch_size=5)
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        build_detection_data(cfg, det_cfg, seed=0, device=torch.device("cpu"), rank=0,
                             world_size=2)
    with pytest.raises(DatasetError, match="rank"):
        DetectionLoader(_split(coco_root, "test"), 2, torch.device("cpu"), train=False, rank=2,
                        world_size=2)


class ColourBoxes(torch.nn.Module):
    """A fixed "detector" for the tiny set: per colour channel, the bounding box of the pixels
    brighter than 0.7 in it and darker than 0.5 in the others, label = channel + 1."""

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for im in images:
            boxes, scores, labels = [], [], []
            for c in range(3):
                others = [o for o in range(3) if o != c]
                mask = (im[c] > 0.7) & (im[others].max(dim=0).values < 0.5)
                if mask.any():
                    ys, xs = mask.nonzero(as_tuple=True)
                    boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1,
                                              ys.max() + 1]).float())
                    scores.append(mask.float().mean() * 10)
                    labels.append(c + 1)
            out.append({"boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4),
                        "scores": torch.stack(scores) if scores else torch.zeros(0),
                        "labels": torch.tensor(labels, dtype=torch.long)})
        return out


WORKER = """
import json, sys
import torch
sys.path.insert(0, sys.argv[3])
from test_detection_distributed import ColourBoxes, _split
from kdlab.core.distributed import init_distributed, shutdown
from kdlab.tasks.detection.data import DetectionLoader
from kdlab.tasks.detection.task import DetectionTask
info = init_distributed("cpu")
loader = DetectionLoader(_split(__import__("pathlib").Path(sys.argv[1]), "test"), 2,
                         torch.device("cpu"), train=False, rank=info.rank,
                         world_size=info.world_size)
task = DetectionTask()
metrics = task.evaluate(ColourBoxes(), loader, torch.device("cpu"), None, info)
with open(f"{sys.argv[2]}.{info.rank}.json", "w") as f:
    json.dump({"metrics": metrics, "detections": task.last_detections}, f)
shutdown(info)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_two_rank_coco_metrics_equal_one_process_metrics(tmp_path: Path, coco_root: Path
                                                          ) -> None:
    from kdlab.tasks.detection.task import DetectionTask

    test = DetectionLoader(_split(coco_root, "test"), 2, torch.device("cpu"), train=False)
    task = DetectionTask()
    single = task.evaluate(ColourBoxes(), test, torch.device("cpu"), None)
    assert single["AP50"] > 50  # a real score (the equality below is not about zeros)

    out = tmp_path / "eval"
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(coco_root), str(out),
                               str(Path(__file__).parent)],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # both ranks return rank 0's numbers
        got = {k: v for k, v in r["metrics"].items()}
        assert got.keys() == single.keys()
        for name, want in single.items():
            assert (math.isnan(got[name]) and math.isnan(want)) or got[name] == want, name
    # rank 0 holds every rank's detections, in the single-process order
    assert ranks[0]["detections"] == task.last_detections
    # rank 1 keeps its own: the detections of its block (the last 3 images), a tail of them
    own = ranks[1]["detections"]
    assert 0 < len(own) < len(task.last_detections)
    assert own == task.last_detections[-len(own):]
    assert {d["image_id"] for d in own} == {s.image_id for s in
                                            (test.dataset[i] for i in range(3, 6))}


@pytest.mark.e2e
def test_two_rank_training_gathers_coco_metrics_equal_to_one_process(
        tmp_path: Path, coco_root: Path, run_config: Any, write_yaml: Any,
        det_cfg: Any) -> None:
    from kdlab.tasks.detection.model import build_detector
    from kdlab.tasks.detection.task import DetectionTask

    # global batch 4 (2 per rank, 3 steps); eval batch 3 per rank, so both ranks' blocks are
    # exactly the one-process evaluation's two batches (equal inputs, bit-equal detections)
    cfg = write_yaml(tmp_path / "c.yaml", run_config(coco_root, name="ddp-det"))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "-m", "kdlab", "-q", "train", str(cfg), "--run-dir", str(run), "--no-progress"],
        env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]  # one line: only rank 0 wrote
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert records[0]["train_img_per_s"] > 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert len(ckpt["ranks"]) == 2  # every rank's RNG streams travel with the checkpoint

    model = build_detector("MobileNetV2_imagenet", 3, det_cfg)
    model.load_state_dict(ckpt["model"])
    test = DetectionLoader(_split(coco_root, "test"), 3, torch.device("cpu"), train=False)
    task = DetectionTask()
    single = task.evaluate(model, test, torch.device("cpu"), None)
    assert task.last_detections
    for name in METRICS:
        got, want = records[0][f"test_{name}"], single[name]
        assert (math.isnan(got) and math.isnan(want)) or got == want, name
