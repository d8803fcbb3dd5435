"""The CIFAR-100 configs of logit standardization (LS, CVPR 2024) and CTKD (AAAI 2023).

Expected values are written from the official sources, NOT read from the configs: the LS
README's tables and its log file names ``KD_TYPE,TEACHER,STUDENT,BASE_TEMP,KD_WEIGHT[,BETA]``
(sunshangquan/logit-standardization-KD @ f6e5aa5, ``logs/``), its ``tools/train.py`` rules
(KD: T = base-temp, KD weight = kd-weight, CE 0.1; DKD: T = base-temp, alpha and beta times
kd-weight, CE 1, warm-up 20) and CTKD's ``scripts/run_cifar_distill.sh`` (zhengli97/CTKD).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import kdlab.methods  # noqa: F401  (registers the methods)
from kdlab.config import load_config
from kdlab.methods.compose import build_params

CIFAR = Path(__file__).resolve().parents[2] / "configs" / "cifar100"
SMALL_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
TEACHER_ACC = {"resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61,
               "vgg13": 74.64, "ResNet50": 79.34}

# pair -> (KD+LS base-temp, kd-weight), from logs/KD/
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
PAIRS = sorted(KD_LS)
CTKD_BLOCK = {"t_start": 1.0, "t_end": 20.0, "init": 1.0, "lambda_max": 0.0,
              "lambda_min": -1.0, "lambda_epochs": 10}


def _cfg(folder: str, teacher: str, student: str):
    path = CIFAR / folder / f"{teacher}_{student}.yaml"
    assert path.is_file(), f"missing {path}"
    cfg = load_config(path)
    assert cfg.name == f"{folder}/{teacher}_{student}"
    assert cfg.student.arch == student
    assert cfg.teacher is not None and cfg.teacher.arch == teacher
    assert cfg.teacher.expected_accuracy == TEACHER_ACC[teacher]
    o = cfg.optim
    assert o.lr == (0.01 if student in SMALL_STUDENTS else 0.05)
    assert (cfg.data.batch_size, o.weight_decay, o.epochs, o.milestones) == (
        64, 5e-4, 240, [150, 180, 210])
    assert not cfg.method.partners
    return cfg, build_params(cfg.method.name, cfg.method.params, "method.params")


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_kd_ls(teacher: str, student: str) -> None:
    cfg, p = _cfg("kd_ls", teacher, student)
    t, w = KD_LS[(teacher, student)]
    assert cfg.method.name == "kd"
    assert p.logit_standardization and p.learned_temperature is None
    assert (p.temperature, p.kd_weight, p.ce_weight) == (t, w, 0.1)


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_dkd_ls(teacher: str, student: str) -> None:
    cfg, p = _cfg("dkd_ls", teacher, student)
    t, w, beta = DKD_LS[(teacher, student)]
    assert cfg.method.name == "dkd"
    assert p.logit_standardization and p.learned_temperature is None
    assert (p.temperature, p.alpha, p.beta, p.ce_weight, p.warmup_epochs) == (
        t, 1.0 * w, beta * w, 1.0, 20)


@pytest.mark.parametrize("folder", ["ctkd", "ctkd_ls"])
@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_ctkd(folder: str, teacher: str, student: str) -> None:
    cfg, p = _cfg(folder, teacher, student)
    assert cfg.method.name == "kd"
    assert p.learned_temperature is not None
    assert p.learned_temperature.model_dump() == CTKD_BLOCK
    if folder == "ctkd":  # -r 0.1 -a 0.9
        assert (p.logit_standardization, p.ce_weight, p.kd_weight) == (False, 0.1, 0.9)
    else:  # the LS fork's -r 0.1 -a 9
        assert (p.logit_standardization, p.ce_weight, p.kd_weight) == (True, 0.1, 9.0)


def test_no_other_cells_in_the_folders() -> None:
    for folder in ("kd_ls", "dkd_ls", "ctkd", "ctkd_ls"):
        stems = {f.stem for f in (CIFAR / folder).glob("*.yaml") if not f.name.startswith("_")}
        assert stems == {f"{t}_{s}" for t, s in PAIRS}, folder
