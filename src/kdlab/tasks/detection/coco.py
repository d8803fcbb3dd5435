"""COCO-format detection data: a writer (:func:`write_coco_split`) and a reader
(:class:`CocoDetection`).

The layout is the COCO 2017 one (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV
2014; format described at https://cocodataset.org/#format-data)::

    root/annotations/instances_<split>.json
    root/<split>/<file_name>

``bbox`` in the JSON is ``[x, y, w, h]`` in pixels (top-left corner, width, height); the reader
returns ``(x1, y1, x2, y2) = (x, y, x + w, y + h)``, torchvision's detection convention, with
contiguous labels ``1..K`` (``0`` is the background) assigned in sorted COCO category-id order.
Crowd annotations (``iscrowd = 1``) are kept in the JSON for COCOeval (which ignores detections
matched to them) but excluded from the training targets, as torchvision's detection reference
does.

The reader never changes a box silently (policy in docs/detection.md, "Data"): a ``bbox`` that is
not 4 finite numbers or has a negative width or height is a one-line :class:`DatasetError`; a box
with zero width or height, or with no area inside its image, is dropped; a box partly outside is
clipped to the image. Dropped boxes, and boxes clipped by more than :data:`CLIP_TOLERANCE_PX`, are
counted in one WARNING per annotation file that names the first few (file, annotation id, image,
box).

Only numpy, PIL and torch are used (no torchvision, no pycocotools).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.core.errors import DatasetError
from kdlab.core.io import atomic_write

__all__ = [
    "CLIP_TOLERANCE_PX",
    "CocoDetection",
    "CocoImage",
    "DetectionSample",
    "write_coco_split",
    "xywh_to_xyxy",
    "xyxy_to_xywh",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CocoImage:
    """One image and its boxes, to be written by :func:`write_coco_split`.

    Attributes:
        file_name: path relative to the split's image folder, e.g. ``"000001.png"``.
        image: ``H x W x 3`` ``uint8`` RGB array (``H x W`` grayscale is accepted too).
        boxes: ``N x 4`` float ``(x1, y1, x2, y2)`` in pixels with ``x2 > x1`` and ``y2 > y1``.
        category_ids: ``N`` COCO category ids (each must be in the split's categories).
        iscrowd: ``N`` flags, ``1`` marks an ignore region (e.g. VOC "difficult"); ``None`` = all 0.
    """

    file_name: str
    image: np.ndarray
    boxes: np.ndarray
    category_ids: list[int]
    iscrowd: list[int] | None = None


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """``(x1, y1, x2, y2) -> (x1, y1, x2 - x1, y2 - y1)``, the COCO ``bbox`` ``[x, y, w, h]``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``(x, y, w, h) -> (x1, y1, x2, y2)``: ``x2 = x + w, y2 = y + h`` (COCO bbox to corners)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]], axis=1)


def _json_number(v: float) -> float | int:
    """A float that is integral is written as an int (``12`` rather than ``12.0``)."""
    f = float(v)
    return int(f) if f.is_integer() else f


def _check_file_name(name: str) -> None:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts:
        raise DatasetError(
            f"CocoImage.file_name {name!r} must be a relative path inside the split folder"
        )


def _validate_categories(categories: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    by_id: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"categories[{i}] must be a dict with 'id' and 'name', got {c!r}")
        cid = c["id"]
        if isinstance(cid, bool) or not isinstance(cid, int) or cid < 1:
            raise DatasetError(f"categories[{i}]: id must be a positive int, got {cid!r}")
        if cid in by_id:
            raise DatasetError(f"categories[{i}]: duplicate category id {cid}")
        by_id[cid] = c
    if not by_id:
        raise DatasetError("categories is empty: give at least one {'id': ..., 'name': ...}")
    return by_id


def _encode_png(image: np.ndarray) -> bytes:
    """``image`` encoded as PNG bytes."""
    from PIL import Image  # optional heavy dependency: Pillow

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _check_split_name(split: str) -> None:
    if not split or "/" in split or split in (".", ".."):
        raise DatasetError(f"split {split!r} must be a plain folder name such as 'train'")


