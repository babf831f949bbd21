#!/usr/bin/env bash
# gpu-checks.sh: the GPU host's checks and measurements that a session without a GPU leaves
# for the next one, in one call (about 6-9 minutes on an H100), from the repository root:
#
#   scripts/gpu-checks.sh DEBDIR DATADIR OUT
#
# DEBDIR: made by `scripts/offline-deps.sh download DEBDIR all` on Debian 12 (built into
# build-gpu/ by scripts/gpu-build.sh). DATADIR: bible-kjv.txt.gz and gcide.dict.dz (from
# `splitq data export`; Fashion-MNIST is not needed). OUT: where the logs go; OUT/summary.txt
# holds every number and is printed at the end.
#   1. cuda_vs_cpu_test over every unpack case with the opt-in short-row kernel
#      (SPLITQ_KERNELS_RUNS=1, kernels/pack.cu UseRuns), bit for bit against the CPU path;
#   2. the NCHW 7x7 unpack with that kernel (RUNS=1) and without (RUNS=0), two rounds;
#   3. `bench step` of lm-lora-amaq at 4 bits (a 20-step base: timing only), plain, with the
#      channel rotation, and with rotation and rANS coding both ways, two rounds (issue 17's
#      step-ratio target);
#   4. the whole kernel table with its read/write bounds (`bench kernels --json`);
#   5. if time is left, torch.compile anchors for the 16-bit pack and unpack in both compile
#      modes (the open question in docs/benchmarks.md).
set -u
[[ $# -eq 3 ]] || { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
DEBDIR=$1 DATADIR=$(cd "$2" && pwd) OUT=$3
mkdir -p "$OUT"
S=$OUT/summary.txt
: >"$S"
t0=$SECONDS
say() { echo "$*" >>"$S"; }
bash scripts/gpu-build.sh "$DEBDIR" build-gpu >"$OUT/build.log" 2>&1 || {
  tail -40 "$OUT/build.log"
  exit 1
}
say "build done at $((SECONDS - t0)) s"
eval "$(scripts/offline-deps.sh env "${SPLITQ_DEP_PREFIX:-/opt/dep}")"
B=build-gpu
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader >>"$S"

SPLITQ_KERNELS_RUNS=1 timeout 200 $B/tests/cuda_vs_cpu_test --gtest_filter='*Unpack*' \
  >"$OUT/unpack_test.log" 2>&1
say "1. unpack test (RUNS=1) rc=$? $(grep -E 'PASSED|FAILED' "$OUT/unpack_test.log" | head -5 | tr '\n' ' ')"

for round in 1 2; do
  for v in 0 1; do
    SPLITQ_KERNELS_RUNS=$v $B/splitq bench kernels --device cuda --iters 50 --filter 7x7 \
      >"$OUT/ab_${round}_$v.txt" 2>&1
    say "2. round $round RUNS=$v"
    grep -E 'unpack|copy' "$OUT/ab_${round}_$v.txt" >>"$S"
  done
done
say "at $((SECONDS - t0)) s"

export SPLITQ_DATA_DIR=$DATADIR
$B/splitq train --config configs/lm-pretrain.yaml --set device=cuda --set steps=20 \
  --out "$OUT/pre" >"$OUT/pre.log" 2>&1 || tail -5 "$OUT/pre.log" >>"$S"
q4=(--set "quant.activations.target=[{step: 0, bits: 4}]"
    --set "quant.gradients.target=[{step: 0, bits: 4}]")
for round in 1 2; do
  for v in plain rot rotcode; do
    extra=()
    [[ $v != plain ]] && extra+=(--set quant.activations.rotation=256)
    [[ $v == rotcode ]] && extra+=(--set quant.activations.coding=rans --set quant.gradients.coding=rans)
    $B/splitq bench step --config configs/lm-lora-amaq.yaml --init "$OUT/pre/checkpoint.pt" \
      --set device=cuda --set quant.activations.calibration_steps=0 "${q4[@]}" "${extra[@]}" \
      --steps 60 >"$OUT/step_${v}_$round.txt" 2>&1
    say "3. step $v round $round: $(grep -E 'ms/step|ratio' "$OUT/step_${v}_$round.txt" | tr -s ' ' | tr '\n' ';')"
  done
done
say "at $((SECONDS - t0)) s"

$B/splitq bench kernels --device cuda --iters 50 --json "$OUT/ours.json" >"$OUT/bench_full.txt" 2>&1
say "4. the kernel table"
cat "$OUT/bench_full.txt" >>"$S"
say "at $((SECONDS - t0)) s"

if ((SECONDS - t0 < 380)); then
  $B/splitq bench kernels --device cuda --iters 50 --filter 'pack:nc_16384x4096:bfloat16:b4' \
    --json "$OUT/bf16pack.json" >/dev/null 2>&1
  for m in default max-autotune-no-cudagraphs; do
    timeout 100 python3 scripts/kernel-anchors.py --ours "$OUT/bf16pack.json" --compile-mode $m \
      >"$OUT/anchor_$m.txt" 2>&1
    say "5. anchors, compile mode $m"
    grep -E '^\| (un)?pack|eager' "$OUT/anchor_$m.txt" >>"$S"
  done
fi
say "end at $((SECONDS - t0)) s"
cat "$S"
