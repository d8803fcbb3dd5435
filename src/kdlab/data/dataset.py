"""The in-memory dataset type shared by every small-image dataset, and class-stratified subsets.

Small datasets (CIFAR-10/100, Fashion-MNIST, synthetic data) are held whole as one ``uint8``
tensor ``N x C x H x W`` plus ``int64`` labels, so that they can live on the accelerator and be
augmented there in batches (see :mod:`kdlab.data.loader`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdlab.core.errors import DatasetError

__all__ = ["ImageTensorDataset", "default_data_root", "subset"]


def default_data_root() -> Path:
    """The folder datasets are looked for (and downloaded to) when no root is given.

    ``$KDLAB_DATA`` when set, otherwise ``./data`` (relative to the working directory).
    """
    env = os.environ.get("KDLAB_DATA")
    return Path(env).expanduser() if env else Path("data")


@dataclass
class ImageTensorDataset:
    """A whole image-classification split held as tensors.

    Attributes:
        images: ``uint8`` tensor ``N x C x H x W`` (raw pixel values 0..255).
        labels: ``int64`` tensor of shape ``N`` with values in ``[0, num_classes)``.
        num_classes: number of classes of the task (not only those present in this split).
        mean: per-channel mean in ``[0, 1]`` units used for normalisation.
        std: per-channel standard deviation in ``[0, 1]`` units used for normalisation.
        name: dataset name, e.g. ``"cifar100"``.
        classes: optional class names, ``len(classes) == num_classes``.
        source_indices: for a subset, the ``int64`` index of each sample in the full split it
            was drawn from; ``None`` for a full split.
        pad: zero padding per side the loader added around the source images (Fashion-MNIST:
            2, 28 -> 32); the source images are ``H - 2 pad`` pixels wide.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    classes: list[str] | None = None
    source_indices: torch.Tensor | None = field(default=None, repr=False)
    pad: int = 0

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.name}: images must be a uint8 tensor N x C x H x W, got "
                f"{self.images.dtype} with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DatasetError(
                f"{self.name}: labels must be an int64 tensor of shape N, got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise DatasetError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        channels = self.images.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise DatasetError(
                f"{self.name}: mean/std need one value per channel ({channels}), got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise DatasetError(
                f"{self.name}: {len(self.classes)} class names for {self.num_classes} classes"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of image channels (3 for CIFAR, 1 for Fashion-MNIST)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def device(self) -> torch.device:
        """The device the images live on."""
        return self.images.device

    def to(self, device: torch.device | str) -> ImageTensorDataset:
        """A copy with images, labels (and source indices) on ``device`` (self if already there)."""
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        src = self.source_indices.to(device) if self.source_indices is not None else None
        return dataclasses.replace(
            self, images=self.images.to(device), labels=self.labels.to(device), source_indices=src
        )

    def class_counts(self) -> torch.Tensor:
        """Number of samples per class, an ``int64`` tensor of length ``num_classes``."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes)


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``counts`` (largest-remainder rounding)."""
    exact = counts * (total / counts.sum())
    take = np.floor(exact).astype(np.int64)
    remainder = total - int(take.sum())
    if remainder > 0:
        # Ties broken by class index (stable sort), so the result is deterministic.
        order = np.argsort(-(exact - take), kind="stable")
        take[order[:remainder]] += 1
    return np.minimum(take, counts)


def subset(
    dataset: ImageTensorDataset,
    fraction: float | None = None,
    *,
    count: int | None = None,
    seed: int = 0,
    stratified: bool = True,
) -> ImageTensorDataset:
    """A random subset of ``dataset`` (e.g. the part of the training set a student sees).

    Give either ``fraction`` (in ``(0, 1]``) or ``count`` (number of samples). With
    ``stratified=True`` every class keeps its share (largest-remainder rounding, so the total is
    exact); otherwise samples are drawn uniformly. The kept samples stay in their original order
    and ``source_indices`` maps each one back to the full split (composed through nested subsets).
    The draw depends only on ``seed``.
    """
    n = len(dataset)
    if (fraction is None) == (count is None):
        raise DatasetError("subset: give exactly one of fraction= or count=")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise DatasetError(f"subset: fraction must be in (0, 1], got {fraction}")
        count = int(round(fraction * n))
    assert count is not None
    if not 0 < count <= n:
        raise DatasetError(f"subset: count must be in [1, {n}] for {dataset.name}, got {count}")

    rng = np.random.default_rng(seed)
    labels = dataset.labels.cpu().numpy()
    if stratified:
        counts = np.bincount(labels, minlength=dataset.num_classes)
        take = _allocate(counts, count)
        chosen = []
        for cls in np.nonzero(take)[0]:
            members = np.nonzero(labels == cls)[0]
            chosen.append(rng.choice(members, size=int(take[cls]), replace=False))
        keep = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
    else:
        keep = np.sort(rng.choice(n, size=count, replace=False))

    keep_t = torch.from_numpy(keep.astype(np.int64))
    source = dataset.source_indices.cpu()[keep_t] if dataset.source_indices is not None else keep_t
    dev = dataset.images.device
    keep_dev = keep_t.to(dev)
    return dataclasses.replace(
        dataset,
        images=dataset.images[keep_dev],
        labels=dataset.labels[keep_t.to(dataset.labels.device)],
        source_indices=source.to(dev),
    )