def _make_split_dirs(image_dir: Path, ann_dir: Path) -> None:
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create {image_dir}: {exc.strerror}") from exc


def _checked_image(item: CocoImage, where: str) -> tuple[np.ndarray, int, int]:
    """``(image array, height, width)`` of ``item``, validated."""
    img = np.asarray(item.image)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise DatasetError(
            f"{where}: image must be an H x W x 3 (or H x W) uint8 array, "
            f"got {img.dtype} {tuple(img.shape)}"
        )
    height, width = int(img.shape[0]), int(img.shape[1])
    if height < 1 or width < 1:
        raise DatasetError(f"{where}: image is empty ({height}x{width})")
    return img, height, width


def _checked_boxes(item: CocoImage, where: str) -> tuple[np.ndarray, list[int], list[int]]:
    """``(boxes N x 4, category ids, iscrowd flags)`` of ``item``, with matching lengths."""
    boxes = np.asarray(item.boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DatasetError(f"{where}: boxes must be N x 4 (x1, y1, x2, y2), got {boxes.shape}")
    n = boxes.shape[0]
    cats = list(item.category_ids)
    crowd = [0] * n if item.iscrowd is None else [int(c) for c in item.iscrowd]
    if len(cats) != n or len(crowd) != n:
        raise DatasetError(
            f"{where}: {n} boxes but {len(cats)} category_ids and {len(crowd)} iscrowd flags"
        )
    return boxes, cats, crowd


def _checked_box(
    where: str, j: int, box: np.ndarray, width: int, height: int
) -> tuple[float, float, float, float]:
    """Box ``j`` as floats ``(x1, y1, x2, y2)``: finite, non-empty and inside the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise DatasetError(f"{where}: box {j} {box.tolist()} is not finite")
    if x2 <= x1 or y2 <= y1:
        raise DatasetError(
            f"{where}: box {j} {box.tolist()} needs x2 > x1 and y2 > y1 "
            "(boxes are x1, y1, x2, y2 in pixels)"
        )
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise DatasetError(
            f"{where}: box {j} {box.tolist()} lies outside the {width}x{height} image"
        )
    return x1, y1, x2, y2


def _box_annotations(
    item: CocoImage,
    where: str,
    size: tuple[int, int],
    by_id: dict[int, dict[str, Any]],
    image_id: int,
    first_id: int,
) -> list[dict[str, Any]]:
    """The COCO ``annotations`` of one image (ids from ``first_id``); ``size`` is ``(H, W)``."""
    height, width = size
    boxes, cats, crowd = _checked_boxes(item, where)
    anns: list[dict[str, Any]] = []
    for j in range(boxes.shape[0]):
        x1, y1, x2, y2 = _checked_box(where, j, boxes[j], width, height)
        if cats[j] not in by_id:
            raise DatasetError(
                f"{where}: box {j} has category id {cats[j]!r}, not in categories "
                f"{sorted(by_id)}"
            )
        if crowd[j] not in (0, 1):
            raise DatasetError(f"{where}: iscrowd[{j}] must be 0 or 1, got {crowd[j]!r}")
        w, h = x2 - x1, y2 - y1
        anns.append(
            {
                "id": first_id + len(anns),
                "image_id": image_id,
                "category_id": int(cats[j]),
                "bbox": [_json_number(x1), _json_number(y1), _json_number(w), _json_number(h)],
                "area": _json_number(w * h),
                "iscrowd": crowd[j],
            }
        )
    return anns


def _write_coco_image(
    item: CocoImage,
    image_dir: Path,
    split: str,
    seen: set[str],
    by_id: dict[int, dict[str, Any]],
    ids: tuple[int, int],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validate ``item``, write its PNG and return its ``(images entry, annotations)``.

    ``ids`` is ``(image id, first annotation id)``; ``seen`` collects the split's file names.
    """
    where = f"image {item.file_name!r}"
    _check_file_name(item.file_name)
    if item.file_name in seen:
        raise DatasetError(f"{where}: duplicate file_name in split {split!r}")
    seen.add(item.file_name)
    img, height, width = _checked_image(item, where)
    image_id, first_ann_id = ids
    anns = _box_annotations(item, where, (height, width), by_id, image_id, first_ann_id)
    out = image_dir / item.file_name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, _encode_png(img), fsync=False)
    except OSError as exc:
        raise DatasetError(f"cannot write {out}: {exc.strerror}") from exc
    image_json = {"id": image_id, "file_name": item.file_name, "width": width, "height": height}
    return image_json, anns


