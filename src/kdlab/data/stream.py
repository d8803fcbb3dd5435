"""Streaming large image datasets (ImageNet, CUB-200, class folders) through DataLoader workers.

Large datasets cannot live on the device (architecture, performance principles); they are
decoded and augmented by ``num_workers`` processes and copied to the device batch by batch.
:func:`make_stream_loader` returns a :class:`StreamLoader` that yields the same
``Batch(images, labels, index)`` as :class:`kdlab.data.loader.DeviceLoader`, with images already
normalised float32 on the target device.

Determinism: the sampler yields ``(index, epoch)`` pairs and the dataset seeds each sample's
augmentation from ``(seed, epoch, index)``, so a batch does not depend on the number of workers
or on persistent workers, and ``set_epoch(e)`` reproduces epoch ``e`` of an uninterrupted run.
The loader never draws from torch's global RNG (which the model's dropout and the methods use, and
which a checkpoint saves): a DataLoader draws its workers' base seed once per iterator from its
``generator``, the global RNG when there is none, so every new iterator (each epoch with 0 or
non-persistent workers, once per process with persistent ones, again after a resume) would shift
the global stream. Here the DataLoader has its own ``torch.Generator``, seeded from
:func:`loader_seed` ``(seed, epoch)`` by ``set_epoch`` (``(seed, 0)`` for evaluation loaders).

Signals: workers ignore SIGINT, and SIGTERM from anyone but the main process
(:func:`kdlab.core.signals.worker_ignores_stop_signals`), and are forked with both blocked, so a
signal to the whole process group (a scheduler's pre-emption, Ctrl-C) reaches the main process
only; it finishes its step and ends the workers. A worker that dies anyway is reported as a
one-line :class:`DatasetError` from the fetch that notices it.

Unreadable images (``on_error``):

* ``"stop"``: raise :class:`DatasetError` naming the file.
* ``"skip"`` (default): the sample is replaced by the next readable one in index order
  (``index + 1, index + 2, ...`` modulo ``N``), image, label and index together, so the batch
  keeps its size and the substitution depends only on which files are unreadable. Each skip is
  counted in :attr:`StreamLoader.skipped` and its path and reason kept in
  :attr:`StreamLoader.errors` (collected from the workers through the batches). To drop
  unreadable files instead, run :func:`verify_index` once at scan time (``verify=True``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from kdlab.core.errors import DatasetError
from kdlab.core.signals import stop_signals_blocked, worker_ignores_stop_signals
from kdlab.data.cub import cub_index
from kdlab.data.folder import FileIndex, imagenet_index, scan_class_folder
from kdlab.data.loader import Batch, check_batch_and_rank, epoch_seed
from kdlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    cub_eval_transform,
    cub_train_transform,
    imagenet_eval_transform,
    imagenet_train_transform,
)

__all__ = [
    "STREAM_DATASETS",
    "StreamDataset",
    "StreamLoader",
    "load_stream_dataset",
    "loader_seed",
    "make_stream_loader",
    "read_image",
    "verify_index",
]

OnError = Literal["skip", "stop"]
STREAM_DATASETS: tuple[str, ...] = ("imagenet", "cub200", "folder")
_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
#: mixed into :func:`loader_seed` so that it differs from the other seeds made of (seed, epoch)
_LOADER_SEED_TAG = 0x6B646C6F


def loader_seed(seed: int, epoch: int) -> int:
    """The seed of a stream loader's own ``torch.Generator`` in epoch ``epoch``: a well-mixed
    function of ``(seed, epoch)`` only. The DataLoader draws its workers' base seed from that
    generator (kdlab's augmentation does not use the workers' RNGs; it is seeded per sample)."""
    return epoch_seed(seed, epoch, _LOADER_SEED_TAG)


def read_image(path: str) -> Image.Image:
    """Open and fully decode ``path`` as RGB (raises Pillow's error when unreadable)."""
    with Image.open(path) as img:
        return img.convert("RGB")


class StreamDataset(Dataset):
    """A map-style dataset over a :class:`FileIndex`: item ``i`` (or ``(i, epoch)``) is
    ``(image, label, index, errors)`` where ``errors`` lists ``(path, reason)`` of unreadable
    files skipped to produce it (empty normally).

    Args:
        index: the split's file list.
        transform: ``transform(pil_image, rng) -> Tensor`` (see :mod:`kdlab.data.transforms`).
        on_error: ``"skip"`` or ``"stop"`` (module docstring).
        seed: base seed of the per-sample augmentation generator.
        mean, std: the normalisation the loader applies when the transform returns ``uint8``.
    """

    def __init__(
        self,
        index: FileIndex,
        transform: Callable[[Image.Image, np.random.Generator], torch.Tensor],
        on_error: OnError = "skip",
        seed: int = 0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if on_error not in ("skip", "stop"):
            raise DatasetError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
        if len(index) == 0:
            raise DatasetError(f"{index.name}: the split is empty")
        self.index = index
        self.transform = transform
        self.on_error = on_error
        self.seed = int(seed)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_classes(self) -> int:
        """Number of classes of the split."""
        return self.index.num_classes

    @property
    def name(self) -> str:
        """Dataset name."""
        return self.index.name

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int, int, list[Any]]:
        i, epoch = (item, 0) if isinstance(item, int) else (int(item[0]), int(item[1]))
        n = len(self.index)
        errors: list[tuple[str, str]] = []
        for k in range(n):
            j = (i + k) % n
            path = self.index.paths[j]
            try:
                img = read_image(path)
            except _READ_ERRORS as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if self.on_error == "stop":
                    raise DatasetError(f"{self.name}: cannot read image {path}: {reason}") from e
                errors.append((path, reason))
                continue
            rng = np.random.default_rng([self.seed, epoch, j])
            return self.transform(img, rng), self.index.labels[j], j, errors
        raise DatasetError(f"{self.name}: no readable image in the whole split ({n} files)")


class _EpochTagged(Sampler[tuple[int, int]]):
    """Tags every index of ``sampler`` with the current epoch (for per-sample seeding)."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler = sampler
        self.epoch = 0
        #: samples of the epoch the next iteration skips (a run resumed mid-epoch); one-shot.
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        set_inner = getattr(self.sampler, "set_epoch", None)
        if callable(set_inner):
            set_inner(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip, self.skip = self.epoch, self.skip, 0
        return ((int(i), epoch) for i in itertools.islice(iter(self.sampler), skip, None))

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class _ShardSampler(Sampler[int]):
    """Evaluation shard ``[N * rank // W, N * (rank + 1) // W)`` in order (no padding, so every
    sample is evaluated exactly once over all ranks, as :class:`DeviceLoader` does)."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        self.start, self.stop = n * rank // world_size, n * (rank + 1) // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _Shuffle(Sampler[int]):
    """Single-process shuffling seeded from ``(seed, epoch)``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _collate(samples: list[tuple[Any, int, int, list[Any]]]) -> tuple[Any, ...]:
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    index = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    errors = [e for s in samples for e in s[3]]
    return images, labels, index, errors


def _worker_died(e: RuntimeError, name: str) -> DatasetError | None:
    """torch's report of a dead worker ("DataLoader worker (pid N) is killed by signal: ...",
    "... exited unexpectedly") as a one-line :class:`DatasetError`; None for other errors."""
    text = " ".join(str(e).split())
    if not text.startswith("DataLoader worker (pid"):
        return None
    return DatasetError(f"{name}: a data loading worker process ended: {text.split('. ')[0]}; "
                        "continue from the last checkpoint with --resume")


def _clean_worker_error(e: DatasetError) -> DatasetError:
    """DataLoader re-raises worker errors with a traceback in the message; keep its last line."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "DatasetError: " in ln:
            return DatasetError(ln.split("DatasetError: ", 1)[1])
    return e


