"""A device-resident data loader with batched, deterministic augmentation.

The whole split stays on the device as ``uint8``; each batch is gathered, augmented (random crop
with zero padding + horizontal flip), converted to float and normalised there, with no per-sample
Python loop and no host synchronisation.

Randomness: all random numbers of an epoch (permutation, crop offsets, flips) are drawn at the
start of the epoch by a CPU :class:`torch.Generator` seeded from ``(seed, epoch)`` only, and
moved to the device in one copy. Hence the batches are identical on CPU and GPU, identical across
loader instances, and a run resumed at epoch ``e`` (``set_epoch(e)``) sees exactly the data of an
uninterrupted run. Crop offsets and flips belong to positions of the global permutation, so they
do not depend on ``world_size``. The loader never draws from torch's global RNG (the stream that
dropout and the methods use, saved in checkpoints), so iterating it, from the start of an epoch
or from a batch inside it, leaves that stream as it was.

Normalisation computes ``(x - 255 * mean) * (1 / (255 * std))`` in float32: two correctly rounded
operations that no compiler can contract into an FMA, so CPU and GPU give bit-identical floats.

Two views (:meth:`DeviceLoader.set_views`, for methods such as MLKD): the strong view of each
image is its own random crop + flip of the raw image followed by RandAugment
(:mod:`kdlab.data.randaugment`), as the official MLKD pipeline; its draws come from a second
generator seeded from ``(seed, epoch)`` (:meth:`DeviceLoader.strong_plan`), so a loader without
the strong view draws exactly what it always drew.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.core.errors import DatasetError
from kdlab.data.batch import Batch
from kdlab.data.dataset import ImageTensorDataset
from kdlab.data.randaugment import (
    RandAugmentDraws,
    draw_rand_augment,
    rand_augment,
    strong_view_seed,
)

__all__ = ["Batch", "DeviceLoader", "EpochPlan", "check_batch_and_rank", "epoch_seed"]


class EpochPlan(NamedTuple):
    """The random draws of one epoch for this rank (CPU ``int64`` tensors of equal length):
    dataset ``index`` in visiting order, crop offsets ``dy``/``dx`` in ``[0, 2 * padding]``
    (into the padded image) and ``flip`` (0/1)."""

    index: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor


def epoch_seed(seed: int, epoch: int, *tags: int) -> int:
    """The CPU generator seed of an epoch: a well-mixed function of ``(seed, epoch)`` and of
    ``tags`` (constants that keep generators of different purposes apart)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFF, int(epoch), *tags]
    state = np.random.SeedSequence(entropy).generate_state(2)
    return (int(state[0]) << 31) ^ int(state[1])


def check_batch_and_rank(batch_size: int, rank: int, world_size: int) -> None:
    """A one-line :class:`DatasetError` for a batch size below 1 or a rank outside the world."""
    if batch_size < 1:
        raise DatasetError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetError(f"need 0 <= rank < world_size, got rank={rank}, ws={world_size}")


