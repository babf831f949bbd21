#!/usr/bin/env bash
# Real `splitq` processes on loopback (OS-picked ports): the cluster's behaviour end to end.
#
#   cluster_test.sh SPLITQ CASE
#
# CASE:
#   metrics      a coordinator, a worker and a client with --metrics-listen, the client trains
#                60 steps (its own page scraped while it does):
#                the /metrics pages carry # HELP/# TYPE lines and the run's numbers, and
#                Debian's real `prometheus` scrapes them (its HTTP API returns the worker's 60
#                steps; both targets up). Skips without `prometheus` unless
#                SPLITQ_REQUIRE_PROMETHEUS=1 (CI sets it).
#   demo         `splitq demo` with 2 clients and a small config: exits 0, summary.json has
#                the keys of `splitq train`'s plus the workers' reports, steps summed over the
#                clients, TLS and tokens in use (a plaintext health probe fails).
#   equivalence  one client through coordinator + worker against `splitq train`, same config and
#                seed: on the CPU with one thread per process every logged loss is equal to
#                1e-6 relative (bit-identical in practice); with the default threads and device
#                (CUDA on a GPU host) within 2% (float reductions differ between processes).
#   equivalence-layouts  the same, exact (one thread, CPU), for a U-shaped model (AMAQ at both
#                boundaries, two round trips a step), for AQ-SGD (plain layout) and with
#                entropy-coded frames both ways (plain layout).
#   client-kill  a client killed with SIGKILL mid-run: the worker frees its session within two
#                heartbeat periods (2 s); the restarted client resumes from its last checkpoint
#                and finishes; its metrics have every logged step exactly once and the worker
#                applied exactly `steps` server updates (replayed steps are not applied twice).
#   worker-kill  the client's worker killed with SIGKILL: the coordinator marks it dead, the
#                client reconnects with backoff to the second worker and finishes.
#   coordinator-restart  the coordinator killed mid-run and restarted empty: the run finishes,
#                the worker and the client register again
#   partition    a silent partition (the proxy to the worker stops forwarding): keepalive finds
#                it, the client reconnects after it heals, every step is applied once
#   worker-restart  the only worker killed with SIGKILL and started again on its --out: it
#                resumes from its checkpoint (worker.pt), the client reconnects to it and
#                finishes, and the server updates add up: those saved, plus those after the
#                restart, plus the steps the log names as lost since the checkpoint = 200; the
#                client's log and summary.json (steps_lost) name the same lost steps.
#   merge        `splitq demo` with 4 clients and merged batches (server.merge.max_clients 4,
#                a 500 ms window): every step applied once, at least 2 clients per server update
#                on average, and the run learns (validation accuracy above 0.6).
#   group        `splitq demo --workers 2 --clients 4`: the two workers form one replica group
#                (Gloo on loopback) and end with the same weights digest and the same number of
#                server updates; every client step is applied once (240 over both).
#   group-kill   a group of 2 workers (Gloo) and 4 clients: rank 0 (which serves the group's
#                store) killed with SIGKILL mid-run; the survivor re-forms alone and the clients
#                move to it and replay; rank 0 restarted on its --out rejoins under a new
#                generation and takes the survivor's state (not its own older checkpoint). The
#                run finishes with one weights digest and equal update counts, and the survivor
#                saw every client step applied exactly once (4 x 150 steps: no update lost,
#                none applied twice). The coordinator rebalances: clients move from the
#                survivor to the member that came back (at least one; its log shows sessions).
#   idle         a worker with --session-idle-s 1 and a client stopped (SIGSTOP) for 3 s mid-run,
#                heartbeats at 10 s so the coordinator does not mark it dead: the worker ends the
#                client's idle session (DEADLINE_EXCEEDED, its log names the flag), the client
#                reconnects when it runs again and finishes, and every step is applied once.
#   refusals     a client with another config (digest) and a client without a token are refused
#                with a clear message; the worker keeps serving.
set -euo pipefail
SPLITQ=${1:?usage: cluster_test.sh SPLITQ CASE}
CASE=${2:?usage: cluster_test.sh SPLITQ CASE}
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do { wait "$p"; } 2>/dev/null || true; done
  if [[ ${KEEP:-0} == 1 ]]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT
