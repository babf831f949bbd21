#!/usr/bin/env bash
# Builds the frame-decoder fuzz target with libFuzzer, ASan and UBSan, writes a seed corpus
# of valid frames, and fuzzes for a bounded time. Exits non-zero on a build failure or when
# the fuzzer finds a crash, leak, sanitizer report or timeout.
#
#   usage: run_fuzz.sh CLANGXX SOURCE_DIR WORK_DIR SECONDS
#
# WORK_DIR receives the binary, seeds/, corpus/ (kept between runs), crash artifacts and
# fuzz.log.
set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: $0 CLANGXX SOURCE_DIR WORK_DIR SECONDS" >&2
  exit 2
fi
CLANGXX=$1
SRC=$(cd "$2" && pwd)
WORK=$3
SECONDS_TO_RUN=$4

mkdir -p "$WORK/seeds" "$WORK/corpus" "$WORK/artifacts"
WORK=$(cd "$WORK" && pwd)
BIN="$WORK/frame_decoder_fuzz"

if pkg-config --exists absl_status absl_statusor absl_strings 2>/dev/null; then
  ABSL_LIBS=$(pkg-config --libs absl_status absl_statusor absl_strings)
else
  ABSL_LIBS="-labsl_statusor -labsl_status -labsl_cord -labsl_cordz_info -labsl_cord_internal
    -labsl_cordz_functions -labsl_exponential_biased -labsl_cordz_handle -labsl_synchronization
    -labsl_graphcycles_internal -labsl_time -labsl_civil_time -labsl_time_zone
    -labsl_bad_optional_access -labsl_stacktrace -labsl_str_format_internal -labsl_strerror
    -labsl_symbolize -labsl_debugging_internal -labsl_demangle_internal -labsl_malloc_internal
    -labsl_bad_variant_access -labsl_strings -labsl_strings_internal -labsl_base
    -labsl_spinlock_wait -labsl_int128 -labsl_throw_delegate -labsl_raw_logging_internal
    -labsl_log_severity -latomic -lrt -lpthread"
fi

# No OpenMP: the pragmas are ignored and the kernels run single-threaded.
# shellcheck disable=SC2086
"$CLANGXX" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -ffp-contract=off -Wno-unknown-pragmas -I "$SRC" \
  "$SRC/tests/fuzz/frame_decoder_fuzz.cc" "$SRC/kernels/common.cc" "$SRC/kernels/pack.cc" \
  "$SRC/kernels/detail/philox_batch.cc" \
  "$SRC/quant/crc32c.cc" "$SRC/quant/wire_format.cc" "$SRC/quant/entropy_coding.cc" \
  $ABSL_LIBS -o "$BIN"

SPLITQ_FUZZ_WRITE_SEEDS="$WORK/seeds" "$BIN"

LOG="$WORK/fuzz.log"
status=0
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  "$BIN" -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
  -artifact_prefix="$WORK/artifacts/" "$WORK/corpus" "$WORK/seeds" >"$LOG" 2>&1 || status=$?

runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOG" | tail -n 1)
corpus=$(find "$WORK/corpus" -type f | wc -l)
if [[ $status -ne 0 ]]; then
  echo "frame_decoder_fuzz: FAILED (exit $status) after ${runs:-?} runs; log $LOG, artifacts in $WORK/artifacts" >&2
  grep -E "ERROR|SUMMARY|invariant|runtime error|Test unit written" "$LOG" | head -n 20 >&2 || true
  exit 1
fi
echo "frame_decoder_fuzz: ${runs:-?} runs in ${SECONDS_TO_RUN} s, corpus ${corpus} files, no crashes"
