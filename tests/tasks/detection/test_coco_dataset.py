"""kdlab.tasks.detection.coco: the COCO-format writer and reader.

Round trips (write_coco_split -> CocoDetection) with exact boxes, labels, sizes and pixels;
golden xywh <-> xyxy values; torchvision-reference target conversion (crowd removal, clamping,
degenerate boxes dropped) on a hand-written JSON; every documented error case; the box policy
(malformed bbox -> one-line error, dropped and clipped boxes -> one counted WARNING per file),
also through the detection data builder a training run uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from kdlab.config import DataConfig, DetectionConfig
from kdlab.core.errors import DatasetError
from kdlab.tasks.detection.coco import (
    CocoDetection,
    CocoImage,
    write_coco_split,
    xywh_to_xyxy,
    xyxy_to_xywh,
)
from kdlab.tasks.detection.data import build_detection_data

CATS = [{"id": 5, "name": "five", "supercategory": "num"}, {"id": 2, "name": "two"}]


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _three_images() -> list[CocoImage]:
    return [
        CocoImage("a.png", _rgb(20, 30, 0), np.array([[1, 2, 5.5, 9], [0, 0, 30, 20]]), [5, 2]),
        CocoImage("sub/b.png", _rgb(17, 11, 1), np.zeros((0, 4)), []),
        CocoImage(
            "c.png",
            _rgb(8, 9, 2),
            np.array([[0.25, 0.5, 3.75, 4.0], [2, 2, 6, 7], [1, 1, 2, 2]]),
            [2, 2, 5],
            iscrowd=[0, 1, 0],
        ),
    ]


def _write_json(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)


# ---------------------------------------------------------------------------------- conversions


def test_box_conversion_golden_values() -> None:
    xyxy = np.array([[1.0, 2.0, 5.5, 9.0], [10, 20, 11, 60]])
    xywh = np.array([[1.0, 2.0, 4.5, 7.0], [10, 20, 1, 40]])
    np.testing.assert_array_equal(xyxy_to_xywh(xyxy), xywh)
    np.testing.assert_array_equal(xywh_to_xyxy(xywh), xyxy)
    rnd = np.random.default_rng(0).random((50, 4)) * 100
    np.testing.assert_allclose(xywh_to_xyxy(xyxy_to_xywh(rnd)), rnd, rtol=0, atol=1e-12)
    assert xyxy_to_xywh(np.zeros((0, 4))).shape == (0, 4)


# -------------------------------------------------------------------------------------- writer


def test_writer_json_layout(tmp_path: Path) -> None:
    path = write_coco_split(tmp_path, "train", _three_images(), CATS, info={"note": "x"})
    assert path == tmp_path / "annotations" / "instances_train.json"
    doc = json.loads(path.read_text())
    assert doc["info"] == {"note": "x"}
    assert doc["categories"] == CATS
    assert doc["images"] == [
        {"id": 1, "file_name": "a.png", "width": 30, "height": 20},
        {"id": 2, "file_name": "sub/b.png", "width": 11, "height": 17},
        {"id": 3, "file_name": "c.png", "width": 9, "height": 8},
    ]
    anns = doc["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4, 5]
    assert [a["image_id"] for a in anns] == [1, 1, 3, 3, 3]
    assert [a["category_id"] for a in anns] == [5, 2, 2, 2, 5]
    assert anns[0]["bbox"] == [1, 2, 4.5, 7] and anns[0]["area"] == 31.5
    assert anns[1]["bbox"] == [0, 0, 30, 20] and anns[1]["area"] == 600
    assert anns[2]["bbox"] == [0.25, 0.5, 3.5, 3.5] and anns[2]["area"] == 12.25
    assert [a["iscrowd"] for a in anns] == [0, 0, 0, 1, 0]
    assert (tmp_path / "train" / "sub" / "b.png").is_file()
    assert not list(tmp_path.rglob("*.tmp"))


def test_writer_is_deterministic(tmp_path: Path) -> None:
    a = write_coco_split(tmp_path / "a", "s", _three_images(), CATS)
    b = write_coco_split(tmp_path / "b", "s", _three_images(), CATS)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/s/c.png").read_bytes() == (tmp_path / "b/s/c.png").read_bytes()


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([[1, 1, 4, 4]]), [3]), "category id 3"),
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([[4, 1, 4, 4]]), [2]), "x2 > x1"),
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([[1, 5, 4, 2]]), [2]), "y2 > y1"),
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([[1, 1, 11, 4]]), [2]), "outside"),
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([[np.nan, 1, 3, 4]]), [2]), "not finite"),
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([[1, 1, 4, 4]]), [2, 5]), "1 boxes but 2"),
        (CocoImage("x.png", _rgb(10, 10, 0), np.array([1, 1, 4]), [2]), "N x 4"),
        (CocoImage("x.png", _rgb(10, 10, 0).astype(float), np.zeros((0, 4)), []), "uint8"),
        (CocoImage("../x.png", _rgb(10, 10, 0), np.zeros((0, 4)), []), "relative path"),
        (
            CocoImage("x.png", _rgb(10, 10, 0), np.array([[1, 1, 4, 4]]), [2], iscrowd=[2]),
            "iscrowd",
        ),
    ],
)
def test_writer_rejects_bad_input(tmp_path: Path, image: CocoImage, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        write_coco_split(tmp_path, "train", [image], CATS)
    assert not (tmp_path / "annotations" / "instances_train.json").exists()


def test_writer_rejects_bad_categories_and_duplicates(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="duplicate category id 2"):
        write_coco_split(tmp_path, "t", [], [{"id": 2, "name": "a"}, {"id": 2, "name": "b"}])
    with pytest.raises(DatasetError, match="'id' and 'name'"):
        write_coco_split(tmp_path, "t", [], [{"id": 2}])
    img = CocoImage("x.png", _rgb(4, 4, 0), np.zeros((0, 4)), [])
    with pytest.raises(DatasetError, match="duplicate file_name"):
        write_coco_split(tmp_path, "t", [img, img], CATS)


# --------------------------------------------------------------------------------- round trip


def test_round_trip_exact(tmp_path: Path) -> None:
    images = _three_images()
    write_coco_split(tmp_path, "train", images, CATS)
    ds = CocoDetection.from_split(tmp_path, "train")
    assert len(ds) == 3
    assert ds.num_classes == 2
    # Contiguous labels in sorted category-id order: id 2 -> 1, id 5 -> 2.
    assert ds.label_to_category_id == {1: 2, 2: 5}
    assert ds.class_names == ["two", "five"]
    assert ds.image_ids == [1, 2, 3]
    assert ds.sizes == [(20, 30), (17, 11), (8, 9)]
    assert ds.annotation_file == tmp_path / "annotations" / "instances_train.json"

    s0 = ds[0]
    assert s0.image.dtype == torch.uint8 and s0.image.shape == (3, 20, 30)
    assert torch.equal(s0.image, torch.from_numpy(images[0].image).permute(2, 0, 1))
    assert s0.boxes.dtype == torch.float32 and s0.labels.dtype == torch.int64
    assert s0.boxes.tolist() == [[1, 2, 5.5, 9], [0, 0, 30, 20]]
    assert s0.labels.tolist() == [2, 1]
    assert s0.image_id == 1

    s1 = ds[1]
    assert s1.boxes.shape == (0, 4) and s1.labels.shape == (0,)
    assert s1.image.shape == (3, 17, 11)

    s2 = ds[-1]  # crowd box [2, 2, 6, 7] is left out of the targets
    assert s2.boxes.tolist() == [[0.25, 0.5, 3.75, 4.0], [1, 1, 2, 2]]
    assert s2.labels.tolist() == [1, 2]
    boxes, labels = ds.target(2)
    assert torch.equal(boxes, s2.boxes) and torch.equal(labels, s2.labels)
    with pytest.raises(IndexError):
        ds[3]


def test_drop_empty(tmp_path: Path) -> None:
    images = [
        *_three_images(),
        CocoImage("crowd_only.png", _rgb(6, 6, 3), np.array([[1, 1, 3, 3]]), [2], iscrowd=[1]),
    ]
    write_coco_split(tmp_path, "train", images, CATS)
    assert len(CocoDetection.from_split(tmp_path, "train")) == 4
    kept = CocoDetection.from_split(tmp_path, "train", drop_empty=True)
    assert kept.image_ids == [1, 3]
    assert kept.sizes == [(20, 30), (8, 9)]
    assert kept[1].image_id == 3


def test_coco2017_layout(tmp_path: Path) -> None:
    write_coco_split(tmp_path, "val2017", _three_images()[:1], CATS)
    ds = CocoDetection.from_split(tmp_path, "val")
    assert ds.images_dir == tmp_path / "val2017"
    assert ds[0].boxes.shape == (2, 4)
    assert len(CocoDetection.from_split(tmp_path, "val2017")) == 1
    direct = CocoDetection(tmp_path / "val2017", tmp_path / "annotations/instances_val2017.json")
    assert direct.image_ids == [1]


def test_pycocotools_reads_written_json(tmp_path: Path) -> None:
    """The written JSON is valid for COCOeval: ground truth scored as detections gives AP 1."""
    coco_mod = pytest.importorskip("pycocotools.coco")
    eval_mod = pytest.importorskip("pycocotools.cocoeval")
    path = write_coco_split(tmp_path, "val", _three_images(), CATS)
    gt = coco_mod.COCO(str(path))
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1}
        for a in gt.dataset["annotations"]
        if not a["iscrowd"]
    ]
    ev = eval_mod.COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


# ------------------------------------------------------------------ hand-written JSON (reader)


def _handmade(tmp_path: Path, **override: Any) -> tuple[Path, Path]:
    img_dir = tmp_path / "imgs"
    _png(img_dir / "p.png", _rgb(10, 20, 0))
    _png(img_dir / "q.png", _rgb(12, 8, 1))
    doc: dict[str, Any] = {
        "images": [
            {"id": 42, "file_name": "p.png", "width": 20, "height": 10},
            {"id": 7, "file_name": "q.png", "width": 8, "height": 12},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 90, "bbox": [2, 3, 4, 5], "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 1, "bbox": [15, -2, 10, 4], "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 7, "bbox": [5, 5, 0, 3], "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 7, "bbox": [1, 1, 2, 2]},
            {"id": 5, "image_id": 7, "category_id": 90, "bbox": [30, 1, 2, 2], "iscrowd": 0},
        ],
        "categories": [
            {"id": 90, "name": "toothbrush"},
            {"id": 1, "name": "person"},
            {"id": 7, "name": "train"},
        ],
    }
    doc.update(override)
    return img_dir, _write_json(tmp_path / "ann.json", doc)


def test_non_contiguous_category_ids_and_torchvision_conversion(tmp_path: Path) -> None:
    img_dir, ann = _handmade(tmp_path)
    ds = CocoDetection(img_dir, ann)
    assert ds.num_classes == 3
    assert ds.label_to_category_id == {1: 1, 2: 7, 3: 90}
    assert ds.category_id_to_label == {1: 1, 7: 2, 90: 3}
    assert ds.class_names == ["person", "train", "toothbrush"]
    assert ds.image_ids == [7, 42]  # sorted by image id
    assert ds.sizes == [(12, 8), (10, 20)]
    # Image 7: [1,1,2,2] -> [1,1,3,3]; [30,1,2,2] lies right of the 8-px image: clamped to
    # x1 = x2 = 8 and dropped. Missing iscrowd means 0.
    s = ds[0]
    assert s.image_id == 7 and s.image.shape == (3, 12, 8)
    assert s.boxes.tolist() == [[1, 1, 3, 3]] and s.labels.tolist() == [2]
    # Image 42: [2,3,4,5] -> [2,3,6,8]; [15,-2,10,4] -> [15,-2,25,2] clamped to [15,0,20,2];
    # the zero-width box is dropped.
    s = ds[1]
    assert s.boxes.tolist() == [[2, 3, 6, 8], [15, 0, 20, 2]]
    assert s.labels.tolist() == [3, 1]


def test_image_modes_are_converted_to_rgb(tmp_path: Path) -> None:
    img_dir = tmp_path / "imgs"
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    _png(img_dir / "gray.png", gray)
    rgba = np.dstack([_rgb(3, 4, 5), np.full((3, 4), 7, np.uint8)])
    _png(img_dir / "rgba.png", rgba)
    pal = Image.fromarray(gray).convert("P")
    pal.save(img_dir / "pal.png")
    expected_pal = np.array(pal.convert("RGB"))
    names = ["gray.png", "rgba.png", "pal.png"]
    doc = {
        "images": [
            {"id": i + 1, "file_name": n, "width": 4, "height": 3} for i, n in enumerate(names)
        ],
        "annotations": [],
        "categories": [{"id": 1, "name": "a"}],
    }
    ds = CocoDetection(img_dir, _write_json(tmp_path / "a.json", doc))
    g = ds[0].image
    assert g.shape == (3, 3, 4)
    for c in range(3):
        assert torch.equal(g[c], torch.from_numpy(gray))
    assert torch.equal(ds[1].image, torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    assert torch.equal(ds[2].image, torch.from_numpy(expected_pal).permute(2, 0, 1))


# ------------------------------------------------------------------------------------- errors


def test_missing_files_and_folders(tmp_path: Path) -> None:
    img_dir, ann = _handmade(tmp_path)
    with pytest.raises(DatasetError, match="annotation file .*nope.json not found"):
        CocoDetection(img_dir, tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="image folder .*absent not found"):
        CocoDetection(tmp_path / "absent", ann)
    with pytest.raises(DatasetError, match="no COCO split 'val'.*instances_val2017.json"):
        CocoDetection.from_split(tmp_path, "val")


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    img_dir, _ = _handmade(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(DatasetError, match=r"not valid JSON \(line 2, column 19"):
        CocoDetection(img_dir, bad)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"categories": None}, "'categories' must be a list"),
        ({"images": [{"id": 1, "file_name": "p.png", "width": 20}]}, "lacks key.*'height'"),
        ({"annotations": [{"id": 1, "image_id": 42, "bbox": [0, 0, 1, 1]}]}, "'category_id'"),
        (
            {"annotations": [{"image_id": 3, "category_id": 1, "bbox": [0, 0, 1, 1]}]},
            "image id 3, which is not in 'images'",
        ),
        (
            {"annotations": [{"image_id": 42, "category_id": 2, "bbox": [0, 0, 1, 1]}]},
            r"category id 2, not in 'categories' \[1, 7, 90\]",
        ),
        (
            {"annotations": [{"image_id": 42, "category_id": 1, "bbox": [0, 0, 1]}]},
            "must be 4 finite numbers",
        ),
        (
            {
                "images": [
                    {"id": 1, "file_name": "p.png", "width": 20, "height": 10},
                    {"id": 1, "file_name": "q.png", "width": 8, "height": 12},
                ],
                "annotations": [],
            },
            "duplicate image id 1",
        ),
        ({"categories": []}, "'categories' is empty"),
    ],
)
def test_malformed_json_content(tmp_path: Path, override: dict[str, Any], match: str) -> None:
    img_dir, ann = _handmade(tmp_path, **override)
    with pytest.raises(DatasetError, match=match):
        CocoDetection(img_dir, ann)


def test_missing_top_level_key(tmp_path: Path) -> None:
    img_dir, _ = _handmade(tmp_path)
    ann = _write_json(tmp_path / "x.json", {"images": [], "categories": []})
    with pytest.raises(DatasetError, match="the top level lacks key.*'annotations'"):
        CocoDetection(img_dir, ann)


def test_bad_image_files_raise_when_read(tmp_path: Path) -> None:
    img_dir, ann = _handmade(tmp_path)
    (img_dir / "q.png").unlink()
    (img_dir / "p.png").write_bytes(b"not a png")
    ds = CocoDetection(img_dir, ann)  # construction does not decode images
    with pytest.raises(DatasetError, match=r"q.png \(image id 7\) is missing"):
        ds[0]
    with pytest.raises(DatasetError, match=r"p.png \(image id 42\) cannot be decoded"):
        ds[1]
    _png(img_dir / "q.png", _rgb(12, 9, 0))
    with pytest.raises(DatasetError, match="q.png is 9x12 but ann.json says 8x12"):
        ds[0]


# ------------------------------------------------------- box policy: errors, drops and clips
# docs/detection.md, "Data": malformed bbox -> one-line DatasetError; zero size, outside the
# image -> dropped; partly outside -> clipped; one WARNING per file counts and names them.

COCO_LOGGER = "kdlab.tasks.detection.coco"


def _one_ann(tmp_path: Path, bbox: Any, **extra: Any) -> tuple[Path, Path]:
    """The hand-made set with a single annotation (id 77) of image 42 ('p.png', 20 x 10)."""
    ann = {"id": 77, "image_id": 42, "category_id": 1, "bbox": bbox, **extra}
    return _handmade(tmp_path, annotations=[ann])


def _box_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == COCO_LOGGER and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    ("bbox", "extra", "match"),
    [
        ([2, 3, -4, 5], {}, "with a negative width"),
        ([2, 3, 4, -0.5], {}, "with a negative height"),
        ([2, 3, -4, 5], {"iscrowd": 1}, "with a negative width"),  # crowd: COCOeval reads it
        ([2, float("nan"), 4, 5], {}, "must be 4 finite numbers"),
        ([2, 3, float("inf"), 5], {}, "must be 4 finite numbers"),
        ([2, 3, 4], {}, "must be 4 finite numbers"),
        ([2, 3, 4, 5, 6], {}, "must be 4 finite numbers"),
        ([2, 3, "4", 5], {}, "must be 4 finite numbers"),
        ([2, 3, True, 5], {}, "must be 4 finite numbers"),
        ({"x": 2}, {}, "must be 4 finite numbers"),
    ],
)
def test_malformed_bbox_is_a_one_line_error_naming_everything(
    tmp_path: Path, bbox: Any, extra: dict[str, Any], match: str
) -> None:
    img_dir, ann = _one_ann(tmp_path, bbox, **extra)
    with pytest.raises(DatasetError, match=match) as info:
        CocoDetection(img_dir, ann)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{ann}: annotations[0] (id 77) of image 42 'p.png' (20x10) has bbox ")
    assert repr(json.loads(json.dumps(bbox))) in msg  # the bbox as read from the file
    assert msg.endswith("fix or remove the annotation")


def test_zero_size_and_outside_boxes_are_dropped_and_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img_dir, ann = _handmade(tmp_path)
    with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
        ds = CocoDetection(img_dir, ann)
    assert ds.target(0)[0].tolist() == [[1, 1, 3, 3]]  # id 5 (outside) dropped
    assert ds.target(1)[0].tolist() == [[2, 3, 6, 8], [15, 0, 20, 2]]  # id 3 (w = 0) dropped
    (msg,) = _box_warnings(caplog)
    assert "\n" not in msg
    assert msg.startswith(
        f"{ann}: 3 of 5 non-crowd boxes changed on loading: 2 dropped (1 with zero width or "
        "height, 1 outside their image), 1 clipped to their image by more than 1 px; first ones: "
    )
    assert "annotation id 3 of image 42 'p.png' (20x10) bbox [5, 5, 0, 3] dropped: zero " in msg
    assert "annotation id 5 of image 7 'q.png' (8x12) bbox [30, 1, 2, 2] dropped: outside " in msg
    assert "annotation id 2 of image 42 'p.png' (20x10) bbox [15, -2, 10, 4] clipped " in msg
    assert "annotation id 1 " not in msg and "annotation id 4 " not in msg


def test_box_far_outside_a_128px_image_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case: ``[5000, 5000, 20, 20]`` on a 128 x 128 image no longer vanishes."""
    _png(tmp_path / "imgs" / "big.png", _rgb(128, 128, 0))
    doc = {
        "images": [{"id": 1, "file_name": "big.png", "width": 128, "height": 128}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 1, "bbox": [5000, 5000, 20, 20]},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
        ],
        "categories": [{"id": 1, "name": "a"}],
    }
    ann = _write_json(tmp_path / "big.json", doc)
    with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
        ds = CocoDetection(tmp_path / "imgs", ann)
    assert ds.target(0)[0].tolist() == [[10, 10, 30, 30]]
    (msg,) = _box_warnings(caplog)
    assert str(ann) in msg and "1 of 2 non-crowd boxes" in msg
    assert "annotation id 11 of image 1 'big.png' (128x128) bbox [5000, 5000, 20, 20]" in msg


