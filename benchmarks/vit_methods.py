"""Training-step speed of a ViT student per distillation method (the transformer study's table).

    python benchmarks/vit_methods.py [--teacher resnet14] [--out out/vit_methods.json]

Every method of the Fashion-MNIST transformer study (docs/results/fashion-mnist/transformers/)
through ``kdlab bench``'s trainer (the full step: teacher forward, student forward and backward,
the method's loss, the optimizer), one after another in one process, on synthetic 1-channel
32-px data with 10 classes, batch 64, fp32, one thread. Prints img/s and the step time per
method; writes every ``kdlab bench`` result as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdlab.bench import BenchSettings, run_bench

#: (label, student arch, method, overrides): the study's methods and settings.
METHODS = [
    ("student alone", "vit_tiny", "vanilla", []),
    ("KD", "vit_tiny", "kd", []),
    ("DKD", "vit_tiny", "dkd", []),
    ("SD-DKD {1,2,4}", "vit_tiny", "sd_dkd", ["method.params.scales=[1,2,4]"]),
    ("DCKD", "vit_tiny", "dckd", []),
    ("DeiT hard", "vit_tiny_distilled", "deit", ["method.params.type=hard"]),
    ("DeiT soft", "vit_tiny_distilled", "deit", ["method.params.type=soft"]),
    ("OFA", "vit_tiny", "ofa", []),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet14")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = []
    for label, student, method, overrides in METHODS:
        settings = BenchSettings(
            teacher=args.teacher, student=student, method=method, batch_size=64,
            input_size=32, num_classes=10, amp="off", threads=1, steps=args.steps, warmup=3,
            part_steps=3, eval_size=0, flops=False,
            overrides=["data.synthetic.channels=1", *overrides])
        result = run_bench(settings, rounds=args.rounds)
        results.append({"label": label, **result})
        train = result["train"]
        print(f"{label:16s} {train['img_per_s']:7.1f} img/s  {train['step_ms']:7.1f} ms/step  "
              f"(load {result['load_avg_1m_start']:.1f} -> {result['load_avg_1m_end']:.1f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
