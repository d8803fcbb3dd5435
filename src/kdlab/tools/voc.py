"""Pascal-VOC annotations to a COCO-format dataset (:func:`import_voc`).

Two layouts are read:

* a ``VOCdevkit/VOC20xx`` folder (Everingham et al., "The PASCAL Visual Object Classes (VOC)
  Challenge", IJCV 2010): ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and the image sets
  ``ImageSets/Main/<set>.txt`` (one id per line);
* a plain folder of ``<name>.xml`` files next to their images (what labelImg and DeepForest
  write), split by given id lists or by a seeded fraction.

Box convention: VOC's ``xmin..xmax`` are 1-based inclusive pixel indices, so a box covering the
whole image reads ``(1, 1, W, H)``. In the continuous pixel-corner coordinates of COCO and
torchvision that is ``(0, 0, W, H)``: ``(x1, y1, x2, y2) = (xmin - 1, ymin - 1, xmax, ymax)``,
as detectron2's ``load_voc_instances`` converts. Objects flagged ``difficult`` become
``iscrowd = 1`` by default: the COCO reader keeps them out of the training targets and COCOeval
ignores detections matched to them, as the VOC evaluation ignores difficult objects.

XML is parsed with :mod:`xml.etree.ElementTree` after refusing any document with a DOCTYPE or
entity declaration (``defusedxml`` is not a dependency; VOC files never need either).
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from kdlab.core.errors import DatasetError
from kdlab.tasks.detection.coco import CocoImage, write_coco_split

__all__ = [
    "IMAGE_EXTENSIONS",
    "VocAnnotation",
    "VocObject",
    "clip_box",
    "import_voc",
    "parse_voc_xml",
    "voc_box_to_xyxy",
    "voc_objects_to_boxes",
]

log = logging.getLogger(__name__)

#: Image extensions tried, in order, for ``<id>.<ext>`` when the XML's ``filename`` is absent.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: class name, raw VOC box ``(xmin, ymin, xmax, ymax)``, difficult flag."""

    name: str
    box: tuple[float, float, float, float]
    difficult: bool


@dataclass(frozen=True)
class VocAnnotation:
    """One VOC XML file: ``filename`` and ``size`` as written (either may be absent)."""

    source: str
    filename: str | None
    width: int | None
    height: int | None
    objects: tuple[VocObject, ...]


def _text(elem: ElementTree.Element, tag: str) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def parse_voc_xml(data: bytes, source: str) -> VocAnnotation:
    """Parse one Pascal-VOC annotation document (``source`` names it in errors).

    Reads ``filename``, ``size/width``, ``size/height`` and every ``object`` (``name``,
    ``bndbox/{xmin,ymin,xmax,ymax}`` as floats, ``difficult`` 0/1, absent = 0). Raises
    :class:`DatasetError` for a DOCTYPE or entity declaration (refused for safety), malformed
    XML, a root other than ``<annotation>``, or an object without a name or a numeric box.
    """
    head = data[:4096].lower()
    if b"<!doctype" in head or b"<!entity" in data.lower():
        raise DatasetError(f"{source}: XML with a DOCTYPE or entity declaration is refused; "
                           f"VOC annotations need neither (remove it)")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise DatasetError(f"{source}: malformed XML ({exc}); fix or remove the file") from exc
    if root.tag != "annotation":
        raise DatasetError(f"{source}: root element is <{root.tag}>, expected <annotation> "
                           f"(not a Pascal-VOC file)")

    def size(tag: str) -> int | None:
        value = _text(root, f"size/{tag}")
        try:
            return int(float(value)) if value else None
        except ValueError as exc:
            raise DatasetError(f"{source}: size/{tag} {value!r} is not a number") from exc

    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        if not name:
            raise DatasetError(f"{source}: object {i} has no <name>")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            value = _text(obj, f"bndbox/{tag}")
            try:
                coords.append(float(value))  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{source}: object {i} ({name}) has bndbox/{tag} {value!r}; "
                                   f"expected a number") from exc
        difficult = _text(obj, "difficult")
        try:
            is_difficult = bool(int(float(difficult))) if difficult else False
        except ValueError as exc:
            raise DatasetError(f"{source}: object {i} ({name}) has difficult {difficult!r}; "
                               f"expected 0 or 1") from exc
        objects.append(VocObject(name, (coords[0], coords[1], coords[2], coords[3]),
                                 is_difficult))
    return VocAnnotation(source, _text(root, "filename") or None, size("width"), size("height"),
                         tuple(objects))


