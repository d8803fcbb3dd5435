"""Report polish (issue 14): statistics named per column, validation runs, one-seed cells,
dropped empty columns, the student-alone baseline in every chart, teachers of the same
architecture kept apart, bar axes from zero. Run directories are written by hand."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from kdlab.report.aggregate import aggregate, chart_groups, scan_runs
from kdlab.report.build import build_report
from kdlab.report.paper import parse_paper_csv
from kdlab.report.plots import BASELINE_COLOR, DPI, bars_figure, bars_png, curves_figure

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_hex  # noqa: E402

PAPER = """source,dataset,teacher,student,method,metric,value
DKD-CVPR2022 / CRD-ICLR2020 READMEs,cifar100,resnet32x4,resnet8x4,kd,top1,73.33
"""
SHA_A, SHA_B = "a" * 64, "b" * 64


def write_run(root: Path, name: str, method: str, teacher: str | None, student: str,
              seed: int, tests: list[float], *, dataset: str = "fashion_mnist",
              train_fraction: float = 0.05, vals: list[float] | None = None,
              sha: str | None = SHA_A) -> Path:
    """A finished run directory with the summary keys the trainer writes (validation keys
    when ``vals`` is given: best epoch chosen on them)."""
    run = root / name / f"seed{seed}"
    run.mkdir(parents=True)
    data: dict[str, Any] = {"name": dataset, "train_fraction": train_fraction, "subset_seed": 0}
    if vals is not None:
        data["val_fraction"] = 0.1
    cfg: dict[str, Any] = {"name": name, "seed": seed, "data": data,
                           "student": {"arch": student}, "method": {"name": method}}
    if teacher:
        cfg["teacher"] = {"arch": teacher, "checkpoint": f"/ckpt/{(sha or 'x')[:4]}.pt"}
        info: dict[str, Any] = {"arch": teacher, "top1": 90.0}
        if sha:
            info["sha256"] = sha
        (run / "teacher.json").write_text(json.dumps(info))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = []
    for e, t in enumerate(tests, start=1):
        rec: dict[str, Any] = {"epoch": e, "test_top1": t}
        if vals is not None:
            rec["val_top1"] = vals[e - 1]
        records.append(rec)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary: dict[str, Any] = {"name": name, "method": method, "student": student,
                               "teacher": teacher, "dataset": dataset, "seed": seed,
                               "epochs": len(tests), "best_top1": max(tests),
                               "last_top1": tests[-1],
                               "best_epoch": 1 + tests.index(max(tests))}
    if vals is not None:
        best = 1 + vals.index(max(vals))
        summary.update(best_epoch=best, best_val_top1=max(vals), last_val_top1=vals[-1],
                       test_top1_at_best=tests[best - 1])
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "status.json").write_text(json.dumps({"state": "finished", "time": 1.7e9 + seed}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("polish") / "runs"
    for seed, (a, b) in enumerate([(70.0, 69.0), (72.0, 71.0), (74.0, 73.0)]):
        write_run(root, "kd/resnet14_resnet8", "kd", "resnet14", "resnet8", seed, [a - 5, a, b])
        # the student alone, run without a teacher, on the same data
        write_run(root, "student/resnet8", "vanilla", None, "resnet8", seed,
                  [60.0, 65.0 + seed, 64.0 + seed])
    # one seed only
    write_run(root, "dkd/resnet14_resnet8", "dkd", "resnet14", "resnet8", 0, [70.0, 76.5, 76.0])
    # another resnet14 checkpoint: another experiment, never merged with the first
    write_run(root, "kd_t2/resnet14_resnet8", "kd", "resnet14", "resnet8", 0, [50.0, 55.0, 54.0],
              sha=SHA_B)
    # the student alone on other data (the full training set): not this chart's baseline
    write_run(root, "student_full/resnet8", "vanilla", None, "resnet8", 0, [80.0, 85.0, 84.0],
              train_fraction=1.0)
    # cifar100 with a validation set: validation peaks at epoch 2, test at epoch 3
    for seed in (0, 1):
        write_run(root, "kd/resnet32x4_resnet8x4", "kd", "resnet32x4", "resnet8x4", seed,
                  [60.0, 70.0 + seed, 75.0 + seed], dataset="cifar100", train_fraction=1.0,
                  vals=[61.0, 78.0 + seed, 71.0], sha=None)
    return root


@pytest.fixture(scope="module")
def built(runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    paper = tmp_path_factory.mktemp("paper") / "paper.csv"
    paper.write_text(PAPER)
    return build_report(runs, runs.parent / "out", paper)


def _section(md: str, dataset: str) -> str:
    return md.split(f"## {dataset}\n", 1)[1].split("\n## ", 1)[0]


def _header(section: str) -> str:
    return next(ln for ln in section.splitlines() if ln.startswith("|"))


def _table_rows(section: str) -> list[dict[str, str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


def test_one_seed_shows_the_value_alone(built: Any) -> None:
    rows = _table_rows(_section(built.markdown.read_text(), "fashion_mnist"))
    dkd = next(r for r in rows if r["method"] == "dkd")
    assert dkd["seeds (n)"] == "1"
    assert dkd["best-on-test top-1"] == "76.50" and dkd["last-epoch top-1"] == "76.00"
    kd = next(r for r in rows if r["config name"] == "kd/resnet14_resnet8")
    assert kd["best-on-test top-1"] == "72.00 ± 2.00"  # mean ± sample std of 70, 72, 74
    md = built.markdown.read_text()
    assert "± 0.00" not in md
    assert "± 0.00" not in built.html.read_text()


def test_empty_columns_are_dropped_per_dataset(built: Any) -> None:
    md = built.markdown.read_text()
    fm, cf = _section(md, "fashion_mnist"), _section(md, "cifar100")
    fm_header = _header(fm)
    for gone in ("paper top-1", "paper statistic", "Δ", "top-5", "val top-1", "best-val"):
        assert gone not in fm_header, gone
    assert "teacher top-1" in fm_header
    cf_header = _header(cf)
    assert "paper top-1" in cf_header and "paper statistic" in cf_header
    assert "teacher top-1" in cf_header
    # one data config per cifar100 row: no data column, a note instead
    assert "| data |" not in cf_header and "Data of every row: val 10%" in cf
    # the rows differ in data on fashion_mnist (5% and the full set): a data column
    assert "| data |" in fm_header and "train 5%" in fm
    # the CSV keeps every column, empty cells included
    header = built.csv.read_text().splitlines()[0].split(",")
    assert {"paper_top1", "test_top1_at_best_mean", "best_val_top1_mean"} <= set(header)


def test_validation_columns_primary_first(built: Any) -> None:
    cf = _section(built.markdown.read_text(), "cifar100")
    header = [c.strip() for c in _header(cf).strip("|").split("|")]
    stats = [h for h in header if "top-1" in h and "paper" not in h and "teacher" not in h]
    assert stats[0] == "test top-1 at best-val epoch"
    assert stats[1:] == ["best val top-1", "best-on-test top-1", "last-epoch top-1"]
    assert "Primary column: test top-1 at best-val epoch" in cf
    row = _table_rows(cf)[0]
    assert row["test top-1 at best-val epoch"] == "70.50 ± 0.71"  # epoch 2: 70 and 71
    assert row["best val top-1"] == "78.50 ± 0.71"
    assert row["best-on-test top-1"] == "75.50 ± 0.71"  # epoch 3: chosen on the test set
    csv_row = next(csv.DictReader(io.StringIO(built.csv.read_text())))
    assert csv_row["dataset"] == "cifar100" and csv_row["selection"] == "val"
    assert float(csv_row["test_top1_at_best_mean"]) == pytest.approx(70.5)


def test_different_teachers_of_one_architecture_are_kept_apart(built: Any) -> None:
    rows = _table_rows(_section(built.markdown.read_text(), "fashion_mnist"))
    kd = {r["config name"]: r for r in rows if r["method"] == "kd"}
    assert kd["kd/resnet14_resnet8"]["teacher"] == "resnet14@aaaaaaaa"
    assert kd["kd/resnet14_resnet8"]["seeds (n)"] == "3"
    assert kd["kd_t2/resnet14_resnet8"]["teacher"] == "resnet14@bbbbbbbb"
    names = sorted(p.name for p in built.plots)
    assert "bars_fashion_mnist_resnet14-aaaaaaaa_resnet8.png" in names
    assert "bars_fashion_mnist_resnet14-bbbbbbbb_resnet8.png" in names
    # a single teacher checkpoint per architecture: the plain name, as before
    assert "bars_cifar100_resnet32x4_resnet8x4.png" in names
    assert _table_rows(_section(built.markdown.read_text(), "cifar100"))[0]["teacher"] == \
        "resnet32x4"


def _groups(runs: Path) -> Any:
    return aggregate(scan_runs(runs).finished, parse_paper_csv(PAPER))


def test_student_alone_is_in_every_teacher_chart(runs: Path) -> None:
    charts = chart_groups(_groups(runs))
    for teacher in ("resnet14@aaaaaaaa", "resnet14@bbbbbbbb"):
        key = next(k for k in charts if k[1] == teacher)
        members = charts[key]
        assert members[0].is_baseline and members[0].name == "student/resnet8"
        # the full-data baseline is another experiment: not in the 5% chart
        assert not any(g.name == "student_full/resnet8" for g in members)
        assert all(g.data_key == members[0].data_key for g in members)
    # the teacherless baseline keeps its own charts too
    assert sum(1 for k in charts if k[1] == "none" and k[0] == "fashion_mnist") == 2


def test_bars_start_at_zero_with_baseline_and_no_std_for_one_seed(runs: Path) -> None:
    charts = chart_groups(_groups(runs))
    key = next(k for k in charts if k[1] == "resnet14@aaaaaaaa")
    fig = bars_figure(charts[key], "title")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "student alone" and labels[1:] == ["dkd", "kd"]
    bars = ax.patches
    assert to_hex(bars[0].get_facecolor()) == BASELINE_COLOR
    assert [b.get_height() for b in bars] == pytest.approx([65.0 + 1.0, 76.5, 72.0])
    # error bars only for the groups with several seeds (baseline and kd, not dkd)
    (err,) = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    segments = err.lines[2][0].get_segments()
    assert sorted(round(s[0][0]) for s in segments) == [0, 2]
    texts = [t.get_text() for t in ax.texts]
    assert "76.5 (n=1)" in texts and not any("±" in t for t in texts)
    assert all(t.get_rotation() == 35 for t in ax.get_xticklabels())


def test_long_labels_are_not_cut_off(runs: Path) -> None:
    """The saved PNG is the tight bounding box of the drawing, which holds every tick label
    even where the rotated labels reach below the figure's nominal area."""
    charts = chart_groups(_groups(runs))
    members = charts[next(k for k in charts if k[1] == "resnet14@aaaaaaaa")]
    for g in members:  # long names, as the study's "dckd+fitnet (dckd_fitnet)"
        g.name = f"{g.name.split('/')[0]}_with_a_long_config_name/resnet14_resnet8"
    fig = bars_figure(members)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)  # pixels
    labels = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()]
    assert min(b.y0 for b in labels) < 0  # below the nominal figure: a fixed canvas cuts it
    for b in labels:
        assert tight.x0 <= b.x0 and b.x1 <= tight.x1 and tight.y0 <= b.y0 and b.y1 <= tight.y1
    png = bars_png(members)
    assert png is not None
    width, height = Image.open(io.BytesIO(png)).size
    pad = 2 * 0.1 * DPI
    assert width == pytest.approx(tight.width + pad, abs=2)
    assert height == pytest.approx(tight.height + pad, abs=2)


def test_validation_bars_show_test_at_best_val(runs: Path) -> None:
    charts = chart_groups(_groups(runs))
    key = next(k for k in charts if k[0] == "cifar100")
    fig = bars_figure(charts[key])
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0
    assert [b.get_height() for b in ax.patches] == pytest.approx([70.5])
    assert "best-val" in ax.get_ylabel()
    curves = curves_figure(charts[key])
    lines = curves.axes[0].get_lines()
    assert any(ln.get_linestyle() == ":" for ln in lines)  # the validation curve
    assert re.search(r"cifar100: resnet32x4 -> resnet8x4 \(val 10%\)",
                     curves.axes[0].get_title())
