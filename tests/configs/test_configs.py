"""The CIFAR-100 reproduction configs: every published cell has its file, with the spec's values.

The expected per-pair values below are written from the project spec
(``benchmarks.md``: protocol, DKD beta per pair, SDD scale set M per pair; ``methods.md``:
method defaults and partner weights), NOT read from the configs.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

import kdlab
import kdlab.methods  # noqa: F401  (registers the methods)
from kdlab.cli.main import main
from kdlab.config import ExperimentConfig, load_config
from kdlab.methods.compose import build_params
from kdlab.methods.registry import get_method

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
CIFAR = CONFIGS / "cifar100"
PAPER_CSV = Path(kdlab.__file__).resolve().parent / "report" / "paper_results.csv"

# ----------------------------------------------------------------------------- the spec
TABLE_SOURCES = {
    "SDD-CVPR2024 Table 1",
    "SDD-CVPR2024 Table 2",
    "SDD-CVPR2024 Table 6",
    "SDD-CVPR2024 Table 7",
    "SDD-CVPR2024 Table 8",
    "DKD-CVPR2022 / CRD-ICLR2020 READMEs",
}
IMPLEMENTED = {"kd", "dkd", "nkd", "sd_kd", "sd_dkd", "sd_nkd", "fitnet", "at", "rkd", "sp",
               "pkt", "crd", "reviewkd"}
NOT_IMPLEMENTED = {"mgd", "semckd", "wcord"}  # published baselines kdlab does not implement
ABLATIONS = {"sd_kd_consistent_only", "sd_kd_complementary_only", "sd_kd_M1", "sd_kd_M12",
             "sd_kd_M14", "sd_kd_M124", "sd_kd_beta1", "sd_kd_beta2", "sd_kd_beta4",
             "sd_kd_beta6", "sd_kd_beta8"}

TEACHER_ACC = {"resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61,
               "vgg13": 74.64, "ResNet50": 79.34}
SMALL_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}  # lr 0.01

TABLE1 = [("resnet32x4", "MobileNetV2"), ("wrn_40_2", "vgg8"), ("wrn_40_2", "MobileNetV2"),
          ("ResNet50", "ShuffleV1")]
TABLE2 = [("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"),
          ("resnet32x4", "ShuffleV2"), ("vgg13", "MobileNetV2"), ("wrn_40_2", "ShuffleV1")]
SAME_ARCH = [("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8")]
ALL_PAIRS = TABLE1 + TABLE2 + SAME_ARCH

# DKD beta per pair (benchmarks.md; "SDD's code also uses 6 for wrn_40_2->MobileNetV2 and
# wrn_40_2->vgg8"); 8 otherwise.
DKD_BETA = {
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("wrn_40_2", "MobileNetV2"): 6.0,
    ("wrn_40_2", "vgg8"): 6.0,
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("resnet32x4", "MobileNetV2"): 8.0,
    ("resnet32x4", "ShuffleV1"): 8.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("ResNet50", "ShuffleV1"): 8.0,
    ("ResNet50", "MobileNetV2"): 8.0,
    ("ResNet50", "vgg8"): 8.0,
    ("wrn_40_2", "ShuffleV1"): 8.0,
}

# SDD scale set M per (pair, method) (benchmarks.md table, from the official scripts).
M12, M124 = [1, 2], [1, 2, 4]
SDD_M = {
    **{(p, m): M12 for p in [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
       for m in ("sd_kd", "sd_dkd", "sd_nkd")},
    **{(p, m): M124 for p in [("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
                              ("resnet32x4", "MobileNetV2"), ("wrn_40_2", "ShuffleV1"),
                              ("wrn_40_2", "MobileNetV2"), ("ResNet50", "ShuffleV1"),
                              ("ResNet50", "MobileNetV2"), ("vgg13", "MobileNetV2")]
       for m in ("sd_kd", "sd_dkd", "sd_nkd")},
    **{(p, m): M124 for p in [("wrn_40_2", "vgg8"), ("ResNet50", "vgg8")]
       for m in ("sd_kd", "sd_dkd")},
    **{(p, "sd_nkd"): M12 for p in [("wrn_40_2", "vgg8"), ("ResNet50", "vgg8")]},
}

# Partner weights (methods.md): name -> expected resolved params.
PARTNER = {
    "fitnet": {"weight": 100.0, "hint_layer": 2},
    "at": {"weight": 1000.0, "p": 2.0},
    "rkd": {"weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0},
    "sp": {"weight": 3000.0},
    "pkt": {"weight": 30000.0},
    "crd": {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5},
    "reviewkd": {"weight": 1.0, "warmup_epochs": 20},
}


# ----------------------------------------------------------------------------- helpers
def cell_path(method: str, teacher: str, student: str) -> Path:
    """The config file of a CSV cell (the mapping docs/configs.md documents)."""
    if method == "teacher":
        return CIFAR / "teachers" / f"{teacher}.yaml"
    if method == "student":
        return CIFAR / "vanilla" / f"{student}.yaml"
    if method in ABLATIONS:
        return CIFAR / "ablation" / method / f"{teacher}_{student}.yaml"
    return CIFAR / method / f"{teacher}_{student}.yaml"


def cell_name(method: str, teacher: str, student: str) -> str:
    if method in ("teacher", "student"):
        return f"{method}/{teacher if method == 'teacher' else student}"
    return f"{method}/{teacher}_{student}"


def paper_cells() -> list[tuple[str, str, str, str]]:
    with PAPER_CSV.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [(r["source"], r["method"], r["teacher"], r["student"]) for r in rows
            if r["dataset"] == "cifar100" and r["source"] in TABLE_SOURCES]


def resolved(cfg: ExperimentConfig) -> Any:
    """The method's params with every default filled in (what the run will use)."""
    return build_params(cfg.method.name, cfg.method.params, "method.params")


