"""The loaders of one run, built from a :class:`~kdlab.config.schema.DataConfig` alone.

``build_data(cfg.data, ...)`` is what the trainer, ``kdlab eval`` and the benchmarks use to turn
a data config into loaders. It takes a plain rank / world size (not the engine's process-group
object), so :mod:`kdlab.data` never imports :mod:`kdlab.engine`.

With ``data.val_fraction`` > 0 the bundle also has a ``val_loader``: a stratified part of the
training set (:mod:`kdlab.data.split`), carved before ``train_fraction`` subsets the rest and
served with the evaluation transform, like the test set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdlab.config import STREAMED_DATASETS, DataConfig
from kdlab.core.distributed import split_batch
from kdlab.core.errors import ConfigError
from kdlab.data.dataset import ImageTensorDataset, subset
from kdlab.data.folder import FileIndex
from kdlab.data.input_spec import InputSpec, default_classes
from kdlab.data.loader import DeviceLoader
from kdlab.data.randaugment import StrongViewLoader
from kdlab.data.registry import load_dataset
from kdlab.data.split import select, split_indices

__all__ = ["DataBundle", "build_data", "load_resident_data", "load_resident_splits",
           "clean_train_loader", "request_views", "resident_input_spec", "stream_input_spec"]


@dataclass
class DataBundle:
    """The loaders of one run and what the models and methods need to know about the data.

    The loaders yield :class:`~kdlab.data.batch.Batch` ``(images, labels, index)`` on the
    run's device and have ``set_epoch(e)``. ``val_loader`` is None unless ``data.val_fraction``
    > 0; it iterates the held-out validation images like ``test_loader`` (evaluation transform,
    every image once over the ranks).
    """

    train_loader: Any
    test_loader: Any
    train_labels: Tensor
    num_classes: int
    in_channels: int
    input_size: int
    val_loader: Any = None
    input_spec: InputSpec | None = None

    @property
    def train_size(self) -> int:
        """Images in the training set (all ranks together)."""
        return int(self.train_labels.shape[0])


def load_resident_data(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset | None,
                                                   ImageTensorDataset]:
    """``(train, val, test)`` of a resident dataset.

    Order: first ``val_fraction`` of every class of the full training split becomes ``val``
    (None when 0; :func:`kdlab.data.split.split_indices` with ``subset_seed``), then
    ``train_fraction`` (stratified, ``subset_seed``) of the remaining images is ``train``. So
    ``val`` does not depend on ``train_fraction``, and with ``val_fraction = 0`` ``train`` is
    exactly the subset of earlier versions.
    """
    extra: dict[str, Any] = cfg.synthetic.model_dump() if cfg.name == "synthetic" else {}
    train = load_dataset(cfg.name, root=cfg.root, train=True, download=cfg.download, **extra)
    test = load_dataset(cfg.name, root=cfg.root, train=False, download=cfg.download, **extra)
    val = None
    if cfg.val_fraction > 0:
        keep, held = split_indices(train.labels.cpu().numpy(), train.num_classes,
                                   cfg.val_fraction, cfg.subset_seed)
        train, val = select(train, keep), select(train, held)
    if cfg.train_fraction < 1.0:
        train = subset(train, cfg.train_fraction, seed=cfg.subset_seed, stratified=True)
    return train, val, test


def load_resident_splits(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Train (after the validation split and ``train_fraction``) and test split of a resident
    dataset (:func:`load_resident_data` without the validation set)."""
    train, _, test = load_resident_data(cfg)
    return train, test


def resident_input_spec(ds: ImageTensorDataset) -> InputSpec:
    """The input description of a device-resident split: its class names, channels and size,
    its source images' own size as resize and crop (so an image of that size passes
    unchanged), its padding, and the :class:`~kdlab.data.loader.DeviceLoader`'s normalisation
    ``(x - 255 mean) * (1 / (255 std))``."""
    size = int(ds.images.shape[-1])
    native = size - 2 * int(ds.pad)
    return InputSpec(task="classification", classes=default_classes(ds.num_classes, ds.classes),
                     channels=int(ds.images.shape[1]), size=size, resize=native, crop=native,
                     pad=int(ds.pad), mean=ds.mean, std=ds.std,
                     normalization="shift_then_scale", dataset=ds.name)


def stream_input_spec(cfg: DataConfig, classes: list[str], mean: tuple[float, ...],
                      std: tuple[float, ...]) -> InputSpec:
    """The input description of a streamed data set: RGB, its evaluation transform (CUB-200:
    exact ``resize x resize``; the others: shorter side to ``resize``; then a centre crop of
    ``image_size``) and the stream loader's normalisation ``(x / 255 - mean) / std``."""
    exact = cfg.name.startswith("cub")
    return InputSpec(task="classification", classes=tuple(classes), channels=3,
                     size=cfg.image_size,
                     resize=(cfg.resize, cfg.resize) if exact else cfg.resize,
                     crop=cfg.image_size, pad=0, mean=tuple(mean), std=tuple(std),
                     normalization="scale_then_shift", dataset=cfg.name)


