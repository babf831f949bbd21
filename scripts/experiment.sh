#!/usr/bin/env bash
# The experiment of docs/results.md: every row, every seed, then the table.
#
#   scripts/experiment.sh fmnist      OUT [SEEDS]   # Fashion-MNIST, full size (CPU: ~100 s a run)
#   scripts/experiment.sh lm          OUT [SEEDS]   # GCIDE pre-training, then Bible LoRA (GPU)
#   scripts/experiment.sh lm-reduced  OUT [SEEDS]   # the same rows, a smaller model (CPU)
#   scripts/experiment.sh lm-grads    OUT [SEEDS]   # AMAQ 8 -> 4 with 8, 6, 4, 8->4-bit gradients (GPU)
#   scripts/experiment.sh lm-rotation OUT [SEEDS]   # lm's rows, and the 4- and 2-bit ones rotated
#   scripts/experiment.sh lm-reduced-rotation OUT [SEEDS]   # the same, the smaller model (CPU)
#   scripts/experiment.sh table       OUT           # the Markdown table of what OUT holds
#
# SEEDS defaults to "0 1 2". Runs already finished (OUT/<row>/seed<N>/summary.json) are
# skipped, so an interrupted experiment continues where it stopped. Each run's output is in
# OUT/<row>/seed<N>/ (metrics.jsonl, summary.json, ...) and its log in OUT/<row>/seed<N>.log.
# SPLITQ names the binary (default build/splitq); EXTRA adds --set options to every run
# (e.g. EXTRA="--set device=cuda"). ROTATION is the block of the rotated rows (default 256,
# the full model's width: one Hadamard transform over all channels). ONLY="row row ..." runs
# just those rows (and the pre-training they need).
set -euo pipefail
cd "$(dirname "$0")/.."
SPLITQ=${SPLITQ:-build/splitq}
usage="usage: scripts/experiment.sh fmnist|lm|lm-reduced|lm-grads|lm-rotation|lm-reduced-rotation|table OUT [SEEDS]"
what=${1:?$usage}
out=${2:?$usage}
seeds=${3:-0 1 2}
read -r -a extra <<<"${EXTRA:-}"

# run NAME SEED ARGS...: one `splitq train` run, unless it already finished.
run() {
  local name=$1 seed=$2
  shift 2
  local dir="$out/$name/seed$seed"
  if [[ -n ${ONLY:-} && $name != pretrain && " $ONLY " != *" $name "* ]]; then
    return
  fi
  if [[ -f "$dir/summary.json" ]]; then
    echo "== $name seed $seed: done already"
    return
  fi
  mkdir -p "$out/$name"
  echo "== $name seed $seed"
  local start=$SECONDS
  if ! "$SPLITQ" train --out "$dir" --set "seed=$seed" "$@" "${extra[@]}" >"$dir.log" 2>&1; then
    echo "   FAILED, see $dir.log"
    tail -3 "$dir.log"
    return 1
  fi
  echo "   $(tail -2 "$dir.log" | head -1) [$((SECONDS - start)) s]"
}

# key FILE KEY: a number from a summary.json (one key per line).
key() { sed -n "s/^ *\"$2\": \([^,]*\),\{0,1\}$/\1/p" "$1"; }

table() {
  echo "| row | runs | val accuracy (%) or val bits/byte | final act bits | run-average wire bits up | MB up | MB down |"
  echo "|---|---|---|---|---|---|---|"
  for dir in "$out"/*/; do
    local row
    row=$(basename "$dir")
    [[ $row == pretrain* ]] && continue
    local files=("$dir"seed*/summary.json)
    [[ -f ${files[0]} ]] || continue
    for f in "${files[@]}"; do
      local acc
      acc=$(key "$f" val_accuracy)
      [[ $acc == null ]] && acc=$(key "$f" val_bits_per_byte) || acc=$(awk -v a="$acc" 'BEGIN{print 100*a}')
      echo "$acc $(key "$f" avg_act_bits) $(key "$f" bytes_up) $(key "$f" bytes_down) $(key "$f" bytes_fp32_equivalent)"
    done | awk -v row="$row" '
      { n++; m[n] = $1; s += $1; bits += $2; up += $3; down += $4; fp += $5 }
      END {
        mean = s / n; v = 0
        for (i = 1; i <= n; i++) v += (m[i] - mean) ^ 2
        sd = n > 1 ? sqrt(v / (n - 1)) : 0
        printf "| %s | %d | %.3f ± %.3f | %.2f | %.2f | %.1f | %.1f |\n", row, n, mean, sd,
               bits / n, 64 * up / fp, up / n / 1e6, down / n / 1e6
      }'
  done
}

