"""COCO box mAP through pycocotools' ``COCOeval`` (the official COCO evaluation code).

:func:`coco_metrics` scores a list of detections in the COCO results format (``image_id``,
``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``) against a COCO annotation file, exactly as
``COCOeval(gt, dt, "bbox")`` does (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV
2014; evaluation protocol of cocodataset.org): greedy matching of score-sorted detections at the
ten IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision, at most 100 detections per
image, crowd ground truth ignored, area ranges small < 32² <= medium < 96² <= large.

:func:`detections_to_coco` converts one image's model output (xyxy boxes, scores, contiguous
labels 1..K) into that format and :func:`write_coco_results` saves it atomically.

pycocotools is imported lazily (only :func:`coco_metrics` needs it); classification code never
imports this module.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kdlab.core.errors import ConfigError, DatasetError
from kdlab.core.io import atomic_write

__all__ = [
    "METRIC_NAMES",
    "clear_ground_truth_cache",
    "coco_metrics",
    "detections_to_coco",
    "write_coco_results",
]

log = logging.getLogger(__name__)

#: The keys of :func:`coco_metrics`' result, in the order of ``COCOeval.stats[0:9]``.
METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")

#: Decimals kept in written boxes (1/1000 px: no IoU threshold decision can change) and scores.
BOX_DECIMALS = 3
SCORE_DECIMALS = 6

INSTALL_HINT = "COCO mAP needs pycocotools: pip install -e '.[detection]' in the kdlab clone"

# Ground-truth COCO objects per (resolved path, mtime_ns, size): per-epoch evaluation of the same
# split re-uses the index instead of re-reading and re-indexing the JSON.
_GT_CACHE: dict[tuple[str, int, int], Any] = {}
_GT_LOCK = threading.Lock()


def _pycocotools() -> tuple[Any, Any]:
    """``(COCO, COCOeval)`` from pycocotools, or :class:`ConfigError` naming the pip extra.

    ConfigError (not ModelError/DatasetError): nothing is wrong with the model or the data; the
    installation lacks an optional package that the requested (detection) evaluation needs, the
    same category as a configured logger whose package is missing (``runtime.loggers``).
    """
    try:
        # optional heavy dependency: pycocotools (the `detection` extra)
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return COCO, COCOeval


def _quiet(fn: Any, *args: Any) -> Any:
    """Call ``fn(*args)`` with pycocotools' prints captured and logged at DEBUG."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            return fn(*args)
    finally:
        text = buf.getvalue().strip()
        if text:
            log.debug("pycocotools: %s", text)


def clear_ground_truth_cache() -> None:
    """Forget every cached ground-truth COCO object (tests; or to free memory)."""
    with _GT_LOCK:
        _GT_CACHE.clear()


def _ground_truth(annotation_file: str | os.PathLike[str]) -> Any:
    """The pycocotools ``COCO`` object of ``annotation_file``, cached per process.

    The cache key includes the file's mtime and size, so a rewritten file is indexed again.
    """
    coco_cls, _ = _pycocotools()
    path = Path(annotation_file)
    try:
        st = path.resolve().stat()
    except OSError as exc:
        raise DatasetError(
            f"COCO annotation file {path} not found; pass the instances_<split>.json the "
            f"detections were made on"
        ) from exc
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _GT_LOCK:
        gt = _GT_CACHE.get(key)
        if gt is not None:
            return gt
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read COCO annotation file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"COCO annotation file {path} is not valid JSON (line {exc.lineno}, column "
            f"{exc.colno}); regenerate it"
        ) from exc
    if not isinstance(dataset, dict) or not all(
        isinstance(dataset.get(k), list) for k in ("images", "annotations", "categories")
    ):
        raise DatasetError(
            f"COCO annotation file {path} needs the lists 'images', 'annotations' and "
            f"'categories'; regenerate it"
        )
    gt = coco_cls()
    gt.dataset = dataset
    _quiet(gt.createIndex)
    with _GT_LOCK:
        # Keep one version per path: a rewritten file replaces its stale entry.
        for old in [k for k in _GT_CACHE if k[0] == key[0]]:
            del _GT_CACHE[old]
        _GT_CACHE[key] = gt
    return gt


def _check_detections(detections: Sequence[Mapping[str, Any]], gt: Any, path: Path) -> None:
    """Raise DatasetError for a detection COCOeval would reject or mis-score."""
    img_ids = set(gt.getImgIds())
    cat_ids = set(gt.getCatIds())
    for i, det in enumerate(detections):
        missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
        if missing:
            raise DatasetError(f"detection {i} lacks {missing}; each needs image_id, "
                               f"category_id, bbox [x, y, w, h] and score")
        if det["image_id"] not in img_ids:
            raise DatasetError(
                f"detection {i} has image_id {det['image_id']!r}, which is not in {path}; "
                f"evaluate against the annotation file of the split the images came from"
            )
        if det["category_id"] not in cat_ids:
            raise DatasetError(
                f"detection {i} has category_id {det['category_id']!r}, which is not a category "
                f"of {path}; map contiguous labels to COCO ids (detections_to_coco)"
            )
        bbox = det["bbox"]
        if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
            raise DatasetError(f"detection {i} has bbox {bbox!r}; expected 4 finite numbers "
                               f"[x, y, w, h]")


