"""Report plots: test top-1 curves and best top-1 bars per (dataset, teacher, student).

matplotlib's Agg canvas draws them (no GUI, no pyplot state); figure size, dpi, style, colours
and the order of the methods are fixed, and the PNG carries no "Software" entry, so the same runs
give the same bytes again on the same installation.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from typing import Any

from kdlab.report.aggregate import Group

log = logging.getLogger(__name__)

FIGSIZE = (7.0, 4.2)
DPI = 100
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


def _figure(bottom: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.09, right=0.98, top=0.92, bottom=bottom)  # fixed: fast, stable
    return fig, fig.add_subplot()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _style() -> Any:
    import matplotlib.style

    return matplotlib.style.context("default")


def _title(pair: tuple[str, str, str]) -> str:
    dataset, teacher, student = pair
    return f"{dataset}: {teacher} -> {student}" if teacher != "none" else f"{dataset}: {student}"


def _labels(groups: Sequence[Group]) -> list[str]:
    short = [g.label for g in groups]
    return short if len(set(short)) == len(short) else [g.full_label for g in groups]


def curves_png(groups: Sequence[Group]) -> bytes | None:
    """Test top-1 per epoch, one line per group: mean over seeds with a min-max band."""
    series = []
    for g, label in zip(groups, _labels(groups), strict=True):
        per_epoch: dict[int, list[float]] = {}
        for r in g.runs:
            for epoch, value in r.curve("test_top1"):
                per_epoch.setdefault(epoch, []).append(value)
        if per_epoch:
            epochs = sorted(per_epoch)
            series.append((label, epochs, [sum(per_epoch[e]) / len(per_epoch[e])
                                             for e in epochs],
                           [min(per_epoch[e]) for e in epochs],
                           [max(per_epoch[e]) for e in epochs]))
    if not series:
        return None
    from matplotlib.ticker import MaxNLocator

    with _style():
        fig, ax = _figure(bottom=0.12)
        for color, (label, epochs, mean, lo, hi) in zip(_colors(len(series)), series,
                                                        strict=True):
            ax.plot(epochs, mean, color=color, linewidth=1.5, label=label,
                    marker="o" if len(epochs) == 1 else None)
            ax.fill_between(epochs, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(_title(groups[0].pair) + " (mean over seeds, min-max band)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        return _png(fig)


def bars_png(groups: Sequence[Group]) -> bytes | None:
    """Best top-1 mean +- std per group; the published number as a marker where known."""
    groups = [g for g in groups if g.row.get("best_top1_mean") is not None]
    if not groups:
        return None
    with _style():
        fig, ax = _figure(bottom=0.3)
        xs = list(range(len(groups)))
        means = [g.row["best_top1_mean"] for g in groups]
        stds = [g.row["best_top1_std"] or 0.0 for g in groups]
        ax.bar(xs, means, yerr=stds, color=_colors(len(groups)), capsize=4,
               label="ours: best top-1, mean +- std")
        paper = [(x, g.row["paper_top1"]) for x, g in zip(xs, groups, strict=True)
                 if g.row.get("paper_top1") is not None]
        if paper:
            ax.scatter([x for x, _ in paper], [v for _, v in paper], marker="D", color="black",
                       zorder=3, label="paper")
        values = means + [v for _, v in paper]
        lo = min(m - s for m, s in zip(means, stds, strict=True))
        lo = min([lo, *values])
        hi = max([m + s for m, s in zip(means, stds, strict=True)] + values)
        span = max(hi - lo, 1.0)
        ax.set_ylim(max(0.0, lo - 0.3 * span), hi + 0.15 * span)
        ax.set_xticks(xs, _labels(groups), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("best test top-1 (%)")
        ax.set_title(_title(groups[0].pair), fontsize=10, loc="left")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2,
                  frameon=False, borderaxespad=0.2)
        return _png(fig)


def render_plots(groups: Sequence[Group]) -> dict[str, bytes]:
    """``{file name: PNG bytes}`` of the curves and bars of every pair, in sorted order."""
    if not matplotlib_available():
        log.warning("matplotlib is not installed: the report has no plots "
                    "(pip install 'kdlab[report]')")
        return {}
    by_pair: dict[tuple[str, str, str], list[Group]] = {}
    for g in groups:
        by_pair.setdefault(g.pair, []).append(g)
    out: dict[str, bytes] = {}
    for pair in sorted(by_pair):
        for kind, fn in (("curves", curves_png), ("bars", bars_png)):
            png = fn(by_pair[pair])
            if png is not None:
                out[plot_stem(kind, pair) + ".png"] = png
    return out
