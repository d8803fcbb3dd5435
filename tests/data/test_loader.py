"""DeviceLoader: determinism, reference augmentation, sharding, evaluation order; subsets."""

from __future__ import annotations

import pytest
import torch

from kdlab.core.errors import DatasetError
from kdlab.data import DeviceLoader, load_dataset, make_synthetic_dataset, subset
from kdlab.data.dataset import ImageTensorDataset


@pytest.fixture(scope="module")
def ds() -> ImageTensorDataset:
    return make_synthetic_dataset(203, num_classes=7, channels=3, size=12, seed=1)


def _collect(loader: DeviceLoader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in b) for b in loader]


def _reference_batches(loader: DeviceLoader, ds: ImageTensorDataset) -> list[torch.Tensor]:
    """Per-sample loops: pad, crop at (dy, dx), maybe flip, normalise."""
    plan = loader.plan()
    p = loader.padding
    c, h, w = ds.images.shape[1:]
    mean = torch.tensor(ds.mean).view(c, 1, 1)
    std = torch.tensor(ds.std).view(c, 1, 1)
    out = []
    for k in range(len(plan.index)):
        img = ds.images[int(plan.index[k])]
        padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=torch.uint8)
        for y in range(h):
            for x in range(w):
                padded[:, y + p, x + p] = img[:, y, x]
        dy, dx = int(plan.dy[k]), int(plan.dx[k])
        crop = torch.empty(c, h, w, dtype=torch.uint8)
        for y in range(h):
            for x in range(w):
                sx = dx + (w - 1 - x if int(plan.flip[k]) else x)
                crop[:, y, x] = padded[:, dy + y, sx]
        out.append((crop.float() - mean * 255) * (1 / (std * 255)))
    return out


def test_augmentation_matches_per_sample_reference(ds: ImageTensorDataset) -> None:
    loader = DeviceLoader(ds, batch_size=32, seed=7)
    loader.set_epoch(3)
    ref = _reference_batches(loader, ds)
    got = torch.cat([b.images for b in loader])
    assert got.shape == (len(ds), 3, 12, 12)
    assert torch.allclose(got, torch.stack(ref), atol=1e-6, rtol=0)
    plan = loader.plan()
    assert plan.flip.unique().tolist() == [0, 1] and int(plan.dx.max()) <= 8
    raw = DeviceLoader(ds, batch_size=32, seed=7, normalize=False)
    raw.set_epoch(3)
    x = next(iter(raw)).images
    assert x.dtype == torch.uint8 and x.shape == (32, 3, 12, 12)


def test_deterministic_across_instances_and_epochs(ds: ImageTensorDataset) -> None:
    a, b = DeviceLoader(ds, 50, seed=3), DeviceLoader(ds, 50, seed=3)
    a.set_epoch(5)
    b.set_epoch(4)
    b.set_epoch(5)
    for x, y in zip(_collect(a), _collect(b), strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)
    a.set_epoch(6)
    assert not torch.equal(_collect(a)[0][2], _collect(b)[0][2])
    c = DeviceLoader(ds, 50, seed=4)
    c.set_epoch(5)
    assert not torch.equal(_collect(c)[0][2], _collect(b)[0][2])


def test_labels_and_index_consistent(ds: ImageTensorDataset) -> None:
    loader = DeviceLoader(ds, 64, seed=0)
    seen = []
    for _images, labels, index in loader:
        assert torch.equal(labels, ds.labels[index])
        seen.append(index)
    assert sorted(torch.cat(seen).tolist()) == list(range(len(ds)))
    assert len(loader) == 4


def test_len_and_drop_last(ds: ImageTensorDataset) -> None:
    loader = DeviceLoader(ds, 64, drop_last=True)
    batches = _collect(loader)
    assert len(loader) == len(batches) == 3 and all(b[0].shape[0] == 64 for b in batches)
    assert len(DeviceLoader(ds, 64, train=False, drop_last=True)) == 4  # eval never drops


def test_shards_disjoint_equal(ds: ImageTensorDataset) -> None:
    shards = []
    for rank in range(2):
        loader = DeviceLoader(ds, 16, seed=9, rank=rank, world_size=2)
        loader.set_epoch(2)
        idx = torch.cat([b.index for b in loader])
        assert len(idx) == len(ds) // 2 == loader.num_samples
        shards.append(set(idx.tolist()))
    assert not shards[0] & shards[1]
    # Augmentation of a position does not depend on world_size.
    single = DeviceLoader(ds, 16, seed=9)
    single.set_epoch(2)
    first = DeviceLoader(ds, 16, seed=9, rank=0, world_size=2)
    first.set_epoch(2)
    assert torch.equal(next(iter(single)).images, next(iter(first)).images)


