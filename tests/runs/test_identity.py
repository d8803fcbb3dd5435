"""Reports that cannot mislead (issue 23): rows are experiments keyed by the stored config without
the seed (differing configs never merge, seeds do, a duplicated seed is flagged), runs trained
alone are labelled by what they are (teacher, student alone, trained alone), class-folder datasets
by their folder, and the charts of a table come as one grid. Run directories are written by hand
in the layout of kdlab.runs.rundir."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kdlab.config import validate_config
from kdlab.report.aggregate import (
    DUPLICATE_MARK,
    ROLE_ALONE,
    ROLE_DISTILLED,
    ROLE_STUDENT,
    ROLE_TEACHER,
    aggregate,
    chart_groups,
    scan_runs,
)
from kdlab.report.build import build_report
from kdlab.report.paper import parse_paper_csv
from kdlab.report.plots import bars_figure, curves_figure, grid_figure
from kdlab.runs.identity import (
    config_variants,
    dataset_labels,
    experiment_fingerprint,
)
from support import section, table_rows

pytest.importorskip("matplotlib")

PAPER = """source,dataset,teacher,student,method,metric,value
DKD-CVPR2022 / CRD-ICLR2020 READMEs,cifar100,resnet32x4,resnet8x4,teacher,top1,79.42
"""


def config(name: str, seed: int = 0, *, student: str = "resnet8", teacher: str | None = None,
           checkpoint: str | None = None, method: str = "kd", epochs: int = 4,
           data: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config as ``kdlab train|distill`` would store it (the rest is the schema's defaults)."""
    cfg: dict[str, Any] = {"name": name, "seed": seed,
                           "data": data or {"name": "fashion_mnist", "train_fraction": 0.05},
                           "student": {"arch": student},
                           "method": {"name": method if teacher else "vanilla"},
                           "optim": {"epochs": epochs, "milestones": [1]}}
    if teacher:
        cfg["teacher"] = {"arch": teacher, "checkpoint": checkpoint or "/ckpt/t.pt"}
    return cfg


def write_run(root: Path, rel: str, cfg: dict[str, Any], tests: list[float], *,
              finished: float = 1.7e9, teacher_sha: str | None = None) -> Path:
    """A finished run directory of ``cfg`` at ``root/rel`` with the test top-1 per epoch."""
    run = root / rel
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "test_top1": t}) + "\n" for e, t in enumerate(tests, start=1)))
    teacher = cfg.get("teacher")
    if teacher:
        info: dict[str, Any] = {"arch": teacher["arch"], "checkpoint": teacher["checkpoint"],
                                "top1": 90.0}
        if teacher_sha:
            info["sha256"] = teacher_sha
        (run / "teacher.json").write_text(json.dumps(info))
    summary = {"name": cfg["name"], "method": cfg["method"]["name"] if teacher else "vanilla",
               "student": cfg["student"]["arch"], "teacher": teacher["arch"] if teacher else None,
               "dataset": cfg["data"]["name"], "seed": cfg["seed"], "epochs": len(tests),
               "best_top1": max(tests), "last_top1": tests[-1],
               "best_epoch": 1 + tests.index(max(tests))}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "status.json").write_text(json.dumps({"state": "finished", "time": finished}))
    return run


def build(root: Path, tmp_path: Path, paper: str = PAPER) -> Any:
    (tmp_path / "paper.csv").write_text(paper)
    return build_report(root, tmp_path / "out", tmp_path / "paper.csv")


def groups_of(root: Path) -> Any:
    return aggregate(scan_runs(root).finished, parse_paper_csv(PAPER))


def csv_rows(report: Any) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(report.csv.read_text())))


