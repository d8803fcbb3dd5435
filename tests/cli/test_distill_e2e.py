"""End-to-end: every method runs training steps through `kdlab distill` on synthetic data.

"Every method" is the method registry at collection time (``list_methods()``), so a newly
registered method is covered without editing a list; ``HAS_HELPERS`` only adds expectations for
known names. Pairs: resnet32x4 -> resnet8x4 (same family), resnet32x4 -> ShuffleV1 and vgg13 ->
MobileNetV2 (cross-family, the latter with a 2x2 final map). Helper modules (regressors, CRD
embeddings and memory, ReviewKD fusions) are trained with the student and saved in its
checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli.main import main
from kdlab.methods.registry import get_method, list_methods
from kdlab.models import create_model
from support import student_arch_for

pytestmark = pytest.mark.e2e  # trains runs end to end

#: every registered method (logit methods and partners; a partner alone runs as vanilla + it).
METHODS = [n for n in list_methods() if not get_method(n).needs_dense_maps]
#: per-name expectations on top of the defaults: partners that train helper modules
#: (regressor, CRD embeddings and memory, ReviewKD fusions), which must be saved with the student.
HAS_HELPERS = {"fitnet", "crd", "reviewkd", "ofa"}
COMPOSITES = [("dckd", "fitnet"), ("dckd", "crd"), ("dckd", "rkd"), ("dckd", "reviewkd"),
              ("sd_kd", "crd"), ("sd_dkd", "at")]


def write_config(tmp_path: Path, teacher: str, student: str, teacher_ckpt: Path,
                 method: dict, epochs: int = 1) -> Path:
    cfg = {
        "name": "e2e",
        "data": {"name": "synthetic", "batch_size": 8, "eval_batch_size": 16,
                 "synthetic": {"n_train": 16, "n_test": 16, "num_classes": 10}},
        "student": {"arch": student},
        "teacher": {"arch": teacher, "checkpoint": str(teacher_ckpt)},
        "method": method,
        "optim": {"epochs": epochs, "milestones": [], "lr": 0.01},
        "runtime": {"threads": 2, "amp": "off"},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    """Randomly initialised teacher checkpoints in the CRD format ({"model": state_dict})."""
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for arch in ("resnet32x4", "vgg13"):
        torch.manual_seed(0)
        model = create_model(arch, num_classes=10)
        out[arch] = root / f"{arch}.pth"
        torch.save({"model": model.state_dict()}, out[arch])
    return out


def run_distill(tmp_path: Path, teacher: str, student: str, teachers: dict[str, Path],
                method: dict) -> dict:
    cfg = write_config(tmp_path, teacher, student, teachers[teacher], method)
    run_dir = tmp_path / "run"
    assert main(["-q", "distill", str(cfg), "--run-dir", str(run_dir), "--no-progress"]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(map(torch.isfinite, torch.tensor(list(record["train_terms"].values()))))
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    return {"summary": summary, "record": record, "ckpt": ckpt}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_same_family(tmp_path: Path, teachers, method: str) -> None:
    student = student_arch_for(method, "resnet8x4")
    out = run_distill(tmp_path, "resnet32x4", student, teachers, {"name": method})
    terms = out["record"]["train_terms"]
    assert "ce" in terms
    if get_method(method).kind == "partner":
        assert len(terms) >= 2
    if method in HAS_HELPERS:
        assert out["ckpt"]["distiller"], "helper modules must be saved with the student"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_cross_family(tmp_path: Path, teachers, method: str) -> None:
    run_distill(tmp_path, "resnet32x4", student_arch_for(method, "ShuffleV1"), teachers,
                {"name": method})


@pytest.mark.parametrize("method", METHODS)
def test_vgg_to_mobilenet(tmp_path: Path, teachers, method: str) -> None:
    run_distill(tmp_path, "vgg13", student_arch_for(method, "MobileNetV2"), teachers,
                {"name": method})


@pytest.mark.parametrize(("logit", "partner"), COMPOSITES)
def test_compositions(tmp_path: Path, teachers, logit: str, partner: str) -> None:
    out = run_distill(tmp_path, "resnet32x4", "resnet8x4", teachers,
                      {"name": logit, "partners": [{"name": partner}]})
    assert len(out["record"]["train_terms"]) >= 3
    method = json.loads((tmp_path / "run" / "method.json").read_text())
    assert method["name"] == f"{logit}+{partner}"
