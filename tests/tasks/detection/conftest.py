"""Shared fixtures of the detection task's tests (``test_task``, ``test_model``): a tiny
COCO-format dataset, a tiny detector configuration, torchvision as the detector imports it, and
helpers to write detection run configs.

The dataset: 12 train / 6 test RGB images of 64 x 64 px with 1-2 boxes each and 3 categories
(COCO ids 1, 2, 5, so the category-id mapping is exercised), seeded, built once per session.
Each object is a filled rectangle whose colour encodes its class on a dark noisy background.
Test files get the helpers as fixtures (``run_config``, ``write_yaml``), never by importing this
module.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kdlab.config import DetectionConfig
from support import box_canvases

#: COCO category ids of the tiny set (not contiguous: labels 1..3 map to them).
CATEGORY_IDS = (1, 2, 5)
SIDE = 64
N_TRAIN, N_TEST = 12, 6
#: the tiny detector (brief): 64 px images, FPN 16, five anchor sizes, few proposals and RoIs.
TINY_DETECTION: dict[str, Any] = {
    "train_split": "train",
    "test_split": "test",
    "min_size": SIDE,
    "max_size": SIDE,
    "fpn_channels": 16,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 16,
    "representation_size": 32,
}
#: the cheapest zoo backbone that has stages at strides 4, 8, 16 and 32.
ARCH = "MobileNetV2_imagenet"


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Every detection test on one intra-op thread (``one_thread``, tests/conftest.py)."""


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny COCO-format dataset (``annotations/instances_{train,test}.json``)."""
    from kdlab.tasks.detection.coco import write_coco_split

    root = tmp_path_factory.mktemp("tiny_coco")
    rng = np.random.default_rng(0)
    cats = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    write_coco_split(root, "train", box_canvases(rng, N_TRAIN, "tr", SIDE, CATEGORY_IDS), cats)
    write_coco_split(root, "test", box_canvases(rng, N_TEST, "te", SIDE, CATEGORY_IDS), cats)
    return root


@pytest.fixture(scope="session")
def det_cfg() -> DetectionConfig:
    """The tiny detector configuration."""
    return DetectionConfig(**TINY_DETECTION)


def _run_config(root: Path, *, name: str = "det", method: dict[str, Any] | None = None,
               teacher: Path | None = None, epochs: int = 1, arch: str = ARCH,
               teacher_arch: str = ARCH, **detection: Any) -> dict[str, Any]:
    """A detection run config (dict) on the tiny set: batch 4 (3 steps per epoch), SGD, one
    thread, deterministic; ``teacher`` a checkpoint of a ``teacher_arch`` detector."""
    cfg: dict[str, Any] = {
        "name": name,
        "task": "detection",
        "seed": 0,
        "data": {"name": "coco", "root": str(root), "batch_size": 4, "eval_batch_size": 3,
                 "num_workers": 0},
        "detection": {**copy.deepcopy(TINY_DETECTION), **detection},
        "student": {"arch": arch},
        "method": method or {"name": "vanilla"},
        "optim": {"epochs": epochs, "lr": 0.01, "milestones": [], "weight_decay": 0.0001},
        "runtime": {"threads": 1, "amp": "off", "channels_last": False, "deterministic": True},
    }
    if teacher is not None:
        cfg["teacher"] = {"arch": teacher_arch, "checkpoint": str(teacher)}
    return cfg


def _write_yaml(path: Path, cfg: dict[str, Any]) -> Path:
    """``cfg`` as YAML at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def run_config() -> Any:
    """The function building a detection run config dict (see :func:`_run_config`)."""
    return _run_config


@pytest.fixture(scope="session")
def write_yaml() -> Any:
    """The function writing a config dict as YAML (see :func:`_write_yaml`)."""
    return _write_yaml