def eval_block(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)``: rank ``rank``'s contiguous block of ``n`` evaluation items (every
    item once over the ranks, blocks in rank order)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def batches_per_rank(n: int, batch_size: int, rank: int, world_size: int, train: bool) -> int:
    """Batches per epoch on one rank of a loader of ``n`` items and per-rank ``batch_size``:
    training drops the incomplete last global batch (the same count on every rank);
    evaluation covers the rank's :func:`eval_block`."""
    if train:
        return n // (batch_size * world_size)
    start, stop = eval_block(n, rank, world_size)
    return -(-(stop - start) // batch_size)


def _check_loader_args(batch_size: int, rank: int, world_size: int, padding: int,
                       normalize: bool, dtype: torch.dtype) -> None:
    check_batch_and_rank(batch_size, rank, world_size)
    if padding < 0:
        raise DatasetError(f"padding must be >= 0, got {padding}")
    if normalize and not dtype.is_floating_point:
        raise DatasetError(f"dtype must be a floating type when normalising, got {dtype}")


def _shard_bounds(n: int, rank: int, world_size: int, train: bool) -> tuple[int, int]:
    """``[start, stop)`` of this rank's positions: ``n // world_size`` each in training, else
    contiguous blocks that cover all ``n`` samples."""
    if train:
        per_rank = n // world_size
        return rank * per_rank, (rank + 1) * per_rank
    return n * rank // world_size, n * (rank + 1) // world_size


class DeviceLoader:
    """Iterate over an :class:`ImageTensorDataset` kept on ``device``, in batches.

    Args:
        dataset: the split; its ``uint8`` images are copied to ``device`` once.
        batch_size: samples per batch (per rank).
        device: where images live and batches are produced (default: the dataset's device).
        train: training mode: shuffled and augmented by default. ``train=False`` is evaluation:
            no augmentation, no shuffling, no dropped samples; with ``world_size > 1`` each rank
            gets a contiguous block (sizes differ by at most one) and together they cover every
            sample exactly once.
        shuffle: visit samples in a fresh random order each epoch (default: ``train``).
        drop_last: drop the last incomplete batch (default ``False``; training only).
        augment: random crop + horizontal flip (default: ``train``).
        padding: zero padding of the random crop (default 4); crops keep the image size.
        flip: random horizontal flip with probability 1/2 when augmenting.
        seed: base seed; the batches of epoch ``e`` depend only on ``(seed, e)``.
        rank, world_size: DDP sharding. In training, every rank draws the same permutation
            and takes ``len(dataset) // world_size`` disjoint positions of it, interleaved by
            batch so that step ``k``'s batches of all ranks together form the single-process
            batch ``k`` of the global batch size (see :meth:`_train_positions`).
        channels_last: return images in ``torch.channels_last`` memory format (free: the
            augmenting gather produces NHWC anyway).
        dtype: floating dtype of the returned images (normalisation itself is float32).
        normalize: if ``False``, return the augmented ``uint8`` images unnormalised.
    """

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int,
        device: torch.device | str | None = None,
        train: bool = True,
        shuffle: bool | None = None,
        drop_last: bool = False,
        augment: bool | None = None,
        padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        normalize: bool = True,
    ) -> None:
        _check_loader_args(batch_size, rank, world_size, padding, normalize, dtype)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else dataset.images.device
        self.train = bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.drop_last = bool(drop_last) and self.train
        self.augment = self.train if augment is None else bool(augment)
        self.padding = int(padding) if self.augment else 0
        self.flip = bool(flip) and self.augment
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.channels_last = bool(channels_last)
        self.dtype = dtype
        self.normalize = bool(normalize)
        self.epoch = 0
        #: whether batches carry the strong view (:meth:`set_views`)
        self.strong_view = False

        n = len(dataset)
        self._start, self._stop = _shard_bounds(n, self.rank, self.world_size, self.train)
        self.num_samples = self._stop - self._start
        if self.num_samples == 0:
            raise DatasetError(
                f"{dataset.name}: {n} samples leave none for rank {rank} of {world_size}"
            )
        self._stage(dataset)

    def _stage(self, dataset: ImageTensorDataset) -> None:
        """Copy the split to the device: gather tables (augmenting) or the images, labels and
        the normalisation constants."""
        dev = self.device
        n = len(dataset)
        c, h, w = dataset.images.shape[1:]
        self._chw = (int(c), int(h), int(w))
        images = dataset.images.to(dev)
        self._labels = dataset.labels.to(dev)
        if self.augment:
            p = self.padding
            padded = F.pad(images, (p, p, p, p)) if p else images
            # Stored NHWC: one gather index per output pixel copies all C channel bytes.
            hp, wp = h + 2 * p, w + 2 * p
            self._pixels = padded.permute(0, 2, 3, 1).contiguous().view(-1, int(c))
            self._sample_stride = hp * wp
            ar_w = torch.arange(w, device=dev, dtype=torch.int64)
            self._row_off = torch.arange(h, device=dev, dtype=torch.int64) * wp  # (H,)
            self._col_off = ar_w  # (W,)
            self._col_flip = (w - 1) - 2 * ar_w  # added to ar_w it mirrors the columns
            self._wp = wp
        else:
            self._images = images.contiguous()
        self._all_index = torch.arange(n, device=dev, dtype=torch.int64)
        mean = torch.tensor(dataset.mean, dtype=torch.float32, device=dev).view(1, c, 1, 1)
        std = torch.tensor(dataset.std, dtype=torch.float32, device=dev).view(1, c, 1, 1)
        self._shift = mean * 255.0
        self._scale = 1.0 / (std * 255.0)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses.

        Like ``DistributedSampler.set_epoch``: call it at the start of every epoch (iterating
        twice without it gives the same batches twice). ``start_batch``: the next iteration
        begins at that batch of the epoch, the same batches an iteration from the start would
        yield from there (a run resumed mid-epoch); later iterations start at 0 again."""
        if not 0 <= start_batch <= len(self):
            raise DatasetError(f"start_batch {start_batch} is outside the epoch's "
                               f"{len(self)} batches")
        self.epoch = int(epoch)
        self._start_batch = int(start_batch)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The random draws of ``epoch`` (default: the current one) for this rank, on the CPU.

        Draw order on one generator seeded with :func:`epoch_seed`: permutation of all N
        samples (if shuffling), then ``dy``, ``dx`` (``randint(0, 2p + 1, (N,))`` each) and
        ``flip`` (``randint(0, 2, (N,))``) for the N positions of the global order (if
        augmenting); then this rank's slice is taken.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.dataset)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(epoch_seed(self.seed, epoch))
        if self.shuffle:
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n, dtype=torch.int64)
        if self.augment:
            span = 2 * self.padding + 1
            dy = torch.randint(0, span, (n,), generator=gen)
            dx = torch.randint(0, span, (n,), generator=gen)
            if self.flip:
                flip = torch.randint(0, 2, (n,), generator=gen)
            else:
                flip = torch.zeros(n, dtype=torch.int64)
        else:
            dy = dx = flip = torch.zeros(n, dtype=torch.int64)
        sel = self._positions()
        return EpochPlan(order[sel], dy[sel], dx[sel], flip[sel])

    def _positions(self) -> torch.Tensor | slice:
        """This rank's positions in the epoch's global order."""
        if self.train and self.world_size > 1:
            return self._train_positions()
        return slice(self._start, self._stop)

    def set_views(self, views: Sequence[str]) -> None:
        """Yield the views a method reads (``Distiller.views``): ``"weak"``, the batch's images,
        always; ``"strong"`` adds :attr:`Batch.strong`: each image cropped and flipped again,
        independently, then RandAugment + Cutout (the official MLKD strong view, Jin, Wang, Lin,
        CVPR 2023), normalised like the images."""
        unknown = sorted(set(views) - {"weak", "strong"})
        if unknown:
            raise DatasetError(f"unknown view(s) {unknown}; a loader yields 'weak' and 'strong'")
        if "strong" in views and not self.augment:
            raise DatasetError("the strong view needs an augmenting (training) loader")
        self.strong_view = "strong" in views

    def strong_plan(self, epoch: int | None = None
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], RandAugmentDraws]:
        """The strong view's draws of ``epoch`` for this rank, on the CPU: its crop offsets
        ``dy``, ``dx`` and ``flip`` (as :meth:`plan` draws them), then the RandAugment draws
        (:func:`kdlab.data.randaugment.draw_rand_augment`) of the N positions of the global
        order, from a generator seeded with ``strong_view_seed(seed, epoch)``; this rank's slice.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.dataset)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(strong_view_seed(self.seed, epoch))
        span = 2 * self.padding + 1
        dy = torch.randint(0, span, (n,), generator=gen)
        dx = torch.randint(0, span, (n,), generator=gen)
        flip = (torch.randint(0, 2, (n,), generator=gen) if self.flip
                else torch.zeros(n, dtype=torch.int64))
        draws = draw_rand_augment(n, gen)
        sel = self._positions()
        return (dy[sel], dx[sel], flip[sel]), draws.take(sel)

    def _train_positions(self) -> torch.Tensor:
        """This rank's positions in the global order, batch-interleaved across ranks.

        Step ``k`` of rank ``r`` takes positions ``[k*b*W + r*b, k*b*W + (r+1)*b)`` (``b`` the
        per-rank batch, ``W`` the world size), so the union of the ranks' batches at step ``k``
        is exactly the batch a single process with batch ``b*W`` draws at step ``k``: a
        distributed run sees the same data, in the same global batches, as a single-process
        run with the same global batch. The last, partial step is split evenly across ranks.
        """
        b, ws, r = self.batch_size, self.world_size, self.rank
        per_rank = len(self.dataset) // ws
        full, rem = divmod(per_rank, b)
        steps = torch.arange(full, dtype=torch.int64).unsqueeze(1) * (b * ws)
        head = (steps + r * b + torch.arange(b, dtype=torch.int64)).flatten()
        tail = full * b * ws + r * rem + torch.arange(rem, dtype=torch.int64)
        return torch.cat([head, tail])

    def _device_plan(self) -> torch.Tensor:
        """This epoch's plan as one ``4 x n`` int64 device tensor (a single host-device copy)."""
        stacked = torch.stack(tuple(self.plan()))
        if self.device.type == "cuda":
            return stacked.pin_memory().to(self.device, non_blocking=True)
        return stacked.to(self.device)

    def _gather_augmented(
        self, idx: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        """Crop (+ flip) a batch out of the padded NHWC images with one gather.

        Returns a ``B x C x H x W`` view in channels-last layout."""
        # (B, H, 1) row part + (B, 1, W) column part -> (B, H, W) source pixel of each output.
        rows = (dy * self._wp + idx * self._sample_stride).unsqueeze(1) + self._row_off
        cols = dx.unsqueeze(1) + self._col_off + flip.unsqueeze(1) * self._col_flip
        pix = rows.unsqueeze(2) + cols.unsqueeze(1)
        return self._pixels[pix].permute(0, 3, 1, 2)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise (into the requested memory format) or just fix the layout of ``x``."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        if not self.normalize:
            return x.contiguous(memory_format=fmt)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
        torch.sub(x, self._shift, out=out)  # uint8 - float32 -> float32
        out.mul_(self._scale)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def _strong_images(self, idx: torch.Tensor, crop: torch.Tensor, draws: RandAugmentDraws
                       ) -> torch.Tensor:
        """The strong view of the images ``idx``: their own crop + flip, RandAugment, normalised."""
        x = self._gather_augmented(idx, crop[0], crop[1], crop[2])
        return self._finish(rand_augment(x, draws))

    def __iter__(self) -> Iterator[Batch]:
        bs, n = self.batch_size, self.num_samples
        strong: tuple[torch.Tensor, RandAugmentDraws] | None = None
        if self.strong_view:
            (sdy, sdx, sflip), sdraws = self.strong_plan()
            strong = (torch.stack((sdy, sdx, sflip)).to(self.device), sdraws.to(self.device))
        if self.augment or self.shuffle:
            plan = self._device_plan()
            order, dy, dx, flip = plan[0], plan[1], plan[2], plan[3]
        else:
            order = self._all_index[self._start : self._stop]
        first, self._start_batch = getattr(self, "_start_batch", 0), 0
        for b in range(first, len(self)):
            s, e = b * bs, min((b + 1) * bs, n)
            idx = order[s:e]
            if self.augment:
                x = self._gather_augmented(idx, dy[s:e], dx[s:e], flip[s:e])
            elif self.shuffle:
                x = self._images[idx]
            else:
                x = self._images[self._start + s : self._start + e]
            batch = Batch(self._finish(x), self._labels[idx], idx)
            if strong is not None:
                batch = batch.with_strong(
                    self._strong_images(idx, strong[0][:, s:e], strong[1].take(slice(s, e))))
            yield batch
