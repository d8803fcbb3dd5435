"""Dataset names -> loader functions.

``load_dataset("cifar100", root, train=True)`` is how the rest of kdlab (configs, CLI, engine)
obtains a split. New small datasets register with :func:`register_dataset` (from any module of
:mod:`kdlab.data`, found automatically, or from a plugin module).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from kdlab.core.errors import DatasetError
from kdlab.core.registries import DATASETS
from kdlab.data.cifar import load_cifar
from kdlab.data.dataset import ImageTensorDataset
from kdlab.data.fashion_mnist import load_fashion_mnist
from kdlab.data.synthetic import make_synthetic_dataset

__all__ = ["DATASETS", "DatasetLoader", "dataset_names", "load_dataset", "register_dataset"]

PathLike = str | os.PathLike[str] | None


class DatasetLoader(Protocol):
    """``(root, train, download, **options) -> ImageTensorDataset``."""

    def __call__(
        self, root: PathLike, train: bool, download: bool, **options: Any
    ) -> ImageTensorDataset: ...




def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator registering a loader under ``name`` (an error if the name is taken)."""
    return DATASETS.decorator(name)


def dataset_names() -> list[str]:
    """The registered dataset names, sorted."""
    return DATASETS.names()


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise DatasetError(f"dataset {name!r} takes no options, got {sorted(options)}")


@register_dataset("cifar10")
def _cifar10(root: PathLike, train: bool, download: bool, **options: Any) -> ImageTensorDataset:
    _no_options("cifar10", options)
    return load_cifar(root, "cifar10", train=train, download=download)


@register_dataset("cifar100")
def _cifar100(root: PathLike, train: bool, download: bool, **options: Any) -> ImageTensorDataset:
    _no_options("cifar100", options)
    return load_cifar(root, "cifar100", train=train, download=download)


@register_dataset("fashion_mnist")
def _fashion(root: PathLike, train: bool, download: bool, **options: Any) -> ImageTensorDataset:
    allowed = {"pad"}
    if set(options) - allowed:
        raise DatasetError(
            f"unknown fashion_mnist option(s) {sorted(set(options) - allowed)}; allowed: pad"
        )
    return load_fashion_mnist(root, train=train, download=download, **options)


_SYNTHETIC_DEFAULTS: dict[str, int] = {
    "n_train": 5000, "n_test": 1000, "num_classes": 10, "channels": 3, "size": 32, "seed": 0,
}  # fmt: skip


@register_dataset("synthetic")
def _synthetic(root: PathLike, train: bool, download: bool, **options: Any) -> ImageTensorDataset:
    """In-memory synthetic data; options ``n_train``, ``n_test``, ``num_classes``, ``channels``,
    ``size``, ``seed`` (train and test share the class prototypes)."""
    unknown = set(options) - set(_SYNTHETIC_DEFAULTS)
    if unknown:
        raise DatasetError(
            f"unknown synthetic option(s) {sorted(unknown)}; allowed: {sorted(_SYNTHETIC_DEFAULTS)}"
        )
    opts = {**_SYNTHETIC_DEFAULTS, **options}
    return make_synthetic_dataset(
        int(opts["n_train"] if train else opts["n_test"]),
        num_classes=int(opts["num_classes"]),
        channels=int(opts["channels"]),
        size=int(opts["size"]),
        seed=int(opts["seed"]),
        split="train" if train else "test",
    )


def load_dataset(
    name: str,
    root: PathLike = None,
    train: bool = True,
    download: bool = False,
    **options: Any,
) -> ImageTensorDataset:
    """Load split ``train``/test of dataset ``name`` as an :class:`ImageTensorDataset` (CPU).

    Names: ``cifar10``, ``cifar100``, ``fashion_mnist``, ``synthetic`` (plus registered ones).
    ``options`` are dataset specific (e.g. ``synthetic``: ``n_train=..., num_classes=...``).
    """
    key = name.lower().replace("-", "_")
    loader = DATASETS.get(key if key in DATASETS else name)
    return loader(root, train, download, **options)