# --------------------------------------------------------------------------- grouping
def test_configs_differing_in_epochs_stay_two_rows(tmp_path: Path) -> None:
    """The user's case: two seed-0 runs of one name, 2 and 8 epochs, were one row "n = 2" with
    error bars. They are two experiments: two rows of one seed each, told apart by the key."""
    root = tmp_path / "runs"
    write_run(root, "short/kd/seed0", config("kd/r14_r8", teacher="resnet14", epochs=2),
              [40.0, 39.88])
    write_run(root, "long/kd/seed0", config("kd/r14_r8", teacher="resnet14", epochs=8),
              [70.0, 81.88])
    report = build(root, tmp_path)
    rows = table_rows(section(report.markdown.read_text(), "fashion_mnist"))
    assert [(r["seeds (n)"], r["differs in"], r["best-on-test top-1"]) for r in rows] == [
        ("1", "optim.epochs=2", "40.00"), ("1", "optim.epochs=8", "81.88")]
    assert "±" not in section(report.markdown.read_text(), "fashion_mnist")
    assert "are different configs (never averaged together)" in report.markdown.read_text()
    assert sorted(r["variant"] for r in csv_rows(report)) == ["optim.epochs=2",
                                                               "optim.epochs=8"]
    # the charts: one line and one bar per config, labelled apart, no error bar, no band
    (members,) = chart_groups(report.groups).values()
    labels = [ln.get_label() for ln in curves_figure(members).axes[0].get_lines()]
    assert labels == ["kd, optim.epochs=2", "kd, optim.epochs=8"]
    ax = bars_figure(members).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert not [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]


