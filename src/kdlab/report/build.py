"""``kdlab report``: the results of finished runs as markdown, CSV, HTML and plots.

:func:`build_report` reads run directories only (it never trains), aggregates them over seeds
(:mod:`kdlab.report.aggregate`), matches the published numbers (:mod:`kdlab.report.paper`) and
writes into the output folder:

* ``results.md``: a short header (number of runs, date, statistic conventions) and the table;
* ``results.csv``: the same numbers, unrounded to 4 decimals, one row per group;
* ``results.html``: one self-contained page with the table and the plots embedded;
* ``curves_<dataset>_<teacher>_<student>.png`` and ``bars_<dataset>_<teacher>_<student>.png``.

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

from kdlab.atomic import atomic_write
from kdlab.errors import RunError
from kdlab.report.aggregate import Group, UnfinishedRun, aggregate, newest_time, scan_runs
from kdlab.report.html import describe_unfinished, render_html
from kdlab.report.paper import STATISTIC_TEXT, load_paper_results
from kdlab.report.plots import render_plots
from kdlab.report.table import format_cell, markdown_table

log = logging.getLogger(__name__)

TITLE = "kdlab results"

#: (row key, header) of the CSV, in order.
CSV_COLUMNS = (
    "dataset", "teacher", "student", "method", "name", "n", "seeds",
    "best_top1_mean", "best_top1_std", "last_top1_mean", "last_top1_std",
    "best_top5_mean", "best_top5_std", "last_top5_mean", "last_top5_std",
    "teacher_top1", "paper_method", "paper_top1", "paper_top5", "paper_statistic",
    "paper_source", "diff_top1",
)


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


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std or 0.0:.2f}"


def _signed(value: float | None) -> str:
    return "—" if value is None else f"{value:+.2f}"


def display_rows(groups: Sequence[Group], with_top5: bool) -> tuple[list[tuple[str, str]],
                                                                  list[dict[str, str]]]:
    """(columns, rows of formatted strings) of the results table."""
    cols = [("dataset", "dataset"), ("teacher", "teacher"), ("student", "student"),
            ("method", "method"), ("name", "config name"), ("n", "seeds (n)"),
            ("best_top1", "best top-1"), ("last_top1", "last top-1")]
    if with_top5:
        cols += [("best_top5", "best top-5"), ("last_top5", "last top-5")]
    cols += [("teacher_top1", "teacher top-1"), ("paper_top1", "paper top-1"),
             ("paper_statistic", "paper statistic"), ("diff_top1", "Δ best − paper")]
    rows = []
    for g in groups:
        r = g.row
        rows.append({
            "dataset": format_cell(r["dataset"], ""), "teacher": format_cell(r["teacher"], ""),
            "student": format_cell(r["student"], ""), "method": r["method"],
            "name": format_cell(r["name"] or None, ""), "n": str(r["n"]),
            **{s: _pm(r[f"{s}_mean"], r[f"{s}_std"])
               for s in ("best_top1", "last_top1", "best_top5", "last_top5")},
            "teacher_top1": format_cell(r["teacher_top1"], ".2f"),
            "paper_top1": format_cell(r["paper_top1"], ".2f"),
            "paper_statistic": format_cell(r["paper_statistic"], ""),
            "diff_top1": _signed(r["diff_top1"]),
        })
    return cols, rows


def header_notes(groups: Sequence[Group], n_runs: int, n_unfinished: int,
                 when: float | None, paper_origin: str | None) -> list[str]:
    """The lines above the table: runs, date, the statistics used by us and by the paper."""
    date = time.strftime("%Y-%m-%d", time.gmtime(when)) if when is not None else "—"
    runs = (f"{n_runs} finished run{'s' if n_runs != 1 else ''} in {len(groups)} "
            f"group{'s' if len(groups) != 1 else ''} (one row per experiment, seeds aggregated)")
    if n_unfinished:
        runs += f"; {n_unfinished} unfinished or failed, listed below and not in the table"
    stats = sorted({g.row["paper_statistic"] for g in groups if g.row.get("paper_statistic")})
    counts = ", ".join(
        f"{sum(1 for g in groups if g.row.get('paper_statistic') == s)} row(s) {s}"
        for s in stats)
    paper = ("Paper: the published top-1 of the same dataset/teacher/student/method; the "
             "'paper statistic' column says which number it is: best = "
             f"{STATISTIC_TEXT['best']}, last = {STATISTIC_TEXT['last']}"
             + (f" (here: {counts})" if counts else " (no row of this table has one)")
             + ". Δ = our best mean − paper.")
    if paper_origin is None:
        paper = "Paper: no published numbers available (no paper_results.csv)."
    return [
        f"Runs: {runs}.",
        f"Date: {date} (UTC day the newest run finished).",
        "Ours: best = highest test top-1 over the epochs, last = test top-1 of the final "
        "epoch; each is mean ± sample std over seeds (std 0 for one seed); top-5 likewise.",
        paper,
    ]


def results_markdown(notes: Sequence[str], columns: Sequence[tuple[str, str]],
                     rows: Sequence[dict[str, str]], unfinished: Sequence[UnfinishedRun]) -> str:
    """The markdown report."""
    parts = [f"# {TITLE}", "", *(f"- {n}" for n in notes), "",
             markdown_table(rows, [(k, h, "") for k, h in columns])]
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
    """The CSV report (one row per group, numbers to 4 decimals, empty for unknown)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for g in groups:
        w.writerow([_csv_value(g.row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` atomically, leaving the file untouched when it already holds it."""
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write(path, data)


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
    with_top5 = any(g.row.get(f"{s}_mean") is not None for g in groups
                    for s in ("best_top5", "last_top5"))
    columns, rows = display_rows(groups, with_top5)
    notes = header_notes(groups, len(scan.finished), len(scan.unfinished),
                         newest_time(scan.finished), paper.origin)
    plots = render_plots(groups)

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the report folder {out}: {e.strerror}") from e
    report = Report(out, out / "results.md", out / "results.csv", out / "results.html",
                    groups=groups, unfinished=scan.unfinished, n_runs=len(scan.finished))
    _write(report.markdown, results_markdown(notes, columns, rows, scan.unfinished).encode())
    _write(report.csv, results_csv(groups).encode())
    numeric = frozenset(k for k, _ in columns
                        if k not in ("dataset", "teacher", "student", "method", "name",
                                     "paper_statistic"))
    _write(report.html, render_html(TITLE, notes, columns, rows, scan.unfinished, plots,
                                    numeric).encode())
    for stale in sorted([*out.glob("curves_*.png"), *out.glob("bars_*.png")]):
        if stale.name not in plots:
            stale.unlink()
    for name, png in plots.items():
        _write(out / name, png)
        report.plots.append(out / name)
    log.info("report of %d run(s) in %d group(s) (%d unfinished) written to %s",
             report.n_runs, len(groups), len(scan.unfinished), out)
    return report
