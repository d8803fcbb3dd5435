"""Find run directories and aggregate finished runs over seeds.

A run directory (see :mod:`kdlab.runs.rundir`) is finished when it has ``summary.json``; every
other run directory (``config.yaml`` but no summary) is *unfinished*: running, stopped, failed or
killed. Unfinished runs are listed separately and never mixed into the numbers.

Finished runs are grouped by experiment: runs are seeds of one experiment exactly when their stored
configs (``config.yaml``, validated) agree in everything the config fingerprint covers except the
seed (:func:`kdlab.runs.identity.experiment_fingerprint`), and their task, dataset, teacher
checkpoint, student, method display name, config name and data agree. Runs with differing configs
never share a row: rows that would look alike get a ``variant`` naming the config keys they differ
in. A seed found in several run directories of one experiment counts once (its newest finished
run) and the row is flagged (``duplicates``). Each group has a headline metric given by its task
(:data:`TASK_METRICS`): top-1 (and top-5) for classification, COCO box AP (and AP50, AP75) for
detection. Each group gets mean +- sample std (0 for one seed) of

* ``best``: the best test value of the metric over the epochs (chosen on the test set);
* ``last``: its test value at the final epoch;
* with a validation set (``data.val_fraction`` > 0): ``test_<metric>_at_best``, the test value
  at the epoch chosen on validation, and ``best_val_<metric>``, the validation value there;

(and the secondary metrics likewise where measured), the teacher's value (``teacher.json``), and
the published number with our difference to it when the paper has the cell.

Each group has a ``role``: ``distilled`` (a method with a teacher), ``teacher`` (trained alone,
and the teacher of a distillation run of the report: :func:`kdlab.runs.identity.referenced_runs`),
``student alone`` (trained alone with the architecture, dataset and data of a distilled student of
the report, or a ``vanilla`` run that names a teacher) or ``trained alone`` (anything else).

Two runs whose teachers have the same architecture but different checkpoints (the sha256 in
``teacher.json``, else the checkpoint path) are different experiments: they get different rows
and charts, and the teacher is labelled with the first 8 characters of its sha256 (or its file
name) wherever the architecture alone would be ambiguous.
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlab.config import ExperimentConfig
from kdlab.core.registries import TASKS
from kdlab.report.paper import PaperTable, paper_method
from kdlab.runs.identity import (
    TeacherRef,
    config_variants,
    dataset_id,
    dataset_labels,
    experiment_fingerprint,
    referenced_runs,
    resolved_config,
    strip_seed,
)
from kdlab.runs.rundir import RunDir, find_run_dirs

__all__ = [
    "ChartKey", "DEFAULT_TASK", "DUPLICATE_MARK", "Group", "MetricSpec", "ROLES", "ROLE_ALONE",
    "ROLE_DISTILLED", "ROLE_STUDENT", "ROLE_TEACHER", "RunRecord", "ScanResult", "TASK_METRICS",
    "UnfinishedRun", "aggregate", "chart_groups", "data_label", "duplicates_text", "group_runs",
    "mean_std", "metric_spec", "newest_time", "scan_runs", "short_teacher_id", "strip_seed",
]

log = logging.getLogger(__name__)

#: a group's role (:attr:`Group.role`): distilled from a teacher, the teacher of a distilled run
#: of the report, a distilled student trained alone (its baseline), or another run trained alone
ROLE_DISTILLED, ROLE_TEACHER = "distilled", "teacher"
ROLE_STUDENT, ROLE_ALONE = "student alone", "trained alone"
ROLES = (ROLE_DISTILLED, ROLE_TEACHER, ROLE_STUDENT, ROLE_ALONE)
#: the mark of a row with a duplicated seed (next to its seed count)
DUPLICATE_MARK = "†"
#: the config name's first segment left out of a label when it only repeats the role
_ROLE_WORDS = {ROLE_STUDENT: frozenset({"student", "vanilla", "baseline"}),
               ROLE_TEACHER: frozenset({"teacher", "teachers"})}


@dataclass(frozen=True)
class MetricSpec:
    """The headline metrics of one task: what a report row shows and how it is labelled.

    ``primary`` is the metric the best epoch is chosen on and the one compared with the paper;
    ``secondary`` and ``extra`` get the same best-on-test / last-epoch / at-best-val columns.
    The keys are the metric names of ``summary.json`` (``best_<key>``, ``last_<key>``,
    ``test_<key>_at_best``, ``best_val_<key>``), of ``metrics.jsonl`` (``test_<key>``,
    ``val_<key>``) and of ``teacher.json``.
    """

    task: str
    primary: str
    primary_label: str
    secondary: str
    secondary_label: str
    #: further (key, label) metrics shown like the secondary one
    extra: tuple[tuple[str, str], ...] = ()
    #: what a table of this task says about its metrics (None: nothing to add)
    note: str | None = None

    @property
    def others(self) -> tuple[tuple[str, str], ...]:
        """The (key, label) of the secondary and extra metrics, in column order."""
        return ((self.secondary, self.secondary_label), *self.extra)

    @property
    def stats(self) -> tuple[str, ...]:
        """The summary statistics aggregated over seeds (mean, std, n each)."""
        p = self.primary
        out = [f"best_{p}", f"last_{p}"]
        for key, _ in self.others:
            out += [f"best_{key}", f"last_{key}"]
        out += [f"test_{p}_at_best", f"best_val_{p}"]
        out += [f"test_{key}_at_best" for key, _ in self.others]
        return tuple(out)


#: the task of a run that names none (runs made before tasks existed): the config's default
DEFAULT_TASK: str = ExperimentConfig.model_fields["task"].default
_WARNED_TASKS: set[str] = set()


@functools.cache
def _spec_of(task: type[Any]) -> MetricSpec:
    """A task class's headline metrics, read from its declarations (``report_metrics``,
    ``metrics``' labels, ``metric_note``: :class:`kdlab.tasks.base.Task`)."""
    labels = {m.name: m.label for m in task.metrics}
    primary, secondary, *extra = task.report_metrics
    return MetricSpec(task.name, primary, labels.get(primary, primary), secondary,
                      labels.get(secondary, secondary),
                      tuple((key, labels.get(key, key)) for key in extra), task.metric_note)


