#!/usr/bin/env bash
# transport-sweep.sh: `splitq bench transport` under several gRPC settings, interleaved, so
# their ratios to raw TCP can be compared side by side in one run (absolute numbers are noisy).
#
#   scripts/transport-sweep.sh BIN OUT ROUNDS VARIANTS [MIB]
#
# VARIANTS is a file with one variant per line: `NAME | ENV | BENCH ARGS`, e.g.
#   base        |                                   |
#   lowat       | GRPC_EXPERIMENTS=tcp_rcv_lowat    |
#   wbuf4m      |                                   | --grpc-arg grpc.http2.write_buffer_size=4194304
# Blank lines and lines starting with # are skipped. Each round runs every variant once, in the
# file's order; a run's JSON (`--json`) becomes one line of OUT/NAME.jsonl and its output goes to
# OUT/sweep.log. The table at the end gives, per variant and frame size of 1 MiB and up, the
# lowest and highest gRPC/TCP ratio and gRPC MB/s over the rounds, and below it the range TCP
# moved in the same runs. Runs add to what OUT already holds: a second call adds rounds.
set -euo pipefail
if [[ $# -lt 4 || $# -gt 5 ]]; then
  echo "usage: transport-sweep.sh BIN OUT ROUNDS VARIANTS [MIB]" >&2
  exit 2
fi
bin=$1 out=$2 rounds=$3 variants=$4 mib=${5:-128}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "transport-sweep: ROUNDS must be a whole number >= 1, got $rounds" >&2; exit 2; }
[[ $mib =~ ^[1-9][0-9]*$ ]] || { echo "transport-sweep: MIB must be a whole number >= 1, got $mib" >&2; exit 2; }
[[ -x $bin ]] || { echo "transport-sweep: $bin is not an executable" >&2; exit 2; }
[[ -f $variants ]] || { echo "transport-sweep: $variants not found" >&2; exit 2; }
mkdir -p "$out"

names=() envs=() argss=()
while IFS='|' read -r name env args || [[ -n ${name:-} ]]; do  # (a last line without a newline too)
  name=$(echo "$name" | xargs)
  [[ -z $name || $name == \#* ]] && continue
  names+=("$name") envs+=("$(echo "$env" | xargs)") argss+=("$(echo "$args" | xargs)")
done <"$variants"
[[ ${#names[@]} -gt 0 ]] || { echo "transport-sweep: no variants in $variants" >&2; exit 2; }

for ((r = 1; r <= rounds; r++)); do
  for i in "${!names[@]}"; do
    echo "transport-sweep: round $r/$rounds, ${names[$i]}"
    read -r -a env_words <<<"${envs[$i]}"
    read -r -a arg_words <<<"${argss[$i]}"
    echo "== round $r, ${names[$i]}: ${envs[$i]} ${argss[$i]}" >>"$out/sweep.log"
    if env "${env_words[@]}" "$bin" bench transport --mib "$mib" "${arg_words[@]}" \
      --json "$out/run.json" >>"$out/sweep.log" 2>&1; then
      cat "$out/run.json" >>"$out/${names[$i]}.jsonl"
    else
      echo "transport-sweep: ${names[$i]} round $r failed (see $out/sweep.log)"
    fi
    rm -f "$out/run.json"
  done
done

# The table: per variant and frame size, min-max of ratio and gRPC MB/s over the rounds.
for name in "${names[@]}"; do
  f="$out/$name.jsonl"
  [[ -f $f ]] || f=/dev/null
  tr '{' '\n' <"$f" | awk -v name="$name" '
    function num(key,   m) { if (match($0, "\"" key "\": [0-9.]+")) { m = substr($0, RSTART, RLENGTH); sub(/.*: /, "", m); return m + 0 } return -1 }
    function span(a, b) { return a == "" ? "-" : a "-" b }
    { fb = num("frame_bytes"); if (fb < 0) next
      r = num("ratio"); g = num("grpc_mb_s"); t = num("tcp_mb_s")
      if (!(fb in n)) { rlo[fb] = rhi[fb] = r; glo[fb] = ghi[fb] = g; tlo[fb] = thi[fb] = t }
      n[fb]++
      if (r < rlo[fb]) rlo[fb] = r; if (r > rhi[fb]) rhi[fb] = r
      if (g < glo[fb]) glo[fb] = g; if (g > ghi[fb]) ghi[fb] = g
      if (t < tlo[fb]) tlo[fb] = t; if (t > thi[fb]) thi[fb] = t }
    END {
      split("1048576 4194304 16777216", sizes, " ")
      line = sprintf("%-22s", name); tcp = sprintf("%-22s", "  TCP MB/s")
      for (i = 1; i <= 3; i++) {
        s = sizes[i]
        if (s in n) {
          line = line sprintf("%30s", sprintf("%.2f-%.2f  %.0f-%.0f", rlo[s], rhi[s], glo[s], ghi[s]))
          tcp = tcp sprintf("%30s", sprintf("%.0f-%.0f", tlo[s], thi[s]))
        } else { line = line sprintf("%30s", "-"); tcp = tcp sprintf("%30s", "-") }
      }
      print line; print tcp }'
done | { printf '%-22s%30s%30s%30s\n' variant "1 MiB ratio  MB/s" "4 MiB ratio  MB/s" "16 MiB ratio  MB/s"; cat; }
