"""``kdlab predict SOURCE IMAGES...``: class names and probabilities, or detections, for a
user's image files.

``SOURCE`` is anything kdlab writes a student as: a run directory, a hub folder, a student
weights file (``.pt``), TorchScript (``.ts``), a ``torch.export`` program (``.pt2``) or ONNX
(``.onnx``, with or without ``--include-preprocessing``). Every one of them carries the input
description (:mod:`kdlab.data.input_spec`), so the images are preprocessed exactly as the test
set was, and the answers agree across formats (up to the runtimes' float differences).

:func:`open_predictor` reads the source into a :class:`Predictor`; :func:`predict_files`
returns one row per image: ``{"image", "top": [{"rank", "index", "class", "probability"}]}``;
:func:`format_rows` renders them as a table, CSV or JSON.

A detection run or detector artefact (state dict, TorchScript, ONNX; :mod:`kdlab.deploy.detection`)
is opened by :func:`open_detector` instead, and :func:`predict_detections` writes the COCO
results JSON, the COCO ``images``/``categories`` list and a PNG per image with the labelled boxes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from kdlab.core.errors import KdlabError
from kdlab.core.io import atomic_write
from kdlab.core.weights_file import read_verified
from kdlab.data.folder import IMG_EXTENSIONS
from kdlab.data.input_spec import InputSpec, read_image_file
from kdlab.deploy.detection import (
    detector_metadata,
    is_detection_run,
    load_detector_artefact,
    load_detector_run,
)
from kdlab.deploy.export import (
    METADATA_KEY,
    LogitsOnly,
    _quiet_exporters,
    _require,
    load_artefact,
)
from kdlab.runs.student import is_hub_folder, load_trained_student
from kdlab.tasks.detection.evaluation import detections_to_coco

__all__ = ["DEFAULT_MIN_SCORE", "OUTPUT_FORMATS", "DetectorPredictor", "PredictError",
           "Predictor", "draw_detections", "expand_images", "format_rows", "open_detector",
           "open_predictor", "predict_detections", "predict_files", "read_metadata"]

OUTPUT_FORMATS = ("table", "csv", "json")
#: artefact file extensions and their export format.
_EXTENSIONS = {".ts": "torchscript", ".pt2": "exported", ".onnx": "onnx"}


class PredictError(KdlabError):
    """Images or a model source that ``kdlab predict`` cannot use."""


@dataclass
class Predictor:
    """A student ready to classify image files: ``run(batch)`` maps the batch made by
    :meth:`batch` to ``B x K`` scores; ``probabilities`` says whether they are probabilities
    already (an ONNX file made with ``--probabilities``) or logits."""

    spec: InputSpec
    run: Callable[[Tensor], Tensor]
    source: str
    fmt: str
    uint8_input: bool = False
    probabilities: bool = False

    def batch(self, images: Sequence[Any]) -> Tensor:
        """The model input of ``images`` (paths, Pillow images or pixels): normalised float
        tensors, or the uint8 pixels before padding for a graph with the preprocessing
        inside."""
        if self.uint8_input:
            p = self.spec.pad
            return torch.stack([_unpad(self.spec.to_uint8(im), p) for im in images])
        return torch.stack([self.spec.preprocess(im) for im in images])

    def probabilities_of(self, images: Sequence[Any]) -> Tensor:
        """``B x K`` class probabilities of ``images``."""
        with torch.inference_mode():
            scores = self.run(self.batch(images)).float()
        return scores if self.probabilities else scores.softmax(1)


def _unpad(x: Tensor, pad: int) -> Tensor:
    return x[:, pad:x.shape[1] - pad, pad:x.shape[2] - pad] if pad else x


def read_metadata(path: str | Path, fmt: str) -> dict[str, Any]:
    """kdlab's metadata of a TorchScript, ``torch.export`` or ONNX file (the ``kdlab.json``
    extra file or the ``metadata_props`` entry ``kdlab``); ``{}`` when it has none."""
    path = Path(path)
    if fmt == "onnx":
        _require("onnx", what="reading ONNX metadata")
        import onnx  # optional heavy dependency: onnx

        model = onnx.load(str(path), load_external_data=False)
        text = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY, "")
    else:
        extra = {f"{METADATA_KEY}.json": ""}
        with _quiet_exporters():
            if fmt == "torchscript":
                torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            else:
                torch.export.load(str(path), extra_files=extra)
        text = extra[f"{METADATA_KEY}.json"]
    try:
        meta = json.loads(text) if text else {}
    except ValueError as e:
        raise PredictError(f"{path}: kdlab metadata is not JSON ({e})") from e
    return meta if isinstance(meta, dict) else {}


def _spec_from(meta: dict[str, Any], source: Path) -> InputSpec:
    recorded = meta.get("input_spec")
    if not isinstance(recorded, dict):
        raise PredictError(f"{source} records no input description (exported by kdlab 0.3 or "
                           "earlier): export it again from its run")
    return InputSpec.from_dict(recorded)


def open_predictor(source: str | Path, plugins: Sequence[str] = (),
                   checkpoint: str = "best") -> Predictor:
    """The :class:`Predictor` of ``source`` (see the module docstring).

    Raises :class:`PredictError` (one line) for a source that is none of the kinds, a
    detection model (use ``kdlab eval``'s COCO output), or an artefact without an input
    description; the loaders' own errors (:class:`~kdlab.core.errors.RunError`,
    :class:`~kdlab.core.errors.CheckpointError`) for broken runs and files."""
    path = Path(source)
    fmt = _EXTENSIONS.get(path.suffix.lower()) if path.is_file() else None
    if fmt is None:
        if not path.exists():
            raise PredictError(f"{source}: no such run, hub folder or model file")
        student = load_trained_student(path, checkpoint, plugins=plugins)
        meta = student.kdlab_meta
        if meta.get("input") is None:
            raise PredictError(f"{source} records no input description; export it again")
        spec = InputSpec.from_dict(meta["input"])
        _classification_only(spec, source)
        kind = "state_dict" if path.is_file() else "hub" if is_hub_folder(path) else "run"
        return Predictor(spec=spec, run=LogitsOnly(student).eval(), source=str(source),
                         fmt=kind)
    meta = read_metadata(path, fmt)
    spec = _spec_from(meta, path)
    _classification_only(spec, source)
    inside = bool(meta.get("preprocessing_inside"))
    return Predictor(spec=spec, run=load_artefact(path, fmt), source=str(source),
                     fmt=fmt, uint8_input=inside,
                     probabilities=inside and meta.get("output", {}).get("name") ==
                     "probabilities")


def _classification_only(spec: InputSpec, source: str | Path) -> None:
    if spec.task != "classification":
        raise PredictError(f"{source} is a {spec.task} model without the detector metadata "
                           "kdlab predict needs; export it again from its run")


def expand_images(items: Iterable[str | Path]) -> list[Path]:
    """Image files of ``items``: files as given, folders searched recursively for image
    extensions (sorted). Raises :class:`PredictError` for a missing path or no image."""
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += sorted(Path(root) / f for root, _, files in os.walk(p) for f in files
                            if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS))
        elif p.is_file():
            found.append(p)
        else:
            raise PredictError(f"{item}: no such image file or folder")
    if not found:
        raise PredictError("no images found (extensions: " + ", ".join(IMG_EXTENSIONS) + ")")
    return found


def predict_files(predictor: Predictor, images: Sequence[str | Path], top_k: int = 5,
                  batch_size: int = 32) -> list[dict[str, Any]]:
    """One row per image: ``{"image": path, "top": [{"rank", "index", "class",
    "probability"}, ...]}`` with the ``top_k`` most probable classes."""
    if top_k < 1 or batch_size < 1:
        raise PredictError(f"--top-k and --batch-size must be >= 1, got {top_k}, {batch_size}")
    k = min(top_k, predictor.spec.num_classes)
    rows: list[dict[str, Any]] = []
    for i in range(0, len(images), batch_size):
        chunk = list(images[i:i + batch_size])
        probs = predictor.probabilities_of(chunk)
        values, indices = probs.topk(k, dim=1)
        for path, v, idx in zip(chunk, values.tolist(), indices.tolist(), strict=True):
            rows.append({"image": str(path), "top": [
                {"rank": r + 1, "index": c, "class": predictor.spec.classes[c],
                 "probability": p} for r, (p, c) in enumerate(zip(v, idx, strict=True))]})
    return rows


def format_rows(rows: list[dict[str, Any]], fmt: str) -> str:
    """``rows`` as an aligned text table (one line per image), CSV (one line per image and
    rank) or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image", "rank", "index", "class", "probability"])
        for r in rows:
            for t in r["top"]:
                w.writerow([r["image"], t["rank"], t["index"], t["class"],
                            f"{t['probability']:.6f}"])
        return buf.getvalue()
    if fmt != "table":
        raise PredictError(f"unknown output format {fmt!r}; choose one of "
                           f"{', '.join(OUTPUT_FORMATS)}")
    width = max(len("image"), *(len(r["image"]) for r in rows))
    lines = [f"{'image':<{width}}  predictions"]
    for r in rows:
        tops = ", ".join(f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top"])
        lines.append(f"{r['image']:<{width}}  {tops}")
    return "\n".join(lines) + "\n"



# --------------------------------------------------------------------------- detection
#: detections below this score are left out of the JSON and the drawings (``--min-score``).
DEFAULT_MIN_SCORE = 0.5
_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


@dataclass
class DetectorPredictor:
    """A detector ready for image files: ``run(images)`` maps a list of ``3 x H x W`` float
    images in ``[0, 1]`` (``spec.preprocess``) to torchvision's ``{"boxes", "scores",
    "labels"}`` per image; ``categories[label - 1]`` is ``{"label", "id", "name"}``."""

    run: Callable[[list[Tensor]], list[dict[str, Tensor]]]
    spec: InputSpec
    categories: list[dict[str, Any]]
    source: str
    fmt: str


def _detector(run: Callable[[list[Tensor]], list[dict[str, Tensor]]], meta: dict[str, Any],
              source: Path, fmt: str) -> DetectorPredictor:
    return DetectorPredictor(run=run, spec=_spec_from(meta, source),
                             categories=meta["categories"], source=str(source), fmt=fmt)


def _detector_source(path: Path, plugins: Sequence[str], checkpoint: str
                     ) -> DetectorPredictor | None:
    """The detector of ``path`` when it is a detection run or a detector file; else None."""
    fmt = _EXTENSIONS.get(path.suffix.lower()) if path.is_file() else None
    if path.is_dir() and (path / "config.yaml").is_file() and is_detection_run(path):
        run = load_detector_run(path, plugins=plugins,
                                checkpoint=None if checkpoint == "best" else checkpoint)
        return _detector(run.student, detector_metadata(run), path, "run")
    if fmt is None and path.is_file():
        fmt, meta = "state_dict", read_verified(path)
    elif fmt in ("torchscript", "onnx"):
        meta = read_metadata(path, fmt)
    else:
        return None
    if meta.get("task") != "detection":
        return None
    return _detector(load_detector_artefact(path, fmt, plugins=plugins), meta, path, fmt)


def open_detector(source: str | Path, plugins: Sequence[str] = (), checkpoint: str = "best"
                  ) -> DetectorPredictor | None:
    """The :class:`DetectorPredictor` of a detection run or detector artefact (state dict,
    TorchScript, ONNX), or None when ``source`` holds a classifier."""
    return _detector_source(Path(source), plugins, checkpoint)


def draw_detections(image: Image.Image, detections: list[dict[str, Any]],
                    names: dict[int, str]) -> Image.Image:
    """A copy of ``image`` with each COCO-format detection drawn as a box labelled
    ``name score`` (one colour per category)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    for d in detections:
        x, y, w, h = d["bbox"]
        colour = _COLOURS[d["category_id"] % len(_COLOURS)]
        draw.rectangle((x, y, x + w, y + h), outline=colour, width=2)
        text = f"{names.get(d['category_id'], d['category_id'])} {d['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x, y), text)
        ty = max(0.0, y - (bottom - top) - 2)
        draw.rectangle((x, ty, x + right - left + 2, ty + bottom - top + 2), fill=colour)
        draw.text((x + 1, ty), text, fill=(255, 255, 255))
    return out


def predict_detections(predictor: DetectorPredictor, images: Sequence[Path], out_dir: Path,
                       min_score: float = DEFAULT_MIN_SCORE, draw: bool = True
                       ) -> dict[str, Any]:
    """Detect objects in ``images`` and write, into ``out_dir``: ``detections.json`` (the COCO
    results format: ``image_id``, ``category_id``, ``bbox = [x, y, w, h]``, ``score``; boxes in
    pixels of each file), ``images.json`` (COCO ``images`` with ``id``, ``file_name``,
    ``width``, ``height``, and the ``categories``) and, with ``draw``, one PNG per image with
    the labelled boxes. Detections scoring below ``min_score`` are left out. Returns the
    written paths and the detection count."""
    if not 0.0 <= min_score <= 1.0:
        raise PredictError(f"--min-score must be in [0, 1], got {min_score}")
    out_dir.mkdir(parents=True, exist_ok=True)
    mapping = {c["label"]: c["id"] for c in predictor.categories}
    names = {c["id"]: c["name"] for c in predictor.categories}
    results: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    drawn: list[str] = []
    for image_id, path in enumerate(images, start=1):
        img = read_image_file(path).convert("RGB")
        x = predictor.spec.preprocess(img)
        with torch.inference_mode():
            det = predictor.run([x])[0]
        keep = det["scores"] >= min_score
        found = detections_to_coco(image_id, det["boxes"][keep].float(),
                                   det["scores"][keep].float(), det["labels"][keep], mapping)
        results += found
        listed.append({"id": image_id, "file_name": str(path), "width": img.width,
                       "height": img.height})
        if draw:
            target = out_dir / f"{image_id:05d}_{path.stem}.png"
            draw_detections(img, found, names).save(target)
            drawn.append(str(target))
    atomic_write(out_dir / "detections.json", json.dumps(results) + "\n")
    atomic_write(out_dir / "images.json", json.dumps(
        {"images": listed, "categories": [{"id": c["id"], "name": c["name"]}
                                          for c in predictor.categories],
         "source": predictor.source, "min_score": min_score}, indent=2) + "\n")
    return {"detections": len(results), "images": len(listed), "drawn": drawn,
            "json": str(out_dir / "detections.json")}