@pytest.mark.parametrize(
    ("bbox", "expected", "warns"),
    [
        ([18.5, 1, 2.4, 3], [18.5, 1, 20, 4], False),  # 0.9 px over the right edge: rounding
        ([-1, 1, 4, 3], [0, 1, 3, 4], False),  # exactly 1 px over: still rounding
        ([1, 9, 4, 2], [1, 9, 5, 10], False),  # 1 px over the bottom edge
        ([-1.5, 1, 4, 3], [0, 1, 2.5, 4], True),  # 1.5 px over: counted and named
        ([2, 3, 4, 12], [2, 3, 6, 10], True),
        ([2, 3, 4, 5], [2, 3, 6, 8], False),  # inside
    ],
)
def test_partly_outside_boxes_are_clipped_and_warned_beyond_1px(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    bbox: list[float],
    expected: list[float],
    warns: bool,
) -> None:
    img_dir, ann = _one_ann(tmp_path, bbox)
    with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
        ds = CocoDetection(img_dir, ann)
    assert ds.target(1)[0].tolist() == [expected]
    warnings = _box_warnings(caplog)
    assert len(warnings) == int(warns)
    if warns:
        assert "1 of 1 non-crowd boxes changed on loading: 0 dropped" in warnings[0]
        assert f"annotation id 77 of image 42 'p.png' (20x10) bbox {bbox!r} clipped" in warnings[0]


