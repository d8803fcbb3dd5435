"""The DIST, TTM, WTTM, WTTM + CRD, KD + DOT and SD-DKD + DOT CIFAR-100 configs.

Expected values are written from the official sources, NOT read from the configs:
DIST_KD README and image_classification_sota ``dist_cifar.yaml`` (CE 1, DIST 2, tau 4,
beta = gamma = 1, lr 0.01 for MobileNetV2/ShuffleNets); zkxufo/TTM README commands
(TTM: ``--ttm_l 0.1 -r 1 -b 45``; WTTM + CRD: ``--ttm_l 0.2 -b 0.8 -a 4``); mdistiller
``configs/cifar100/dot/*.yaml`` (KD, ``DOT.DELTA 0.075``, lr 0.01 for ShuffleV2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kdlab.config import ExperimentConfig, load_config
from kdlab.methods.compose import build_params

CIFAR = Path(__file__).resolve().parents[2] / "configs" / "cifar100"
SMALL = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}
TEACHER_ACC = {"resnet56": 72.34, "resnet110": 74.31, "resnet32x4": 79.42, "wrn_40_2": 75.61,
               "vgg13": 74.64, "ResNet50": 79.34}

DIST_PAIRS = [("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"),
              ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV1"),
              ("resnet32x4", "ShuffleV2")]
TTM_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
             ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
             ("wrn_40_2", "ShuffleV1")]
DOT_PAIRS = [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("resnet32x4", "ShuffleV2")]

CELLS = ([("dist", t, s) for t, s in DIST_PAIRS]
         + [(f, t, s) for f in ("ttm", "wttm", "wttm_crd") for t, s in TTM_PAIRS]
         + [("kd_dot", t, s) for t, s in DOT_PAIRS]
         + [("sd_dkd_dot", "resnet32x4", "resnet8x4")])


def load(folder: str, teacher: str, student: str) -> ExperimentConfig:
    path = CIFAR / folder / f"{teacher}_{student}.yaml"
    assert path.is_file(), f"missing {path}"
    return load_config(path)


@pytest.mark.parametrize(("folder", "teacher", "student"), CELLS,
                         ids=[f"{f}/{t}_{s}" for f, t, s in CELLS])
def test_config_values(folder: str, teacher: str, student: str) -> None:
    cfg = load(folder, teacher, student)
    assert cfg.name == f"{folder}/{teacher}_{student}"
    assert cfg.student.arch == student and cfg.teacher is not None
    assert (cfg.teacher.arch, cfg.teacher.expected_accuracy) == (teacher, TEACHER_ACC[teacher])
    o = cfg.optim
    assert o.lr == (0.01 if student in SMALL else 0.05)
    assert (o.momentum, o.weight_decay, o.epochs, o.milestones, o.gamma, o.nesterov) == (
        0.9, 5e-4, 240, [150, 180, 210], 0.1, False)
    assert (cfg.data.name, cfg.data.batch_size) == ("cifar100", 64)
    p = build_params(cfg.method.name, cfg.method.params, "method.params")
    partners = [(q.name, q.params) for q in cfg.method.partners]
    method = folder.removesuffix("_dot").removesuffix("_crd")
    assert cfg.method.name == method
    if folder == "dist":
        assert (p.ce_weight, p.kd_weight, p.beta, p.gamma, p.temperature, p.eps) == (
            1.0, 2.0, 1.0, 1.0, 4.0, 1e-8)
    elif folder == "ttm":
        assert (p.ce_weight, p.kd_weight, p.gamma) == (1.0, 45.0, 0.1)
    elif folder in ("wttm", "wttm_crd"):
        assert (p.ce_weight, p.kd_weight, p.gamma) == (1.0, 4.0, 0.2)
    elif folder == "kd_dot":
        assert (p.ce_weight, p.kd_weight, p.temperature) == (0.1, 0.9, 4.0)
    else:  # sd_dkd_dot: the SD-DKD cell's own values for this pair
        assert (p.beta, p.scales, p.warmup_epochs, p.ce_weight) == (8.0, [1, 2], 20, 1.0)
    if folder == "wttm_crd":
        assert [n for n, _ in partners] == ["crd"]
        crd = build_params("crd", partners[0][1], "method.partners.0.params")
        assert (crd.weight, crd.feat_dim, crd.nce_k, crd.nce_t, crd.nce_m) == (
            0.8, 128, 16384, 0.07, 0.5)
    else:
        assert not partners
    if folder.endswith("_dot"):
        assert o.name == "dot" and o.args == {"delta": 0.075}
    else:
        assert o.name == "sgd" and o.args == {}
    assert o.clip_grad_norm == "auto"


def test_every_file_of_the_folders_is_a_known_cell() -> None:
    for folder in ("dist", "ttm", "wttm", "wttm_crd", "kd_dot", "sd_dkd_dot"):
        stems = {f"{t}_{s}" for g, t, s in CELLS if g == folder}
        files = {f.stem for f in (CIFAR / folder).glob("*.yaml") if not f.name.startswith("_")}
        assert files == stems, folder
