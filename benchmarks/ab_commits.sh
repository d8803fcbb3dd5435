#!/usr/bin/env bash
# Side-by-side speed of two commits in one run: `kdlab bench` of REF and of the working tree,
# interleaved (A B A B ...) so that machine load drifts hit both alike.
#
#   bash benchmarks/ab_commits.sh REF [ROUNDS] [OUT_DIR] [-- extra kdlab bench arguments]
#
# REF is extracted with `git archive` into a temporary folder and run with the same virtualenv
# (PYTHONPATH=REF/src). Each bench runs in its own process (peak RSS is per process). Results:
# OUT_DIR/{a,b}_N.json and a summary table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
REF=${1:?usage: ab_commits.sh REF [ROUNDS] [OUT_DIR] [-- bench args]}
ROUNDS=${2:-3}
OUT=${3:-out/ab}
shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
PY=${PYTHON:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
git archive "$REF" | tar -x -C "$TMP"
mkdir -p "$OUT"
ARGS=(--device cpu --steps 10 --warmup 3 --part-steps 5 --eval-size 500 "$@")
for i in $(seq 1 "$ROUNDS"); do
  PYTHONPATH="$TMP/src" "$PY" -m kdlab -q bench "${ARGS[@]}" --json "$OUT/a_$i.json" >/dev/null
  PYTHONPATH="$PWD/src" "$PY" -m kdlab -q bench "${ARGS[@]}" --json "$OUT/b_$i.json" >/dev/null
done
"$PY" - "$OUT" "$ROUNDS" "$REF" <<'PYEOF'
import json, statistics, sys
out, rounds, ref = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for side in ("a", "b"):
    rs = [json.load(open(f"{out}/{side}_{i}.json")) for i in range(1, rounds + 1)]
    rows[side] = {
        "step_ms": statistics.median(r["train"]["step_ms"] for r in rs),
        "img_s": statistics.median(r["train"]["img_per_s"] for r in rs),
        "parts_ms": statistics.median(r["parts"]["step_ms"] for r in rs),
        "gflop": rs[0]["flops"].get("per_step", float("nan")) / 1e9,
        "rss": statistics.median(r["memory"]["peak_mb"] for r in rs),
        "steps": [round(r["train"]["step_ms"], 1) for r in rs],
    }
print(f"{'':10}{'step ms':>10}{'img/s':>9}{'instr. ms':>11}{'GFLOP':>9}{'RSS MiB':>9}  per round")
for side, name in (("a", ref), ("b", "working tree")):
    r = rows[side]
    print(f"{name[:10]:10}{r['step_ms']:10.1f}{r['img_s']:9.1f}{r['parts_ms']:11.1f}"
          f"{r['gflop']:9.2f}{r['rss']:9.0f}  {r['steps']}")
print(f"ratio b/a step time: {rows['b']['step_ms'] / rows['a']['step_ms']:.3f}")
PYEOF