class _TaskMetricSpecs(Mapping[str, MetricSpec]):
    """The :class:`MetricSpec` of every registered task, by task name (built from the task
    registry at each lookup, so a plugin's task is found too)."""

    def __getitem__(self, name: str) -> MetricSpec:
        if name not in TASKS:
            raise KeyError(name)
        return _spec_of(TASKS.get(name))

    def __iter__(self) -> Iterator[str]:
        return iter(TASKS.names())

    def __len__(self) -> int:
        return len(TASKS.names())


#: the headline metrics of each registered task (a task not registered is reported like the
#: default task, with a warning)
TASK_METRICS: Mapping[str, MetricSpec] = _TaskMetricSpecs()


def metric_spec(task: str | None) -> MetricSpec:
    """The :class:`MetricSpec` of ``task``; an unknown task gets the default task's (logged
    once)."""
    name = task or DEFAULT_TASK
    spec = TASK_METRICS.get(name)
    if spec is None:
        if name not in _WARNED_TASKS:
            _WARNED_TASKS.add(name)
            log.warning("report: unknown task %r, reported with classification's top-1", name)
        return TASK_METRICS[DEFAULT_TASK]
    return spec


@dataclass
class RunRecord:
    """One finished run as read from its directory.

    ``config`` is the stored ``config.yaml`` as written; ``resolved`` the same validated (defaults
    filled in, :func:`kdlab.runs.identity.resolved_config`) and ``experiment`` its fingerprint
    without the seed (:func:`kdlab.runs.identity.experiment_fingerprint`; ``""`` without a
    stored config): filled in by :func:`scan_runs`, else computed from ``config``.
    """

    path: Path
    rel: str
    summary: dict[str, Any]
    config: dict[str, Any]
    teacher: dict[str, Any] | None
    metrics: list[dict[str, Any]]
    finished_time: float | None
    resolved: dict[str, Any] | None = None
    experiment: str | None = None

    def __post_init__(self) -> None:
        if self.resolved is None:
            self.resolved = resolved_config(self.config, str(self.path / "config.yaml"))
        if self.experiment is None:
            self.experiment = experiment_fingerprint(self.resolved)

    @property
    def dataset(self) -> str | None:
        """The dataset's identity (:func:`kdlab.runs.identity.dataset_id`): ``folder:<root>``
        for a class folder, else the summary's ``dataset``, else ``data.name``."""
        return dataset_id(self.config, self.summary.get("dataset"))

    @property
    def teacher_ref(self) -> TeacherRef | None:
        """The teacher the run used (architecture, checkpoint path, sha256); None without one."""
        if self.teacher_arch is None:
            return None
        tcfg = self.config.get("teacher")
        ckpt = tcfg.get("checkpoint") if isinstance(tcfg, dict) else None
        info = self.teacher or {}
        ckpt = ckpt or info.get("checkpoint")
        sha = info.get("sha256")
        return TeacherRef(self.teacher_arch, str(ckpt) if ckpt else None,
                          str(sha) if sha else None)

    @property
    def task(self) -> str:
        """The run's task (``summary.json``, else ``config.yaml``; runs before tasks existed
        are classification)."""
        return str(self.summary.get("task") or self.config.get("task") or DEFAULT_TASK)

    @property
    def teacher_arch(self) -> str | None:
        t = self.summary.get("teacher")
        if t is None and isinstance(self.config.get("teacher"), dict):
            t = self.config["teacher"].get("arch")
        return t

    @property
    def teacher_id(self) -> str | None:
        """What tells two teachers of the same architecture apart: the checkpoint's sha256
        (``teacher.json``), else its path (``config.yaml``); None without a teacher."""
        if self.teacher_arch is None:
            return None
        if self.teacher and self.teacher.get("sha256"):
            return str(self.teacher["sha256"])
        tcfg = self.config.get("teacher")
        ckpt = tcfg.get("checkpoint") if isinstance(tcfg, dict) else None
        if not ckpt and self.teacher:
            ckpt = self.teacher.get("checkpoint")
        return f"path:{ckpt}" if ckpt else None

    @property
    def data_key(self) -> tuple[float, float, int | None]:
        """``(train_fraction, val_fraction, subset_seed)`` of the run's data (the seed only when
        it chooses images): runs compared in one chart must have seen the same images."""
        data = self.config.get("data") or {}
        tf = float(data.get("train_fraction", 1.0) or 1.0)
        vf = float(data.get("val_fraction", 0.0) or 0.0)
        seed = int(data.get("subset_seed", 0) or 0) if (tf < 1.0 or vf > 0.0) else None
        return tf, vf, seed

    @property
    def has_val(self) -> bool:
        """Whether the run chose its best epoch on a validation set."""
        return any(k.startswith("best_val_") for k in self.summary)

    @property
    def student_arch(self) -> str | None:
        return self.summary.get("student") or (self.config.get("student") or {}).get("arch")

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or "unknown")

    @property
    def name(self) -> str:
        return strip_seed(str(self.summary.get("name") or self.config.get("name") or ""))

    @property
    def seed(self) -> int | None:
        seed = self.summary.get("seed", self.config.get("seed"))
        return None if seed is None else int(seed)

    @property
    def teacher_top1(self) -> float | None:
        return self.teacher_metric("top1")

    def teacher_metric(self, key: str) -> float | None:
        """The teacher's ``key`` (e.g. ``top1``, ``AP``): ``teacher.json``, else the summary's
        ``teacher_<key>``; None when unknown."""
        if self.teacher and self.teacher.get(key) is not None:
            return _number(self.teacher[key])
        return _number(self.summary.get(f"teacher_{key}"))

    def metric(self, key: str) -> float | None:
        """A summary number; missing, NaN or negative (never evaluated) gives None."""
        return _number(self.summary.get(key))

    def curve(self, key: str = "test_top1") -> list[tuple[int, float]]:
        """(epoch, value) of every evaluated epoch, from ``metrics.jsonl``."""
        points = {}
        for r in self.metrics:
            v = _number(r.get(key))
            if v is not None and isinstance(r.get("epoch"), int):
                points[int(r["epoch"])] = v
        return sorted(points.items())


