"""Report plots: test curves and bars of the headline metric per chart (dataset, teacher,
student, data, task): top-1 for classification, COCO box AP for detection (the groups' task's
:class:`kdlab.report.aggregate.MetricSpec`).

One chart compares the methods of one teacher checkpoint -> student pair on the same data
(:func:`kdlab.report.aggregate.chart_groups`); the student trained alone is in every chart of its
student, as the grey "student alone" bar and the black dashed curve. Bars start at zero and show
the primary statistic: the test value at the best-validation epoch when every group has a
validation set, else the best-on-test value; one seed has no error bar. A group is labelled by its
method (a run trained alone: by its role, ``teacher``, ``student alone`` or ``trained alone``),
plus its variant where configs of one name differ (``kd, optim.epochs=8``).

Each chart is a curves file and a bars file; every chart of a (dataset, task) is also drawn into
one grid figure (:func:`grid_figure`: a row per chart, curves left, bars right), which the HTML
page embeds.

matplotlib's Agg canvas draws them (no GUI, no pyplot state); figure size, dpi, style, colours
and the order of the methods are fixed, the axes box is fixed and the saved area is the tight
bounding box of everything drawn (long tick labels and the legend outside the axes widen the image
instead of being cut off), and the PNG carries no "Software" entry, so the same runs give the
same bytes again on the same installation.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from typing import Any

from kdlab.report.aggregate import (
    DEFAULT_TASK,
    ROLE_DISTILLED,
    ROLE_STUDENT,
    ChartKey,
    Group,
    MetricSpec,
    chart_groups,
    data_label,
    metric_spec,
)

__all__ = [
    "BASELINE_COLOR", "DPI", "FIGSIZE", "GRID_LEGEND_WIDTH", "GRID_PREFIX", "GRID_ROW_HEIGHT",
    "bars_figure",
    "bars_png", "chart_spec", "chart_stems", "curves_figure", "curves_png", "draw_bars",
    "draw_curves", "grid_figure", "grid_png", "grid_stem", "matplotlib_available", "plot_stem",
    "primary_stat", "render_plots",
]

log = logging.getLogger(__name__)

FIGSIZE = (7.0, 4.2)
DPI = 100
#: the room (inches) a grid gives each column's legend, right of its axes, and each row's height
GRID_LEGEND_WIDTH = 2.2
GRID_ROW_HEIGHT = FIGSIZE[1] + 0.6
#: the file name prefix of the grid figures (the HTML page embeds these)
GRID_PREFIX = "grid_"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


def _safe(part: str) -> str:
    return _UNSAFE.sub("-", part).strip("-") or "none"


def plot_stem(kind: str, pair: tuple[str, str, str]) -> str:
    """File stem ``<kind>_<dataset>_<teacher>_<student>`` (unsafe characters become ``-``)."""
    return "_".join([kind, *(_safe(p) for p in pair)])


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (plots are skipped without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


#: the student-alone baseline's colour
BASELINE_COLOR = "#555555"


def _figure(width: float = FIGSIZE[0]) -> tuple[Any, Any]:
    # optional heavy dependency: matplotlib (the `report` extra), here and below
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, FIGSIZE[1]), dpi=DPI)
    FigureCanvasAgg(fig)
    # fixed axes box; tick labels, titles and legends outside it widen the saved image (tight
    # bounding box) instead of squeezing the plot
    fig.subplots_adjust(left=0.1, right=0.97, top=0.9, bottom=0.12)
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight",
                pad_inches=0.1)
    return buf.getvalue()


def _colors(n: int) -> list[Any]:
    """``n`` distinct colours of tab10 (tab20 beyond 9), without their greys (the greys mark
    the student-alone baseline)."""
    # optional heavy dependency: matplotlib
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 9 else "tab20"]
    greys = {7} if cmap.N == 10 else {14, 15}
    palette = [cmap(i) for i in range(cmap.N) if i not in greys]
    return [palette[i % len(palette)] for i in range(n)]


def _style() -> Any:
    # optional heavy dependency: matplotlib
    import matplotlib.style

    return matplotlib.style.context("default")


def _title(pair: tuple[str, str, str], data: str = "") -> str:
    dataset, teacher, student = pair
    title = f"{dataset}: {teacher} -> {student}" if teacher != "none" else f"{dataset}: {student}"
    return f"{title} ({data})" if data else title


def _default_title(groups: Sequence[Group]) -> str:
    last = groups[-1]  # a baseline comes first: the last group names the chart's teacher
    return _title(last.pair, data_label(last.data_key))


def _labels(groups: Sequence[Group]) -> list[str]:
    """Short labels; only those that collide get the full config name. In a chart with a
    distilled method, the runs trained alone are its student's baseline: "student alone"."""
    distilled = any(g.role == ROLE_DISTILLED for g in groups)
    roles = [ROLE_STUDENT if distilled and g.is_baseline and not g.teacher else g.role
             for g in groups]
    short = [g.label_as(r) for g, r in zip(groups, roles, strict=True)]
    return [g.label_as(r, full=True) if short.count(s) > 1 else s
            for g, r, s in zip(groups, roles, short, strict=True)]


