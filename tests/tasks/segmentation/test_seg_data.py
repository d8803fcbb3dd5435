"""The training augmentation and the loaders: seeded per (seed, epoch, sample), exact on resume,
and whole images in evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kdlab.config import DataConfig, SegmentationConfig, validate_config
from kdlab.core.errors import ConfigError
from kdlab.data.fashion_mnist import FASHION_MNIST_CLASSES
from kdlab.engine.trainer import Trainer
from kdlab.tasks.segmentation.data import build_segmentation_data
from kdlab.tasks.segmentation.transforms import augment_sample, crop_hw, sample_seed

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


# ------------------------------------------------------------------ rectangular crops


def _square_digest(crop_size: int | tuple[int, int]) -> str:
    h = hashlib.sha256()
    g0 = torch.Generator().manual_seed(123)
    image = torch.randint(0, 256, (3, 37, 53), generator=g0, dtype=torch.uint8)
    label = torch.randint(0, 12, (37, 53), generator=g0, dtype=torch.uint8)
    for i in range(12):
        g = torch.Generator().manual_seed(sample_seed(7, 3, i))
        img, lab = augment_sample(image, label, generator=g, crop_size=crop_size,
                                  scale_range=(0.5, 2.0), base_size=40, ignore_index=255)
        h.update(img.numpy().tobytes())
        h.update(lab.numpy().tobytes())
    return h.hexdigest()


def test_square_crops_are_those_of_the_square_only_code() -> None:
    """The digest of 12 square crops (some padded) recorded with the code before rectangular
    crops existed: an int side and an equal pair still give those bytes exactly."""
    golden = "35f6f207cad13647e4d23d91da1e9b8f507135260fd9c5833bce3b6ebf4d0500"
    assert _square_digest(32) == golden
    assert _square_digest((32, 32)) == golden


def _coordinates(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose channel 0 is the row, channel 1 the column (labels: the row)."""
    rows = torch.arange(h, dtype=torch.uint8).view(h, 1).expand(h, w)
    cols = torch.arange(w, dtype=torch.uint8).view(1, w).expand(h, w)
    return torch.stack([rows, cols, torch.full((h, w), 9, dtype=torch.uint8)]), rows.clone()


def test_rectangular_crop_is_an_h_by_w_window_of_the_image() -> None:
    image, label = _coordinates(40, 60)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        img, lab = augment_sample(image, label, generator=g, crop_size=(12, 30),
                                  scale_range=(1.0, 1.0), base_size=None, ignore_index=255,
                                  hflip=False)
        assert img.shape == (3, 12, 30) and lab.shape == (12, 30)
        top, left = int(img[0, 0, 0]), int(img[1, 0, 0])
        assert torch.equal(img, image[:, top:top + 12, left:left + 30])
        assert torch.equal(lab, label[top:top + 12, left:left + 30])
        assert 0 <= top <= 40 - 12 and 0 <= left <= 60 - 30


def test_rectangular_crop_pads_each_side_with_ignore() -> None:
    """A 10 x 10 image in a 16 x 24 crop: padded at the bottom and right, image 0, labels
    ignore_index; tall crops pad the other way."""
    image = torch.full((3, 10, 10), 200, dtype=torch.uint8)
    label = torch.full((10, 10), 3, dtype=torch.uint8)
    for hw in ((16, 24), (24, 12)):
        g = torch.Generator().manual_seed(0)
        img, lab = augment_sample(image, label, generator=g, crop_size=hw,
                                  scale_range=(1.0, 1.0), base_size=None, ignore_index=255,
                                  hflip=False)
        assert img.shape == (3, *hw) and lab.shape == hw
        assert int((lab == 3).sum()) == 100 and int((lab == 255).sum()) == hw[0] * hw[1] - 100
        assert torch.equal(lab[:10, :10], label)  # no room to move: the corner is (0, 0)
        assert bool((img[:, lab == 255] == 0).all()) and bool((img[:, lab == 3] == 200).all())


def test_crop_size_accepts_a_side_or_a_pair() -> None:
    base = {"task": "segmentation", "student": {"arch": "resnet8"},
            "data": {"name": "fm_segmentation", "root": "x"}}

    def seg(crop: object) -> SegmentationConfig:
        return validate_config({**base, "segmentation": {"crop_size": crop}}, "t").segmentation

    assert seg(512).crop_size == 512 and seg([512, 1024]).crop_size == (512, 1024)
    assert seg([512, 512]).crop_size == 512  # an equal pair is the square
    assert validate_config({**base, "segmentation": {"crop_size": [512, 1024]}}, "t").to_dict()[
        "segmentation"]["crop_size"] == [512, 1024]
    assert crop_hw(512) == (512, 512) and crop_hw((512, 1024)) == (512, 1024)
    for bad, needle in (([512], "not 1 values"), ([8, 16, 32], "not 3 values"),
                        ([4, 600], "both >= 8"), (4, "both >= 8")):
        with pytest.raises(ConfigError, match=needle):
            seg(bad)


def test_loader_yields_rectangular_batches_per_seed_and_epoch(fm_root: Path) -> None:
    a = _data(fm_root, crop_size=(16, 28))
    b = _data(fm_root, crop_size=(16, 28))
    assert a.crop_hw == (16, 28) and a.input_size == 16
    a.train_loader.set_epoch(2)
    b.train_loader.set_epoch(2)
    for x, y in zip(a.train_loader, b.train_loader, strict=True):
        assert x.images.shape == (4, 3, 16, 28) and x.labels.shape == (4, 16, 28)
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    square = _data(fm_root, crop_size=24)
    assert square.crop_hw == (24, 24) and square.input_size == 24


@pytest.mark.e2e
def test_a_run_trains_on_rectangular_crops_under_poly(fm_root: Path, tmp_path: Path) -> None:
    """Two epochs of 4 steps on 16 x 32 crops (canvases rescaled to an 18-30 px side, so padded
    to the crop's width) under poly: the run completes and logs each epoch's first rate."""
    cfg = validate_config({
        "name": "rect", "task": "segmentation",
        "data": {"name": "fm_segmentation", "root": str(fm_root), "batch_size": 4,
                 "eval_batch_size": 6, "num_workers": 0},
        "segmentation": {"head": "fcn", "crop_size": [16, 32], "base_size": 24,
                         "scale_range": [0.75, 1.25]},
        "student": {"arch": "resnet8"},
        "optim": {"lr": 0.05, "epochs": 2, "scheduler": "poly"},
        "runtime": {"amp": "off", "channels_last": False, "device": "cpu"}}, "t")
    Trainer(cfg, tmp_path / "run").run()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["lr"] for r in records] == pytest.approx([0.05, 0.05 * 0.5 ** 0.9], rel=1e-12)
    assert all(0.0 <= r["test_mIoU"] <= 100.0 for r in records)