@dataclass
class UnfinishedRun:
    """A run directory without ``summary.json`` (or one that cannot be read)."""

    rel: str
    state: str
    epoch: int | None = None
    error: str | None = None


@dataclass
class Group:
    """The runs of one table row (the seeds of one experiment) and their statistics.

    ``runs`` holds one run per seed, sorted by seed; ``duplicates`` the runs of each seed found
    in several run directories (the one in ``runs`` first), which the statistics count once.
    """

    dataset: str | None
    teacher: str | None
    student: str | None
    method: str
    name: str
    runs: list[RunRecord] = field(default_factory=list)
    row: dict[str, Any] = field(default_factory=dict)
    #: the teacher checkpoint's identity (:attr:`RunRecord.teacher_id`) and the data key
    teacher_id: str | None = None
    data_key: tuple[float, float, int | None] = (1.0, 0.0, None)
    #: the teacher as shown: the architecture, plus ``@<sha256[:8]>`` when ambiguous
    teacher_label: str | None = None
    #: the runs' task (part of the group key): it names the headline metric
    task: str = DEFAULT_TASK
    #: the config fingerprint without the seed (part of the group key) and the resolved config
    experiment: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: the dataset's identity (``folder:<root>``); ``dataset`` is its shown name
    dataset_id: str | None = None
    #: the config keys that tell this row from rows that look the same, e.g. ``optim.epochs=2``
    variant: str | None = None
    #: one of :data:`ROLES`
    role: str = ROLE_DISTILLED
    duplicates: list[list[RunRecord]] = field(default_factory=list)

    @property
    def spec(self) -> MetricSpec:
        """The headline metrics of the group's task."""
        return metric_spec(self.task)

    @property
    def pair(self) -> tuple[str, str, str]:
        """(dataset, teacher label, student) with ``none`` for missing parts (chart titles)."""
        return (self.dataset or "none", self.teacher_label or self.teacher or "none",
                self.student or "none")

    @property
    def is_baseline(self) -> bool:
        """The student trained alone (``vanilla``: no distillation)."""
        return self.method == "vanilla"

    @property
    def has_val(self) -> bool:
        """Whether every run of the group chose its best epoch on validation."""
        return bool(self.runs) and all(r.has_val for r in self.runs)

    def label_as(self, role: str, full: bool = False) -> str:
        """The group's label when shown in ``role``: the method (a distilled run) or the role,
        then the config name's first segment where it says more (``full``: the whole name),
        then the variant (``kd (kd_t2), optim.epochs=2``)."""
        what = self.method if role == ROLE_DISTILLED else role
        if full:
            text = what if self.name in ("", self.method) else f"{what} [{self.name}]"
        else:
            first = self.name.split("/", 1)[0]
            if first in _ROLE_WORDS.get(role, ()):
                first = ""
            text = what if first in ("", self.method) else f"{what} ({first})"
        return f"{text}, {self.variant}" if self.variant else text

    @property
    def label(self) -> str:
        """Short plot label (:meth:`label_as` of the group's role)."""
        return self.label_as(self.role)

    @property
    def full_label(self) -> str:
        """Unambiguous label: the method or role, the whole config name and the variant."""
        return self.label_as(self.role, full=True)


