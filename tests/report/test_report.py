"""`kdlab report` on hand-written run directories (no training)."""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdlab.cli.main import main
from kdlab.report import paper as paper_mod
from kdlab.report.aggregate import strip_seed
from kdlab.report.build import Report, build_report
from kdlab.report.paper import load_paper_results, paper_method, parse_paper_csv

#: Optional: an external reference copy of the paper table to compare the packaged CSV with
#: (e.g. the project's reference folder). Unset on a plain clone: that comparison is skipped.
REFERENCE_CSV_ENV = "KDLAB_PAPER_REFERENCE_CSV"


def _packaged_paper_csv() -> str:
    """The paper CSV shipped as package data (``kdlab/report/paper_results.csv``)."""
    return importlib.resources.files("kdlab.report").joinpath("paper_results.csv").read_text(
        encoding="utf-8")

PAPER_TEXT = """source,dataset,teacher,student,method,metric,value
DKD-CVPR2022 / CRD-ICLR2020 READMEs,cifar100,resnet32x4,resnet8x4,teacher,top1,79.42
DKD-CVPR2022 / CRD-ICLR2020 READMEs,cifar100,resnet32x4,resnet8x4,student,top1,72.5
DKD-CVPR2022 / CRD-ICLR2020 READMEs,cifar100,resnet32x4,resnet8x4,kd,top1,73.33
SDD-CVPR2024 Table 6,cifar100,resnet32x4,resnet8x4,kd,top1,73.33
DKD-CVPR2022 / CRD-ICLR2020 READMEs,cifar100,resnet32x4,resnet8x4,dkd,top1,76.32
SDD-CVPR2024 Table 7,cifar100,resnet32x4,resnet8x4,sd_kd_M12,top1,76.63
SDD-CVPR2024 Table 2,cifar100,resnet32x4,ShuffleV1,sd_kd,top1,76.3
"""

# (config name, method, teacher, student, seed, best, last, top5 or None, teacher top-1)
RUNS: list[tuple[str, str, str | None, str, int, float, float, float | None, float | None]] = [
    ("kd/resnet32x4_resnet8x4", "kd", "resnet32x4", "resnet8x4", 0, 73.10, 72.80, 92.5, 79.40),
    ("kd/resnet32x4_resnet8x4", "kd", "resnet32x4", "resnet8x4", 1, 73.55, 73.40, 92.9, 79.40),
    ("kd/resnet32x4_resnet8x4", "kd", "resnet32x4", "resnet8x4", 2, 72.95, 72.50, 92.1, 79.40),
    ("dkd/resnet32x4_resnet8x4", "dkd", "resnet32x4", "resnet8x4", 0, 76.00, 75.90, None, 79.4),
    ("dkd/resnet32x4_resnet8x4", "dkd", "resnet32x4", "resnet8x4", 1, 76.40, 76.10, None, 79.4),
    ("sd_kd_M12/resnet32x4_resnet8x4", "sd_kd", "resnet32x4", "resnet8x4", 0, 76.2, 76.0,
     None, 79.4),
    ("student/resnet8x4", "vanilla", None, "resnet8x4", 0, 72.0, 71.7, None, None),
    ("dckd+fitnet/resnet32x4_resnet8x4", "dckd+fitnet", "resnet32x4", "resnet8x4", 0, 76.5,
     76.3, None, 79.4),
]


def _curve(best: float, last: float, epochs: int = 4) -> list[float]:
    values = [best - 3.0 + i * 0.5 for i in range(epochs - 2)]
    return [*values, best, last]