def voc_box_to_xyxy(box: Sequence[float]) -> tuple[float, float, float, float]:
    """VOC ``(xmin, ymin, xmax, ymax)`` (1-based inclusive pixel indices) to pixel-corner
    ``(x1, y1, x2, y2) = (xmin - 1, ymin - 1, xmax, ymax)`` (detectron2's conversion: the whole
    image ``(1, 1, W, H)`` becomes ``(0, 0, W, H)``)."""
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    return xmin - 1.0, ymin - 1.0, xmax, ymax


def clip_box(
    box: Sequence[float], width: float, height: float
) -> tuple[tuple[float, float, float, float], bool]:
    """``box`` (x1, y1, x2, y2) clipped to ``[0, width] x [0, height]``, and whether it changed."""
    x1, y1, x2, y2 = (float(v) for v in box)
    c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
         min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    return c, c != (x1, y1, x2, y2)


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError  # optional heavy dependency: Pillow

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot decode image {path} ({exc}); replace or remove it") from exc


@dataclass(frozen=True)
class _Layout:
    root: Path
    devkit: bool  # VOCdevkit/VOC20xx (Annotations/, JPEGImages/, ImageSets/Main/)

    @property
    def ann_dir(self) -> Path:
        return self.root / "Annotations" if self.devkit else self.root

    @property
    def image_dir(self) -> Path:
        return self.root / "JPEGImages" if self.devkit else self.root


def _find_layout(voc_root: Path) -> _Layout:
    if not voc_root.is_dir():
        raise DatasetError(f"VOC folder {voc_root} does not exist")
    if (voc_root / "Annotations").is_dir():
        return _Layout(voc_root, True)
    years = sorted(p for p in voc_root.glob("VOC*") if (p / "Annotations").is_dir())
    if len(years) == 1:
        return _Layout(years[0], True)
    if len(years) > 1:
        found = ", ".join(p.name for p in years)
        raise DatasetError(f"{voc_root} holds several VOC folders ({found}); pass one of them "
                           f"as the VOC root")
    if any(voc_root.glob("*.xml")):
        return _Layout(voc_root, False)
    raise DatasetError(f"no Pascal-VOC annotations under {voc_root}: expected VOC20xx/Annotations/"
                       f"*.xml (VOCdevkit) or *.xml files next to their images")


def _id_list(layout: _Layout, value: str, voc_root: Path) -> list[str]:
    """Ids of an image set: ``ImageSets/Main/<value>.txt`` (devkit) or a list file ``value``
    (absolute, or relative to ``voc_root``); one id (or file name) per line, first token."""
    candidates = []
    if layout.devkit:
        candidates.append(layout.root / "ImageSets" / "Main" / f"{value}.txt")
    p = Path(value)
    candidates.append(p if p.is_absolute() else voc_root / p)
    for path in candidates:
        if path.is_file():
            ids: list[str] = []
            for line in path.read_text(encoding="utf-8").splitlines():
                token = line.split()[0] if line.split() else ""
                if token:
                    ids.append(Path(token).stem if token.lower().endswith(
                        (".xml", *IMAGE_EXTENSIONS)) else token)
            if not ids:
                raise DatasetError(f"image set {path} lists no images")
            dupes = [k for k, n in Counter(ids).items() if n > 1]
            if dupes:
                raise DatasetError(f"image set {path} lists {dupes[0]!r} more than once")
            return ids
    raise DatasetError(f"image set {value!r} not found (looked for "
                       f"{', '.join(str(c) for c in candidates)})")


