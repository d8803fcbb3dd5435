"""The config reference (``docs/config-reference.md``), generated from the schema.

:func:`config_reference` walks :class:`kdlab.config.schema.ExperimentConfig` and its nested
sections and
lists every key with its type, default, allowed values and description. Allowed values come from
``Literal`` types, from ``Field`` bounds (``ge``, ``gt``, ``le``, ``lt``) and, for names looked
up in a registry (datasets, methods, optimizers, schedules, tasks), from kdlab's built-in
entries. A key's description is its ``Field(description=...)``, else its entry in :data:`NOTES`,
else the ``#:`` comment above it in the schema's source.

``kdlab config reference > docs/config-reference.md`` regenerates the committed file; a test
checks that it is up to date.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from kdlab.config.schema import STREAMED_DATASETS, ExperimentConfig, model_in_annotation
from kdlab.core.registries import DATASETS, METHODS, OPTIMIZERS, SCHEDULES, TASKS

__all__ = ["NOTES", "ConfigKey", "config_keys", "config_reference"]

#: descriptions of the keys that have no ``description`` in the schema and either no ``#:``
#: comment or one that describes a group of keys (dotted keys; ``[]`` stands for the items of a
#: list). Every key here must exist in the schema (tested).
NOTES: dict[str, str] = {
    "detection.test_split": "the COCO-format split evaluated every epoch (COCO mAP)",
    "detection.max_size": "the longer image side's limit after resizing (torchvision's max_size)",
    "detection.image_mean": "RGB mean subtracted by the detector's transform (ImageNet's)",
    "detection.image_std": "RGB std the detector's transform divides by (ImageNet's)",
    "detection.fpn_channels": "width of every FPN level (and of the RPN and RoI pooling)",
    "detection.aspect_ratios": "anchor aspect ratios (height / width), the same at every level",
    "detection.rpn_pre_nms_top_n_train": "RPN proposals kept per level before NMS in training",
    "detection.rpn_pre_nms_top_n_test": "RPN proposals kept per level before NMS in evaluation",
    "detection.rpn_post_nms_top_n_train": "RPN proposals kept per image after NMS in training",
    "detection.rpn_post_nms_top_n_test": "RPN proposals kept per image after NMS in evaluation",
    "detection.rpn_batch_size_per_image": "anchors sampled per image for the RPN's losses",
    "detection.box_positive_fraction": "largest share of foreground RoIs among the sampled ones",
    "detection.box_score_thresh": "detections below this score are dropped in evaluation",
    "detection.box_nms_thresh": "per-class NMS IoU threshold of the final detections",
    "detection.box_detections_per_img": "detections kept per image (COCOeval counts up to 100)",
    "detection.roi_sampling_ratio": "RoIAlign sampling points per bin and axis (<= 0: adaptive)",
    "name": "the run's name; runs go to `output_dir/name/seed<seed>` (`/` makes sub-folders)",
    "seed": "random seed of initialisation, data order and augmentation",
    "output_dir": "the folder runs are written under (relative to the working directory)",
    "data": "the dataset, batch sizes and augmentation",
    "student": "the network being trained (the student, or a teacher trained alone)",
    "teacher": "the teacher of a distillation run (null: no teacher, `kdlab train`)",
    "method": "the distillation method (default `vanilla`: cross-entropy alone)",
    "optim": "optimizer and learning-rate schedule",
    "runtime": "device, precision and speed settings; none changes a method's mathematics",
    "data.root": "folder holding the dataset (null: `$KDLAB_DATA`, then `./data`; "
                 "Fashion-MNIST also Debian's `/usr/share/datasets/fashion-mnist`)",
    "data.download": "download the dataset into `data.root` when it is missing (needs internet)",
    "data.train_fraction": "train on this stratified fraction of the training set",
    "data.subset_seed": "seed of the stratified `train_fraction` subset",
    "data.batch_size": "training batch size (global: split over the processes of a DDP run)",
    "data.eval_batch_size": "batch size of evaluation",
    "data.crop_padding": "small datasets: padding of the random crop (0: no crop)",
    "data.hflip": "random horizontal flips",
    "data.synthetic": "sizes of `data.name: synthetic`",
    "data.synthetic.n_train": "training images",
    "data.synthetic.n_test": "test images",
    "data.synthetic.num_classes": "classes",
    "data.synthetic.size": "image height and width in pixels",
    "data.synthetic.channels": "image channels",
    "data.synthetic.seed": "seed of the class patterns and samples",
    "data.num_workers": "streamed datasets only: decoding worker processes",
    "data.image_size": "streamed datasets only: crop size",
    "data.resize": "streamed datasets only: resize before the crop",
    "data.on_error": "streamed datasets only: an unreadable image is replaced and counted "
                     "(`skip`) or stops the run (`stop`)",
    "student.arch": "a model of the zoo or of a plugin (`kdlab models` lists them)",
    "student.checkpoint": "weights to start from (null: random initialisation)",
    "teacher.arch": "a model of the zoo or of a plugin (`kdlab models` lists them)",
    "teacher.checkpoint": "the teacher's weights (a CRD teacher file or a kdlab checkpoint)",
    "method.name": "a logit method, or a partner alone (`kdlab methods` lists them)",
    "method.params": "the method's hyperparameters (`kdlab methods` lists them with their "
                     "defaults; docs/methods/)",
    "method.partners": "feature/relation partners added to the method, e.g. "
                       "`[{name: fitnet}]`",
    "method.partners[].name": "a partner method (`kdlab methods` lists them)",
    "method.partners[].params": "the partner's hyperparameters",
    "optim.name": "the optimizer",
    "optim.lr": "learning rate (before `lr_scaling`)",
    "optim.weight_decay": "L2 weight decay (adamw: decoupled)",
    "optim.momentum": "sgd, dot: momentum factor (dot: the base momentum of both buffers)",
    "optim.nesterov": "sgd: Nesterov momentum",
    "optim.betas": "adamw: decay rates of the first and second moments",
    "optim.eps": "adamw: the denominator's epsilon",
    "optim.epochs": "training epochs",
    "optim.scheduler": "the learning-rate schedule",
    "optim.gamma": "multistep: the factor applied at each milestone",
    "optim.base_batch_size": "the batch size `lr` is meant for (`lr_scaling`)",
    "runtime.device": "`auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`",
    "runtime.channels_last": "channels-last memory format for images and models",
    "runtime.threads": "torch intra-op threads (null: torch's default)",
    "runtime.max_skipped_steps": "`non_finite: skip`: stop after this many skipped steps",
    "runtime.log_every": "steps between host synchronisations: the progress bar's update (with "
                         "`--no-progress`, a log line) and the non-finite check",
    "runtime.eval_every": "evaluate on the test set every this many epochs (and after the last)",
}

#: allowed values that validators (not types or bounds) enforce.
_RULES: dict[str, str] = {
    "optim.milestones": "positive, increasing",
    "segmentation.crop_size": "an int or [h, w]; each side >= 8",
    "optim.betas": "each in [0, 1)",
    "optim.clip_grad_norm": "> 0, `auto` or null",
    "optim.warmup_epochs": "at most `optim.epochs`",
    "data.root": "required for imagenet, cub200, folder",
    "data.train_fraction": "< 1 only for the in-memory datasets",
}


def _builtin(items: list[tuple[str, Any]]) -> list[str]:
    """Names of registry entries defined by kdlab itself (not by plugins)."""
    def module(obj: Any) -> str:
        return getattr(obj, "__module__", "") or ""

    return sorted(n for n, obj in items if module(obj).split(".")[0] == "kdlab")


def _codes(names: list[str]) -> str:
    return ", ".join(f"`{n}`" for n in names)


def _datasets() -> str:
    return (f"in memory: {_codes(_builtin(DATASETS.items()))}; streamed: "
            f"{_codes(list(STREAMED_DATASETS))}; or a plugin's")


def _methods(kind: str | None) -> Callable[[], str]:
    def names() -> str:
        items = [(n, c) for n, c in METHODS.items() if kind is None or c.kind == kind]
        return f"{_codes(_builtin(items))}; or a plugin's"

    return names


def _optimizers() -> str:
    return f"{_codes(_builtin(OPTIMIZERS.items()))}; or a plugin's"


def _schedules() -> str:
    return f"{_codes(_builtin(SCHEDULES.items()))}; or a plugin's"


def _tasks() -> str:
    return f"{_codes(_builtin(TASKS.items()))}; or a plugin's"


#: keys whose values are names in a registry: the built-in names.
_REGISTRY_CHOICES: dict[str, Callable[[], str]] = {
    "data.name": _datasets,
    "method.name": _methods(None),
    "method.partners[].name": _methods("partner"),
    "optim.name": _optimizers,
    "optim.scheduler": _schedules,
    "task": _tasks,
}


@dataclass(frozen=True)
class ConfigKey:
    """One key of the config schema, as the reference shows it."""

    key: str
    type: str
    default: str
    allowed: str
    description: str
    section: bool


# --------------------------------------------------------------------------- schema walking


def _is_list_of_models(annotation: Any) -> bool:
    return get_origin(annotation) is list and model_in_annotation(annotation) is not None


def _type_text(annotation: Any) -> str:
    """The type in YAML words: ``int``, ``float or null``, ``list of int``, ``mapping``."""
    if annotation is type(None):
        return "null"
    if annotation is Any:
        return "any"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args)
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in args) if len(args) == 1 else "str"
    if origin is list:
        item = args[0] if args else Any
        return "list of mappings" if model_in_annotation(item) else f"list of {_type_text(item)}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_text(args[0])}"
        if args and all(a == args[0] for a in args):
            return f"list of {len(args)} {_type_text(args[0])}"
        return "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return annotation.__name__
    return str(annotation)


def _literals(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return [v for a in get_args(annotation) for v in _literals(a)]
    return []


def _bounds(info: FieldInfo) -> str:
    low = high = ""
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            low = f">= {m.ge}"
        elif isinstance(m, annotated_types.Gt):
            low = f"> {m.gt}"
        elif isinstance(m, annotated_types.Le):
            high = f"<= {m.le}"
        elif isinstance(m, annotated_types.Lt):
            high = f"< {m.lt}"
    return ", ".join(b for b in (low, high) if b)


def _value_text(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, str):
        return f"`{value}`"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _default_text(info: FieldInfo) -> str:
    if info.is_required():
        return "required"
    return _value_text(info.get_default(call_default_factory=True))


def _allowed_text(key: str, info: FieldInfo) -> str:
    parts = []
    if key in _REGISTRY_CHOICES:
        parts.append(_REGISTRY_CHOICES[key]())
    literals = _literals(info.annotation)
    if len(literals) > 1 or (literals and get_origin(info.annotation) is Literal):
        parts.append(_codes([str(v) for v in literals]))
    bounds = _bounds(info)
    if bounds and key not in _RULES:
        parts.append(bounds)
    if key in _RULES:
        parts.append(_RULES[key] if not bounds else f"{bounds}, {_RULES[key]}")
    return "; ".join(parts)


_SPHINX_ROLE = re.compile(r":(?:mod|class|func|meth|data|attr):`~?([^`]+)`")


def _markdown(text: str) -> str:
    """reST inline markup of a comment or docstring as markdown, on one line."""
    text = _SPHINX_ROLE.sub(r"`\1`", text).replace("``", "`")
    return " ".join(text.split())


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """The ``#:`` comment block right above each field in ``model``'s source."""
    try:
        lines = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    field_line = re.compile(r"^    (\w+)\s*:")
    for line in lines[1:]:
        if line.startswith("    #:"):
            pending.append(line[len("    #:"):].strip())
            continue
        if line.startswith("     ") and not line.strip().startswith("#"):
            continue  # a continuation line
        match = field_line.match(line)
        if match and pending and match.group(1) in model.model_fields:
            found[match.group(1)] = " ".join(pending)
        pending = []
    return found


