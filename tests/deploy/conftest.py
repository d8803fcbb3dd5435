"""A tiny distillation run shared by the export and latency tests: resnet14 (random weights)
distilled into resnet8 for one epoch with KD + CRD (whose embeddings and memory live in the
distiller, never in the exported student), on 16x16 synthetic images with 4 classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kdlab.models import create_model
from support import run_distill

N_TEST = 23  # eval batches of 16 and 7: the parity pass itself uses two batch sizes
NUM_CLASSES = 4
SIZE = 16
TEACHER, STUDENT = "resnet14", "resnet8"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_run")
    teacher = root / "teacher.pth"
    state = torch.get_rng_state()
    torch.manual_seed(0)
    torch.save({"model": create_model(TEACHER, num_classes=NUM_CLASSES).state_dict()}, teacher)
    torch.set_rng_state(state)
    cfg: dict[str, Any] = {
        "name": "export",
        "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 16,
                 "synthetic": {"n_train": 64, "n_test": N_TEST, "num_classes": NUM_CLASSES,
                               "size": SIZE}},
        "student": {"arch": STUDENT},
        "teacher": {"arch": TEACHER, "checkpoint": str(teacher)},
        "method": {"name": "kd", "partners": [{"name": "crd", "params": {"nce_k": 16}}]},
        "optim": {"epochs": 1, "milestones": [], "lr": 0.05},
        "runtime": {"threads": 1, "amp": "off"},
    }
    return run_distill(root, cfg)


@pytest.fixture(scope="session")
def student(tiny_run: Path) -> torch.nn.Module:
    """The run's student rebuilt independently of kdlab.deploy.export: zoo model + best.pt
    weights."""
    model = create_model(STUDENT, num_classes=NUM_CLASSES, in_channels=3)
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    model.load_state_dict(best["model"])
    return model.eval()
