"""Pascal-VOC importer (kdlab.tools.voc) on small VOC trees generated here."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from kdlab.cli.detection_data import add_detection_data_parser
from kdlab.core.errors import ConfigError, DatasetError
from kdlab.tasks.detection.coco import CocoDetection
from kdlab.tools.voc import clip_box, import_voc, parse_voc_xml, voc_box_to_xyxy

Obj = tuple[str, tuple[int, int, int, int], int]  # name, (xmin, ymin, xmax, ymax), difficult


def _xml(filename: str | None, w: int, h: int, objs: list[Obj]) -> str:
    parts = ["<annotation>", "<folder>VOC2007</folder>"]
    if filename is not None:
        parts.append(f"<filename>{filename}</filename>")
    parts.append(f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size>")
    for name, (x1, y1, x2, y2), diff in objs:
        parts.append(f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated>"
                     f"<difficult>{diff}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def _image(w: int, h: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _devkit(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """VOCdevkit/VOC2007 with 3 images: 000001, 000002 in trainval, 000003 in test."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True)
    files: dict[str, tuple[int, int, list[Obj]]] = {
        "000001": (64, 48, [("dog", (1, 1, 64, 48), 0), ("cat", (10, 5, 20, 30), 1)]),
        "000002": (40, 40, [("person", (5, 6, 15, 26), 0)]),
        "000003": (50, 30, [("cat", (2, 3, 40, 29), 0), ("dog", (30, 1, 60, 20), 0)]),  # clipped
    }
    pixels = {}
    for i, (stem, (w, h, objs)) in enumerate(files.items()):
        # Stored as PNG (lossless) under the XML's filename so pixels can be compared exactly.
        pixels[stem] = _image(w, h, i)
        Image.fromarray(pixels[stem]).save(root / "JPEGImages" / f"{stem}.png")
        (root / "Annotations" / f"{stem}.xml").write_text(_xml(f"{stem}.png", w, h, objs))
    (root / "ImageSets/Main/trainval.txt").write_text("000001\n000002\n")
    (root / "ImageSets/Main/test.txt").write_text("000003\n")
    return root, pixels


def _load(out: Path, split: str) -> dict[str, Any]:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def test_box_conversion_and_clip() -> None:
    assert voc_box_to_xyxy((1, 1, 64, 48)) == (0.0, 0.0, 64.0, 48.0)
    assert voc_box_to_xyxy((10, 5, 20, 30)) == (9.0, 4.0, 20.0, 30.0)
    assert clip_box((-3.0, 2.0, 70.0, 10.0), 64, 48) == ((0.0, 2.0, 64.0, 10.0), True)
    assert clip_box((1.0, 2.0, 3.0, 4.0), 64, 48) == ((1.0, 2.0, 3.0, 4.0), False)


def test_devkit_import_exact_boxes_classes_difficult(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    root, pixels = _devkit(tmp_path)
    out = tmp_path / "coco"
    with caplog.at_level(logging.WARNING, logger="kdlab.tools.voc"):
        summary = import_voc(tmp_path / "VOCdevkit", out)  # one VOC20xx inside: found
    assert summary["classes"] == ["cat", "dog", "person"]
    assert summary["splits"] == {"train": {"images": 2, "boxes": 3, "crowd": 1},
                                 "test": {"images": 1, "boxes": 2, "crowd": 0}}
    train = _load(out, "train")
    assert train["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"},
                                   {"id": 3, "name": "person"}]
    assert [(im["file_name"], im["width"], im["height"]) for im in train["images"]] == [
        ("000001.png", 64, 48), ("000002.png", 40, 40)]
    got = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"]) for a in train["annotations"]]
    # (xmin - 1, ymin - 1, xmax, ymax) -> COCO [x, y, w, h] = [xmin-1, ymin-1, xmax-xmin+1, ...]
    assert got == [(1, 2, [0, 0, 64, 48], 0), (1, 1, [9, 4, 11, 26], 1),
                   (2, 3, [4, 5, 11, 21], 0)]
    test = _load(out, "test")
    # dog (30, 1, 60, 20) in a 50 x 30 image: (29, 0, 60, 20) clipped to (29, 0, 50, 20).
    assert [a["bbox"] for a in test["annotations"]] == [[1, 2, 39, 27], [29, 0, 21, 20]]
    assert any("clipped" in r.message and "000003" in r.message for r in caplog.records)
    # Pixels survive exactly; the reader sees the difficult box as crowd (excluded).
    ds = CocoDetection(out / "train", out / "annotations" / "instances_train.json")
    sample = ds[0]
    assert np.array_equal(sample.image.permute(1, 2, 0).numpy(), pixels["000001"])
    assert sample.boxes.tolist() == [[0.0, 0.0, 64.0, 48.0]]
    assert sample.labels.tolist() == [2]


