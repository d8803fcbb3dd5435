"""kdlab.tools.synthetic_detection: the synthetic Fashion-MNIST detection set.

Uses small IDX files generated here (train items of classes 0-2, test items of classes 7-9, all
distinct) so the tests can tell which split an object came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdlab import __version__
from kdlab.cli.detection_data import add_detection_data_parser
from kdlab.core.errors import ConfigError, DatasetError
from kdlab.data.fashion_mnist import FASHION_MNIST_CLASSES
from kdlab.data.idx import write_idx_file
from kdlab.tasks.detection.coco import CocoDetection
from kdlab.tools.synthetic_detection import make_fashion_mnist_detection

THRESHOLD = 8


def _items(n: int, seed: int) -> np.ndarray:
    """Items with a varied, non-rectangular shape: a bright ellipse with a gradient, random
    centre and radii, and a dim (below-threshold) haze that must not count as object."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    out = np.zeros((n, 28, 28), dtype=np.uint8)
    for k in range(n):
        cy, cx = rng.uniform(9, 19, size=2)
        ry, rx = rng.uniform(3, 9, size=2)
        d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        img = np.where(d <= 1, 120 + 135 * (1 - d), 0.0)
        img += rng.uniform(0, 4, size=(28, 28))  # haze <= 4 < THRESHOLD
        out[k] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fm")
    write_idx_file(root / "train-images-idx3-ubyte", _items(30, 1))
    write_idx_file(root / "train-labels-idx1-ubyte", np.arange(30) % 3)  # classes 0, 1, 2
    write_idx_file(root / "t10k-images-idx3-ubyte.gz", _items(20, 2), gz=True)
    write_idx_file(root / "t10k-labels-idx1-ubyte.gz", 7 + np.arange(20) % 3, gz=True)  # 7-9
    return root


def _tight(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)]


