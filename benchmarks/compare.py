"""kdlab's training step vs the classic pipeline, in one process, interleaved.

Both sides train the same pair with the same method (the same kdlab models and loss functions,
same synthetic data sizes); only the pipeline differs (see ``classic_pipeline.py``). Rounds
alternate kdlab, classic, kdlab, classic, ... with ``--steps`` steps each after warm-up; the
median round of each side gives its step time, and the ratio classic / kdlab is printed.

    .venv/bin/python benchmarks/compare.py [--rounds 3 --steps 3] [--amp off]
    .venv/bin/python benchmarks/compare.py --check-losses

``--check-losses``: for kd, dkd, sd_kd, sd_dkd, sd_nkd and dckd, the loss terms of one batch on
the fast path (bf16 autocast + channels_last) against the plain fp32 NCHW path; fails when the
total loss differs by more than ``--rtol`` (relative) + ``--atol``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classic_pipeline import ClassicPipeline  # noqa: E402

from kdlab.bench import (  # noqa: E402
    BenchSettings,
    TrainBench,
    check_losses,
    wait_for_quiet,
)
from kdlab.config import parse_override  # noqa: E402
from kdlab.core.env import load_average, machine_info  # noqa: E402

CHECK_METHODS = ("kd", "dkd", "sd_kd", "sd_dkd", "sd_nkd", "dckd")
#: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2 % per op); through a network and
#: a softmax-temperature loss the totals agree to ~0.2 % (measured); the stated bound is
#: |d| <= ATOL + RTOL |loss| with RTOL 1 %.
RTOL = 1e-2
ATOL = 1e-3


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds; returns medians, ratio and every round."""
    params: dict[str, Any] = {}
    for text in args.set:
        keys, value = parse_override(text)
        params[keys[-1]] = value
    overrides = [f"method.params.{k}={json.dumps(v)}" for k, v in params.items()]
    settings = BenchSettings(teacher=args.teacher, student=args.student, method=args.method,
                             overrides=overrides, batch_size=args.batch_size,
                             input_size=args.input_size, device=args.device, amp=args.amp,
                             channels_last=not args.no_channels_last, threads=args.threads,
                             steps=args.steps, warmup=args.warmup, eval_size=0, flops=False)
    loads = [load_average()]
    with TrainBench(settings) as fast:
        classic = ClassicPipeline(args.teacher, args.student, args.method, params=params,
                                  batch_size=args.batch_size, input_size=args.input_size,
                                  num_workers=args.workers, device=str(fast.device))
        fast.warmup(args.warmup)
        classic.run(args.warmup)
        rounds: dict[str, list[float]] = {"kdlab": [], "classic": []}
        for _ in range(args.rounds):
            rounds["kdlab"].append(fast.timed_pass() / fast.steps)
            rounds["classic"].append(classic.run(args.steps) / args.steps)
            loads.append(load_average())
        amp_dtype = str(fast.amp_dtype)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    return {
        "pair": f"{args.teacher}->{args.student}", "method": args.method, "params": params,
        "batch_size": args.batch_size, "input_size": args.input_size, "amp": args.amp,
        "amp_dtype": amp_dtype, "channels_last": not args.no_channels_last,
        "workers": args.workers, "steps_per_round": args.steps, "rounds": rounds,
        "median_step_ms": {k: 1e3 * v for k, v in med.items()},
        "img_per_s": {k: args.batch_size / v for k, v in med.items()},
        "speedup_classic_over_kdlab": med["classic"] / med["kdlab"],
        "load_avg_1m": loads, "machine": machine_info(),
    }


def run_check_losses(args: argparse.Namespace) -> tuple[list[dict[str, Any]], bool]:
    """Fast vs plain loss for each method on a tiny pair; returns (results, all passed)."""
    results, ok = [], True
    for method in CHECK_METHODS:
        try:
            r = check_losses(method, teacher=args.check_teacher, student=args.check_student,
                             batch_size=16)
        except RuntimeError as e:
            results.append({"method": method, "error": str(e).splitlines()[0]})
            ok = False
            continue
        plain = r["plain"]["total"]
        r["passed"] = abs(r["fast"]["terms"]["total"] - plain) <= ATOL + RTOL * abs(plain)
        ok = ok and r["passed"]
        results.append(r)
    return results, ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--teacher", default="resnet32x4")
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--method", default="sd_dkd")
    p.add_argument("--set", action="append", default=None, metavar="PARAM=VALUE",
                   help="method parameter (default for sd_*: scales=[1,2], the pair's M)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="kdlab side's autocast (the classic side is always fp32)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="classic DataLoader workers")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-load", type=float, default=1.5,
                   help="wait (up to --wait s) for the 1-min load average to drop below this")
    p.add_argument("--wait", type=float, default=0.0)
    p.add_argument("--json", help="write the result here")
    p.add_argument("--check-losses", action="store_true")
    p.add_argument("--check-teacher", default="resnet14")
    p.add_argument("--check-student", default="resnet8")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.set is None:
        args.set = ["scales=[1, 2]"] if args.method.startswith("sd_") else []

    if args.check_losses:
        results, ok = run_check_losses(args)
        print(f"fast path (bf16 autocast + channels_last) vs plain fp32 NCHW, "
              f"{args.check_teacher}->{args.check_student}, batch 16; "
              f"tolerance |d| <= {ATOL} + {RTOL} |loss|")
        print(f"{'method':<8}{'plain':>10}{'fast':>10}{'max abs':>11}{'max rel':>10}"
              f"{'fp32 CL rel':>13}  ok")
        for r in results:
            if "error" in r:
                print(f"{r['method']:<8}  ERROR: {r['error']}")
                continue
            f = r["fast"]
            print(f"{r['method']:<8}{r['plain']['total']:10.4f}{f['terms']['total']:10.4f}"
                  f"{f['max_abs']:11.2e}{f['max_rel']:10.2e}"
                  f"{r['fp32_channels_last']['max_rel']:13.2e}  {r['passed']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        sys.exit(0 if ok else 1)

    load, quiet = wait_for_quiet(args.max_load, args.wait)
    res = compare(args)
    res["quiet_before_start"] = quiet
    m = res["median_step_ms"]
    print(f"{res['pair']} {res['method']} {res['params']} batch {res['batch_size']} "
          f"{res['input_size']}px, kdlab amp {res['amp']} ({res['amp_dtype']}), "
          f"classic fp32 NCHW {res['workers']} workers")
    print(f"rounds of {args.steps} steps, interleaved: kdlab {res['rounds']['kdlab']}")
    print(f"                                     classic {res['rounds']['classic']}")
    print(f"median step: kdlab {m['kdlab']:.1f} ms ({res['img_per_s']['kdlab']:.1f} img/s), "
          f"classic {m['classic']:.1f} ms ({res['img_per_s']['classic']:.1f} img/s)")
    print(f"speed ratio classic/kdlab: {res['speedup_classic_over_kdlab']:.2f}x   "
          f"load avg 1 min: {', '.join(f'{x:.2f}' for x in res['load_avg_1m'])}"
          + ("" if quiet else "  (UNDER LOAD: provisional)"))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
