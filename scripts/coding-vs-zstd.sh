#!/usr/bin/env bash
# coding-vs-zstd.sh: the frames of a real run coded by splitq's rANS coder and by zstd, on the
# same bytes. Runs `splitq bench coding ... --dump DIR`, then zstd (Debian's `zstd` package)
# on every dumped frame, one frame at a time (a frame is coded alone on the wire), in two
# forms: the packed payload as sent, and the codes one byte each (zstd's best case: every
# code a whole byte). Prints bits per element for each, beside rANS and the codes' entropy.
#
#   scripts/coding-vs-zstd.sh BIN DIR [bench coding arguments...]
#   scripts/coding-vs-zstd.sh build/splitq out/zstd --config configs/fmnist-amaq.yaml --steps 300
#
# Levels: ZSTD_LEVELS (default "1 3 9 19"). Speed: zstd's own benchmark (-b) on the first
# frame of each way, single-threaded, printed as zstd prints it.
set -euo pipefail
if [[ $# -lt 3 ]]; then sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; fi
BIN=$1 DIR=$2
shift 2
command -v zstd >/dev/null || { echo "coding-vs-zstd: zstd not found (apt-get install zstd)" >&2; exit 1; }
rm -rf "$DIR"
"$BIN" bench coding "$@" --dump "$DIR"
levels=${ZSTD_LEVELS:-1 3 9 19}
echo
echo "zstd, each frame alone, bits per element (packed: the payload as sent; codes: one byte a code)"
printf '%-5s %-7s' way form
for l in $levels; do printf ' %8s' "-$l"; done
echo
while read -r way _ _ _ elements _; do
  for form in packed codes; do
    printf '%-5s %-7s' "$way" "$form"
    for l in $levels; do
      total=0
      for f in "$DIR/${way}"_*."$form"; do
        n=$(zstd -q -c -"$l" --single-thread "$f" | wc -c)
        total=$((total + n))
      done
      awk -v t="$total" -v e="$elements" 'BEGIN { printf " %8.3f", 8 * t / e }'
    done
    echo
  done
done < "$DIR/summary.txt"
echo
echo "zstd -b (one frame, the packed payload, level 1 and 3: size, compression and decompression speed):"
for way in up down; do
  f="$DIR/${way}_000.packed"
  [[ -f $f ]] || continue
  echo "$way:"
  zstd -b1 -e3 -i2 --single-thread "$f" 2>&1 | tr '\r' '\n' |
    awk '/MB\/s,.*MB\/s/ { last = $0 } /^ *[0-9]+#/ { sub(/^ *.-/, "", last); print "  -" $1 " " last }' |
    sed 's/#//' 
done
