"""A synthetic semantic segmentation set: Fashion-MNIST items pasted onto black canvases.

The segmentation sibling of kdlab's synthetic detection set (:mod:`kdlab.tools.
synthetic_detection`): each ``size x size`` canvas receives ``n ~ U{objects}`` items, each a
28x28 Fashion-MNIST image (Xiao et al. 2017, arXiv:1708.07747) enlarged by an integer factor
``k ~ U{scale}`` (pixel repetition, so no pixel is blended), tinted with a random colour whose
brightest channel is exactly 1 and pasted at a uniform position. An item writes only its own
non-zero pixels, over whatever was there (later items occlude earlier ones), and its label
``class + 1`` at exactly those pixels: the label map is pixel-exact, 0 = background where no
item pixel is, and a pixel is non-black in the image exactly where its label is not 0. Classes:
``background`` + the ten Fashion-MNIST classes (11).

The train split takes its items from Fashion-MNIST's training images, the test split from its
test images. Image ``i`` of a split is drawn from a generator seeded with ``(seed, split, i)``,
so the files are identical byte for byte for the same arguments and the first images do not
depend on ``n_train`` / ``n_test``.

Layout (what :func:`kdlab.tasks.segmentation.datasets.read_fm_segmentation` reads)::

    OUT/classes.json                 ["background", "T-shirt/top", ...]
    OUT/{train,test}/images/000000.png   RGB
    OUT/{train,test}/labels/000000.png   8-bit grey, values 0..10
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdlab.core.errors import ConfigError
from kdlab.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

__all__ = ["SEGMENTATION_CLASSES", "make_fashion_mnist_segmentation", "paste_items"]

#: the classes of the synthetic set: 0 background, ``k + 1`` Fashion-MNIST class ``k``.
SEGMENTATION_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)
_SPLITS = {"train": 0, "test": 1}


def paste_items(rng: np.random.Generator, items: np.ndarray, classes: np.ndarray, size: int,
                objects: tuple[int, int], scale: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray]:
    """One canvas: ``(H x W x 3 uint8 image, H x W uint8 labels)`` drawn with ``rng`` from the
    28x28 ``items`` (``N x 28 x 28`` uint8) and their ``classes`` (module docstring)."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        j = int(rng.integers(len(items)))
        k = int(rng.integers(scale[0], scale[1] + 1))
        item = np.repeat(np.repeat(items[j], k, axis=0), k, axis=1)
        side = item.shape[0]
        if side > size:
            raise ConfigError(f"an item of {side} px does not fit a {size} px canvas; use a "
                              "larger --size or a smaller --scale")
        colour = rng.uniform(0.2, 1.0, size=3)
        colour[int(rng.integers(3))] = 1.0
        y, x = int(rng.integers(size - side + 1)), int(rng.integers(size - side + 1))
        mask = item > 0
        tinted = np.rint(item[..., None].astype(np.float64) * colour).astype(np.uint8)
        region = image[y:y + side, x:x + side]
        region[mask] = tinted[mask]
        label[y:y + side, x:x + side][mask] = int(classes[j]) + 1
    return image, label


def make_fashion_mnist_segmentation(
    out: str | os.PathLike[str], *, fashion_mnist_root: str | os.PathLike[str] | None = None,
    n_train: int = 1000, n_test: int = 200, size: int = 64, objects: tuple[int, int] = (1, 3),
    scale: tuple[int, int] = (1, 2), seed: int = 0,
) -> dict[str, Any]:
    """Write the synthetic set into ``out`` (module docstring); returns a summary
    ``{"classes": [...], "splits": {split: {"images": n, "folder": path, "pixels": per-class
    pixel counts}}}``. Raises :class:`ConfigError` for bad sizes and
    :class:`~kdlab.core.errors.DatasetError` when Fashion-MNIST is missing."""
    if not 1 <= objects[0] <= objects[1]:
        raise ConfigError(f"objects must be MIN MAX with 1 <= MIN <= MAX, got {list(objects)}")
    if not 1 <= scale[0] <= scale[1]:
        raise ConfigError(f"scale must be MIN MAX integers with 1 <= MIN <= MAX, got "
                          f"{list(scale)}")
    if 28 * scale[1] > size:
        raise ConfigError(f"--size {size} is smaller than the largest item (28 * {scale[1]}); "
                          "use a larger --size or a smaller --scale")
    if n_train < 1 or n_test < 1:
        raise ConfigError("--train and --test must be at least 1")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(list(SEGMENTATION_CLASSES)) + "\n")
    summary: dict[str, Any] = {"classes": list(SEGMENTATION_CLASSES), "splits": {}}
    for split, n in (("train", n_train), ("test", n_test)):
        fm = load_fashion_mnist(fashion_mnist_root, train=split == "train", pad=0)
        items = fm.images[:, 0].numpy()
        classes = fm.labels.numpy()
        image_dir, label_dir = root / split / "images", root / split / "labels"
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros(len(SEGMENTATION_CLASSES), dtype=np.int64)
        for i in range(n):
            rng = np.random.default_rng([seed, _SPLITS[split], i])
            image, label = paste_items(rng, items, classes, size, objects, scale)
            Image.fromarray(image, mode="RGB").save(image_dir / f"{i:06d}.png", format="PNG")
            Image.fromarray(label, mode="L").save(label_dir / f"{i:06d}.png", format="PNG")
            pixels += np.bincount(label.reshape(-1), minlength=len(SEGMENTATION_CLASSES))
        summary["splits"][split] = {"images": n, "folder": str(root / split),
                                    "pixels": pixels.tolist()}
    return summary
