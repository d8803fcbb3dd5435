"""Real aerial tree-crown detection data from the DeepForest wheel (:func:`import_tree_crowns`).

The ``deepforest`` wheel on PyPI (MIT licence; Weinstein et al., "DeepForest: A Python package
for RGB deep learning tree crown delineation", Methods in Ecology and Evolution 2020) ships four
NEON aerial RGB images with Pascal-VOC box annotations in ``deepforest/data/``:

=================================================  ===========  =====  ==================
image                                              size (WxH)   boxes  labels
=================================================  ===========  =====  ==================
``2019_YELL_2_528000_4978000_image_crop2.png``     2299 x 2472  574    Tree
``2019_YELL_2_541000_4977000_image_crop.png``      1249 x 1035  279    Tree
``OSBS_029.png``                                   400 x 400    61     Tree
``SOAP_061.png``                                   400 x 400    37     Alive 9, Dead 28
=================================================  ===========  =====  ==================

(measured on deepforest 2.1.0). Only those eight members (PNG + XML) are read from the zip;
nothing else is extracted and deepforest is never installed.

Fixed splits: ``train`` = the larger YELL crop cut into ``tile``-pixel tiles (42 tiles), ``test``
= the other YELL crop, 13 km east, tiled the same way (12 tiles): the same site and imagery, a
different stand; ``test_other_sites`` = OSBS_029 (Florida) and SOAP_061 (California) whole, for
a cross-site check. One class ``Tree``: SOAP_061's Alive/Dead labels are merged because a second
class would exist in one test image only (no training example of it).

Tiling follows DeepForest's own preprocessing (``deepforest.preprocess`` with the
``slidingwindow`` package): windows every ``tile - overlap`` pixels, the last window in each row
and column shifted back to end at the image edge (so every tile is full-size, none is padded),
and a box is kept in a tile when its clipped area is more than ``min_visible`` of its full area
(DeepForest: ``clipped_area / original_area > 0.5``), clipped to the tile.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.core.errors import DatasetError
from kdlab.core.io import file_sha256
from kdlab.tasks.detection.coco import CocoImage, write_coco_split
from kdlab.tools.voc import VocAnnotation, parse_voc_xml, voc_objects_to_boxes

__all__ = [
    "CLASS_NAME",
    "DATA_DIR",
    "DEEPFOREST_SHA256",
    "DEEPFOREST_VERSION",
    "DEEPFOREST_WHEEL",
    "OTHER_SITE_IMAGES",
    "TEST_IMAGES",
    "TRAIN_IMAGES",
    "download_deepforest_wheel",
    "import_tree_crowns",
    "tile_boxes",
    "tile_offsets",
]

log = logging.getLogger(__name__)

DEEPFOREST_VERSION = "2.1.0"
DEEPFOREST_WHEEL = f"deepforest-{DEEPFOREST_VERSION}-py3-none-any.whl"
#: sha256 of deepforest-2.1.0-py3-none-any.whl from PyPI (20,639,595 bytes), measured.
DEEPFOREST_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
DATA_DIR = "deepforest/data"
#: Images tiled into the training split.
TRAIN_IMAGES = ("2019_YELL_2_528000_4978000_image_crop2",)
#: Images tiled into the (same-site) test split.
TEST_IMAGES = ("2019_YELL_2_541000_4977000_image_crop",)
#: Images of other sites, kept whole as the ``test_other_sites`` split.
OTHER_SITE_IMAGES = ("OSBS_029", "SOAP_061")
CLASS_NAME = "Tree"


def tile_offsets(length: int, tile: int, overlap: int = 0) -> list[int]:
    """Window start positions along one axis of ``length`` pixels (``slidingwindow``'s rule).

    Starts are ``0, s, 2s, ...`` with stride ``s = tile - overlap`` while a whole window fits
    (``start <= length - tile``), plus ``length - tile`` when the last one does not end at the
    edge; a ``length`` below ``tile`` gives one window of the whole length (start 0). E.g.
    ``tile_offsets(1249, 400) == [0, 400, 800, 849]``.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise DatasetError(f"tile must be >= 1 and 0 <= overlap < tile, got tile={tile}, "
                           f"overlap={overlap}")
    size = min(tile, length)
    last = length - size
    starts = list(range(0, last + 1, tile - overlap))
    if starts[-1] != last:
        starts.append(last)
    return starts


def tile_boxes(
    boxes: np.ndarray, window: Sequence[float], min_visible: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of one tile: ``(boxes in tile coordinates, indices of the kept input boxes)``.

    ``boxes`` is ``N x 4`` ``(x1, y1, x2, y2)``, ``window`` ``(x0, y0, x1, y1)``. Each box is
    clipped to the window and kept when ``clipped_area / area > min_visible`` (DeepForest's
    ``select_annotations``, which uses 0.5); kept boxes are shifted by ``-(x0, y0)``.
    """
    wx0, wy0, wx1, wy1 = (float(v) for v in window)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped = np.stack([np.clip(b[:, 0], wx0, wx1), np.clip(b[:, 1], wy0, wy1),
                        np.clip(b[:, 2], wx0, wx1), np.clip(b[:, 3], wy0, wy1)], axis=1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = np.nonzero((area > 0) & (inside > min_visible * area))[0]
    shifted = clipped[keep] - np.array([wx0, wy0, wx0, wy0])
    return shifted, keep


def download_deepforest_wheel(cache_dir: str | os.PathLike[str], *, timeout: float = 600.0) -> Path:
    """``python -m pip download --no-deps deepforest==2.1.0 -d cache_dir``; return the wheel.

    An existing wheel in ``cache_dir`` is reused. Raises :class:`DatasetError` (one line, with
    the manual command) when pip fails, e.g. without network.
    """
    cache_dir = Path(cache_dir)
    wheel = cache_dir / DEEPFOREST_WHEEL
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"deepforest=={DEEPFOREST_VERSION}", "-d", str(cache_dir)]
    manual = (f"on a machine with internet run 'pip download --no-deps "
              f"deepforest=={DEEPFOREST_VERSION}' and pass the wheel with --wheel")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DatasetError(f"could not run pip to download deepforest ({exc}); {manual}") from exc
    if proc.returncode != 0 or not wheel.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise DatasetError(f"could not download deepforest=={DEEPFOREST_VERSION} ({reason}); "
                           f"{manual}")
    return wheel


def _read_member(zf: zipfile.ZipFile, name: str, wheel: Path) -> bytes:
    try:
        return zf.read(name)
    except KeyError as exc:
        raise DatasetError(f"{wheel} has no member {name}; is it the deepforest "
                           f"{DEEPFOREST_VERSION} wheel?") from exc


def _load(zf: zipfile.ZipFile, stem: str, wheel: Path) -> tuple[np.ndarray, VocAnnotation]:
    from PIL import Image, UnidentifiedImageError  # optional heavy dependency: Pillow

    png = f"{DATA_DIR}/{stem}.png"
    try:
        with Image.open(io.BytesIO(_read_member(zf, png, wheel))) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"cannot decode {png} in {wheel} ({exc})") from exc
    xml = f"{DATA_DIR}/{stem}.xml"
    ann = parse_voc_xml(_read_member(zf, xml, wheel), f"{wheel.name}:{xml}")
    h, w = image.shape[:2]
    if (ann.width, ann.height) not in ((None, None), (w, h)):
        log.warning("%s: XML size %sx%s differs from the PNG's %dx%d; using the PNG's",
                    xml, ann.width, ann.height, w, h)
    return image, ann


def _check_tiling(tile: int, overlap: int, min_visible: float) -> None:
    if tile < 1 or not 0 <= overlap < tile:
        raise DatasetError(f"tile must be >= 1 and 0 <= overlap < tile, got tile={tile}, "
                           f"overlap={overlap}")
    if not 0.0 <= min_visible < 1.0:
        raise DatasetError(f"min_visible must be in [0, 1) (kept when more than that fraction "
                           f"of a box is inside the tile), got {min_visible}")


def _find_wheel(wheel: str | os.PathLike[str] | None, cache: Path, download: bool) -> Path:
    """The given wheel, else the cached one, else one downloaded into ``cache``."""
    if wheel is not None:
        wheel_path = Path(wheel)
        if not wheel_path.is_file():
            raise DatasetError(f"deepforest wheel {wheel_path} not found")
        return wheel_path
    if (cache / DEEPFOREST_WHEEL).is_file():
        return cache / DEEPFOREST_WHEEL
    if download:
        return download_deepforest_wheel(cache)
    raise DatasetError(f"the tree-crown data needs the deepforest {DEEPFOREST_VERSION} wheel: "
                       f"pass --wheel PATH (from 'pip download --no-deps "
                       f"deepforest=={DEEPFOREST_VERSION}') or --download")


def _verified_sha256(wheel_path: Path, expected_sha256: str | None) -> str:
    """The wheel's sha256, which must equal ``expected_sha256`` unless that is ``None``."""
    digest = file_sha256(wheel_path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise DatasetError(f"{wheel_path} has sha256 {digest}, expected {expected_sha256} "
                           f"(deepforest {DEEPFOREST_VERSION} from PyPI); download it again")
    return digest


def _open_wheel(wheel_path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{wheel_path} is not a readable wheel (zip): {exc}") from exc


def _boxes_of(image: np.ndarray, ann: VocAnnotation, class_ids: dict[str, int]) -> np.ndarray:
    """The image's boxes, every label counted as class 1 (its names are added to
    ``class_ids``)."""
    names = {o.name: 1 for o in ann.objects}
    class_ids.update(names)
    h, w = image.shape[:2]
    boxes, _, _, _ = voc_objects_to_boxes(ann, w, h, names, difficult_as_crowd=False,
                                          where=ann.source)
    return boxes


def _tiled_items(zf: zipfile.ZipFile, wheel_path: Path, stems: Sequence[str],
                 counts: dict[str, int], class_ids: dict[str, int],
                 tiling: tuple[int, int, float]) -> Iterator[CocoImage]:
    """The ``tiling = (tile, overlap, min_visible)`` tiles of each image, with their boxes."""
    tile, overlap, min_visible = tiling
    for stem in stems:
        image, ann = _load(zf, stem, wheel_path)
        boxes = _boxes_of(image, ann, class_ids)
        h, w = image.shape[:2]
        for y0 in tile_offsets(h, tile, overlap):
            for x0 in tile_offsets(w, tile, overlap):
                th, tw = min(tile, h), min(tile, w)
                kept, _ = tile_boxes(boxes, (x0, y0, x0 + tw, y0 + th), min_visible)
                counts["images"] += 1
                counts["boxes"] += len(kept)
                yield CocoImage(f"{stem}_x{x0}_y{y0}.png", image[y0:y0 + th, x0:x0 + tw],
                                kept, [1] * len(kept))


def _whole_items(zf: zipfile.ZipFile, wheel_path: Path, stems: Sequence[str],
                 counts: dict[str, int], class_ids: dict[str, int]) -> Iterator[CocoImage]:
    """Each image whole, with its boxes."""
    for stem in stems:
        image, ann = _load(zf, stem, wheel_path)
        boxes = _boxes_of(image, ann, class_ids)
        counts["images"] += 1
        counts["boxes"] += len(boxes)
        yield CocoImage(f"{stem}.png", image, boxes, [1] * len(boxes))


def _write_splits(out_root: Path, wheel_path: Path, tiling: tuple[int, int, float],
                  summary: dict[str, Any], class_ids: dict[str, int]) -> None:
    """Write the three splits from the wheel, recording counts and paths in ``summary``."""
    tile, overlap, min_visible = tiling
    categories = [{"id": 1, "name": CLASS_NAME}]
    info = {"description": "DeepForest tree crowns (kdlab.tools.trees)",
            "source": f"deepforest {DEEPFOREST_VERSION} wheel (MIT), deepforest/data",
            "tile": tile, "overlap": overlap, "min_visible": min_visible}
    with _open_wheel(wheel_path) as zf:
        for split, stems, tiled in (("train", TRAIN_IMAGES, True), ("test", TEST_IMAGES, True),
                                    ("test_other_sites", OTHER_SITE_IMAGES, False)):
            counts = {"images": 0, "boxes": 0}
            if tiled:
                items = _tiled_items(zf, wheel_path, stems, counts, class_ids, tiling)
            else:
                items = _whole_items(zf, wheel_path, stems, counts, class_ids)
            path = write_coco_split(out_root, split, items, categories, info=info)
            summary["splits"][split] = counts
            summary["annotation_files"][split] = str(path)


def import_tree_crowns(
    out_root: str | os.PathLike[str],
    *,
    wheel: str | os.PathLike[str] | None = None,
    download: bool = False,
    tile: int = 400,
    overlap: int = 0,
    min_visible: float = 0.5,
    expected_sha256: str | None = DEEPFOREST_SHA256,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Write DeepForest's annotated tree crowns as a COCO dataset under ``out_root``.

    The wheel is ``wheel``, else ``cache_dir/deepforest-2.1.0-py3-none-any.whl`` (default
    ``cache_dir``: ``out_root/_wheel``) if present, else downloaded there with pip when
    ``download``. Its sha256 must equal ``expected_sha256`` (``None`` skips the check).

    ``train``: the larger YELL crop and ``test``: the other YELL crop, each cut into
    ``tile x tile`` tiles (:func:`tile_offsets` with ``overlap`` pixels; a box is kept when more
    than ``min_visible`` of its area lies in the tile, :func:`tile_boxes`), named
    ``<image>_x<x0>_y<y0>.png``; ``test_other_sites``: OSBS_029 and SOAP_061 whole. Boxes
    follow the VOC conversion ``(xmin - 1, ymin - 1, xmax, ymax)`` of
    :mod:`kdlab.tools.voc`; every label becomes the single class ``Tree`` (id 1).

    Returns ``{"splits": {split: {"images", "boxes"}}, "annotation_files": {...},
    "wheel": path, "sha256": digest}``. Raises :class:`DatasetError` for a missing wheel, a
    checksum mismatch, a wheel without the expected members, or bad tiling parameters.
    """
    out_root = Path(out_root)
    _check_tiling(tile, overlap, min_visible)
    cache = Path(cache_dir) if cache_dir is not None else out_root / "_wheel"
    wheel_path = _find_wheel(wheel, cache, download)
    digest = _verified_sha256(wheel_path, expected_sha256)
    class_ids: dict[str, int] = {}
    summary: dict[str, Any] = {"splits": {}, "annotation_files": {}, "wheel": str(wheel_path),
                               "sha256": digest}
    _write_splits(out_root, wheel_path, (tile, overlap, min_visible), summary, class_ids)
    merged = sorted(class_ids)
    if merged != [CLASS_NAME]:
        log.info("merged the labels %s into the single class %r", merged, CLASS_NAME)
    return summary
