"""Class-folder image datasets: ImageNet's ``train/<wnid>/*.JPEG`` layout and any user folder.

A class-folder dataset is ``root/<class>/<image>``: one sub-folder per class (sorted names give
the class indices 0..K-1, as torchvision's ``ImageFolder``) and image files inside (extensions
below, case-insensitive; other files and hidden entries are ignored). ILSVRC-2012 (Russakovsky
et al., IJCV 2015) uses it for ``train/`` and, after the usual re-organisation of the 50,000
validation images into ``val/<wnid>/``, for ``val/``.

Scanning reads directory entries only; images are decoded later, in the loader's workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.core.errors import DatasetError

__all__ = ["IMG_EXTENSIONS", "FileIndex", "imagenet_index", "scan_class_folder"]

IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
)  # fmt: skip


@dataclass
class FileIndex:
    """The file list of one split: ``paths[i]`` has label ``labels[i]`` in ``[0, num_classes)``.

    Attributes:
        paths: image file paths.
        labels: 0-based class indices.
        classes: class names (folder names, or CUB's ``classes.txt`` names).
        name: dataset name (``"imagenet"``, ``"cub200"``, ``"folder"``).
        root: the folder that was scanned.
        dropped: files removed at scan time (see :func:`kdlab.data.stream.verify_index`).
    """

    paths: list[str]
    labels: list[int]
    classes: list[str]
    name: str
    root: Path
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise DatasetError(
                f"{self.name}: {len(self.paths)} paths but {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def scan_class_folder(root: str | os.PathLike[str], name: str = "folder") -> FileIndex:
    """Index a ``root/<class>/<image>`` folder (classes sorted by name, files sorted by name).

    Raises:
        DatasetError: ``root`` is missing, has no class sub-folders, holds images directly
            (a flat folder), or its class folders hold no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{name}: folder not found: {root}")
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        flat = [e.name for e in entries if e.is_file() and _is_image(e.name)]
        hint = (
            f" (it holds {len(flat)} images directly: put them into one sub-folder per class, "
            "e.g. reorganise ImageNet's val/ with its ground-truth labels)"
            if flat
            else ""
        )
        raise DatasetError(f"{name}: no class sub-folders in {root}{hint}")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / cls, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise DatasetError(
            f"{name}: no images ({', '.join(IMG_EXTENSIONS)}) under the class folders of {root}"
        )
    return FileIndex(paths=paths, labels=labels, classes=classes, name=name, root=root)


def imagenet_index(root: str | os.PathLike[str], train: bool = True) -> FileIndex:
    """ILSVRC-2012 split: ``root/train/<wnid>/*.JPEG`` or ``root/val/<wnid>/*``.

    Both splits must have the same class folders (1000 wnids for the full dataset; any number
    for a subset), so that a wnid has one index in both.
    """
    root = Path(root)
    split = "train" if train else "val"
    index = scan_class_folder(root / split, name="imagenet")
    other = root / ("val" if train else "train")
    if other.is_dir():
        with os.scandir(other) as it:
            other_classes = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
        if other_classes and other_classes != index.classes:
            raise DatasetError(
                f"imagenet: train/ and val/ under {root} have different class folders "
                f"({len(other_classes)} vs {len(index.classes)}); labels would not match"
            )
    index.root = root
    return index
