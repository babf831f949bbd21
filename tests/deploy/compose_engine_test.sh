#!/usr/bin/env bash
# compose_engine_test.sh: docker-compose.yml run end to end with a real Docker engine (Debian's
# dockerd 20.10 and docker-compose v1.29), as a user would, from the repository root:
#
#   bash tests/deploy/compose_engine_test.sh
#
#   1. scripts/docker-engine.sh (packages, dockerd, the debian:12 base image);
#   2. `docker-compose build`; the image must be at most SPLITQ_IMAGE_MAX_BYTES (1.6 GB);
#   3. `docker-compose up -d`; while the clients train, a worker's process is killed with
#      SIGKILL (from the host, as a crash would); its restart policy must bring it back, it
#      must resume from its checkpoint ("resumed from") and rejoin its group (a second "group
#      of 2 formed");
#   4. `docker wait` on both clients: each must exit 0 and leave a summary.json in the runs
#      volume with a validation accuracy of at least SPLITQ_E2E_MIN_ACC (0.80; the config
#      reaches ~0.87) and no step lost (worker1 survived: the group loses no applied update);
#   5. inside a client container: its secrets folders hold exactly ca.crt and its own token, and
#      no ca.key, server.key or other client's token is anywhere in its file system;
#   6. `docker-compose down -v` (also when a step fails; SPLITQ_E2E_KEEP=1 keeps everything).
# Prints one line per check and a table of timings; exits non-zero on the first failure, with
# the services' logs. Needs root (or sudo) and the Debian archive; about 10 minutes when the
# image's package layers are cached, ~20 when not. .ci/run runs it as its last stage.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PROJECT=${SPLITQ_E2E_PROJECT:-splitqe2e}
MAX_BYTES=${SPLITQ_IMAGE_MAX_BYTES:-1600000000}
MIN_ACC=${SPLITQ_E2E_MIN_ACC:-0.80}
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo -n)
# Builds go through the engine's API (the legacy builder), not a docker CLI that compose 1.29
# would otherwise call and that may want BuildKit/buildx.
dc() { "${SUDO[@]}" env COMPOSE_DOCKER_CLI_BUILD=0 DOCKER_BUILDKIT=0 docker-compose -p "$PROJECT" "$@"; }
dk() { "${SUDO[@]}" docker "$@"; }

T0=$SECONDS
LOGS=$(mktemp -d /tmp/splitq-compose-engine.XXXXXX)
declare -a TIMES=()
stage() { TIMES+=("$(printf '%-34s %5d s' "$1" $((SECONDS - $2)))"); }
ok() { echo "compose-engine: ok: $*"; }
fail() {
  echo "compose-engine: FAILED: $*" >&2
  dc ps >&2 || true
  dc logs --no-color --tail 40 >&2 || true
  exit 1
}
cleanup() {
  local rc=$?
  if [[ ${SPLITQ_E2E_KEEP:-0} == 1 ]]; then
    echo "compose-engine: kept project $PROJECT (SPLITQ_E2E_KEEP=1): docker-compose -p $PROJECT down -v"
  else
    dc down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  rm -rf "$LOGS"
  printf '%s\n' "${TIMES[@]}"
  echo "compose-engine: $([[ $rc == 0 ]] && echo passed || echo failed) in $((SECONDS - T0)) s"
}
trap cleanup EXIT

t=$SECONDS
bash scripts/docker-engine.sh || fail "the engine could not be made ready (scripts/docker-engine.sh)"
stage "engine ready" $t
dc down -v --remove-orphans >/dev/null 2>&1 || true  # a run left by an earlier failure

t=$SECONDS
dc build > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log" >&2; fail "docker-compose build"; }
stage "docker-compose build" $t
size=$(dk image inspect splitq:latest --format '{{.Size}}')
[[ $size -le $MAX_BYTES ]] || fail "image splitq:latest is $size bytes, above $MAX_BYTES"
ok "image splitq:latest: $(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }') (limit $(awk -v s="$MAX_BYTES" 'BEGIN { printf "%.2f GB", s / 1e9 }'))"

t=$SECONDS
dc up -d > "$LOGS/up.log" 2>&1 || { cat "$LOGS/up.log" >&2; fail "docker-compose up -d"; }
stage "up -d (until the clients start)" $t

cid() { dc ps -q "$1"; }
in_runs() {  # COMMAND...: runs in a throwaway container that mounts the runs volume
  dk run --rm -v "${PROJECT}_runs:/runs:ro" splitq:latest "$@"
}