def test_difficult_kept_as_regular_box_when_asked(tmp_path: Path) -> None:
    _devkit(tmp_path)
    summary = import_voc(tmp_path / "VOCdevkit", tmp_path / "coco", difficult_as_crowd=False)
    assert summary["splits"]["train"]["crowd"] == 0
    assert [a["iscrowd"] for a in _load(tmp_path / "coco", "train")["annotations"]] == [0, 0, 0]


def test_given_classes_order_and_unknown_skipped(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    root, _ = _devkit(tmp_path)
    out = tmp_path / "coco"
    with caplog.at_level(logging.WARNING, logger="kdlab.tools.voc"):
        summary = import_voc(root, out, classes=["person", "dog"],
                             splits={"all": "trainval"})
    assert list(summary["splits"]) == ["all"]
    doc = _load(out, "all")
    assert doc["categories"] == [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}]
    assert [(a["image_id"], a["category_id"]) for a in doc["annotations"]] == [(1, 2), (2, 1)]
    assert any("cat" in r.message and "skipped" in r.message for r in caplog.records)


def _plain(tmp_path: Path, n: int) -> Path:
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(n):
        Image.fromarray(_image(20, 16, i)).save(root / f"img_{i:02d}.png")
        (root / f"img_{i:02d}.xml").write_text(
            _xml(f"img_{i:02d}.png", 20, 16, [("Tree", (i % 5 + 1, 2, i % 5 + 10, 12), 0)]))
    return root


def test_plain_folder_seeded_split(tmp_path: Path) -> None:
    root = _plain(tmp_path, 10)
    a = import_voc(root, tmp_path / "a", test_fraction=0.2, seed=3)
    import_voc(root, tmp_path / "b", test_fraction=0.2, seed=3)
    c = import_voc(root, tmp_path / "c", test_fraction=0.2, seed=4)
    assert a["splits"] == {"train": {"images": 8, "boxes": 8, "crowd": 0},
                           "test": {"images": 2, "boxes": 2, "crowd": 0}}

    def names(out: Path, split: str) -> list[str]:
        return [im["file_name"] for im in _load(out, split)["images"]]

    assert names(tmp_path / "a", "test") == names(tmp_path / "b", "test")  # seeded
    assert sorted(names(tmp_path / "a", "train") + names(tmp_path / "a", "test")) == [
        f"img_{i:02d}.png" for i in range(10)]  # a partition of all files
    assert c["splits"]["test"]["images"] == 2
    assert names(tmp_path / "c", "test") != names(tmp_path / "a", "test")  # seed changes the draw
    only_train = import_voc(root, tmp_path / "d", test_fraction=0.0)
    assert list(only_train["splits"]) == ["train"]
    doc = _load(tmp_path / "d", "train")
    # img_03: VOC (4, 2, 13, 12) -> (3, 1, 13, 12) -> COCO [3, 1, 10, 11]
    assert doc["annotations"][3]["bbox"] == [3, 1, 10, 11]


def test_plain_folder_given_lists(tmp_path: Path) -> None:
    root = _plain(tmp_path, 4)
    (root / "train.txt").write_text("img_00\nimg_02.png\n")
    (tmp_path / "val.txt").write_text("img_03 1\n")
    out = tmp_path / "coco"
    summary = import_voc(root, out, splits={"train": "train.txt", "val": str(tmp_path / "val.txt")})
    assert summary["splits"]["train"]["images"] == 2 and summary["splits"]["val"]["images"] == 1
    assert [im["file_name"] for im in _load(out, "train")["images"]] == ["img_00.png",
                                                                         "img_02.png"]