def _chart_colors(groups: Sequence[Group]) -> list[Any]:
    """The baseline grey, the others tab10/tab20 in order."""
    others = iter(_colors(sum(1 for g in groups if not g.is_baseline)))
    return [BASELINE_COLOR if g.is_baseline else next(others) for g in groups]


def chart_spec(groups: Sequence[Group]) -> MetricSpec:
    """The headline metrics of a chart: its groups' task's (a chart holds one task)."""
    return metric_spec(groups[0].task if groups else DEFAULT_TASK)


def primary_stat(groups: Sequence[Group]) -> tuple[str, str]:
    """(summary statistic, axis label) of a chart's bars: the test value of the primary metric
    (top-1, AP) at the best-val epoch when every group chose its epoch on validation, else the
    best-on-test value."""
    spec = chart_spec(groups)
    p, label = spec.primary, spec.primary_label
    if groups and all(g.has_val for g in groups):
        return f"test_{p}_at_best", f"test {label} at best-val epoch (%)"
    return f"best_{p}", f"best-on-test {label} (%)"


def _mean_curve(g: Group, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    per_epoch: dict[int, list[float]] = {}
    for r in g.runs:
        for epoch, value in r.curve(key):
            per_epoch.setdefault(epoch, []).append(value)
    epochs = sorted(per_epoch)
    return (epochs, [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs],
            [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs])


def curves_png(groups: Sequence[Group], title: str | None = None) -> bytes | None:
    """PNG of :func:`curves_figure` (None when no group has a curve)."""
    with _style():
        fig = curves_figure(groups, title)
        return None if fig is None else _png(fig)


def bars_png(groups: Sequence[Group], title: str | None = None) -> bytes | None:
    """PNG of :func:`bars_figure` (None when no group has the statistic)."""
    with _style():
        fig = bars_figure(groups, title)
        return None if fig is None else _png(fig)


def curves_figure(groups: Sequence[Group], title: str | None = None) -> Any:
    """The test value of the primary metric (top-1, AP) per epoch, one line per group: mean
    over seeds with a min-max band; the validation value dotted in the same colour where there
    is one; the student alone black, dash-dotted. A matplotlib ``Figure``, or None without any
    curve."""
    if not _curve_series(groups):
        return None
    with _style():  # also the caller's: nested contexts restore in order
        fig, ax = _figure()
        draw_curves(ax, groups, title)
        return fig


def bars_figure(groups: Sequence[Group], title: str | None = None) -> Any:
    """The chart's primary statistic (:func:`primary_stat`) per group, mean with a +- std error
    bar from two seeds on; the y axis starts at 0; the value is written above each bar; the
    published number as a black diamond where known (best-on-test bars only). A matplotlib
    ``Figure``, or None when no group has the statistic."""
    shown = _bar_groups(groups)
    if not shown:
        return None
    with _style():
        fig, ax = _figure(width=_bars_width(shown))
        draw_bars(ax, groups, title)
        return fig


def _curve_series(groups: Sequence[Group]) -> list[tuple[Any, ...]]:
    """(group, label, colour, epochs, mean, min, max) of each group with a test curve."""
    spec = chart_spec(groups)
    series = []
    for g, label, color in zip(groups, _labels(groups), _chart_colors(groups), strict=True):
        epochs, mean, lo, hi = _mean_curve(g, f"test_{spec.primary}")
        if epochs:
            series.append((g, label, color, epochs, mean, lo, hi))
    return series


def draw_curves(ax: Any, groups: Sequence[Group], title: str | None = None) -> bool:
    """Draw :func:`curves_figure`'s chart into the axes ``ax``; False (nothing drawn) when no
    group has a curve."""
    # optional heavy dependency: matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    spec = chart_spec(groups)
    series = _curve_series(groups)
    if not series:
        return False
    any_val = False
    for g, label, color, epochs, mean, lo, hi in series:
        style: dict[str, Any] = {"color": color, "linewidth": 1.5}
        if g.is_baseline:
            style = {"color": "black", "linestyle": "-.", "linewidth": 1.8}
        ax.plot(epochs, mean, label=label, marker="o" if len(epochs) == 1 else None, **style)
        ax.fill_between(epochs, lo, hi, color=style["color"], alpha=0.12, linewidth=0)
        v_epochs, v_mean, _, _ = _mean_curve(g, f"val_{spec.primary}")
        if v_epochs:
            any_val = True
            ax.plot(v_epochs, v_mean, color=style["color"], linewidth=1.0, linestyle=":",
                    alpha=0.9)
    handles, labels = ax.get_legend_handles_labels()
    if any_val:
        handles.append(Line2D([], [], color="grey", linestyle=":", linewidth=1.0))
        labels.append(f"dotted: validation {spec.primary_label}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test {spec.primary_label} (%)")
    ax.set_title((title or _default_title(groups)) + "\nmean over seeds, min-max band",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0, frameon=False)
    return True


def _bar_groups(groups: Sequence[Group]) -> list[Group]:
    """The groups of a chart that have its bar statistic (:func:`primary_stat`)."""
    stat, _ = primary_stat(groups)
    return [g for g in groups if g.row.get(f"{stat}_mean") is not None]


def _bars_width(shown: Sequence[Group]) -> float:
    """The width (inches) of a bar chart of ``shown`` groups."""
    return max(FIGSIZE[0], 2.0 + 0.5 * len(shown))


def draw_bars(ax: Any, groups: Sequence[Group], title: str | None = None) -> bool:
    """Draw :func:`bars_figure`'s chart into the axes ``ax``; False (nothing drawn) when no
    group has the statistic."""
    primary = chart_spec(groups).primary
    stat, ylabel = primary_stat(groups)
    groups = _bar_groups(groups)
    if not groups:
        return False
    xs = list(range(len(groups)))
    means = [float(g.row[f"{stat}_mean"]) for g in groups]
    several = [g.row.get(f"{stat}_n", 1) > 1 for g in groups]
    stds = [float(g.row.get(f"{stat}_std") or 0.0) if many else 0.0
            for g, many in zip(groups, several, strict=True)]
    ax.bar(xs, means, color=_chart_colors(groups))
    if any(several):
        ax.errorbar([x for x, many in zip(xs, several, strict=True) if many],
                    [m for m, many in zip(means, several, strict=True) if many],
                    yerr=[s for s, many in zip(stds, several, strict=True) if many],
                    fmt="none", ecolor="black", capsize=4, linewidth=1.0,
                    label="± sample std (n > 1)")
    paper = [(x, g.row[f"paper_{primary}"]) for x, g in zip(xs, groups, strict=True)
             if g.row.get(f"paper_{primary}") is not None] if stat == f"best_{primary}" else []
    if paper:
        ax.scatter([x for x, _ in paper], [v for _, v in paper], marker="D", color="black",
                   zorder=3, label="paper")
    top = max([m + s for m, s in zip(means, stds, strict=True)] + [v for _, v in paper])
    for x, m, s, many in zip(xs, means, stds, several, strict=True):
        text = f"{m:.1f}" + (" (n=1)" if any(several) and not many else "")
        ax.text(x, m + s + 0.01 * top, text, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0.0, max(top * 1.12, 1.0))
    ax.set_xticks(xs, _labels(groups), rotation=35, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set_ylabel(ylabel + ", mean over seeds")
    ax.set_title(title or _default_title(groups), fontsize=10, loc="left")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if any(several) or paper:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, frameon=False)
    return True


def _empty(ax: Any, title: str, text: str) -> None:
    """An axes of a grid cell without data: its title and ``text``, no frame."""
    ax.set_title(title, fontsize=10, loc="left")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="grey",
            transform=ax.transAxes)
    ax.set_axis_off()


