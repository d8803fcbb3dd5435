"""Segmentation batches and loaders (training crops, whole evaluation images).

A training batch is :class:`kdlab.data.batch.Batch` ``(images, labels, index)``: normalised
``B x 3 x h x w`` float images, ``B x h x w`` int64 label maps (train ids, 255 =
``ignore_index``) and the samples' dataset indices, on the run's device, where ``(h, w)`` is the
crop (``segmentation.crop_size``: a square side or ``[h, w]``). Each sample is augmented
by :func:`kdlab.tasks.segmentation.transforms.augment_sample` from its own generator seeded with
``(seed, epoch, index)``; the epoch's order is a permutation drawn from a generator seeded with
``(seed, epoch)``. So an epoch's batches are a pure function of the seed and the epoch: resume,
even mid-epoch, sees the same batches, with or without DataLoader workers.

Under torchrun every rank draws the same epoch plan of GLOBAL batches (``batch_size *
world_size`` samples) and takes its own contiguous slice of each, as the detection loader does
(:mod:`kdlab.tasks.detection.data`); evaluation gives each rank a contiguous block of the split.

An evaluation batch is :class:`SegmentationEvalBatch`: lists of normalised ``3 x H x W`` images
(optionally resized to ``eval_size``) and their full-resolution int64 label maps, as sizes
differ between images (VOC, ADE20K).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kdlab.config import DataConfig, SegmentationConfig
from kdlab.core.distributed import split_batch
from kdlab.core.errors import ConfigError
from kdlab.core.signals import stop_signals_blocked, worker_ignores_stop_signals
from kdlab.data.batch import Batch
from kdlab.data.input_spec import InputSpec
from kdlab.data.loader import batches_per_rank, check_batch_and_rank, eval_block
from kdlab.tasks.segmentation.datasets import (
    SegmentationDataset,
    SegmentationSample,
    read_segmentation_split,
)
from kdlab.tasks.segmentation.transforms import augment_sample, crop_hw, resize_pair, sample_seed

log = logging.getLogger(__name__)

__all__ = ["SegmentationData", "SegmentationEvalBatch", "SegmentationLoader",
           "build_segmentation_data"]

#: splits whose decoded samples take at most this many bytes stay in memory (decoded once;
#: no DataLoader workers then).
CACHE_BYTES = 1024**3


class SegmentationEvalBatch(NamedTuple):
    """Evaluation images (normalised ``3 x h x w`` each, on the device), their int64 ``H x W``
    label maps at full resolution, and their dataset indices."""

    images: list[Tensor]
    labels: list[Tensor]
    index: list[int]


class _Samples(torch.utils.data.Dataset[tuple[Tensor, Tensor, int]]):
    """Decoded (and, in training, augmented) samples of one epoch, for DataLoader workers."""

    def __init__(self, loader: SegmentationLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.loader.prepare(index)


def _collate(items: list[tuple[Tensor, Tensor, int]]) -> list[tuple[Tensor, Tensor, int]]:
    return items


class SegmentationLoader:
    """Batches of a segmentation split (see the module docstring).

    ``train=True``: shuffled, augmented crops, incomplete last (global) batch dropped; otherwise
    every image once, in order, whole (resized to ``segmentation.eval_size`` when set).
    ``set_epoch(epoch, start_batch)`` must be called before iterating a training loader (the
    trainer does).
    """

    def __init__(self, dataset: SegmentationDataset, batch_size: int, device: torch.device,
                 seg: SegmentationConfig, *, train: bool, seed: int = 0, hflip: bool = True,
                 num_workers: int = 0, cache_bytes: int = CACHE_BYTES, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False) -> None:
        check_batch_and_rank(batch_size, rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.seg = seg
        self.train = train
        self.seed = seed
        self.hflip = hflip
        self.num_workers = num_workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 1
        self.start_batch = 0
        self.mean = torch.tensor(seg.image_mean, device=device).view(3, 1, 1)
        self.std = torch.tensor(seg.image_std, device=device).view(3, 1, 1)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, SegmentationSample] | None = None
        if len(dataset) > 0:
            first = dataset[0]
            if 4 * first.label.numel() * len(dataset) <= cache_bytes:
                self._cache = {0: first}

    def __len__(self) -> int:
        """Batches per epoch on this rank (:func:`~kdlab.data.loader.batches_per_rank`)."""
        return batches_per_rank(len(self.dataset), self.batch_size, self.rank,
                                self.world_size, self.train)

    def _eval_block(self) -> tuple[int, int]:
        """``[start, stop)``: this rank's contiguous block of the split in evaluation."""
        return eval_block(len(self.dataset), self.rank, self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to iterate next (its order and crops), from batch ``start_batch``."""
        self.epoch, self.start_batch = epoch, start_batch

    def plan(self) -> list[list[int]]:
        """This rank's index batches of the epoch."""
        if not self.train:
            start, stop = self._eval_block()
            b = self.batch_size
            return [list(range(i, min(i + b, stop))) for i in range(start, stop, b)]
        n = len(self.dataset)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        big = self.batch_size * self.world_size
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [order[i + lo:i + hi] for i in range(0, n - big + 1, big)]

    def _decoded(self, index: int) -> SegmentationSample:
        if self._cache is None:
            return self.dataset[index]
        sample = self._cache.get(index)
        if sample is None:
            sample = self._cache[index] = self.dataset[index]
        return sample

    def prepare(self, index: int) -> tuple[Tensor, Tensor, int]:
        """Sample ``index`` as the loader yields it, before normalisation: in training the
        augmented uint8 crop and labels of this epoch; otherwise the uint8 image (resized to
        ``eval_size`` when set) and its full-resolution labels."""
        s = self._decoded(index)
        seg = self.seg
        if self.train:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index))
            image, label = augment_sample(
                s.image, s.label, generator=g, crop_size=seg.crop_size,
                scale_range=seg.scale_range, base_size=seg.base_size,
                ignore_index=seg.ignore_index, hflip=self.hflip)
            return image, label, index
        image = s.image
        if seg.eval_size is not None:
            h, w = image.shape[-2:]
            short = min(h, w)
            size = (round(h * seg.eval_size / short), round(w * seg.eval_size / short))
            image, _ = resize_pair(image, s.label, size)
        return image, s.label, index

    def _items(self, batches: list[list[int]]) -> Iterator[list[tuple[Tensor, Tensor, int]]]:
        if self._cache is not None or self.num_workers == 0:
            for idx in batches:
                yield [self.prepare(i) for i in idx]
            return
        loader = torch.utils.data.DataLoader(
            _Samples(self), batch_sampler=batches, num_workers=self.num_workers,
            collate_fn=_collate, persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch),
            worker_init_fn=worker_ignores_stop_signals)
        with stop_signals_blocked():
            it = iter(loader)
        yield from it

    def normalize(self, image: Tensor) -> Tensor:
        """uint8 ``(..., 3, H, W)`` on the device -> ``(x / 255 - mean) / std`` float."""
        return (image.float().div_(255) - self.mean) / self.std

    def __iter__(self) -> Iterator[Any]:
        batches = self.plan()
        start = self.start_batch if self.train else 0
        self.start_batch = 0
        for items in self._items(batches[start:]):
            if self.train:
                images = torch.stack([it[0] for it in items]).to(self.device, non_blocking=True)
                labels = torch.stack([it[1] for it in items]).to(self.device).long()
                index = torch.tensor([it[2] for it in items], device=self.device)
                images = self.normalize(images).contiguous(memory_format=self.memory_format)
                yield Batch(images, labels, index)
            else:
                yield SegmentationEvalBatch(
                    [self.normalize(it[0].to(self.device)) for it in items],
                    [it[1].to(self.device).long() for it in items], [it[2] for it in items])


