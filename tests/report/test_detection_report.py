"""`kdlab report` over detection runs (summary["task"] == "detection"): the headline metric is
COCO box AP (then AP50, AP75) instead of top-1. Run directories are written by hand in the
layout the trainer writes for detection (summary/metrics/teacher keys named after the metric);
the expected numbers are computed here with numpy from the same per-seed values."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdlab.report.aggregate import TASK_METRICS, aggregate, chart_groups, metric_spec, scan_runs
from kdlab.report.build import (
    CSV_COLUMNS,
    STAT_HEADERS,
    build_report,
    csv_columns,
    metric_csv_columns,
    stat_headers,
)
from kdlab.report.paper import parse_paper_csv
from kdlab.report.plots import bars_figure, curves_figure
from support import section, table_rows

pytest.importorskip("matplotlib")

DATASET = "coco:fm-detection"
TEACHER, STUDENT = "resnet18_imagenet", "MobileNetV2_imagenet"
TEACHER_METRICS = {"AP": 31.25, "AP50": 52.5, "AP75": 33.0, "APs": 10.0, "APm": 30.0,
                   "APl": float("nan"), "AR1": 25.0, "AR10": 40.0, "AR100": 41.0}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")
EMPTY_PAPER = "source,dataset,teacher,student,method,metric,value\n"


def det_curve(base: float, epochs: int = 4) -> list[dict[str, float]]:
    """Per-epoch test metrics of one run: AP rises, peaks at epoch 3, drops at the last one
    (so best-on-test and last-epoch differ); AP50 / AP75 follow AP."""
    aps = [base - 3.0, base - 1.0, base, base - 0.5][:epochs]
    return [{"AP": ap, "AP50": 1.6 * ap + 2.0, "AP75": 1.05 * ap - 0.5, "APs": ap / 3,
             "APm": ap, "APl": float("nan"), "AR1": ap * 0.8, "AR10": ap * 1.2,
             "AR100": ap * 1.3} for ap in aps]


def write_det_run(root: Path, name: str, method: str, teacher: str | None, student: str,
                  seed: int, base: float, *, dataset: str = DATASET,
                  val_bases: list[float] | None = None) -> Path:
    """A finished detection run directory with the files and keys the trainer writes
    (``val_bases``: per-epoch validation AP; the best epoch is then chosen on it)."""
    run = root / name / f"seed{seed}"
    run.mkdir(parents=True)
    data: dict[str, Any] = {"name": "coco", "root": "/data/fm-detection", "subset_seed": 0,
                            "train_fraction": 1.0,
                            "val_fraction": 0.1 if val_bases is not None else 0.0}
    cfg: dict[str, Any] = {"name": name, "seed": seed, "task": "detection", "data": data,
                           "student": {"arch": student}, "method": {"name": method}}
    if teacher:
        cfg["teacher"] = {"arch": teacher, "checkpoint": "/ckpt/teacher.pt"}
        (run / "teacher.json").write_text(json.dumps(
            {"arch": teacher, "checkpoint": "/ckpt/teacher.pt", "sha256": "c" * 64,
             "expected_AP": None, **TEACHER_METRICS}))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    tests = det_curve(base)
    records = []
    for epoch, m in enumerate(tests, start=1):
        rec: dict[str, Any] = {"epoch": epoch, "lr": 0.02, "train_loss": 2.0 / epoch,
                               "train_roi_acc": 80.0 + epoch,
                               "train_terms": {"ce": 0.5, "rpn_objectness": 0.3,
                                               "rpn_box_reg": 0.1, "roi_box_reg": 0.2,
                                               "dkd": 0.4},
                               **{f"test_{k}": v for k, v in m.items()}}
        if val_bases is not None:
            rec["val_AP"] = val_bases[epoch - 1]
        records.append(rec)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary: dict[str, Any] = {"name": name, "task": "detection", "method": method,
                               "student": student, "teacher": teacher, "dataset": dataset,
                               "seed": seed, "epochs": len(tests), "skipped_steps": 0,
                               "train_img_per_s": 3.0, "wall_time_s": 10.0}
    for k in METRICS:
        summary[f"last_{k}"] = tests[-1][k]
        summary[f"best_{k}"] = max(t[k] for t in tests)
    aps = [t["AP"] for t in tests]
    if val_bases is None:
        summary["best_epoch"] = 1 + aps.index(max(aps))
    else:
        best = 1 + val_bases.index(max(val_bases))
        summary.update(best_epoch=best, best_val_AP=max(val_bases),
                       last_val_AP=val_bases[-1])
        for k in METRICS:
            summary[f"test_{k}_at_best"] = tests[best - 1][k]
    if teacher:
        summary["teacher_AP"] = TEACHER_METRICS["AP"]
    # NaN as the trainer writes it (json allows it): never evaluated, shown as unknown
    (run / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    (run / "status.json").write_text(json.dumps({"state": "finished", "time": 1.75e9 + seed}))
    return run


#: (config name, method, teacher, per-seed AP peak): 2 methods x 3 seeds + the student alone
STUDY = [("kd/r18_mv2", "kd", TEACHER, [20.0, 21.5, 22.0]),
         ("sd_dkd/r18_mv2", "sd_dkd", TEACHER, [23.0, 24.0, 26.5]),
         ("student/mv2", "vanilla", None, [18.0, 18.5, 19.75])]


def write_study(root: Path) -> Path:
    for name, method, teacher, bases in STUDY:
        for seed, base in enumerate(bases):
            write_det_run(root, name, method, teacher, STUDENT, seed, base)
    return root


def write_cls_run(root: Path, name: str, method: str, teacher: str | None, seed: int,
                  tests: list[float], dataset: str = "fashion_mnist") -> Path:
    """A finished classification run as before tasks existed (no ``task`` key)."""
    run = root / name / f"seed{seed}"
    run.mkdir(parents=True)
    cfg: dict[str, Any] = {"name": name, "seed": seed, "data": {"name": dataset},
                           "student": {"arch": "resnet8"}, "method": {"name": method}}
    if teacher:
        cfg["teacher"] = {"arch": teacher, "checkpoint": "/ckpt/t.pt"}
        (run / "teacher.json").write_text(json.dumps({"arch": teacher, "top1": 90.0}))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "test_top1": t}) + "\n" for e, t in enumerate(tests, start=1)))
    (run / "summary.json").write_text(json.dumps(
        {"name": name, "method": method, "student": "resnet8", "teacher": teacher,
         "dataset": dataset, "seed": seed, "epochs": len(tests), "best_top1": max(tests),
         "last_top1": tests[-1], "best_epoch": 1 + tests.index(max(tests))}))
    (run / "status.json").write_text(json.dumps({"state": "finished", "time": 1.7e9 + seed}))
    return run


def write_cls_study(root: Path) -> Path:
    for seed in range(2):
        write_cls_run(root, "kd/resnet14_resnet8", "kd", "resnet14", seed, [60.0, 70.0 + seed])
        write_cls_run(root, "student/resnet8", "vanilla", None, seed, [55.0, 65.0 + seed])
    return root


# --------------------------------------------------------------------------- helpers
def assert_pm(cell: str, values: list[float]) -> None:
    """The ``mean ± sample std`` cell holds the mean and std of ``values`` computed here with
    numpy (to the 2 decimals shown: half a unit of the last digit)."""
    arr = np.asarray(values, dtype=float)
    mean, std = (float(x) for x in cell.split(" ± "))
    assert mean == pytest.approx(arr.mean(), abs=0.0051), cell
    assert std == pytest.approx(arr.std(ddof=1), abs=0.0051), cell


def per_seed(bases: list[float], key: str, which: str) -> list[float]:
    out = []
    for b in bases:
        curve = det_curve(b)
        vals = [c[key] for c in curve]
        out.append(max(vals) if which == "best" else vals[-1])
    return out


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    tmp = tmp_path_factory.mktemp("det_report")
    runs = write_study(tmp / "runs")
    paper = tmp / "paper.csv"
    paper.write_text(EMPTY_PAPER)
    return runs, build_report(runs, tmp / "out", paper)


# --------------------------------------------------------------------------- tests
def test_detection_table_has_ap_mean_std(study: tuple[Path, Any]) -> None:
    _, report = study
    md = report.markdown.read_text()
    assert f"## {DATASET} (detection)" in md
    sec = section(md, f"{DATASET} (detection)")
    assert "Task: detection. AP = COCO box mAP over IoU 0.50:0.95" in sec
    header = next(ln for ln in sec.splitlines() if ln.startswith("|"))
    assert "top-1" not in header and "top-5" not in header
    rows = {r["config name"]: r for r in table_rows(sec)}
    assert list(rows) == ["student/mv2", "kd/r18_mv2", "sd_dkd/r18_mv2"]  # no teacher first
    for name, _, teacher, bases in STUDY:
        row = rows[name]
        assert row["seeds (n)"] == "3"
        for label, key in (("AP", "AP"), ("AP50", "AP50"), ("AP75", "AP75")):
            assert_pm(row[f"best-on-test {label}"], per_seed(bases, key, "best"))
            assert_pm(row[f"last-epoch {label}"], per_seed(bases, key, "last"))
        assert row["teacher AP"] == (f"{TEACHER_METRICS['AP']:.2f}" if teacher else "—")
    # no validation set, no paper cell: those columns are dropped, as for classification
    for gone in ("best-val", "best val", "paper", "Δ"):
        assert gone not in header, gone
    # the header says which metric each task's tables use
    assert "detection: AP, then AP50, AP75" in md


def test_detection_csv_columns_are_named_after_the_metric(study: tuple[Path, Any]) -> None:
    _, report = study
    text = report.csv.read_text()
    header = text.splitlines()[0].split(",")
    assert tuple(header) == (*metric_csv_columns(TASK_METRICS["detection"]), "task")
    assert not any("top1" in c or "top5" in c for c in header)
    rows = {r["name"]: r for r in csv.DictReader(io.StringIO(text))}
    kd = rows["sd_dkd/r18_mv2"]
    bases = STUDY[1][3]
    for key in ("AP", "AP50", "AP75"):
        vals = np.asarray(per_seed(bases, key, "best"))
        assert float(kd[f"best_{key}_mean"]) == pytest.approx(vals.mean(), abs=1e-4)
        assert float(kd[f"best_{key}_std"]) == pytest.approx(vals.std(ddof=1), abs=1e-4)
        last = np.asarray(per_seed(bases, key, "last"))
        assert float(kd[f"last_{key}_mean"]) == pytest.approx(last.mean(), abs=1e-4)
    assert float(kd["teacher_AP"]) == TEACHER_METRICS["AP"]
    assert kd["task"] == "detection" and kd["selection"] == "test"
    assert kd["paper_AP"] == "" and kd["diff_AP"] == ""  # no published detection number
    assert rows["student/mv2"]["teacher_AP"] == ""


def test_detection_plots_use_ap(study: tuple[Path, Any]) -> None:
    runs, report = study
    stem = "coco-fm-detection_resnet18_imagenet_MobileNetV2_imagenet"
    names = {p.name for p in report.plots}
    assert {f"curves_{stem}.png", f"bars_{stem}.png"} <= names
    for p in report.plots:
        assert p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    groups = aggregate(scan_runs(runs).finished, parse_paper_csv(EMPTY_PAPER))
    charts = chart_groups(groups)
    key = next(k for k in charts if k[1] == TEACHER)
    assert key[4] == "detection"
    members = charts[key]
    assert members[0].is_baseline  # the student alone in the teacher's chart, first
    bars = bars_figure(members).axes[0]
    assert bars.get_ylabel() == "best-on-test AP (%), mean over seeds"
    expected = [np.mean(per_seed(b, "AP", "best")) for b in (STUDY[2][3], STUDY[0][3],
                                                             STUDY[1][3])]
    assert [b.get_height() for b in bars.patches] == pytest.approx(expected)
    curves = curves_figure(members).axes[0]
    assert curves.get_ylabel() == "test AP (%)"
    # the curve of sd_dkd is the per-epoch mean of test_AP over its three seeds
    line = next(ln for ln in curves.get_lines() if ln.get_label() == "sd_dkd")
    per_epoch = np.mean([[c["AP"] for c in det_curve(b)] for b in STUDY[1][3]], axis=0)
    assert list(line.get_xdata()) == [1, 2, 3, 4]
    assert list(line.get_ydata()) == pytest.approx(per_epoch)


def test_detection_with_validation_and_a_paper_number(tmp_path: Path) -> None:
    """AP at the best-val epoch is the primary column; a paper AP row (a user's own CSV) is
    matched and Δ computed from the best-on-test AP mean."""
    vals = [[10.0, 30.0, 20.0, 5.0], [10.0, 32.0, 20.0, 5.0]]  # validation peaks at epoch 2
    for seed, base in enumerate([20.0, 22.0]):
        write_det_run(tmp_path / "runs", "kd/r18_mv2", "kd", TEACHER, STUDENT, seed, base,
                      val_bases=vals[seed])
    paper = tmp_path / "paper.csv"
    # the papers' architecture names, as for classification (resnet18_imagenet -> ResNet18)
    paper.write_text(EMPTY_PAPER + f"Some paper,{DATASET},ResNet18,MobileNetV2,kd,AP,21.0\n")
    report = build_report(tmp_path / "runs", tmp_path / "out", paper)
    sec = section(report.markdown.read_text(), f"{DATASET} (detection)")
    assert "Primary column: test AP at best-val epoch" in sec
    header = [c.strip() for c in
              next(ln for ln in sec.splitlines() if ln.startswith("|")).strip("|").split("|")]
    stats = [h for h in header if re.search(r"\bAP\b", h) and h not in ("teacher AP", "paper AP")]
    assert stats == ["test AP at best-val epoch", "best val AP", "best-on-test AP",
                     "last-epoch AP"]
    (row,) = table_rows(sec)
    at_best = [det_curve(b)[1]["AP"] for b in (20.0, 22.0)]  # epoch 2 of each seed
    assert_pm(row["test AP at best-val epoch"], at_best)
    assert_pm(row["best val AP"], [30.0, 32.0])
    best = np.mean([20.0, 22.0])
    assert row["paper AP"] == "21.00" and row["Δ best-on-test − paper"] == f"{best - 21.0:+.2f}"
    (g,) = report.groups
    assert g.row["selection"] == "val"
    fig = bars_figure(chart_groups(report.groups)[next(iter(chart_groups(report.groups)))])
    assert fig.axes[0].get_ylabel() == "test AP at best-val epoch (%), mean over seeds"


def test_mixed_tasks_give_separate_tables_and_classification_is_unchanged(
        tmp_path: Path) -> None:
    write_cls_study(tmp_path / "cls")
    write_cls_study(tmp_path / "mixed")
    write_study(tmp_path / "mixed")
    paper = tmp_path / "paper.csv"
    paper.write_text(EMPTY_PAPER)
    alone = build_report(tmp_path / "cls", tmp_path / "out_cls", paper)
    mixed = build_report(tmp_path / "mixed", tmp_path / "out_mixed", paper)
    md = mixed.markdown.read_text()
    assert [ln for ln in md.splitlines() if ln.startswith("## ")] == [
        f"## {DATASET} (detection)", "## fashion_mnist"]
    cls_sec = section(md, "fashion_mnist")
    assert "best-on-test top-1" in cls_sec and " AP" not in cls_sec
    assert "top-1" not in section(md, f"{DATASET} (detection)").split("\n|", 1)[1]
    # the classification table, its rows and its charts are those of the report without
    # detection runs, byte for byte
    assert cls_sec == section(alone.markdown.read_text(), "fashion_mnist")
    for p in alone.plots:
        assert (mixed.out_dir / p.name).read_bytes() == p.read_bytes(), p.name
    # a classification-only CSV keeps its historical columns; a mixed one adds the detection
    # columns after them, and the task
    assert alone.csv.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(mixed.csv.read_text())))
    header = mixed.csv.read_text().splitlines()[0].split(",")
    assert header[:len(CSV_COLUMNS)] == list(CSV_COLUMNS) and header[-1] == "task"
    tasks = {r["name"]: r["task"] for r in rows}
    assert tasks["kd/resnet14_resnet8"] == "classification"
    assert tasks["kd/r18_mv2"] == "detection"
    cls_row = next(r for r in rows if r["name"] == "kd/resnet14_resnet8")
    det_row = next(r for r in rows if r["name"] == "kd/r18_mv2")
    assert float(cls_row["best_top1_mean"]) == pytest.approx(70.5) and cls_row["best_AP_mean"] == ""
    assert det_row["best_top1_mean"] == "" and det_row["best_AP_mean"] != ""


def test_same_dataset_name_in_two_tasks_is_not_merged(tmp_path: Path) -> None:
    """A classification and a detection run that agree in everything but the task (dataset,
    student, config name, method, data) are two groups, two tables and two charts (the
    detection chart's file name ends in the task)."""
    write_cls_run(tmp_path / "runs", "student/x", "vanilla", None, 0, [50.0, 60.0],
                  dataset=DATASET)
    write_det_run(tmp_path / "runs" / "det", "student/x", "vanilla", None, "resnet8", 0, 20.0)
    paper = tmp_path / "paper.csv"
    paper.write_text(EMPTY_PAPER)
    report = build_report(tmp_path / "runs", tmp_path / "out", paper)
    assert sorted(g.task for g in report.groups) == ["classification", "detection"]
    md = report.markdown.read_text()
    assert f"## {DATASET}\n" in md and f"## {DATASET} (detection)\n" in md
    assert "60.00" in section(md, DATASET) and "20.00" in section(md, f"{DATASET} (detection)")
    names = sorted(p.name for p in report.plots)
    assert names == ["bars_coco-fm-detection_none_resnet8.png",
                     "bars_coco-fm-detection_none_resnet8_detection.png",
                     "curves_coco-fm-detection_none_resnet8.png",
                     "curves_coco-fm-detection_none_resnet8_detection.png",
                     "grid_coco-fm-detection.png", "grid_coco-fm-detection_detection.png"]


def test_metric_specs_and_column_layout(caplog: pytest.LogCaptureFixture) -> None:
    cls, det = TASK_METRICS["classification"], TASK_METRICS["detection"]
    assert metric_csv_columns(cls) == CSV_COLUMNS
    assert stat_headers(cls) == STAT_HEADERS
    assert csv_columns([cls, cls]) == CSV_COLUMNS
    assert [h for _, h in stat_headers(det)][:4] == [
        "test AP at best-val epoch", "best val AP", "best-on-test AP", "last-epoch AP"]
    assert {"best_AP75_mean", "last_AP75_std", "test_AP75_at_best_mean"} <= set(
        metric_csv_columns(det))
    both = csv_columns([det, cls])
    assert len(both) == len(set(both)) and both[:len(CSV_COLUMNS)] == CSV_COLUMNS
    with caplog.at_level(logging.WARNING, logger="kdlab.report.aggregate"):
        assert metric_spec("segmentation-test-task") is cls
    assert "unknown task 'segmentation-test-task'" in caplog.text
    assert metric_spec(None) is cls