def _default_splits(layout: _Layout, test_fraction: float, seed: int,
                    all_ids: list[str]) -> dict[str, list[str]]:
    if layout.devkit:
        main = layout.root / "ImageSets" / "Main"
        for pair in (("trainval", "test"), ("train", "val")):
            if all((main / f"{s}.txt").is_file() for s in pair):
                names = {"train": pair[0], ("test" if pair[1] == "test" else "val"): pair[1]}
                return {k: _id_list(layout, v, layout.root) for k, v in names.items()}
        raise DatasetError(f"{main} has neither trainval.txt + test.txt nor train.txt + val.txt; "
                           f"pass splits={{'train': '<set>', ...}}")
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1), got {test_fraction}")
    ids = sorted(all_ids)
    random.Random(seed).shuffle(ids)
    n_test = round(len(ids) * test_fraction)
    if n_test == 0:
        return {"train": sorted(ids)}
    return {"train": sorted(ids[n_test:]), "test": sorted(ids[:n_test])}


def _image_path(layout: _Layout, ann: VocAnnotation, stem: str) -> Path:
    candidates = []
    if ann.filename:
        candidates.append(layout.image_dir / Path(ann.filename).name)
    candidates += [layout.image_dir / f"{stem}{ext}" for ext in IMAGE_EXTENSIONS]
    candidates += [layout.image_dir / f"{stem}{ext.upper()}" for ext in IMAGE_EXTENSIONS]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetError(f"{ann.source}: image {candidates[0].name} not found in {layout.image_dir}")


def voc_objects_to_boxes(
    ann: VocAnnotation, width: int, height: int, class_ids: Mapping[str, int],
    *, difficult_as_crowd: bool = True, where: str = "",
) -> tuple[np.ndarray, list[int], list[int], Counter[str]]:
    """The objects of ``ann`` as ``(boxes N x 4 xyxy, category ids, iscrowd, skipped names)``.

    Each box is converted with :func:`voc_box_to_xyxy` and clipped to the ``width x height``
    image (a warning names the file); boxes empty after clipping are dropped (warning). Objects
    whose class is not in ``class_ids`` are skipped and counted. ``difficult`` objects get
    ``iscrowd = 1`` when ``difficult_as_crowd``.
    """
    where = where or ann.source
    boxes: list[tuple[float, float, float, float]] = []
    cats: list[int] = []
    crowd: list[int] = []
    skipped: Counter[str] = Counter()
    clipped = dropped = 0
    for obj in ann.objects:
        if obj.name not in class_ids:
            skipped[obj.name] += 1
            continue
        box, changed = clip_box(voc_box_to_xyxy(obj.box), width, height)
        clipped += changed
        if box[2] <= box[0] or box[3] <= box[1]:
            dropped += 1
            continue
        boxes.append(box)
        cats.append(class_ids[obj.name])
        crowd.append(int(obj.difficult and difficult_as_crowd))
    if clipped:
        log.warning("%s: %d box(es) outside the %dx%d image clipped to it", where, clipped,
                    width, height)
    if dropped:
        log.warning("%s: %d box(es) with no area inside the image dropped", where, dropped)
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return arr, cats, crowd, skipped


def _split_ids(layout: _Layout, voc_root: Path, splits: Mapping[str, str] | None,
               test_fraction: float, seed: int) -> dict[str, list[str]]:
    """The image ids of each output split (given image sets, else the default splits)."""
    if splits is None:
        xml_stems = sorted(p.stem for p in layout.ann_dir.glob("*.xml"))
        return _default_splits(layout, test_fraction, seed, xml_stems)
    if not splits:
        raise DatasetError("splits is empty; give at least one {'train': '<image set>'}")
    return {k: _id_list(layout, v, voc_root) for k, v in splits.items()}


def _read_annotations(layout: _Layout,
                      split_ids: dict[str, list[str]]) -> dict[str, VocAnnotation]:
    """The parsed XML of every listed id, in first-listed order."""
    anns: dict[str, VocAnnotation] = {}
    for ids in split_ids.values():
        for stem in ids:
            if stem in anns:
                continue
            path = layout.ann_dir / f"{stem}.xml"
            if not path.is_file():
                raise DatasetError(f"annotation {path} not found (listed in an image set)")
            anns[stem] = parse_voc_xml(path.read_bytes(), str(path))
    return anns


def _class_names(classes: Sequence[str] | None, anns: dict[str, VocAnnotation],
                 layout: _Layout) -> list[str]:
    """``classes`` (non-empty, unique), or the sorted object names found in ``anns``."""
    if classes is None:
        names = sorted({o.name for a in anns.values() for o in a.objects})
        if not names:
            raise DatasetError(f"no objects in the annotations under {layout.ann_dir}; pass "
                               f"classes=[...] to write image-only splits")
        return names
    names = list(classes)
    if not names or len(set(names)) != len(names):
        raise DatasetError(f"classes must be non-empty and unique, got {names}")
    return names


