"""``kdlab report``: the results of finished runs as markdown, CSV, HTML and plots.

:func:`build_report` reads run directories only (it never trains), aggregates them over seeds
(:mod:`kdlab.report.aggregate`), matches the published numbers (:mod:`kdlab.report.paper`) and
writes into the output folder:

* ``results.md``: a short header (number of runs, date, statistic conventions) and one table
  per (task, dataset) (columns that are empty for every row of a table, e.g. the paper's on a
  dataset without published numbers, are left out);
* ``results.csv``: the same numbers, unrounded to 4 decimals, one row per group, every column;
* ``results.html``: one self-contained page with the tables and the grid figures embedded;
* ``curves_<dataset>_<teacher>_<student>.png`` and ``bars_<dataset>_<teacher>_<student>.png``,
  one chart each, and ``grid_<dataset>[_<task>].png``: every chart of a table in one grid (a row
  per teacher -> student pair, curves left, bars right).

Rows are experiments (:func:`kdlab.report.aggregate.group_runs`): runs whose stored configs agree
in all but the seed; rows that would look alike get a ``differs in`` column naming the config keys
they differ in, a seed found in several run directories counts once and its row is marked
:data:`kdlab.report.aggregate.DUPLICATE_MARK` with a note listing the directories.

Statistics (each a mean over seeds; ``± sample std`` shown from two seeds on):

* ``best-on-test``: the highest test top-1 over the epochs (``summary.best_top1``): the epoch
  is chosen on the test set, the DKD/SDD papers' convention;
* ``last-epoch``: the test top-1 of the final epoch (``summary.last_top1``), the CRD convention;
* ``test at best-val epoch``: with a validation set, the test top-1 at the epoch chosen on
  validation (``summary.test_top1_at_best``): the primary column of runs that have it;
* ``best val``: the validation top-1 at that epoch (``summary.best_val_top1``).

Every statistic is of the group's headline metric (:data:`kdlab.report.aggregate.TASK_METRICS`):
top-1 / top-5 for classification (the columns above), COCO box AP / AP50 / AP75 for detection
(``best-on-test AP``, ``best_AP_mean``, ``teacher_AP``, ...).

The output depends on the run directories alone: the date is the day the newest run finished
(not today), rows and plots are sorted, so building the report again gives the same bytes.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.core.errors import RunError
from kdlab.core.io import atomic_write
from kdlab.report.aggregate import (
    DEFAULT_TASK,
    DUPLICATE_MARK,
    ROLE_DISTILLED,
    TASK_METRICS,
    Group,
    MetricSpec,
    UnfinishedRun,
    aggregate,
    duplicates_text,
    metric_spec,
    newest_time,
    scan_runs,
)
from kdlab.report.html import describe_unfinished, render_html
from kdlab.report.paper import STATISTIC_TEXT, load_paper_results
from kdlab.report.plots import GRID_PREFIX, render_plots
from kdlab.report.table import format_cell, markdown_table

__all__ = [
    "CSV_COLUMNS", "Report", "STAT_HEADERS", "TITLE", "Table", "build_report", "csv_columns",
    "dataset_tables", "display_rows", "header_notes", "identity_notes", "metric_csv_columns",
    "results_csv",
    "results_markdown", "stat_headers",
]

log = logging.getLogger(__name__)

TITLE = "kdlab results"

#: (row key, header) of the CSV of classification runs, in order.
CSV_COLUMNS = (
    "dataset", "teacher", "student", "method", "name", "n", "seeds",
    "best_top1_mean", "best_top1_std", "last_top1_mean", "last_top1_std",
    "best_top5_mean", "best_top5_std", "last_top5_mean", "last_top5_std",
    "teacher_top1", "paper_method", "paper_top1", "paper_top5", "paper_statistic",
    "paper_source", "diff_top1",
    "selection", "test_top1_at_best_mean", "test_top1_at_best_std", "best_val_top1_mean",
    "best_val_top1_std", "test_top5_at_best_mean", "test_top5_at_best_std", "data",
    "teacher_sha256", "role", "variant", "duplicates", "experiment_fingerprint",
)
#: the last CSV columns of every task: what the row is (:class:`kdlab.report.aggregate.Group`)
_IDENTITY_COLUMNS = ("data", "teacher_sha256", "role", "variant", "duplicates",
                     "experiment_fingerprint")

#: (statistic, header) of the result columns, primary first: the header names the statistic.
STAT_HEADERS = (
    ("test_top1_at_best", "test top-1 at best-val epoch"),
    ("best_val_top1", "best val top-1"),
    ("best_top1", "best-on-test top-1"),
    ("last_top1", "last-epoch top-1"),
    ("test_top5_at_best", "test top-5 at best-val epoch"),
    ("best_top5", "best-on-test top-5"),
    ("last_top5", "last-epoch top-5"),
)
#: columns that name the row rather than hold a number
_TEXT_COLUMNS = frozenset({"dataset", "teacher", "student", "method", "role", "name",
                           "variant", "data", "paper_statistic"})

def stat_headers(spec: MetricSpec) -> tuple[tuple[str, str], ...]:
    """(statistic, header) of the result columns of ``spec``'s metrics, primary first
    (classification: :data:`STAT_HEADERS`); each extra metric (detection's AP75) follows the
    secondary one's columns."""
    p, pl = spec.primary, spec.primary_label
    out = [(f"test_{p}_at_best", f"test {pl} at best-val epoch"),
           (f"best_val_{p}", f"best val {pl}"),
           (f"best_{p}", f"best-on-test {pl}"),
           (f"last_{p}", f"last-epoch {pl}")]
    for key, label in spec.others:
        out += [(f"test_{key}_at_best", f"test {label} at best-val epoch"),
                (f"best_{key}", f"best-on-test {label}"),
                (f"last_{key}", f"last-epoch {label}")]
    return tuple(out)


def metric_csv_columns(spec: MetricSpec) -> tuple[str, ...]:
    """The CSV columns of one task's rows: the layout of :data:`CSV_COLUMNS` with the task's
    metric names (classification's are exactly :data:`CSV_COLUMNS`); an extra metric
    (detection's AP75) gets the secondary metric's columns."""
    p, s = spec.primary, spec.secondary
    cols = ["dataset", "teacher", "student", "method", "name", "n", "seeds"]
    for key in (p, *(k for k, _ in spec.others)):
        cols += [f"best_{key}_mean", f"best_{key}_std", f"last_{key}_mean", f"last_{key}_std"]
    cols += [f"teacher_{p}", "paper_method", f"paper_{p}", f"paper_{s}", "paper_statistic",
             "paper_source", f"diff_{p}", "selection", f"test_{p}_at_best_mean",
             f"test_{p}_at_best_std", f"best_val_{p}_mean", f"best_val_{p}_std"]
    for key, _ in spec.others:
        cols += [f"test_{key}_at_best_mean", f"test_{key}_at_best_std"]
    return (*cols, *_IDENTITY_COLUMNS)


def csv_columns(specs: Sequence[MetricSpec]) -> tuple[str, ...]:
    """The CSV columns of a report over the tasks of ``specs``: classification's
    (:data:`CSV_COLUMNS`, unchanged), then the columns each other task adds
    (:func:`metric_csv_columns`, e.g. ``best_AP_mean``), then ``task`` when any task is not
    classification. A row leaves the other tasks' columns empty."""
    ordered = sorted(set(specs), key=lambda s: (s.task != DEFAULT_TASK, s.task))
    out: list[str] = []
    for spec in ordered or [TASK_METRICS[DEFAULT_TASK]]:
        out += [c for c in metric_csv_columns(spec) if c not in out]
    if any(s.task != DEFAULT_TASK for s in ordered):
        out.append("task")
    return tuple(out)


@dataclass
class Table:
    """One (task, dataset) results table: notes above it, (key, header) columns, formatted
    rows."""

    dataset: str
    notes: list[str]
    columns: list[tuple[str, str]]
    rows: list[dict[str, str]]
    task: str = DEFAULT_TASK

    @property
    def heading(self) -> str:
        """The table's title: the dataset, plus ``(task)`` for another task than
        classification."""
        return self.dataset if self.task == DEFAULT_TASK else f"{self.dataset} ({self.task})"

    @property
    def numeric(self) -> frozenset[str]:
        """The right-aligned (number) columns."""
        return frozenset(k for k, _ in self.columns if k not in _TEXT_COLUMNS)


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    out_dir: Path
    markdown: Path
    csv: Path
    html: Path
    plots: list[Path] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    unfinished: list[UnfinishedRun] = field(default_factory=list)
    n_runs: int = 0


def _pm(mean: float | None, std: float | None, n: int = 2) -> str:
    """``mean ± std``; one value (``n`` = 1) shows alone: its spread is unknown, not 0."""
    if mean is None:
        return "—"
    if n <= 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std or 0.0:.2f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def _format_row(r: dict[str, Any], spec: MetricSpec) -> dict[str, str]:
    p = spec.primary
    return {
        "dataset": format_cell(r["dataset"], ""), "teacher": format_cell(r["teacher"], ""),
        "student": format_cell(r["student"], ""), "method": r["method"],
        "role": r.get("role") or "", "variant": format_cell(r.get("variant"), ""),
        "name": format_cell(r["name"] or None, ""),
        "n": f"{r['n']} {DUPLICATE_MARK}" if r.get("duplicates") else str(r["n"]),
        **{s: _pm(r.get(f"{s}_mean"), r.get(f"{s}_std"), r.get(f"{s}_n", 2))
           for s, _ in stat_headers(spec)},
        "data": format_cell(r.get("data"), ""),
        f"teacher_{p}": format_cell(r.get(f"teacher_{p}"), ".2f"),
        f"paper_{p}": format_cell(r.get(f"paper_{p}"), ".2f"),
        "paper_statistic": format_cell(r["paper_statistic"], ""),
        f"diff_{p}": _signed(r.get(f"diff_{p}")),
    }


def display_rows(groups: Sequence[Group]) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(columns, rows of formatted strings) of one results table (the groups of one task).

    The statistics' headers name them (:func:`stat_headers` of the task's metrics), the primary
    one first. A column that is empty ("—") in every row is left out: top-5 where it was not
    measured, validation columns without a validation set, the paper's columns on a dataset
    without published numbers, the teacher without one. ``data`` is shown only when the rows
    differ in it, ``role`` only when a row is not distilled, ``differs in`` (the variant) only
    when a row has one. ``seeds (n)`` counts distinct seeds, marked :data:`DUPLICATE_MARK` where
    a seed was found in several run directories.
    """
    spec = metric_spec(groups[0].task if groups else DEFAULT_TASK)
    p, pl = spec.primary, spec.primary_label
    cols = [("teacher", "teacher"), ("student", "student"), ("method", "method"),
            ("role", "role"), ("name", "config name"), ("variant", "differs in"),
            ("n", "seeds (n)"), *stat_headers(spec),
            ("data", "data"), (f"teacher_{p}", f"teacher {pl}"), (f"paper_{p}", f"paper {pl}"),
            ("paper_statistic", "paper statistic"), (f"diff_{p}", "Δ best-on-test − paper")]
    rows = [_format_row(g.row, spec) for g in groups]
    return [(k, h) for k, h in cols if _shown_column(k, {r[k] for r in rows})], rows


def _shown_column(key: str, cells: set[str]) -> bool:
    """Whether a table shows the column ``key`` whose rows hold ``cells``
    (:func:`display_rows`)."""
    if key in ("method", "name", "n"):
        return True
    if key == "data":
        return len(cells) > 1
    if key == "role":
        return bool(cells - {ROLE_DISTILLED})
    return bool(cells - {"—"})


def dataset_tables(groups: Sequence[Group]) -> list[Table]:
    """One :class:`Table` per (task, dataset), in (dataset, task) order, with its own notes
    (the task's metric, the data shared by every row, which columns are primary): runs of
    different tasks are never in one table."""
    by_dataset: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        by_dataset.setdefault((g.dataset or "—", g.task), []).append(g)
    tables = []
    for (dataset, task), members in by_dataset.items():
        columns, rows = display_rows(members)
        note = metric_spec(task).note
        notes = [note] if note else []
        data = {g.row.get("data") for g in members}
        if len(data) == 1 and None not in data:
            notes.append(f"Data of every row: {data.pop()} of the training set.")
        if any(g.has_val for g in members):
            label = metric_spec(task).primary_label
            notes.append(f"Primary column: test {label} at best-val epoch (the epoch chosen "
                         "on the held-out validation set; rows without one show —).")
        notes += identity_notes(members)
        tables.append(Table(dataset, notes, columns, rows, task))
    return tables


def identity_notes(groups: Sequence[Group]) -> list[str]:
    """The notes of a table on what its rows are: the variants' meaning and every duplicated
    seed (:data:`DUPLICATE_MARK`)."""
    notes = []
    if any(g.variant for g in groups):
        notes.append("Rows that differ only in 'differs in' are different configs (never "
                     "averaged together); it names the config keys in which they differ.")
    dups = [(g, text) for g in groups if (text := duplicates_text(g))]
    if dups:
        notes.append(f"{DUPLICATE_MARK} Duplicate seed: the same config and seed in several run "
                     "directories; each seed counts once, from its newest finished run "
                     "(delete or move the others): " + "; ".join(
                         f"{_row_name(g)}: {text}" for g, text in dups) + ".")
    return notes


def _row_name(g: Group) -> str:
    """A row as a note names it: the config name (else the method), and its variant."""
    name = g.name or g.method
    return f"{name} ({g.variant})" if g.variant else name


def _runs_note(groups: Sequence[Group], n_runs: int, n_unfinished: int) -> str:
    """How many runs and groups the report holds, and which runs it leaves out."""
    runs = (f"{n_runs} finished run{'s' if n_runs != 1 else ''} in {len(groups)} "
            f"group{'s' if len(groups) != 1 else ''} (one row per experiment: runs whose configs "
            "agree in all but the seed; seeds aggregated)")
    left_out = sum(len(members) - 1 for g in groups for members in g.duplicates)
    if left_out:
        runs += (f"; {left_out} run{'s' if left_out != 1 else ''} left out as duplicate "
                 f"seed{'s' if left_out != 1 else ''} ({DUPLICATE_MARK})")
    if n_unfinished:
        runs += f"; {n_unfinished} unfinished or failed, listed below and not in the table"
    return runs


def header_notes(groups: Sequence[Group], n_runs: int, n_unfinished: int,
                 when: float | None, paper_origin: str | None) -> list[str]:
    """The lines above the table: runs, date, the statistics used by us and by the paper."""
    date = time.strftime("%Y-%m-%d", time.gmtime(when)) if when is not None else "—"
    runs = _runs_note(groups, n_runs, n_unfinished)
    stats = sorted({g.row["paper_statistic"] for g in groups if g.row.get("paper_statistic")})
    counts = ", ".join(
        f"{sum(1 for g in groups if g.row.get('paper_statistic') == s)} row(s) {s}"
        for s in stats)
    paper = ("Paper: the published top-1 of the same dataset/teacher/student/method; the "
             "'paper statistic' column says which number it is: best = "
             f"{STATISTIC_TEXT['best']}, last = {STATISTIC_TEXT['last']}"
             + (f" (here: {counts})" if counts else " (no row has one)")
             + ". Δ = our best-on-test mean − paper. Tables of datasets without published "
             "numbers have no paper columns.")
    if paper_origin is None:
        paper = "Paper: no published numbers available (no paper_results.csv)."
    ours = ("Ours: best-on-test = highest test top-1 over the epochs (the epoch chosen on the "
            "test set); last-epoch = test top-1 of the final epoch; with a validation set "
            "(data.val_fraction), test top-1 at best-val epoch = test top-1 at the epoch chosen "
            "on validation, and best val = validation top-1 there. Each is the mean over seeds, "
            "± sample std from two seeds on (one seed: the value alone); top-5 likewise.")
    tasks = sorted({g.task for g in groups} - {DEFAULT_TASK})
    if tasks:  # the headline metric differs per table: say so (classification-only: as ever)
        metrics = "; ".join(
            f"{t}: {metric_spec(t).primary_label}, then "
            + ", ".join(label for _, label in metric_spec(t).others) for t in tasks)
        ours = ours.replace("top-1", "metric").replace("top-5 likewise",
                                                        "the secondary metrics likewise")
        ours += (" The metric is each table's task's: classification: top-1, then top-5; "
                 f"{metrics}.")
        paper = paper.replace("the published top-1", "the published number")
    return [
        f"Runs: {runs}.",
        f"Date: {date} (UTC day the newest run finished).",
        ours,
        paper,
    ]


def results_markdown(notes: Sequence[str], tables: Sequence[Table],
                     unfinished: Sequence[UnfinishedRun]) -> str:
    """The markdown report."""
    parts = [f"# {TITLE}", "", *(f"- {n}" for n in notes), ""]
    for t in tables:
        parts += [f"## {t.heading}", ""]
        if t.notes:
            parts += [*(f"- {n}" for n in t.notes), ""]
        parts.append(markdown_table(t.rows, [(k, h, "") for k, h in t.columns]))
    if unfinished:
        parts += [f"## Unfinished or failed runs ({len(unfinished)})", "",
                  "Not included in the table above.", ""]
        parts += [f"- `{u.rel}`: {describe_unfinished(u)}" for u in unfinished]
        parts.append("")
    return "\n".join(parts)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_csv(groups: Sequence[Group]) -> str:
    """The CSV report (one row per group, numbers to 4 decimals, empty for unknown); the
    columns are :func:`csv_columns` of the groups' tasks."""
    columns = csv_columns([g.spec for g in groups])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for g in groups:
        w.writerow([_csv_value(g.row.get(c)) for c in columns])
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, leaving the file untouched when it already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, data)


