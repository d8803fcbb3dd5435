"""The detection configs (configs/coco, configs/detection) are valid and build their detectors.

Each distinct (arch, detection section) pair is built once, with ``pretrained`` off (no network):
the anchor sizes must match the backbone's pyramid, the RoI head must have K + 1 outputs, and the
student/teacher pairs must share the detection section (the teacher runs on the student's images
and proposals). The method must be one the detection task accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.config import load_config
from kdlab.tasks import task_for

ROOT = Path(__file__).resolve().parents[2] / "configs"
FILES = sorted(p for d in ("coco", "detection") for p in (ROOT / d).rglob("*.yaml")
               if not p.name.startswith("_") and not p.name.endswith(".sweep.yaml"))


def test_there_are_detection_configs() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in FILES}
    for pair in ("r101_r18", "r101_r50", "r50_mv2"):
        for method in ("vanilla", "kd", "dkd", "dckd", "sd_dkd", "dkd_reviewkd"):
            assert f"coco/{pair}/{method}.yaml" in names
    for data in ("fm_synthetic", "tree_crowns"):
        for method in ("teacher_resnet18", "vanilla", "kd", "dkd", "dckd", "sd_dkd",
                       "sd_dkd_interleaved", "dkd_reviewkd", "dkd_fitnet"):
            assert f"detection/{data}/{method}.yaml" in names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_detection_config_is_accepted_by_the_task(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.task == "detection" and cfg.detection is not None
    task_for(cfg)  # refuses methods and partners that do not apply to RoIs
    assert cfg.runtime.channels_last is False
    if cfg.method.name != "vanilla":
        assert cfg.method.params.get("ce_weight", 1.0) == 1.0  # the detector's loss at weight 1


def _pairs() -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for path in FILES:
        cfg = load_config(path)
        section = json.dumps(cfg.detection.model_dump(), sort_keys=True)  # type: ignore[union-attr]
        for model in (cfg.student, cfg.teacher):
            if model is not None:
                seen[(model.arch, section)] = None
    return list(seen)


@pytest.mark.parametrize("arch,section", _pairs(), ids=lambda v: v if len(v) < 40 else "cfg")
def test_detector_builds(arch: str, section: str) -> None:
    from kdlab.config import DetectionConfig
    from kdlab.tasks.detection.model import build_detector

    det = build_detector(arch, 3, DetectionConfig.model_validate(json.loads(section)))
    assert det.model.roi_heads.box_predictor.cls_score.out_features == 4
