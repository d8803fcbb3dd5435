"""Synthetic, learnable image data, in memory or written in the real on-disk formats.

Each class has a fixed random prototype (a blocky low-resolution pattern, 4x4-pixel blocks, per
channel, derived from ``seed`` only), and every sample is its class prototype plus Gaussian pixel
noise. A small network (even a linear model) separates the classes within a few steps, and the
pattern survives the 4-pixel random-crop/flip augmentation, so the data serves both for
tests and for speed benchmarks at any size.

:func:`write_cifar` writes byte-for-byte the structure of the official Python-2 pickles
(protocol 2, ``str`` as ``BINSTRING``, arrays via ``numpy.core.multiarray._reconstruct``) with
the same keys, including the meta file; :func:`write_idx` writes the four Fashion-MNIST IDX files.
"""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from kdlab.core.errors import DatasetError
from kdlab.data.cifar import CIFAR_SPECS
from kdlab.data.dataset import ImageTensorDataset
from kdlab.data.idx import write_idx_file

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

__all__ = [
    "SYNTHETIC_MEAN",
    "SYNTHETIC_STD",
    "make_synthetic_arrays",
    "make_synthetic_dataset",
    "write_cifar",
    "write_idx",
]

SYNTHETIC_MEAN = 0.5
# Prototype values are uniform in [40, 215] (std ~0.198 in [0,1] units) plus noise of std 30/255.
SYNTHETIC_STD = 0.23
_BLOCK = 4
_NOISE = 30.0
_CHUNK = 8192
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _prototypes(num_classes: int, channels: int, size: int, seed: int) -> np.ndarray:
    """``num_classes x channels x size x size`` float32 class patterns (depend on ``seed`` only)."""
    rng = np.random.default_rng([seed, 0x5EED])
    low = -(-size // _BLOCK)
    coarse = rng.uniform(40.0, 215.0, size=(num_classes, channels, low, low)).astype(np.float32)
    full = coarse.repeat(_BLOCK, axis=2).repeat(_BLOCK, axis=3)
    return np.ascontiguousarray(full[:, :, :size, :size])


def make_synthetic_arrays(
    n: int,
    num_classes: int = 10,
    channels: int = 3,
    size: int = 32,
    seed: int = 0,
    split: str = "train",
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 N x C x H x W, labels int64 N)``; splits share the class prototypes.

    Labels are balanced (``i % num_classes``, shuffled); the samples depend on
    ``(seed, split)``, the prototypes on ``seed`` only, so a model trained on ``"train"``
    generalises to ``"test"``.
    """
    if n < 0 or num_classes < 1 or channels < 1 or size < 1:
        raise DatasetError(
            f"synthetic data needs n >= 0, num_classes, channels, size >= 1; got n={n}, "
            f"num_classes={num_classes}, channels={channels}, size={size}"
        )
    protos = _prototypes(num_classes, channels, size, seed)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    labels = rng.permutation(np.arange(n, dtype=np.int64) % num_classes)
    images = np.empty((n, channels, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        lab = labels[start : start + _CHUNK]
        noise = rng.standard_normal((lab.size, channels, size, size), dtype=np.float32)
        chunk = protos[lab] + _NOISE * noise
        np.clip(np.rint(chunk), 0, 255, out=chunk)
        images[start : start + lab.size] = chunk.astype(np.uint8)
    return images, labels


def make_synthetic_dataset(
    n: int,
    num_classes: int = 10,
    channels: int = 3,
    size: int = 32,
    seed: int = 0,
    split: str = "train",
) -> ImageTensorDataset:
    """An in-memory synthetic :class:`ImageTensorDataset` (see :func:`make_synthetic_arrays`)."""
    images, labels = make_synthetic_arrays(n, num_classes, channels, size, seed, split)
    return ImageTensorDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels),
        num_classes=num_classes,
        mean=(SYNTHETIC_MEAN,) * channels,
        std=(SYNTHETIC_STD,) * channels,
        name="synthetic",
        classes=[f"class_{i}" for i in range(num_classes)],
    )


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol-2 pickler that writes like Python 2 did for the official CIFAR files.

    ``bytes`` and ``str`` become ``SHORT_BINSTRING``/``BINSTRING`` (read back as ``bytes`` with
    ``encoding="bytes"``), and numpy's reconstructor is named ``numpy.core.multiarray``.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        for attr in ("_reconstruct", "scalar"):
            if obj is getattr(_multiarray, attr):
                self.write(pickle.GLOBAL + f"numpy.core.multiarray\n{attr}\n".encode())
                self.memoize(obj)
                return
        super().save_global(obj, name)


def _dump_py2(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        out: BinaryIO = f
        _Py2Pickler(out, protocol=2).dump(obj)


def write_cifar(
    root: str | os.PathLike[str],
    name: str = "cifar100",
    n_train: int = 500,
    n_test: int = 100,
    seed: int = 0,
) -> Path:
    """Write a synthetic CIFAR-10/100 in the official pickle layout under ``root``.

    Creates ``root/cifar-100-python/{train,test,meta}`` or
    ``root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and returns that
    folder. The training images are split over the five CIFAR-10 batches as evenly as possible.
    """
    if name not in CIFAR_SPECS:
        raise DatasetError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR_SPECS)}")
    spec = CIFAR_SPECS[name]
    folder = Path(root) / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    k = spec.num_classes

    def batch(images: np.ndarray, labels: np.ndarray, label: str, start: int) -> dict:
        record: dict[bytes, Any] = {
            b"batch_label": label.encode(),
            b"data": images.reshape(len(images), -1),
            b"filenames": [f"synthetic_{start + i:06d}.png".encode() for i in range(len(images))],
        }
        if name == "cifar100":
            record[b"fine_labels"] = [int(v) for v in labels]
            record[b"coarse_labels"] = [int(v) // 5 for v in labels]
        else:
            record[b"labels"] = [int(v) for v in labels]
        return record

    train_x, train_y = make_synthetic_arrays(n_train, k, 3, 32, seed, "train")
    test_x, test_y = make_synthetic_arrays(n_test, k, 3, 32, seed, "test")
    if name == "cifar100":
        _dump_py2(batch(train_x, train_y, "training batch 1 of 1", 0), folder / "train")
        _dump_py2(batch(test_x, test_y, "testing batch 1 of 1", 0), folder / "test")
        meta = {
            b"fine_label_names": [f"class_{i:03d}".encode() for i in range(100)],
            b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(20)],
        }
        _dump_py2(meta, folder / "meta")
    else:
        chunks = np.array_split(np.arange(n_train), 5)
        for i, idx in enumerate(chunks, start=1):
            rec = batch(train_x[idx], train_y[idx], f"training batch {i} of 5", int(idx[:1].sum()))
            _dump_py2(rec, folder / f"data_batch_{i}")
        _dump_py2(batch(test_x, test_y, "testing batch 1 of 1", 0), folder / "test_batch")
        meta = {
            b"num_cases_per_batch": len(chunks[0]),
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072,
        }
        _dump_py2(meta, folder / "batches.meta")
    return folder


def write_idx(
    root: str | os.PathLike[str],
    n_train: int = 600,
    n_test: int = 100,
    seed: int = 0,
    gz: bool = False,
    num_classes: int = 10,
    size: int = 28,
) -> Path:
    """Write synthetic Fashion-MNIST-style IDX files into ``root/fashion-mnist``; return it.

    File names as in the official release (``train-images-idx3-ubyte`` ..., plus ``.gz`` when
    ``gz``); single-channel ``size x size`` images.
    """
    folder = Path(root) / "fashion-mnist"
    suffix = ".gz" if gz else ""
    for prefix, n, split in (("train", n_train, "train"), ("t10k", n_test, "test")):
        images, labels = make_synthetic_arrays(n, num_classes, 1, size, seed, split)
        write_idx_file(folder / f"{prefix}-images-idx3-ubyte{suffix}", images[:, 0], gz=gz)
        write_idx_file(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
    return folder
