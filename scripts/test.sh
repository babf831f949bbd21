#!/usr/bin/env bash
# test.sh: configure, build and test splitq (what CI runs after scripts/install-deps.sh).
#
#   scripts/test.sh [extra cmake args...]
#
# cmake -G Ninja (Release) into $BUILD_DIR (default build/), build with $JOBS jobs (default:
# all cores), then ctest -j2. ccache is used when installed (CMakeLists.txt sets the launcher),
# with CCACHE_BASEDIR=<repo root> and CCACHE_COMPILERCHECK=content. Prints the time of each
# phase; the last line is "ctest: N passed, M failed". Exits non-zero if any phase fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
export CCACHE_COMPILERCHECK=${CCACHE_COMPILERCHECK:-content}

T0=$SECONDS
TIMES=()
phase_start() { echo; echo "=== $1"; PHASE=$1; PT=$SECONDS; }
phase_end() { TIMES+=("$PHASE $((SECONDS - PT))s"); echo "=== $PHASE took $((SECONDS - PT)) s"; }
have_ccache() { command -v ccache >/dev/null; }
summary() { echo "=== times: ${TIMES[*]:-none}; total $((SECONDS - T0)) s"; SUMMARY_SHOWN=1; }
on_exit() {
  local rc=$?
  if [[ $rc -ne 0 && ${SUMMARY_SHOWN:-0} != 1 ]]; then
    echo "=== FAILED in phase '${PHASE:-?}' (exit $rc)" >&2
    [[ ${CCACHE_SHOWN:-0} == 1 ]] || ! have_ccache || ccache -s
    summary
  fi
}
trap on_exit EXIT

if have_ccache; then ccache -z >/dev/null; fi

phase_start configure
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
phase_end

phase_start build
cmake --build "$BUILD_DIR" -j "$JOBS"
phase_end
if have_ccache; then echo "=== ccache"; ccache -s; CCACHE_SHOWN=1; fi

phase_start test
set +e
ctest --test-dir "$BUILD_DIR" --output-on-failure -j2 --no-tests=error 2>&1 | tee "$BUILD_DIR/ctest.log"
rc=${PIPESTATUS[0]}
set -e
phase_end
summary
# ctest's "NN% tests passed, F tests failed out of T" (newer CMake, with no failure: "100% tests
# passed out of T") repeated as the plain closing line.
if line=$(grep -E '^[0-9]+% tests passed(, [0-9]+ tests? failed)? out of [0-9]+' "$BUILD_DIR/ctest.log" | tail -n1); then
  total=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")
  failed=0
  [[ $line =~ ,\ ([0-9]+)\ tests?\ failed ]] && failed=${BASH_REMATCH[1]}
  echo "ctest: $((total - failed)) passed, $failed failed"
fi
exit "$rc"
