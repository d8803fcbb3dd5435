"""What makes two runs the same experiment, and how a report names what it shows.

* :func:`experiment_fingerprint`: the group key of a report row. Two finished runs are seeds of
  one experiment exactly when their stored configs agree in everything the run's fingerprint
  (:func:`kdlab.config.fingerprint_dict`) covers except the ``seed`` (and a ``seed<N>`` part of
  the config ``name``). :meth:`kdlab.config.ExperimentConfig.fingerprint` itself is unchanged:
  it includes the seed, since a run directory holds one seed.
* :func:`config_variants`: what tells apart experiments that would otherwise be shown alike (the
  config keys in which they differ).
* :func:`dataset_id` / :func:`dataset_labels`: a class-folder dataset (``data.name: folder``) is
  named by its folder, ``folder:<last component of data.root>`` (the whole root where two roots
  share a last component).
* :func:`referenced_runs`: which runs trained alone are the teacher of a distillation run (its
  ``teacher.checkpoint`` lies in the run directory, or ``teacher.json``'s sha256 is that of one
  of the run's checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from kdlab.config import fingerprint_dict, validate_config
from kdlab.core.errors import KdlabError
from kdlab.core.io import file_sha256
from kdlab.runs.rundir import UNSET, flatten_config, show_config_value

__all__ = [
    "MAX_SHOWN_KEYS", "TeacherRef", "config_variants", "dataset_id", "dataset_labels",
    "experiment_dict", "experiment_fingerprint", "referenced_runs", "resolved_config",
    "strip_seed",
]

log = logging.getLogger(__name__)

_SEED_PART = re.compile(r"^seed[_-]?\d+$")
_SEED_SUFFIX = re.compile(r"[_.-]seed[_-]?\d+$")
#: differing keys a variant label names before it falls back to "+N more keys, config <sha8>"
MAX_SHOWN_KEYS = 3
#: the checkpoints of a run directory that a distillation run may use as its teacher
_WEIGHT_FILES = ("checkpoints/best.pt", "checkpoints/last.pt")


def strip_seed(name: str) -> str:
    """A config name without its seed part (``kd/r32x4_r8x4/seed1`` -> ``kd/r32x4_r8x4``)."""
    parts = [_SEED_SUFFIX.sub("", p) for p in name.split("/") if not _SEED_PART.match(p)]
    return "/".join(p for p in parts if p)


def resolved_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The run's config as the trainer resolved it: ``raw`` (a stored ``config.yaml``) validated
    by :func:`kdlab.config.validate_config` (defaults filled in), or ``raw`` itself when it does
    not validate (an older or plugin-extended config; logged). ``{}`` stays ``{}``."""
    if not raw:
        return {}
    try:
        return validate_config(dict(raw), source).to_dict()
    except KdlabError as e:
        log.info("report: %s does not validate (%s); grouped by its keys as stored", source, e)
        return dict(raw)


