"""Aspect-ratio grouping of the detection training batches
(``detection.aspect_ratio_group_factor``): the groups' edges, one group per global batch (but
for the pooled leftovers at the end), every image at most once per epoch with the ungrouped
epoch's batch count, determinism per ``(seed, epoch)`` and mid-epoch resume, disjoint rank
shares that together are the single-process batches.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from kdlab.config import DataConfig, DetectionConfig
from kdlab.core.errors import ConfigError
from kdlab.tasks.detection.coco import CocoDetection, CocoImage, write_coco_split
from kdlab.tasks.detection.data import (
    DetectionLoader,
    aspect_ratio_groups,
    build_detection_data,
    group_global_batches,
)

CPU = torch.device("cpu")
#: (height, width) of the images, and their groups for factor 3 (edges log2 w/h = j/3,
#: j = -3..3, counted by hand: ratio 1 -> 4 edges <= 0, 1.5 -> 0.58 >= 1/3 -> 5, 2 and 3 -> 7,
#: 2/3 -> -0.58 -> 2, 1/2 -> -1 -> 1)
SIZES = [(16, 16), (16, 24), (16, 32), (16, 48), (24, 16), (32, 16)]
GROUPS_K3 = [4, 5, 7, 7, 2, 1]
N_TRAIN = 37


@pytest.fixture(scope="module")
def ratio_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split of ``N_TRAIN`` small images of the six ``SIZES`` in uneven numbers (one box each),
    and a 4-image test split."""
    root = tmp_path_factory.mktemp("ratios")
    rng = np.random.default_rng(0)
    cats = [{"id": 1, "name": "thing"}]
    for split, n in (("train", N_TRAIN), ("test", 4)):
        kinds = rng.choice(len(SIZES), size=n, p=[0.3, 0.1, 0.25, 0.05, 0.2, 0.1])
        images = [CocoImage(f"{split}{i:03d}.png",
                            rng.integers(0, 255, size=(*SIZES[k], 3), dtype=np.uint8),
                            np.array([[2.0, 3.0, 10.0, 12.0]]), [1])
                  for i, k in enumerate(kinds)]
        write_coco_split(root, split, images, cats)
    return root


def _train(root: Path) -> CocoDetection:
    return CocoDetection.from_split(root, "train")


def _loader(root: Path, batch: int, *, factor: int = 3, seed: int = 7, rank: int = 0,
            world_size: int = 1) -> DetectionLoader:
    return DetectionLoader(_train(root), batch, CPU, train=True, seed=seed, rank=rank,
                           world_size=world_size, aspect_ratio_group_factor=factor)


def _plan(loader: DetectionLoader, epoch: int) -> list[list[tuple[int, bool]]]:
    loader.set_epoch(epoch)
    batches, flips = loader._plan()
    return [list(zip(b, f, strict=True)) for b, f in zip(batches, flips, strict=True)]


def test_group_edges_by_hand() -> None:
    assert aspect_ratio_groups(SIZES, 3) == GROUPS_K3
    # extremes fall in the open groups on either side; k = 1: edges -1, 0, 1
    assert aspect_ratio_groups([(10, 100), (100, 10), (10, 10), (10, 15)], 3) == [7, 0, 4, 5]
    assert aspect_ratio_groups([(10, 100), (100, 10), (10, 10), (10, 15), (15, 10)], 1) == \
        [3, 0, 2, 2, 1]
    # k = 0: portrait apart from square and landscape
    assert aspect_ratio_groups([(20, 10), (10, 10), (10, 20)], 0) == [0, 1, 1]
    with pytest.raises(ConfigError, match="aspect_ratio_group_factor"):
        aspect_ratio_groups(SIZES, -1)


