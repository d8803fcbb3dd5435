#!/usr/bin/env bash
# Every GPU figure issue 5 asks for, in one go (docs/performance.md, "GPU").
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [DEVICE]      # after `make setup`; DEVICE default cuda
#
# Size knobs (environment; the defaults are the issue's protocol, the test suite shrinks them
# to smoke-test the script on CPU): PAIR (extra bench/scaling/compare arguments, e.g.
# "--teacher resnet14 --student resnet8"), EPOCH_IMAGES (50000), BATCHES ("64 128 256"),
# STEPS (100, timed steps of the interleaved comparisons), GRID_BATCHES ("64 128 256 512"),
# GRID_SIZES ("32 64"), EVAL_SIZE (10000), WARMUP (20 untimed steps; 30 when compiled),
# ROUNDS (3 timed rounds, medians), WORKERS (8 classic loader workers), COMPILE (1; 0 skips
# the compiled runs), MEMORY (1; 0 skips the ResNet50 -> MobileNetV2 memory figure).
#
# Writes OUT_DIR/*.json and OUT_DIR/*.txt (one pair per measurement) and OUT_DIR/suite.log.
# SD-DKD resnet32x4 -> resnet8x4, data resident on the GPU, bf16 autocast (amp auto), channels_last:
#  1. one epoch of 50,048 CIFAR-size images (782 steps of 64; 391 of 128; 196 of 256), eager and
#     with torch.compile (default and reduce-overhead = CUDA graphs), achieved TFLOP/s vs peak;
#  2. SDD's extra cost (KD vs SD-KD, DKD vs SD-DKD);
#  3. kdlab vs the classic pipeline (8 loader workers, pinned memory);
#  4. step time over batch x input size, and ResNet50 -> MobileNetV2 memory at batch 64;
#  5. a 2-rank NCCL distillation step under torchrun when the machine has two devices, else a
#     line recording that it has one (ddp.txt).
set -euo pipefail
out=${1:?usage: gpu_suite.sh OUT_DIR [DEVICE]}
device=${2:-cuda}
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python
read -r -a pair <<< "${PAIR:-}"
epoch_images=${EPOCH_IMAGES:-50000}
steps=${STEPS:-100}
eval_size=${EVAL_SIZE:-10000}
warmup=${WARMUP:-20}
warmup_compiled=${WARMUP:-30}
rounds=${ROUNDS:-3}
mkdir -p "$out"
exec > >(tee -a "$out/suite.log") 2>&1
echo "gpu_suite $(date -u +%FT%TZ) on $(hostname)"
"$py" -c "import torch; print('torch', torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"

bench() {  # bench NAME ARGS...: one kdlab bench run, table to NAME.txt, result to NAME.json
  local name=$1; shift
  echo "== $name: kdlab bench $*"
  "$py" -m kdlab -q bench --device "$device" --amp auto --json "$out/$name.json" \
    ${pair[@]+"${pair[@]}"} "$@" \
    | tee "$out/$name.txt"
}

eager=(--warmup "$warmup" --rounds "$rounds")
compiled=(--warmup "$warmup_compiled" --rounds "$rounds" --part-steps 0 --eval-size 0)
first=
for b in ${BATCHES:-64 128 256}; do
  n=$(( (epoch_images + b - 1) / b ))  # one epoch of >= EPOCH_IMAGES images
  first=${first:-$b}
  bench "epoch_b${b}_eager" --batch-size "$b" --steps "$n" "${eager[@]}" --part-steps 20 \
    --eval-size "$eval_size"
  if [ "${COMPILE:-1}" = 1 ]; then
    bench "epoch_b${b}_compile" --batch-size "$b" --steps "$n" "${compiled[@]}" --compile
    bench "epoch_b${b}_cudagraphs" --batch-size "$b" --steps "$n" "${compiled[@]}" \
      --compile reduce-overhead
  fi
done
n=$(( (epoch_images + first - 1) / first ))
bench "epoch_b${first}_fp32" --batch-size "$first" --steps "$n" "${eager[@]}" --part-steps 0 \
  --eval-size 0 --amp off
bench "epoch_b${first}_nchw" --batch-size "$first" --steps "$n" "${eager[@]}" --part-steps 0 \
  --eval-size 0 --no-channels-last

echo "== SDD overhead"
"$py" "$here/benchmarks/scaling.py" --device "$device" --amp auto --parts sdd --rounds "$rounds" \
  --steps "$steps" ${pair[@]+"${pair[@]}"} --json "$out/sdd.json" | tee "$out/sdd.txt"
"$py" "$here/benchmarks/scaling.py" --device "$device" --amp auto --parts sdd --rounds "$rounds" \
  --steps "$steps" --scales "[1,2,4]" ${pair[@]+"${pair[@]}"} --json "$out/sdd_124.json" \
  | tee "$out/sdd_124.txt"

echo "== kdlab vs classic"
"$py" "$here/benchmarks/compare.py" --device "$device" --amp auto --workers "${WORKERS:-8}" --rounds "$rounds" \
  --steps "$steps" --warmup "$warmup" ${pair[@]+"${pair[@]}"} --json "$out/compare.json" \
  | tee "$out/compare.txt"
"$py" "$here/benchmarks/compare.py" --device "$device" --check-losses ${pair[@]+"${pair[@]}"} \
  | tee "$out/check_losses.txt"

echo "== scaling and memory"
"$py" "$here/benchmarks/scaling.py" --device "$device" --amp auto --parts grid \
  $([ "${MEMORY:-1}" = 1 ] && echo memory) \
  --batch-sizes ${GRID_BATCHES:-64 128 256 512} --input-sizes ${GRID_SIZES:-32 64} \
  --steps "$steps" \
  ${pair[@]+"${pair[@]}"} --json "$out/scaling.json" \
  | tee "$out/scaling.txt"
echo "== 2-rank NCCL step"
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count() if '$device' == 'cuda' else 0)")
if [ "$ngpu" -ge 2 ]; then
  cat > "$out/ddp.yaml" <<'YAML'
name: ddp_smoke
data: {name: synthetic, batch_size: 256, eval_batch_size: 512,
       synthetic: {n_train: 4096, n_test: 1024, num_classes: 100}}
student: {arch: resnet8x4}
teacher: {arch: resnet32x4, random_init: true}
method: {name: sd_dkd}
optim: {epochs: 1, milestones: []}
runtime: {device: cuda, amp: auto}
YAML
  "$py" -m torch.distributed.run --standalone --nproc_per_node=2 -m kdlab -q distill \
    "$out/ddp.yaml" --run-dir "$out/ddp_run" --no-progress 2>&1 | tee "$out/ddp.txt"
  cat "$out/ddp_run/summary.json" >> "$out/ddp.txt"
else
  echo "one CUDA device ($ngpu found): the 2-rank NCCL step needs two; not run" | tee "$out/ddp.txt"
fi
echo "gpu_suite done $(date -u +%FT%TZ)"