def write_coco_split(
    root: str | os.PathLike[str],
    split: str,
    images: Iterable[CocoImage],
    categories: list[dict[str, Any]],
    info: dict[str, Any] | None = None,
) -> Path:
    """Write a COCO-format split and return the annotation JSON's path.

    Each image goes to ``root/<split>/<file_name>`` as PNG; the instances JSON goes (atomically)
    to ``root/annotations/instances_<split>.json`` with the COCO 2017 keys: ``images`` (``id`` from
    1 in iteration order, ``file_name``, ``width``, ``height``), ``annotations`` (``id`` from 1,
    ``image_id``, ``category_id``, ``bbox = [x1, y1, x2 - x1, y2 - y1]``, ``area = w * h``,
    ``iscrowd``), ``categories`` as given and ``info``. Format: Lin et al., ECCV 2014
    (cocodataset.org/#format-data).

    Raises :class:`DatasetError` for an unknown category id, a box that is not finite, has
    ``x2 <= x1`` or ``y2 <= y1``, or lies outside the image, a bad image array, mismatched lengths
    or a duplicate file name.
    """
    root = Path(root)
    _check_split_name(split)
    by_id = _validate_categories(categories)
    image_dir = root / split
    ann_dir = root / "annotations"
    _make_split_dirs(image_dir, ann_dir)

    images_json: list[dict[str, Any]] = []
    anns_json: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item in images:
        ids = (len(images_json) + 1, len(anns_json) + 1)
        image_json, anns = _write_coco_image(item, image_dir, split, seen, by_id, ids)
        anns_json.extend(anns)
        images_json.append(image_json)

    doc = {
        "info": dict(info or {}),
        "images": images_json,
        "annotations": anns_json,
        "categories": [dict(c) for c in categories],
    }
    path = ann_dir / f"instances_{split}.json"
    try:
        atomic_write(path, json.dumps(doc, separators=(",", ":")) + "\n")
    except OSError as exc:
        raise DatasetError(f"cannot write {path}: {exc.strerror}") from exc
    log.info("wrote %d images, %d boxes to %s", len(images_json), len(anns_json), path)
    return path


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectionSample:
    """One image with its training targets (torchvision's detection convention).

    Attributes:
        image: ``uint8`` tensor ``3 x H x W`` (RGB).
        boxes: ``float32`` tensor ``N x 4``, ``(x1, y1, x2, y2)`` in pixels, crowd boxes excluded.
        labels: ``int64`` tensor ``N`` of contiguous labels in ``1..K`` (0 is the background).
        image_id: the COCO image id (the key COCOeval matches detections on).
    """

    image: torch.Tensor
    boxes: torch.Tensor
    labels: torch.Tensor
    image_id: int


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(f"annotation file {path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read annotation file {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix or regenerate it"
        ) from exc