def test_group_global_batches_by_hand_and_invariants() -> None:
    groups = [0, 1, 0, 1, 0, 1, 0, 0]
    assert group_global_batches(range(8), groups, 2, [1, 0]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert group_global_batches(range(8), groups, 3, [0, 1]) == [[0, 2, 4], [1, 3, 5]]
    g = torch.Generator().manual_seed(0)
    for size in (1, 3, 5, 8):
        n = 50
        order = torch.randperm(n, generator=g).tolist()
        labels = torch.randint(0, 4, (n,), generator=g).tolist()
        batches = group_global_batches(order, labels, size, [2, 0, 3, 1])
        flat = [i for b in batches for i in b]
        assert len(batches) == n // size and all(len(b) == size for b in batches)
        assert len(flat) == len(set(flat)) == n - n % size
        full = sum(c // size for c in Counter(labels).values())  # one-group batches
        assert all(len({labels[i] for i in b}) == 1 for b in batches[:full])


def test_every_batch_but_the_leftovers_is_one_group_and_images_appear_once(
        ratio_root: Path) -> None:
    loader = _loader(ratio_root, 4)
    groups = aspect_ratio_groups(_train(ratio_root).sizes, 3)
    assert loader.groups == groups and set(groups) == {1, 2, 4, 5, 7}
    counts = Counter(groups)
    full = sum(c // 4 for c in counts.values())
    assert len(loader) == N_TRAIN // 4 == 9  # as without grouping
    for epoch in (1, 2, 3):
        plan = _plan(loader, epoch)
        seen = [i for b in plan for i, _ in b]
        assert len(plan) == 9 and len(seen) == len(set(seen)) == 36
        assert all(len({groups[i] for i, _ in b}) == 1 for b in plan[:full])
    # the one-group batches are not all of one group, and the decoded images of a batch are of
    # one group (the detector pads less)
    assert len({groups[b[0][0]] for b in _plan(loader, 1)[:full]}) > 1
    loader.set_epoch(2)
    for batch in list(loader)[:full]:
        shapes = [(int(img.shape[1]), int(img.shape[2])) for img in batch.images]
        assert len(set(aspect_ratio_groups(shapes, 3))) == 1


def test_seeded_per_epoch_and_resumed_mid_epoch(ratio_root: Path) -> None:
    a, b = _loader(ratio_root, 4), _loader(ratio_root, 4)
    assert _plan(a, 2) == _plan(b, 2)
    assert _plan(a, 1) != _plan(a, 2)
    assert _plan(a, 1) != _plan(_loader(ratio_root, 4, seed=8), 1)
    # the flips are the ungrouped epoch's, image by image
    off = _plan(_loader(ratio_root, 4, factor=-1), 2)
    flip_off = dict(pair for batch in off for pair in batch)
    assert all(flip_off.get(i, f) == f for batch in _plan(a, 2) for i, f in batch)
    assert any(f for batch in _plan(a, 2) for _, f in batch)
    # a resume at batch 5 yields the rest of the epoch
    a.set_epoch(2)
    whole = [batch.image_ids for batch in a]
    b.set_epoch(2, start_batch=5)
    assert [batch.image_ids for batch in b] == whole[5:]


def test_ranks_take_disjoint_slices_of_the_single_process_batches(ratio_root: Path) -> None:
    single = _loader(ratio_root, 6)
    ranks = [_loader(ratio_root, 3, rank=r, world_size=2) for r in range(2)]
    assert len(single) == 6 and [len(x) for x in ranks] == [6, 6]
    for epoch in (1, 4):
        whole = _plan(single, epoch)
        shards = [_plan(x, epoch) for x in ranks]
        seen = [i for shard in shards for batch in shard for i, _ in batch]
        assert len(seen) == len(set(seen)) == 36
        for k, batch in enumerate(whole):
            assert shards[0][k] + shards[1][k] == batch


def test_one_group_is_the_ungrouped_plan(coco_root: Path) -> None:
    """All images square (the tiny set): one group, so the grouped epoch is the ungrouped one."""
    split = CocoDetection.from_split(coco_root, "train")
    on = DetectionLoader(split, 4, CPU, train=True, seed=3, aspect_ratio_group_factor=3)
    off = DetectionLoader(split, 4, CPU, train=True, seed=3)
    assert set(on.groups or []) == {4} and off.groups is None
    for epoch in (1, 2):
        assert _plan(on, epoch) == _plan(off, epoch)


def test_the_config_key_reaches_the_training_loader_only(ratio_root: Path) -> None:
    assert DetectionConfig().aspect_ratio_group_factor == -1
    with pytest.raises(ValidationError):
        DetectionConfig(aspect_ratio_group_factor=-2)
    det = DetectionConfig(train_split="train", test_split="test", aspect_ratio_group_factor=3)
    data = build_detection_data(DataConfig(name="coco", root=str(ratio_root), batch_size=4),
                                det, seed=0, device=CPU)
    assert data.train_loader.groups == aspect_ratio_groups(_train(ratio_root).sizes, 3)
    assert data.test_loader.groups is None
    off = build_detection_data(DataConfig(name="coco", root=str(ratio_root), batch_size=4),
                               DetectionConfig(train_split="train", test_split="test"), seed=0,
                               device=CPU)
    assert off.train_loader.groups is None
