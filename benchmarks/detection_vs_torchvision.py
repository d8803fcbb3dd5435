"""kdlab's detection training step against a plain torchvision training loop, interleaved.

    python benchmarks/detection_vs_torchvision.py configs/detection/fm_synthetic/vanilla.yaml \
        --steps 4 --rounds 3 --set data.batch_size=4 --set runtime.threads=1

Builds the run as ``kdlab train`` does (a ``Trainer``), then a deep copy of its torchvision
``FasterRCNN`` (same backbone, FPN, anchors, RPN and RoI-head sizes, same weights) trained by the
reference loop of torchvision's detection recipe (``references/detection/engine.py``:
``loss = sum(model(images, targets).values())``, ``zero_grad``, ``backward``, gradient-norm clip
when the config clips, SGD step with the config's lr, momentum and weight decay). Both train on
the same batches from the run's loader; each round times ``--steps`` steps of each, alternating
which goes first. Prints both medians (ms/step) and kdlab's ratio to the reference.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from kdlab.config import load_config
from kdlab.engine.trainer import Trainer


def _reference_step(model: torch.nn.Module, cfg: Any) -> Callable[[Any], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    clip = cfg.optim.clip_grad_norm

    def step(batch: Any) -> None:
        losses = model(batch.images, batch.targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        trainer.setup()
        reference = copy.deepcopy(trainer.student.model)  # type: ignore[union-attr]
        reference.train()
        ref_step = _reference_step(reference, cfg)
        loader = trainer.train_loader
        loader.set_epoch(1)
        batches = iter(loader)
        warm = next(batches)
        timed = [next(batches) for _ in range(args.steps)]
        trainer.step(warm, 1)
        ref_step(warm)
        runs: dict[str, Callable[[Any], Any]] = {
            "kdlab Trainer.step": lambda b: trainer.step(b, 1), "torchvision loop": ref_step}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                start = time.perf_counter()
                for batch in timed:
                    runs[name](batch)
                times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cfg.name}: student "
          f"{cfg.student.arch}, batch {len(timed[0].images)}, {args.steps} steps x "
          f"{args.rounds} rounds (median)")
    for name, ms in med.items():
        rounds = ", ".join(f"{t:.0f}" for t in times[name])
        print(f"{name:<20} {ms:8.1f} ms/step  (rounds {rounds})")
    print(f"kdlab / torchvision: {med['kdlab Trainer.step'] / med['torchvision loop']:.3f}")


if __name__ == "__main__":
    main()
