#!/usr/bin/env bash
# gpu-build.sh: configure and build splitq on the offline GPU host (CUDA, PyTorch's CUDA
# libtorch, no package registry), from the repository root:
#
#   scripts/gpu-build.sh DEBDIR BUILDDIR [extra cmake args...]
#
# DEBDIR is a folder made by `scripts/offline-deps.sh download DEBDIR [core|all]` on Debian 12.
# It is unpacked once into $SPLITQ_DEP_PREFIX (default /opt/dep; redone only when DEBDIR's
# MANIFEST changes). Torch comes from `python3 -c 'import torch'`. Nothing is downloaded.
# Environment: SPLITQ_DEP_PREFIX (default /opt/dep), JOBS (default: all cores).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${SPLITQ_DEP_PREFIX:-/opt/dep}
JOBS=${JOBS:-$(nproc)}

die() { echo "gpu-build: error: $*" >&2; exit 1; }
say() { echo "gpu-build: $*"; }

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
if [[ ${1:-} == -h || ${1:-} == --help ]]; then usage; exit 0; fi
[[ $# -ge 2 ]] || { usage >&2; exit 2; }
DEBDIR=$1 BUILDDIR=$2
shift 2
[[ -f CMakeLists.txt && -f $SCRIPT_DIR/offline-deps.sh ]] || die "run it from the splitq repository root"
[[ -f $DEBDIR/MANIFEST ]] || die "$DEBDIR/MANIFEST not found (make DEBDIR with scripts/offline-deps.sh download on Debian 12)"
command -v cmake >/dev/null || die "cmake not found"
command -v ninja >/dev/null || die "ninja not found"
command -v python3 >/dev/null || die "python3 not found (needed to locate PyTorch's libtorch)"
t0=$SECONDS

# 1. The dependency prefix (offline-deps.sh skips the work when the stamp matches the MANIFEST).
say "dependencies: $DEBDIR -> $PREFIX"
out=$("$SCRIPT_DIR/offline-deps.sh" unpack "$DEBDIR" "$PREFIX") ||
  { printf '%s\n' "$out"; die "unpacking $DEBDIR into $PREFIX failed"; }
grep '^offline-deps:' <<<"$out" || true

# 2. PyTorch's CMake prefix: asked before the prefix's libraries go on LD_LIBRARY_PATH.
TORCH_CMAKE=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)') ||
  die "python3 cannot import torch (PyTorch with CUDA is needed on the GPU host)"
TORCH_INFO=$(python3 -c 'import torch;print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || true)
say "torch: $TORCH_INFO at $TORCH_CMAKE"

# 3. Environment for the Debian libraries in the prefix (link-time and run-time search paths).
eval "$("$SCRIPT_DIR/offline-deps.sh" env "$PREFIX")"

args=(-S . -B "$BUILDDIR" -G Ninja -DCMAKE_BUILD_TYPE=Release
      "-DCMAKE_PREFIX_PATH=$TORCH_CMAKE;$PREFIX/usr"
      -DTORCH_CUDA_ARCH_LIST=9.0 -DCMAKE_CUDA_ARCHITECTURES=90
      -DFETCHCONTENT_FULLY_DISCONNECTED=ON)
# gRPC's config finds re2 through pkg-config; use the carried pkgconf if the host has none.
if ! command -v pkg-config >/dev/null && [[ -x $PREFIX/usr/bin/pkgconf ]]; then
  args+=("-DPKG_CONFIG_EXECUTABLE=$PREFIX/usr/bin/pkgconf")
fi
if command -v nvcc >/dev/null; then
  say "nvcc: $(nvcc --version | tail -n1)"
elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
  say "nvcc: /usr/local/cuda/bin/nvcc ($(/usr/local/cuda/bin/nvcc --version | tail -n1))"
else
  say "warning: no nvcc on PATH or in /usr/local/cuda: the CUDA kernels may be left out"
fi
args+=("$@")

# 4. Configure and build.
say "configure: cmake ${args[*]}"
t1=$SECONDS
cmake "${args[@]}"
say "configured in $((SECONDS - t1)) s"
t1=$SECONDS
say "build: cmake --build $BUILDDIR -j $JOBS"
cmake --build "$BUILDDIR" -j "$JOBS"
say "built in $((SECONDS - t1)) s"

cat <<EOF
gpu-build: done in $((SECONDS - t0)) s
  dependencies : $PREFIX (from $DEBDIR, $(grep -vc '^#' "$DEBDIR/MANIFEST") packages)
  torch        : $TORCH_CMAKE
  build folder : $BUILDDIR (Release, Ninja, sm_90)
Run the tests with:
  eval "\$(scripts/offline-deps.sh env $PREFIX)"
  ctest --test-dir $BUILDDIR --output-on-failure
EOF
