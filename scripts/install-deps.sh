#!/usr/bin/env bash
# install-deps.sh: install splitq's build and test dependencies on Debian 12 (with network).
#
#   scripts/install-deps.sh            install what is missing (apt-get update + install)
#   scripts/install-deps.sh --no-test  ... but not the test-only tools (an image's build)
#   scripts/install-deps.sh --runtime FILE
#                                      only what a built splitq needs to run: the packages
#                                      tagged 'runtime' and those listed in FILE, one per line
#                                      (the Dockerfile's runtime stage; FILE comes from
#                                      scripts/runtime-packages.sh)
#   scripts/install-deps.sh --list     print the package list and exit
#
# The packages are the ones tagged 'apt' in scripts/deps.list (the one list, shared with
# scripts/offline-deps.sh), and those tagged 'test' unless --no-test; with --runtime, those
# tagged 'runtime' and FILE's. Already installed packages are found with dpkg-query, so a run with
# nothing missing needs no root, touches nothing and prints one line. Otherwise it runs
# apt-get update and apt-get install -y --no-install-recommends for the missing ones, as root,
# or through sudo when not root.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LIST=${SPLITQ_DEPS_LIST:-$SCRIPT_DIR/deps.list}

die() { echo "install-deps: error: $*" >&2; exit 1; }

[[ -r $LIST ]] || die "$LIST not found"
TAGS=" apt test "
LIST_ONLY=0
RUNTIME_FILE=
while [[ $# -gt 0 ]]; do
  case $1 in
    --list) LIST_ONLY=1 ;;
    --no-test)
      [[ -z $RUNTIME_FILE ]] || die "--no-test and --runtime do not go together"
      TAGS=" apt " ;;
    --runtime)
      [[ $TAGS == " apt test " ]] || die "--no-test and --runtime do not go together"
      [[ $# -ge 2 ]] || die "--runtime needs a FILE (from scripts/runtime-packages.sh)"
      RUNTIME_FILE=$2; TAGS=" runtime "; shift
      [[ -r $RUNTIME_FILE ]] || die "--runtime: cannot read '$RUNTIME_FILE'" ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  shift
done
mapfile -t PKGS < <(awk -v tags="$TAGS" '
  { sub(/#.*/, "") }
  NF >= 2 { k = split($2, t, ","); for (i = 1; i <= k; i++) if (index(tags, " " t[i] " ")) { print $1; next } }' "$LIST")
[[ ${#PKGS[@]} -gt 0 ]] || die "no packages tagged '${TAGS// /}' in $LIST"
if [[ -n $RUNTIME_FILE ]]; then
  mapfile -t -O "${#PKGS[@]}" PKGS < <(sed 's/#.*//' "$RUNTIME_FILE" | awk 'NF { print $1 }')
fi
if [[ $LIST_ONLY == 1 ]]; then printf '%s\n' "${PKGS[@]}"; exit 0; fi

command -v dpkg-query >/dev/null || die "dpkg-query not found: this script is for Debian 12"

missing_packages() {
  local p
  for p in "${PKGS[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true) == ii* ]] || echo "$p"
  done
}

mapfile -t MISSING < <(missing_packages)
if [[ ${#MISSING[@]} -eq 0 ]]; then
  echo "install-deps: all ${#PKGS[@]} packages installed"
  exit 0
fi

if [[ -r /etc/debian_version ]] && [[ $(cut -d. -f1 /etc/debian_version) != 12 ]]; then
  echo "install-deps: warning: this is Debian $(cat /etc/debian_version), the list is for Debian 12" >&2
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "missing ${MISSING[*]}; run as root (no sudo here)"
  if [[ -t 0 ]]; then SUDO=(sudo); else SUDO=(sudo -n); fi
fi

echo "install-deps: installing ${#MISSING[@]} missing packages: ${MISSING[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp "${TMPDIR:-/tmp}/install-deps.XXXXXX")
trap 'rm -f "$log"' EXIT
apt_opts=(-o Acquire::Retries=3 -o Dpkg::Use-Pty=0)
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" -qq update >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  die "apt-get update failed"
fi
if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" -qq install -y \
     --no-install-recommends "${MISSING[@]}" >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  die "apt-get install failed"
fi

mapfile -t STILL < <(missing_packages)
[[ ${#STILL[@]} -eq 0 ]] || die "still not installed after apt-get: ${STILL[*]}"
echo "install-deps: installed ${#MISSING[@]} packages ($(grep -c '^Setting up' "$log" || true) set up in all)"