def _require(obj: Any, keys: Sequence[str], what: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DatasetError(f"{path}: {what} lacks key(s) {', '.join(map(repr, missing))}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _load_document(path: Path) -> dict[str, Any]:
    """The instances JSON at ``path`` with its three top-level lists checked."""
    doc = _load_json(path)
    _require(doc, ("images", "annotations", "categories"), "the top level", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc[key], list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    return doc


def _parse_categories(categories: list[Any], path: Path) -> dict[int, dict[str, Any]]:
    """The ``categories`` list by id (integer, unique, at least one)."""
    cats: dict[int, dict[str, Any]] = {}
    for i, c in enumerate(categories):
        _require(c, ("id", "name"), f"categories[{i}]", path)
        if not _is_int(c["id"]):
            raise DatasetError(f"{path}: categories[{i}] id {c['id']!r} is not an integer")
        if c["id"] in cats:
            raise DatasetError(f"{path}: duplicate category id {c['id']}")
        cats[c["id"]] = c
    if not cats:
        raise DatasetError(f"{path}: 'categories' is empty; a detection set needs classes")
    return cats


def _parse_images(images_list: list[Any], path: Path) -> dict[int, dict[str, Any]]:
    """The ``images`` list by id (integer, unique, positive integer width and height)."""
    images: dict[int, dict[str, Any]] = {}
    for i, im in enumerate(images_list):
        _require(im, ("id", "file_name", "width", "height"), f"images[{i}]", path)
        if not _is_int(im["id"]):
            raise DatasetError(f"{path}: images[{i}] id {im['id']!r} is not an integer")
        if im["id"] in images:
            raise DatasetError(f"{path}: duplicate image id {im['id']}")
        if (
            not (_is_int(im["width"]) and _is_int(im["height"]))
            or min(im["width"], im["height"]) < 1
        ):
            raise DatasetError(
                f"{path}: images[{i}] width/height must be positive integers, got "
                f"{im['width']!r}x{im['height']!r}"
            )
        images[im["id"]] = im
    return images


#: a box edge may lie up to this many pixels outside its image and be clipped without a warning:
#: COCO boxes often overshoot the edge by rounding. Beyond it the clip is counted in the warning.
CLIP_TOLERANCE_PX = 1.0
#: how many boxes of each kind (dropped zero-size, dropped outside, clipped) the warning names.
WARN_EXAMPLES = 3

#: the kinds of changed boxes, as the warning tags its examples.
_ZERO = "dropped: zero width or height"
_OUTSIDE = "dropped: outside the image"
_CLIPPED = "clipped to the image"
_KINDS = (_ZERO, _OUTSIDE, _CLIPPED)


def _ann_where(path: Path, a: dict[str, Any], i: int) -> str:
    """How an error names ``annotations[i]``: the file, the index and the ``id`` if it has one."""
    return f"{path}: annotations[{i}]" + (f" (id {a['id']!r})" if "id" in a else "")


def _image_name(im: dict[str, Any]) -> str:
    """``image 42 'p.png' (20x10)``: id, file name and size of an ``images`` entry."""
    return f"image {im['id']} {str(im['file_name'])!r} ({im['width']}x{im['height']})"


def _is_finite_number(v: Any) -> bool:
    """Whether ``v`` is a JSON number (int or float, not bool) with a finite float value."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _checked_bbox(bbox: Any, where: str) -> tuple[float, float, float, float]:
    """``bbox`` as ``(x, y, w, h)`` floats. Raises :class:`DatasetError` (naming ``where``, the
    annotation and its image) unless it is 4 finite numbers with ``w >= 0`` and ``h >= 0``."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_finite_number, bbox))):
        raise DatasetError(
            f"{where} has bbox {bbox!r}; it must be 4 finite numbers [x, y, width, height] "
            "in pixels: fix or remove the annotation"
        )
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        side = "width" if w < 0 else "height"
        raise DatasetError(
            f"{where} has bbox {bbox!r} with a negative {side}; a COCO bbox is "
            "[x, y, width, height] with width = x2 - x1 >= 0 and height = y2 - y1 >= 0: "
            "fix or remove the annotation"
        )
    return x, y, w, h


def _checked_annotation(
    a: Any, i: int, path: Path, images: dict[int, Any], cats: dict[int, Any]
) -> tuple[tuple[float, float, float, float], bool]:
    """Validate ``annotations[i]``: ``(its bbox as x, y, w, h, whether it is a crowd region)``
    (``iscrowd``, absent = 0). Crowd boxes get the same bbox checks (COCOeval reads them)."""
    _require(a, ("image_id", "category_id", "bbox"), f"annotations[{i}]", path)
    where = _ann_where(path, a, i)
    if a["image_id"] not in images:
        raise DatasetError(
            f"{where} refers to image id {a['image_id']!r}, which is not in 'images'"
        )
    if a["category_id"] not in cats:
        raise DatasetError(
            f"{where} has category id {a['category_id']!r}, not in 'categories' {sorted(cats)}"
        )
    xywh = _checked_bbox(a["bbox"], f"{where} of {_image_name(images[a['image_id']])}")
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1):
        raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
    return xywh, bool(crowd)


@dataclass
class _BoxReport:
    """The boxes of one annotation file that loading dropped or clipped: a count per kind, the
    first :data:`WARN_EXAMPLES` of each, and the count of rounding clips (within tolerance)."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    rounding: int = 0

    def add(self, kind: str, a: dict[str, Any], i: int, im: dict[str, Any]) -> None:
        """Count ``annotations[i]`` (of image ``im``) as ``kind``; name it if among the first."""
        self.counts[kind] += 1
        shown = self.examples.setdefault(kind, [])
        if len(shown) < WARN_EXAMPLES:
            name = f"annotation id {a['id']!r}" if "id" in a else f"annotations[{i}]"
            shown.append(f"{name} of {_image_name(im)} bbox {a['bbox']!r} {kind}")

    def log(self, path: Path, total: int) -> None:
        """One WARNING with the counts and examples (nothing when no box changed beyond
        rounding; rounding clips alone are logged at DEBUG)."""
        if not self.counts:
            if self.rounding:
                log.debug("%s: %d boxes clipped to their image by at most %g px (rounding)",
                          path, self.rounding, CLIP_TOLERANCE_PX)
            return
        n = self.counts
        shown = "; ".join(e for k in _KINDS for e in self.examples.get(k, []))
        log.warning(
            "%s: %d of %d non-crowd boxes changed on loading: %d dropped (%d with zero width or "
            "height, %d outside their image), %d clipped to their image by more than %g px; "
            "first ones: %s. Check that every bbox is [x, y, width, height] in pixels of its "
            "image's size in 'images'",
            path, sum(n.values()), total, n[_ZERO] + n[_OUTSIDE], n[_ZERO], n[_OUTSIDE],
            n[_CLIPPED], CLIP_TOLERANCE_PX, shown,
        )


def _usable_box(
    xywh: tuple[float, float, float, float], im: dict[str, Any], report: _BoxReport,
    ann: tuple[dict[str, Any], int],
) -> tuple[float, float, float, float] | None:
    """The non-crowd box ``xywh`` of image ``im`` as ``(x1, y1, x2, y2)`` clipped to the image,
    or ``None`` when it is dropped (zero width or height, also after float32 rounding, or no
    area inside the image). Drops and clips beyond :data:`CLIP_TOLERANCE_PX` go to ``report``
    under ``ann = (annotation, index)``."""
    x, y, w, h = xywh
    width, height = float(im["width"]), float(im["height"])
    c = (min(max(x, 0.0), width), min(max(y, 0.0), height),
         min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))
    if w == 0 or h == 0:
        kind: str | None = _ZERO
    elif c[2] <= c[0] or c[3] <= c[1]:
        kind = _OUTSIDE
    else:
        c32 = np.asarray(c, dtype=np.float32)  # the dtype of the targets
        kind = None if c32[2] > c32[0] and c32[3] > c32[1] else _ZERO
    if kind is not None:
        report.add(kind, ann[0], ann[1], im)
        return None
    overshoot = max(-x, -y, x + w - width, y + h - height)
    if overshoot > CLIP_TOLERANCE_PX:
        report.add(_CLIPPED, ann[0], ann[1], im)
    elif overshoot > 0:
        report.rounding += 1
    return c


def _annotations_per_image(
    annotations: list[Any],
    path: Path,
    images: dict[int, dict[str, Any]],
    cats: dict[int, dict[str, Any]],
    category_id_to_label: dict[int, int],
) -> dict[int, list[tuple[tuple[float, float, float, float], int]]]:
    """``image id -> [(xyxy box clipped to the image, label)]`` of the usable non-crowd
    annotations, in file order. Raises :class:`DatasetError` for a malformed annotation; logs
    one WARNING for the boxes dropped or clipped (:class:`_BoxReport`)."""
    per_image: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {
        k: [] for k in images
    }
    report = _BoxReport()
    total = 0
    for i, a in enumerate(annotations):
        xywh, crowd = _checked_annotation(a, i, path, images, cats)
        if crowd:
            continue
        total += 1
        box = _usable_box(xywh, images[a["image_id"]], report, (a, i))
        if box is not None:
            per_image[a["image_id"]].append((box, category_id_to_label[a["category_id"]]))
    report.log(path, total)
    return per_image


def _build_records(
    images: dict[int, dict[str, Any]],
    per_image: dict[int, list[tuple[tuple[float, float, float, float], int]]],
    drop_empty: bool,
) -> list[tuple[dict[str, Any], np.ndarray, np.ndarray]]:
    """``(image entry, xyxy boxes float32, labels int64)`` by image id (the boxes already
    checked and clipped), images without boxes left out when ``drop_empty``."""
    records: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = []
    for image_id in sorted(images):
        anns = per_image[image_id]
        if drop_empty and not anns:
            continue
        boxes = np.array([b for b, _ in anns], dtype=np.float32).reshape(-1, 4)
        labels = np.array([lab for _, lab in anns], dtype=np.int64)
        records.append((images[image_id], boxes, labels))
    return records


class CocoDetection:
    """A COCO-format detection split read with json + PIL (no pycocotools, no torchvision).

    ``dataset[i]`` is a :class:`DetectionSample`. Targets follow torchvision's detection
    reference (``references/detection/coco_utils.py``, ``ConvertCocoPolysToMask``): crowd
    annotations are removed, ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``, coordinates are
    clipped to ``[0, width]`` / ``[0, height]`` and boxes with ``x2 <= x1`` or ``y2 <= y1`` (zero
    width or height, or no area inside the image) are dropped, but never silently: one WARNING
    per annotation file counts the dropped boxes and the boxes clipped by more than
    :data:`CLIP_TOLERANCE_PX` and names the first :data:`WARN_EXAMPLES` of each kind (file,
    annotation id, image, bbox); clips within the tolerance (rounding) are logged at DEBUG.
    Labels are contiguous: the ``k``-th smallest COCO category id is label ``k``
    (``1..K``), so ``num_classes`` is ``K`` foreground classes and a detector needs ``K + 1``
    outputs. Images are ordered by image id; ``iscrowd`` may be absent (read as 0).
    Format: Lin et al., "Microsoft COCO", ECCV 2014.

    Args:
        images_dir: folder the images' ``file_name`` are relative to.
        annotation_file: the instances JSON (``images``, ``annotations``, ``categories``).
        drop_empty: leave out images without any usable non-crowd box (for training; COCO
            evaluation must keep every image); how many is logged at INFO.

    Raises :class:`DatasetError` at construction for a missing file or folder, invalid JSON
    (with line and column), missing keys, duplicate ids, an annotation of an unknown image or
    category, or a malformed ``bbox`` (not 4 finite numbers, or a negative width or height, crowd
    regions included; the message names the file, the annotation index and id, the image and
    the bbox); and at ``dataset[i]`` for an image file that is missing,
    undecodable or of another size than the JSON says.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike[str],
        annotation_file: str | os.PathLike[str],
        *,
        drop_empty: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise DatasetError(f"annotation file {self.annotation_file} not found")
        if not self.images_dir.is_dir():
            raise DatasetError(
                f"image folder {self.images_dir} not found (for {self.annotation_file.name})"
            )
        path = self.annotation_file
        doc = _load_document(path)
        cats = _parse_categories(doc["categories"], path)
        self.categories: list[dict[str, Any]] = [cats[k] for k in sorted(cats)]
        self.label_to_category_id: dict[int, int] = {
            k + 1: cid for k, cid in enumerate(sorted(cats))
        }
        self.category_id_to_label: dict[int, int] = {
            cid: k for k, cid in self.label_to_category_id.items()
        }
        self.class_names: list[str] = [str(c["name"]) for c in self.categories]
        images = _parse_images(doc["images"], path)
        per_image = _annotations_per_image(
            doc["annotations"], path, images, cats, self.category_id_to_label
        )
        self._records: list[tuple[dict[str, Any], np.ndarray, np.ndarray]] = _build_records(
            images, per_image, drop_empty
        )
        self.drop_empty = drop_empty
        if len(self._records) < len(images):
            log.info("%s: %d of %d images have no usable non-crowd box and are left out "
                     "(drop_empty)", path, len(images) - len(self._records), len(images))
        log.debug("%s: %d images, %d classes", path, len(self._records), self.num_classes)

    @classmethod
    def from_split(
        cls, root: str | os.PathLike[str], split: str, *, drop_empty: bool = False
    ) -> CocoDetection:
        """Open ``split`` under ``root`` in the COCO layout.

        Looks for ``root/annotations/instances_<split>.json`` with images in ``root/<split>/``
        (what :func:`write_coco_split` writes), then the COCO 2017 names
        ``instances_<split>2017.json`` with ``root/<split>2017/`` (so ``split="val"`` opens a
        real COCO 2017 download).
        """
        root = Path(root)
        names = [split] if split.endswith("2017") else [split, f"{split}2017"]
        for name in names:
            ann = root / "annotations" / f"instances_{name}.json"
            if ann.is_file():
                return cls(root / name, ann, drop_empty=drop_empty)
        tried = " or ".join(str(root / "annotations" / f"instances_{n}.json") for n in names)
        raise DatasetError(f"no COCO split {split!r} under {root}: expected {tried}")

    @property
    def num_classes(self) -> int:
        """``K``, the number of foreground classes (labels are ``1..K``)."""
        return len(self.categories)

    @property
    def image_ids(self) -> list[int]:
        """The COCO image ids, in dataset order."""
        return [int(im["id"]) for im, _, _ in self._records]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every image, from the JSON (no decoding)."""
        return [(int(im["height"]), int(im["width"])) for im, _, _ in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def _index(self, index: int) -> int:
        n = len(self._records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return index % n

    def target(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(boxes, labels)`` of image ``index`` without decoding the image."""
        _, boxes, labels = self._records[self._index(index)]
        return torch.from_numpy(boxes.copy()), torch.from_numpy(labels.copy())

    def image_path(self, index: int) -> Path:
        """The file of image ``index``."""
        return self.images_dir / str(self._records[self._index(index)][0]["file_name"])

    def __getitem__(self, index: int) -> DetectionSample:
        from PIL import Image, UnidentifiedImageError  # optional heavy dependency: Pillow

        im, boxes, labels = self._records[self._index(index)]
        file = self.images_dir / str(im["file_name"])
        try:
            with Image.open(file) as pil:
                rgb = np.asarray(pil.convert("RGB"))
        except FileNotFoundError as exc:
            raise DatasetError(
                f"image file {file} (image id {im['id']}) is missing; restore it or remove it "
                f"from {self.annotation_file}"
            ) from exc
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(
                f"image file {file} (image id {im['id']}) cannot be decoded ({exc}); "
                "replace it with a valid image"
            ) from exc
        if rgb.shape[:2] != (im["height"], im["width"]):
            raise DatasetError(
                f"image file {file} is {rgb.shape[1]}x{rgb.shape[0]} but "
                f"{self.annotation_file.name} says {im['width']}x{im['height']}; fix the JSON"
            )
        image = torch.from_numpy(rgb.transpose(2, 0, 1).copy())
        return DetectionSample(
            image=image,
            boxes=torch.from_numpy(boxes.copy()),
            labels=torch.from_numpy(labels.copy()),
            image_id=int(im["id"]),
        )