@dataclass
class SegmentationData:
    """The loaders of a segmentation run and what the models need to know about the data."""

    train_loader: SegmentationLoader
    test_loader: SegmentationLoader
    num_classes: int
    segmentation: SegmentationConfig
    in_channels: int = 3
    val_loader: Any = None
    dataset_label: str = ""

    @property
    def train_size(self) -> int:
        """Images in the training split."""
        return len(self.train_loader.dataset)

    @property
    def crop_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the training crop."""
        return crop_hw(self.segmentation.crop_size)

    @property
    def input_size(self) -> int:
        """The training crop's side where it is square, else its shorter side (one int for
        callers that build a square example input, which a segmenter of any input size takes)."""
        return min(self.crop_hw)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names in train-id order (channel ``k`` of the logits is ``classes[k]``)."""
        return self.test_loader.dataset.class_names

    @property
    def input_spec(self) -> InputSpec:
        """The model's input: RGB at any size (resized to ``eval_size`` when set), normalised
        ``(x / 255 - mean) / std``; the output's channel ``k`` names ``classes[k]``."""
        seg = self.segmentation
        return InputSpec(task="segmentation", classes=tuple(self.class_names), channels=3,
                         size=None, resize=seg.eval_size, crop=None, pad=0,
                         mean=tuple(seg.image_mean), std=tuple(seg.image_std),
                         normalization="scale_then_shift", dataset=self.dataset_label,
                         model_transform={"ignore_index": seg.ignore_index,
                                          "inference": seg.inference})

    @property
    def train_labels(self) -> Tensor:
        """Image-level labels do not exist in segmentation (methods needing them are refused)."""
        return torch.empty(0, dtype=torch.long)


