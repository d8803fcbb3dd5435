"""The shipped configs (``configs/``), driven by one table.

:data:`ROWS` is the table: each row is ``(config path or glob under configs/, {key: expected
value})``. Every config file that a row names gets one test, ``test_config[<path>]``, which
checks every expectation of every row naming that file (a file named by several rows, e.g. a
paper cell that a glob row also covers, is checked against all of them). A key is a dotted
attribute of the loaded :class:`~kdlab.config.ExperimentConfig` (``optim.lr``, ``teacher``) or
a derived value (:func:`value`: ``params.beta`` is the method's resolved params, every default
filled in; ``partner.weight`` the partner's). A glob skips ``_*.yaml`` (inherited bases) and
``*.sweep.yaml`` (sweep specs). Checks that do not fit a table row (the paper CSV itself, names
unique across files, no stray files in a folder, detectors that build, ``kdlab config check``)
are plain tests at the end.

The expected values are written from the sources, NOT read from the configs:

* CIFAR-100 reproduction cells (every published cell of ``paper_results.csv`` has its file):
  the project spec (``benchmarks.md``: protocol, DKD beta per pair, SDD scale set M per pair;
  ``methods.md``: method defaults and partner weights);
* ImageNet and CUB-200 cells: ``benchmarks.md`` (ImageNet and CUB protocols, DKD beta and SDD
  scale sets), ``methods.md`` (KD/DKD/NKD/SDD defaults, ImageNet overrides, partner weights),
  ``docs/decisions.md`` item 4 (``nested_grid: 4`` for ImageNet ResNet34 -> ResNet18) and
  torchvision's published teacher weights; where the spec is silent the official SDD code
  decides (noted at each value);
* DIST, TTM, WTTM, WTTM + CRD, KD + DOT and SD-DKD + DOT (CIFAR-100): DIST_KD README and
  image_classification_sota ``dist_cifar.yaml`` (CE 1, DIST 2, tau 4, beta = gamma = 1, lr 0.01
  for MobileNetV2/ShuffleNets); zkxufo/TTM README commands (TTM: ``--ttm_l 0.1 -r 1 -b 45``;
  WTTM + CRD: ``--ttm_l 0.2 -b 0.8 -a 4``); mdistiller ``configs/cifar100/dot/*.yaml`` (KD,
  ``DOT.DELTA 0.075``, lr 0.01 for ShuffleV2);
* logit standardization (LS, CVPR 2024) and CTKD (AAAI 2023) (CIFAR-100): the LS README's
  tables and its log file names ``KD_TYPE,TEACHER,STUDENT,BASE_TEMP,KD_WEIGHT[,BETA]``
  (sunshangquan/logit-standardization-KD @ f6e5aa5, ``logs/``), its ``tools/train.py`` rules
  (KD: T = base-temp, KD weight = kd-weight, CE 0.1; DKD: T = base-temp, alpha and beta times
  kd-weight, CE 1, warm-up 20) and CTKD's ``scripts/run_cifar_distill.sh`` (zhengli97/CTKD);
* detection (``configs/coco``, ``configs/detection``): valid for the detection task (which
  refuses methods and partners that do not apply to RoIs), the detector's loss at weight 1, and
  every distinct (arch, detection section) pair builds its detector (``pretrained`` off, no
  network): anchor sizes matching the backbone's pyramid, a RoI head with K + 1 outputs.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

import kdlab
import kdlab.methods  # noqa: F401  (registers the methods)
from kdlab.cli.main import main
from kdlab.config import ExperimentConfig, load_config
from kdlab.methods.compose import build_params
from kdlab.methods.registry import get_method
from kdlab.tasks import task_for

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
PAPER_CSV = Path(kdlab.__file__).resolve().parent / "report" / "paper_results.csv"

Row = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class FromPath:
    """An expected value computed from the config file's path (relative to ``configs/``)."""

    describe: str
    of: Callable[[Path], Any]


@dataclass(frozen=True)
class Satisfies:
    """An expected property rather than a value."""

    describe: str
    test: Callable[[Any], bool]


NOT_NONE = Satisfies("not None", lambda v: v is not None)
#: ``<folder>/<stem>``, with ``teachers`` -> ``teacher`` and ``vanilla`` -> ``student``
NAMED_BY_PATH = FromPath("<folder>/<stem> (teachers -> teacher, vanilla -> student)", lambda p: (
    f"{ {'teachers': 'teacher', 'vanilla': 'student'}.get(p.parent.name, p.parent.name)}"
    f"/{p.stem}"))


# ============================================================================ CIFAR-100 spec
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
CIFAR_DCKD_FOLDERS = {"dckd_fitnet": "fitnet", "dckd_crd": "crd", "dckd_rkd": "rkd",
                      "dckd_reviewkd": "reviewkd"}

# DIST, TTM, WTTM (+ CRD) and DOT cells
DIST_PAIRS = [("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"),
              ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"),
              ("resnet32x4", "ShuffleV2")]
TTM_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
             ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
             ("wrn_40_2", "ShuffleV1")]
