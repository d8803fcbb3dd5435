from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.core.errors import DatasetError
from kdlab.data.stream import (
    StreamDataset,
    load_stream_dataset,
    make_stream_loader,
    verify_index,
)


def _ds(root: Path, train: bool = True, on_error: str = "skip", size: int = 32) -> StreamDataset:
    return load_stream_dataset(
        "imagenet", root, train, on_error=on_error, image_size=size, resize=36
    )


def test_batches_shapes_and_normalisation(imagenet_root: Path) -> None:
    loader = make_stream_loader(_ds(imagenet_root, False), 5, train=False, num_workers=0)
    batches = list(loader)
    assert [len(b.labels) for b in batches] == [5, 5, 2]
    b = batches[0]
    assert b.images.shape == (5, 3, 32, 32) and b.images.dtype == torch.float32
    assert b.index.tolist() == [0, 1, 2, 3, 4] and b.labels.tolist() == [0, 0, 0, 0, 1]
    assert -3 < float(b.images.min()) < 0 < float(b.images.max()) < 3


def test_skip_substitutes_and_counts(imagenet_root: Path) -> None:
    ds = _ds(imagenet_root, True)
    bad = ds.index.paths.index(next(p for p in ds.index.paths if p.endswith("n01443537_1.JPEG")))
    _, label, j, errors = ds[bad]
    assert j == bad + 1 and label == ds.index.labels[bad + 1] and len(errors) == 1
    loader = make_stream_loader(ds, 4, train=True, num_workers=0, seed=1)
    seen = torch.cat([b.index for b in loader])
    assert len(seen) == 12 and bad not in seen.tolist()
    assert loader.skipped == 1 and list(loader.errors) == [ds.index.paths[bad]]


def test_stop_names_the_file(imagenet_root: Path) -> None:
    ds = _ds(imagenet_root, True, on_error="stop")
    with pytest.raises(DatasetError, match=r"n01443537_1\.JPEG"):
        list(make_stream_loader(ds, 4, train=False, num_workers=0))


def test_stop_in_worker_gives_clean_message(imagenet_root: Path) -> None:
    ds = _ds(imagenet_root, True, on_error="stop")
    loader = make_stream_loader(ds, 12, train=False, num_workers=1)
    with pytest.raises(DatasetError) as info:
        list(loader)
    msg = str(info.value)
    assert "n01443537_1.JPEG" in msg and "\n" not in msg


def test_verify_drops_at_scan_time(imagenet_root: Path) -> None:
    ds = _ds(imagenet_root, True)
    idx = verify_index(ds.index)
    assert len(idx) == 11 and len(idx.dropped) == 1 and idx.dropped[0].endswith("_1.JPEG")


def test_workers_do_not_change_batches(imagenet_root: Path) -> None:
    ds = _ds(imagenet_root, True)
    runs = []
    for workers in (0, 2):
        loader = make_stream_loader(ds, 4, train=True, num_workers=workers, seed=5)
        loader.set_epoch(3)
        runs.append(list(loader))
        assert loader.skipped == 1
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


def test_epochs_differ(imagenet_root: Path) -> None:
    loader = make_stream_loader(_ds(imagenet_root, False), 12, train=True, num_workers=0)
    loader.set_epoch(0)
    a = next(iter(loader))
    loader.set_epoch(1)
    b = next(iter(loader))
    assert not torch.equal(a.index, b.index)


def test_distributed_sharding(imagenet_root: Path) -> None:
    ds = _ds(imagenet_root, False)
    train_parts, eval_parts = [], []
    for rank in range(3):
        tl = make_stream_loader(ds, 2, train=True, num_workers=0, rank=rank, world_size=3)
        tl.set_epoch(2)
        train_parts.append(torch.cat([b.index for b in tl]).tolist())
        el = make_stream_loader(ds, 3, train=False, num_workers=0, rank=rank, world_size=3)
        eval_parts.append(torch.cat([b.index for b in el]).tolist())
    flat = [i for p in train_parts for i in p]
    assert all(len(p) == 4 for p in train_parts) and sorted(flat) == list(range(12))
    assert eval_parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    with pytest.raises(DatasetError):
        make_stream_loader(ds, 2, train=True, rank=3, world_size=3)


def test_cub_and_folder_datasets(cub_root: Path, imagenet_root: Path) -> None:
    cub = load_stream_dataset("cub200", cub_root, train=True, image_size=32, resize=40)
    x, label, j, _ = cub[(1, 0)]
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and (label, j) == (0, 1)
    folder = load_stream_dataset("folder", imagenet_root, train=False, image_size=16)
    assert len(folder) == 12 and folder.num_classes == 3
    with pytest.raises(DatasetError, match="unknown stream dataset"):
        load_stream_dataset("mnist", imagenet_root)
