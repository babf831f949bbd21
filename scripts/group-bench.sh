#!/usr/bin/env bash
# A worker group on this host, end to end with real processes: a coordinator, WORLD workers
# (one per GPU, NCCL; on a machine without CUDA, Gloo on the CPU) and CLIENTS clients, for
# each WORLD given; prints one table (docs/benchmarks.md, "Worker groups").
#
#   scripts/group-bench.sh SPLITQ OUT [WORLD ...]      (default WORLD: 0 1; 0 = a lone worker)
#
# Environment (defaults in brackets):
#   CONFIG [configs/lm-pretrain.yaml]   SETS   extra "--set k=v" words for every process
#   CLIENTS [16]  STEPS [60] per client  MERGE [16] clients per merged batch  WINDOW_MS [2]
#   KILL [0]      1: for WORLD > 1, kill -9 the last member when client0 passes step STEPS/2;
#                 the others must finish the run with no update lost
#   TIMEOUT [20]  --group-timeout (also the limit of one collective)
#   CLIENT_SETS   extra "--set k=v" words for the clients only, after SETS (e.g. "--set device=cpu"
#                 to keep the clients off the workers' GPUs)
# Each row: aggregate samples/s (the sum over clients of batch / their mean step time over the
# second half of their logged steps: steady state, all clients running), the mean clients per
# update, server updates, the steps the group applied (worker0's count: with every client
# step applied once, CLIENTS x STEPS), the gradient sum's time per update (including the wait
# for the slowest member, from worker0's stop line), and the distinct weight digests among the
# workers' reports (1: the replicas agree; a killed member writes none). With
# WORLD >= 2 it also runs `splitq bench allreduce` at the server part's size on the same GPUs,
# for the bus bandwidth NCCL reaches there. Logs and every process's output: OUT/wWORLD/.
set -euo pipefail
SPLITQ=$(realpath "${1:?usage: group-bench.sh SPLITQ OUT [WORLD ...]}")
OUT=${2:?usage: group-bench.sh SPLITQ OUT [WORLD ...]}
shift 2
worlds=("$@")
((${#worlds[@]})) || worlds=(0 1)
CONFIG=${CONFIG:-configs/lm-pretrain.yaml}
CLIENTS=${CLIENTS:-16}
STEPS=${STEPS:-60}
MERGE=${MERGE:-16}
WINDOW_MS=${WINDOW_MS:-2}
KILL=${KILL:-0}
TIMEOUT=${TIMEOUT:-20}
read -r -a sets <<<"${SETS:-}"
read -r -a client_sets <<<"${CLIENT_SETS:-}"
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)
device=cpu
((gpus > 0)) && device=cuda
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_file() {  # wait_file FILE SECONDS
  for _ in $(seq $((${2} * 10))); do [[ -s $1 ]] && return 0; sleep 0.1; done
  echo "group-bench: $1 did not appear" >&2
  return 1
}
common=(--config "$CONFIG" --set "device=$device" --set eval_every=1000000 --set "steps=$STEPS"
  --set "server.merge.max_clients=$MERGE" --set "server.merge.window_ms=$WINDOW_MS" "${sets[@]}")
rows=()
for world in "${worlds[@]}"; do
  d=$OUT/w$world
  rm -rf "$d"
  mkdir -p "$d"
  if [[ $device == cuda && $world -gt $gpus ]]; then
    echo "group-bench: WORLD $world needs $world GPUs, this host has $gpus; skipped" >&2
    continue
  fi
  echo "== WORLD $world: $CLIENTS clients x $STEPS steps, $CONFIG on $device" >&2
  "$SPLITQ" coordinator --config "$CONFIG" --listen 127.0.0.1:0 --insecure \
    --ready-file "$d/coordinator.addr" >"$d/coordinator.log" 2>&1 &
  pids+=($!)
  wait_file "$d/coordinator.addr" 60
  coord=$(cat "$d/coordinator.addr")
  n=$((world > 0 ? world : 1))
  group=()
  ((world > 0)) && group=(--group-size "$world" --group-timeout "$TIMEOUT")
  wpids=()
  for ((i = 0; i < n; i++)); do
    CUDA_VISIBLE_DEVICES=$((gpus > 0 ? i % gpus : 0)) "$SPLITQ" worker "${common[@]}" \
      --coordinator "$coord" --listen 127.0.0.1:0 --insecure --name "worker$i" \
      --out "$d/worker$i" --ready-file "$d/worker$i.addr" "${group[@]}" >"$d/worker$i.log" 2>&1 &
    pids+=($!)
    wpids+=($!)
  done
  for ((i = 0; i < n; i++)); do wait_file "$d/worker$i.addr" 300; done
  cpids=()
  for ((c = 0; c < CLIENTS; c++)); do
    CUDA_VISIBLE_DEVICES=$((gpus > 0 ? c % n % gpus : 0)) "$SPLITQ" client "${common[@]}" \
      "${client_sets[@]}" --coordinator "$coord" --insecure --id "client$c" \
      --shard "$c/$CLIENTS" --out "$d/client$c" --reconnect-timeout 120 >"$d/client$c.log" 2>&1 &
    pids+=($!)
    cpids+=($!)
  done
  killed=-
  if [[ $KILL == 1 && $world -gt 1 ]]; then
    for _ in $(seq 6000); do
      grep -q "step $((STEPS / 2))/" "$d/client0.log" 2>/dev/null && break
      sleep 0.1
    done
    kill -9 "${wpids[$((n - 1))]}"
    wait "${wpids[$((n - 1))]}" 2>/dev/null || true
    killed=worker$((n - 1))
    echo "group-bench: killed $killed (SIGKILL)" >&2
  fi
  failed=0
  for p in "${cpids[@]}"; do wait "$p" || failed=$((failed + 1)); done
  for ((i = 0; i < n; i++)); do kill -TERM "${wpids[$i]}" 2>/dev/null || true; done
  for ((i = 0; i < n; i++)); do wait "${wpids[$i]}" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  pids=()
  batch=$(sed -n 's/^batch_size: *\([0-9]*\).*/\1/p' "$CONFIG")
  for s in "${sets[@]}"; do [[ $s == batch_size=* ]] && batch=${s#batch_size=}; done
  # Steady state: each client's mean step_ms over the second half of its logged steps.
  samples=$(for ((c = 0; c < CLIENTS; c++)); do
    sed -n 's/.*"step_ms": \([0-9.]*\).*/\1/p' "$d/client$c/metrics.jsonl" 2>/dev/null |
      awk -v b="$batch" '{ v[NR] = $1 } END { h = int(NR / 2) + 1; s = 0; k = 0;
        for (i = h; i <= NR; i++) { s += v[i]; k++ } if (k > 0) print b * 1000 / (s / k); }'
  done | awk '{ t += $1 } END { printf "%.0f", t }')
  reports=$(cat "$d"/worker*/worker.json 2>/dev/null | grep -c '"weights_sha256"' || true)
  digests=$(cat "$d"/worker*/worker.json 2>/dev/null | sed -n 's/.*"weights_sha256": "\(.*\)".*/\1/p' | sort -u | wc -l)
  updates=$(sed -n 's/.*"server_updates": \([0-9]*\).*/\1/p' "$d/worker0/worker.json")
  applied=$(sed -n 's/.*"group_steps_applied": \([0-9]*\).*/\1/p' "$d/worker0/worker.json")
  [[ $world == 0 ]] && applied=$(sed -n 's/^ *"steps_applied": \([0-9]*\).*/\1/p' "$d/worker0/worker.json")
  here=$(sed -n 's/.*"updates_here": \([0-9]*\).*/\1/p' "$d/worker0/worker.json")
  per=$(awk -v a="$applied" -v u="$here" 'BEGIN { printf "%.2f", (u > 0 ? a / u : 0) }')
  sum_ms=$(sed -n 's/.*group rounds with work \([0-9]*\) ms, of which the gradient sum \([0-9]*\) ms.*/\2/p' \
    "$d/worker0.log" | tail -n1)
  per_update=$(awk -v s="${sum_ms:-0}" -v u="$here" 'BEGIN { printf "%.2f", (u > 0 ? s / u : 0) }')
  rows+=("$(printf '%-6s %-6s %10s %8s %9s %9s %12s %8s %8s' "$world" "$device" "$samples" "$per" \
    "$updates" "$applied/$((CLIENTS * STEPS))" "$per_update" \
    "$([[ $digests == 1 ]] && echo "1 of $reports" || echo "$digests of $reports")" "$killed")")
  ((failed == 0)) || echo "group-bench: WORLD $world: $failed clients failed (logs in $d)" >&2
  if ((world >= 2)); then
    "$SPLITQ" bench allreduce --world "$world" --config "$CONFIG" "${sets[@]}" --mib 1,64 \
      >"$d/allreduce.txt" 2>&1 || true
    cat "$d/allreduce.txt" >&2
  fi
done
printf '%-6s %-6s %10s %8s %9s %9s %12s %8s %8s\n' world device samples/s cl/upd updates applied \
  "sum ms/upd" digests killed
printf '%s\n' "${rows[@]}"