@dataclass
class ScanResult:
    """What :func:`scan_runs` found under a folder."""

    finished: list[RunRecord]
    unfinished: list[UnfinishedRun]


# --------------------------------------------------------------------------- helpers
def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0 else None


def data_label(key: tuple[float, float, int | None]) -> str:
    """A short text for a data key: ``""`` for the full training set without validation, else
    e.g. ``train 5%, val 10%, subset seed 0``."""
    tf, vf, seed = key
    parts = []
    if tf < 1.0:
        parts.append(f"train {100 * tf:g}%")
    if vf > 0.0:
        parts.append(f"val {100 * vf:g}%")
    if parts and seed is not None and seed != 0:
        parts.append(f"subset seed {seed}")
    return ", ".join(parts)


def short_teacher_id(teacher_id: str | None) -> str:
    """8 hex characters of a sha256, or the file name of a ``path:`` id."""
    if not teacher_id:
        return "?"
    if teacher_id.startswith("path:"):
        return Path(teacher_id[5:]).name or teacher_id[5:]
    return teacher_id[:8]


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (0 for one value) and count of the known values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


# --------------------------------------------------------------------------- scanning
def scan_runs(runs_dir: str | Path) -> ScanResult:
    """Read every run under ``runs_dir``: finished runs fully, unfinished ones by status."""
    root = Path(runs_dir)
    finished: list[RunRecord] = []
    unfinished: list[UnfinishedRun] = []
    for run in find_run_dirs(root):
        rel = run.relative_to(root).as_posix() if run != root else "."
        rd = RunDir(run)
        status = rd.read_status()
        if not rd.is_finished():
            unfinished.append(UnfinishedRun(rel, str(status.get("state", "unknown")),
                                            status.get("epoch"), status.get("error")))
            continue
        try:
            summary = rd.read_summary()
            config = rd.load_config_dict() if rd.exists() else {}
            teacher = rd.read_teacher()
        except (OSError, ValueError, yaml.YAMLError) as e:
            log.warning("cannot read run %s: %s", run, e)
            unfinished.append(UnfinishedRun(rel, "unreadable", error=str(e)))
            continue
        when = status.get("time") if status.get("state") == "finished" else None
        if not isinstance(when, int | float):
            when = rd.summary_path.stat().st_mtime
        finished.append(RunRecord(run, rel, summary, config, teacher, rd.read_metrics(),
                                  float(when)))
    return ScanResult(finished, unfinished)


