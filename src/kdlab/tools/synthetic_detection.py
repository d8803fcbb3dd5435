"""A synthetic detection set: Fashion-MNIST items pasted onto black canvases, in COCO format.

Standard practice for testing detectors without a real data set (generators that paste MNIST
digits and record their boxes); kdlab's own version uses Fashion-MNIST (Xiao et al. 2017,
arXiv:1708.07747) for its ten visually distinct classes, so DKD's target / non-target split is
meaningful. The train split takes its objects from Fashion-MNIST's training images and the test
split from its test images, so no object appears in both.

Every object is a 28x28 item resized (bilinear, antialiased) to ``round(28 * s)`` pixels with
``s ~ U(scale)``, tinted with a random colour whose brightest channel is exactly 1 (so the
object's per-pixel maximum over channels equals its resized grey value) and pasted with a
pixel-wise maximum. Its box is the tight extent of the pixels whose grey value exceeds
``threshold``: ``x1`` / ``y1`` the first such column / row, ``x2`` / ``y2`` one past the last, so
``w = x2 - x1`` is the object's width in pixels. A placement whose box has IoU above
``max_overlap`` with an earlier box of the image is retried (new position), and the object is
skipped after ``max_tries`` failures. Optional Gaussian noise (``noise`` = its standard deviation
in 0..255 units) is added last and does not change the boxes.

Each image ``i`` of a split is drawn from its own generator seeded with ``(seed, split, i)``, so
the output is identical byte for byte for the same arguments, and the first images do not
depend on ``n_train`` / ``n_test``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.core.errors import ConfigError
from kdlab.core.io import atomic_write
from kdlab.core.version import __version__
from kdlab.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdlab.tasks.detection.coco import CocoImage, write_coco_split

__all__ = ["SYNTHETIC_CATEGORIES", "make_fashion_mnist_detection", "tight_box"]

log = logging.getLogger(__name__)

#: COCO categories of the synthetic set: Fashion-MNIST class ``k`` is category id ``k + 1``.
SYNTHETIC_CATEGORIES: list[dict[str, Any]] = [
    {"id": k + 1, "name": name, "supercategory": "fashion"}
    for k, name in enumerate(FASHION_MNIST_CLASSES)
]
_SPLITS = {"train": 0, "test": 1}


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` of the ``True`` pixels of a 2-D mask: first column / row, and one past
    the last column / row (so ``x2 - x1`` is the width in pixels); ``None`` for an empty mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> float:
    """Largest IoU of ``box`` with any of ``others`` (xyxy, areas ``(x2-x1)*(y2-y1)``)."""
    if not others:
        return 0.0
    b = np.asarray(others, dtype=np.float64)
    ix = np.clip(np.minimum(b[:, 2], box[2]) - np.maximum(b[:, 0], box[0]), 0, None)
    iy = np.clip(np.minimum(b[:, 3], box[3]) - np.maximum(b[:, 1], box[1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    union = area + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return float((inter / union).max())


def _resize(item: np.ndarray, side: int) -> np.ndarray:
    """Bilinear, antialiased resize of a ``uint8`` 2-D item to ``side x side`` (rounded)."""
    x = torch.from_numpy(item.astype(np.float32))[None, None]
    y = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return y[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def _range(value: Any, name: str, kind: type) -> tuple[Any, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        lo = hi = value
    else:
        try:
            lo, hi = value
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name} must be a number or a (min, max) pair, got {value!r}"
            ) from None
    if kind is int and not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"{name} must be integers, got {value!r}")
    if lo > hi:
        raise ConfigError(f"{name}: min {lo} is larger than max {hi}")
    return lo, hi


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _render(
    rng: np.random.Generator,
    items: np.ndarray,
    labels: np.ndarray,
    *,
    size: tuple[int, int],
    objects: tuple[int, int],
    scale: tuple[float, float],
    max_overlap: float,
    noise: float,
    threshold: int,
    max_tries: int,
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int], int]:
    """One canvas: ``(image H x W x 3, boxes, FM class per box, skipped objects)``."""
    height = int(rng.integers(size[0], size[1] + 1))
    width = int(rng.integers(size[0], size[1] + 1))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    boxes: list[tuple[int, int, int, int]] = []
    classes: list[int] = []
    skipped = 0
    for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
        index = int(rng.integers(len(items)))
        side = min(max(1, round(28 * float(rng.uniform(scale[0], scale[1])))), height, width)
        grey = _resize(items[index], side)
        extent = tight_box(grey > threshold)
        colour = rng.uniform(0.25, 1.0, size=3)
        colour[int(rng.integers(3))] = 1.0
        colour /= colour.max()
        if extent is None:  # an item too faint to see at this size
            skipped += 1
            continue
        placed = None
        for _try in range(max_tries):
            x0 = int(rng.integers(width - side + 1))
            y0 = int(rng.integers(height - side + 1))
            box = (x0 + extent[0], y0 + extent[1], x0 + extent[2], y0 + extent[3])
            if _iou(box, boxes) <= max_overlap:
                placed = (x0, y0, box)
                break
        if placed is None:
            skipped += 1
            continue
        x0, y0, box = placed
        tinted = np.rint(grey[..., None].astype(np.float64) * colour).astype(np.uint8)
        region = canvas[y0 : y0 + side, x0 : x0 + side]
        np.maximum(region, tinted, out=region)
        boxes.append(box)
        classes.append(int(labels[index]))
    if noise > 0:
        noisy = canvas.astype(np.float64) + rng.normal(0.0, noise, size=canvas.shape)
        canvas = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return canvas, boxes, classes, skipped


def _checked_options(
    n_train: int,
    n_test: int,
    seed: int,
    size: int | tuple[int, int],
    objects: tuple[int, int],
    scale: tuple[float, float],
    max_overlap: float,
    noise: float,
    threshold: int,
    max_tries: int,
) -> dict[str, Any]:
    """Validate the generator's parameters; return the keyword arguments of :func:`_render`."""
    size_lo, size_hi = _range(size, "size", int)
    obj_lo, obj_hi = _range(objects, "objects", int)
    scale_lo, scale_hi = _range(scale, "scale", float)
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        _check(isinstance(n, int) and n >= 0, f"{name} must be an integer >= 0, got {n!r}")
    _check(size_lo >= 8, f"size must be at least 8 pixels, got {size!r}")
    _check(obj_lo >= 0, f"objects must be >= 0, got {objects!r}")
    _check(scale_lo > 0, f"scale must be > 0, got {scale!r}")
    _check(0.0 <= max_overlap <= 1.0, f"max_overlap must be in [0, 1], got {max_overlap!r}")
    _check(noise >= 0.0, f"noise must be >= 0, got {noise!r}")
    _check(0 <= threshold < 255, f"threshold must be in [0, 255), got {threshold!r}")
    _check(max_tries >= 1, f"max_tries must be >= 1, got {max_tries!r}")
    _check(isinstance(seed, int) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    return {
        "size": (size_lo, size_hi),
        "objects": (obj_lo, obj_hi),
        "scale": (scale_lo, scale_hi),
        "max_overlap": max_overlap,
        "noise": noise,
        "threshold": threshold,
        "max_tries": max_tries,
    }


def _params_record(n_train: int, n_test: int, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """The parameters as recorded in ``dataset.json`` and each split's ``info``."""
    (size_lo, size_hi), (obj_lo, obj_hi) = options["size"], options["objects"]
    scale_lo, scale_hi = options["scale"]
    return {
        "n_train": n_train,
        "n_test": n_test,
        "size": [size_lo, size_hi],
        "objects": [obj_lo, obj_hi],
        "scale": [float(scale_lo), float(scale_hi)],
        "max_overlap": float(options["max_overlap"]),
        "noise": float(options["noise"]),
        "seed": seed,
        "threshold": options["threshold"],
        "max_tries": options["max_tries"],
    }


def _generate_images(
    split: str,
    n: int,
    seed: int,
    source: tuple[np.ndarray, np.ndarray],
    options: dict[str, Any],
    stats: dict[str, Any],
    counts: np.ndarray,
) -> Iterator[CocoImage]:
    """The ``n`` images of ``split`` from ``source = (items, labels)``, updating ``stats`` and
    the per-class box ``counts`` as they are drawn."""
    items, labels = source
    for i in range(n):
        rng = np.random.default_rng([seed, _SPLITS[split], i])
        image, boxes, classes, skipped = _render(rng, items, labels, **options)
        stats["boxes"] += len(boxes)
        stats["skipped_objects"] += skipped
        np.add.at(counts, np.asarray(classes, dtype=np.int64), 1)
        yield CocoImage(
            file_name=f"{i + 1:06d}.png",
            image=image,
            boxes=np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            category_ids=[c + 1 for c in classes],
        )


def _write_split(
    out: Path,
    split: str,
    n: int,
    fashion_mnist_root: str | os.PathLike[str] | None,
    options: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """Generate and write one split; return its summary statistics."""
    source = load_fashion_mnist(fashion_mnist_root, train=split == "train", pad=0)
    items = source.images[:, 0].numpy()
    labels = source.labels.numpy()
    stats: dict[str, Any] = {"images": n, "boxes": 0, "skipped_objects": 0}
    counts = np.zeros(len(FASHION_MNIST_CLASSES), dtype=np.int64)
    images = _generate_images(split, n, params["seed"], (items, labels), options, stats, counts)
    info = {
        "description": "kdlab synthetic Fashion-MNIST detection set",
        "generator": "kdlab.tools.synthetic_detection.make_fashion_mnist_detection",
        "kdlab_version": __version__,
        "source": f"Fashion-MNIST {split} split",
        "params": params,
    }
    path = write_coco_split(out, split, images, SYNTHETIC_CATEGORIES, info=info)
    stats["class_counts"] = {
        name: int(c) for name, c in zip(FASHION_MNIST_CLASSES, counts, strict=True)
    }
    stats["annotation_file"] = str(path)
    log.info(
        "synthetic %s: %d images, %d boxes (%d objects skipped) -> %s",
        split, n, stats["boxes"], stats["skipped_objects"], path,
    )  # fmt: skip
    return stats


def make_fashion_mnist_detection(
    out_root: str | os.PathLike[str],
    *,
    fashion_mnist_root: str | os.PathLike[str] | None = None,
    n_train: int = 1000,
    n_test: int = 200,
    size: int | tuple[int, int] = 128,
    objects: tuple[int, int] = (1, 4),
    scale: tuple[float, float] = (1.0, 3.0),
    max_overlap: float = 0.3,
    noise: float = 0.0,
    seed: int = 0,
    threshold: int = 8,
    max_tries: int = 50,
) -> dict[str, Any]:
    """Write the synthetic Fashion-MNIST detection set under ``out_root`` (COCO layout).

    Splits ``train`` (objects from Fashion-MNIST's training images) and ``test`` (from its test
    images) are written with :func:`~kdlab.tasks.detection.coco.write_coco_split`:
    ``out_root/annotations/instances_{train,test}.json`` and ``out_root/{train,test}/NNNNNN.png``.
    Categories: the ten Fashion-MNIST classes with COCO ids ``1..10``. ``out_root/dataset.json``
    (and each JSON's ``info``) records the parameters and the kdlab version.

    Args:
        out_root: output folder (created; files of an earlier run are overwritten).
        fashion_mnist_root: where the Fashion-MNIST IDX files are (default: the usual search of
            :func:`kdlab.data.fashion_mnist.load_fashion_mnist`).
        n_train, n_test: images per split.
        size: canvas side in pixels, or a ``(min, max)`` range from which height and width are
            drawn independently.
        objects: ``(min, max)`` objects attempted per image.
        scale: ``(min, max)`` of ``s``, object side ``round(28 * s)`` (capped at the canvas).
        max_overlap: largest IoU allowed between two boxes of an image.
        noise: standard deviation of Gaussian pixel noise (0..255 units) added at the end.
        seed: the generator seed; equal arguments give identical files.
        threshold: grey level a pixel must exceed to count as part of its object's box.
        max_tries: placements tried before an object is skipped.

    Returns a summary: ``root``, ``params``, and per split ``images``, ``boxes``,
    ``skipped_objects``, ``class_counts`` (FM class name -> boxes) and ``annotation_file``.
    Raises :class:`ConfigError` for impossible parameters and
    :class:`~kdlab.core.errors.DatasetError` when Fashion-MNIST is missing.
    """
    options = _checked_options(
        n_train, n_test, seed, size, objects, scale, max_overlap, noise, threshold, max_tries
    )
    out = Path(out_root)
    params = _params_record(n_train, n_test, seed, options)
    summary: dict[str, Any] = {"root": str(out), "params": params, "splits": {}}
    for split, n in (("train", n_train), ("test", n_test)):
        summary["splits"][split] = _write_split(
            out, split, n, fashion_mnist_root, options, params
        )
    record = {
        "generator": "kdlab.tools.synthetic_detection.make_fashion_mnist_detection",
        "kdlab_version": __version__,
        "categories": SYNTHETIC_CATEGORIES,
        "params": params,
        "splits": {
            split: {**stats, "annotation_file": f"annotations/instances_{split}.json"}
            for split, stats in summary["splits"].items()
        },
    }
    atomic_write(out / "dataset.json", json.dumps(record, indent=2) + "\n")
    return summary
