"""The held-out validation split: a stratified, seeded part of the TRAINING set.

``data.val_fraction`` > 0 carves a validation set out of the training split, before
``data.train_fraction`` subsets what is left, so the validation images do not depend on
``train_fraction`` (nor on the run's ``seed``): they are a pure function of the training labels,
``val_fraction`` and ``data.subset_seed``. The model then chooses its best epoch on validation
images and the test set is only scored, never used for a choice (the protocol of a held-out
validation set, e.g. Goodfellow, Bengio and Courville, *Deep Learning*, 2016, sec. 5.3).

Per class ``c`` with ``n_c`` training images, the validation set takes

    k_c = min(floor(val_fraction * n_c + 1/2), n_c - 1)        (0 for an empty class)

images: the same fraction of every class, rounded half up, and never the class's last training
image. ``val_fraction`` is taken as the decimal number it is written as (0.3 is 3/10, so 30% of
25 images is 7.5, rounded up to 8), in exact integer arithmetic. The images are drawn class by
class, in class order, with one NumPy generator seeded from ``(subset_seed, "val")``, a stream
distinct from the one ``train_fraction`` subsetting uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

from kdlab.core.errors import ConfigError
from kdlab.data.dataset import ImageTensorDataset

__all__ = ["select", "split_indices", "val_counts"]

#: the second word of the validation draw's seed (ASCII "val"), so it never shares a stream with
#: the ``train_fraction`` subset drawn from ``subset_seed`` alone.
_VAL_STREAM = 0x76616C


def val_counts(labels: Sequence[int] | np.ndarray, num_classes: int,
               fraction: float) -> np.ndarray:
    """Validation images per class: ``min(floor(fraction * n_c + 1/2), n_c - 1)``, 0 when
    ``n_c == 0`` (module docstring). An ``int64`` array of length ``num_classes``."""
    if not 0.0 <= fraction <= 0.5:
        raise ConfigError(f"config key 'data.val_fraction': {fraction} is outside [0, 0.5]")
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    exact = Fraction(repr(float(fraction)))  # the decimal as written: 0.3 -> 3/10
    p, q = exact.numerator, exact.denominator
    take = [min((2 * p * int(n) + q) // (2 * q), int(n) - 1) for n in counts]
    return np.clip(np.array(take, dtype=np.int64), 0, None)


def split_indices(labels: Sequence[int] | np.ndarray, num_classes: int, fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` positions into the training split, each sorted ascending; disjoint, and
    together every position once. Class ``c`` gives :func:`val_counts` ``[c]`` images to
    ``val``, drawn without replacement from its members in class order with one generator
    seeded from ``(seed, "val")``. ``fraction == 0`` gives ``(all, empty)``."""
    lab = np.asarray(labels, dtype=np.int64)
    n = lab.shape[0]
    if fraction == 0.0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    take = val_counts(lab, num_classes, fraction)
    if int(take.sum()) == 0:
        raise ConfigError(f"config key 'data.val_fraction': {fraction} of {n} training images "
                          "leaves no validation image; raise it or set it to 0")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFF,
                                                        _VAL_STREAM]))
    chosen = [rng.choice(np.flatnonzero(lab == c), size=int(take[c]), replace=False)
              for c in np.flatnonzero(take)]
    val = np.sort(np.concatenate(chosen)).astype(np.int64)
    keep = np.ones(n, dtype=bool)
    keep[val] = False
    return np.flatnonzero(keep).astype(np.int64), val


def select(dataset: ImageTensorDataset, positions: np.ndarray) -> ImageTensorDataset:
    """The samples of ``dataset`` at ``positions`` (in that order), with ``source_indices``
    mapping each back to the full split (composed when ``dataset`` is itself a subset)."""
    keep = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
    source = dataset.source_indices.cpu()[keep] if dataset.source_indices is not None else keep
    dev = dataset.images.device
    return dataclasses.replace(
        dataset, images=dataset.images[keep.to(dev)],
        labels=dataset.labels[keep.to(dataset.labels.device)], source_indices=source.to(dev))