fail() {
  echo "FAIL ($CASE): $*"
  for f in "$dir"/*.log; do [[ -f $f ]] && { echo "--- $f"; tail -n 20 "$f"; }; done
  exit 1
}

cat >"$dir/config.yaml" <<'EOF'
task: fmnist
steps: 60
batch_size: 32
log_every: 10
eval_every: 30
checkpoint_every: 20
optim: {warmup_steps: 5}
quant:
  activations: {mode: amaq, target: [{step: 0, bits: 8}, {step: 40, bits: 4}], calibration_steps: 10}
  gradients: {mode: uniform, target: 6}
EOF
config=$dir/config.yaml
# LAYOUT=u_shaped or aqsgd (or both, comma-separated) runs any case on that layout.
layout() {
  case ,${LAYOUT:-}, in *,u_shaped,*) printf 'model: {split_after: 1, u_shaped: true}\n' >>"$config" ;; esac
  case ,${LAYOUT:-}, in *,aqsgd,*) sed -i 's/mode: amaq, target: \[.*\], calibration_steps: 10/mode: aqsgd, target: 4/' "$config" ;; esac
}
layout

# wait_for FILE PATTERN [TENTHS]: until FILE has a line matching PATTERN.
wait_for() {
  for _ in $(seq "${3:-300}"); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  fail "no '$2' in $1"
}
address_in() { sed -n 's/.*listening on \([0-9.]*:[0-9]*\).*/\1/p' "$1" | head -n1; }

# start_cluster [WORKERS]: certificates, tokens, a coordinator and WORKERS workers (TLS).
start_cluster() {
  if [[ ! -d $dir/certs ]]; then
    "$SPLITQ" certs --out "$dir/certs" >/dev/null
    "$SPLITQ" tokens --out "$dir/tokens" --worker worker0 --worker worker1 client0 client1 client2 \
      client3 >/dev/null
  fi
  sec=(--tls-dir "$dir/certs")
  "$SPLITQ" coordinator --config "$config" --listen 127.0.0.1:0 "${sec[@]}" \
    --tokens "$dir/tokens/tokens" "${coord_extra[@]}" >"$dir/coordinator.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/coordinator.log" "listening on"
  coord=$(address_in "$dir/coordinator.log")
  worker_pids=()
  for w in $(seq 0 $((${1:-1} - 1))); do
    start_worker "$w" "$dir/worker$w.log"
  done
}
# start_worker W LOG: worker W of the cluster (its pid appended to worker_pids), with
# ${worker_extra[@]} as further arguments; returns once it is registered.
worker_extra=()
coord_extra=()
start_worker() {
  "$SPLITQ" worker --config "$config" ${DEVICE:+--set device=$DEVICE} \
    --coordinator "$coord" --listen 127.0.0.1:0 \
    --name "worker$1" "${sec[@]}" --tokens "$dir/tokens/tokens" \
    --token "$dir/tokens/worker$1.token" "${worker_extra[@]}" >"$2" 2>&1 &
  pids+=($!)
  worker_pids+=($!)
  wait_for "$2" "registered with the coordinator" 600
}
stop_cluster() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
client_args() {  # client_args ID OUT: the args of `splitq client` (in ${args[@]})
  args=(client --config "$config" ${DEVICE:+--set device=$DEVICE} --coordinator "$coord"
    --id "$1" "${sec[@]}"
    --token "$dir/tokens/$1.token" --out "$2" --reconnect-timeout 30)
}
client() {  # client ID OUT: runs it in the foreground
  client_args "$1" "$2"
  "$SPLITQ" "${args[@]}"
}
# start_long_run WORKERS: a 200-step (LONG_STEPS) run of client0 in the background (pid in
# $cpid), past step 50 when this returns.
start_long_run() {
  sed -i "s/^steps: 60\$/steps: ${LONG_STEPS:-200}/" "$config"
  start_cluster "$1"
  client_args client0 "$dir/run"
  "$SPLITQ" "${args[@]}" >"$dir/client.log" 2>&1 &
  cpid=$!
  pids+=($cpid)
  wait_for "$dir/client.log" 'step 50/' 600
}
# stop_worker_expecting_200_updates PID: stops worker0 and checks its count of server updates.
stop_worker_expecting_200_updates() {
  kill -TERM "$1"
  wait "$1" || true
  grep -q "stopped: [0-9]* steps served, 200 server updates" "$dir/worker0.log" ||
    fail "server updates: $(grep stopped "$dir/worker0.log")"
}
losses() { sed -n 's/.*"loss": \([0-9.e+-]*\).*/\1/p' "$1"; }
# compare_losses A B TOLERANCE: every logged loss of A within TOLERANCE (relative) of B's.
compare_losses() {
  paste <(losses "$1") <(losses "$2") | awk -v tol="$3" '
    { n++; d = $1 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > worst) worst = r;
      if (r > tol) bad++ }
    END { printf "%d logged losses, worst relative difference %.2e\n", n, worst;
          exit (n == 6 && bad == 0) ? 0 : 1 }'
}