def _docstring(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    return "\n\n".join(_markdown(p) for p in doc.split("\n\n") if p.strip())


def _walk(model: type[BaseModel], prefix: str
          ) -> Iterator[tuple[str, type[BaseModel], list[ConfigKey]]]:
    """``(section key, model, its keys)`` for ``model`` and, depth first, its sections."""
    comments = _comments(model)
    rows: list[ConfigKey] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = model_in_annotation(info.annotation)
        description = info.description or NOTES.get(key) or comments.get(name, "")
        rows.append(ConfigKey(key=key, type=_type_text(info.annotation),
                              default=_default_text(info), allowed=_allowed_text(key, info),
                              description=_markdown(description), section=sub is not None))
        if sub is not None:
            nested.append((f"{key}[]" if _is_list_of_models(info.annotation) else key, sub))
    yield prefix.rstrip("."), model, rows
    for key, sub in nested:
        yield from _walk(sub, f"{key}.")


def config_keys() -> list[ConfigKey]:
    """Every key of :class:`ExperimentConfig`, sections included, in schema order."""
    return [row for _, _, rows in _walk(ExperimentConfig, "") for row in rows]


# --------------------------------------------------------------------------- markdown
def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    """The config reference as markdown (the content of ``docs/config-reference.md``)."""
    out = [
        "# Config reference",
        "",
        "<!-- Generated from the schema (kdlab.config.schema.ExperimentConfig). Do not edit: run "
        "`kdlab config reference > docs/config-reference.md`. -->",
        "",
        "Every key of an experiment config, generated from the schema "
        "(`kdlab.config.schema.ExperimentConfig`) by `kdlab config reference`. A key is written in "
        "the "
        "YAML file as nested mappings (`optim: {lr: 0.1}`) or on the command line as a dotted "
        "key (`--set optim.lr=0.1`). An unknown key or a value outside the allowed ones stops "
        "the run with a one-line error. How config files inherit from each other, and the "
        "configs shipped with kdlab: [configs.md](configs.md). A method's own "
        "hyperparameters (`method.params`) are listed by `kdlab methods` and described in "
        "[methods/](methods/).",
        "",
    ]
    for section, model, rows in _walk(ExperimentConfig, ""):
        out.append(f"## `{section}`" if section else "## Top level")
        out.append("")
        doc = _docstring(model)
        if doc:
            out += [doc, ""]
        out += ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for r in rows:
            default = "see below" if r.section and r.default == "(section)" else r.default
            out.append(f"| `{r.key}` | {_cell(r.type)} | {_cell(default)} | "
                       f"{_cell(r.allowed)} | {_cell(r.description)} |")
        out.append("")
    return "\n".join(out)