def _all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _pil(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def test_deterministic_byte_for_byte(tmp_path: Path, fm_root: Path) -> None:
    kw = dict(fashion_mnist_root=fm_root, n_train=4, n_test=2, size=(40, 56), seed=3)
    make_fashion_mnist_detection(tmp_path / "a", **kw)
    make_fashion_mnist_detection(tmp_path / "b", **kw)
    a, b = _all_files(tmp_path / "a"), _all_files(tmp_path / "b")
    assert len(a) == 4 + 2 + 2 + 1  # images, two JSONs, dataset.json
    assert a == b
    make_fashion_mnist_detection(tmp_path / "c", **{**kw, "seed": 4})
    assert _all_files(tmp_path / "c")["train/000001.png"] != a["train/000001.png"]
    # Image i depends only on (seed, split, i): a longer set starts with the same images.
    make_fashion_mnist_detection(tmp_path / "d", **{**kw, "n_train": 6})
    d = _all_files(tmp_path / "d")
    assert all(d[f"train/00000{i}.png"] == a[f"train/00000{i}.png"] for i in range(1, 5))


def test_single_object_boxes_are_tight(tmp_path: Path, fm_root: Path) -> None:
    make_fashion_mnist_detection(
        tmp_path, fashion_mnist_root=fm_root, n_train=24, n_test=0, size=(40, 72),
        objects=(1, 1), scale=(0.6, 2.2), seed=0, threshold=THRESHOLD,
    )  # fmt: skip
    doc = json.loads((tmp_path / "annotations/instances_train.json").read_text())
    assert len(doc["annotations"]) == 24
    for im, ann in zip(doc["images"], doc["annotations"], strict=True):
        pixels = _pil(tmp_path / "train" / im["file_name"])
        assert pixels.shape == (im["height"], im["width"], 3)
        mask = pixels.max(axis=2) > THRESHOLD
        x, y, w, h = ann["bbox"]
        assert _tight(mask) == [x, y, x + w, y + h]
        # Spelled out: each box edge holds an object pixel, nothing lies outside the box.
        x1, y1, x2, y2 = int(x), int(y), int(x + w), int(y + h)
        assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
        assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()
        outside = mask.copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any()
        # Tinted: the channels differ, the brightest one carries the grey value.
        inside = pixels[y1:y2, x1:x2].reshape(-1, 3).astype(int)
        assert (inside.max(axis=1) - inside.min(axis=1)).max() > 0


def test_objects_come_from_the_matching_split(tmp_path: Path, fm_root: Path) -> None:
    """At scale 1 an object is its source item unchanged (grey = brightest channel), so every
    crop must equal the tight crop of an item of the same class from the same split."""
    make_fashion_mnist_detection(
        tmp_path, fashion_mnist_root=fm_root, n_train=10, n_test=10, size=64,
        objects=(1, 1), scale=(1.0, 1.0), seed=5,
    )  # fmt: skip
    sources = {
        "train": (_items(30, 1), np.arange(30) % 3),
        "test": (_items(20, 2), 7 + np.arange(20) % 3),
    }
    for split, (items, labels) in sources.items():
        crops = []
        for item in items:
            x1, y1, x2, y2 = map(int, _tight(item > THRESHOLD))
            crops.append(np.where(item > THRESHOLD, item, 0)[y1:y2, x1:x2])
        ds = CocoDetection.from_split(tmp_path, split)
        for i in range(len(ds)):
            s = ds[i]
            (x1, y1, x2, y2), label = map(int, s.boxes[0].tolist()), int(s.labels[0])
            grey = s.image.numpy().max(axis=0)[y1:y2, x1:x2]
            grey = np.where(grey > THRESHOLD, grey, 0)
            matches = [
                k for k, c in enumerate(crops) if c.shape == grey.shape and (c == grey).all()
            ]
            assert matches, f"{split} image {i}: object matches no {split} item"
            assert {int(labels[k]) + 1 for k in matches} == {label}
    assert ds.label_to_category_id == {k: k for k in range(1, 11)}


def test_overlap_limit(tmp_path: Path, fm_root: Path) -> None:
    summary = make_fashion_mnist_detection(
        tmp_path, fashion_mnist_root=fm_root, n_train=12, n_test=0, size=64,
        objects=(6, 6), scale=(1.0, 1.6), max_overlap=0.1, max_tries=5, seed=1,
    )  # fmt: skip
    doc = json.loads((tmp_path / "annotations/instances_train.json").read_text())
    stats = summary["splits"]["train"]
    assert stats["boxes"] == len(doc["annotations"])
    assert stats["boxes"] + stats["skipped_objects"] == 12 * 6
    assert stats["skipped_objects"] > 0  # 6 objects of >= 28 px rarely fit a 64 px canvas
    by_image: dict[int, list[list[float]]] = {}
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    worst = 0.0
    for boxes in by_image.values():
        for i in range(len(boxes)):
            for j in range(i):
                a, b = boxes[i], boxes[j]
                iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
                ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
                union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
                worst = max(worst, iw * ih / union)
    assert 0.0 < worst <= 0.1


def test_round_trip_and_records(tmp_path: Path, fm_root: Path) -> None:
    summary = make_fashion_mnist_detection(
        tmp_path, fashion_mnist_root=fm_root, n_train=5, n_test=3, size=(40, 60), seed=2
    )
    train = CocoDetection.from_split(tmp_path, "train")
    test = CocoDetection.from_split(tmp_path, "test")
    assert (len(train), len(test)) == (5, 3)
    assert train.num_classes == 10 and train.class_names == FASHION_MNIST_CLASSES
    assert all(40 <= h <= 60 and 40 <= w <= 60 for h, w in train.sizes + test.sizes)
    assert sum(len(train.target(i)[1]) for i in range(5)) == summary["splits"]["train"]["boxes"]
    assert set(sum((train.target(i)[1].tolist() for i in range(5)), [])) <= {1, 2, 3}
    assert set(sum((test.target(i)[1].tolist() for i in range(3)), [])) <= {8, 9, 10}
    record = json.loads((tmp_path / "dataset.json").read_text())
    assert record["kdlab_version"] == __version__
    assert record["params"]["size"] == [40, 60] and record["params"]["seed"] == 2
    counts = record["splits"]["train"]["class_counts"]
    assert sum(counts.values()) == summary["splits"]["train"]["boxes"]
    info = json.loads(train.annotation_file.read_text())["info"]
    assert info["params"] == record["params"] and "train split" in info["source"]


def test_noise_changes_pixels_not_boxes(tmp_path: Path, fm_root: Path) -> None:
    kw = dict(fashion_mnist_root=fm_root, n_train=3, n_test=0, size=48, seed=7)
    make_fashion_mnist_detection(tmp_path / "clean", **kw)
    make_fashion_mnist_detection(tmp_path / "noisy", noise=10.0, **kw)
    clean = json.loads((tmp_path / "clean/annotations/instances_train.json").read_text())
    noisy = json.loads((tmp_path / "noisy/annotations/instances_train.json").read_text())
    assert clean["annotations"] == noisy["annotations"]
    a, b = _pil(tmp_path / "clean/train/000001.png"), _pil(tmp_path / "noisy/train/000001.png")
    diff = b.astype(float) - a.astype(float)
    assert 5 < diff.std() < 15


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": (60, 40)}, "size: min 60 is larger than max 40"),
        ({"size": 4}, "at least 8"),
        ({"objects": (1,)}, "objects must be a number or a"),
        ({"scale": (0.0, 1.0)}, "scale must be > 0"),
        ({"max_overlap": 1.5}, r"max_overlap must be in \[0, 1\]"),
        ({"n_train": -1}, "n_train must be an integer >= 0"),
        ({"noise": -1.0}, "noise must be >= 0"),
    ],
)
def test_bad_parameters(tmp_path: Path, fm_root: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_fashion_mnist_detection(tmp_path, fashion_mnist_root=fm_root, **kwargs)


def test_missing_fashion_mnist(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="Fashion-MNIST not found"):
        make_fashion_mnist_detection(tmp_path / "out", fashion_mnist_root=tmp_path / "empty")


# ------------------------------------------------------------------------------------------ CLI


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kdlab")
    add_detection_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_synthetic(tmp_path: Path, fm_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["detection-data", "synthetic", "--out", str(tmp_path / "cli"), "--train", "3",
            "--test", "2", "--min-size", "40", "--max-size", "50", "--objects", "2", "2",
            "--seed", "9", "--fashion-mnist", str(fm_root)]  # fmt: skip
    args = _parse(argv)
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "train: 3 images" in out and "test: 2 images" in out
    # The CLI passes its options through: same files as the Python call.
    make_fashion_mnist_detection(
        tmp_path / "api", fashion_mnist_root=fm_root, n_train=3, n_test=2, size=(40, 50),
        objects=(2, 2), seed=9,
    )  # fmt: skip
    cli_files, api_files = _all_files(tmp_path / "cli"), _all_files(tmp_path / "api")
    assert cli_files == api_files
    params = json.loads(cli_files["dataset.json"])["params"]
    assert params["size"] == [40, 50] and params["objects"] == [2, 2]


def test_cli_rejects_half_a_size_range(tmp_path: Path, fm_root: Path) -> None:
    args = _parse(["detection-data", "synthetic", "--out", str(tmp_path), "--min-size", "40"])
    with pytest.raises(ConfigError, match="both --min-size and --max-size"):
        args.fn(args)
    with pytest.raises(SystemExit):
        _parse(["detection-data"])  # a source subcommand is required
