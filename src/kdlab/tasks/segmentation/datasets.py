"""Semantic segmentation data sets read in their published on-disk layouts.

Every reader gives a :class:`SegmentationDataset`: a list of ``(image file, label file)`` pairs
and a label mapping, decoded on demand into a ``3 x H x W`` uint8 RGB image and an ``H x W``
uint8 label map whose values are train ids ``0..K-1`` or the ignore value 255.

* Pascal VOC 2012 (:func:`read_voc`): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  (palette PNGs whose palette indices are the labels: 0 background, 1..20 the classes, 255 the
  object borders), ``ImageSets/Segmentation/<split>.txt``. With SBD's augmented set present
  (``SegmentationClassAug/<id>.png`` grey-level label PNGs and
  ``ImageSets/Segmentation/train_aug.txt``), the training split reads it instead (the common
  10,582-image "trainaug" set of DeepLab).
* Cityscapes (:func:`read_cityscapes`): ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png``; label ids map to the 19 train ids of the
  official ``cityscapesscripts/helpers/labels.py`` table (:data:`CITYSCAPES_ID_TO_TRAINID`),
  every other id to 255.
* ADE20K, SceneParsing 2016 (:func:`read_ade20k`): ``images/{training,validation}/*.jpg`` and
  ``annotations/{training,validation}/*.png``; label 0 ("other") becomes 255 and ``1..150``
  become ``0..149`` (the benchmark's ``reduce_zero_label``). Class names come from
  ``objectInfo150.txt`` when present.
* kdlab's synthetic Fashion-MNIST set (:func:`read_fm_segmentation`):
  ``<split>/images/<i>.png``, ``<split>/labels/<i>.png`` and ``classes.json``
  (:mod:`kdlab.tasks.segmentation.synthetic` writes it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kdlab.core.errors import DatasetError

__all__ = [
    "ADE20K_SPLITS",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_ID_TO_TRAINID",
    "IGNORE",
    "SegmentationDataset",
    "SegmentationSample",
    "VOC_CLASSES",
    "cityscapes_lut",
    "read_ade20k",
    "read_cityscapes",
    "read_fm_segmentation",
    "read_segmentation_split",
    "read_voc",
]

#: the label value of pixels that are never trained on nor scored.
IGNORE = 255

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
    "sofa", "train", "tvmonitor",
)

#: Cityscapes label id -> train id, from the official ``cityscapesscripts`` ``labels.py`` table
#: (ids whose ``trainId`` is 255 or -1, and ids not listed, are ignored).
CITYSCAPES_ID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
#: the 19 Cityscapes training classes in train-id order (``labels.py`` names).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
#: ADE20K's split names for kdlab's ``train`` / ``val``.
ADE20K_SPLITS = {"train": "training", "val": "validation"}


def cityscapes_lut() -> np.ndarray:
    """A 256-entry uint8 lookup table: label id -> train id (255 for every other id)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


def _ade_lut() -> np.ndarray:
    """ADE20K's ``reduce_zero_label``: 0 -> 255, ``k`` -> ``k - 1`` (255 stays 255)."""
    lut = (np.arange(256, dtype=np.int64) - 1).astype(np.uint8)  # 0 wraps to 255
    lut[255] = IGNORE
    return lut


@dataclass(frozen=True)
class SegmentationSample:
    """One decoded sample: ``image`` uint8 ``3 x H x W`` (RGB), ``label`` uint8 ``H x W``."""

    image: Tensor
    label: Tensor
    index: int


@dataclass
class SegmentationDataset:
    """Image / label-map file pairs with their label mapping (see the module docstring).

    ``lut``: a 256-entry uint8 table applied to the decoded label values (None: kept as they
    are); ``classes``: the class names in train-id order (``len(classes)`` classes).
    """

    name: str
    images: list[Path]
    labels: list[Path]
    classes: tuple[str, ...]
    lut: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.name}: {len(self.images)} images but {len(self.labels)} "
                               "label maps")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """The number of classes (train ids ``0..K-1``)."""
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in train-id order."""
        return self.classes

    def read_label(self, index: int) -> Tensor:
        """Label map ``index`` as uint8 ``H x W`` train ids (255 ignored)."""
        path = self.labels[index]
        try:
            with Image.open(path) as img:
                # palette PNGs (VOC) give their palette indices; "L" PNGs their grey values
                arr = np.array(img if img.mode in ("P", "L") else img.convert("L"))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: no such label file") from e
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: not a readable label PNG ({e})") from e
        if arr.dtype != np.uint8:
            arr = arr.astype(np.uint8)
        if self.lut is not None:
            arr = self.lut[arr]
        return torch.from_numpy(np.ascontiguousarray(arr))

    def read_image(self, index: int) -> Tensor:
        """Image ``index`` as uint8 ``3 x H x W`` RGB."""
        path = self.images[index]
        try:
            with Image.open(path) as img:
                arr = np.array(img.convert("RGB"))
        except FileNotFoundError as e:
            raise DatasetError(f"{path}: no such image file") from e
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: not a readable image ({e})") from e
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __getitem__(self, index: int) -> SegmentationSample:
        image, label = self.read_image(index), self.read_label(index)
        if image.shape[1:] != label.shape:
            raise DatasetError(f"{self.images[index]}: image is {tuple(image.shape[1:])} but its "
                               f"label map {self.labels[index]} is {tuple(label.shape)}")
        return SegmentationSample(image, label, index)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetError(f"{path}: not found ({what}); check data.root (docs/segmentation.md)")
    return path


def _voc_root(root: Path) -> Path:
    """``root`` itself, or its ``VOC2012`` / ``VOCdevkit/VOC2012`` folder."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir():
            return cand
    raise DatasetError(f"{root}: no JPEGImages/ here nor in VOC2012/ or VOCdevkit/VOC2012/; set "
                       "data.root to the VOC2012 folder")


