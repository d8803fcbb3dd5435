"""Fashion-MNIST (Zalando) from its IDX files, zero-padded to 32x32 and kept single-channel.

The four files (plain or ``.gz``): ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``. Without a root the loader looks in
``$KDLAB_DATA/fashion-mnist``, ``./data/fashion-mnist`` and Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``, which installs the four
``.gz`` files there).

The 28x28 images are zero-padded by 2 pixels on each side to 32x32 at load time, so the CIFAR
models keep their 8x8 / 4x4 final feature maps and SDD's scales {1, 2, 4} fit; models are built
with ``in_channels=1``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdlab.core.errors import DatasetError
from kdlab.data.dataset import ImageTensorDataset, default_data_root
from kdlab.data.download import download_file
from kdlab.data.idx import read_idx_images, read_idx_labels

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_RESOURCES",
    "FASHION_MNIST_STD",
    "fashion_mnist_candidates",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FOLDER = "fashion-mnist"
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# md5 of the official .gz downloads (Zalando README; same values in torchvision's FashionMNIST).
# Debian re-compresses the files, so its .gz md5s differ; local files are not md5-checked.
FASHION_MNIST_RESOURCES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
# Mean/std of the 60,000 real training images AFTER zero-padding to 32x32 (pixel/255, over all
# 60000*32*32 values), computed with kdlab.data.fashion_mnist on Debian's dataset-fashion-mnist
# files. Unpadded 28x28 values for comparison: mean 0.28604, std 0.35302.
FASHION_MNIST_MEAN = (0.21900,)
FASHION_MNIST_STD = (0.33181,)
PAD = 2


def _split_files(train: bool) -> tuple[str, str]:
    prefix = "train" if train else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _locate(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist_candidates(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Folders searched for the IDX files, in order."""
    if root is not None:
        root = Path(root)
        return [root / FOLDER, root]
    env = os.environ.get("KDLAB_DATA")
    found = [Path(env).expanduser() / FOLDER] if env else []
    found.append(default_data_root() / FOLDER)
    found.append(DEBIAN_FASHION_MNIST_DIR)
    return list(dict.fromkeys(found))


def find_fashion_mnist(
    root: str | os.PathLike[str] | None = None, train: bool = True
) -> tuple[Path, Path] | None:
    """``(images, labels)`` paths of the split in the first candidate folder holding both."""
    images_stem, labels_stem = _split_files(train)
    for folder in fashion_mnist_candidates(root):
        images, labels = _locate(folder, images_stem), _locate(folder, labels_stem)
        if images is not None and labels is not None:
            return images, labels
    return None


def _download(root: Path) -> None:
    for fname, md5 in FASHION_MNIST_RESOURCES.items():
        download_file(FASHION_MNIST_URL + fname, root / FOLDER / fname, md5)


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    train: bool = True,
    download: bool = False,
    pad: int = PAD,
) -> ImageTensorDataset:
    """Load a Fashion-MNIST split as ``uint8`` ``N x 1 x 32 x 32`` (zero-padded by ``pad``).

    Args:
        root: folder holding ``fashion-mnist/`` or the IDX files themselves; default: search
            ``$KDLAB_DATA/fashion-mnist``, ``./data/fashion-mnist``,
            ``/usr/share/datasets/fashion-mnist``.
        train: 60k training split (else the 10k test split).
        download: fetch the four official ``.gz`` files (md5-checked) when missing.
        pad: zero padding per side; ``2`` gives 32x32. The normalisation constants
            are those of the padded images (with ``pad != 2`` they are only approximate).
    """
    paths = find_fashion_mnist(root, train)
    if paths is None and download:
        target = Path(root) if root is not None else default_data_root()
        _download(target)
        paths = find_fashion_mnist(target, train)
    if paths is None:
        images_stem, labels_stem = _split_files(train)
        where = " or ".join(str(p) for p in fashion_mnist_candidates(root))
        raise DatasetError(
            f"Fashion-MNIST not found: expected {images_stem}[.gz] and {labels_stem}[.gz] in "
            f"{where}; install the Debian package dataset-fashion-mnist, pass download=True "
            f"(needs internet) or download them from {FASHION_MNIST_URL}"
        )
    images_path, labels_path = paths
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; the files do not belong together"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{labels_path}: labels outside [0, 10); not a Fashion-MNIST file")
    tensor = torch.from_numpy(images.copy()).unsqueeze(1)
    if pad:
        tensor = F.pad(tensor, (pad, pad, pad, pad))
    return ImageTensorDataset(
        images=tensor.contiguous(),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=len(FASHION_MNIST_CLASSES),
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        name="fashion_mnist",
        classes=list(FASHION_MNIST_CLASSES),
        pad=int(pad),
    )