def default_test_split(name: str) -> str:
    """The evaluated split when ``segmentation.test_split`` is null: ``test`` for the synthetic
    set (its generator writes train/test), ``val`` otherwise."""
    return "test" if name == "fm_segmentation" else "val"


def build_segmentation_data(cfg: DataConfig, seg: SegmentationConfig, *, seed: int,
                            device: torch.device, rank: int = 0, world_size: int = 1,
                            channels_last: bool = False) -> SegmentationData:
    """The train and test loaders of the segmentation data set ``cfg.name`` at ``cfg.root``,
    for ``rank`` of ``world_size`` processes. ``data.batch_size`` is the global batch (each rank
    takes ``batch_size / world_size``); ``data.eval_batch_size`` is per rank;
    ``data.val_fraction`` and ``data.train_fraction`` are not supported (a ConfigError).
    ``channels_last``: training images in that memory format (``runtime.channels_last``)."""
    if cfg.val_fraction > 0 or cfg.train_fraction < 1:
        raise ConfigError("data.val_fraction and data.train_fraction are not supported for "
                          "segmentation; remove them")
    assert cfg.root is not None  # the config requires it for segmentation datasets
    test_split = seg.test_split or default_test_split(cfg.name)
    train = read_segmentation_split(cfg.name, cfg.root, seg.train_split,
                                    voc_augmented=seg.voc_augmented)
    test = read_segmentation_split(cfg.name, cfg.root, test_split)
    if train.classes != test.classes:
        raise ConfigError(f"the {seg.train_split!r} and {test_split!r} splits of {cfg.root} have "
                          "different class lists; they must share one")
    if len(train) < cfg.batch_size:
        raise ConfigError(f"config key 'data.batch_size': {cfg.batch_size} is larger than the "
                          f"training split ({len(train)} images)")
    per_rank = split_batch(cfg.batch_size, world_size)
    return SegmentationData(
        train_loader=SegmentationLoader(train, per_rank, device, seg, train=True, seed=seed,
                                        hflip=cfg.hflip, num_workers=cfg.num_workers,
                                        rank=rank, world_size=world_size,
                                        channels_last=channels_last),
        test_loader=SegmentationLoader(test, cfg.eval_batch_size, device, seg, train=False,
                                       num_workers=cfg.num_workers, rank=rank,
                                       world_size=world_size),
        num_classes=train.num_classes, segmentation=seg)
