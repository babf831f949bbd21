#!/usr/bin/env bash
# client-memory.sh: the peak resident memory of a `splitq client` for every shipped config, as a
# low-resource client machine would see it (the 400 MB a client may have: issue 13).
#
#   scripts/client-memory.sh SPLITQ OUT [STEPS]
#
# For each configs/*.yaml: a coordinator and a worker (plaintext, loopback, OS-picked ports) and
# one client under `/usr/bin/time -v`, for STEPS steps (default 6) with a validation pass every 3
# (validation is the client's largest batch). The LM LoRA configs need a base checkpoint: a
# 2-step lm-pretrain run makes one (its weights do not change the memory). Prints one line per
# config, "CONFIG peak_rss_mib N ms_per_step M" (or why it cannot run over the network), and
# leaves the logs in OUT. CONFIGS="name ..." limits it to those configs. Exits 1 if a run fails.
# Takes about 2 minutes per LM config on 2 cores.
set -euo pipefail
SPLITQ=$(realpath "${1:?usage: client-memory.sh SPLITQ OUT [STEPS]}")
OUT=${2:?usage: client-memory.sh SPLITQ OUT [STEPS]}
STEPS=${3:-6}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ -x /usr/bin/time ]] || { echo "client-memory: needs /usr/bin/time (apt-get install time)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# The address a server (process PID) wrote to its --ready-file, once it is ready; fails when
# the process exits first or after 60 s.
wait_ready() {
  local file=$1 log=$2 pid=$3 i
  for i in $(seq 1 600); do
    if [[ -s $file ]]; then
      head -n1 "$file"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "client-memory: $file never appeared; see $log" >&2
  return 1
}

init=""
for config in "$ROOT"/configs/*.yaml; do
  name=$(basename "$config" .yaml)
  if [[ -n ${CONFIGS:-} && " $CONFIGS " != *" $name "* ]]; then continue; fi
  dir=$OUT/$name
  rm -rf "$dir" && mkdir -p "$dir"
  sets=(--set "steps=$STEPS" --set eval_every=3 --set log_every=1 --set checkpoint_every=0)
  init_args=()
  if grep -q '^lora:' "$config"; then
    if [[ -z $init ]]; then
      echo "client-memory: a 2-step lm-pretrain run for the LoRA configs' base" >&2
      "$SPLITQ" train --config "$ROOT/configs/lm-pretrain.yaml" --set steps=2 --set eval_every=2 \
        --out "$OUT/pretrain" --force >"$OUT/pretrain.log" 2>&1
      init=$OUT/pretrain/checkpoint.pt
    fi
    init_args=(--init "$init")
  fi
  "$SPLITQ" coordinator --config "$config" --listen 127.0.0.1:0 --insecure \
    --ready-file "$dir/coordinator.address" >"$dir/coordinator.log" 2>&1 &
  coordinator_pid=$!
  pids+=("$coordinator_pid")
  coordinator=$(wait_ready "$dir/coordinator.address" "$dir/coordinator.log" "$coordinator_pid")
  "$SPLITQ" worker --config "$config" "${sets[@]}" "${init_args[@]}" --coordinator "$coordinator" \
    --listen 127.0.0.1:0 --insecure --name worker0 --ready-file "$dir/worker.address" \
    >"$dir/worker.log" 2>&1 &
  worker_pid=$!
  pids+=("$worker_pid")
  if ! wait_ready "$dir/worker.address" "$dir/worker.log" "$worker_pid" >/dev/null; then
    if grep -q UNIMPLEMENTED "$dir/worker.log"; then  # e.g. AQ-SGD over the network
      printf '%-22s not over the network yet: %s\n' "$name" "$(head -c 120 "$dir/worker.log")"
      kill "$worker_pid" "$coordinator_pid" 2>/dev/null || true
      wait "$worker_pid" "$coordinator_pid" 2>/dev/null || true
      continue
    fi
    exit 1
  fi
  if ! /usr/bin/time -v "$SPLITQ" client --config "$config" "${sets[@]}" "${init_args[@]}" \
      --coordinator "$coordinator" --insecure --id client0 --shard 0/1 --out "$dir/client0" \
      >"$dir/client.log" 2>&1; then
    echo "client-memory: $name: the client failed; see $dir/client.log" >&2
    tail -n 5 "$dir/client.log" >&2
    exit 1
  fi
  kill "$worker_pid" "$coordinator_pid" 2>/dev/null || true
  wait "$worker_pid" "$coordinator_pid" 2>/dev/null || true
  kib=$(sed -n 's/.*Maximum resident set size (kbytes): //p' "$dir/client.log")
  ms=$(grep -o '[0-9]* ms/step' "$dir/client.log" | tail -n 3 | awk '{s += $1} END {printf "%.0f", s / NR}')
  printf '%-22s peak_rss_mib %4d (%d kB)  ms_per_step %s\n' "$name" $((kib / 1024)) "$kib" "$ms"
done