DOT_PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV2")]
NEWER_CELLS = ([("dist", t, s) for t, s in DIST_PAIRS]
               + [(f, t, s) for f in ("ttm", "wttm", "wttm_crd") for t, s in TTM_PAIRS]
               + [("kd_dot", t, s) for t, s in DOT_PAIRS]
               + [("sd_dkd_dot", "resnet32x4", "resnet8x4")])

# LS and CTKD cells. pair -> (KD+LS base-temp, kd-weight), from logs/KD/
KD_LS = {
    ("resnet32x4", "resnet8x4"): (2, 9), ("vgg13", "vgg8"): (3, 9),
    ("wrn_40_2", "wrn_40_1"): (2, 9), ("wrn_40_2", "wrn_16_2"): (2, 9),
    ("resnet56", "resnet20"): (2, 9), ("resnet110", "resnet32"): (2, 9),
    ("resnet110", "resnet20"): (4, 12), ("resnet32x4", "ShuffleV2"): (2, 9),
    ("resnet32x4", "wrn_16_2"): (3, 9), ("resnet32x4", "wrn_40_2"): (3, 9),
    ("wrn_40_2", "resnet8x4"): (2, 9), ("wrn_40_2", "MobileNetV2"): (3, 9),
    ("vgg13", "MobileNetV2"): (3, 9), ("ResNet50", "MobileNetV2"): (3, 1),
}
# pair -> (DKD+LS base-temp, kd-weight, DKD beta before the kd-weight factor), from logs/DKD/
# (a log name without a beta: the official config's beta, 8 for both such pairs)
DKD_LS = {
    ("resnet32x4", "resnet8x4"): (2, 9, 8.0), ("vgg13", "vgg8"): (2, 15, 2.0),
    ("wrn_40_2", "wrn_40_1"): (2, 12, 2.0), ("wrn_40_2", "wrn_16_2"): (2, 12, 2.0),
    ("resnet56", "resnet20"): (3, 18, 2.0), ("resnet110", "resnet32"): (2, 15, 2.0),
    ("resnet110", "resnet20"): (2, 15, 2.0), ("resnet32x4", "ShuffleV2"): (2, 9, 8.0),
    ("resnet32x4", "wrn_16_2"): (2, 9, 2.0), ("resnet32x4", "wrn_40_2"): (2, 9, 8.0),
    ("wrn_40_2", "resnet8x4"): (2, 18, 2.0), ("wrn_40_2", "MobileNetV2"): (2, 15, 2.0),
    ("vgg13", "MobileNetV2"): (3, 9, 2.0), ("ResNet50", "MobileNetV2"): (2, 15, 2.0),
}
LS_PAIRS = sorted(KD_LS)
CTKD_BLOCK = {"t_start": 1.0, "t_end": 20.0, "init": 1.0, "lambda_max": 0.0,
              "lambda_min": -1.0, "lambda_epochs": 10}

#: folders whose every file must be a cell of the table (no stray configs)
EXACT_FOLDERS = {
    **{f"cifar100/{f}": {f"{t}_{s}" for g, t, s in NEWER_CELLS if g == f}
       for f in ("dist", "ttm", "wttm", "wttm_crd", "kd_dot", "sd_dkd_dot")},
    **{f"cifar100/{f}": {f"{t}_{s}" for t, s in LS_PAIRS}
       for f in ("kd_ls", "dkd_ls", "ctkd", "ctkd_ls")},
}

# ============================================================================ ImageNet spec
BEYOND_NOT_IMPLEMENTED = {"mgd", "semckd"}  # Table 5 baselines kdlab does not implement
IN_ARCH = {"ResNet34": "resnet34_imagenet", "ResNet18": "resnet18_imagenet",
           "ResNet50": "resnet50_imagenet", "MobileNetV1": "MobileNetV1_imagenet"}
# torchvision IMAGENET1K_V1 weight files (resnet<depth>-<sha256 prefix>.pth) and published top-1
IN_TEACHER = {"ResNet34": ("teachers/imagenet/resnet34-b627a593.pth", 73.314),
              "ResNet50": ("teachers/imagenet/resnet50-0676ba61.pth", 76.13)}
IN_PAIRS = [("ResNet34", "ResNet18"), ("ResNet50", "MobileNetV1")]
IN_DKD_BETA = {("ResNet34", "ResNet18"): 0.5, ("ResNet50", "MobileNetV1"): 2.0}
IN_M = {("ResNet34", "ResNet18"): [1, 2], ("ResNet50", "MobileNetV1"): [1, 2, 4]}
IN_DCKD_FOLDERS = {"dckd": None, "dckd_at": "at", "dckd_reviewkd": "reviewkd"}

# ============================================================================ CUB-200 spec
CUB_ARCH = {a: f"{a}_cub" for a in
            ("resnet32x4", "vgg13", "ResNet50", "MobileNetV2", "ShuffleV1", "vgg8")}
