"""Helpers shared by test files in several folders (import as ``from support import ...``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.methods.registry import get_method
from kdlab.models import create_model
from kdlab.models.output import KdModel, ModelOutput


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Recursive bit-exact equality of nested checkpoint structures (tensors: same dtype and
    values; dicts: same keys; sequences: same length)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), f"tensor {path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def one_error_line(err: str) -> str:
    """The single ``kdlab: error:`` line of a CLI failure's stderr (no traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error:"), err
    assert "Traceback" not in err
    return lines[0]


def box_canvases(rng: Any, n: int, prefix: str, side: int,
                 category_ids: tuple[int, ...]) -> list[Any]:
    """``n`` COCO images (:class:`~kdlab.tasks.detection.coco.CocoImage`) of ``side`` px: dark
    noise with one or two rectangles of 12-32 px, each filled with its category's colour (red,
    green, blue for ``category_ids[0..2]``), drawn from ``rng``."""
    from kdlab.tasks.detection.coco import CocoImage

    colours = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230]], dtype=np.uint8)
    out = []
    for i in range(n):
        img = rng.integers(0, 40, size=(side, side, 3), dtype=np.uint8)
        boxes, cats = [], []
        for _ in range(int(rng.integers(1, 3))):
            w, h = (int(v) for v in rng.integers(12, 33, size=2))
            x1, y1 = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
            c = int(rng.integers(0, 3))
            img[y1:y1 + h, x1:x1 + w] = colours[c]
            boxes.append([x1, y1, x1 + w, y1 + h])
            cats.append(category_ids[c])
        out.append(CocoImage(f"{prefix}{i:03d}.png", img, np.array(boxes, dtype=np.float64),
                             cats))
    return out


def save_random_teacher(path: Path, num_classes: int, seed: int = 1,
                        arch: str = "resnet14") -> Path:
    """Save a randomly initialised ``arch`` (seeded) as ``{"model": state_dict}`` at ``path``,
    leaving torch's global RNG as it was."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    torch.save({"model": create_model(arch, num_classes=num_classes).state_dict()}, path)
    torch.set_rng_state(state)
    return path


def run_distill(folder: Path, cfg: dict[str, Any], *extra: str) -> Path:
    """Write ``cfg`` to ``folder/cfg.yaml``, run ``kdlab distill`` into ``folder/run`` (quiet, no
    progress bar, ``extra`` CLI arguments appended), assert it succeeded; the run directory."""
    import yaml

    from kdlab.cli.main import main

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = folder / "run"
    assert main(["-q", "distill", str(path), "--run-dir", str(run), "--no-progress", *extra]) == 0
    return run


class TinyNet(KdModel):
    """A tiny :class:`KdModel` for method tests: conv -> ReLU -> adaptive average pooling to a
    ``side x side`` final map -> global mean -> linear head, initialised from ``seed``; the logits
    are multiplied by ``logit_scale``."""

    def __init__(self, channels: int, side: int, seed: int, num_classes: int,
                 logit_scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.in_channels, self.num_classes = 3, num_classes
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.side, self.logit_scale = side, logit_scale
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        fmap = F.adaptive_avg_pool2d(self.conv(x).relu(), self.side)
        emb = fmap.mean(dim=(2, 3))
        logits = self.classifier(emb)
        if self.logit_scale != 1.0:
            logits = self.logit_scale * logits
        return ModelOutput(logits=logits, feature_map=fmap, embedding=emb)


def student_arch_for(method: str, default: str) -> str:
    """``default``, or kdlab's ``vit_tiny_distilled`` for methods that need a student with a
    DeiT distillation token (``Distiller.needs_distillation_token``: ``deit``)."""
    return "vit_tiny_distilled" if get_method(method).needs_distillation_token else default


def synthetic_distill_run(root: Path, student: str, teacher: str, method: dict[str, Any], *,
                          n_test: int, num_classes: int, size: int) -> Path:
    """A 1-epoch ``kdlab distill`` run of ``student`` (one thread, fp32) on synthetic images
    (64 train, ``n_test`` test, ``size`` px, ``num_classes`` classes) from a seeded random
    ``teacher``, in ``root/run``; torch's global RNG is left as it was."""
    teacher_path = save_random_teacher(root / "teacher.pth", num_classes, seed=0, arch=teacher)
    return run_distill(root, {
        "name": "export",
        "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 16,
                 "synthetic": {"n_train": 64, "n_test": n_test, "num_classes": num_classes,
                               "size": size}},
        "student": {"arch": student},
        "teacher": {"arch": teacher, "checkpoint": str(teacher_path)},
        "method": method,
        "optim": {"epochs": 1, "milestones": [], "lr": 0.05},
        "runtime": {"threads": 1, "amp": "off"},
    })


def section(md: str, heading: str) -> str:
    """The text of the markdown section ``## heading`` (up to the next ``## ``)."""
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` as dicts keyed by the header."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[2:]]


def tiny_detector(cfg: Any, seed: int, num_classes: int,
                  arch: str = "MobileNetV2_imagenet") -> Any:
    """``build_detector(arch, num_classes, cfg)`` initialised from ``seed``, in training mode."""
    from kdlab.tasks.detection.model import build_detector

    torch.manual_seed(seed)
    det = build_detector(arch, num_classes, cfg)
    det.train()
    return det


def two_coco_images(root: Path) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The first two training images of the COCO-format set at ``root`` as torchvision's
    detector takes them (floats in [0, 1]) and their box targets."""
    from kdlab.tasks.detection.coco import CocoDetection

    ds = CocoDetection.from_split(root, "train")
    samples = [ds[0], ds[1]]
    return ([s.image.float() / 255 for s in samples],
            [{"boxes": s.boxes, "labels": s.labels} for s in samples])