@pytest.mark.parametrize(
    "bbox",
    [
        [20, 2, 3, 3],  # starts on the right edge: no area inside
        [-5, 2, 5, 3],  # ends on the left edge
        [2, -30, 3, 4],  # above the image
        [10, 1, 1e-7, 3],  # width positive but 0 in float32 at x = 10
    ],
)
def test_boxes_without_area_inside_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bbox: list[float]
) -> None:
    img_dir, ann = _one_ann(tmp_path, bbox)
    with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
        ds = CocoDetection(img_dir, ann)
        assert ds.target(1)[0].shape == (0, 4)
        assert len(CocoDetection(img_dir, ann, drop_empty=True)) == 0
    warnings = _box_warnings(caplog)
    assert len(warnings) == 2  # one per load
    assert f"annotation id 77 of image 42 'p.png' (20x10) bbox {bbox!r} dropped" in warnings[0]


def test_warning_counts_every_box_but_names_only_the_first_three(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anns = [
        {"id": 100 + k, "image_id": 42, "category_id": 1, "bbox": [30 + k, 1, 2, 2]}
        for k in range(10)
    ]
    img_dir, ann = _handmade(tmp_path, annotations=anns)
    with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
        CocoDetection(img_dir, ann)
    (msg,) = _box_warnings(caplog)
    assert "10 of 10 non-crowd boxes changed on loading: 10 dropped (0 with zero" in msg
    assert msg.count("annotation id ") == 3
    assert all(f"annotation id {100 + k} " in msg for k in range(3))


def test_crowd_boxes_are_neither_clipped_nor_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    img_dir, ann = _one_ann(tmp_path, [30, 30, 5, 5], iscrowd=1)
    with caplog.at_level(logging.DEBUG, logger=COCO_LOGGER):
        ds = CocoDetection(img_dir, ann)
    assert ds.target(1)[0].shape == (0, 4)
    assert _box_warnings(caplog) == []


def test_clean_sets_load_without_box_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_coco_split(tmp_path, "train", _three_images(), CATS)
    with caplog.at_level(logging.WARNING, logger=COCO_LOGGER):
        CocoDetection.from_split(tmp_path, "train")
    assert _box_warnings(caplog) == []


def _detection_root(tmp_path: Path, train_bbox: list[float]) -> Path:
    """A COCO root with clean 'test' and a 'train' whose second box is ``train_bbox``."""
    images = [
        CocoImage(f"{k}.png", _rgb(128, 128, k), np.array([[8, 8, 40, 40]]), [2])
        for k in range(2)
    ]
    write_coco_split(tmp_path, "test", images, CATS)
    path = write_coco_split(tmp_path, "train", images, CATS)
    doc = json.loads(path.read_text())
    doc["annotations"][1]["bbox"] = train_bbox
    path.write_text(json.dumps(doc))
    return tmp_path


def test_training_data_with_an_out_of_image_box_logs_the_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """End to end through the detection data builder a training run uses."""
    root = _detection_root(tmp_path, [5000, 5000, 20, 20])
    cfg = DataConfig(name="coco", root=str(root), batch_size=1, eval_batch_size=1)
    det = DetectionConfig(train_split="train", test_split="test")
    with caplog.at_level(logging.INFO, logger=COCO_LOGGER):
        data = build_detection_data(cfg, det, seed=0, device=torch.device("cpu"))
    (msg,) = _box_warnings(caplog)
    assert msg.startswith(f"{root / 'annotations' / 'instances_train.json'}: 1 of 2 ")
    assert "annotation id 2 of image 2 '1.png' (128x128) bbox [5000, 5000, 20, 20]" in msg
    # detection.drop_empty (default true): image 2 has no box left and leaves training, also
    # visibly (INFO); the test split keeps every image.
    assert data.train_loader.dataset.image_ids == [1] and len(data.test_loader.dataset) == 2
    assert any("1 of 2 images have no usable non-crowd box" in r.getMessage()
               for r in caplog.records if r.levelno == logging.INFO)


def test_training_data_with_a_negative_width_fails_with_one_line(tmp_path: Path) -> None:
    root = _detection_root(tmp_path, [8, 8, -32, 32])
    cfg = DataConfig(name="coco", root=str(root), batch_size=1, eval_batch_size=1)
    det = DetectionConfig(train_split="train", test_split="test")
    with pytest.raises(DatasetError, match="negative width") as info:
        build_detection_data(cfg, det, seed=0, device=torch.device("cpu"))
    msg = str(info.value)
    assert "\n" not in msg and "instances_train.json: annotations[1] (id 2) of image 2" in msg
