#!/usr/bin/env bash
# scripts/transport-sweep.sh with the real `splitq bench transport`: comments and blank lines in
# the variants file are skipped, every round of a variant lands as one JSON line, an environment
# variable and bench arguments reach the benchmark, a variant that fails is named and the others
# still run, and the table has a row per variant; bad arguments exit 2.
set -euo pipefail
SPLITQ=${1:?usage: transport_sweep_test.sh SPLITQ_BINARY SWEEP_SCRIPT}
SWEEP=${2:?usage: transport_sweep_test.sh SPLITQ_BINARY SWEEP_SCRIPT}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cat >"$dir/variants" <<'V'
# a comment

one    | SPLITQ_GRPC_LOG=0 | --frame-kib 64 --frame-kib 1024
two    |                   | --frame-kib 1024 --streams 2 --chunk-kib 256
broken |                   | --streams 99
V
"$SWEEP" "$SPLITQ" "$dir/out" 2 "$dir/variants" 1 >"$dir/log" 2>&1
[[ $(wc -l <"$dir/out/one.jsonl") == 2 && $(wc -l <"$dir/out/two.jsonl") == 2 ]] ||
  { echo "expected two JSON lines per variant"; cat "$dir/log"; exit 1; }
grep -q '"streams": 2, ' "$dir/out/two.jsonl" || { echo "--streams did not reach the bench"; exit 1; }
[[ $(grep -c '"frame_bytes"' <(head -1 "$dir/out/one.jsonl" | tr '{' '\n')) == 2 ]] ||
  { echo "--frame-kib did not reach the bench"; exit 1; }
[[ ! -e $dir/out/broken.jsonl ]]
[[ $(grep -c "broken round . failed" "$dir/log") == 2 ]] || { cat "$dir/log"; exit 1; }
grep -Eq '^one +[0-9.]+-[0-9.]+ +[0-9]+-[0-9]+ ' "$dir/log" || { cat "$dir/log"; exit 1; }
grep -Eq '^two +[0-9.]+-[0-9.]+ ' "$dir/log" || { cat "$dir/log"; exit 1; }
grep -Eq '^broken +- +- +-$' "$dir/log" || { cat "$dir/log"; exit 1; }
grep -Eq '^  TCP MB/s +[0-9]+-[0-9]+ ' "$dir/log" || { cat "$dir/log"; exit 1; }
# Usage errors.
for args in "" "$SPLITQ $dir/o 1 $dir/missing" "$dir/nonexistent $dir/o 1 $dir/variants" \
  "$SPLITQ $dir/o 0 $dir/variants" "$SPLITQ $dir/o 1 $dir/variants x"; do
  code=0
  # shellcheck disable=SC2086
  "$SWEEP" $args >/dev/null 2>&1 || code=$?
  [[ $code == 2 ]] || { echo "'$args' exited $code, not 2"; exit 1; }
done
echo "transport_sweep_test: ok"
