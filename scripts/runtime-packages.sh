#!/usr/bin/env bash
# runtime-packages.sh BIN...: print, one per line and sorted, the Debian packages that hold the
# shared libraries BIN... load (ldd's list, each library looked up with dpkg -S under its path,
# its /usr path and its resolved path, so merged-/usr and update-alternatives links are found).
#
# The Dockerfile's build stage runs it on the built splitq and splitq-health; the runtime stage
# installs the list with `scripts/install-deps.sh --runtime FILE`, so the image carries the
# libraries the binaries really load and nothing of the build (compilers, -dev packages).
#
# Exits 1, naming them, when a library is not found (ldd's "not found") or belongs to no
# package (for example a CUDA runtime under /usr/local/cuda): such a binary would not run in an
# image made from the list.
set -euo pipefail

die() { echo "runtime-packages: error: $*" >&2; exit 1; }
[[ $# -ge 1 ]] || die "usage: $0 BIN... (try --help)"
[[ $1 == -h || $1 == --help ]] && { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
command -v ldd >/dev/null || die "ldd not found"
command -v dpkg >/dev/null || die "dpkg not found: this script is for Debian"

# Every library the binaries load, once each (ldd's list is transitive, and the binaries share
# most of it).
bad=()
declare -A libs=()
for bin in "$@"; do
  [[ -x $bin ]] || die "'$bin' is not an executable file"
  while read -r lib; do
    [[ -n $lib ]] || continue
    if [[ $lib == "MISSING "* ]]; then bad+=("$bin: ${lib#MISSING } not found"); continue; fi
    libs[$lib]=1
  done < <(ldd "$bin" | awk '/=> not found/ { print "MISSING " $1; next }
                            /=> \// { print $3; next }
                            /^[ \t]*\// { print $1 }')
done

# One batched `dpkg -S` per spelling of the paths (dpkg -S is slow, ~0.5 s a call): first the
# /usr path (Debian 12 packages record /usr/lib/..., ldd prints /lib/...), then the path as
# ldd gave it, then the resolved path and its /usr form (update-alternatives links).
# dpkg -S prints "pkg[:arch][, pkg2...]: /path" for each path it knows.
declare -A pkgs=()
declare -A left=()
for lib in "${!libs[@]}"; do left[$lib]=1; done
for form in usr as_is real real_usr; do
  [[ ${#left[@]} -gt 0 ]] || break
  declare -A query=()
  for lib in "${!left[@]}"; do
    case $form in
      usr) q="/usr$lib" ;;
      as_is) q=$lib ;;
      real) q=$(readlink -f "$lib" 2>/dev/null || echo "$lib") ;;
      real_usr) q="/usr$(readlink -f "$lib" 2>/dev/null || echo "$lib")" ;;
    esac
    query[$q]=$lib
  done
  while IFS= read -r line; do
    path=${line##*: }
    names=${line%: *}
    lib=${query[$path]:-}
    [[ -n $lib ]] || continue
    IFS=',' read -r -a owners <<<"$names"
    for o in "${owners[@]}"; do
      o=${o# }
      pkgs[${o%%:*}]=1
    done
    unset "left[$lib]"
  done < <(dpkg -S "${!query[@]}" 2>/dev/null || true)
  unset query
done
for lib in "${!left[@]}"; do bad+=("$lib belongs to no package"); done

if [[ ${#bad[@]} -gt 0 ]]; then
  printf 'runtime-packages: %s\n' "${bad[@]}" >&2
  exit 1
fi
printf '%s\n' "${!pkgs[@]}" | sort
