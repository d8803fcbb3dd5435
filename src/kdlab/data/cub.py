"""CUB-200-2011 in its official layout (Wah, Branson, Welinder, Perona, Belongie, Caltech
technical report CNS-TR-2011-001).

``CUB_200_2011/`` holds ``images.txt`` (``<id> <relative path>``), ``train_test_split.txt``
(``<id> <1 train | 0 test>``), ``image_class_labels.txt`` (``<id> <class 1..200>``),
``classes.txt`` (``<class> <name>``) and ``images/<class folder>/<file>.jpg``. The official split
(5,994 train, 5,794 test) is the one SDD (Wei et al., CVPR 2024) uses. Labels are converted to
0-based. ``root`` may be the ``CUB_200_2011`` folder itself or a folder containing it.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdlab.core.errors import DatasetError
from kdlab.data.folder import FileIndex

__all__ = ["CUB_FILES", "cub_index", "find_cub_root"]

CUB_FILES: tuple[str, ...] = (
    "images.txt",
    "train_test_split.txt",
    "image_class_labels.txt",
    "classes.txt",
)


def find_cub_root(root: str | os.PathLike[str]) -> Path:
    """The folder holding ``images.txt`` etc.: ``root`` or ``root/CUB_200_2011``."""
    root = Path(root)
    for cand in (root, root / "CUB_200_2011"):
        if (cand / "images.txt").is_file():
            return cand
    raise DatasetError(
        f"cub200: no CUB_200_2011 layout under {root} (expected images.txt, "
        "train_test_split.txt, image_class_labels.txt, classes.txt and images/)"
    )


def _read_pairs(path: Path) -> dict[int, str]:
    """``{id: rest of line}`` of a ``<id> <value>`` file; errors name the file and line."""
    if not path.is_file():
        raise DatasetError(f"cub200: missing {path}")
    out: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            key, _, value = line.partition(" ")
            try:
                k = int(key)
            except ValueError:
                raise DatasetError(
                    f"cub200: {path}:{n}: expected '<id> <value>', got {line!r}"
                ) from None
            if not value.strip():
                raise DatasetError(f"cub200: {path}:{n}: missing value after id {k}")
            if k in out:
                raise DatasetError(f"cub200: {path}:{n}: id {k} appears twice")
            out[k] = value.strip()
    return out


def cub_index(
    root: str | os.PathLike[str], train: bool = True, check_files: bool = True
) -> FileIndex:
    """The official train (``train=True``) or test split of CUB-200-2011, ordered by image id.

    Raises:
        DatasetError: a metadata file is missing or malformed, ids disagree between files, a
            label is outside ``1..len(classes)``, or (``check_files``) an image file is missing.
    """
    base = find_cub_root(root)
    images = _read_pairs(base / "images.txt")
    split = _read_pairs(base / "train_test_split.txt")
    labels = _read_pairs(base / "image_class_labels.txt")
    classes_raw = _read_pairs(base / "classes.txt")
    if set(images) != set(split) or set(images) != set(labels):
        raise DatasetError(
            "cub200: images.txt, train_test_split.txt and image_class_labels.txt list different "
            f"image ids ({len(images)}, {len(split)}, {len(labels)} ids)"
        )
    class_ids = sorted(classes_raw)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise DatasetError("cub200: classes.txt ids must be 1..K without gaps")
    classes = [classes_raw[i] for i in class_ids]
    want = "1" if train else "0"
    paths: list[str] = []
    out_labels: list[int] = []
    for img_id in sorted(images):
        flag = split[img_id]
        if flag not in ("0", "1"):
            raise DatasetError(f"cub200: train_test_split.txt: id {img_id} has flag {flag!r}")
        if flag != want:
            continue
        try:
            label = int(labels[img_id])
        except ValueError:
            raise DatasetError(f"cub200: image_class_labels.txt: id {img_id}: bad label") from None
        if not 1 <= label <= len(classes):
            raise DatasetError(
                f"cub200: image_class_labels.txt: id {img_id} has label {label}, "
                f"expected 1..{len(classes)}"
            )
        path = base / "images" / images[img_id]
        if check_files and not path.is_file():
            raise DatasetError(f"cub200: image {img_id} listed in images.txt is missing: {path}")
        paths.append(str(path))
        out_labels.append(label - 1)
    if not paths:
        raise DatasetError(f"cub200: the {'train' if train else 'test'} split of {base} is empty")
    return FileIndex(paths=paths, labels=out_labels, classes=classes, name="cub200", root=base)
