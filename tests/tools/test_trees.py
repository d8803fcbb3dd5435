"""DeepForest tree-crown importer (kdlab.tools.trees) on a tiny fake wheel built here; the
real wheel is used only when KDLAB_DEEPFOREST_WHEEL points at it."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kdlab.cli.detection_data import add_detection_data_parser
from kdlab.core.errors import DatasetError
from kdlab.tools import trees
from kdlab.tools.trees import import_tree_crowns, tile_boxes, tile_offsets

(CROP2,), (CROP1,) = trees.TRAIN_IMAGES, trees.TEST_IMAGES


def _xml(filename: str, w: int, h: int, objs: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{a}</xmin>"
        f"<ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for n, (a, b, c, d) in objs)
    return (f"<annotation><folder>data</folder><filename>{filename}</filename><size><width>{w}"
            f"</width><height>{h}</height><depth>3</depth></size>{body}</annotation>")


def _png(w: int, h: int, seed: int) -> tuple[bytes, np.ndarray]:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), arr


# Fake data: (width, height, VOC objects). Boxes in VOC 1-based inclusive indices.
FAKE: dict[str, tuple[int, int, list[tuple[str, tuple[int, int, int, int]]]]] = {
    CROP2: (250, 130, [("Tree", (91, 11, 110, 30)),    # A: (90, 10, 110, 30), halves at x=100
                       ("Tree", (81, 41, 110, 60)),    # B: (80, 40, 110, 60), 2/3 left of x=100
                       ("Tree", (1, 1, 20, 20))]),     # C: (0, 0, 20, 20)
    CROP1: (90, 60, [("Tree", (1, 1, 90, 60))]),       # D: the whole (sub-tile) image
    "OSBS_029": (40, 40, [("Tree", (2, 3, 10, 12)), ("Tree", (30, 30, 45, 45))]),  # 2nd clipped
    "SOAP_061": (40, 40, [("Alive", (1, 1, 5, 5)), ("Dead", (20, 20, 30, 35))]),
}


def _fake_wheel(path: Path, drop: str | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    pixels = {}
    with zipfile.ZipFile(path, "w") as zf:
        for i, (stem, (w, h, objs)) in enumerate(FAKE.items()):
            data, pixels[stem] = _png(w, h, i)
            for name, content in ((f"{stem}.png", data),
                                  (f"{stem}.xml", _xml(f"{stem}.png", w, h, objs).encode())):
                if name != drop:
                    zf.writestr(f"deepforest/data/{name}", content)
        zf.writestr("deepforest/__init__.py", "")
    return path, pixels


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _doc(out: Path, split: str) -> dict[str, Any]:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def test_tile_offsets_golden() -> None:
    # The real crops: 6 x 7 + 4 x 3 = 54 tiles of 400 px; the last start is length - 400.
    assert tile_offsets(2299, 400) == [0, 400, 800, 1200, 1600, 1899]
    assert tile_offsets(2472, 400) == [0, 400, 800, 1200, 1600, 2000, 2072]
    assert tile_offsets(1249, 400) == [0, 400, 800, 849]
    assert tile_offsets(1035, 400) == [0, 400, 635]
    assert tile_offsets(800, 400) == [0, 400]  # exact multiple: no extra window
    assert tile_offsets(400, 400) == [0]
    assert tile_offsets(300, 400) == [0]  # shorter than a tile: one window of the whole
    assert tile_offsets(1000, 400, 100) == [0, 300, 600]  # stride 300, 600 = 1000 - 400
    assert tile_offsets(1100, 400, 100) == [0, 300, 600, 700]
    with pytest.raises(DatasetError, match="overlap < tile"):
        tile_offsets(1000, 400, 400)


def test_tile_boxes_visibility_and_shift() -> None:
    boxes = np.array([[90, 10, 110, 30],   # 50 % inside [0, 100]: not > 0.5 -> dropped
                      [80, 40, 110, 60],   # 2/3 inside -> kept, clipped to x2 = 100
                      [0, 0, 20, 20],      # fully inside
                      [150, 0, 160, 10]],  # outside
                     dtype=float)
    kept, idx = tile_boxes(boxes, (0, 0, 100, 100))
    assert idx.tolist() == [1, 2]
    assert kept.tolist() == [[80, 40, 100, 60], [0, 0, 20, 20]]
    kept, idx = tile_boxes(boxes, (0, 30, 100, 130))  # shifted by y0 = 30; C's 0..20 is outside
    assert idx.tolist() == [1] and kept.tolist() == [[80, 10, 100, 30]]
    kept, idx = tile_boxes(boxes, (100, 0, 200, 100), min_visible=0.0)  # any overlap
    assert idx.tolist() == [0, 1, 3]
    assert kept.tolist() == [[0, 10, 10, 30], [0, 40, 10, 60], [50, 0, 60, 10]]
    kept, idx = tile_boxes(boxes, (100, 0, 200, 100), min_visible=0.4)  # 1/2 kept, 1/3 not
    assert idx.tolist() == [0, 3]


def test_import_fake_wheel_golden(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wheel, pixels = _fake_wheel(tmp_path / "fake.whl")
    out = tmp_path / "trees"
    with caplog.at_level(logging.WARNING):
        summary = import_tree_crowns(out, wheel=wheel, tile=100, expected_sha256=_sha(wheel))
    # crop2 (train) 250 x 130: x starts [0, 100, 150], y starts [0, 30] -> 6 tiles; crop1
    # (test) 90 x 60 -> 1. Boxes: C and B in tile (0, 0), B in tile (0, 30), A nowhere (50/50),
    # D in crop1's tile.
    assert summary["splits"] == {"train": {"images": 6, "boxes": 3},
                                 "test": {"images": 1, "boxes": 1},
                                 "test_other_sites": {"images": 2, "boxes": 4}}
    assert summary["sha256"] == _sha(wheel)
    train = _doc(out, "train")
    assert train["categories"] == [{"id": 1, "name": "Tree"}]
    names = [im["file_name"] for im in train["images"]]
    assert names == [f"{CROP2}_x{x}_y{y}.png" for y in (0, 30) for x in (0, 100, 150)]
    assert all((im["width"], im["height"]) == (100, 100) for im in train["images"])
    by_image: dict[int, list[list[float]]] = {}
    for a in train["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["bbox"])
    # [x, y, w, h] in tile coordinates.
    assert by_image == {1: [[80, 40, 20, 20], [0, 0, 20, 20]], 4: [[80, 10, 20, 20]]}
    with Image.open(out / "train" / f"{CROP2}_x150_y30.png") as im:
        assert np.array_equal(np.asarray(im), pixels[CROP2][30:130, 150:250])
    same_site = _doc(out, "test")
    assert [(im["file_name"], im["width"], im["height"]) for im in same_site["images"]] == [
        (f"{CROP1}_x0_y0.png", 90, 60)]
    assert [a["bbox"] for a in same_site["annotations"]] == [[0, 0, 90, 60]]
    test = _doc(out, "test_other_sites")
    assert [im["file_name"] for im in test["images"]] == ["OSBS_029.png", "SOAP_061.png"]
    # OSBS: (1, 2, 10, 12) and (29, 29, 45, 45) clipped to 40; SOAP: Alive and Dead both class 1.
    assert [(a["image_id"], a["category_id"], a["bbox"]) for a in test["annotations"]] == [
        (1, 1, [1, 2, 9, 10]), (1, 1, [29, 29, 11, 11]),
        (2, 1, [0, 0, 5, 5]), (2, 1, [19, 19, 11, 16])]
    assert any("clipped" in r.message and "OSBS_029.xml" in r.message for r in caplog.records)


def test_overlap_and_checksum_and_errors(tmp_path: Path) -> None:
    wheel, _ = _fake_wheel(tmp_path / "fake.whl")
    s = import_tree_crowns(tmp_path / "o1", wheel=wheel, tile=100, overlap=50,
                           expected_sha256=None)
    # stride 50: x starts [0, 50, 100, 150], y starts [0, 30] -> 8 tiles.
    assert s["splits"]["train"]["images"] == 8
    with pytest.raises(DatasetError, match="sha256"):
        import_tree_crowns(tmp_path / "o2", wheel=wheel)  # the real wheel's checksum
    with pytest.raises(DatasetError, match="not found"):
        import_tree_crowns(tmp_path / "o3", wheel=tmp_path / "none.whl")
    with pytest.raises(DatasetError, match="--wheel PATH"):
        import_tree_crowns(tmp_path / "o4")
    with pytest.raises(DatasetError, match="min_visible"):
        import_tree_crowns(tmp_path / "o5", wheel=wheel, min_visible=1.0)
    bad, _ = _fake_wheel(tmp_path / "bad.whl", drop="SOAP_061.xml")
    with pytest.raises(DatasetError, match="no member deepforest/data/SOAP_061.xml"):
        import_tree_crowns(tmp_path / "o6", wheel=bad, tile=100, expected_sha256=None)
    (tmp_path / "notzip.whl").write_bytes(b"hello")
    with pytest.raises(DatasetError, match="not a readable wheel"):
        import_tree_crowns(tmp_path / "o7", wheel=tmp_path / "notzip.whl", expected_sha256=None)


def test_download_uses_pip_and_reports_failure(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []

    def failing(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found "
                                           "for deepforest==2.1.0\n")

    monkeypatch.setattr(trees.subprocess, "run", failing)
    with pytest.raises(DatasetError, match=r"could not download deepforest==2\.1\.0 \(ERROR: No "
                                           r"matching distribution.*--wheel"):
        import_tree_crowns(tmp_path / "o", download=True)
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "deepforest==2.1.0" in calls[0]

    def succeeding(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        _fake_wheel(dest / trees.DEEPFOREST_WHEEL)
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(trees.subprocess, "run", succeeding)
    s = import_tree_crowns(tmp_path / "o", download=True, tile=100, expected_sha256=None)
    assert s["wheel"] == str(tmp_path / "o" / "_wheel" / trees.DEEPFOREST_WHEEL)
    assert s["splits"]["train"]["images"] == 6
    # The cached wheel is reused without pip.
    monkeypatch.setattr(trees.subprocess, "run", failing)
    s2 = import_tree_crowns(tmp_path / "o", tile=100, expected_sha256=None)
    assert s2["splits"] == s["splits"]


@pytest.mark.skipif(not os.environ.get("KDLAB_DEEPFOREST_WHEEL"),
                    reason="set KDLAB_DEEPFOREST_WHEEL to the deepforest-2.1.0 wheel")
def test_real_wheel_counts(tmp_path: Path) -> None:
    s = import_tree_crowns(tmp_path, wheel=os.environ["KDLAB_DEEPFOREST_WHEEL"])
    assert s["sha256"] == trees.DEEPFOREST_SHA256
    # 6 x 7 and 4 x 3 tiles; boxes near the shifted edge tiles are counted in two tiles.
    assert s["splits"] == {"train": {"images": 42, "boxes": 677},  # crop2: 574 source boxes
                           "test": {"images": 12, "boxes": 399},  # crop: 279 source boxes
                           "test_other_sites": {"images": 2, "boxes": 98}}  # 61 + 37


def test_cli_trees_handler(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    wheel, _ = _fake_wheel(tmp_path / "fake.whl")
    parser = argparse.ArgumentParser()
    add_detection_data_parser(parser.add_subparsers())
    args = parser.parse_args(["detection-data", "trees", "--out", str(tmp_path / "o"),
                              "--wheel", str(wheel), "--tile", "100"])
    # The CLI keeps the real checksum: the fake wheel is refused with a one-line error.
    with pytest.raises(DatasetError, match="sha256"):
        args.fn(args)
    # The handler imports the function at call time: accept the fake wheel's checksum.
    monkeypatch.setattr(trees, "import_tree_crowns",
                        functools.partial(import_tree_crowns, expected_sha256=_sha(wheel)))
    assert args.fn(args) == 0
    assert "train: 6 images, 3 boxes" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # --wheel and --download exclude each other
        parser.parse_args(["detection-data", "trees", "--out", "o", "--wheel", "w",
                           "--download"])
