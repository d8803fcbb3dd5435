"""Training speed of a detection config: images/s of the real ``Trainer.step`` on its data.

    python benchmarks/detection_step.py configs/detection/fm_synthetic/dkd.yaml --steps 8 \
        --set runtime.channels_last=true

Builds the run exactly as ``kdlab distill`` does (into a temporary run directory), runs one
warm-up step and times ``--steps`` more on the training loader's first batches. The teacher may be
missing (``teacher.checkpoint`` is then ignored): its weights do not change the speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from kdlab.config import load_config
from kdlab.engine.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    if cfg.teacher is not None and cfg.teacher.checkpoint:
        from pathlib import Path

        if not Path(cfg.teacher.checkpoint).is_file():
            cfg = load_config(args.config, [*args.set, "teacher.checkpoint=null"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, run_dir)
        trainer.setup()
        trainer.train_loader.set_epoch(1)
        batches = iter(trainer.train_loader)
        trainer.step(next(batches), 1)  # warm-up
        images, start = 0, time.perf_counter()
        for _ in range(args.steps):
            batch = next(batches)
            trainer.step(batch, 1)
            images += len(batch.images)
        seconds = time.perf_counter() - start
    print(f"{cfg.name}: student {cfg.student.arch}, teacher "
          f"{cfg.teacher.arch if cfg.teacher else '-'}, method {cfg.method.name}: "
          f"{images / seconds:.2f} img/s ({1000 * seconds / args.steps:.0f} ms/step, "
          f"batch {cfg.data.batch_size})")


if __name__ == "__main__":
    main()