class StreamLoader:
    """Iterates ``Batch(images, labels, index)`` of a :class:`StreamDataset` (see
    :func:`make_stream_loader`). ``images`` are float32, normalised, on ``device``."""

    def __init__(
        self,
        dataset: StreamDataset,
        loader: DataLoader,
        sampler: _EpochTagged,
        device: torch.device,
        train: bool,
        rank: int,
        world_size: int,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.loader = loader
        self.sampler = sampler
        #: seeds the DataLoader's own generator (:func:`loader_seed`), never the global RNG
        self.seed = int(seed)
        if loader.generator is None:
            loader.generator = torch.Generator()
        self.generator: torch.Generator = loader.generator
        self.generator.manual_seed(loader_seed(self.seed, 0))
        self.device = device
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.skipped = 0
        self.errors: dict[str, str] = {}
        self._mean = torch.tensor(dataset.mean, device=device).view(1, -1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(dataset.std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.loader)

    @property
    def num_classes(self) -> int:
        """Number of classes of the dataset."""
        return self.dataset.num_classes

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``'s shuffle and augmentation (call before iterating).

        ``start_batch``: the next iteration begins at that batch of the epoch (a run resumed
        mid-epoch; per-sample augmentation is seeded by (sample, epoch), so the batches are
        those an iteration from the start would yield from there). The loader's own generator
        is seeded from ``(seed, epoch)``; torch's global RNG is not touched."""
        if not 0 <= start_batch <= len(self):
            raise DatasetError(f"start_batch {start_batch} is outside the epoch's "
                               f"{len(self)} batches")
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(loader_seed(self.seed, epoch))
        self.sampler.skip = start_batch * int(self.loader.batch_size or 1)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = (x.float() * (1.0 / 255.0) - self._mean) * self._inv_std
        return x

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches. Raises :class:`DatasetError` for an unreadable image with
        ``on_error="stop"`` and for a worker process that died (one line each)."""
        with stop_signals_blocked():  # workers forked here start with the stop signals blocked
            it = iter(self.loader)
        while True:
            try:
                images, labels, index, errors = next(it)
            except StopIteration:
                return
            except DatasetError as e:
                raise _clean_worker_error(e) from None
            except RuntimeError as e:
                died = _worker_died(e, self.dataset.name)
                if died is None:
                    raise
                raise died from e
            except (EOFError, ConnectionError) as e:
                # a worker killed while it handed over a batch's shared-memory file descriptor
                raise DatasetError(f"{self.dataset.name}: a data loading worker process ended "
                                   f"while sending a batch ({type(e).__name__}); continue from "
                                   "the last checkpoint with --resume") from e
            for path, reason in errors:
                self.skipped += 1
                self.errors[path] = reason
            yield Batch(
                self._finish(images),
                labels.to(self.device, non_blocking=True),
                index.to(self.device, non_blocking=True),
            )


def _sampler(dataset: StreamDataset, train: bool, rank: int, world_size: int, seed: int
             ) -> Sampler[int]:
    """Training: the seeded shuffle (one rank) or :class:`DistributedSampler`; evaluation: this
    rank's contiguous shard."""
    if train and world_size > 1:
        return DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    if train:
        return _Shuffle(len(dataset), seed)
    return _ShardSampler(len(dataset), rank, world_size)


def _worker_options(num_workers: int, persistent_workers: bool | None,
                    prefetch_factor: int | None) -> dict[str, Any]:
    """The DataLoader's worker keywords: none without workers; else persistent workers (by
    default), the prefetch depth, and workers that ignore stop signals from other processes."""
    if num_workers == 0:
        return {}
    options: dict[str, Any] = {
        "worker_init_fn": worker_ignores_stop_signals,
        "persistent_workers": True if persistent_workers is None else persistent_workers,
    }
    if prefetch_factor is not None:
        options["prefetch_factor"] = prefetch_factor
    return options


def make_stream_loader(
    dataset: StreamDataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 4,
) -> StreamLoader:
    """A multi-worker loader over ``dataset`` yielding ``Batch(images, labels, index)``.

    Args:
        dataset: a :class:`StreamDataset`.
        batch_size: samples per batch on this rank.
        train: shuffle (seeded from ``(seed, epoch)``) and drop the last partial batch;
            evaluation keeps the order and every sample.
        num_workers: decoding processes (0: decode in the calling process).
        rank, world_size: DDP sharding. Training uses :class:`DistributedSampler` (each rank a
            disjoint, equally long part of the same permutation); evaluation takes the
            contiguous shard ``[N*rank//W, N*(rank+1)//W)`` without padding.
        seed: shuffle seed, and the seed of the DataLoader's own generator
            (:func:`loader_seed`; the augmentation seed is ``dataset.seed``).
        device: where batches are delivered (``non_blocking`` copies from pinned memory).
        drop_last: default ``train``.
        pin_memory: default ``True`` when ``device`` is CUDA.
        persistent_workers: default ``True`` when ``num_workers > 0``.
        prefetch_factor: batches prefetched per worker (ignored with 0 workers).

    Workers ignore SIGINT and SIGTERM from other processes than this one (module docstring).
    """
    check_batch_and_rank(batch_size, rank, world_size)
    if num_workers < 0:
        raise DatasetError(f"num_workers must be >= 0, got {num_workers}")
    dev = torch.device(device)
    sampler = _EpochTagged(_sampler(dataset, train, rank, world_size, seed))
    workers_kw = _worker_options(num_workers, persistent_workers, prefetch_factor)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=(dev.type == "cuda") if pin_memory is None else pin_memory,
        drop_last=train if drop_last is None else drop_last,
        generator=torch.Generator(),
        **workers_kw,
    )
    return StreamLoader(dataset, loader, sampler, dev, train, rank, world_size, seed)


def verify_index(index: FileIndex) -> FileIndex:
    """Drop unreadable files from ``index`` at scan time (each file is fully decoded once).

    Returns a new :class:`FileIndex` whose ``dropped`` lists the removed paths. Costs one decode
    per image (minutes for ImageNet on many cores); the default ``on_error="skip"`` instead
    substitutes at load time.
    """
    keep_p: list[str] = []
    keep_l: list[int] = []
    dropped = list(index.dropped)
    for path, label in zip(index.paths, index.labels, strict=True):
        try:
            read_image(path)
        except _READ_ERRORS:
            dropped.append(path)
            continue
        keep_p.append(path)
        keep_l.append(label)
    return FileIndex(keep_p, keep_l, index.classes, index.name, index.root, dropped)


def folder_split(root: str | os.PathLike[str], train: bool) -> str:
    """``root/train`` or ``root/val`` of a class-folder data set.

    Both must exist: a folder of class folders without that split has no test set, and using
    its images as both the training and the test set would report training accuracy as test
    accuracy, so it is a :class:`DatasetError` naming the fix.
    """
    base = os.fspath(root)
    splits = {name: os.path.join(base, name) for name in ("train", "val")}
    if all(os.path.isdir(p) for p in splits.values()):
        return splits["train" if train else "val"]
    missing = " and ".join(f"{name}/" for name, p in splits.items() if not os.path.isdir(p))
    raise DatasetError(
        f"folder data at {base} has no {missing}: kdlab needs {base}/train/<class>/ and "
        f"{base}/val/<class>/ (the val images are the test set); move a share of each class's "
        f"images into val/, e.g. 10-20%, never the same images as train/")


def load_stream_dataset(
    name: str,
    root: str | os.PathLike[str],
    train: bool = True,
    *,
    on_error: OnError = "skip",
    seed: int = 0,
    image_size: int = 224,
    resize: int = 256,
    verify: bool = False,
    hflip: bool = True,
    crop_scale: tuple[float, float] = (0.08, 1.0),
) -> StreamDataset:
    """Split ``train``/eval of ``"imagenet"``, ``"cub200"`` or ``"folder"`` as a
    :class:`StreamDataset` with its protocol's transforms (``uint8`` out; the loader normalises
    with ImageNet mean/std on the device).

    * ``imagenet``: ``root/train|val/<wnid>/``; random-resized-crop + flip / resize + center crop.
    * ``cub200``: the official CUB_200_2011 layout; 256x256 + random crop + flip / center crop.
    * ``folder``: ``root/train/<class>/`` and ``root/val/<class>/`` (:func:`folder_split`);
      ImageNet transforms.

    ``hflip`` turns the training flip off; ``crop_scale`` is the random-resized crop's area
    fraction range (imagenet, folder).
    """
    key = name.lower().replace("-", "_")
    if key == "imagenet":
        index = imagenet_index(root, train)
    elif key in ("cub200", "cub", "cub_200_2011"):
        index = cub_index(root, train)
    elif key == "folder":
        index = scan_class_folder(folder_split(root, train))
    else:
        raise DatasetError(
            f"unknown stream dataset {name!r}; valid names: imagenet, cub200, folder"
        )
    if verify:
        index = verify_index(index)
    if key.startswith("cub"):
        transform = (
            cub_train_transform(resize, image_size, normalize=False, flip=hflip)
            if train
            else cub_eval_transform(resize, image_size, normalize=False)
        )
    else:
        transform = (
            imagenet_train_transform(image_size, normalize=False, scale=crop_scale, flip=hflip)
            if train
            else imagenet_eval_transform(resize, image_size, normalize=False)
        )
    return StreamDataset(index, transform, on_error=on_error, seed=seed)