def experiment_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint's canonical form of a resolved config (:func:`fingerprint_dict`) without
    ``seed`` and with the config ``name``'s seed part removed: what seeds of one experiment
    share. A stored config too malformed for the canonical form is taken as it is."""
    try:
        d = fingerprint_dict(dict(config))
    except (AttributeError, TypeError):  # e.g. a section that is not a mapping
        d = dict(config)
    d.pop("seed", None)
    if isinstance(d.get("name"), str):
        d["name"] = strip_seed(d["name"])
    return d


def experiment_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of :func:`experiment_dict` (``""`` for a run without a stored config): equal for
    exactly the runs that are seeds of one experiment."""
    if not config:
        return ""
    text = json.dumps(experiment_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def config_variants(configs: Sequence[Mapping[str, Any]], fingerprints: Sequence[str]
                    ) -> list[str]:
    """One label per config telling it apart from the others: ``key=value`` of every dotted key
    (of :func:`experiment_dict`) in which any two of them differ, in config order, e.g.
    ``optim.epochs=2``. More than :data:`MAX_SHOWN_KEYS` keys (or none: configs that agree) give
    the first keys, ``+N more`` and ``config <first 8 of the fingerprint>``, which is unique."""
    flats = [flatten_config(experiment_dict(c)) if c else {} for c in configs]
    keys = [k for k in dict.fromkeys(k for f in flats for k in f)
            if len({show_config_value(f.get(k, UNSET)) for f in flats}) > 1]
    out = []
    for flat, fp in zip(flats, fingerprints, strict=True):
        shown = [f"{k}={show_config_value(flat.get(k, UNSET))}" for k in keys[:MAX_SHOWN_KEYS]]
        if not keys or len(keys) > MAX_SHOWN_KEYS:
            shown = shown[:MAX_SHOWN_KEYS - 1]
            more = len(keys) - len(shown)
            shown += [f"+{more} more"] if more else []
            shown.append(f"config {fp[:8] or 'unknown'}")
        out.append(", ".join(shown))
    return out


def dataset_id(config: Mapping[str, Any], summary_dataset: str | None) -> str | None:
    """What identifies a run's dataset: ``folder:<data.root>`` (normalised) for a class-folder
    dataset, else the summary's ``dataset`` (detection: ``coco:<folder>``), else ``data.name``."""
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    root = data.get("root") if data.get("name") == "folder" else None
    if isinstance(root, str) and root:
        return "folder:" + os.path.normpath(root)
    return summary_dataset or data.get("name")


def dataset_labels(ids: Iterable[str | None]) -> dict[str | None, str | None]:
    """The shown name of each dataset id: a folder dataset is ``folder:<last component of its
    root>``, or ``folder:<root>`` when another root of the report has the same last component;
    every other id is shown as it is."""
    ids = list(ids)
    folders = sorted({i for i in ids if i and i.startswith("folder:")})
    names: dict[str, list[str]] = {}
    for i in folders:
        names.setdefault(PurePath(i[len("folder:"):]).name, []).append(i)
    labels: dict[str | None, str | None] = {i: i for i in ids}
    for name, members in names.items():
        for i in members:
            labels[i] = f"folder:{name}" if name and len(members) == 1 else i
    return labels


@dataclass(frozen=True)
class TeacherRef:
    """The teacher a distillation run used: its architecture, checkpoint path (as written in the
    config, relative paths from the current directory) and sha256 (``teacher.json``)."""

    arch: str | None
    checkpoint: str | None
    sha256: str | None


def _inside(checkpoint: str, resolved: Sequence[tuple[Path, Path]]) -> Path | None:
    """The run (of (path, resolved path) pairs) whose directory holds ``checkpoint``."""
    target = Path(checkpoint).expanduser().resolve()
    for path, real in resolved:
        if target.is_relative_to(real):
            return path
    return None


def _weights_sha256(path: Path) -> set[str]:
    out = set()
    for name in _WEIGHT_FILES:
        try:
            out.add(file_sha256(path / name))
        except OSError:
            continue
    return out


def referenced_runs(runs: Sequence[tuple[Path, str | None]], refs: Iterable[TeacherRef]
                    ) -> set[Path]:
    """The run directories of ``runs`` ((path, architecture) of runs trained alone) that one of
    ``refs`` used as its teacher: the reference's checkpoint path lies inside the directory, or
    its sha256 is that of the run's ``checkpoints/best.pt`` or ``last.pt`` (hashed only for runs
    of a referenced architecture whose path did not match)."""
    found: set[Path] = set()
    by_sha: dict[str, set[str | None]] = {}
    # the deepest directory first: a checkpoint belongs to the innermost run holding it
    resolved = sorted(((path, path.resolve()) for path, _ in runs),
                      key=lambda pr: (-len(pr[1].parts), pr[1].as_posix()))
    for ref in refs:
        hit = _inside(ref.checkpoint, resolved) if ref.checkpoint else None
        if hit is not None:
            found.add(hit)
        elif ref.sha256:
            by_sha.setdefault(ref.sha256, set()).add(ref.arch)
    archs = {a for v in by_sha.values() for a in v}
    for path, arch in runs:
        if path in found or arch not in archs:
            continue
        if any(arch in by_sha.get(sha, ()) for sha in _weights_sha256(path)):
            found.add(path)
    return found