def test_image_found_by_stem_when_filename_absent(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    Image.fromarray(_image(8, 8, 0)).save(root / "a.jpg", quality=95)
    (root / "a.xml").write_text(_xml(None, 8, 8, [("x", (1, 1, 4, 4), 0)]))
    summary = import_voc(root, tmp_path / "o", test_fraction=0.0)
    assert summary["splits"]["train"] == {"images": 1, "boxes": 1, "crowd": 0}


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        import_voc(tmp_path / "nope", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no Pascal-VOC annotations"):
        import_voc(empty, tmp_path / "o")

    root = _plain(tmp_path, 3)
    (root / "img_01.xml").write_text("<annotation><object><name>x</name>")
    with pytest.raises(DatasetError, match=r"img_01\.xml: malformed XML"):
        import_voc(root, tmp_path / "o")
    (root / "img_01.xml").write_text(
        '<!DOCTYPE a [<!ENTITY e "boom">]><annotation><filename>&e;</filename></annotation>')
    with pytest.raises(DatasetError, match="DOCTYPE or entity"):
        import_voc(root, tmp_path / "o")
    (root / "img_01.xml").write_text(_xml("img_01.png", 20, 16, [("x", (1, 1, 4, 4), 0)])
                                     .replace("<xmax>4</xmax>", "<xmax>four</xmax>"))
    with pytest.raises(DatasetError, match=r"img_01\.xml: object 0 \(x\) has bndbox/xmax"):
        import_voc(root, tmp_path / "o")
    (root / "img_01.xml").write_text(_xml("img_01.png", 20, 16, [("x", (1, 1, 4, 4), 0)]))
    (root / "img_01.png").unlink()
    with pytest.raises(DatasetError, match=r"img_01\.xml: image img_01\.png not found"):
        import_voc(root, tmp_path / "o", test_fraction=0.0)
    with pytest.raises(DatasetError, match="image set 'missing' not found"):
        import_voc(root, tmp_path / "o", splits={"train": "missing"})
    (root / "list.txt").write_text("img_09\n")
    with pytest.raises(DatasetError, match=r"img_09\.xml not found"):
        import_voc(root, tmp_path / "o", splits={"train": "list.txt"})
    (root / "img_00.png").write_bytes(b"not an image")
    (root / "list.txt").write_text("img_00\n")
    with pytest.raises(DatasetError, match=r"cannot decode image .*img_00\.png"):
        import_voc(root, tmp_path / "o", splits={"train": "list.txt"})


def test_parse_voc_xml_fields() -> None:
    ann = parse_voc_xml(_xml("a.jpg", 30, 20, [("car", (2, 3, 9, 10), 1)]).encode(), "mem")
    assert (ann.filename, ann.width, ann.height) == ("a.jpg", 30, 20)
    assert ann.objects[0].name == "car" and ann.objects[0].box == (2.0, 3.0, 9.0, 10.0)
    assert ann.objects[0].difficult
    with pytest.raises(DatasetError, match="expected <annotation>"):
        parse_voc_xml(b"<root/>", "mem")


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_detection_data_parser(parser.add_subparsers())
    return parser.parse_args(["detection-data", *argv])


def test_cli_voc_handler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _devkit(tmp_path)
    out = tmp_path / "coco"
    args = _cli(["voc", "--voc-root", str(tmp_path / "VOCdevkit"), "--out", str(out),
                 "--split", "train=trainval", "--keep-difficult"])
    assert args.fn(args) == 0
    text = capsys.readouterr().out
    assert "classes: cat, dog, person" in text
    assert "train: 2 images, 3 boxes (0 difficult as crowd)" in text
    assert [a["iscrowd"] for a in _load(out, "train")["annotations"]] == [0, 0, 0]
    bad = _cli(["voc", "--voc-root", str(tmp_path), "--out", str(out), "--split", "train"])
    with pytest.raises(ConfigError, match="NAME=SET"):
        bad.fn(bad)
