"""Training speed of detection configs: ms per real ``Trainer.step`` on their data.

One config (images/s, as before)::

    python benchmarks/detection_step.py configs/detection/fm_synthetic/dkd.yaml --steps 8 \
        --set runtime.channels_last=true

Several configs, interleaved in one process (ratios that survive a shared, noisy machine)::

    python benchmarks/detection_step.py configs/detection/fm_synthetic/dkd.yaml \
        configs/detection/fm_synthetic/sd_dkd.yaml --steps 4 --rounds 3 \
        --set data.batch_size=4 --set runtime.threads=1

Builds each run exactly as ``kdlab distill`` does (into a temporary run directory). Every config
trains on the SAME batches (taken from the first config's training loader), one warm-up step
each, then ``--rounds`` rounds in which every config in turn runs ``--steps`` steps; the table
gives each config's median ms/step over the rounds and its ratio to the first config. A teacher
whose checkpoint is missing is built with random weights (``teacher.random_init``): its weights
do not change the speed. ``--set`` applies to every config; ``--set-N KEY=VALUE`` (N = the
config's position, from 0) to one only, so the same config can be compared with itself under
two settings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kdlab.config import load_config
from kdlab.engine.trainer import Trainer


def _config(path: str, sets: list[str]) -> Any:
    cfg = load_config(path, sets)
    if cfg.teacher is not None and not (cfg.teacher.checkpoint
                                        and Path(cfg.teacher.checkpoint).is_file()):
        cfg = load_config(path, [*sets, "teacher.checkpoint=null", "teacher.random_init=true"])
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per config and round")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    known, rest = parser.parse_known_args()
    per: dict[int, list[str]] = {}
    for i in range(0, len(rest), 2):
        flag = rest[i]
        if not flag.startswith("--set-") or i + 1 >= len(rest):
            parser.error(f"unknown argument {flag!r}")
        per.setdefault(int(flag[len("--set-"):]), []).append(rest[i + 1])
    cfgs = [_config(p, [*known.set, *per.get(i, [])]) for i, p in enumerate(known.configs)]
    with tempfile.TemporaryDirectory() as tmp:
        trainers = []
        for i, cfg in enumerate(cfgs):
            trainer = Trainer(cfg, Path(tmp) / str(i))
            trainer.setup()
            trainers.append(trainer)
        loader = trainers[0].train_loader
        loader.set_epoch(1)
        batches = iter(loader)
        warm = next(batches)
        timed = [next(batches) for _ in range(known.steps)]
        for trainer in trainers:
            trainer.step(warm, 1)
        times: list[list[float]] = [[] for _ in trainers]
        for _ in range(known.rounds):
            for k, trainer in enumerate(trainers):
                start = time.perf_counter()
                for batch in timed:
                    trainer.step(batch, 1)
                times[k].append(1000 * (time.perf_counter() - start) / known.steps)
    base = statistics.median(times[0])
    images = len(timed[0].images)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {images}, "
          f"{known.steps} steps x {known.rounds} rounds (median)")
    for cfg, ms in zip(cfgs, times, strict=True):
        med = statistics.median(ms)
        rounds = ", ".join(f"{t:.0f}" for t in ms)
        print(f"{cfg.name}: student {cfg.student.arch}, teacher "
              f"{cfg.teacher.arch if cfg.teacher else '-'}, method {cfg.method.name}: "
              f"{med:.0f} ms/step ({1000 * images / med:.2f} img/s; rounds {rounds}); "
              f"x{med / base:.3f} of the first")


if __name__ == "__main__":
    main()