def _load(path: Path) -> ExperimentConfig:
    assert path.is_file(), f"missing config {path.relative_to(REPO)}"
    return load_config(path)


def check_protocol(cfg: ExperimentConfig, student: str) -> None:
    assert cfg.data.name == "cifar100"
    assert cfg.data.batch_size == 64
    assert cfg.data.crop_padding == 4 and cfg.data.hflip
    o = cfg.optim
    assert o.lr == (0.01 if student in SMALL_STUDENTS else 0.05)
    assert (o.momentum, o.weight_decay, o.epochs, o.milestones, o.gamma) == (
        0.9, 5e-4, 240, [150, 180, 210], 0.1)
    assert not o.nesterov
    assert o.clip_grad_norm == "auto"


def check_teacher(cfg: ExperimentConfig, teacher: str) -> None:
    assert cfg.teacher is not None
    assert cfg.teacher.arch == teacher
    assert cfg.teacher.checkpoint == f"teachers/cifar100/{teacher}.pth"
    assert cfg.teacher.expected_accuracy == TEACHER_ACC[teacher]


def check_method(cfg: ExperimentConfig, method: str, pair: tuple[str, str]) -> None:
    """The spec's values for ``method`` on ``pair`` (CSV method names, ablations included)."""
    p = resolved(cfg)
    beta = DKD_BETA[pair]
    if method == "kd":
        assert cfg.method.name == "kd"
        assert (p.temperature, p.ce_weight, p.kd_weight) == (4.0, 0.1, 0.9)
    elif method == "dkd":
        assert cfg.method.name == "dkd"
        assert (p.alpha, p.beta, p.temperature, p.warmup_epochs, p.ce_weight) == (
            1.0, beta, 4.0, 20, 1.0
        )
    elif method == "nkd":
        # the SDD official NKD baseline: T 1, gamma 1.5, warm-up 20, legacy mask
        assert cfg.method.name == "nkd"
        assert (p.temperature, p.gamma, p.warmup_epochs, p.ce_weight, p.legacy) == (
            1.0, 1.5, 20, 1.0, True)
    elif method in ("sd_kd", "sd_dkd", "sd_nkd"):
        assert cfg.method.name == method
        assert p.scales == SDD_M[(pair, method)]
        assert (p.sdd_beta, p.consistent_weight, p.pooling, p.criterion, p.reduction) == (
            2.0, 1.0, "nested", "correctness", "mean")
        assert get_method(method).default_clip_grad_norm == 40.0  # "auto" -> clip 40
        if method == "sd_kd":
            assert (p.temperature, p.ce_weight, p.kd_weight) == (4.0, 0.1, 0.9)
        elif method == "sd_dkd":
            assert (p.alpha, p.beta, p.temperature, p.warmup_epochs, p.ce_weight) == (
                1.0, beta, 4.0, 20, 1.0)
        else:
            assert (p.legacy, p.temperature, p.gamma, p.warmup_epochs, p.ce_weight) == (
                True, 4.0, beta, 20, 1.0)
    elif method in PARTNER:
        assert cfg.method.name == method
        assert not cfg.method.partners
        want = dict(PARTNER[method])
        if method == "reviewkd" and pair == ("resnet32x4", "resnet8x4"):
            want["weight"] = 5.0
        assert {k: getattr(p, k) for k in want} == want
    elif method.startswith("sd_kd_"):
        assert cfg.method.name == "sd_kd"
        assert (p.temperature, p.ce_weight, p.kd_weight) == (4.0, 0.1, 0.9)
        assert (p.pooling, p.criterion, p.reduction) == ("nested", "correctness", "mean")
        tag = method[len("sd_kd_"):]
        if tag.startswith("M"):
            assert p.scales == [int(c) for c in tag[1:]]
            assert (p.sdd_beta, p.consistent_weight) == (2.0, 1.0)
        elif tag.startswith("beta"):
            assert p.scales == SDD_M[(pair, "sd_kd")]
            assert (p.sdd_beta, p.consistent_weight) == (float(tag[4:]), 1.0)
        elif tag == "consistent_only":
            assert p.scales == SDD_M[(pair, "sd_kd")]
            assert (p.sdd_beta, p.consistent_weight) == (0.0, 1.0)
        elif tag == "complementary_only":
            assert p.scales == SDD_M[(pair, "sd_kd")]
            assert (p.sdd_beta, p.consistent_weight) == (2.0, 0.0)
        else:  # pragma: no cover
            raise AssertionError(f"unknown ablation {method}")
    else:  # pragma: no cover
        raise AssertionError(f"no expectation for method {method}")