case $CASE in
metrics)
  # Prometheus (Debian's `prometheus`, the real server) scrapes a worker and the coordinator.
  if ! command -v prometheus >/dev/null; then
    [[ ${SPLITQ_REQUIRE_PROMETHEUS:-0} == 1 ]] && fail "no prometheus binary (Debian: prometheus)"
    echo "SKIP: no prometheus binary (Debian package prometheus)"
    exit 0
  fi
  coord_extra=(--metrics-listen 127.0.0.1:0)
  worker_extra=(--metrics-listen 127.0.0.1:0)
  start_cluster 1
  metrics_in() { sed -n 's|.*metrics at http://\([0-9.]*:[0-9]*\)/metrics.*|\1|p' "$1" | head -n1; }
  wm=$(metrics_in "$dir/worker0.log")
  cm=$(metrics_in "$dir/coordinator.log")
  [[ -n $wm && -n $cm ]] || fail "no metrics address logged"
  # The client serves its own while it trains: scraped until it has a step, then it finishes.
  client_args client0 "$dir/run"
  "$SPLITQ" "${args[@]}" --metrics-listen 127.0.0.1:0 >"$dir/client.log" 2>&1 &
  cpid=$!
  pids+=($cpid)
  wait_for "$dir/client.log" 'metrics at http://'
  km=$(metrics_in "$dir/client.log")
  for _ in $(seq 300); do
    curl -sf "http://$km/metrics" >"$dir/client.metrics" 2>/dev/null || true
    grep -Eq '^splitq_client_steps_total [1-9]' "$dir/client.metrics" && break
    kill -0 "$cpid" 2>/dev/null || fail "the client ended before its /metrics showed a step"
    sleep 0.05
  done
  for want in '# TYPE splitq_client_steps_total counter' '# TYPE splitq_client_step_seconds histogram' \
    'splitq_client_step_seconds_bucket{le="+Inf"} ' 'splitq_client_steps 60' \
    '# HELP splitq_client_bytes_up_total '; do
    grep -qF "$want" "$dir/client.metrics" || fail "client /metrics lacks '$want'"
  done
  grep -Eq '^splitq_client_bytes_up_total [1-9][0-9]*$' "$dir/client.metrics" || fail "no bytes up"
  grep -Eq '^splitq_client_activation_bits [0-9.]+$' "$dir/client.metrics" || fail "no act bits"
  wait "$cpid" || fail "client exited with $?"
  curl -sf "http://$wm/metrics" >"$dir/worker.metrics" || fail "GET worker /metrics"
  curl -sf "http://$cm/metrics" >"$dir/coordinator.metrics" || fail "GET coordinator /metrics"
  for want in '# HELP splitq_worker_steps_total ' '# TYPE splitq_worker_steps_total counter' \
    'splitq_worker_steps_total{kind="train"} 60' 'splitq_worker_steps_applied_total 60' \
    'splitq_worker_step_seconds_count{kind="train"} 60' \
    '# TYPE splitq_worker_step_seconds histogram' \
    'splitq_worker_step_seconds_bucket{kind="train",le="+Inf"} 60' \
    'splitq_worker_step_seconds_bucket{kind="train",le="0.0025"} '; do
    grep -qF "$want" "$dir/worker.metrics" || fail "worker /metrics lacks '$want'"
  done
  grep -Eq '^splitq_worker_gradient_bits [0-9.]+$' "$dir/worker.metrics" || fail "no gradient bits"
  grep -qF 'splitq_coordinator_members{role="worker"} 1' "$dir/coordinator.metrics" ||
    fail "coordinator /metrics: $(grep members "$dir/coordinator.metrics")"
  grep -qF 'splitq_coordinator_calls_total{method="Register",code="OK"}' \
    "$dir/coordinator.metrics" || fail "no Register calls counted"
  [[ $(curl -s -o /dev/null -w '%{http_code}' "http://$wm/nothing") == 404 ]] || fail "not a 404"
  printf '%s\n' 'global: {scrape_interval: 1s, scrape_timeout: 1s}' 'scrape_configs:' \
    '  - job_name: splitq' "    static_configs: [{targets: ['$wm', '$cm']}]" \
    >"$dir/prometheus.yml"
  prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/prometheus" \
    --web.listen-address=127.0.0.1:0 >"$dir/prometheus.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/prometheus.log" 'msg="Listening on"' 300
  papi=$(sed -n 's/.*msg="Listening on" address=\([0-9.]*:[0-9]*\).*/\1/p' "$dir/prometheus.log")
  query() { curl -sf --get "http://$papi/api/v1/query" --data-urlencode "query=$1"; }
  # Each target is scraped once a second, at its own offset: wait until both have been.
  for _ in $(seq 150); do
    got=$(query 'splitq_worker_steps_total{kind="train"}' || true)
    workers=$(query 'splitq_coordinator_members{role="worker"}' || true)
    up=$(query 'sum(up)' || true)
    [[ $got == *'"value":['*',"60"]'* && $workers == *',"1"]'* && $up == *',"2"]'* ]] && break
    sleep 0.2
  done
  [[ $got == *'"value":['*',"60"]'* ]] || fail "Prometheus did not get the worker's steps: $got"
  [[ $workers == *',"1"]'* ]] || fail "Prometheus did not get the coordinator's members: $workers"
  [[ $up == *',"2"]'* ]] || fail "both targets up? $up"
  echo "metrics: ok (client $km: $(grep '^splitq_client_steps_total' "$dir/client.metrics");"\
    "Prometheus at $papi scraped worker $wm and coordinator $cm: $got)"
  ;;
