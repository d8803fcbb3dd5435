"""COCO mAP (kdlab.tasks.detection.evaluation): hand-computed golden values, COCO's area ranges and
crowd handling, and agreement with an independent COCO-style AP written here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")

from kdlab.core.errors import ConfigError, DatasetError  # noqa: E402
from kdlab.tasks.detection import evaluation as ev  # noqa: E402
from kdlab.tasks.detection.evaluation import (  # noqa: E402
    METRIC_NAMES,
    coco_metrics,
    detections_to_coco,
    write_coco_results,
)

# The 101 recall thresholds of COCO's interpolated precision: 0, 0.01, ..., 1.
N_REC = 101


def _gt_file(tmp_path: Path, images: list[list[tuple[list[float], int, int]]],
             n_cats: int = 1, name: str = "gt.json") -> Path:
    """A COCO GT file: ``images[i]`` lists ``(xywh, category_id, iscrowd)`` of image ``i + 1``."""
    anns = []
    for i, objs in enumerate(images):
        for xywh, cat, crowd in objs:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                         "bbox": list(xywh), "area": xywh[2] * xywh[3], "iscrowd": crowd})
    doc = {"images": [{"id": i + 1, "file_name": f"{i}.png", "width": 640, "height": 480}
                      for i in range(len(images))],
           "annotations": anns,
           "categories": [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)]}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _det(image_id: int, xywh: list[float], score: float, cat: int = 1) -> dict[str, Any]:
    return {"image_id": image_id, "category_id": cat, "bbox": list(xywh), "score": score}


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    ev.clear_ground_truth_cache()


def test_perfect_detections_score_100_and_ar1_counts_one_per_image(tmp_path: Path) -> None:
    small, medium, large = [10, 10, 20, 20], [100, 100, 50, 50], [200, 200, 100, 100]
    gt = _gt_file(tmp_path, [[(small, 1, 0)], [(medium, 1, 0), (large, 1, 0)]])
    dets = [_det(1, small, 0.9), _det(2, medium, 0.8), _det(2, large, 0.7)]
    m = coco_metrics(gt, dets)
    assert list(m) == list(METRIC_NAMES)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):
        assert m[k] == pytest.approx(100.0), k
    # AR1: one detection per image -> 2 of the 3 boxes are recalled at every IoU threshold.
    assert m["AR1"] == pytest.approx(100.0 * 2 / 3)


def test_one_of_two_found_then_false_positive(tmp_path: Path) -> None:
    a, b = [0, 0, 50, 50], [200, 200, 50, 50]
    gt = _gt_file(tmp_path, [[(a, 1, 0), (b, 1, 0)]])
    # Sorted by score: TP (a) then FP. tp = [1, 1], fp = [0, 1] -> recall [0.5, 0.5],
    # precision [1, 0.5], envelope [1, 0.5]. Recall thresholds 0.00..0.50 (51 of 101) take the
    # precision 1 at the first detection, 0.51..1.00 are unreachable (0). AP = 51 / 101, at every
    # IoU threshold (the TP is exact).
    m = coco_metrics(gt, [_det(1, a, 0.9), _det(1, [400, 300, 30, 30], 0.8)])
    for k in ("AP", "AP50", "AP75", "APm"):
        assert m[k] == pytest.approx(100.0 * 51 / N_REC), k
    assert m["AR100"] == pytest.approx(50.0)
    # Scores swapped: FP first. recall [0, 0.5], precision [0, 0.5], envelope [0.5, 0.5]:
    # the 51 thresholds 0.00..0.50 get 0.5, AP = 25.5 / 101.
    m = coco_metrics(gt, [_det(1, a, 0.8), _det(1, [400, 300, 30, 30], 0.9)])
    assert m["AP"] == pytest.approx(100.0 * 25.5 / N_REC)
    assert m["AP50"] == pytest.approx(100.0 * 25.5 / N_REC)


def test_iou_062_counts_for_ap50_not_ap75(tmp_path: Path) -> None:
    gt = _gt_file(tmp_path, [[([0, 0, 100, 100], 1, 0)]])
    # IoU = (62 * 100) / (100 * 100) = 0.62: a match at thresholds 0.50, 0.55, 0.60 (3 of 10).
    m = coco_metrics(gt, [_det(1, [0, 0, 62, 100], 0.9)])
    assert m["AP50"] == pytest.approx(100.0)
    assert m["AP75"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(30.0)
    assert m["AR100"] == pytest.approx(30.0)


def test_area_ranges_small_medium_large(tmp_path: Path) -> None:
    small, medium, large = [0, 0, 20, 20], [100, 100, 50, 50], [300, 300, 100, 100]  # 400/2500/1e4
    gt = _gt_file(tmp_path, [[(small, 1, 0), (medium, 1, 0), (large, 1, 0)]])
    m = coco_metrics(gt, [_det(1, small, 0.9), _det(1, large, 0.8)])
    assert m["APs"] == pytest.approx(100.0)
    assert m["APm"] == pytest.approx(0.0)
    assert m["APl"] == pytest.approx(100.0)
    # All areas: recall 2/3 at precision 1 -> thresholds 0.00..0.66 (67 of 101).
    assert m["AP"] == pytest.approx(100.0 * 67 / N_REC)
    # No small ground truth at all -> COCOeval's -1 becomes NaN.
    gt2 = _gt_file(tmp_path, [[(medium, 1, 0)]], name="gt2.json")
    m2 = coco_metrics(gt2, [_det(1, medium, 0.9)])
    assert math.isnan(m2["APs"]) and math.isnan(m2["APl"])
    assert m2["APm"] == pytest.approx(100.0)


def test_area_boundary_32_squared_is_small_and_medium(tmp_path: Path) -> None:
    # area exactly 32^2 = 1024 lies in both [0, 32^2] and [32^2, 96^2] (COCOeval's closed ranges).
    box = [0, 0, 32, 32]
    gt = _gt_file(tmp_path, [[(box, 1, 0)]])
    m = coco_metrics(gt, [_det(1, box, 0.9)])
    assert m["APs"] == pytest.approx(100.0) and m["APm"] == pytest.approx(100.0)
    assert math.isnan(m["APl"])


def test_crowd_ground_truth_is_ignored(tmp_path: Path) -> None:
    a, crowd = [0, 0, 50, 50], [200, 200, 200, 200]
    gt = _gt_file(tmp_path, [[(a, 1, 0), (crowd, 1, 1)]])
    # The higher-scored detection lies inside the crowd region: matched to it and ignored, not
    # a false positive; the crowd box is not a miss either -> AP 100.
    m = coco_metrics(gt, [_det(1, [250, 250, 40, 40], 0.95), _det(1, a, 0.9)])
    assert m["AP"] == pytest.approx(100.0)
    # The same detection with the region NOT crowd is a false positive first, and the region a
    # miss: recall [0, 0.5], precision [0, 0.5] -> AP50 = 25.5 / 101.
    gt2 = _gt_file(tmp_path, [[(a, 1, 0), (crowd, 1, 0)]], name="gt2.json")
    m2 = coco_metrics(gt2, [_det(1, [250, 250, 40, 40], 0.95), _det(1, a, 0.9)])
    assert m2["AP50"] == pytest.approx(100.0 * 25.5 / N_REC)


def test_empty_detections_score_zero(tmp_path: Path) -> None:
    gt = _gt_file(tmp_path, [[([0, 0, 50, 50], 1, 0)], [([10, 10, 60, 60], 1, 0)]])
    m = coco_metrics(gt, [])
    for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100"):
        assert m[k] == 0.0, k
    assert math.isnan(m["APs"]) and math.isnan(m["APl"])


def test_detections_not_modified_and_errors(tmp_path: Path) -> None:
    gt = _gt_file(tmp_path, [[([0, 0, 50, 50], 1, 0)]])
    dets = [_det(1, [0, 0, 50, 50], 0.9)]
    before = json.dumps(dets)
    coco_metrics(gt, dets)
    assert json.dumps(dets) == before
    with pytest.raises(DatasetError, match="image_id 7"):
        coco_metrics(gt, [_det(7, [0, 0, 5, 5], 0.5)])
    with pytest.raises(DatasetError, match="category_id 3"):
        coco_metrics(gt, [_det(1, [0, 0, 5, 5], 0.5, cat=3)])
    with pytest.raises(DatasetError, match="lacks"):
        coco_metrics(gt, [{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}])
    with pytest.raises(DatasetError, match="not found"):
        coco_metrics(tmp_path / "missing.json", dets)
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  oops")
    with pytest.raises(DatasetError, match="not valid JSON"):
        coco_metrics(bad, dets)


def test_missing_pycocotools_is_one_line_config_error(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    monkeypatch.setitem(sys.modules, "pycocotools.cocoeval", None)
    with pytest.raises(ConfigError) as info:
        coco_metrics(tmp_path / "gt.json", [])
    assert str(info.value) == ("COCO mAP needs pycocotools: pip install -e '.[detection]' in the "
                               "kdlab clone")


def test_ground_truth_cached_and_refreshed_when_rewritten(tmp_path: Path) -> None:
    gt = _gt_file(tmp_path, [[([0, 0, 50, 50], 1, 0)]])
    first = ev._ground_truth(gt)
    assert ev._ground_truth(gt) is first
    det = [_det(1, [0, 0, 50, 50], 0.9)]
    assert coco_metrics(gt, det)["AP"] == pytest.approx(100.0)
    # Rewrite the file (a different box, different size on disk): the new GT is used.
    _gt_file(tmp_path, [[([300, 300, 120, 120], 1, 0)]])
    assert ev._ground_truth(gt) is not first
    assert coco_metrics(gt, det)["AP"] == pytest.approx(0.0)


def test_detections_to_coco_and_round_trip(tmp_path: Path) -> None:
    boxes = torch.tensor([[10.0, 20.0, 40.0, 80.0], [1.23456, 2.0, 3.5, 4.25]])
    scores = torch.tensor([0.9, 0.123456789])
    labels = torch.tensor([2, 1])
    out = detections_to_coco(5, boxes, scores, labels, {1: 7, 2: 90})
    assert out[0] == {"image_id": 5, "category_id": 90, "bbox": [10.0, 20.0, 30.0, 60.0],
                      "score": pytest.approx(0.9)}
    assert out[1]["category_id"] == 7
    assert out[1]["bbox"] == [1.235, 2.0, 2.265, 2.25]
    assert out[1]["score"] == pytest.approx(0.123457, abs=1e-12)
    # A sequence maps label k to element k - 1.
    assert [d["category_id"] for d in detections_to_coco(5, boxes, scores, labels, [7, 90])] \
        == [90, 7]
    with pytest.raises(DatasetError, match="label 0"):
        detections_to_coco(5, boxes, scores, torch.tensor([0, 1]), [7, 90])
    with pytest.raises(DatasetError, match="same N"):
        detections_to_coco(5, boxes, scores[:1], labels, [7, 90])
    assert detections_to_coco(5, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), [1]) == []
    path = write_coco_results(tmp_path / "sub" / "results.json", out)
    assert json.loads(path.read_text()) == out
    assert not (tmp_path / "sub" / "results.json.tmp").exists()


def test_detections_to_coco_feeds_coco_metrics(tmp_path: Path) -> None:
    gt = _gt_file(tmp_path, [[([10, 20, 30, 60], 2, 0), ([100, 100, 40, 40], 1, 0)]], n_cats=2)
    boxes = torch.tensor([[10.0, 20.0, 40.0, 80.0], [100.0, 100.0, 140.0, 140.0]])
    dets = detections_to_coco(1, boxes, torch.tensor([0.9, 0.8]), torch.tensor([2, 1]), [1, 2])
    assert coco_metrics(gt, dets)["AP"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------
# An independent COCO-style AP (bbox, all areas, no crowd), written from the protocol:
# per image and category the top-100 detections by score are greedily matched, highest score
# first, to the unmatched ground truth of highest IoU >= t; over all images the matches are
# sorted by score, precision is made monotone from the right, and sampled at the 101 recall
# thresholds (first rank whose recall reaches r; 0 if none). AP = mean over categories with
# ground truth, then over the 10 IoU thresholds.
# ------------------------------------------------------------------------------------------


def _iou(d: list[float], g: list[float]) -> float:
    dx2, dy2, gx2, gy2 = d[0] + d[2], d[1] + d[3], g[0] + g[2], g[1] + g[3]
    iw = max(0.0, min(dx2, gx2) - max(d[0], g[0]))
    ih = max(0.0, min(dy2, gy2) - max(d[1], g[1]))
    inter = iw * ih
    union = d[2] * d[3] + g[2] * g[3] - inter
    return inter / union if union > 0 else 0.0


def _reference_ap(gts: list[list[tuple[list[float], int]]], dets: list[dict[str, Any]],
                  thresholds: list[float], cats: list[int], max_det: int = 100) -> float:
    rec_thrs = np.linspace(0.0, 1.0, N_REC)
    per_t = []
    for t in thresholds:
        per_cat = []
        for c in cats:
            n_gt = sum(1 for objs in gts for _, cc in objs if cc == c)
            if n_gt == 0:
                continue
            scored: list[tuple[float, bool]] = []
            for img, objs in enumerate(gts, start=1):
                g = [box for box, cc in objs if cc == c]
                d = sorted((x for x in dets if x["image_id"] == img and x["category_id"] == c),
                           key=lambda x: -x["score"])[:max_det]
                used = [False] * len(g)
                for x in d:
                    best, best_iou = -1, t
                    for j, box in enumerate(g):
                        iou = _iou(x["bbox"], box)
                        if not used[j] and iou >= best_iou:
                            best, best_iou = j, iou
                    if best >= 0:
                        used[best] = True
                    scored.append((x["score"], best >= 0))
            scored.sort(key=lambda s: -s[0])
            tp = np.cumsum([s[1] for s in scored]).astype(float)
            fp = np.cumsum([not s[1] for s in scored]).astype(float)
            recall = tp / n_gt
            precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
            for i in range(len(precision) - 2, -1, -1):
                precision[i] = max(precision[i], precision[i + 1])
            q = []
            for r in rec_thrs:
                hit = np.nonzero(recall >= r)[0]
                q.append(precision[hit[0]] if hit.size else 0.0)
            per_cat.append(float(np.mean(q)))
        per_t.append(float(np.mean(per_cat)))
    return 100.0 * float(np.mean(per_t))


@pytest.mark.parametrize("seed", range(8))
def test_matches_independent_reference_on_random_cases(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_img, cats = 4, [1, 2]
    gts: list[list[tuple[list[float], int]]] = []
    dets: list[dict[str, Any]] = []
    for img in range(1, n_img + 1):
        objs = []
        for _ in range(int(rng.integers(0, 7))):
            x, y = rng.uniform(0, 500, 2)
            w, h = rng.uniform(8, 120, 2)
            objs.append(([float(x), float(y), float(w), float(h)], int(rng.choice(cats))))
        gts.append(objs)
        for box, c in objs:  # jittered true positives (IoU anywhere from ~0.3 to 1)
            for _ in range(int(rng.integers(0, 3))):
                scale = np.array([box[2], box[3], box[2], box[3]])
                jit = (np.array(box) + rng.normal(0, 0.12, 4) * scale).tolist()
                jit[2], jit[3] = max(jit[2], 2.0), max(jit[3], 2.0)
                dets.append(_det(img, jit, 0.0, c))
        for _ in range(int(rng.integers(0, 5))):  # false positives
            x, y = rng.uniform(0, 500, 2)
            dets.append(_det(img, [float(x), float(y), 30.0, 40.0], 0.0, int(rng.choice(cats))))
    scores = rng.permutation(len(dets)) / max(len(dets), 1) + 0.001  # distinct scores
    for d, s in zip(dets, scores, strict=True):
        d["score"] = float(s)
    gt = _gt_file(tmp_path, [[(box, c, 0) for box, c in objs] for objs in gts], n_cats=2)
    m = coco_metrics(gt, dets)
    thresholds = np.linspace(0.5, 0.95, 10).tolist()
    assert m["AP50"] == pytest.approx(_reference_ap(gts, dets, [thresholds[0]], cats), abs=1e-9)
    assert m["AP"] == pytest.approx(_reference_ap(gts, dets, thresholds, cats), abs=1e-9)
