"""The readers of VOC 2012, Cityscapes and ADE20K on tiny files written in their on-disk
formats, and of the synthetic set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlab.core.errors import DatasetError
from kdlab.tasks.segmentation.datasets import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    read_ade20k,
    read_cityscapes,
    read_fm_segmentation,
    read_voc,
)


def _rgb(path: Path, h: int, w: int, seed: int, fmt: str = "PNG") -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return arr


def _palette_png(path: Path, labels: np.ndarray) -> None:
    """A VOC-style palette PNG: the pixel values are palette indices (VOC's colour map)."""
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1] = (128, 0, 0)
    palette[15] = (192, 128, 128)
    palette[255] = (224, 224, 192)
    img.putpalette(palette.reshape(-1).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _grey_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path, format="PNG")


def test_voc_reads_palette_indices_and_the_split_list(tmp_path: Path) -> None:
    base = tmp_path / "VOCdevkit" / "VOC2012"
    ids = ["2007_000032", "2007_000039"]
    labels = {}
    for k, i in enumerate(ids):
        _rgb(base / "JPEGImages" / f"{i}.jpg", 6, 8, k, fmt="JPEG")
        lab = np.zeros((6, 8), dtype=np.uint8)
        lab[1:4, 2:5] = 15 if k == 0 else 1
        lab[0, :] = 255  # the object border
        labels[i] = lab
        _palette_png(base / "SegmentationClass" / f"{i}.png", lab)
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text(ids[0] + "\n")
    (sets / "val.txt").write_text(ids[1] + "\n")
    with Image.open(base / "SegmentationClass" / f"{ids[0]}.png") as img:
        assert img.mode == "P"  # the real format: colours on disk, indices in the data
    train = read_voc(tmp_path, "train")
    val = read_voc(tmp_path / "VOCdevkit" / "VOC2012", "val")
    assert len(train) == 1 and len(val) == 1 and train.classes == VOC_CLASSES
    s = train[0]
    assert s.image.shape == (3, 6, 8) and s.image.dtype.is_floating_point is False
    assert np.array_equal(s.label.numpy(), labels[ids[0]])
    assert np.array_equal(val[0].label.numpy(), labels[ids[1]])


def test_voc_training_split_uses_sbd_augmented_labels_when_present(tmp_path: Path) -> None:
    base = tmp_path
    for k, i in enumerate(["a", "b"]):
        _rgb(base / "JPEGImages" / f"{i}.jpg", 4, 4, k, fmt="JPEG")
        _palette_png(base / "SegmentationClass" / f"{i}.png", np.full((4, 4), 1))
        _grey_png(base / "SegmentationClassAug" / f"{i}.png", np.full((4, 4), 7))
    sets = base / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("a\n")
    (sets / "train_aug.txt").write_text("a\nb\n")
    aug = read_voc(base, "train")
    assert len(aug) == 2 and int(aug[1].label.max()) == 7
    plain = read_voc(base, "train", augmented=False)
    assert len(plain) == 1 and int(plain[0].label.max()) == 1


def test_cityscapes_maps_label_ids_to_the_official_train_ids(tmp_path: Path) -> None:
    # labels.py: road 7 -> 0, sidewalk 8 -> 1, parking 9 -> ignore, car 26 -> 13,
    # bicycle 33 -> 18, unlabeled 0 -> ignore, polegroup 18 -> ignore, train 31 -> 16
    ids = np.array([[7, 8, 9, 26], [33, 0, 18, 31]], dtype=np.uint8)
    want = np.array([[0, 1, 255, 13], [18, 255, 255, 16]], dtype=np.uint8)
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        stem = f"{city}_000000_000019"
        _rgb(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", 2, 4, 0)
        _grey_png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
    ds = read_cityscapes(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 19 and ds.classes[13] == "car"
    assert CITYSCAPES_CLASSES[18] == "bicycle"
    assert np.array_equal(ds[0].label.numpy(), want)


def test_ade20k_reduces_the_zero_label(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    lab = np.array([[0, 1, 2], [150, 75, 0]], dtype=np.uint8)
    for folder in ("training", "validation"):
        _rgb(base / "images" / folder / f"ADE_{folder}_00000001.jpg", 2, 3, 0, fmt="JPEG")
        _grey_png(base / "annotations" / folder / f"ADE_{folder}_00000001.png", lab)
    ds = read_ade20k(tmp_path, "val")
    assert len(ds) == 1 and ds.num_classes == 150
    assert ds[0].label.tolist() == [[255, 0, 1], [149, 74, 255]]
    assert len(read_ade20k(base, "train")) == 1


def test_missing_folders_are_one_line_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="JPEGImages"):
        read_voc(tmp_path, "train")
    with pytest.raises(DatasetError, match="leftImg8bit"):
        read_cityscapes(tmp_path, "train")
    with pytest.raises(DatasetError, match="classes.json"):
        read_fm_segmentation(tmp_path, "train")


def test_fm_reader_reads_the_generated_set(fm_root: Path) -> None:
    ds = read_fm_segmentation(fm_root, "train")
    assert len(ds) == 16 and ds.num_classes == 11 and ds.classes[0] == "background"
    s = ds[3]
    assert s.image.shape == (3, 32, 32) and s.label.shape == (32, 32)
    assert int(s.label.max()) <= 10
