"""The training augmentation and the loaders: seeded per (seed, epoch, sample), exact on resume,
and whole images in evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.config import DataConfig, SegmentationConfig
from kdlab.core.errors import ConfigError
from kdlab.data.fashion_mnist import FASHION_MNIST_CLASSES
from kdlab.tasks.segmentation.data import build_segmentation_data
from kdlab.tasks.segmentation.transforms import augment_sample, sample_seed

SEG = SegmentationConfig(crop_size=24, base_size=32, scale_range=(0.5, 1.5))
CPU = torch.device("cpu")


def _data(root: Path, seed: int = 0, **seg: object) -> object:
    cfg = DataConfig(name="fm_segmentation", root=str(root), batch_size=4, eval_batch_size=4,
                     num_workers=0)
    return build_segmentation_data(cfg, SEG.model_copy(update=seg), seed=seed, device=CPU)


def test_same_seed_and_epoch_give_the_same_crops(fm_root: Path) -> None:
    a, b = _data(fm_root).train_loader, _data(fm_root).train_loader
    a.set_epoch(3)
    b.set_epoch(3)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.index, y.index)
    a.set_epoch(4)
    b.set_epoch(3)
    first_a, first_b = next(iter(a)), next(iter(b))
    assert not torch.equal(first_a.images, first_b.images)


def test_a_sample_crop_depends_only_on_seed_epoch_and_index(fm_root: Path) -> None:
    loader = _data(fm_root, seed=5).train_loader
    loader.set_epoch(2)
    batch = next(iter(loader))
    i = int(batch.index[1])
    sample = loader.dataset[i]
    g = torch.Generator().manual_seed(sample_seed(5, 2, i))
    image, label = augment_sample(sample.image, sample.label, generator=g, crop_size=24,
                                  scale_range=(0.5, 1.5), base_size=32, ignore_index=255)
    assert torch.equal(batch.labels[1], label.long())
    assert torch.allclose(batch.images[1], loader.normalize(image))


def test_resume_mid_epoch_sees_the_same_batches(fm_root: Path) -> None:
    loader = _data(fm_root).train_loader
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1, start_batch=2)
    rest = list(loader)
    assert len(full) == 4 and len(rest) == 2
    for x, y in zip(full[2:], rest, strict=True):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)


def test_augmentation_pads_with_ignore_and_keeps_label_values() -> None:
    image = torch.full((3, 10, 10), 200, dtype=torch.uint8)
    label = torch.zeros((10, 10), dtype=torch.uint8)
    label[:, 5:] = 3
    g = torch.Generator().manual_seed(0)
    img, lab = augment_sample(image, label, generator=g, crop_size=16, scale_range=(1.0, 1.0),
                              base_size=None, ignore_index=255)
    assert img.shape == (3, 16, 16) and lab.shape == (16, 16)
    assert set(lab.unique().tolist()) == {0, 3, 255}  # nearest labels, padded with ignore
    assert bool((img[:, lab == 255] == 0).all()) and bool((img[:, lab != 255] == 200).all())
    # the rescale draws the shorter side around base_size
    g = torch.Generator().manual_seed(1)
    img, lab = augment_sample(image, label, generator=g, crop_size=8, scale_range=(2.0, 2.0),
                              base_size=40, ignore_index=255)
    assert img.shape == (3, 8, 8) and set(lab.unique().tolist()) <= {0, 3}


def test_under_two_ranks_the_global_batches_are_the_single_process_ones(fm_root: Path) -> None:
    cfg = DataConfig(name="fm_segmentation", root=str(fm_root), batch_size=4, num_workers=0)
    one = build_segmentation_data(cfg, SEG, seed=0, device=CPU).train_loader
    ranks = [build_segmentation_data(cfg, SEG, seed=0, device=CPU, rank=r,
                                     world_size=2).train_loader for r in (0, 1)]
    for loader in (one, *ranks):
        loader.set_epoch(1)
    for whole, r0, r1 in zip(one, *ranks, strict=True):
        assert torch.equal(whole.images, torch.cat([r0.images, r1.images]))


def test_evaluation_yields_whole_images(fm_root: Path) -> None:
    test = _data(fm_root).test_loader
    batches = list(test)
    assert sum(len(b.images) for b in batches) == 6
    assert batches[0].images[0].shape == (3, 32, 32) and batches[0].labels[0].shape == (32, 32)
    resized = list(_data(fm_root, eval_size=16).test_loader)[0]
    assert resized.images[0].shape == (3, 16, 16) and resized.labels[0].shape == (32, 32)


def test_fractions_are_refused(fm_root: Path) -> None:
    cfg = DataConfig(name="fm_segmentation", root=str(fm_root), val_fraction=0.1)
    with pytest.raises(ConfigError, match="val_fraction"):
        build_segmentation_data(cfg, SEG, seed=0, device=CPU)


def test_input_spec_names_the_classes(fm_root: Path) -> None:
    data = _data(fm_root)
    data.dataset_label = "fm_segmentation"
    spec = data.input_spec
    assert spec.task == "segmentation" and spec.classes[0] == "background"
    assert len(spec.classes) == data.num_classes == 11
    d = spec.to_dict()
    assert list(d["classes"][1:]) == list(FASHION_MNIST_CLASSES)  # from classes.json
    assert list(d["mean"]) == list(SEG.image_mean)