fmnist() {
  local amaq3='[{step: 0, bits: 8}, {step: 300, bits: 8}, {step: 1000, bits: 3, curve: cosine}]'
  local amaq2='[{step: 0, bits: 8}, {step: 300, bits: 8}, {step: 1000, bits: 2, curve: cosine}]'
  for seed in $seeds; do
    run fp32 "$seed" --config configs/fmnist-fp32.yaml
    run uniform3 "$seed" --config configs/fmnist-uniform3.yaml
    run uniform8to3 "$seed" --config configs/fmnist-uniform3.yaml \
      --set quant.activations.bits.max=8 --set "quant.activations.target=$amaq3"
    run aqsgd3 "$seed" --config configs/fmnist-uniform3.yaml --set quant.activations.mode=aqsgd
    run amaq8to3 "$seed" --config configs/fmnist-amaq.yaml
    run uniform2 "$seed" --config configs/fmnist-uniform3.yaml \
      --set quant.activations.bits.min=2 --set quant.activations.bits.max=2 \
      --set quant.activations.target=2
    run amaq8to2 "$seed" --config configs/fmnist-amaq.yaml --set "quant.activations.target=$amaq2"
    run amaq8to2-floor1 "$seed" --config configs/fmnist-amaq.yaml \
      --set quant.activations.bits.min=1 --set "quant.activations.target=$amaq2"
  done
}

# lm_rows PRETRAIN_ARGS LORA_ARGS AMAQ_SCHEDULE: pre-train once, then every LoRA row.
lm_rows() {
  local -a pre=() lora=()
  read -r -a pre <<<"$1"
  read -r -a lora <<<"$2"
  local sched=$3
  run pretrain 0 --config configs/lm-pretrain.yaml "${pre[@]}"
  local init=(--init "$out/pretrain/seed0/checkpoint.pt")
  # Every quantized row with 8-bit gradients, as the other rows' configs have (the AMAQ config
  # now ships gradients 8 -> 4: `lm-grads` below measures that choice).
  local grad8=(--set quant.gradients.bits.min=8 --set quant.gradients.target=8)
  for seed in $seeds; do
    run fp32 "$seed" --config configs/lm-lora-fp32.yaml "${init[@]}" "${lora[@]}"
    run uniform4 "$seed" --config configs/lm-lora-uniform4.yaml "${init[@]}" "${lora[@]}"
    run uniform8to4 "$seed" --config configs/lm-lora-uniform4.yaml "${init[@]}" "${lora[@]}" \
      --set quant.activations.bits.max=8 --set "quant.activations.target=$sched"
    run aqsgd4 "$seed" --config configs/lm-lora-aqsgd.yaml "${init[@]}" "${lora[@]}"
    run amaq8to4 "$seed" --config configs/lm-lora-amaq.yaml "${init[@]}" "${lora[@]}" \
      --set "quant.activations.target=$sched" "${grad8[@]}"
    run uniform2 "$seed" --config configs/lm-lora-uniform4.yaml "${init[@]}" "${lora[@]}" \
      --set quant.activations.bits.min=2 --set quant.activations.bits.max=2 \
      --set quant.activations.target=2
    run amaq8to2 "$seed" --config configs/lm-lora-amaq.yaml "${init[@]}" "${lora[@]}" \
      --set "quant.activations.target=${sched//bits: 4/bits: 2}" "${grad8[@]}"
  done
}

