"""Small-image datasets kept on the device as ``uint8`` tensors, and their loader.

* :class:`ImageTensorDataset`: a whole split as tensors (+ :func:`subset` for fractions).
* :func:`load_dataset`: ``"cifar10"``, ``"cifar100"``, ``"fashion_mnist"``, ``"synthetic"``.
* :class:`DeviceLoader`: batches gathered, augmented (crop + flip) and normalised on the device,
  deterministic in ``(seed, epoch)`` and sharded for DDP.
* :mod:`kdlab.data.synthetic`: learnable synthetic data written in the real on-disk formats.
"""

from kdlab.data.cifar import load_cifar
from kdlab.data.dataset import ImageTensorDataset, default_data_root, subset
from kdlab.data.download import download_and_extract, download_file, safe_extract_tar
from kdlab.data.fashion_mnist import load_fashion_mnist
from kdlab.data.loader import Batch, DeviceLoader, EpochPlan
from kdlab.data.registry import dataset_names, load_dataset, register_dataset
from kdlab.data.synthetic import make_synthetic_dataset, write_cifar, write_idx

__all__ = [
    "Batch",
    "DeviceLoader",
    "EpochPlan",
    "ImageTensorDataset",
    "dataset_names",
    "default_data_root",
    "download_and_extract",
    "download_file",
    "load_cifar",
    "load_dataset",
    "load_fashion_mnist",
    "make_synthetic_dataset",
    "register_dataset",
    "safe_extract_tar",
    "subset",
    "write_cifar",
    "write_idx",
]
