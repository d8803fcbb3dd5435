"""The loaders of one run, built from a :class:`~kdlab.config.DataConfig` alone.

``build_data(cfg.data, ...)`` is what the trainer, ``kdlab eval`` and the benchmarks use to turn
a data config into loaders. It takes a plain rank / world size (not the engine's process-group
object), so :mod:`kdlab.data` never imports :mod:`kdlab.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdlab.config import STREAMED_DATASETS, DataConfig
from kdlab.data.dataset import ImageTensorDataset, subset
from kdlab.data.loader import DeviceLoader
from kdlab.data.registry import load_dataset
from kdlab.errors import ConfigError

__all__ = ["DataBundle", "build_data", "load_resident_splits", "per_rank_batch"]


@dataclass
class DataBundle:
    """The loaders of one run and what the models and methods need to know about the data.

    Both loaders yield :class:`~kdlab.data.batch.Batch` ``(images, labels, index)`` on the
    run's device and have ``set_epoch(e)``.
    """

    train_loader: Any
    test_loader: Any
    train_labels: Tensor
    num_classes: int
    in_channels: int
    input_size: int

    @property
    def train_size(self) -> int:
        """Images in the training set (all ranks together)."""
        return int(self.train_labels.shape[0])


def per_rank_batch(global_batch: int, world_size: int, key: str = "data.batch_size") -> int:
    """The per-rank batch of a global batch split over ``world_size`` processes.

    It must divide evenly, so that the ranks' batches of one step together are exactly the
    single-process batch.
    """
    if global_batch % world_size:
        raise ConfigError(f"config key {key!r}: the global batch {global_batch} must be a "
                          f"multiple of the number of processes ({world_size})")
    return global_batch // world_size


def load_resident_splits(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Train (optionally a stratified ``train_fraction``) and test split of a resident dataset."""
    extra: dict[str, Any] = cfg.synthetic.model_dump() if cfg.name == "synthetic" else {}
    train = load_dataset(cfg.name, root=cfg.root, train=True, download=cfg.download, **extra)
    test = load_dataset(cfg.name, root=cfg.root, train=False, download=cfg.download, **extra)
    if cfg.train_fraction < 1.0:
        train = subset(train, cfg.train_fraction, seed=cfg.subset_seed, stratified=True)
    return train, test


def build_data(
    cfg: DataConfig,
    *,
    seed: int,
    device: torch.device,
    channels_last: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> DataBundle:
    """Loaders for ``cfg``: device-resident for small datasets, streamed for image files.

    Both yield ``(images, labels, index)`` on ``device``; ``set_epoch(e)`` makes epoch ``e``'s
    order and augmentation a function of ``(seed, e)`` only, so resumed runs see the same data.
    ``cfg.batch_size`` is the global batch: with ``world_size`` processes each rank gets its
    share, and the ranks' batches of one step together are the single-process batch.
    """
    batch = per_rank_batch(cfg.batch_size, world_size)
    if cfg.name in STREAMED_DATASETS:
        from kdlab.data.stream import load_stream_dataset, make_stream_loader

        assert cfg.root is not None  # DataConfig requires a root for streamed datasets
        kw = dict(on_error=cfg.on_error, seed=seed, image_size=cfg.image_size, resize=cfg.resize)
        train_ds = load_stream_dataset(cfg.name, cfg.root, train=True, **kw)
        test_ds = load_stream_dataset(cfg.name, cfg.root, train=False, **kw)
        common = dict(num_workers=cfg.num_workers, rank=rank, world_size=world_size, seed=seed,
                      device=device)
        return DataBundle(
            train_loader=make_stream_loader(train_ds, batch, train=True, **common),
            test_loader=make_stream_loader(test_ds, cfg.eval_batch_size, train=False, **common),
            train_labels=torch.tensor(train_ds.index.labels, dtype=torch.long, device=device),
            num_classes=train_ds.num_classes, in_channels=3, input_size=cfg.image_size)
    train, test = load_resident_splits(cfg)
    common = dict(device=device, channels_last=channels_last, rank=rank, world_size=world_size)
    return DataBundle(
        train_loader=DeviceLoader(train, batch_size=batch, train=True, shuffle=True,
                                  drop_last=False, padding=cfg.crop_padding, flip=cfg.hflip,
                                  seed=seed, **common),
        test_loader=DeviceLoader(test, batch_size=cfg.eval_batch_size, train=False, **common),
        train_labels=train.labels.to(device),
        num_classes=train.num_classes,
        in_channels=int(train.images.shape[1]),
        input_size=int(train.images.shape[-1]),
    )