# lm_rotation_rows PRETRAIN_ARGS LORA_ARGS AMAQ_SCHEDULE: lm_rows, then the 4- and 2-bit rows
# again with quant.activations.rotation (issue 17: rotated boundaries), named <row>-rot.
lm_rotation_rows() {
  lm_rows "$@"
  local -a lora=()
  read -r -a lora <<<"$2"
  local sched=$3
  local init=(--init "$out/pretrain/seed0/checkpoint.pt")
  local grad8=(--set quant.gradients.bits.min=8 --set quant.gradients.target=8)
  local rot=(--set "quant.activations.rotation=${ROTATION:-256}")
  for seed in $seeds; do
    run uniform4-rot "$seed" --config configs/lm-lora-uniform4.yaml "${init[@]}" "${lora[@]}" \
      "${rot[@]}"
    run amaq8to4-rot "$seed" --config configs/lm-lora-amaq.yaml "${init[@]}" "${lora[@]}" \
      --set "quant.activations.target=$sched" "${grad8[@]}" "${rot[@]}"
    run uniform2-rot "$seed" --config configs/lm-lora-uniform4.yaml "${init[@]}" "${lora[@]}" \
      --set quant.activations.bits.min=2 --set quant.activations.bits.max=2 \
      --set quant.activations.target=2 "${rot[@]}"
    run amaq8to2-rot "$seed" --config configs/lm-lora-amaq.yaml "${init[@]}" "${lora[@]}" \
      --set "quant.activations.target=${sched//bits: 4/bits: 2}" "${grad8[@]}" "${rot[@]}"
  done
}

# lm_grads: the gradient's bit width on the wire, with AMAQ 8 -> 4 activations (the question
# behind issue 4's link target: how many bits the gradients need). Pre-trains as `lm` does.
lm_grads() {
  local sched='[{step: 0, bits: 8}, {step: 200, bits: 8}, {step: 800, bits: 4, curve: cosine}]'
  run pretrain 0 --config configs/lm-pretrain.yaml
  local amaq=(--config configs/lm-lora-amaq.yaml --init "$out/pretrain/seed0/checkpoint.pt"
    --set "quant.activations.target=$sched")
  for seed in $seeds; do
    run amaq8to4-grad8 "$seed" "${amaq[@]}" --set quant.gradients.bits.min=8 \
      --set quant.gradients.target=8
    run amaq8to4-grad6 "$seed" "${amaq[@]}" --set quant.gradients.bits.min=6 \
      --set quant.gradients.target=6
    run amaq8to4-grad4 "$seed" "${amaq[@]}" --set quant.gradients.bits.min=4 \
      --set quant.gradients.target=4
    run amaq8to4-grad8to4 "$seed" "${amaq[@]}" --set quant.gradients.bits.min=4 \
      --set "quant.gradients.target=$sched"  # (what configs/lm-lora-amaq.yaml now holds)
    run fp32 "$seed" --config configs/lm-lora-fp32.yaml --init "$out/pretrain/seed0/checkpoint.pt"
  done
}

case "$what" in
  fmnist) fmnist ;;
  lm-grads) lm_grads ;;
  lm)
    lm_rows "" "" \
      '[{step: 0, bits: 8}, {step: 200, bits: 8}, {step: 800, bits: 4, curve: cosine}]'
    ;;
  lm-rotation)
    lm_rotation_rows "" "" \
      '[{step: 0, bits: 8}, {step: 200, bits: 8}, {step: 800, bits: 4, curve: cosine}]'
    ;;
  lm-reduced | lm-reduced-rotation)
    small="--set model.layers=4 --set model.width=128 --set model.context=64 --set batch_size=16"
    rows=lm_rows
    [[ $what == lm-reduced-rotation ]] && rows=lm_rotation_rows
    $rows "$small --set steps=800 --set optim.warmup_steps=50" \
      "$small --set steps=300 --set optim.warmup_steps=20 --set log_every=10" \
      '[{step: 0, bits: 8}, {step: 40, bits: 8}, {step: 160, bits: 4, curve: cosine}]'
    ;;
  table) ;;
  *)
    echo "unknown experiment '$what' ($usage)" >&2
    exit 2
    ;;
esac
table | tee "$out/table.md"
