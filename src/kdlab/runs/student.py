"""A trained student from wherever it lives, with its classes and preprocessing attached.

:func:`load_trained_student` reads a run directory, a hub folder written by ``kdlab export
--format hub`` (``config.json`` + ``model.safetensors``: JSON and raw tensors, no pickle) or a
student weights file of ``kdlab export --format state_dict``, and returns the network in eval
mode with two attributes:

* ``student.kdlab_meta``: a dict with ``arch``, ``num_classes``, ``in_channels``, ``task``,
  ``classes``, ``input`` (the :class:`~kdlab.data.input_spec.InputSpec` as a dict) and
  ``source`` (where the weights came from);
* ``student.preprocess(image)``: the input description's
  :meth:`~kdlab.data.input_spec.InputSpec.preprocess`: a path, Pillow image or uint8 pixels
  in, exactly the tensor the model saw at test time out.

Nothing named inside the files is imported: the plugins a file lists must be trusted by the
caller (``plugins``, ``$KDLAB_PLUGINS``) as for runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from kdlab.config import DetectionConfig, SegmentationConfig
from kdlab.core.errors import CheckpointError, KdlabError
from kdlab.core.io import file_sha256
from kdlab.core.plugins import check_trusted, import_plugins, trusted_plugins
from kdlab.core.weights_file import read_verified
from kdlab.data.input_spec import InputSpec
from kdlab.models import create_model
from kdlab.models.checkpoint import load_state_dict_strict
from kdlab.runs.open import open_run
from kdlab.tasks.detection.model import build_detector
from kdlab.tasks.segmentation.model import build_segmenter

__all__ = [
    "HUB_CONFIG",
    "HUB_KIND",
    "HUB_WEIGHTS",
    "STUDENT_KIND",
    "attach_input",
    "is_hub_folder",
    "load_trained_student",
    "read_hub_folder",
    "read_student_file",
]

#: ``kind`` of the student-only weights file (``kdlab export --format state_dict``).
STUDENT_KIND = "kdlab-student"
#: ``kind`` in a hub folder's ``config.json``.
HUB_KIND = "kdlab-hub"
HUB_CONFIG = "config.json"
HUB_WEIGHTS = "model.safetensors"
#: the keys of ``student.kdlab_meta`` taken from a file's metadata.
_META_KEYS = ("arch", "num_classes", "in_channels", "input_size", "task", "plugins", "source",
              "teacher", "method", "metrics", "kdlab_version", "segmentation")


def attach_input(model: nn.Module, meta: dict[str, Any], spec: InputSpec | None) -> nn.Module:
    """Set ``model.kdlab_meta`` (``meta`` with ``classes`` and ``input`` from ``spec``) and
    ``model.preprocess`` (``spec.preprocess``; without a spec it raises a one-line error
    naming what is missing). Returns ``model``."""
    meta = {k: meta[k] for k in _META_KEYS if k in meta}
    meta["classes"] = None if spec is None else list(spec.classes)
    meta["input"] = None if spec is None else spec.to_dict()
    model.kdlab_meta = meta
    model.preprocess = spec.preprocess if spec is not None else _no_preprocessing
    return model


def _no_preprocessing(image: Any) -> torch.Tensor:
    raise KdlabError("this student records no input description (made by kdlab 0.3 or "
                     "earlier); re-export it from its run, or normalise the image yourself")


def _spec_of(meta: dict[str, Any], where: str) -> InputSpec | None:
    recorded = meta.get("input_spec")
    if not isinstance(recorded, dict) or "kind" not in recorded:
        return None
    try:
        return InputSpec.from_dict(recorded)
    except KdlabError as e:
        raise CheckpointError(f"{where}: {e}") from e


def _build(meta: dict[str, Any], state: dict[str, Any], where: str,
           plugins: Sequence[str]) -> nn.Module:
    """``create_model(arch, num_classes, in_channels)`` (a detector: ``build_detector(arch,
    num_classes, DetectionConfig(**detection))``; a segmenter: ``build_segmenter(arch,
    num_classes, SegmentationConfig(**segmentation), in_channels)``) with ``state`` loaded
    strictly, after the
    file's plugins are checked against the trusted ones."""
    named = meta.get("plugins") or []
    if not isinstance(named, list) or not all(isinstance(p, str) for p in named):
        raise CheckpointError(f"{where}: 'plugins' must be a list of plugin specs, found a "
                              f"{type(named).__name__}")
    trusted = trusted_plugins(plugins)
    check_trusted(named, trusted, where)
    import_plugins(trusted)
    try:
        if meta.get("task") == "detection":
            model: nn.Module = build_detector(str(meta["arch"]), int(meta["num_classes"]),
                                              DetectionConfig(**meta["detection"]))
        elif meta.get("task") == "segmentation":
            model = build_segmenter(str(meta["arch"]), int(meta["num_classes"]),
                                    SegmentationConfig(**meta["segmentation"]),
                                    int(meta["in_channels"]))
        else:
            model = create_model(str(meta["arch"]), num_classes=int(meta["num_classes"]),
                                 in_channels=int(meta["in_channels"]))
    except (KeyError, TypeError, ValueError, ValidationError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: metadata unusable ({first}); export it again") from e
    load_state_dict_strict(model, state, where)
    return model.eval()


def read_student_file(path: str | Path, plugins: Sequence[str] = ()) -> nn.Module:
    """The student of a ``kdlab export --format state_dict`` file, with its input attached.

    Raises :class:`CheckpointError` for a file that is not a kdlab student file or whose
    weights do not fit, :class:`~kdlab.core.errors.PluginError` for an untrusted plugin."""
    path = Path(path)
    obj = read_verified(path)
    if obj.get("kind") != STUDENT_KIND:
        raise CheckpointError(f"{path} is not a kdlab student file (kind {obj.get('kind')!r}); "
                              "make one with `kdlab export RUN --format state_dict`")
    where = f"student file {path}"
    model = _build(obj, obj["model"], where, plugins)
    return attach_input(model, obj, _spec_of(obj, where))


def is_hub_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a hub ``config.json``."""
    return (Path(path) / HUB_CONFIG).is_file()


def _read_hub_config(folder: Path) -> dict[str, Any]:
    cfg_path = folder / HUB_CONFIG
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable ({e})") from e
    if not isinstance(config, dict) or config.get("kind") != HUB_KIND:
        raise CheckpointError(f"{cfg_path} is not a kdlab hub config (kind "
                              f"{config.get('kind') if isinstance(config, dict) else None!r}); "
                              "make one with `kdlab export RUN --format hub`")
    return config


def read_hub_folder(folder: str | Path, plugins: Sequence[str] = ()) -> nn.Module:
    """The student of a hub folder (``config.json`` + ``model.safetensors``), with its input
    attached. The weights' sha256 is checked against ``config.json``'s ``files`` entry.

    Raises :class:`CheckpointError` (one line) for a missing, changed or non-fitting file,
    :class:`KdlabError` when safetensors is not installed."""
    folder = Path(folder)
    config = _read_hub_config(folder)
    weights = folder / HUB_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"hub folder {folder} has no {HUB_WEIGHTS}")
    expected = (config.get("files") or {}).get(HUB_WEIGHTS, {}).get("sha256")
    if expected and file_sha256(weights) != expected:
        raise CheckpointError(f"{weights} changed since it was exported (sha256 differs from "
                              f"{HUB_CONFIG}); export it again")
    try:
        from safetensors.torch import load_file  # optional dependency: safetensors
    except ImportError as e:
        raise KdlabError("reading a hub folder needs safetensors: pip install -e '.[export]' "
                         "in the kdlab clone") from e
    try:
        state = load_file(str(weights), device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from e
    where = f"hub folder {folder}"
    model = _build(config, state, where, plugins)
    return attach_input(model, config, _spec_of(config, where))


def _read_run(run_dir: Path, checkpoint: str, plugins: Sequence[str]) -> nn.Module:
    run = open_run(run_dir, plugins=list(plugins))
    model, state, path = run.student_and_record(checkpoint)
    meta = {"arch": run.cfg.student.arch, "num_classes": state.get("num_classes"),
            "in_channels": state.get("in_channels"), "task": run.cfg.task,
            "plugins": list(run.cfg.plugins),
            "source": {"run_dir": str(run.path), "checkpoint": str(path),
                       "epoch": state.get("epoch")}}
    return attach_input(model, meta, run.input_spec(state))


def load_trained_student(source: str | Path, checkpoint: str = "best", device: str = "cpu",
                         plugins: Sequence[str] = ()) -> nn.Module:
    """The student of ``source`` (a run directory, a hub folder or a student weights file) in
    eval mode on ``device``, with ``kdlab_meta`` and ``preprocess`` (see the module
    docstring). ``checkpoint`` applies to runs only ("best", "last" or a weights file of the
    run)."""
    path = Path(source)
    if path.is_dir() and is_hub_folder(path):
        model = read_hub_folder(path, plugins)
    elif path.is_file():
        model = read_student_file(path, plugins)
    else:
        model = _read_run(path, checkpoint, plugins)
    return model.to(torch.device(device))