def write_run(root: Path, name: str, method: str, teacher: str | None, student: str, seed: int,
              best: float, last: float, top5: float | None, teacher_top1: float | None,
              finished: bool = True, state: str = "finished") -> Path:
    """A run directory in the layout of kdlab.runs.rundir, written by hand."""
    run = root / name / f"seed{seed}"
    (run / "checkpoints").mkdir(parents=True)
    cfg: dict[str, Any] = {"name": name, "seed": seed, "data": {"name": "cifar100"},
                           "student": {"arch": student},
                           "method": {"name": method.split("+")[0]}}
    if teacher:
        cfg["teacher"] = {"arch": teacher, "checkpoint": "t.pth"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    curve = _curve(best, last)
    lines = []
    for epoch, acc in enumerate(curve, start=1):
        rec: dict[str, Any] = {"epoch": epoch, "test_top1": acc, "train_loss": 1.0 / epoch}
        if top5 is not None:
            rec["test_top5"] = top5 - (len(curve) - epoch) * 0.1
        lines.append(json.dumps(rec, sort_keys=True))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if teacher_top1 is not None:
        (run / "teacher.json").write_text(json.dumps({"arch": teacher, "top1": teacher_top1,
                                                      "top5": 95.0}))
    if finished:
        summary = {"name": name, "method": method, "student": student, "teacher": teacher,
                   "dataset": "cifar100", "seed": seed, "epochs": len(curve),
                   "best_top1": best, "best_epoch": len(curve) - 1, "last_top1": last,
                   "last_top5": top5 if top5 is not None else math.nan,
                   "best_top5": top5 if top5 is not None else math.nan}
        (run / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    status: dict[str, Any] = {"state": state, "time": 1_700_000_000.0 + seed, "epoch": 2}
    if state == "failed":
        status["error"] = "NonFiniteLossError: non-finite loss at epoch 3"
    (run / "status.json").write_text(json.dumps(status))
    return run


def _make_runs(root: Path) -> Path:
    for spec in RUNS:
        write_run(root, *spec)
    write_run(root, "nkd/resnet32x4_resnet8x4", "nkd", "resnet32x4", "resnet8x4", 0, 70.0, 69.0,
              None, 79.4, finished=False, state="failed")
    write_run(root, "nkd/resnet32x4_resnet8x4", "nkd", "resnet32x4", "resnet8x4", 1, 70.0, 69.0,
              None, 79.4, finished=False, state="running")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Report]:
    """(runs folder, paper CSV, the report built once) shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("report")
    runs = _make_runs(tmp / "runs")
    paper = tmp / "paper.csv"
    paper.write_text(PAPER_TEXT)
    return runs, paper, build_report(runs, tmp / "out", paper)


@pytest.fixture()
def runs_dir(built: tuple[Path, Path, Report]) -> Path:
    return built[0]


@pytest.fixture()
def paper_csv(built: tuple[Path, Path, Report]) -> Path:
    return built[1]


@pytest.fixture()
def report(built: tuple[Path, Path, Report]) -> Report:
    return built[2]


def _csv_rows(path: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    return {r["name"]: r for r in rows}


def test_aggregation_mean_std_best_last(report: Report) -> None:
    rows = _csv_rows(report.csv)
    assert report.n_runs == len(RUNS)
    assert len(rows) == 5
    kd = [r for r in RUNS if r[0].startswith("kd/")]
    r = rows["kd/resnet32x4_resnet8x4"]
    assert r["n"] == "3" and r["seeds"] == "0 1 2"
    for col, idx in (("best_top1", 5), ("last_top1", 6), ("best_top5", 7)):
        values = np.array([run[idx] for run in kd], dtype=float)
        assert float(r[f"{col}_mean"]) == pytest.approx(values.mean(), abs=1e-4)
        assert float(r[f"{col}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-4)
    assert float(r["teacher_top1"]) == pytest.approx(79.40)
    # one seed: std 0; top-5 not measured: empty
    one = rows["sd_kd_M12/resnet32x4_resnet8x4"]
    assert one["n"] == "1" and float(one["best_top1_std"]) == 0.0
    assert one["best_top5_mean"] == "" and one["last_top5_mean"] == ""
    md = report.markdown.read_text()
    mean, std = np.mean([x[5] for x in kd]), np.std([x[5] for x in kd], ddof=1)
    assert f"{mean:.2f} ± {std:.2f}" in md
    # the headers name the statistic (best-on-test / last-epoch; issue 14)
    assert "best-on-test top-5" in md and "last-epoch top-1" in md


def test_paper_matching_and_difference(report: Report) -> None:
    rows = _csv_rows(report.csv)
    kd = rows["kd/resnet32x4_resnet8x4"]
    kd_best = np.mean([x[5] for x in RUNS if x[0].startswith("kd/")])
    assert float(kd["paper_top1"]) == 73.33
    assert float(kd["diff_top1"]) == pytest.approx(kd_best - 73.33, abs=1e-4)
    assert kd["paper_statistic"] == "last"  # the CRD number, copied by SDD Table 6
    dkd = rows["dkd/resnet32x4_resnet8x4"]
    assert float(dkd["paper_top1"]) == 76.32 and dkd["paper_statistic"] == "best"
    # ablation: the config name's first segment is the CSV method
    abl = rows["sd_kd_M12/resnet32x4_resnet8x4"]
    assert abl["paper_method"] == "sd_kd_M12" and float(abl["paper_top1"]) == 76.63
    assert float(abl["diff_top1"]) == pytest.approx(76.2 - 76.63, abs=1e-4)
    # vanilla -> student (no teacher in the run: any teacher's student row, all agree)
    st = rows["student/resnet8x4"]
    assert st["paper_method"] == "student" and float(st["paper_top1"]) == 72.5
    # no paper cell: empty
    other = rows["dckd+fitnet/resnet32x4_resnet8x4"]
    assert other["paper_top1"] == "" and other["diff_top1"] == ""
    md = report.markdown.read_text()
    assert "paper statistic" in md and "best test accuracy over epochs" in md
    assert "last-epoch test accuracy" in md
    assert "+-0.xx" not in md and f"{kd_best - 73.33:+.2f}" in md


def test_paper_csv_rules() -> None:
    table = parse_paper_csv(_packaged_paper_csv(), "kdlab/report/paper_results.csv")
    assert len(table) > 250
    assert len(load_paper_results()) == len(table)  # the default is the packaged copy
    v = table.lookup("cifar100", "resnet32x4", "resnet8x4", "kd")
    assert v is not None and v.value == 73.33 and v.statistic == "last" and len(v.sources) == 2
    v = table.lookup("cifar100", "resnet32x4", "resnet8x4", "dkd")
    assert v is not None and v.statistic == "best"
    v = table.lookup("imagenet", "ResNet34", "ResNet18", "sd_dkd", "top5")
    assert v is not None and v.value == 91.21
    assert table.lookup("cifar100", "resnet32x4", "resnet8x4", "nonexistent") is None
    known = table.methods
    assert paper_method("sd_kd_M12/resnet32x4_resnet8x4", "sd_kd", known) == "sd_kd_M12"
    assert paper_method("cifar_main/resnet32x4_resnet8x4", "sd_kd", known) == "sd_kd"
    assert paper_method("x", "vanilla", known) == "student"
    assert strip_seed("kd/r32x4_r8x4/seed1") == "kd/r32x4_r8x4"
    assert strip_seed("kd_seed2") == "kd"
    with pytest.raises(Exception, match="not a number"):
        parse_paper_csv("source,dataset,teacher,student,method,metric,value\na,b,c,d,e,f,x\n")


def test_packaged_paper_csv_equals_reference_copy() -> None:
    ref = os.environ.get(REFERENCE_CSV_ENV)
    if not ref or not Path(ref).is_file():
        pytest.skip(f"no external reference paper CSV (set {REFERENCE_CSV_ENV} to compare the "
                    "packaged copy with it)")
    assert _packaged_paper_csv() == Path(ref).read_text(encoding="utf-8")


def test_packaged_paper_csv_missing_is_graceful(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    class _Files:
        def joinpath(self, name: str) -> Path:
            return tmp_path / "absent" / name

    monkeypatch.setattr(paper_mod.importlib.resources, "files", lambda pkg: _Files())
    table = load_paper_results()
    assert len(table) == 0 and table.origin is None


def test_unfinished_runs_listed_separately(report: Report) -> None:
    assert sorted(u.rel for u in report.unfinished) == [
        "nkd/resnet32x4_resnet8x4/seed0", "nkd/resnet32x4_resnet8x4/seed1"]
    assert "nkd" not in {g.method for g in report.groups}
    assert "nkd" not in report.csv.read_text()
    md = report.markdown.read_text()
    table, _, rest = md.partition("## Unfinished or failed runs (2)")
    assert rest, md
    assert "nkd/" not in table
    assert "`nkd/resnet32x4_resnet8x4/seed0`: failed at epoch 2: NonFiniteLossError" in rest
    assert "`nkd/resnet32x4_resnet8x4/seed1`: running" in rest
    assert "8 finished runs" in md and "2 unfinished or failed" in md
    assert "nkd/resnet32x4_resnet8x4/seed0" in report.html.read_text()


def test_regeneration_is_byte_identical(runs_dir: Path, paper_csv: Path, tmp_path: Path) -> None:
    first = build_report(runs_dir, tmp_path / "a", paper_csv)
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    stale = tmp_path / "a" / "bars_cifar100_old_pair.png"  # a pair that is gone: removed
    stale.write_bytes(b"x")
    again = build_report(runs_dir, tmp_path / "a", paper_csv)
    second = build_report(runs_dir, tmp_path / "b", paper_csv)
    for rep in (again, second):
        out = {p.name: p.read_bytes() for p in rep.out_dir.iterdir()}
        assert out.keys() == files.keys()
        for name in ("results.md", "results.csv"):
            assert out[name] == files[name], name
        for name in files:  # PNGs and the HTML embedding them are stable too
            assert out[name] == files[name], name
    assert not stale.exists()
    assert first.markdown.read_text().startswith("# kdlab results")
    assert "Date: 2023-11-14" in first.markdown.read_text()  # the newest run's day, not today


def test_html_is_self_contained(report: Report) -> None:
    html = report.html.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert 'src="http' not in html and "href=" not in html and "<link" not in html
    assert "<script" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    # the page embeds the grid of each table (the single charts are files beside it)
    assert len(srcs) == 1 and len(report.plots) == 5
    assert 'alt="grid_cifar100.png"' in html
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "kd/resnet32x4_resnet8x4" in html and "76.63" in html


def test_png_files(report: Report) -> None:
    names = sorted(p.name for p in report.plots)
    assert names == ["bars_cifar100_none_resnet8x4.png", "bars_cifar100_resnet32x4_resnet8x4.png",
                     "curves_cifar100_none_resnet8x4.png",
                     "curves_cifar100_resnet32x4_resnet8x4.png", "grid_cifar100.png"]
    for p in report.plots:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
        assert b"Software" not in data and b"matplotlib" not in data.lower()


def test_cli_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs_dir = _make_runs(tmp_path / "runs")
    paper_csv = tmp_path / "paper.csv"
    paper_csv.write_text(PAPER_TEXT)
    assert main(["report", str(runs_dir), "--paper", str(paper_csv)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(runs_dir / "report" / "results.md")
    assert (runs_dir / "report" / "results.html").is_file()
    md = (runs_dir / "report" / "results.md").read_bytes()
    # the report folder inside the runs folder is not taken for a run the next time
    assert main(["report", str(runs_dir), "--paper", str(paper_csv)]) == 0
    assert (runs_dir / "report" / "results.md").read_bytes() == md


def test_cli_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "runs folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no kdlab run" in capsys.readouterr().err
    write_run(tmp_path / "r", "kd/a", "kd", "resnet32x4", "resnet8x4", 0, 1.0, 1.0, None, None)
    assert main(["report", str(tmp_path / "r"), "--paper", str(tmp_path / "no.csv")]) == 2
    assert "paper results file not found" in capsys.readouterr().err


def test_imagenet_and_cub_model_names_map_to_paper_names() -> None:
    from kdlab.report.paper import load_paper_results, paper_arch

    assert paper_arch("resnet34_imagenet") == "ResNet34"
    assert paper_arch("MobileNetV1_imagenet") == "MobileNetV1"
    assert paper_arch("resnet32x4_cub") == "resnet32x4"
    assert paper_arch("ShuffleV1") == "ShuffleV1"
    table = load_paper_results()
    hit = table.lookup("imagenet", "resnet34_imagenet", "resnet18_imagenet", "sd_dkd")
    assert hit is not None and hit.value > 70
