"""A tiny distillation run shared by the export and latency tests: resnet14 (random weights)
distilled into resnet8 for one epoch with KD + CRD (whose embeddings and memory live in the
distiller, never in the exported student), on 16x16 synthetic images with 4 classes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdlab.models import create_model
from support import synthetic_distill_run

N_TEST = 23  # eval batches of 16 and 7: the parity pass itself uses two batch sizes
NUM_CLASSES = 4
SIZE = 16
TEACHER, STUDENT = "resnet14", "resnet8"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_distill_run(
        tmp_path_factory.mktemp("export_run"), STUDENT, TEACHER,
        {"name": "kd", "partners": [{"name": "crd", "params": {"nce_k": 16}}]},
        n_test=N_TEST, num_classes=NUM_CLASSES, size=SIZE)


@pytest.fixture(scope="session")
def student(tiny_run: Path) -> torch.nn.Module:
    """The run's student rebuilt independently of kdlab.deploy.export: zoo model + best.pt
    weights."""
    model = create_model(STUDENT, num_classes=NUM_CLASSES, in_channels=3)
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    model.load_state_dict(best["model"])
    return model.eval()