demo)
  "$SPLITQ" demo --config "$config" --clients 2 --out "$dir/demo" >"$dir/demo.log" 2>&1 ||
    fail "demo exited with $?"
  [[ -f $dir/demo/summary.json ]] || fail "no summary.json"
  "$SPLITQ" train --config "$config" --set steps=10 --out "$dir/train" >/dev/null 2>&1
  keys() { sed -n 's/^ *"\([a-z_0-9]*\)":.*/\1/p' "$1" | sort | tr '\n' ' '; }
  # A cluster run adds its workers and the steps they lost (none here).
  want=$( (keys "$dir/train/summary.json" | tr ' ' '\n'
    printf '%s\n' mean_clients_per_update workers steps_lost lost_steps) |
    sed '/^$/d' | sort | tr '\n' ' ')
  [[ $(keys "$dir/demo/summary.json") == "$want" ]] ||
    fail "keys differ: $(keys "$dir/demo/summary.json") vs $want"
  grep -q '"steps_lost": 0,' "$dir/demo/client0/summary.json" ||
    fail "client0 lost steps: $(grep lost "$dir/demo/client0/summary.json")"
  grep -q '"steps": 120,' "$dir/demo/summary.json" || fail "steps not summed over 2 clients"
  # The worker's report: one step per update (no merging in this config), and its weights.
  grep -Eq '\{"name": "worker0", "rank": 0, "server_updates": 120, "steps_applied": 120, "weights_sha256": "[0-9a-f]{64}"\}' \
    "$dir/demo/summary.json" || fail "workers: $(grep -A2 '"workers"' "$dir/demo/summary.json")"
  grep -q '"mean_clients_per_update": 1.000000' "$dir/demo/summary.json" ||
    fail "$(grep mean_clients "$dir/demo/summary.json")"
  grep -q "train session .* of client1 ended: finished" "$dir/demo/logs/worker.log" ||
    fail "the worker did not see client1 finish"
  [[ -f $dir/demo/certs/ca.crt && -f $dir/demo/tokens/client1.token ]] || fail "no certs/tokens"
  echo "demo: ok ($(grep -o '"val_loss": [0-9.]*' "$dir/demo/summary.json"))"
  ;;
group)
  printf 'server: {group: {backend: gloo}}\n' >>"$config"
  "$SPLITQ" demo --config "$config" --clients 4 --workers 2 --out "$dir/demo" >"$dir/demo.log" 2>&1 ||
    fail "demo exited with $?"
  grep -q "group of 2 formed (gloo)" "$dir/demo/logs/worker1.log" || fail "no group formed"
  digests=$(grep -o '"weights_sha256": "[0-9a-f]*"' "$dir/demo/summary.json" | sort -u | wc -l)
  updates=$(grep -o '"server_updates": [0-9]*' "$dir/demo/summary.json" | sort -u | wc -l)
  applied=$(grep -o '"steps_applied": [0-9]*' "$dir/demo/summary.json" | awk '{ n += $2 } END { print n }')
  ((digests == 1 && updates == 1 && applied == 240)) ||
    fail "digests $digests, update counts $updates, steps applied $applied: $(grep -A3 workers "$dir/demo/summary.json")"
  grep -q "identical replicas" "$dir/demo.log" || fail "the demo did not report identical replicas"
  echo "group: ok ($(grep -o '"server_updates": [0-9]*' "$dir/demo/summary.json" | head -1), $applied steps applied)"
  ;;