# --------------------------------------------------------------------------- aggregation
def _group_key(r: RunRecord) -> tuple[Any, ...]:
    return (r.dataset or "", r.teacher_arch or "", r.teacher_id or "", r.student_arch or "",
            r.method, r.name, tuple(-1 if v is None else v for v in r.data_key), r.task,
            r.experiment or "")


def _one_per_seed(runs: Sequence[RunRecord]) -> tuple[list[RunRecord], list[list[RunRecord]]]:
    """(one run per seed, sorted by seed; the runs of each seed found more than once, the kept
    one first). The kept run is the newest finished one (ties: the first by path)."""
    by_seed: dict[int | None, list[RunRecord]] = {}
    for r in runs:
        by_seed.setdefault(r.seed, []).append(r)
    kept, duplicates = [], []
    for seed in sorted(by_seed, key=lambda s: -1 if s is None else s):
        members = sorted(by_seed[seed], key=lambda r: (-(r.finished_time or 0.0), r.rel))
        kept.append(members[0])
        if len(members) > 1:
            duplicates.append(members)
    return kept, duplicates


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    """Group runs over seeds: one group per experiment (the key: dataset, teacher, teacher
    checkpoint, student, method, name, data, task and the config fingerprint without the seed).

    Sets each group's shown ``dataset`` and ``teacher_label``, its ``variant`` (where groups
    would look alike), its ``role`` and ``duplicates`` (:func:`_one_per_seed`); groups are
    sorted by (shown dataset, teacher, teacher checkpoint, student, method, name, data, task,
    variant). Runs of different tasks or configs are never grouped together.
    """
    groups: dict[tuple[Any, ...], Group] = {}
    for r in runs:
        key = _group_key(r)
        if key not in groups:
            groups[key] = Group(r.dataset, r.teacher_arch, r.student_arch, r.method, r.name,
                                teacher_id=r.teacher_id, data_key=r.data_key, task=r.task,
                                experiment=r.experiment or "", config=dict(r.resolved or {}),
                                dataset_id=r.dataset)
        groups[key].runs.append(r)
    out = list(groups.values())
    for g in out:
        g.runs, g.duplicates = _one_per_seed(g.runs)
    labels = dataset_labels(g.dataset_id for g in out)
    for g in out:
        g.dataset = labels[g.dataset_id]
    _label_teachers(out)
    _label_variants(out)
    _assign_roles(out)
    return sorted(out, key=lambda g: (g.dataset or "", *_group_key(g.runs[0])[1:-1],
                                      g.variant or ""))