def _write_plots(out: Path, plots: dict[str, bytes]) -> list[Path]:
    """Write the plots into ``out`` and remove the plots of an earlier report that are gone
    (charts of pairs without runs now); the written paths."""
    for stale in sorted([*out.glob("curves_*.png"), *out.glob("bars_*.png"),
                         *out.glob(f"{GRID_PREFIX}*.png")]):
        if stale.name not in plots:
            stale.unlink()
    for name, png in plots.items():
        _write(out / name, png)
    return [out / name for name in plots]


def build_report(runs_dir: str | Path, out_dir: str | Path | None = None,
                 paper_csv: str | Path | None = None) -> Report:
    """Aggregate the runs under ``runs_dir`` and write the report into ``out_dir``.

    ``out_dir`` defaults to ``RUNS_DIR/report``; ``paper_csv`` to the CSV shipped with the
    package. Raises :class:`RunError` when ``runs_dir`` is missing or holds no run at all.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise RunError(f"runs folder not found: {root}")
    out = Path(out_dir) if out_dir is not None else root / "report"
    scan = scan_runs(root)
    if not scan.finished and not scan.unfinished:
        raise RunError(f"no kdlab run directories (config.yaml / summary.json) under {root}")
    if not scan.finished:
        log.warning("no finished run under %s: the table is empty", root)
    paper = load_paper_results(paper_csv)
    groups = aggregate(scan.finished, paper)
    tables = dataset_tables(groups)
    notes = header_notes(groups, len(scan.finished), len(scan.unfinished),
                         newest_time(scan.finished), paper.origin)
    plots = render_plots(groups)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the report folder {out}: {e.strerror}") from e
    report = Report(out, out / "results.md", out / "results.csv", out / "results.html",
                    groups=groups, unfinished=scan.unfinished, n_runs=len(scan.finished))
    _write(report.markdown, results_markdown(notes, tables, scan.unfinished).encode())
    _write(report.csv, results_csv(groups).encode())
    grids = {name: png for name, png in plots.items() if name.startswith(GRID_PREFIX)}
    _write(report.html, render_html(
        TITLE, notes, [(t.heading, t.notes, t.columns, t.rows, t.numeric) for t in tables],
        scan.unfinished, grids).encode())
    report.plots = _write_plots(out, plots)
    log.info("report of %d run(s) in %d group(s) (%d unfinished) written to %s",
             report.n_runs, len(groups), len(scan.unfinished), out)
    return report
