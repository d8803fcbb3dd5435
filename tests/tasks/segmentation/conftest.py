"""Shared fixtures of the segmentation task's tests: a small synthetic Fashion-MNIST
segmentation set built from synthetic IDX files (:func:`kdlab.data.synthetic.write_idx`), and
one intra-op thread per test (the machine's cores are shared)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every segmentation test on one intra-op thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="session")
def idx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic Fashion-MNIST-format IDX files (60 train / 20 test items)."""
    from kdlab.data.synthetic import write_idx

    return write_idx(tmp_path_factory.mktemp("idx"), n_train=60, n_test=20, seed=0)


@pytest.fixture(scope="session")
def fm_root(tmp_path_factory: pytest.TempPathFactory, idx_root: Path) -> Path:
    """The synthetic segmentation set: 16 train / 6 test canvases of 32 px, 1-2 items each."""
    from kdlab.tasks.segmentation.synthetic import make_fashion_mnist_segmentation

    root = tmp_path_factory.mktemp("fm_seg")
    make_fashion_mnist_segmentation(root, fashion_mnist_root=idx_root, n_train=16, n_test=6,
                                    size=32, objects=(1, 2), scale=(1, 1), seed=0)
    return root