def _label_teachers(groups: Sequence[Group]) -> None:
    """``teacher_label``: the architecture, plus ``@<sha8>`` where one architecture has several
    checkpoints in the groups of one task and dataset."""
    ids: dict[tuple[str, str, str], set[str | None]] = {}
    for g in groups:
        if g.teacher:
            ids.setdefault((g.task, g.dataset or "", g.teacher), set()).add(g.teacher_id)
    for g in groups:
        ambiguous = g.teacher and len(ids[(g.task, g.dataset or "", g.teacher)]) > 1
        g.teacher_label = (f"{g.teacher}@{short_teacher_id(g.teacher_id)}" if ambiguous
                           else g.teacher)


def _label_variants(groups: Sequence[Group]) -> None:
    """``variant`` of the groups that would be shown alike (same task, dataset, teacher label,
    student, method, name and data) but hold different configs."""
    alike: dict[tuple[Any, ...], list[Group]] = {}
    for g in groups:
        shown = (g.task, g.dataset, g.teacher_label, g.student, g.method, g.name, g.data_key)
        alike.setdefault(shown, []).append(g)
    for members in alike.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda g: g.experiment)
        variants = config_variants([g.config for g in members], [g.experiment for g in members])
        for g, variant in zip(members, variants, strict=True):
            g.variant = variant


def _assign_roles(groups: Sequence[Group]) -> None:
    """Each group's ``role`` (:data:`ROLES`; the rule is in the module docstring)."""
    distilled = [g for g in groups if g.teacher and not g.is_baseline]
    students = {(g.task, g.dataset_id, g.student, g.data_key) for g in distilled}
    alone = [g for g in groups if not g.teacher]
    refs = [ref for g in distilled for r in _all_runs(g) if (ref := r.teacher_ref) is not None]
    teachers = referenced_runs([(r.path, r.student_arch) for g in alone for r in _all_runs(g)],
                               refs) if alone and refs else set()
    for g in groups:
        if g.teacher and not g.is_baseline:
            g.role = ROLE_DISTILLED
        elif any(r.path in teachers for r in _all_runs(g)):
            g.role = ROLE_TEACHER
        elif g.teacher or (g.task, g.dataset_id, g.student, g.data_key) in students:
            g.role = ROLE_STUDENT
        else:
            g.role = ROLE_ALONE


def _all_runs(g: Group) -> list[RunRecord]:
    """The group's runs and its duplicates' left-out runs."""
    return [*g.runs, *(r for members in g.duplicates for r in members[1:])]


def duplicates_text(g: Group) -> str | None:
    """``seed 0: a/seed0 (used), b/seed0`` for each duplicated seed of ``g``, else None."""
    if not g.duplicates:
        return None
    return "; ".join(f"seed {members[0].seed}: {members[0].rel} (used), "
                     + ", ".join(r.rel for r in members[1:]) for members in g.duplicates)