def grid_figure(charts: Sequence[tuple[str, Sequence[Group]]]) -> Any:
    """Several charts in one figure: a grid with one row per (title, groups) chart, its curves
    (:func:`draw_curves`) on the left and its bars (:func:`draw_bars`) on the right; a cell
    without data says so. Matplotlib's constrained layout keeps the legends and tick labels
    clear of the neighbouring cells. A ``Figure`` (rows x 2 axes), or None without charts."""
    if not charts:
        return None
    # optional heavy dependency: matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bars_w = max(_bars_width(_bar_groups(members)) for _, members in charts)
    with _style():
        fig = Figure(figsize=(FIGSIZE[0] + bars_w + 2 * GRID_LEGEND_WIDTH,
                              GRID_ROW_HEIGHT * len(charts)), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(charts), 2, squeeze=False, width_ratios=[FIGSIZE[0], bars_w])
        for (title, members), (left, right) in zip(charts, axes, strict=True):
            if not draw_curves(left, members, title):
                _empty(left, title, "no per-epoch test values")
            if not draw_bars(right, members, title):
                _empty(right, title, "no " + primary_stat(members)[1])
        return fig


def grid_png(charts: Sequence[tuple[str, Sequence[Group]]]) -> bytes | None:
    """PNG of :func:`grid_figure` (None without charts)."""
    with _style():
        fig = grid_figure(charts)
        return None if fig is None else _png(fig)