# 3. Kill worker0's process once it has written a checkpoint and the clients have trained a
# while (client0 has logged 600 steps: 60 lines of metrics.jsonl).
t=$SECONDS
deadline=$((SECONDS + 300))
until in_runs sh -c 'test -f /runs/worker0/worker.pt && test "$(wc -l < /runs/client0/metrics.jsonl)" -ge 60' 2>/dev/null; do
  [[ $SECONDS -lt $deadline ]] || fail "no worker0 checkpoint and 600 client0 steps within 300 s"
  sleep 2
done
w0=$(cid worker0)
pid=$(dk inspect --format '{{.State.Pid}}' "$w0")
restarts0=$(dk inspect --format '{{.RestartCount}}' "$w0")
[[ $pid -gt 0 ]] || fail "worker0 has no process"
"${SUDO[@]}" kill -9 "$pid"
ok "worker0 (host pid $pid) killed with SIGKILL after $((SECONDS - t)) s of training"
# Restarted: a higher restart count, running (not merely scheduled to restart), a new process.
deadline=$((SECONDS + 120))
until read -r count running restarting newpid < <(dk inspect --format \
        '{{.RestartCount}} {{.State.Running}} {{.State.Restarting}} {{.State.Pid}}' "$w0") &&
      [[ $count -gt $restarts0 && $running == true && $restarting == false && $newpid -gt 0 &&
         $newpid != "$pid" ]]; do
  [[ $SECONDS -lt $deadline ]] || fail "worker0 was not restarted within 120 s"
  sleep 1
done
ok "worker0 restarted by its restart policy (host pid $newpid)"
# The logs are read into a variable: `docker logs | grep -q` fails under pipefail when grep
# stops reading early.
deadline=$((SECONDS + 120))
while :; do
  logs=$(dk logs "$w0" 2>&1 || true)
  resumed=$(grep -c "resumed from" <<<"$logs" || true)
  formed=$(grep -c "group of 2 formed" <<<"$logs" || true)
  [[ $resumed -ge 1 && $formed -ge 2 ]] && break
  [[ $SECONDS -lt $deadline ]] || fail "worker0 did not resume from its checkpoint and rejoin its group within 120 s"
  sleep 1
done
ok "worker0: $(grep -m1 -o 'worker .* resumed from .*' <<<"$logs")"
ok "worker0: $(grep -o 'group of 2 formed.*' <<<"$logs" | tail -n1)"

# 4. The clients finish.
for c in client0 client1; do
  rc=$(timeout 900 "${SUDO[@]}" docker wait "$(cid $c)") || fail "$c did not exit within 900 s"
  [[ $rc == 0 ]] || fail "$c exited with $rc"
done
stage "training (up to both clients' exit)" $t
for c in client0 client1; do
  summary=$(in_runs cat "/runs/$c/summary.json") || fail "$c left no summary.json"
  acc=$(grep -o '"val_accuracy"[^,}]*' <<<"$summary" | head -n1 | sed 's/.*: *//')
  steps=$(grep -o '"steps"[^,}]*' <<<"$summary" | head -n1 | sed 's/.*: *//')
  lost=$(grep -o '"steps_lost"[^,}]*' <<<"$summary" | head -n1 | sed 's/.*: *//')
  [[ $acc =~ ^[0-9]+(\.[0-9]+)?$ && $steps =~ ^[0-9]+$ && $lost =~ ^[0-9]+$ ]] ||
    fail "$c's summary.json lacks a numeric val_accuracy, steps or steps_lost: $summary"
  awk -v a="$acc" -v m="$MIN_ACC" 'BEGIN { exit !(a >= m) }' || fail "$c: val accuracy $acc < $MIN_ACC"
  [[ $lost == 0 ]] || fail "$c: $lost steps lost although worker1 survived (a group of 2 loses no applied update)"
  ok "$c exited 0: $steps steps, val accuracy $acc, steps lost $lost"
done

# 5. What a client container can read.
t=$SECONDS
seen=$(dc run --rm --no-deps -T client0 sh -c \
  'ls -A /secrets/certs; echo --; ls -A /secrets/tokens; echo --
   find / \( -path /proc -o -path /sys \) -prune -o -type f \
     \( -name ca.key -o -name server.key -o -name client.key -o -name "*.token" -o -name tokens \) -print' 2>"$LOGS/run.log") \
  || fail "could not look inside a client0 container: $(cat "$LOGS/run.log")"
want=$'ca.crt\n--\nclient0.token\n--\n/secrets/tokens/client0.token'
[[ $seen == "$want" ]] || fail "client0's container sees more than ca.crt and its own token:
$seen"
ok "client0's container holds ca.crt and client0.token, and no key or other token"
stage "secrets check" $t