def aggregate(runs: Sequence[RunRecord], paper: PaperTable) -> list[Group]:
    """Groups with their statistics in ``group.row`` (the keys of the CSV/markdown tables).

    The keys are named after the group's metrics (:class:`MetricSpec`): ``best_top1_mean``,
    ``teacher_top1``, ``paper_top1``, ``diff_top1`` for classification, ``best_AP_mean``,
    ``teacher_AP``, ``paper_AP``, ``diff_AP`` for detection; ``task`` names the task.
    """
    groups = group_runs(runs)
    known = paper.methods
    for g in groups:
        spec = g.spec
        p, s = spec.primary, spec.secondary
        row: dict[str, Any] = {
            "task": g.task,
            "dataset": g.dataset, "teacher": g.teacher_label, "student": g.student,
            "method": g.method, "name": g.name,
            "n": len(g.runs),
            "seeds": " ".join(str(r.seed) for r in g.runs),
            "teacher_sha256": (g.teacher_id if g.teacher_id and not
                               g.teacher_id.startswith("path:") else None),
            "data": data_label(g.data_key) or None,
            "selection": "val" if g.has_val else "test",
            "role": g.role, "variant": g.variant, "duplicates": duplicates_text(g),
            "experiment_fingerprint": g.experiment or None,
        }
        for stat in spec.stats:
            mean, std, n = mean_std(r.metric(stat) for r in g.runs)
            row[f"{stat}_mean"], row[f"{stat}_std"], row[f"{stat}_n"] = mean, std, n
        row[f"teacher_{p}"], _, _ = mean_std(r.teacher_metric(p) for r in g.runs)
        pm = "teacher" if g.role == ROLE_TEACHER else paper_method(g.name, g.method, known)
        row["paper_method"] = pm
        first = paper.lookup(g.dataset, g.teacher, g.student, pm, p)
        second = paper.lookup(g.dataset, g.teacher, g.student, pm, s)
        row[f"paper_{p}"] = first.value if first else None
        row[f"paper_{s}"] = second.value if second else None
        row["paper_statistic"] = first.statistic if first else None
        row["paper_source"] = "; ".join(first.sources) if first else None
        row[f"diff_{p}"] = (row[f"best_{p}_mean"] - first.value
                            if first and row[f"best_{p}_mean"] is not None else None)
        g.row = row
    return groups


#: what one chart compares: (dataset, teacher label, student, data key, task)
ChartKey = tuple[str, str, str, tuple[float, float, int | None], str]


def chart_groups(groups: Sequence[Group]) -> dict[ChartKey, list[Group]]:
    """The groups of each chart, sorted by chart key.

    A chart holds the groups of one (dataset, teacher checkpoint, student, data, task). The
    student trained alone (a ``vanilla`` run without a teacher) of the same dataset, student,
    data and task is added to every teacher -> student chart as the "student alone" baseline;
    baselines (also ``vanilla`` runs that name the pair's teacher) come first.
    """
    charts: dict[ChartKey, list[Group]] = {}
    for g in groups:
        charts.setdefault((*g.pair, g.data_key, g.task), []).append(g)
    baselines = [g for g in groups if g.is_baseline and not g.teacher]
    for key, members in charts.items():
        dataset, teacher, student, data, task = key
        if teacher == "none":
            continue
        extra = [b for b in baselines if b.pair[0] == dataset and b.pair[2] == student
                 and b.data_key == data and b.task == task and b not in members]
        members[:0] = extra
    for members in charts.values():  # the student alone first (a run of the pair's own too)
        members.sort(key=lambda g: not g.is_baseline)
    return {k: charts[k] for k in sorted(charts,
                                         key=lambda k: (*k[:3], _data_sort(k[3]), k[4]))}


def _data_sort(key: tuple[float, float, int | None]) -> tuple[float, float, int]:
    return key[0], key[1], -1 if key[2] is None else key[2]


def newest_time(runs: Sequence[RunRecord]) -> float | None:
    """When the newest of the runs finished (seconds since the epoch)."""
    times = [r.finished_time for r in runs if r.finished_time is not None]
    return max(times) if times else None
