#!/usr/bin/env bash
# The real `splitq coordinator` process on loopback with an OS-picked port, fresh
# certificates and tokens: `splitq health` gets SERVING over TLS, a plaintext probe fails
# cleanly, and SIGTERM stops the coordinator with exit code 0.
set -euo pipefail
SPLITQ=${1:?usage: coordinator_smoke.sh SPLITQ_BINARY CONFIG}
CONFIG=${2:?usage: coordinator_smoke.sh SPLITQ_BINARY CONFIG}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$SPLITQ" certs --out "$dir" >/dev/null
"$SPLITQ" tokens --out "$dir" alice >/dev/null
"$SPLITQ" coordinator --config "$CONFIG" --listen 127.0.0.1:0 --tls-dir "$dir" \
  --tokens "$dir/tokens" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 50); do
  grep -q "listening on" "$dir/log" && break
  sleep 0.1
done
port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/log")
[[ -n $port ]] || { echo "no port in: $(cat "$dir/log")"; exit 1; }
[[ $("$SPLITQ" health "127.0.0.1:$port" --tls-dir "$dir") == SERVING ]]
if "$SPLITQ" health "127.0.0.1:$port" --insecure --timeout-ms 1000 2>/dev/null; then
  echo "a plaintext probe of a TLS coordinator succeeded"
  exit 1
fi
kill -TERM "$pid"
wait "$pid"
grep -q "coordinator stopped" "$dir/log"
echo "coordinator smoke: ok (port $port)"
