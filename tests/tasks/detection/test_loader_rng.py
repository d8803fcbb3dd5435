"""The detection loader with decoding workers: the same batches as in-process decoding, and
torch's global RNG (which the detector's RoI sampling draws from) is never touched, so a resumed
run equals an uninterrupted one whatever ``data.num_workers`` is (Reliability III)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.tasks.detection.coco import CocoDetection
from kdlab.tasks.detection.data import DetectionLoader


def _loader(root: Path, workers: int) -> DetectionLoader:
    dataset = CocoDetection(root / "train", root / "annotations" / "instances_train.json")
    loader = DetectionLoader(dataset, 2, torch.device("cpu"), train=True, seed=3,
                             num_workers=workers, cache_bytes=0)
    loader.set_epoch(2)
    return loader


def _epoch(loader: DetectionLoader) -> list[tuple[torch.Tensor, ...]]:
    out = []
    for batch in loader:
        out.append(tuple(t["boxes"] for t in batch.targets) + tuple(batch.images))
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_give_the_same_batches_and_leave_the_global_rng_alone(
        coco_root: Path, workers: int) -> None:
    reference = _epoch(_loader(coco_root, 0))
    torch.manual_seed(11)
    before = torch.get_rng_state()
    batches = _epoch(_loader(coco_root, workers))
    assert torch.equal(torch.get_rng_state(), before)
    assert len(batches) == len(reference)
    for got, want in zip(batches, reference, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