def read_voc(root: str | Path, split: str, augmented: bool = True) -> SegmentationDataset:
    """Pascal VOC 2012 segmentation split ``split`` (see the module docstring); ``augmented``:
    the ``train`` split reads SBD's ``train_aug.txt`` / ``SegmentationClassAug`` when both exist."""
    base = _voc_root(Path(root))
    sets = base / "ImageSets" / "Segmentation"
    label_dir = base / "SegmentationClass"
    list_file = sets / f"{split}.txt"
    aug_list, aug_dir = sets / "train_aug.txt", base / "SegmentationClassAug"
    if split == "train" and augmented and aug_list.is_file() and aug_dir.is_dir():
        list_file, label_dir = aug_list, aug_dir
    ids = [line.split()[0] for line in _need(list_file, "the split's image list")
           .read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"{list_file}: lists no image")
    return SegmentationDataset(
        name="voc", images=[base / "JPEGImages" / f"{i}.jpg" for i in ids],
        labels=[label_dir / f"{i}.png" for i in ids], classes=VOC_CLASSES)


def read_cityscapes(root: str | Path, split: str) -> SegmentationDataset:
    """Cityscapes fine annotations of ``split`` (train / val), label ids mapped to train ids."""
    base = Path(root)
    image_dir = _need(base / "leftImg8bit" / split, "Cityscapes leftImg8bit/<split>")
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetError(f"{image_dir}: no <city>/*_leftImg8bit.png files")
    labels = []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        labels.append(base / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelIds.png")
    return SegmentationDataset(name="cityscapes", images=images, labels=labels,
                               classes=CITYSCAPES_CLASSES, lut=cityscapes_lut())


def _ade_classes(base: Path) -> tuple[str, ...]:
    """The 150 names of ``objectInfo150.txt`` (first name of each row's ``Name``), else
    ``class_1`` .. ``class_150`` (the original label values)."""
    info = base / "objectInfo150.txt"
    if info.is_file():
        rows = [r.split("\t") for r in info.read_text().splitlines()[1:] if r.strip()]
        names = tuple(r[-1].split(";")[0].strip() for r in rows)
        if len(names) == 150:
            return names
    return tuple(f"class_{k}" for k in range(1, 151))


def read_ade20k(root: str | Path, split: str) -> SegmentationDataset:
    """ADE20K (ADEChallengeData2016) ``split`` (train / val, or training / validation)."""
    base = Path(root)
    if not (base / "images").is_dir() and (base / "ADEChallengeData2016").is_dir():
        base = base / "ADEChallengeData2016"
    folder = ADE20K_SPLITS.get(split, split)
    image_dir = _need(base / "images" / folder, "ADE20K images/<split>")
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise DatasetError(f"{image_dir}: no .jpg images")
    labels = [base / "annotations" / folder / f"{p.stem}.png" for p in images]
    return SegmentationDataset(name="ade20k", images=images, labels=labels,
                               classes=_ade_classes(base), lut=_ade_lut())


def read_fm_segmentation(root: str | Path, split: str) -> SegmentationDataset:
    """kdlab's synthetic Fashion-MNIST segmentation split (``<split>/images``, ``<split>/labels``,
    ``classes.json``; labels are the train ids, 0 background)."""
    base = Path(root)
    classes = json.loads(_need(base / "classes.json", "the class list").read_text())
    image_dir = _need(base / split / "images", "the split's images")
    images = sorted(image_dir.glob("*.png"))
    if not images:
        raise DatasetError(f"{image_dir}: no .png images")
    labels = [base / split / "labels" / p.name for p in images]
    return SegmentationDataset(name="fm_segmentation", images=images, labels=labels,
                               classes=tuple(classes))


#: the reader of each ``data.name`` of :data:`kdlab.config.SEGMENTATION_DATASETS`.
_READERS: dict[str, Callable[..., SegmentationDataset]] = {
    "voc": read_voc, "cityscapes": read_cityscapes, "ade20k": read_ade20k,
    "fm_segmentation": read_fm_segmentation,
}


def read_segmentation_split(name: str, root: str | Path, split: str, *,
                            voc_augmented: bool = True) -> SegmentationDataset:
    """Split ``split`` of the segmentation dataset ``name`` at ``root``."""
    if name not in _READERS:
        raise DatasetError(f"unknown segmentation dataset {name!r}; use one of {list(_READERS)}")
    if name == "voc":
        return read_voc(root, split, augmented=voc_augmented)
    return _READERS[name](root, split)