def test_same_config_two_seeds_is_one_row(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, best in ((0, 70.0), (1, 72.0)):
        write_run(root, f"kd/seed{seed}", config("kd/r14_r8", seed, teacher="resnet14"),
                  [60.0, best])
    report = build(root, tmp_path)
    (row,) = csv_rows(report)
    assert row["n"] == "2" and row["seeds"] == "0 1" and row["variant"] == ""
    assert float(row["best_top1_mean"]) == pytest.approx(71.0)
    assert row["duplicates"] == ""
    # the key is the config fingerprint without the seed; the run's own fingerprint keeps it
    a, b = (validate_config(config("kd/r14_r8", s, teacher="resnet14")) for s in (0, 1))
    assert a.fingerprint() != b.fingerprint()
    assert experiment_fingerprint(a.to_dict()) == experiment_fingerprint(b.to_dict())
    assert row["experiment_fingerprint"] == experiment_fingerprint(a.to_dict())
    c = validate_config(config("kd/r14_r8", 0, teacher="resnet14", epochs=5))
    assert experiment_fingerprint(c.to_dict()) != experiment_fingerprint(a.to_dict())


def test_duplicate_seed_counts_once_and_is_flagged(tmp_path: Path) -> None:
    """Same config and seed in two run directories (a copied folder): the seed counts once
    (the newest finished run), the row is marked and a note names the directories."""
    root = tmp_path / "runs"
    cfg = config("kd/r14_r8", 0, teacher="resnet14")
    write_run(root, "kd/seed0", cfg, [60.0, 70.0], finished=1.7e9)
    write_run(root, "backup/kd/seed0", cfg, [60.0, 71.0], finished=1.7e9 + 50)
    write_run(root, "kd/seed1", config("kd/r14_r8", 1, teacher="resnet14"), [60.0, 74.0])
    report = build(root, tmp_path)
    md = report.markdown.read_text()
    (row,) = table_rows(section(md, "fashion_mnist"))
    assert row["seeds (n)"] == f"2 {DUPLICATE_MARK}"
    assert row["best-on-test top-1"] == "72.50 ± 2.12"  # 71 (newest seed 0) and 74
    assert (f"{DUPLICATE_MARK} Duplicate seed: the same config and seed in several run "
            "directories") in md
    assert "seed 0: backup/kd/seed0 (used), kd/seed0" in md
    (csv_row,) = csv_rows(report)
    assert csv_row["n"] == "2" and csv_row["seeds"] == "0 1"
    assert csv_row["duplicates"] == "seed 0: backup/kd/seed0 (used), kd/seed0"
    (g,) = report.groups
    assert [r.rel for r in g.runs] == ["backup/kd/seed0", "kd/seed1"]
    assert report.n_runs == 3
    assert "3 finished runs in 1 group (" in md and "1 run left out as duplicate seed" in md


def test_config_that_does_not_validate_is_grouped_as_stored(tmp_path: Path) -> None:
    """An older kdlab's (or a plugin's) config: compared as stored, with the same rule."""
    root = tmp_path / "runs"
    for rel, seed, epochs in (("a/seed0", 0, 4), ("a/seed1", 1, 4), ("b/seed0", 0, 9)):
        cfg = config("kd/r14_r8", seed, teacher="resnet14", epochs=epochs)
        cfg["removed_key"] = True  # unknown to this version: does not validate
        write_run(root, rel, cfg, [50.0, 60.0 + seed])
    groups = groups_of(root)
    assert [(len(g.runs), g.variant) for g in groups] == [(2, "optim.epochs=4"),
                                                          (1, "optim.epochs=9")]


def test_config_variants_name_the_differing_keys() -> None:
    base = validate_config(config("kd/x", teacher="resnet14")).to_dict()
    other = validate_config(config("kd/x", teacher="resnet14", epochs=8)).to_dict()
    many = validate_config({**config("kd/x", teacher="resnet14", epochs=9, method="dkd"),
                            "data": {"name": "fashion_mnist", "batch_size": 7}}).to_dict()
    fps = [experiment_fingerprint(c) for c in (base, other, many)]
    variants = config_variants([base, other, many], fps)
    # four differing keys (more than three): the first two, the count and the fingerprint
    assert variants == [
        f"data.train_fraction=0.05, data.batch_size=64, +2 more, config {fps[0][:8]}",
        f"data.train_fraction=0.05, data.batch_size=64, +2 more, config {fps[1][:8]}",
        f"data.train_fraction=1.0, data.batch_size=7, +2 more, config {fps[2][:8]}"]
    assert config_variants([base, other], fps[:2]) == ["optim.epochs=4", "optim.epochs=8"]
    # configs that agree (groups kept apart by something else): the fingerprint alone
    assert config_variants([base, base], fps[:1] * 2) == [f"config {fps[0][:8]}"] * 2


# --------------------------------------------------------------------------- roles
def test_teacher_trained_alone_is_labelled_teacher(tmp_path: Path) -> None:
    """A teacher recipe trained alone (no teacher section) is the teacher of the distillation
    runs whose teacher checkpoint lies in its run directory, or whose teacher.json sha256 is
    its checkpoint's; its student baseline is the student alone; anything else trained alone
    is "trained alone"."""
    root = tmp_path / "runs"
    cifar = {"name": "cifar100"}
    teacher = write_run(root, "my_teacher/r32x4/seed0",
                        config("my_teacher/r32x4", student="resnet32x4", data=cifar), [70., 79.])
    best = teacher / "checkpoints" / "best.pt"
    best.write_bytes(b"teacher weights")
    write_run(root, "kd/seed0", config("kd/r32x4_r8x4", student="resnet8x4", teacher="resnet32x4",
                                       checkpoint=str(best), data=cifar), [60.0, 74.0])
    write_run(root, "student/r8x4/seed0", config("student/r8x4", student="resnet8x4", data=cifar),
              [60.0, 72.0])
    write_run(root, "vgg/seed0", config("teacher/vgg13", student="vgg13", data=cifar), [60., 70.])
    report = build(root, tmp_path)
    roles = {g.name: g.role for g in report.groups}
    assert roles == {"my_teacher/r32x4": ROLE_TEACHER, "kd/r32x4_r8x4": ROLE_DISTILLED,
                     "student/r8x4": ROLE_STUDENT, "teacher/vgg13": ROLE_ALONE}
    labels = {g.name: g.label for g in report.groups}
    assert labels["my_teacher/r32x4"] == "teacher (my_teacher)"
    assert labels["student/r8x4"] == "student alone"
    assert labels["teacher/vgg13"] == "trained alone (teacher)"
    rows = {r["config name"]: r for r in table_rows(section(report.markdown.read_text(),
                                                            "cifar100"))}
    assert rows["my_teacher/r32x4"]["role"] == "teacher"
    assert rows["teacher/vgg13"]["role"] == "trained alone"
    assert rows["my_teacher/r32x4"]["paper top-1"] == "79.42"  # the paper's teacher row
    # in the teacher's own chart it is the teacher, not "student alone"
    charts = chart_groups(report.groups)
    key = next(k for k in charts if k[2] == "resnet32x4")
    ax = bars_figure(charts[key]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["teacher (my_teacher)"]


def test_teacher_found_by_checkpoint_sha256(tmp_path: Path) -> None:
    """The teacher's best.pt copied elsewhere (teachers/cifar100/...): found by sha256."""
    root = tmp_path / "runs"
    teacher = write_run(root, "t/seed0", config("t/r14", student="resnet14"), [60.0, 80.0])
    (teacher / "checkpoints" / "best.pt").write_bytes(b"weights")
    sha = hashlib.sha256(b"weights").hexdigest()
    write_run(root, "kd/seed0", config("kd/r14_r8", teacher="resnet14",
                                       checkpoint="/elsewhere/r14.pth"), [60.0, 70.0],
              teacher_sha=sha)
    write_run(root, "other/seed0", config("other/r14", student="resnet14", epochs=3),
              [60.0, 81.0])
    roles = {g.name: g.role for g in groups_of(root)}
    assert roles == {"t/r14": ROLE_TEACHER, "kd/r14_r8": ROLE_DISTILLED, "other/r14": ROLE_ALONE}


# --------------------------------------------------------------------------- folder datasets
def test_folder_datasets_are_labelled_by_their_folder(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for rel, data_root, best in (("a", "/data/my_images", 70.0), ("b", "/data/other/", 60.0),
                                 ("c", "/x/imgs", 50.0), ("d", "/y/imgs", 40.0)):
        data = {"name": "folder", "root": data_root}
        write_run(root, f"{rel}/seed0", config(f"student/{rel}", data=data), [30.0, best])
    report = build(root, tmp_path)
    md = report.markdown.read_text()
    headings = [ln[3:] for ln in md.splitlines() if ln.startswith("## ")]
    assert headings == ["folder:/x/imgs", "folder:/y/imgs", "folder:my_images", "folder:other"]
    assert "70.00" in section(md, "folder:my_images") and "60.00" in section(md, "folder:other")
    assert "50.00" in section(md, "folder:/x/imgs") and "40.00" in section(md, "folder:/y/imgs")
    assert {r["dataset"] for r in csv_rows(report)} == set(headings)
    assert "grid_folder-my_images.png" in {p.name for p in report.plots}
    assert dataset_labels(["cifar100", "folder:/d/a", None]) == {
        "cifar100": "cifar100", "folder:/d/a": "folder:a", None: None}


# --------------------------------------------------------------------------- grid
def test_charts_of_a_table_are_laid_out_in_a_grid(tmp_path: Path) -> None:
    """One figure per table: a row per chart (teacher -> student pair and data), the curves
    left and the bars right; the HTML page embeds it; the single charts stay files."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, f"kd/seed{seed}", config("kd/r14_r8", seed, teacher="resnet14"),
                  [60.0, 70.0 + seed])
        write_run(root, f"student/seed{seed}", config("student/r8", seed), [55.0, 65.0 + seed])
    write_run(root, "kd8x4/seed0", config("kd/r14_r8x4", student="resnet8x4",
                                          teacher="resnet14"), [50.0, 66.0])
    report = build(root, tmp_path)
    charts = chart_groups(report.groups)
    assert len(charts) == 3  # r14 -> r8, r14 -> r8x4, r8 alone
    fig = grid_figure([(str(k), members) for k, members in charts.items()])
    assert len(fig.axes) == 6
    assert {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(3, 2)}
    cells = [ax.get_subplotspec().get_geometry()[2] for ax in fig.axes]
    assert cells == list(range(6))
    assert [ax.get_xlabel() for ax in fig.axes[0::2]] == ["epoch"] * 3  # curves left
    assert all("best-on-test" in ax.get_ylabel() for ax in fig.axes[1::2])  # bars right
    names = sorted(p.name for p in report.plots)
    assert names == ["bars_fashion_mnist_none_resnet8.png",
                     "bars_fashion_mnist_resnet14_resnet8.png",
                     "bars_fashion_mnist_resnet14_resnet8x4.png",
                     "curves_fashion_mnist_none_resnet8.png",
                     "curves_fashion_mnist_resnet14_resnet8.png",
                     "curves_fashion_mnist_resnet14_resnet8x4.png",
                     "grid_fashion_mnist.png"]
    html = report.html.read_text()
    assert html.count("<img") == 1 and 'alt="grid_fashion_mnist.png"' in html


def test_grid_cell_without_data_says_so(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = write_run(root, "kd/seed0", config("kd/r14_r8", teacher="resnet14"), [60.0, 70.0])
    (run / "metrics.jsonl").write_text("")  # no per-epoch values: no curve
    (members,) = chart_groups(groups_of(root)).values()
    fig = grid_figure([("title", members)])
    curves, bars = fig.axes
    assert not curves.axison and curves.texts[0].get_text() == "no per-epoch test values"
    assert bars.patches and bars.axison
