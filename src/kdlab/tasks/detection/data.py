"""Detection batches and loaders over COCO-format splits (:class:`CocoDetection`).

A :class:`DetectionBatch` is what torchvision's detection models take: a list of ``3 x H x W``
float images in ``[0, 1]`` (sizes may differ; the detector's transform resizes, normalises and
pads them) and a list of target dicts (``boxes`` ``N x 4`` xyxy pixels, ``labels`` ``N`` in
``1..K``), on the run's device, plus the COCO image ids (for COCO evaluation).

:class:`DetectionLoader` shuffles with a generator seeded from ``(seed, epoch)`` and flips each
training image horizontally with probability 1/2 from the same generator, so an epoch's batches
are a pure function of the seed and the epoch (resume, even mid-epoch, sees the same batches).

Under torchrun (``rank``/``world_size``) every rank draws the same epoch plan, of GLOBAL batches
(``batch_size * world_size`` images, the single-process batch of ``data.batch_size``), and takes
its own contiguous ``batch_size`` slice of each: the ranks' shares are disjoint, and step ``k``'s
batches of all ranks together are exactly the single-process batch ``k`` (same images, same
flips), whatever the number of processes. Evaluation gives each rank a contiguous block of the
split (sizes differ by at most one image); together the blocks cover every image once, in order.

Aspect-ratio grouping (``detection.aspect_ratio_group_factor`` ``k >= 0``; -1, the default, is
off), the batching of torchvision's detection reference: every global batch is drawn from one
group of images of similar width / height (:func:`aspect_ratio_groups`), so the detector pads
less. The plan (:func:`group_global_batches`) walks the epoch's shuffled order and emits a global
batch whenever a group has collected ``batch_size * world_size`` images; the groups' leftovers
are then pooled (the groups in a random order drawn from the epoch's generator) and cut into
mixed global batches, the incomplete last one dropped. The epoch keeps ``n // global batch``
batches and drops ``n mod global batch`` images, as without grouping (which images differ); each
image keeps its flip. The plan is a function of ``(seed, epoch)`` and the global batch only, so
the ranks take slices of the same global batches and a resume sees them again.
Decoded images are kept in memory when the split is small (``cache_bytes``); larger splits (COCO)
are decoded by ``num_workers`` DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kdlab.config import DataConfig, DetectionConfig
from kdlab.core.distributed import split_batch
from kdlab.core.errors import ConfigError
from kdlab.core.signals import stop_signals_blocked, worker_ignores_stop_signals
from kdlab.data.input_spec import InputSpec
from kdlab.data.loader import batches_per_rank, check_batch_and_rank, eval_block
from kdlab.tasks.detection.coco import CocoDetection, DetectionSample

log = logging.getLogger(__name__)

__all__ = ["DetectionBatch", "DetectionData", "DetectionLoader", "aspect_ratio_groups",
           "build_detection_data", "group_global_batches"]

#: splits whose decoded images take at most this many bytes stay in memory after the first epoch.
CACHE_BYTES = 2 * 1024**3


class DetectionBatch(NamedTuple):
    """One detection batch on the device (see the module docstring)."""

    images: list[Tensor]
    targets: list[dict[str, Tensor]]
    image_ids: list[int]


def hflip_sample(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """The image mirrored left-right and its boxes mirrored with it: ``x1' = W - x2``,
    ``x2' = W - x1`` (continuous pixel coordinates, as torchvision's reference transform)."""
    width = image.shape[-1]
    flipped = boxes.clone()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return image.flip(-1), flipped


def aspect_ratio_groups(sizes: Sequence[tuple[int, int]], factor: int) -> list[int]:
    """The aspect-ratio group of every image of ``(height, width)`` ``sizes``: the number of
    edges ``e_j`` with ``e_j <= log2(width / height)``.

    ``factor`` ``k >= 1``: the edges ``j / k`` for ``j = -k..k`` (ratios 1/2 to 2 in ``2k``
    steps of equal log-width, plus one open group on either side: ``2k + 2`` groups; ``k = 3``
    is torchvision's detection reference); ``k = 0``: one edge at ratio 1 (portrait, landscape
    and square together). A ConfigError for ``k < 0`` (grouping is off).
    """
    if factor < 0:
        raise ConfigError(f"config key 'detection.aspect_ratio_group_factor': {factor} turns "
                          "grouping off; give k >= 0 to group")
    hw = torch.tensor(list(sizes), dtype=torch.float64).view(-1, 2)
    log_ratio = torch.log2(hw[:, 1] / hw[:, 0])
    edges = (torch.arange(-factor, factor + 1, dtype=torch.float64) / factor if factor
             else torch.zeros(1, dtype=torch.float64))
    return torch.bucketize(log_ratio, edges, right=True).tolist()


def group_global_batches(order: Sequence[int], groups: Sequence[int], size: int,
                         group_order: Sequence[int]) -> list[list[int]]:
    """The epoch's global batches of ``size`` images, each from one aspect-ratio group where
    possible (the module docstring).

    ``order``: the epoch's shuffled image indices; ``groups[i]``: image ``i``'s group;
    ``group_order``: the order in which the groups' leftovers are pooled. A batch is emitted
    when its group has collected ``size`` images of ``order``; the leftovers (fewer than
    ``size`` per group) are concatenated in ``group_order`` and cut into batches, the last
    incomplete one dropped. Always ``len(order) // size`` batches, no image twice.
    """
    pending: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for index in order:
        bucket = pending.setdefault(groups[index], [])
        bucket.append(index)
        if len(bucket) == size:
            batches.append(bucket)
            pending[groups[index]] = []
    pool = [index for g in group_order for index in pending.get(g, [])]
    batches += [pool[i:i + size] for i in range(0, len(pool) - size + 1, size)]
    return batches


class _Decode(torch.utils.data.Dataset[DetectionSample]):
    """The dataset as a torch Dataset (for DataLoader workers)."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> DetectionSample:
        return self.dataset[index]