CUB_TEACHER_ACC = {"resnet32x4": 66.17, "vgg13": 70.19, "ResNet50": 60.01}
CUB_PAIRS = [("resnet32x4", "MobileNetV2"), ("resnet32x4", "ShuffleV1"),
             ("vgg13", "MobileNetV2"), ("vgg13", "vgg8"), ("ResNet50", "ShuffleV1")]
# the CIFAR rule (6 for vgg13->vgg8 and vgg13->MobileNetV2, else 8); the official SDD cub200
# configs agree (DKD.BETA 6.0 in the vgg13 files only)
CUB_DKD_BETA = {("resnet32x4", "MobileNetV2"): 8.0, ("resnet32x4", "ShuffleV1"): 8.0,
                ("vgg13", "MobileNetV2"): 6.0, ("vgg13", "vgg8"): 6.0,
                ("ResNet50", "ShuffleV1"): 8.0}
CUB_PARTNER = {
    "sp": {"weight": 3000.0},
    "crd": {"weight": 0.8, "feat_dim": 128, "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5},
    "reviewkd": {"weight": 1.0, "warmup_epochs": 20},
    "at": {"weight": 1000.0, "p": 2.0},
}

# ============================================================================ detection spec
DETECTION_GLOBS = ("coco/**/*.yaml", "detection/**/*.yaml")
COCO_PAIRS = ("r101_r18", "r101_r50", "r50_mv2")
COCO_METHODS = ("vanilla", "kd", "dkd", "dckd", "sd_dkd", "dkd_reviewkd")
DETECTION_DATA = ("fm_synthetic", "tree_crowns")
DETECTION_METHODS = ("teacher_resnet18", "vanilla", "kd", "dkd", "dckd", "sd_dkd",
                     "sd_dkd_interleaved", "dkd_reviewkd", "dkd_fitnet")


# ============================================================================ the paper CSV
def _csv_rows() -> list[dict[str, str]]:
    with PAPER_CSV.open(newline="") as f:
        return list(csv.DictReader(f))


def cifar_paper_cells() -> list[tuple[str, str, str, str]]:
    """(source, method, teacher, student) of the CIFAR-100 tables kdlab reproduces."""
    return [(r["source"], r["method"], r["teacher"], r["student"]) for r in _csv_rows()
            if r["dataset"] == "cifar100" and r["source"] in TABLE_SOURCES]


def beyond_paper_cells(dataset: str) -> list[tuple[str, str, str]]:
    """(method, teacher, student) of the SDD paper's ImageNet or CUB-200 cells kdlab implements
    (the transformer cells, DeiT's, have their own rows: :func:`transformer_rows`)."""
    return sorted({(r["method"], r["teacher"], r["student"]) for r in _csv_rows()
                   if r["dataset"] == dataset and r["source"].startswith("SDD-CVPR2024")
                   and r["method"] not in BEYOND_NOT_IMPLEMENTED})


def deit_paper_cells() -> list[tuple[str, str, str]]:
    """(method, teacher, student) of DeiT's published ImageNet cells (its README model zoo)."""
    return sorted({(r["method"], r["teacher"], r["student"]) for r in _csv_rows()
                   if r["source"] == "DeiT-ICML2021 README"})


# ============================================================================ expectations
def params(**values: Any) -> dict[str, Any]:
    """Expected resolved method params."""
    return {f"params.{k}": v for k, v in values.items()}


def partner(name: str, **values: Any) -> dict[str, Any]:
    """Exactly one partner, ``name``, with these resolved params."""
    return {"partners": [name], **{f"partner.{k}": v for k, v in values.items()}}


def kd(temperature: float = 4.0, ce: float = 0.1, kd_w: float = 0.9) -> dict[str, Any]:
    return params(temperature=temperature, ce_weight=ce, kd_weight=kd_w)


def dkd(beta: float, temperature: float = 4.0, warmup: int = 20) -> dict[str, Any]:
    return params(alpha=1.0, beta=beta, temperature=temperature, warmup_epochs=warmup,
                  ce_weight=1.0)


def nkd(warmup: int = 20) -> dict[str, Any]:
    """The SDD official NKD baseline: T 1, gamma 1.5, legacy mask."""
    return params(temperature=1.0, gamma=1.5, warmup_epochs=warmup, ce_weight=1.0, legacy=True)


def sd_nkd(gamma: float, temperature: float = 4.0, warmup: int = 20) -> dict[str, Any]:
    """Legacy NKD with T, gamma and warm-up of the DKD block."""
    return params(legacy=True, temperature=temperature, gamma=gamma, warmup_epochs=warmup,
                  ce_weight=1.0)


def sdd(method: str, scales: list[int]) -> dict[str, Any]:
    return {**params(scales=scales, sdd_beta=2.0, consistent_weight=1.0, pooling="nested",
                     criterion="correctness", reduction="mean"),
            "default_clip_grad_norm": 40.0}  # "auto" -> clip 40


def vanilla(arch: str) -> dict[str, Any]:
    return {"teacher": None, "method.name": "vanilla", "student.arch": arch}


def cifar_protocol(student: str) -> dict[str, Any]:
    return {"data.name": "cifar100", "data.batch_size": 64, "data.crop_padding": 4,
            "data.hflip": True, "optim.lr": 0.01 if student in SMALL_STUDENTS else 0.05,
            "optim.momentum": 0.9, "optim.weight_decay": 5e-4, "optim.epochs": 240,
            "optim.milestones": [150, 180, 210], "optim.gamma": 0.1, "optim.nesterov": False,
            "optim.clip_grad_norm": "auto"}


def cifar_distill(folder: str, teacher: str, student: str) -> dict[str, Any]:
    """Name, student, protocol and teacher of a CIFAR-100 distillation cell."""
    return {"name": f"{folder}/{teacher}_{student}", "student.arch": student,
            **cifar_protocol(student), "teacher.arch": teacher,
            "teacher.checkpoint": f"teachers/cifar100/{teacher}.pth",
            "teacher.expected_accuracy": TEACHER_ACC[teacher]}


def cifar_method(method: str, pair: tuple[str, str]) -> dict[str, Any]:
    """The spec's values for ``method`` on ``pair`` (CSV method names, ablations included)."""
    beta = DKD_BETA[pair]
    if method == "kd":
        return {"method.name": "kd", **kd()}
    if method == "dkd":
        return {"method.name": "dkd", **dkd(beta)}
    if method == "nkd":
        return {"method.name": "nkd", **nkd()}
    if method in ("sd_kd", "sd_dkd", "sd_nkd"):
        base = {"sd_kd": kd(), "sd_dkd": dkd(beta), "sd_nkd": sd_nkd(beta)}[method]
        return {"method.name": method, **sdd(method, SDD_M[(pair, method)]), **base}
    if method in PARTNER:
        want = dict(PARTNER[method])
        if method == "reviewkd" and pair == ("resnet32x4", "resnet8x4"):
            want["weight"] = 5.0
        return {"method.name": method, "partners": [], **params(**want)}
    if method in ABLATIONS:
        tag = method[len("sd_kd_"):]
        scales = SDD_M[(pair, "sd_kd")]
        sdd_beta, consistent = 2.0, 1.0
        if tag.startswith("M"):
            scales = [int(c) for c in tag[1:]]
        elif tag.startswith("beta"):
            sdd_beta = float(tag[4:])
        elif tag == "consistent_only":
            sdd_beta = 0.0
        else:
            assert tag == "complementary_only", method
            consistent = 0.0
        return {"method.name": "sd_kd", **kd(),
                **params(pooling="nested", criterion="correctness", reduction="mean",
                         scales=scales, sdd_beta=sdd_beta, consistent_weight=consistent)}
    raise AssertionError(f"no expectation for method {method}")


def imagenet_protocol() -> dict[str, Any]:
    return {"output_dir": "runs/imagenet", "data.name": "imagenet", "data.root_is_relative": True,
            "data.batch_size": 512, "data.eval_batch_size": 256,  # global batch 512
            "data.image_size": 224, "data.resize": 256, "data.hflip": True,
            "data.num_workers": 8, "optim.lr": 0.2, "optim.lr_scaling": "none",
            "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.nesterov": False,
            "optim.epochs": 100, "optim.milestones": [30, 60, 90], "optim.gamma": 0.1,
            "optim.clip_grad_norm": "auto"}


def imagenet_method(method: str, pair: tuple[str, str]) -> dict[str, Any]:
    beta = IN_DKD_BETA[pair]
    out: dict[str, Any] = {"method.name": method, "partners": []}
    if method == "kd":  # methods.md: ImageNet KD T 1, CE 0.5, KD 0.5
        return {**out, **kd(temperature=1.0, ce=0.5, kd_w=0.5)}
    if method == "dkd":  # methods.md: ImageNet T 1, warm-up 1, beta per pair
        return {**out, **dkd(beta, temperature=1.0, warmup=1)}
    if method == "nkd":  # official NKD: T 1, gamma 1.5, CE/warm-up from DKD block (1, 1)
        return {**out, **nkd(warmup=1)}
    out |= {**sdd(method, IN_M[pair]),
            "params.nested_grid": 4}  # decisions.md item 4: the official 4x4 SPP grid
    if method == "sd_kd":  # methods.md SD-KD (no ImageNet override; official code same)
        return {**out, **kd()}
    if method == "sd_dkd":  # ImageNet DKD values, warm-up 1
        return {**out, **dkd(beta, temperature=1.0, warmup=1)}
    assert method == "sd_nkd", method  # legacy NKD with T, gamma, warm-up of the DKD block
    return {**out, **sd_nkd(beta, temperature=1.0, warmup=1)}


def cub_protocol(student: str) -> dict[str, Any]:
    return {"output_dir": "runs/cub200", "data.name": "cub200", "data.root_is_relative": True,
            "data.batch_size": 64, "data.image_size": 224, "data.resize": 256,
            "data.hflip": True, "data.num_workers": 4,
            "optim.lr": 0.01 if student in SMALL_STUDENTS else 0.05, "optim.lr_scaling": "none",
            "optim.momentum": 0.9, "optim.weight_decay": 5e-4, "optim.nesterov": False,
            "optim.epochs": 240, "optim.milestones": [150, 180, 210], "optim.gamma": 0.1,
            "optim.clip_grad_norm": "auto"}


def cub_method(method: str, pair: tuple[str, str]) -> dict[str, Any]:
    beta = CUB_DKD_BETA[pair]
    out: dict[str, Any] = {"method.name": method, "partners": []}
    if method == "kd":
        return {**out, **kd()}
    if method == "dkd":
        return {**out, **dkd(beta)}
    if method == "nkd":
        return {**out, **nkd()}
    if method in ("sd_kd", "sd_dkd", "sd_nkd"):
        base = {"sd_kd": kd(), "sd_dkd": dkd(beta), "sd_nkd": sd_nkd(beta)}[method]
        # benchmarks.md: M={1,2,4} for all five CUB pairs
        return {**out, **sdd(method, [1, 2, 4]), **base}
    return {**out, **params(**CUB_PARTNER[method])}


# ============================================================================ the table
def cifar_rows() -> list[Row]:
    rows: list[Row] = []
    cells = sorted({(m, t, s) for _, m, t, s in cifar_paper_cells() if m not in NOT_IMPLEMENTED})
    for method, teacher, student in cells:  # every published cell has its file
        if method == "teacher":
            rows.append((f"cifar100/teachers/{teacher}.yaml", {
                "name": f"teacher/{teacher}", **vanilla(teacher), **cifar_protocol(teacher)}))
        elif method == "student":
            rows.append((f"cifar100/vanilla/{student}.yaml", {
                "name": f"student/{student}", **vanilla(student), **cifar_protocol(student),
                "params.ce_weight": 1.0}))
        else:
            folder = f"ablation/{method}" if method in ABLATIONS else method
            rows.append((f"cifar100/{folder}/{teacher}_{student}.yaml", {
                **cifar_distill(method, teacher, student),
                **cifar_method(method, (teacher, student))}))
    # a teacher config for every teacher and a student-alone config for every student
    rows += [(f"cifar100/teachers/{t}.yaml", {"name": f"teacher/{t}", "teacher": None,
                                               "method.name": "vanilla"}) for t in TEACHER_ACC]
    rows += [(f"cifar100/vanilla/{s}.yaml", {"teacher": None, "method.name": "vanilla",
                                             **cifar_protocol(s)})
             for s in sorted({s for _, s in ALL_PAIRS})]
    # DCKD on every pair; DCKD + FitNet / CRD / RKD / ReviewKD on the Table 1 and 2 pairs
    for teacher, student in ALL_PAIRS:
        pair = (teacher, student)
        folders = {"dckd": None}
        if pair in TABLE1 + TABLE2:
            folders.update(CIFAR_DCKD_FOLDERS)
        for folder, name in folders.items():
            rows.append((f"cifar100/{folder}/{teacher}_{student}.yaml", {
                **cifar_distill(folder, teacher, student), "method.name": "dckd",
                **dkd(DKD_BETA[pair]), **params(target_rule="max", nontarget_source="teacher"),
                **(partner(name, **PARTNER[name]) if name else {"partners": []})}))
    # DIST, TTM, WTTM (+ CRD), KD + DOT, SD-DKD + DOT
    newer = {
        "dist": params(ce_weight=1.0, kd_weight=2.0, beta=1.0, gamma=1.0, temperature=4.0,
                       eps=1e-8),
        "ttm": params(ce_weight=1.0, kd_weight=45.0, gamma=0.1),
        "wttm": params(ce_weight=1.0, kd_weight=4.0, gamma=0.2),
        "wttm_crd": params(ce_weight=1.0, kd_weight=4.0, gamma=0.2),
        "kd_dot": params(ce_weight=0.1, kd_weight=0.9, temperature=4.0),
        # the SD-DKD cell's own values for this pair
        "sd_dkd_dot": params(beta=8.0, scales=[1, 2], warmup_epochs=20, ce_weight=1.0),
    }
    for folder, teacher, student in NEWER_CELLS:
        dot = folder.endswith("_dot")
        rows.append((f"cifar100/{folder}/{teacher}_{student}.yaml", {
            **cifar_distill(folder, teacher, student),
            "method.name": folder.removesuffix("_dot").removesuffix("_crd"), **newer[folder],
            **(partner("crd", **PARTNER["crd"]) if folder == "wttm_crd" else {"partners": []}),
            "optim.name": "dot" if dot else "sgd", "optim.args": {"delta": 0.075} if dot else {}}))
    # logit standardization and CTKD
    for teacher, student in LS_PAIRS:
        t, w = KD_LS[(teacher, student)]
        rows.append((f"cifar100/kd_ls/{teacher}_{student}.yaml", {
            **cifar_distill("kd_ls", teacher, student), "partners": [], "method.name": "kd",
            **params(logit_standardization=True, learned_temperature=None),
            **kd(temperature=t, kd_w=w)}))
        t, w, beta = DKD_LS[(teacher, student)]
        rows.append((f"cifar100/dkd_ls/{teacher}_{student}.yaml", {
            **cifar_distill("dkd_ls", teacher, student), "partners": [], "method.name": "dkd",
            **params(logit_standardization=True, learned_temperature=None, temperature=t,
                     alpha=1.0 * w, beta=beta * w, ce_weight=1.0, warmup_epochs=20)}))
        for folder, ls, kd_w in (("ctkd", False, 0.9),  # -r 0.1 -a 0.9
                                 ("ctkd_ls", True, 9.0)):  # the LS fork's -r 0.1 -a 9
            rows.append((f"cifar100/{folder}/{teacher}_{student}.yaml", {
                **cifar_distill(folder, teacher, student), "partners": [], "method.name": "kd",
                **params(learned_temperature=CTKD_BLOCK, logit_standardization=ls,
                         ce_weight=0.1, kd_weight=kd_w)}))
    # every file: its name is its path, its runs go to runs/cifar100
    rows.append(("cifar100/**/*.yaml", {"name": NAMED_BY_PATH, "output_dir": "runs/cifar100"}))
    return rows


def imagenet_rows() -> list[Row]:
    rows: list[Row] = []
    for method, teacher, student in beyond_paper_cells("imagenet"):
        # top-1 and top-5 cells of one (method, pair) share this file
        if method in ("teacher", "student"):
            arch = teacher if method == "teacher" else student
            folder = "teachers" if method == "teacher" else "vanilla"
            rows.append((f"imagenet/{folder}/{arch}.yaml", {
                "name": f"{method}/{arch}", **imagenet_protocol(), **vanilla(IN_ARCH[arch]),
                "student.checkpoint": None, "params.ce_weight": 1.0}))
            continue
        rows.append((f"imagenet/{method}/{teacher}_{student}.yaml", {
            "name": f"{method}/{teacher}_{student}", **imagenet_protocol(),
            "student.arch": IN_ARCH[student], "teacher.arch": IN_ARCH[teacher],
            "teacher.checkpoint": IN_TEACHER[teacher][0],
            "teacher.expected_accuracy": IN_TEACHER[teacher][1],
            **imagenet_method(method, (teacher, student))}))
    # torchvision's IMAGENET1K_V1 file names
    rows += [(f"imagenet/kd/{t}_{s}.yaml", {"teacher.checkpoint": IN_TEACHER[t][0]})
             for t, s in IN_PAIRS]
    for teacher, student in IN_PAIRS:
        for folder, name in IN_DCKD_FOLDERS.items():
            # DKD's ImageNet values (methods.md: DCKD uses DKD's defaults and warm-up)
            if name is None:
                extra: dict[str, Any] = {"partners": []}
            elif name == "at":
                extra = partner("at", weight=1000.0, p=2.0)
            else:  # the official ImageNet ReviewKD: weight 1, warm-up 1 epoch, student pre-act
                extra = partner("reviewkd", weight=1.0, warmup_epochs=1, student_preact=True)
            rows.append((f"imagenet/{folder}/{teacher}_{student}.yaml", {
                "name": f"{folder}/{teacher}_{student}", **imagenet_protocol(),
                "student.arch": IN_ARCH[student], "teacher.checkpoint": IN_TEACHER[teacher][0],
                "teacher.expected_accuracy": IN_TEACHER[teacher][1], "method.name": "dckd",
                **dkd(IN_DKD_BETA[(teacher, student)], temperature=1.0, warmup=1),
                **params(target_rule="max", nontarget_source="teacher"), **extra}))
    rows.append(("imagenet/**/*.yaml", {"name": NAMED_BY_PATH, "output_dir": "runs/imagenet",
                                        "data.name": "imagenet"}))
    return rows


def cub_rows() -> list[Row]:
    rows: list[Row] = []
    for method, teacher, student in beyond_paper_cells("cub200"):
        if method == "teacher":
            rows.append((f"cub200/teachers/{teacher}.yaml", {
                "name": f"teacher/{teacher}", **vanilla(CUB_ARCH[teacher]),
                **cub_protocol(teacher)}))
        elif method == "student":
            rows.append((f"cub200/vanilla/{student}.yaml", {
                "name": f"student/{student}", **vanilla(CUB_ARCH[student]),
                **cub_protocol(student), "params.ce_weight": 1.0}))
        else:
            rows.append((f"cub200/{method}/{teacher}_{student}.yaml", {
                "name": f"{method}/{teacher}_{student}", "student.arch": CUB_ARCH[student],
                **cub_protocol(student), "teacher.arch": CUB_ARCH[teacher],
                "teacher.checkpoint": f"teachers/cub200/{teacher}.pth",
                "teacher.expected_accuracy": CUB_TEACHER_ACC[teacher],
                **cub_method(method, (teacher, student))}))
    rows.append(("cub200/**/*.yaml", {"name": NAMED_BY_PATH, "output_dir": "runs/cub200",
                                      "data.name": "cub200"}))
    return rows


def detection_rows() -> list[Row]:
    detection = {"task": "detection", "detection": NOT_NONE,
                 "accepted_by_task": True,  # refuses methods and partners not for RoIs
                 "runtime.channels_last": False,
                 "method.params.ce_weight": 1.0}  # the detector's loss at weight 1
    return ([(glob, detection) for glob in DETECTION_GLOBS]
            + [(f"coco/{pair}/{m}.yaml", {}) for pair in COCO_PAIRS for m in COCO_METHODS]
            + [(f"detection/{d}/{m}.yaml", {}) for d in DETECTION_DATA
               for m in DETECTION_METHODS])


def transformer_rows() -> list[Row]:
    """DeiT's ImageNet cells: facebookresearch/deit main.py and README (AdamW 5e-4 x 1024 / 512,
    weight decay 0.05, 300 epochs, cosine to 1e-5, 5 warm-up epochs, smoothing 0.1, hard
    distillation with alpha 0.5 from regnety_160); the OFA configs must at least build."""
    deit_arch = {"DeiT-Ti": "timm:deit_tiny_distilled_patch16_224",
                 "DeiT-S": "timm:deit_small_distilled_patch16_224"}
    rows: list[Row] = []
    for method, teacher, student in deit_paper_cells():
        if method != "deit":
            continue
        rows.append((f"imagenet/deit/{teacher}_{student}.yaml", {
            "name": f"deit/{teacher}_{student}", "student.arch": deit_arch[student],
            "teacher.arch": "timm:regnety_160", "teacher.pretrained": True,
            "data.batch_size": 1024, "optim.name": "adamw", "optim.lr": 1e-3,
            "optim.weight_decay": 0.05, "optim.epochs": 300, "optim.scheduler": "cosine",
            "optim.min_lr": 1e-5, "optim.warmup_epochs": 5, "method.name": "deit",
            **params(type="hard", alpha=0.5, tau=1.0, label_smoothing=0.1)}))
    return rows + [("cifar100/ofa/*.yaml", {"method.name": "ofa"}),
                   ("imagenet/ofa/*.yaml", {"method.name": "ofa"})]


#: THE TABLE: (config path or glob under configs/, expected values)
ROWS: list[Row] = (cifar_rows() + imagenet_rows() + cub_rows() + detection_rows()
                   + transformer_rows())


# ============================================================================ shared checks
def config_files(pattern: str) -> list[str]:
    """The config files a row names (a glob: its experiment configs, no bases or sweeps)."""
    if not any(c in pattern for c in "*?["):
        return [pattern]
    return sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob(pattern)
                  if not p.name.startswith("_") and not p.name.endswith(".sweep.yaml"))