group-kill)
  sed -i 's/^steps: 60$/steps: 150/; s/^eval_every: 30$/eval_every: 150/' "$config"
  # Gloo also on a GPU host (NCCL needs a GPU per member and finds a dead one only by timeout).
  printf 'server: {group: {backend: gloo}}\n' >>"$config"
  start_cluster 0
  for w in 0 1; do
    worker_extra=(--group-size 2 --group-timeout 20 --out "$dir/w$w" --checkpoint-every 10)
    start_worker "$w" "$dir/worker$w.log"
  done
  wait_for "$dir/worker1.log" "group of 2 formed" 300
  cpids=()
  for c in 0 1 2 3; do
    client_args "client$c" "$dir/run$c"
    "$SPLITQ" "${args[@]}" >"$dir/client$c.log" 2>&1 &
    cpids+=($!)
    pids+=($!)
  done
  wait_for "$dir/client0.log" 'step 40/' 600
  victim=${worker_pids[0]}
  kill -9 "$victim"
  wait "$victim" 2>/dev/null || true
  wait_for "$dir/worker1.log" "group of 1 formed" 300
  before=$(sed -n 's/.*group of 1 formed.*, \([0-9]*\) server updates.*/\1/p' "$dir/worker1.log" | tail -n1)
  worker_extra=(--group-size 2 --group-timeout 20 --out "$dir/w0" --checkpoint-every 10)
  start_worker 0 "$dir/worker0b.log"
  wait_for "$dir/worker0b.log" "group of 2 formed" 300
  rejoined=$(grep "group of 2 formed" "$dir/worker0b.log" | tail -n1)
  [[ $rejoined == *"(the state of rank 0)"* ]] || fail "the restarted member: $rejoined"
  took=$(sed -n 's/.*, \([0-9]*\) server updates (the state.*/\1/p' <<<"$rejoined")
  ((took >= before)) || fail "the restarted member took $took updates, the survivor had $before"
  for p in "${cpids[@]}"; do wait "$p" || fail "a client failed"; done
  for c in 0 1 2 3; do
    grep -q '"steps": 150,' "$dir/run$c/summary.json" || fail "client$c did not finish"
  done
  moved=$(grep -l "moved from worker worker1 to worker0 at .* (the coordinator rebalanced" \
    "$dir"/client?.log | wc -l)
  ((moved >= 1)) || fail "no client moved to the member that came back"
  grep -q "train session .* opened" "$dir/worker0b.log" || fail "worker0b served no session"
  ! grep "were not applied on this worker" "$dir/worker0b.log" || fail "a move lost steps"
  for c in 0 1 2 3; do
    grep -q '"steps_lost": 0,' "$dir/run$c/summary.json" ||
      fail "client$c: $(grep -A1 steps_lost "$dir/run$c/summary.json")"
  done
  stop_cluster
  field() { sed -n "s/.*\"$2\": \"*\([0-9a-f]*\)\"*,*$/\1/p" "$dir/w$1/worker.json"; }
  [[ $(field 0 weights_sha256) == "$(field 1 weights_sha256)" && -n $(field 1 weights_sha256) ]] ||
    fail "digests differ: $(cat "$dir"/w*/worker.json)"
  [[ $(field 0 server_updates) == "$(field 1 server_updates)" ]] ||
    fail "update counts differ: $(cat "$dir"/w*/worker.json)"
  [[ $(field 1 group_steps_applied) == 600 && $(field 1 clients_next_sum) == 600 ]] ||
    fail "the survivor: $(cat "$dir/w1/worker.json")"
  echo "group-kill: ok (the survivor had $before updates when rank 0 came back, which took $took;" \
    "$moved clients moved to it; $(field 1 server_updates) updates, 600 steps applied once)"
  ;;
merge)
  printf 'server: {merge: {max_clients: 4, window_ms: 500}}\n' >>"$config"
  "$SPLITQ" demo --config "$config" --clients 4 --out "$dir/demo" >"$dir/demo.log" 2>&1 ||
    fail "demo exited with $?"
  grep -q '"steps": 240,' "$dir/demo/summary.json" || fail "steps not summed over 4 clients"
  grep -Eq '"steps_applied": 240,' "$dir/demo/summary.json" ||
    fail "steps applied: $(grep -o '"steps_applied": [0-9]*' "$dir/demo/summary.json")"
  per=$(sed -n 's/.*"mean_clients_per_update": \([0-9.]*\).*/\1/p' "$dir/demo/summary.json")
  acc=$(sed -n 's/.*"val_accuracy": \([0-9.]*\).*/\1/p' "$dir/demo/summary.json")
  awk -v p="$per" -v a="$acc" 'BEGIN { exit (p >= 2 && a > 0.6) ? 0 : 1 }' ||
    fail "clients per update $per, val accuracy $acc"
  grep -q "merging up to 4 clients" "$dir/demo/logs/worker.log" || fail "the worker did not merge"
  echo "merge: ok ($per clients per update, val accuracy $acc)"
  ;;
equivalence)
  # Exact: one CPU thread per process (on a GPU host the CUDA kernels' reductions are not
  # deterministic across processes, so this case runs on the CPU there too).
  export OMP_NUM_THREADS=1 DEVICE=cpu
  start_cluster 1
  client client0 "$dir/net1" >"$dir/client.log" 2>&1 || fail "client failed"
  "$SPLITQ" train --config "$config" --set device=cpu --out "$dir/train1" >/dev/null 2>&1
  compare_losses "$dir/net1/metrics.jsonl" "$dir/train1/metrics.jsonl" 1e-6 ||
    fail "one thread: the curves differ"
  stop_cluster  # a fresh server part for the second run
  unset OMP_NUM_THREADS DEVICE
  start_cluster 1
  client client0 "$dir/net2" >"$dir/client2.log" 2>&1 || fail "client failed"
  "$SPLITQ" train --config "$config" --out "$dir/train2" >/dev/null 2>&1
  compare_losses "$dir/net2/metrics.jsonl" "$dir/train2/metrics.jsonl" 0.02 ||
    fail "default threads: the curves differ by more than 2%"
  echo "equivalence: ok"
  ;;