def _split_stream_index(index: FileIndex, fraction: float, seed: int
                        ) -> tuple[FileIndex, FileIndex]:
    """(train, val) file lists of a streamed training split (:func:`split_indices`)."""
    keep, held = split_indices(index.labels, index.num_classes, fraction, seed)

    def part(pos: Any) -> FileIndex:
        return dataclasses.replace(index, paths=[index.paths[i] for i in pos],
                                   labels=[index.labels[i] for i in pos])

    return part(keep), part(held)


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
    batch = split_batch(cfg.batch_size, world_size)
    if cfg.name in STREAMED_DATASETS:
        # optional heavy dependency: Pillow, needed by streamed (folder) data sets only
        from kdlab.data.stream import StreamDataset, load_stream_dataset, make_stream_loader

        assert cfg.root is not None  # DataConfig requires a root for streamed datasets
        kw = dict(on_error=cfg.on_error, seed=seed, image_size=cfg.image_size, resize=cfg.resize,
                  hflip=cfg.hflip, crop_scale=cfg.resolved_crop_scale())
        train_ds = load_stream_dataset(cfg.name, cfg.root, train=True, **kw)
        test_ds = load_stream_dataset(cfg.name, cfg.root, train=False, **kw)
        common = dict(num_workers=cfg.num_workers, rank=rank, world_size=world_size, seed=seed,
                      device=device)
        val_loader = None
        if cfg.val_fraction > 0:  # validation images get the test set's (evaluation) transform
            train_index, val_index = _split_stream_index(train_ds.index, cfg.val_fraction,
                                                         cfg.subset_seed)
            val_ds = StreamDataset(val_index, test_ds.transform, on_error=train_ds.on_error,
                                   seed=train_ds.seed, mean=test_ds.mean, std=test_ds.std)
            train_ds = StreamDataset(train_index, train_ds.transform, on_error=train_ds.on_error,
                                     seed=train_ds.seed, mean=train_ds.mean, std=train_ds.std)
            val_loader = make_stream_loader(val_ds, cfg.eval_batch_size, train=False, **common)
        return DataBundle(
            train_loader=make_stream_loader(train_ds, batch, train=True, **common),
            test_loader=make_stream_loader(test_ds, cfg.eval_batch_size, train=False, **common),
            train_labels=torch.tensor(train_ds.index.labels, dtype=torch.long, device=device),
            num_classes=train_ds.num_classes, in_channels=3, input_size=cfg.image_size,
            val_loader=val_loader,
            input_spec=stream_input_spec(cfg, list(train_ds.index.classes), test_ds.mean,
                                         test_ds.std))
    train, val, test = load_resident_data(cfg)
    common = dict(device=device, channels_last=channels_last, rank=rank, world_size=world_size)
    return DataBundle(
        train_loader=DeviceLoader(train, batch_size=batch, train=True, shuffle=True,
                                  drop_last=False, padding=cfg.crop_padding, flip=cfg.hflip,
                                  seed=seed, **common),
        test_loader=DeviceLoader(test, batch_size=cfg.eval_batch_size, train=False, **common),
        val_loader=None if val is None else DeviceLoader(
            val, batch_size=cfg.eval_batch_size, train=False, **common),
        train_labels=train.labels.to(device),
        num_classes=train.num_classes,
        in_channels=int(train.images.shape[1]),
        input_size=int(train.images.shape[-1]),
        input_spec=resident_input_spec(test),
    )


def clean_train_loader(data: DataBundle, *, batch_size: int | None = None) -> Any:
    """The training images of ``data`` as the evaluation transform serves them, in a seeded order.

    Same images as ``data.train_loader`` (after the validation split and ``train_fraction``),
    same seed, rank and device, but no augmentation: a resident split is only normalised (a
    :class:`DeviceLoader` with ``train=False, shuffle=True``), a streamed one goes through the
    test set's transform (resize, centre crop, normalisation). The order is a seeded shuffle,
    so the first N images are a reproducible sample of every class: the training loader's
    epoch-0 order (the same seeded permutation). In one process every image comes once and the
    last batch may be partial. ``batch_size``: default the
    training loader's. Yields ``Batch(images, labels, index)`` like the other loaders; use it
    for statistics of the clean inputs (int8 calibration).
    """
    loader = data.train_loader
    if isinstance(loader, DeviceLoader):
        bs = int(batch_size or loader.batch_size)
        return DeviceLoader(loader.dataset, batch_size=bs, device=loader.device, train=False,
                            shuffle=True, seed=loader.seed, rank=loader.rank,
                            world_size=loader.world_size, channels_last=loader.channels_last,
                            dtype=loader.dtype)
    # optional heavy dependency: Pillow, needed by streamed (folder) data sets only
    from kdlab.data.stream import StreamDataset, make_stream_loader

    bs = int(batch_size or loader.loader.batch_size)
    train_ds, test_ds = loader.dataset, data.test_loader.dataset
    clean = StreamDataset(train_ds.index, test_ds.transform, on_error=train_ds.on_error,
                          seed=train_ds.seed, mean=test_ds.mean, std=test_ds.std)
    return make_stream_loader(clean, bs, train=True, drop_last=False,
                              num_workers=int(loader.loader.num_workers), rank=loader.rank,
                              world_size=loader.world_size, seed=loader.seed,
                              device=loader.device, persistent_workers=False)


def request_views(loader: Any, views: tuple[str, ...], *, seed: int, rank: int = 0) -> Any:
    """The training ``loader`` made to yield the input ``views`` a method reads
    (:func:`kdlab.methods.base.requested_views`): unchanged for ``("weak",)``.

    ``"strong"`` (MLKD): a :class:`DeviceLoader` crops, flips and RandAugments a second view of
    each raw image itself (:meth:`DeviceLoader.set_views`); any other loader (the streamed
    datasets) is wrapped in :class:`kdlab.data.randaugment.StrongViewLoader`, which RandAugments
    the batch's own crop (the two views then share the crop).
    """
    if tuple(views) == ("weak",):
        return loader
    unknown = sorted(set(views) - {"weak", "strong"})
    if unknown:
        raise ConfigError(f"the method reads the input view(s) {unknown}, which no kdlab loader "
                          "makes (views: weak, strong)")
    if isinstance(loader, DeviceLoader):
        loader.set_views(views)
        return loader

    ds = loader.dataset
    return StrongViewLoader(loader, ds.mean, ds.std, seed=seed, rank=rank)
