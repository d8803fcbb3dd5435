"""The synthetic Fashion-MNIST segmentation generator: byte-identical per seed, pixel-exact."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlab.core.errors import ConfigError
from kdlab.tasks.segmentation.synthetic import make_fashion_mnist_segmentation, paste_items


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_prefix_stable(tmp_path: Path, idx_root: Path) -> None:
    kw = {"fashion_mnist_root": idx_root, "size": 32, "objects": (1, 2), "scale": (1, 1)}
    make_fashion_mnist_segmentation(tmp_path / "a", n_train=5, n_test=3, seed=7, **kw)
    make_fashion_mnist_segmentation(tmp_path / "b", n_train=5, n_test=3, seed=7, **kw)
    make_fashion_mnist_segmentation(tmp_path / "c", n_train=3, n_test=2, seed=7, **kw)
    make_fashion_mnist_segmentation(tmp_path / "d", n_train=5, n_test=3, seed=8, **kw)
    a, b, c, d = (_digest(tmp_path / x) for x in "abcd")
    assert a == b
    assert all(a[k] == v for k, v in c.items())  # the first images do not depend on n
    assert a["train/images/000000.png"] != d["train/images/000000.png"]


def test_labels_are_exactly_the_items_own_nonzero_pixels() -> None:
    items = np.zeros((2, 28, 28), dtype=np.uint8)
    items[0, 2:10, 3:20] = 200          # class 4: a bar
    items[1, 5:25, 5:7] = 90            # class 9: a thin column
    items[1, 12, 12] = 1                # a single faint pixel still counts
    classes = np.array([4, 9])
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, label = paste_items(rng, items, classes, 40, (1, 3), (1, 1))
        nonzero = image.max(axis=2) > 0
        assert np.array_equal(nonzero, label > 0)
        assert set(np.unique(label)) <= {0, 5, 10}
        # where an item sits on top, its brightest channel is the item's grey value
        assert set(np.unique(image.max(axis=2)[label == 5])) <= {200}
        assert set(np.unique(image.max(axis=2)[label == 10])) <= {90, 1}


def test_generated_files_agree_with_their_labels(fm_root: Path) -> None:
    for name in ("000000.png", "000005.png"):
        image = np.array(Image.open(fm_root / "train" / "images" / name))
        label = np.array(Image.open(fm_root / "train" / "labels" / name))
        assert image.shape == (32, 32, 3) and label.shape == (32, 32)
        assert np.array_equal(image.max(axis=2) > 0, label > 0)
        assert 0 < (label > 0).sum() < label.size


def test_bad_sizes_are_config_errors(tmp_path: Path, idx_root: Path) -> None:
    with pytest.raises(ConfigError, match="size"):
        make_fashion_mnist_segmentation(tmp_path, fashion_mnist_root=idx_root, size=40,
                                        scale=(1, 2))


def test_cli_writes_the_set(tmp_path: Path, idx_root: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from kdlab.cli.main import main

    out = tmp_path / "fm"
    assert main(["segmentation-data", "synthetic", "--out", str(out), "--train", "3",
                 "--test", "2", "--seed", "1", "--size", "32", "--scale", "1", "1",
                 "--fashion-mnist", str(idx_root)]) == 0
    assert len(list((out / "train" / "labels").glob("*.png"))) == 3
    assert len(list((out / "test" / "images").glob("*.png"))) == 2
    assert "train: 3 images" in capsys.readouterr().out