equivalence-layouts)
  export OMP_NUM_THREADS=1 DEVICE=cpu
  base=$(cat "$config")
  for layout in u_shaped aqsgd coded; do
    if [[ $layout == u_shaped ]]; then
      printf '%s\nmodel: {split_after: 1, u_shaped: true}\n' "$base" >"$config"
    elif [[ $layout == coded ]]; then
      # Entropy-coded frames both ways (lossless: the curves must still be the same).
      printf '%s\n' "$base" | sed 's/calibration_steps: 10}/calibration_steps: 10, coding: rans}/; s/mode: uniform, target: 6}/mode: uniform, target: 6, coding: rans}/' >"$config"
      [[ $(grep -c "coding: rans" "$config") == 2 ]] || fail "could not make the coded config"
    else
      printf '%s\n' "$base" | sed 's/mode: amaq, target: \[.*\], calibration_steps: 10/mode: aqsgd, target: 4/' >"$config"
      grep -q "mode: aqsgd" "$config" || fail "could not make the aqsgd config"
    fi
    start_cluster 1
    client client0 "$dir/net-$layout" >"$dir/client-$layout.log" 2>&1 || fail "$layout: client failed"
    stop_cluster
    "$SPLITQ" train --config "$config" ${DEVICE:+--set device=$DEVICE} --out "$dir/train-$layout" >/dev/null 2>&1 ||
      fail "$layout: train failed"
    echo -n "$layout: "
    compare_losses "$dir/net-$layout/metrics.jsonl" "$dir/train-$layout/metrics.jsonl" 1e-6 ||
      fail "$layout: the curves differ"
    cmp <(sed -n 's/.*"val_loss": \([0-9.e+-]*\).*/\1/p' "$dir/net-$layout/validation.jsonl") \
      <(sed -n 's/.*"val_loss": \([0-9.e+-]*\).*/\1/p' "$dir/train-$layout/validation.jsonl") ||
      fail "$layout: the validation losses differ"
  done
  echo "equivalence-layouts: ok"
  ;;
client-kill)
  start_long_run 1
  kill -9 "$cpid"
  killed=$(date +%s%N)
  wait "$cpid" 2>/dev/null || true
  wait_for "$dir/worker0.log" "train session .* of client0 ended" 100
  freed_ms=$((($(date +%s%N) - killed) / 1000000))
  ((freed_ms <= 2000)) || fail "the session was freed after $freed_ms ms (> 2 heartbeat periods)"
  grep "train session .* of client0 ended" "$dir/worker0.log" | tail -n1
  client client0 "$dir/run" >"$dir/client2.log" 2>&1 || fail "restart failed"
  grep -q "resumed .* at step" "$dir/client2.log" || fail "the client did not resume"
  resumed=$(sed -n 's/.*resumed .* at step \([0-9]*\).*/\1/p' "$dir/client2.log")
  steps=$(sed -n 's/.*"step": \([0-9]*\),.*/\1/p' "$dir/run/metrics.jsonl" | tr '\n' ' ')
  [[ $steps == "$(seq -s ' ' 10 10 200) " ]] || fail "logged steps: $steps"
  stop_worker_expecting_200_updates "${worker_pids[0]}"
  echo "client-kill: ok (session freed in $freed_ms ms; resumed at step $resumed;" \
    "$(sed -n 's/.*stopped: //p' "$dir/worker0.log"))"
  ;;
worker-kill)
  start_long_run 2
  first=$(sed -n 's/.*shard 0\/1, worker \(worker[0-9]\).*/\1/p' "$dir/client.log")
  victim=${first#worker}
  kill -9 "${worker_pids[$victim]}"
  wait "$cpid" || fail "the client did not survive its worker's death"
  grep -q "reconnected to worker" "$dir/client.log" || fail "no reconnect"
  grep -q '"steps": 200,' "$dir/run/summary.json" || fail "the run did not finish"
  echo "worker-kill: ok (from $first to $(sed -n 's/.*reconnected to worker \(worker[0-9]\).*/\1/p' \
    "$dir/client.log" | tail -n1))"
  ;;
coordinator-restart)
  # The coordinator dies mid-run and comes back on its address with no state: the run goes on
  # (clients train against their worker directly), and the worker and the client register
  # again on their next heartbeat. 600 steps, so that the client (which exits at the end) is
  # still running a few seconds after the restart even on a GPU host.
  LONG_STEPS=600
  sed -i 's/^eval_every: 30$/eval_every: 300/' "$config"
  start_long_run 1
  coord_pid=${pids[0]}
  kill -9 "$coord_pid"
  wait "$coord_pid" 2>/dev/null || true
  sleep 1
  "$SPLITQ" coordinator --config "$config" --listen "$coord" "${sec[@]}" \
    --tokens "$dir/tokens/tokens" >"$dir/coordinator2.log" 2>&1 &
  pids+=($!)
  wait_for "$dir/coordinator2.log" "listening on"
  wait "$cpid" || fail "the client did not survive the coordinator's restart"
  grep -q '"steps": 600,' "$dir/run/summary.json" || fail "the run did not finish"
  # Its next heartbeat after gRPC has reconnected (reconnect backoff at most 5 s).
  wait_for "$dir/worker0.log" "worker0 registered again with the coordinator" 300
  grep -q "client client0: registered again with the coordinator" "$dir/client.log" ||
    fail "the client did not register again"
  echo "coordinator-restart: ok"
  ;;