def _expectations() -> dict[str, list[tuple[str, Any]]]:
    """File -> the distinct (key, expected) pairs of every row that names it."""
    out: dict[str, dict[str, tuple[str, Any]]] = {}
    for pattern, expect in ROWS:
        for path in config_files(pattern):
            seen = out.setdefault(path, {})
            for key, want in expect.items():
                seen.setdefault(f"{key}={want!r}", (key, want))
    return {path: list(checks.values()) for path, checks in sorted(out.items())}


EXPECTATIONS = _expectations()


def _plain(v: Any) -> Any:
    return v.model_dump() if isinstance(v, BaseModel) else v


def value(cfg: ExperimentConfig, key: str) -> Any:
    """The value of ``key`` for ``cfg``: a dotted attribute, or a derived value."""
    head, _, rest = key.partition(".")
    if head == "params":  # the method's params with every default filled in (what runs)
        return _plain(getattr(build_params(cfg.method.name, cfg.method.params, "method.params"),
                              rest))
    if head == "partner":  # the (first) partner's resolved params
        assert cfg.method.partners, "no partner"
        q = cfg.method.partners[0]
        return _plain(getattr(build_params(q.name, q.params, "method.partners.0.params"), rest))
    if key == "partners":
        return [q.name for q in cfg.method.partners]
    if key == "default_clip_grad_norm":  # what optim.clip_grad_norm "auto" gives the method
        return get_method(cfg.method.name).default_clip_grad_norm
    if key == "data.root_is_relative":
        return bool(cfg.data.root) and not Path(cfg.data.root).is_absolute()
    if key == "accepted_by_task":
        task_for(cfg)  # raises for a method or partner the task does not accept
        return True
    if key == "method.params.ce_weight":  # as written (the default 1 when absent)
        return cfg.method.params.get("ce_weight", 1.0)
    obj: Any = cfg
    for i, part in enumerate(key.split(".")):
        assert obj is not None, f"{'.'.join(key.split('.')[:i])} is None"
        obj = getattr(obj, part)
    return obj


