#!/usr/bin/env bash
# The real `splitq coordinator` process on loopback with an OS-picked port, fresh
# certificates and tokens: `splitq health` gets SERVING over TLS, a plaintext probe fails
# cleanly, a second coordinator on its port fails, `certs` and `tokens` refuse to replace
# what --out holds (exit 2, naming --force / --keep), an unknown flag exits 2, integer options
# name a non-number or the range, gRPC's own log lines are not shown, --ready-file holds the
# address while it serves, and SIGTERM stops the coordinator with exit code 0 and removes it.
set -euo pipefail
SPLITQ=${1:?usage: coordinator_smoke.sh SPLITQ_BINARY CONFIG}
CONFIG=${2:?usage: coordinator_smoke.sh SPLITQ_BINARY CONFIG}
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
"$SPLITQ" certs --out "$dir" >/dev/null
"$SPLITQ" tokens --out "$dir" alice >/dev/null
"$SPLITQ" coordinator --config "$CONFIG" --listen 127.0.0.1:0 --tls-dir "$dir" \
  --tokens "$dir/tokens" --ready-file "$dir/ready" >"$dir/log" 2>&1 &
pid=$!
for _ in $(seq 50); do
  grep -q "listening on" "$dir/log" && break
  sleep 0.1
done
port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$dir/log")
[[ -n $port ]] || { echo "no port in: $(cat "$dir/log")"; exit 1; }
for _ in $(seq 50); do [[ -s $dir/ready ]] && break; sleep 0.1; done
[[ $(cat "$dir/ready") == "127.0.0.1:$port" ]] || { echo "ready file: '$(cat "$dir/ready")'"; exit 1; }
[[ $("$SPLITQ" health "127.0.0.1:$port" --tls-dir "$dir") == SERVING ]]
[[ $("$SPLITQ" health "127.0.0.1:$port" --tls-dir "$dir" --service splitq.v1.Coordinator) == SERVING ]]
if "$SPLITQ" health "127.0.0.1:$port" --insecure --timeout-ms 1000 2>/dev/null; then
  echo "a plaintext probe of a TLS coordinator succeeded"
  exit 1
fi
# A second coordinator on the same port must not start (gRPC's SO_REUSEPORT is off).
code=0
timeout 20 "$SPLITQ" coordinator --config "$CONFIG" --listen "127.0.0.1:$port" --tls-dir "$dir" \
  --tokens "$dir/tokens" >"$dir/second.log" 2>&1 || code=$?
if [[ $code == 0 || $code == 124 ]]; then
  echo "a second coordinator started on port $port (exit $code)"
  exit 1
fi
grep -q "cannot listen" "$dir/second.log"
# Certificates and tokens are not replaced by accident; usage errors exit 2.
code=0
"$SPLITQ" certs --out "$dir" 2>"$dir/certs.err" || code=$?
[[ $code == 2 ]] || { echo "certs over a CA exited $code"; exit 1; }
grep -q -- "--force" "$dir/certs.err"
code=0
"$SPLITQ" tokens --out "$dir" bob 2>"$dir/tokens.err" || code=$?
[[ $code == 2 ]] || { echo "tokens over a tokens file exited $code"; exit 1; }
grep -q "alice" "$dir/tokens"
grep -q -- "--keep" "$dir/tokens.err"
code=0
"$SPLITQ" coordinator --no-such-flag >/dev/null 2>&1 || code=$?
[[ $code == 2 ]] || { echo "an unknown flag exited $code"; exit 1; }
# Integer options say what is wrong: not a number, or out of range.
for bad in "abc|abc is not a whole number" "0|0 not in range 10 to 600000"; do
  code=0
  "$SPLITQ" coordinator --heartbeat-ms "${bad%%|*}" 2>"$dir/int.err" >/dev/null || code=$?
  [[ $code == 2 ]] || { echo "--heartbeat-ms ${bad%%|*} exited $code"; exit 1; }
  grep -q "${bad#*|}" "$dir/int.err" || { cat "$dir/int.err"; exit 1; }
done
# gRPC's own log lines are dropped unless SPLITQ_GRPC_LOG=1 (the second coordinator above
# failed to bind: splitq's message only).
if grep -q "chttp2" "$dir/second.log"; then echo "gRPC's log line leaked"; exit 1; fi
kill -TERM "$pid"
wait "$pid"
grep -q "coordinator stopped" "$dir/log"
[[ ! -e $dir/ready ]] || { echo "the ready file outlived the coordinator"; exit 1; }
echo "coordinator smoke: ok (port $port)"