def chart_stems(charts: Sequence[ChartKey]) -> dict[ChartKey, str]:
    """``<dataset>_<teacher>_<student>`` per chart, plus ``_<data>`` when one pair has charts
    of several data keys, plus ``_<task>`` on a chart of another task than classification when
    the same pair and data also have a chart of another task (unsafe characters become ``-``)."""
    per_pair: dict[tuple[str, str, str], set[Any]] = {}
    per_data: dict[tuple[Any, ...], int] = {}
    for key in charts:
        per_pair.setdefault(key[:3], set()).add(key[3])
        per_data[key[:4]] = per_data.get(key[:4], 0) + 1
    stems = {}
    for key in charts:
        pair = key[:3]
        stem = plot_stem("", pair)[1:]
        if len(per_pair[pair]) > 1:
            stem += "_" + _safe(data_label(key[3]) or "full")
        if per_data[key[:4]] > 1 and key[4] != DEFAULT_TASK:
            stem += "_" + _safe(key[4])
        stems[key] = stem
    return stems


def grid_stem(dataset: str, task: str) -> str:
    """``<dataset>`` of a (dataset, task) grid, plus ``_<task>`` for another task than
    classification (unsafe characters become ``-``)."""
    return _safe(dataset) + ("" if task == DEFAULT_TASK else "_" + _safe(task))


def render_plots(groups: Sequence[Group]) -> dict[str, bytes]:
    """``{file name: PNG bytes}``, in sorted order: the curves and bars of every chart
    (``curves_<stem>.png``, ``bars_<stem>.png``: :func:`chart_stems`) and, per (dataset, task),
    the grid of all its charts (``grid_<dataset>[_<task>].png``: :func:`grid_figure`)."""
    if not matplotlib_available():
        log.warning("matplotlib is not installed: the report has no plots "
                    "(pip install -e '.[report]' in the kdlab clone)")
        return {}
    charts = chart_groups(groups)
    stems = chart_stems(list(charts))
    out: dict[str, bytes] = {}
    grids: dict[tuple[str, str], list[tuple[str, Sequence[Group]]]] = {}
    for key, members in charts.items():
        title = _title(key[:3], data_label(key[3]))
        grids.setdefault((key[0], key[4]), []).append((title, members))
        for kind, fn in (("curves", curves_png), ("bars", bars_png)):
            png = fn(members, title)
            if png is not None:
                out[f"{kind}_{stems[key]}.png"] = png
    for (dataset, task), cells in grids.items():
        png = grid_png(cells)
        if png is not None:
            out[f"{GRID_PREFIX}{grid_stem(dataset, task)}.png"] = png
    return dict(sorted(out.items()))