def test_eval_covers_each_sample_once_in_order(ds: ImageTensorDataset) -> None:
    loader = DeviceLoader(ds, 64, train=False)
    batches = _collect(loader)
    idx = torch.cat([b[2] for b in batches])
    assert idx.tolist() == list(range(len(ds)))
    images = torch.cat([b[0] for b in batches])
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    assert torch.allclose(images, (ds.images.float() / 255 - mean) / std, atol=1e-5)
    parts = [
        torch.cat([b.index for b in DeviceLoader(ds, 10, train=False, rank=r, world_size=3)])
        for r in range(3)
    ]
    assert torch.cat(parts).tolist() == list(range(len(ds)))


def test_channels_last_and_dtype(ds: ImageTensorDataset) -> None:
    plain = next(iter(DeviceLoader(ds, 32, seed=1))).images
    cl = next(iter(DeviceLoader(ds, 32, seed=1, channels_last=True))).images
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, cl)
    half = next(iter(DeviceLoader(ds, 32, seed=1, dtype=torch.bfloat16))).images
    assert half.dtype == torch.bfloat16 and torch.equal(half, plain.to(torch.bfloat16))
    ev = next(iter(DeviceLoader(ds, 32, train=False, channels_last=True))).images
    assert ev.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_batches_identical(ds: ImageTensorDataset) -> None:
    cpu = DeviceLoader(ds, 64, seed=11, device="cpu")
    gpu = DeviceLoader(ds, 64, seed=11, device="cuda")
    for a, b in zip(cpu, gpu, strict=True):
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v.cpu())


def test_single_channel_learnable_shapes() -> None:
    gray = make_synthetic_dataset(40, num_classes=4, channels=1, size=32, seed=0)
    x = next(iter(DeviceLoader(gray, 8, seed=0))).images
    assert x.shape == (8, 1, 32, 32)


def test_synthetic_is_learnable() -> None:
    torch.manual_seed(0)
    train = load_dataset("synthetic", n_train=1000, num_classes=10, size=16)
    test = load_dataset("synthetic", train=False, n_test=300, num_classes=10, size=16)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DeviceLoader(train, 100, seed=0)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for x, y, _ in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    evaluation = DeviceLoader(test, 100, train=False)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in evaluation)
    assert correct / len(test) > 0.7  # chance is 0.1; a linear model reaches ~0.88


def test_subset_stratified(ds: ImageTensorDataset) -> None:
    full = make_synthetic_dataset(1000, num_classes=10, size=8, seed=2)
    part = subset(full, 0.25, seed=1)
    assert len(part) == 250 and part.class_counts().tolist() == [25] * 10
    assert part.source_indices is not None
    assert torch.equal(part.images, full.images[part.source_indices])
    assert part.source_indices.tolist() == sorted(part.source_indices.tolist())
    again = subset(full, 0.25, seed=1)
    assert torch.equal(again.source_indices, part.source_indices)
    nested = subset(part, count=37, seed=0)
    assert len(nested) == 37 and torch.equal(nested.images, full.images[nested.source_indices])
    counts = nested.class_counts()
    assert int(counts.max() - counts.min()) <= 1
    rand = subset(full, count=100, seed=0, stratified=False)
    assert len(rand) == 100
    with pytest.raises(DatasetError, match="exactly one"):
        subset(full)
    with pytest.raises(DatasetError, match="fraction"):
        subset(full, 1.5)


def test_registry_errors() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'imagenette'; known datasets: cifar10, "
                                           "cifar100, fashion_mnist"):
        load_dataset("imagenette")
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar_100'; did you mean cifar100"):
        load_dataset("cifar_100")
    with pytest.raises(DatasetError, match="unknown synthetic option"):
        load_dataset("synthetic", bogus=1)


def test_bad_loader_arguments(ds: ImageTensorDataset) -> None:
    with pytest.raises(DatasetError):
        DeviceLoader(ds, 0)
    with pytest.raises(DatasetError):
        DeviceLoader(ds, 8, rank=2, world_size=2)


def test_ddp_shards_union_equals_single_process_global_batches() -> None:
    """Step k's batches of all ranks together are the single-process batch k (global batch)."""
    ds = make_synthetic_dataset(103, num_classes=5, channels=3, size=8, seed=3)
    per_rank, world = 4, 3
    single = list(DeviceLoader(ds, per_rank * world, train=True, seed=7))
    shards = [list(DeviceLoader(ds, per_rank, train=True, seed=7, rank=r, world_size=world))
              for r in range(world)]
    assert all(len(s) == len(shards[0]) for s in shards)
    covered = 0
    for k, batch in enumerate(single):
        if k >= len(shards[0]):
            break
        union = torch.cat([shards[r][k].index for r in range(world)])
        images = torch.cat([shards[r][k].images for r in range(world)])
        covered += len(union)
        if len(union) == len(batch.index):
            assert torch.equal(union, batch.index)
            assert torch.equal(images, batch.images)
    assert covered == (103 // world) * world