# ----------------------------------------------------------------------------- tests
def test_config_check_passes(capsys):
    assert main(["config", "check", str(CONFIGS)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out


def test_paper_csv_is_packaged():
    assert PAPER_CSV.is_file()
    with PAPER_CSV.open(newline="") as f:
        header = next(csv.reader(f))
    assert header == ["source", "dataset", "teacher", "student", "method", "metric", "value"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "report/paper_results.csv" in pyproject


def test_every_paper_cell_is_known():
    methods = {m for _, m, _, _ in paper_cells()}
    unknown = methods - IMPLEMENTED - ABLATIONS - NOT_IMPLEMENTED - {"teacher", "student"}
    assert not unknown, f"CSV methods with no mapping: {sorted(unknown)}"
    assert len(paper_cells()) > 200


CELLS = sorted({(m, t, s) for _, m, t, s in paper_cells() if m not in NOT_IMPLEMENTED})


@pytest.mark.parametrize(("method", "teacher", "student"), CELLS,
                         ids=[f"{m}/{t}_{s}" for m, t, s in CELLS])
def test_paper_cell_config(method, teacher, student):
    path = cell_path(method, teacher, student)
    cfg = _load(path)
    assert cfg.name == cell_name(method, teacher, student)
    if method == "teacher":
        assert cfg.teacher is None and cfg.method.name == "vanilla"
        assert cfg.student.arch == teacher
        check_protocol(cfg, teacher)
        return
    assert cfg.student.arch == student
    check_protocol(cfg, student)
    if method == "student":
        assert cfg.teacher is None and cfg.method.name == "vanilla"
        assert resolved(cfg).ce_weight == 1.0
        return
    check_teacher(cfg, teacher)
    check_method(cfg, method, (teacher, student))


def test_expected_pair_table_covers_the_csv():
    pairs = {(t, s) for _, m, t, s in paper_cells()}
    assert pairs == set(ALL_PAIRS)
    assert set(DKD_BETA) == pairs


def test_teacher_and_student_alone_configs_exist_for_every_model():
    for teacher in TEACHER_ACC:
        cfg = _load(CIFAR / "teachers" / f"{teacher}.yaml")
        assert cfg.teacher is None and cfg.method.name == "vanilla"
        assert cfg.name == f"teacher/{teacher}"
    for student in {s for _, s in ALL_PAIRS}:
        cfg = _load(CIFAR / "vanilla" / f"{student}.yaml")
        assert cfg.teacher is None and cfg.method.name == "vanilla"
        check_protocol(cfg, student)


DCKD_FOLDERS = {"dckd_fitnet": "fitnet", "dckd_crd": "crd", "dckd_rkd": "rkd",
                "dckd_reviewkd": "reviewkd"}


@pytest.mark.parametrize(("teacher", "student"), ALL_PAIRS)
def test_dckd_configs(teacher, student):
    pair = (teacher, student)
    folders = {"dckd": None}
    if pair in TABLE1 + TABLE2:
        folders.update(DCKD_FOLDERS)
    for folder, partner in folders.items():
        cfg = _load(CIFAR / folder / f"{teacher}_{student}.yaml")
        assert cfg.name == f"{folder}/{teacher}_{student}"
        check_protocol(cfg, student)
        check_teacher(cfg, teacher)
        assert cfg.method.name == "dckd"
        p = resolved(cfg)
        assert (p.alpha, p.beta, p.temperature, p.warmup_epochs, p.ce_weight) == (
            1.0, DKD_BETA[pair], 4.0, 20, 1.0)
        assert (p.target_rule, p.nontarget_source) == ("max", "teacher")
        if partner is None:
            assert not cfg.method.partners
            continue
        assert [q.name for q in cfg.method.partners] == [partner]
        q = build_params(partner, cfg.method.partners[0].params, "method.partners.0.params")
        assert {k: getattr(q, k) for k in PARTNER[partner]} == PARTNER[partner]


def test_every_config_name_is_unique_and_matches_its_path():
    names: dict[str, Path] = {}
    for f in sorted(CIFAR.rglob("*.yaml")):
        if f.name.startswith("_"):
            continue
        cfg = load_config(f)
        assert cfg.name not in names, f"{f} and {names[cfg.name]} share the name {cfg.name}"
        names[cfg.name] = f
        rel = f.relative_to(CIFAR)
        folder = rel.parts[-2]
        if folder == "teachers":
            assert cfg.name == f"teacher/{f.stem}"
        elif folder == "vanilla":
            assert cfg.name == f"student/{f.stem}"
        else:
            assert cfg.name == f"{folder}/{f.stem}"
        assert cfg.output_dir == "runs/cifar100"


def test_config_check_validates_sweep_specs(tmp_path, capsys):
    """`*.sweep.yaml` files are checked as sweep specs, not as experiment configs."""
    from kdlab.cli.main import main

    (tmp_path / "exp.yaml").write_text("student: {arch: resnet8}\n")
    (tmp_path / "ok.sweep.yaml").write_text("name: s\nconfigs: [exp.yaml]\nseeds: [0, 1]\n")
    assert main(["config", "check", str(tmp_path)]) == 0
    (tmp_path / "bad.sweep.yaml").write_text("name: s\nconfigs: [exp.yaml]\nseedz: [0]\n")
    assert main(["config", "check", str(tmp_path)]) == 1
    assert "seedz" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
