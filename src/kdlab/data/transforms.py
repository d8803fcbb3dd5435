"""Pillow-based image transforms for the streamed datasets (ImageNet, CUB-200, class folders).

torchvision is not a kdlab dependency, so the standard pipelines are re-implemented on Pillow
with torchvision's arithmetic (same crop-box formulas, ``Image.BILINEAR`` resizing):

* ImageNet train (Krizhevsky et al. 2012; Szegedy et al., "Going Deeper with Convolutions",
  CVPR 2015): random-resized-crop 224 (scale 0.08-1, ratio 3/4-4/3) + horizontal flip.
* ImageNet eval: resize the shorter side to 256, center-crop 224.
* CUB-200 (SDD, Wei et al., CVPR 2024, official ``cub200.py``): train resize to 256x256, random
  crop 224, flip; eval resize to 256x256, center crop 224.
* to tensor (+ ImageNet mean/std normalisation, or ``uint8`` for normalising on the device).

Randomness: every random transform takes an explicit :class:`numpy.random.Generator`. The stream
dataset seeds it from ``(seed, epoch, index)``, so a sample's augmentation does not depend on the
number of workers, their order, or the rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CenterCrop",
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ToTensor",
    "cub_eval_transform",
    "cub_train_transform",
    "imagenet_eval_transform",
    "imagenet_train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Transform = Callable[[Any, np.random.Generator], Any]


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any, rng: np.random.Generator) -> Any:
        for t in self.transforms:
            img = t(img, rng)
        return img

    def __repr__(self) -> str:
        return f"Compose({', '.join(repr(t) for t in self.transforms)})"


class Resize:
    """Resize with ``Image.BILINEAR``: an int resizes the shorter side (aspect kept, the longer
    side ``int(size * long / short)`` as torchvision), a pair ``(h, w)`` resizes exactly."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = size

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            if short == self.size:
                return img
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = _size2(self.size)
        return img.resize((new_w, new_h), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class CenterCrop:
    """Crop the center ``size`` region (torchvision's rounding: ``round((H - h) / 2)``)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        if th > h or tw > w:
            raise ValueError(f"CenterCrop {self.size} larger than the image ({h}x{w})")
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self) -> str:
        return f"CenterCrop({self.size})"


class RandomCrop:
    """Crop a ``size`` region at a uniformly random position (no padding)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _size2(size)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        if th > h or tw > w:
            raise ValueError(f"RandomCrop {self.size} larger than the image ({h}x{w})")
        top = int(rng.integers(0, h - th + 1))
        left = int(rng.integers(0, w - tw + 1))
        return img.crop((left, top, left + tw, top + th))

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"


class RandomResizedCrop:
    """Inception-style crop: a random area fraction in ``scale`` and aspect ratio in ``ratio``
    (log-uniform), ten tries then a center fallback (torchvision's algorithm), resized to
    ``size`` with ``Image.BILINEAR``."""

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    ) -> None:
        self.size = _size2(size)
        self.scale = scale
        self.ratio = ratio

    def params(
        self, width: int, height: int, rng: np.random.Generator
    ) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop box."""
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        top, left, h, w = self.params(img.size[0], img.size[1], rng)
        th, tw = self.size
        return img.crop((left, top, left + w, top + h)).resize((tw, th), Image.BILINEAR)

    def __repr__(self) -> str:
        return f"RandomResizedCrop({self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if rng.random() < self.p:
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class ToTensor:
    """PIL RGB image -> ``C x H x W`` tensor.

    With ``mean``/``std`` (in ``[0, 1]`` units) the result is ``float32`` ``(x / 255 - mean) /
    std``; without, it stays ``uint8`` (4x less data through worker queues and pinned memory; the
    stream loader then normalises on the device).
    """

    def __init__(
        self,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        if (mean is None) != (std is None):
            raise ValueError("ToTensor: give both mean and std, or neither")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
        if self.mean is None or self.std is None:
            return x
        return (x.float().div_(255.0) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"ToTensor(normalize={self.mean is not None})"


def _to_tensor(normalize: bool) -> ToTensor:
    return ToTensor() if normalize else ToTensor(None, None)


def imagenet_train_transform(size: int = 224, normalize: bool = True,
                             scale: tuple[float, float] = (0.08, 1.0),
                             flip: bool = True) -> Compose:
    """ImageNet training: random-resized-crop ``size`` (area fraction in ``scale``) + flip (when
    ``flip``) + to tensor (+ normalise)."""
    return Compose([RandomResizedCrop(size, scale=scale),
                    *([RandomHorizontalFlip()] if flip else []), _to_tensor(normalize)])


def imagenet_eval_transform(resize: int = 256, size: int = 224, normalize: bool = True) -> Compose:
    """ImageNet evaluation: shorter side to ``resize``, center crop ``size``, to tensor."""
    return Compose([Resize(resize), CenterCrop(size), _to_tensor(normalize)])


def cub_train_transform(resize: int = 256, size: int = 224, normalize: bool = True,
                        flip: bool = True) -> Compose:
    """CUB-200 training (SDD code): resize to ``resize x resize``, random crop ``size``, flip
    (when ``flip``)."""
    return Compose([Resize((resize, resize)), RandomCrop(size),
                    *([RandomHorizontalFlip()] if flip else []), _to_tensor(normalize)])


def cub_eval_transform(resize: int = 256, size: int = 224, normalize: bool = True) -> Compose:
    """CUB-200 evaluation (SDD code): resize to ``resize x resize``, center crop ``size``."""
    return Compose([Resize((resize, resize)), CenterCrop(size), _to_tensor(normalize)])