idle)
  # No validation pass mid-run: its ~1 s here is a pause of the Train stream too (the client
  # reconnects after each; harmless, but this case is about the stopped client).
  sed -i 's/^eval_every: 30$/eval_every: 1000/' "$config"
  coord_extra=(--heartbeat-ms 10000)
  worker_extra=(--session-idle-s 1)
  start_long_run 1
  kill -STOP "$cpid"
  sleep 3
  kill -CONT "$cpid"
  wait "$cpid" || fail "the client did not survive its pause"
  grep -q "DEADLINE_EXCEEDED: no message from the client for 1 s" "$dir/worker0.log" ||
    fail "the worker did not end the idle session"
  grep -q "reconnected to worker" "$dir/client.log" || fail "no reconnect"
  grep -q '"steps": 200,' "$dir/run/summary.json" || fail "the run did not finish"
  stop_worker_expecting_200_updates "${worker_pids[0]}"
  echo "PASS: idle session ended by the worker ($(grep -c 'DEADLINE_EXCEEDED' "$dir/worker0.log") time(s)), the client reconnected and finished, 200 updates"
  ;;
partition)
  # A silent partition: the TCP proxy between the client and its worker stops forwarding
  # (SIGSTOP) without closing anything. Keepalive (pings every 10 s, dead 10 s later) must find
  # it; after the partition heals the client reconnects, replays, and every step is applied once.
  # (The client's stream fails once the partition is found; the test waits for that.)
  sed -i 's/^steps: 60/steps: 200/' "$config"
  start_cluster 0
  # Both ports picked by the OS: the throttle listens first and learns the worker's address on
  # its stdin once the worker (advertising the throttle's port) listens.
  mkfifo "$dir/throttle.to"
  "$SPLITQ" throttle --listen 127.0.0.1:0 --to - --mbit 1000 <"$dir/throttle.to" \
    >"$dir/throttle.log" 2>&1 &
  throttle=$!
  pids+=($throttle)
  exec 3>"$dir/throttle.to"
  wait_for "$dir/throttle.log" "listening on"
  "$SPLITQ" worker --config "$config" --coordinator "$coord" --listen 127.0.0.1:0 \
    --advertise-port "$(sed -n 's/.*listening on [0-9.]*:\([0-9]*\).*/\1/p' "$dir/throttle.log")" \
    --name worker0 "${sec[@]}" --tokens "$dir/tokens/tokens" \
    --token "$dir/tokens/worker0.token" >"$dir/worker0.log" 2>&1 3>&- &
  worker=$!
  pids+=($worker)
  wait_for "$dir/worker0.log" "registered with the coordinator"
  sed -n 's/.*bound to \([0-9.]*:[0-9]*\).*/\1/p' "$dir/worker0.log" >&3
  exec 3>&-
  wait_for "$dir/throttle.log" "forwarding to"
  client_args client0 "$dir/run"
  "$SPLITQ" "${args[@]}" >"$dir/client.log" 2>&1 &
  cpid=$!
  pids+=($cpid)
  wait_for "$dir/client.log" 'step 50/' 600
  kill -STOP "$throttle"
  cut=$(date +%s%N)
  # Usually "keepalive watchdog timeout"; when the partition catches a call that had not left
  # the client yet (a fast GPU client), the channel's reconnect through the stopped proxy fails
  # first ("Handshake read failed"). Either way the stream fails and the client reconnects.
  wait_for "$dir/client.log" "the worker stream failed" 450
  found_s=$((($(date +%s%N) - cut) / 1000000000))
  cause=$(sed -n 's/.*the worker stream failed (\(.*\)); reconnecting.*/\1/p' "$dir/client.log" |
    head -n1)
  sleep 2
  kill -CONT "$throttle"
  wait "$cpid" || fail "the client did not survive the partition"
  grep -q "reconnected to worker" "$dir/client.log" || fail "no reconnect"
  grep -q '"steps": 200,' "$dir/run/summary.json" || fail "the run did not finish"
  stop_worker_expecting_200_updates "$worker"
  echo "partition: ok (found after $found_s s: $cause;" \
    "$(sed -n 's/.*stopped: //p' "$dir/worker0.log"))"
  ;;