class DetectionLoader:
    """Batches of a COCO-format split (see the module docstring).

    ``train=True``: shuffled, flipped (``hflip``), incomplete last (global) batch dropped;
    otherwise every image once, in order. ``set_epoch(epoch, start_batch)`` must be called
    before iterating a training loader (the trainer does). ``batch_size`` is the per-rank batch;
    ``rank``/``world_size`` shard the split as the module docstring says (a
    :class:`DatasetError` for a rank outside the world). ``aspect_ratio_group_factor`` ``k >= 0``
    draws every training batch from one aspect-ratio group (the module docstring); -1: off.
    """

    def __init__(self, dataset: CocoDetection, batch_size: int, device: torch.device, *,
                 train: bool, seed: int = 0, hflip: bool = True, num_workers: int = 0,
                 cache_bytes: int = CACHE_BYTES, rank: int = 0, world_size: int = 1,
                 aspect_ratio_group_factor: int = -1) -> None:
        check_batch_and_rank(batch_size, rank, world_size)
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = device
        self.train = train
        self.seed = seed
        self.hflip = hflip and train
        self.num_workers = num_workers
        self.epoch = 1
        self.start_batch = 0
        pixels = sum(3 * h * w for h, w in dataset.sizes) // self.world_size
        self._cache: dict[int, DetectionSample] | None = {} if pixels <= cache_bytes else None
        #: every training image's aspect-ratio group (None: grouping off)
        self.groups: list[int] | None = None
        if train and aspect_ratio_group_factor >= 0:
            self.groups = aspect_ratio_groups(dataset.sizes, aspect_ratio_group_factor)
            counts = torch.bincount(torch.tensor(self.groups, dtype=torch.long)).tolist()
            log.info("aspect-ratio groups (factor %d): %s images", aspect_ratio_group_factor,
                     counts)

    def __len__(self) -> int:
        """Batches per epoch on this rank (:func:`~kdlab.data.loader.batches_per_rank`)."""
        return batches_per_rank(len(self.dataset), self.batch_size, self.rank,
                                self.world_size, self.train)

    def _eval_block(self) -> tuple[int, int]:
        """``[start, stop)``: this rank's contiguous block of the split in evaluation."""
        return eval_block(len(self.dataset), self.rank, self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch to iterate next (its shuffle and flips), from batch ``start_batch``."""
        self.epoch, self.start_batch = epoch, start_batch

    def _plan(self) -> tuple[list[list[int]], list[list[bool]]]:
        """This rank's index batches and flip decisions of the epoch (a function of seed, epoch,
        rank and world size; the global plan depends on seed and epoch only)."""
        n = len(self.dataset)
        if not self.train:
            start, stop = self._eval_block()
            b = self.batch_size
            order = list(range(start, stop))
            return ([order[i:i + b] for i in range(0, len(order), b)],
                    [[False] * len(order[i:i + b]) for i in range(0, len(order), b)])
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist()
        flips = (torch.rand(n, generator=g) < 0.5).tolist() if self.hflip else [False] * n
        big = self.batch_size * self.world_size  # the global (single-process) batch
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        if self.groups is not None:
            return self._grouped_plan(order, flips, g, slice(lo, hi))
        starts = range(0, n - big + 1, big)  # the incomplete last global batch is dropped
        return ([order[i + lo:i + hi] for i in starts], [flips[i + lo:i + hi] for i in starts])

    def _grouped_plan(self, order: list[int], flips: list[bool], g: torch.Generator,
                      share: slice) -> tuple[list[list[int]], list[list[bool]]]:
        """This rank's ``share`` of the aspect-ratio-grouped global batches of the epoch
        (:func:`group_global_batches`); the leftovers' group order comes from ``g`` after the
        shuffle and the flips, and each image keeps the flip of its position in ``order``."""
        assert self.groups is not None
        group_order = torch.randperm(max(self.groups) + 1, generator=g).tolist()
        batches = group_global_batches(order, self.groups, self.batch_size * self.world_size,
                                       group_order)
        flip_of = dict(zip(order, flips, strict=True))
        mine = [batch[share] for batch in batches]
        return mine, [[flip_of[i] for i in batch] for batch in mine]

    def _samples(self, batches: list[list[int]]) -> Iterator[list[DetectionSample]]:
        if self._cache is not None or self.num_workers == 0:
            for idx in batches:
                yield [self._sample(i) for i in idx]
            return
        # the loader's own generator: the workers' base seed never comes from (nor shifts)
        # torch's global RNG, which the detector's RoI sampling draws from (exact resume)
        loader = torch.utils.data.DataLoader(
            _Decode(self.dataset), batch_sampler=batches, num_workers=self.num_workers,
            collate_fn=list, persistent_workers=False,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch),
            worker_init_fn=worker_ignores_stop_signals)
        with stop_signals_blocked():  # workers forked here start with the stop signals blocked
            batches_iter = iter(loader)
        yield from batches_iter

    def _sample(self, index: int) -> DetectionSample:
        if self._cache is None:
            return self.dataset[index]
        sample = self._cache.get(index)
        if sample is None:
            sample = self._cache[index] = self.dataset[index]
        return sample

    def __iter__(self) -> Iterator[DetectionBatch]:
        batches, flips = self._plan()
        start = self.start_batch if self.train else 0
        self.start_batch = 0
        for samples, flip in zip(self._samples(batches[start:]), flips[start:], strict=True):
            images, targets = [], []
            for s, f in zip(samples, flip, strict=True):
                image = s.image.to(self.device, non_blocking=True).float().div_(255)
                boxes = s.boxes.to(self.device)
                if f:
                    image, boxes = hflip_sample(image, boxes)
                images.append(image)
                targets.append({"boxes": boxes, "labels": s.labels.to(self.device)})
            yield DetectionBatch(images, targets, [s.image_id for s in samples])


@dataclass
class DetectionData:
    """The loaders of a detection run and what the models need to know about the data."""

    train_loader: DetectionLoader
    test_loader: DetectionLoader
    num_classes: int
    detection: DetectionConfig
    in_channels: int = 3
    val_loader: Any = None
    #: the data set's name in summaries (``coco:<folder>``)
    dataset_label: str = "coco"

    @property
    def train_size(self) -> int:
        """Images in the training split."""
        return len(self.train_loader.dataset)

    @property
    def input_size(self) -> int:
        """The side images are resized to (the shorter one)."""
        return self.detection.min_size

    @property
    def input_spec(self) -> InputSpec:
        """The detector's input: RGB ``x / 255`` at any size, labels ``1..K`` naming
        ``classes[label - 1]``; the resize and normalisation happen inside the model
        (``model_transform``)."""
        d = self.detection
        return InputSpec(task="detection",
                         classes=tuple(self.test_loader.dataset.class_names),
                         channels=3, size=None, resize=None, crop=None, pad=0,
                         normalization="unit", dataset=self.dataset_label,
                         model_transform={"min_size": d.min_size, "max_size": d.max_size,
                                          "image_mean": list(d.image_mean),
                                          "image_std": list(d.image_std)})

    @property
    def train_labels(self) -> Tensor:
        """Image-level labels do not exist in detection (methods needing them are refused)."""
        return torch.empty(0, dtype=torch.long)


def build_detection_data(cfg: DataConfig, detection: DetectionConfig, *, seed: int,
                         device: torch.device, rank: int = 0,
                         world_size: int = 1) -> DetectionData:
    """The train and test loaders of the COCO-format dataset at ``cfg.root``, for ``rank`` of
    ``world_size`` processes.

    Uses ``detection.train_split``/``test_split``; the test split keeps every image (COCO
    evaluation scores all of them, gathered over the ranks). ``data.batch_size`` is the global
    batch: each rank's training batch is ``batch_size / world_size`` (a ConfigError unless it
    divides); ``data.eval_batch_size`` is per rank. ``data.val_fraction`` and
    ``train_fraction`` are not supported for detection (a ConfigError says so).
    ``detection.aspect_ratio_group_factor`` groups the training batches by aspect ratio
    (:class:`DetectionLoader`)."""
    if cfg.val_fraction > 0 or cfg.train_fraction < 1:
        raise ConfigError("data.val_fraction and data.train_fraction are not supported for "
                          "detection; make a split with the importer instead")
    assert cfg.root is not None  # the config requires it for detection datasets
    train = CocoDetection.from_split(cfg.root, detection.train_split,
                                     drop_empty=detection.drop_empty)
    test = CocoDetection.from_split(cfg.root, detection.test_split)
    if train.num_classes != test.num_classes or train.categories != test.categories:
        raise ConfigError(f"the {detection.train_split!r} and {detection.test_split!r} splits of "
                          f"{cfg.root} have different categories; they must share one list")
    per_rank = split_batch(cfg.batch_size, world_size)
    if len(train) < cfg.batch_size:
        raise ConfigError(f"config key 'data.batch_size': {cfg.batch_size} is larger than the "
                          f"training split ({len(train)} images)")
    return DetectionData(
        train_loader=DetectionLoader(train, per_rank, device, train=True, seed=seed,
                                     hflip=cfg.hflip, num_workers=cfg.num_workers, rank=rank,
                                     world_size=world_size,
                                     aspect_ratio_group_factor=detection.aspect_ratio_group_factor),
        test_loader=DetectionLoader(test, cfg.eval_batch_size, device, train=False,
                                    num_workers=cfg.num_workers, rank=rank,
                                    world_size=world_size),
        num_classes=train.num_classes,
        detection=detection,
    )
