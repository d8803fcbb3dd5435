"""How the training step scales, the memory of the largest pair, and SDD's extra cost.

Three parts (each can be skipped):

* ``grid``: step time of one pair over batch sizes x input sizes, each configuration in its own
  ``kdlab bench`` process (so each peak RSS is clean);
* ``memory``: peak RSS (or CUDA peak) of the largest pair, ResNet50 -> MobileNetV2, batch 64;
* ``sdd``: KD vs SD-KD and DKD vs SD-DKD on the pair (default resnet32x4 -> resnet8x4),
  interleaved in one process (rounds of ``--steps``; medians). Target: SDD adds at most 5 %
  to the step. Above that, the SD step is profiled with ``torch.profiler`` and the top
  operators are printed.

    .venv/bin/python benchmarks/scaling.py --amp off [--parts grid memory sdd]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdlab.bench import BenchSettings, TrainBench
from kdlab.core.env import load_average, machine_info

SDD_PAIRS = (("kd", "sd_kd"), ("dkd", "sd_dkd"))
TARGET_OVERHEAD = 0.05


def bench_subprocess(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One ``kdlab bench`` in a fresh process; returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "kdlab", "-q", "bench", "--device", args.device,
               "--amp", args.amp, "--threads", str(args.threads), "--eval-size", "0",
               "--json", str(out), *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for size in args.input_sizes:
        for bs in args.batch_sizes:
            if size * size * bs > args.max_pixels:
                continue
            r = bench_subprocess(args, [
                "--teacher", args.teacher, "--student", args.student, "--method", args.method,
                *(f"--set={s}" for s in args.set), "--batch-size", str(bs),
                "--input-size", str(size), "--steps", str(args.steps), "--warmup", "1",
                "--part-steps", "1", "--no-flops"])
            row = {"batch": bs, "size": size, "step_ms": r["train"]["step_ms"],
                   "img_per_s": r["train"]["img_per_s"], "peak_mb": r["memory"]["peak_mb"],
                   "load": r["load_avg_1m_start"]}
            print(f"  batch {bs:4d} {size:3d}px: {row['step_ms']:9.1f} ms/step "
                  f"{row['img_per_s']:8.1f} img/s  peak {row['peak_mb']:7.0f} MiB  "
                  f"load {row['load']:.2f}", flush=True)
            rows.append(row)
    return rows


def memory(args: argparse.Namespace) -> dict[str, Any]:
    r = bench_subprocess(args, [
        "--teacher", "ResNet50", "--student", "MobileNetV2", "--method", args.method,
        "--batch-size", "64", "--steps", "1", "--warmup", "1", "--part-steps", "1",
        "--no-flops"])
    row = {"pair": "ResNet50->MobileNetV2", "method": args.method, "batch": 64,
           "step_ms": r["train"]["step_ms"], "peak_mb": r["memory"]["peak_mb"],
           "memory_kind": r["memory"]["kind"], "load": r["load_avg_1m_start"]}
    print(f"  ResNet50->MobileNetV2 {args.method} batch 64: peak {row['peak_mb']:.0f} MiB "
          f"({row['memory_kind']}), {row['step_ms']:.0f} ms/step, load {row['load']:.2f}")
    return row


def sdd_overhead(args: argparse.Namespace) -> dict[str, Any]:
    methods = [m for pair in SDD_PAIRS for m in pair]
    over = [f"method.params.scales={json.dumps(args.scales)}"]
    benches = {m: TrainBench(BenchSettings(
        teacher=args.teacher, student=args.student, method=m,
        overrides=over if m.startswith("sd_") else [], device=args.device,
        amp=args.amp, threads=args.threads, steps=args.steps, warmup=1, eval_size=0,
        flops=False)) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    parts: dict[str, dict[str, float]] = {}
    try:
        for b in benches.values():
            b.warmup(1)
        for _ in range(args.rounds):
            for m, b in benches.items():
                times[m].append(b.timed_pass() / b.steps)
        for m, b in benches.items():
            parts[m] = {k: 1e3 * v for k, v in b.part_pass(1).items()}
        med = {m: statistics.median(v) for m, v in times.items()}
        result: dict[str, Any] = {"scales": args.scales, "median_step_ms": {
            m: 1e3 * v for m, v in med.items()}, "rounds_ms": {
            m: [1e3 * x for x in v] for m, v in times.items()}, "parts_ms": parts,
            "load": load_average()}
        for base, sd in SDD_PAIRS:
            ov = med[sd] / med[base] - 1.0
            loss_extra = parts[sd]["loss"] - parts[base]["loss"]
            result[f"{sd}_overhead"] = ov
            print(f"  {base}: {1e3 * med[base]:8.1f} ms  {sd}: {1e3 * med[sd]:8.1f} ms  "
                  f"overhead {100 * ov:+5.1f} % (target <= {100 * TARGET_OVERHEAD:.0f} %); "
                  f"loss part {parts[base]['loss']:.1f} -> {parts[sd]['loss']:.1f} ms "
                  f"(+{loss_extra:.1f} ms = {100 * loss_extra / (1e3 * med[base]):.1f} % of "
                  f"the step)")
            if ov > TARGET_OVERHEAD:
                result[f"{sd}_profile"] = profile(benches[sd])
    finally:
        for b in benches.values():
            b.close()
    return result


def profile(bench: TrainBench) -> str:
    """``torch.profiler`` table (top operators by self CPU time) of one SD step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU]
    if bench.device.type == "cuda":
        acts.append(ProfilerActivity.CUDA)
    with tprofile(activities=acts) as prof:
        bench.part_pass(1)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    print(table)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["grid", "memory", "sdd"],
                   choices=["grid", "memory", "sdd"])
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--method", default="sd_dkd")
    p.add_argument("--set", nargs="*", default=["method.params.scales=[1,2]"])
    p.add_argument("--scales", type=json.loads, default=[1, 2], help="SDD scales, JSON list")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--input-sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--max-pixels", type=int, default=128 * 64 * 64,
                   help="skip grid cells with batch x H x W above this")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write all results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"machine": machine_info(), "amp": args.amp}
    if "grid" in args.parts:
        print(f"step time, {args.teacher}->{args.student} {args.method}, amp {args.amp}:")
        out["grid"] = grid(args)
    if "memory" in args.parts:
        print("largest pair:")
        out["memory"] = memory(args)
    if "sdd" in args.parts:
        print(f"SDD overhead, {args.teacher}->{args.student}, scales {args.scales}, "
              f"amp {args.amp}:")
        out["sdd"] = sdd_overhead(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