worker-restart)
  worker_extra=(--out "$dir/w0" --checkpoint-every 20)
  start_long_run 1
  kill -9 "${worker_pids[0]}"
  wait "${worker_pids[0]}" 2>/dev/null || true
  ls "$dir/w0/worker.pt" >/dev/null || fail "no worker checkpoint"
  start_worker 0 "$dir/worker0b.log"
  grep -q "resumed from .*worker.pt: [0-9]* server updates, progress of 1 clients" \
    "$dir/worker0b.log" || fail "the worker did not resume"
  saved=$(sed -n 's/.*worker.pt: \([0-9]*\) server updates.*/\1/p' "$dir/worker0b.log")
  ((saved >= 20)) || fail "resumed at $saved server updates"
  wait "$cpid" || fail "the client did not survive its worker's restart"
  grep -q '"steps": 200,' "$dir/run/summary.json" || fail "the run did not finish"
  # Steps the checkpoint missed: "its steps A..B were not applied on this worker".
  lost=$(sed -n 's/.*its steps \([0-9]*\)\.\.\([0-9]*\) were not applied.*/\1 \2/p' "$dir/worker0b.log" |
    awk '{ n += $2 - $1 + 1 } END { print n + 0 }')
  kill -TERM "${worker_pids[1]}"
  wait "${worker_pids[1]}" || true
  after=$(sed -n 's/.*stopped: [0-9]* steps served, \([0-9]*\) server updates.*/\1/p' \
    "$dir/worker0b.log")
  ((after + lost == 200)) || fail "server updates: $after at the end ($saved resumed) + $lost lost != 200"
  # The client learns it too, from the worker's welcome: the same steps, in its own log.
  told=$(sed -n 's/.*has not applied this client.s steps \([0-9]*\)\.\.\([0-9]*\):.*/\1 \2/p' \
    "$dir/client.log" | awk '{ n += $2 - $1 + 1 } END { print n + 0 }')
  ((told == lost)) || fail "the client was told of $told lost steps, the worker names $lost"
  grep -q "\"steps_lost\": $lost," "$dir/run/summary.json" ||
    fail "summary.json does not count the $lost lost steps: $(grep lost "$dir/run/summary.json")"
  grep -q "saved .*worker.pt at $after server updates" "$dir/worker0b.log" ||
    fail "no final checkpoint"
  # A worker with another config refuses the checkpoint, names the key, and leaves it intact.
  sum=$(md5sum <"$dir/w0/worker.pt")
  sed 's/target: 6}/target: 8}/; s/mode: amaq/mode: uniform/' "$config" >"$dir/other.yaml"
  code=0
  "$SPLITQ" worker --config "$dir/other.yaml" --coordinator "$coord" --listen 127.0.0.1:0 \
    --name worker0 "${sec[@]}" --tokens "$dir/tokens/tokens" \
    --token "$dir/tokens/worker0.token" --out "$dir/w0" >"$dir/other.log" 2>&1 || code=$?
  ((code == 2)) || fail "another config's worker exited with $code"
  grep -q "quant.activations.mode" "$dir/other.log" || fail "$(cat "$dir/other.log")"
  [[ $(md5sum <"$dir/w0/worker.pt") == "$sum" ]] || fail "the checkpoint was changed"
  echo "worker-restart: ok (resumed at $saved server updates; $lost steps lost since the" \
    "checkpoint; $after at the end)"
  ;;
refusals)
  start_cluster 1
  [[ $("$SPLITQ" health "$(address_in "$dir/worker0.log")" "${sec[@]}" \
    --service splitq.v1.Worker) == SERVING ]] || fail "the worker's health service"
  other=$dir/other.yaml
  sed 's/steps: 60/steps: 61/' "$config" >"$other"
  if "$SPLITQ" client --config "$other" --coordinator "$coord" --id client0 "${sec[@]}" \
    --token "$dir/tokens/client0.token" --out "$dir/other" --reconnect-timeout 1 \
    >"$dir/other.log" 2>&1; then
    fail "a client with another config was served"
  fi
  grep -q "run config (digest .*) is not the worker" "$dir/other.log" || fail "$(tail -n 3 "$dir/other.log")"
  if "$SPLITQ" client --config "$config" --coordinator "$coord" --id client1 "${sec[@]}" \
    --out "$dir/notoken" --connect-timeout 2 >"$dir/notoken.log" 2>&1; then
    fail "a client without a token was served"
  fi
  grep -q "UNAUTHENTICATED" "$dir/notoken.log" || fail "$(tail -n 3 "$dir/notoken.log")"
  client client1 "$dir/good" >"$dir/good.log" 2>&1 || fail "a good client failed"
  # Listening addresses gRPC would bend (99999 -> 34463, no port -> 443, a unix socket).
  for listen in 127.0.0.1:99999 127.0.0.1 unix:"$dir/sock"; do
    if timeout 20 "$SPLITQ" coordinator --listen "$listen" --insecure --config "$config" \
      >"$dir/listen.log" 2>&1; then
      fail "a coordinator listened on $listen"
    fi
    grep -q "expected HOST:PORT" "$dir/listen.log" || fail "$listen: $(tail -n 2 "$dir/listen.log")"
  done
  echo "refusals: ok"
  ;;
*)
  echo "unknown case $CASE"
  exit 2
  ;;
esac