def mismatch(path: str, cfg: ExperimentConfig, key: str, want: Any) -> str | None:
    """None when ``cfg`` meets the expectation, else what differs."""
    try:
        got = value(cfg, key)
    except AssertionError as exc:
        return f"{key}: {exc}"
    if isinstance(want, Satisfies):
        return None if want.test(got) else f"{key} = {got!r}, expected {want.describe}"
    if isinstance(want, FromPath):
        want = want.of(Path(path))
    return None if got == want else f"{key} = {got!r}, expected {want!r}"


@pytest.mark.parametrize("path", list(EXPECTATIONS))
def test_config(path: str) -> None:
    file = CONFIGS / path
    assert file.is_file(), f"missing config configs/{path}"
    cfg = load_config(file)
    problems = [m for key, want in EXPECTATIONS[path] if (m := mismatch(path, cfg, key, want))]
    assert not problems, f"configs/{path}:\n  " + "\n  ".join(problems)


def test_every_glob_row_names_files() -> None:
    for pattern, _ in ROWS:
        assert config_files(pattern), f"the row {pattern} matches no config"


# ============================================================================ plain checks
def test_config_check_passes(capsys: pytest.CaptureFixture[str]) -> None:
    """``kdlab config check configs`` (every folder, ImageNet and CUB-200 included)."""
    assert main(["config", "check", str(CONFIGS)]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_config_check_validates_sweep_specs(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`*.sweep.yaml` files are checked as sweep specs, not as experiment configs."""
    (tmp_path / "exp.yaml").write_text("student: {arch: resnet8}\n")
    (tmp_path / "ok.sweep.yaml").write_text("name: s\nconfigs: [exp.yaml]\nseeds: [0, 1]\n")
    assert main(["config", "check", str(tmp_path)]) == 0
    (tmp_path / "bad.sweep.yaml").write_text("name: s\nconfigs: [exp.yaml]\nseedz: [0]\n")
    assert main(["config", "check", str(tmp_path)]) == 1
    assert "seedz" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_paper_csv_is_packaged() -> None:
    assert PAPER_CSV.is_file()
    with PAPER_CSV.open(newline="") as f:
        header = next(csv.reader(f))
    assert header == ["source", "dataset", "teacher", "student", "method", "metric", "value"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert "report/paper_results.csv" in pyproject


def test_every_cifar_paper_cell_is_known() -> None:
    methods = {m for _, m, _, _ in cifar_paper_cells()}
    unknown = methods - IMPLEMENTED - ABLATIONS - NOT_IMPLEMENTED - {"teacher", "student"}
    assert not unknown, f"CSV methods with no mapping: {sorted(unknown)}"
    assert len(cifar_paper_cells()) > 200


def test_expected_cifar_pair_table_covers_the_csv() -> None:
    pairs = {(t, s) for _, m, t, s in cifar_paper_cells()}
    assert pairs == set(ALL_PAIRS)
    assert set(DKD_BETA) == pairs


def test_csv_has_the_expected_imagenet_and_cub_cells() -> None:
    imagenet = beyond_paper_cells("imagenet")
    cub = beyond_paper_cells("cub200")
    assert {(t, s) for _, t, s in imagenet} == set(IN_PAIRS)
    assert {(t, s) for _, t, s in cub} == set(CUB_PAIRS)
    assert {m for m, _, _ in imagenet} == {"teacher", "student", "kd", "dkd", "nkd", "sd_kd",
                                           "sd_dkd", "sd_nkd"}
    assert {m for m, _, _ in cub} == {"teacher", "student", "kd", "dkd", "nkd", "sd_kd",
                                      "sd_dkd", "sd_nkd", "sp", "crd", "reviewkd"}


@pytest.mark.parametrize("folder", ["cifar100", "imagenet", "cub200"])
def test_config_names_are_unique(folder: str) -> None:
    names: dict[str, str] = {}
    files = config_files(f"{folder}/**/*.yaml")
    assert files
    for f in files:
        name = load_config(CONFIGS / f).name
        assert name not in names, f"{f} and {names[name]} share the name {name}"
        names[name] = f


@pytest.mark.parametrize("folder", sorted(EXACT_FOLDERS))
def test_no_other_cells_in_the_folder(folder: str) -> None:
    stems = {f.stem for f in (CONFIGS / folder).glob("*.yaml") if not f.name.startswith("_")}
    assert stems == EXACT_FOLDERS[folder]


def _detector_pairs() -> list[tuple[str, str]]:
    """Each distinct (arch, detection section) of the detection configs, student or teacher."""
    seen: dict[tuple[str, str], None] = {}
    for path in (p for g in DETECTION_GLOBS for p in config_files(g)):
        cfg = load_config(CONFIGS / path)
        section = json.dumps(cfg.detection.model_dump(), sort_keys=True)  # type: ignore[union-attr]
        for model in (cfg.student, cfg.teacher):
            if model is not None:
                seen[(model.arch, section)] = None
    return list(seen)


@pytest.mark.parametrize("arch,section", _detector_pairs(),
                         ids=lambda v: v if len(v) < 40 else "cfg")
def test_detector_builds(arch: str, section: str) -> None:
    from kdlab.config import DetectionConfig
    from kdlab.tasks.detection.model import build_detector

    det = build_detector(arch, 3, DetectionConfig.model_validate(json.loads(section)))
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 4
