"""Does a refactor change results? Train the same small recipes with two commits, compare bits.

    python benchmarks/same_results.py REF [--out DIR]

REF is extracted with ``git archive`` and run with this virtualenv (``PYTHONPATH=REF/src``); the
working tree is the other side. Recipes (real Fashion-MNIST, 2 % of the training set, CPU):

* the demo's teacher recipe (resnet14, 3 epochs, lr x0.1 after epoch 2);
* four resnet8 students of that teacher, 2 epochs with an lr drop: KD, SD-DKD + CRD,
  DCKD + FitNet, ReviewKD;
* detection: a synthetic Fashion-MNIST COCO set (48 train / 16 test images of 64 px, written
  once by the working tree and read by both sides), a MobileNetV2 FPN teacher (2 epochs) and
  an SD-DKD student of it with a FitNet partner on the FPN levels (1 epoch).

For each run it compares the final checkpoint's student and method tensors (bit for bit) and
``metrics.jsonl`` without its timing fields. Exit status 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdlab.engine.loggers import flatten
from kdlab.tools.synthetic_detection import make_fashion_mnist_detection

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("train_img_per_s", "train_time_s", "eval_time_s")

# Runs inside each side's interpreter: only APIs that exist in kdlab 0.1 and later.
RECIPES = r'''
import sys
from pathlib import Path
from kdlab.config import validate_config
from kdlab.engine.trainer import Trainer
try:  # kdlab 0.3 (Architecture v3)
    from kdlab.cli.demo import FULL, _config
except ImportError:  # kdlab 0.1 and 0.2
    from kdlab.demo import FULL, _config

out = Path(sys.argv[1])
teacher = _config("teacher", FULL.teacher, 3, 0.02, FULL)
Trainer(validate_config(teacher, "teacher"), out / "teacher", require_teacher=False).run()
ckpt = str(out / "teacher" / "checkpoints" / "best.pt")
students = {
    "kd": {"name": "kd"},
    "sd_dkd_crd": {"name": "sd_dkd", "params": {"warmup": 1},
                   "partners": [{"name": "crd", "params": {"nce_k": 64}}]},
    "dckd_fitnet": {"name": "dckd", "partners": [{"name": "fitnet"}]},
    "reviewkd": {"name": "reviewkd"},
}
for tag, method in students.items():
    cfg = _config(tag, FULL.student, 2, 0.02, FULL, method=method,
                  teacher={"arch": FULL.teacher, "checkpoint": ckpt})
    cfg["optim"]["milestones"] = [1]
    Trainer(validate_config(cfg, tag), out / tag, require_teacher=True).run()
'''
DETECTION_RECIPES = r'''
import sys
from pathlib import Path
from kdlab.config import validate_config
from kdlab.engine.trainer import Trainer

out, data = Path(sys.argv[1]), sys.argv[2]
detection = {"train_split": "train", "test_split": "test", "min_size": 64, "max_size": 64,
             "fpn_channels": 16, "anchor_sizes": [8, 16, 32, 64, 128],
             "rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 100,
             "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 50,
             "box_batch_size_per_image": 16, "representation_size": 32}
base = {"task": "detection", "seed": 0, "detection": detection,
        "data": {"name": "coco", "root": data, "batch_size": 4, "eval_batch_size": 8,
                 "num_workers": 0},
        "student": {"arch": "MobileNetV2_imagenet"},
        "optim": {"lr": 0.02, "weight_decay": 0.0001, "epochs": 2, "scheduler": "cosine",
                  "clip_grad_norm": 10.0},
        "runtime": {"amp": "off", "channels_last": False, "threads": 1}}
Trainer(validate_config({**base, "name": "det_teacher"}, "det_teacher"), out / "det_teacher",
        require_teacher=False).run()
student = {**base, "name": "det_sd_dkd_fitnet",
           "optim": {**base["optim"], "epochs": 1},
           "teacher": {"arch": "MobileNetV2_imagenet",
                       "checkpoint": str(out / "det_teacher" / "checkpoints" / "best.pt")},
           "method": {"name": "sd_dkd",
                      "params": {"alpha": 1.0, "beta": 0.25, "temperature": 1.0,
                                 "warmup_epochs": 0, "scales": [1, 2], "sdd_beta": 2.0},
                      "partners": [{"name": "fitnet"}]}}
Trainer(validate_config(student, "det_sd_dkd_fitnet"), out / "det_sd_dkd_fitnet",
        require_teacher=True).run()
'''
DETECTION_RUNS = ("det_teacher", "det_sd_dkd_fitnet")
RUNS = ("teacher", "kd", "sd_dkd_crd", "dckd_fitnet", "reviewkd", *DETECTION_RUNS)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


def _metrics(run: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="git commit to compare the working tree with")
    parser.add_argument("--out", type=Path, help="keep both sides' runs here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="kdlab-same-"))
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.ref], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        data = out / "fm-detection"
        make_fashion_mnist_detection(data, n_train=48, n_test=16, size=64, objects=(1, 2),
                                     scale=(1.0, 1.5), seed=0)
        for side, src in (("a", Path(tmp) / "src"), ("b", ROOT / "src")):
            env = dict(os.environ, PYTHONPATH=str(src))
            for recipe in (RECIPES, DETECTION_RECIPES):
                subprocess.run([sys.executable, "-c", recipe, str(out / side), str(data)],
                               check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
    bad = 0
    for run in RUNS:
        a = torch.load(out / "a" / run / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(out / "b" / run / "checkpoints" / "last.pt", weights_only=True)
        diffs = [f"model.{k}" for k in a["model"] if not _same(a["model"][k], b["model"][k])]
        fa, fb = flatten(a["distiller"]), flatten(b["distiller"])
        diffs += [f"distiller.{k}" for k in fa if k not in fb or not _same(fa[k], fb[k])]
        same_metrics = _metrics(out / "a" / run) == _metrics(out / "b" / run)
        ok = not diffs and same_metrics
        bad += not ok
        print(f"{run:12s} {'same' if ok else 'DIFFERENT'}: {len(a['model'])} student and "
              f"{len(fa)} method tensors, metrics {'equal' if same_metrics else 'differ'}"
              + (f"; differing: {', '.join(diffs[:5])}" if diffs else ""))
    print(f"runs in {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