def _voc_items(layout: _Layout, anns: dict[str, VocAnnotation], ids: list[str],
               class_ids: dict[str, int], difficult_as_crowd: bool, counts: dict[str, int],
               skipped_total: Counter[str]) -> Iterator[CocoImage]:
    """The images ``ids`` with their boxes, updating ``counts`` and ``skipped_total``."""
    for stem in ids:
        ann = anns[stem]
        image_path = _image_path(layout, ann, stem)
        image = _read_image(image_path)
        height, width = image.shape[:2]
        if (ann.width, ann.height) not in ((None, None), (width, height)):
            log.warning("%s: XML size %sx%s differs from the image's %dx%d; using the "
                        "image's", ann.source, ann.width, ann.height, width, height)
        boxes, cats, crowd, skipped = voc_objects_to_boxes(
            ann, width, height, class_ids, difficult_as_crowd=difficult_as_crowd)
        skipped_total.update(skipped)
        counts["images"] += 1
        counts["boxes"] += len(cats)
        counts["crowd"] += sum(crowd)
        yield CocoImage(f"{stem}.png", image, boxes, cats, crowd)


def import_voc(
    voc_root: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    splits: Mapping[str, str] | None = None,
    classes: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    difficult_as_crowd: bool = True,
) -> dict[str, Any]:
    """Convert a Pascal-VOC dataset into a COCO-format one under ``out_root``.

    ``voc_root`` is a ``VOC20xx`` folder (or a ``VOCdevkit`` holding exactly one), or a plain
    folder of ``*.xml`` next to their images. ``splits`` maps each output split to an image set:
    a name of ``ImageSets/Main/<name>.txt`` or a list file (one id per line; absolute or relative
    to ``voc_root``). Default: ``{"train": "trainval", "test": "test"}`` (VOC2007) or
    ``{"train": "train", "val": "val"}`` (VOC2012) for a devkit; for a plain folder a seeded split
    of the sorted ids, ``round(test_fraction * n)`` into ``"test"`` and the rest into ``"train"``.

    Boxes: ``(xmin - 1, ymin - 1, xmax, ymax)`` (1-based inclusive VOC indices to pixel corners,
    detectron2's conversion), clipped to the image with a logged warning. Classes: ``classes``
    in the given order, or the sorted names found in the selected files, as COCO category ids
    ``1..K`` (objects of other classes are skipped with a warning). ``difficult`` objects become
    ``iscrowd = 1`` unless ``difficult_as_crowd=False``. Images are re-encoded as
    ``<split>/<id>.png`` by :func:`kdlab.tasks.detection.coco.write_coco_split`.

    Returns ``{"classes": [...], "splits": {split: {"images", "boxes", "crowd"}},
    "annotation_files": {split: path}}``. Raises :class:`DatasetError` for missing folders,
    image sets, XML or image files, malformed XML (file named), or no objects at all.
    """
    voc_root, out_root = Path(voc_root), Path(out_root)
    layout = _find_layout(voc_root)
    split_ids = _split_ids(layout, voc_root, splits, test_fraction, seed)
    anns = _read_annotations(layout, split_ids)
    names = _class_names(classes, anns, layout)
    class_ids = {n: i + 1 for i, n in enumerate(names)}
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]

    summary: dict[str, Any] = {"classes": names, "splits": {}, "annotation_files": {}}
    skipped_total: Counter[str] = Counter()
    info = {"description": "Pascal-VOC import (kdlab.tools.voc)",
            "source": str(layout.root), "box_convention": "(xmin-1, ymin-1, xmax, ymax)"}
    for split, ids in split_ids.items():
        counts = {"images": 0, "boxes": 0, "crowd": 0}
        items = _voc_items(layout, anns, ids, class_ids, difficult_as_crowd, counts,
                           skipped_total)
        path = write_coco_split(out_root, split, items, categories, info=info)
        summary["splits"][split] = counts
        summary["annotation_files"][split] = str(path)
    if skipped_total:
        log.warning("skipped objects of classes not in %s: %s", names, dict(skipped_total))
    return summary