def coco_metrics(
    annotation_file: str | os.PathLike[str], detections: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """COCO box metrics of ``detections`` on the images of ``annotation_file``, in percent.

    Runs pycocotools' ``COCOeval(gt, dt, "bbox")`` (evaluate, accumulate, summarize) over every
    image of the ground-truth file (an image without detections counts its ground truth as
    missed) and returns ``{name: 100 * stats[i]}`` for :data:`METRIC_NAMES`: AP (mean over IoU
    0.50:0.05:0.95), AP50, AP75, APs / APm / APl (area < 32², 32²..96², > 96², measured on the
    ground truth's ``area``), and AR1 / AR10 / AR100 (recall with at most 1 / 10 / 100
    detections per image). AP at one IoU threshold is the mean over categories of the
    101-point interpolated precision ``mean_{r in 0:0.01:1} max_{r' >= r} p(r')`` (COCO, Lin
    et al., ECCV 2014). Every value is in percent, like kdlab's top-1.

    A statistic COCOeval reports as -1 (no non-crowd ground truth in that area range) becomes
    NaN. An empty ``detections`` list scores 0 wherever ground truth exists (pycocotools'
    ``loadRes`` rejects an empty list, so an empty result set is built directly). The
    ground-truth index is cached per file and process; ``detections`` are not modified.
    Raises :class:`DatasetError` for a missing/invalid annotation file or detections naming
    unknown images or categories, and :class:`ConfigError` when pycocotools is missing.
    """
    coco_cls, cocoeval_cls = _pycocotools()
    path = Path(annotation_file)
    gt = _ground_truth(path)
    _check_detections(detections, gt, path)
    if detections:
        # loadRes adds keys (area, id, iscrowd, segmentation) to the dicts it is given: copy them.
        results = [
            {
                "image_id": d["image_id"],
                "category_id": d["category_id"],
                "bbox": [float(v) for v in d["bbox"]],
                "score": float(d["score"]),
            }
            for d in detections
        ]
        dt = _quiet(gt.loadRes, results)
    else:
        dt = coco_cls()
        dt.dataset = {
            "images": list(gt.dataset["images"]),
            "categories": list(gt.dataset["categories"]),
            "annotations": [],
        }
        _quiet(dt.createIndex)
    evaluator = cocoeval_cls(gt, dt, "bbox")
    evaluator.params.imgIds = sorted(gt.getImgIds())
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    _quiet(evaluator.summarize)
    stats = [float(s) for s in evaluator.stats[: len(METRIC_NAMES)]]
    return {
        name: (math.nan if s < 0 else 100.0 * s)
        for name, s in zip(METRIC_NAMES, stats, strict=True)
    }


def detections_to_coco(
    image_id: int,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    label_to_category_id: Sequence[int] | Mapping[int, int],
) -> list[dict[str, Any]]:
    """One image's detections in the COCO results format.

    ``boxes`` is ``N x 4`` ``(x1, y1, x2, y2)`` in pixels of the original image, ``scores`` ``N``
    and ``labels`` ``N`` contiguous class indices in ``1..K`` (0 is torchvision's background and
    is rejected). ``label_to_category_id`` maps a label to its COCO category id: a mapping
    ``{label: id}`` or a sequence whose element ``label - 1`` is the id (length K). Returns
    ``[{"image_id", "category_id", "bbox": [x1, y1, x2 - x1, y2 - y1], "score"}]`` with the box
    rounded to :data:`BOX_DECIMALS` and the score to :data:`SCORE_DECIMALS` decimals (the COCO
    results format, cocodataset.org/#format-results). Raises :class:`DatasetError` for shape
    mismatches or labels without a category id.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise DatasetError(f"boxes must be N x 4 (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or labels.shape != (n,):
        raise DatasetError(
            f"boxes ({n}), scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must "
            f"describe the same N detections"
        )
    xyxy = boxes.detach().to(torch.float64).cpu()
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
    score_list = scores.detach().to(torch.float64).cpu().tolist()
    label_list = [int(v) for v in labels.detach().cpu().tolist()]
    out: list[dict[str, Any]] = []
    for box, score, label in zip(xywh, score_list, label_list, strict=True):
        if isinstance(label_to_category_id, Mapping):
            cat = label_to_category_id.get(label)
        else:
            k = len(label_to_category_id)
            cat = label_to_category_id[label - 1] if 1 <= label <= k else None
        if cat is None:
            raise DatasetError(
                f"label {label} has no COCO category id (labels must be 1..K, K = "
                f"{len(label_to_category_id)}); pass the dataset's label_to_category_id"
            )
        out.append({
            "image_id": int(image_id),
            "category_id": int(cat),
            "bbox": [round(v, BOX_DECIMALS) for v in box],
            "score": round(score, SCORE_DECIMALS),
        })
    return out


def write_coco_results(
    path: str | os.PathLike[str], detections: Sequence[Mapping[str, Any]]
) -> Path:
    """Write ``detections`` (COCO results format) to ``path`` as a JSON list, atomically.

    The file is what the official evaluation server and ``COCO.loadRes`` read. The parent
    folder is created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps([dict(d) for d in detections], separators=(",", ":")))
    return path
