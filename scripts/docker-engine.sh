#!/usr/bin/env bash
# docker-engine.sh: make a Debian 12 machine ready to build and run splitq's docker-compose.yml
# with a real Docker engine, with no registry reachable (only the Debian archive).
#
#   scripts/docker-engine.sh           install what is missing, start dockerd, import debian:12
#   scripts/docker-engine.sh --check   say what is missing; change nothing (exit 1 if anything is)
#
# Steps, each skipped when already done:
#   1. apt-get install docker.io docker-compose debootstrap apparmor (Debian's dockerd 20.10,
#      docker-compose v1.29; apparmor, only a Recommends of docker.io, is what lets containers
#      start on a kernel with AppArmor on), as root or through sudo;
#   2. start dockerd in the background when `docker info` cannot reach a daemon (no systemd
#      needed: dockerd's log goes to $SPLITQ_DOCKERD_LOG, default /var/log/splitq-dockerd.log);
#      waits up to 60 s for it to answer;
#   3. make the `debian:12` base image when the engine has none: `debootstrap --variant=minbase
#      bookworm` into a temporary folder (from $SPLITQ_DEBIAN_MIRROR, default
#      http://deb.debian.org/debian; the image's apt sources also name the security archive,
#      $SPLITQ_DEBIAN_SECURITY_MIRROR, default http://deb.debian.org/debian-security, or none
#      when set to "none"), then `docker import` (about a minute, 117 MB).
#
# Once dockerd runs, the host's iptables FORWARD policy is DROP (dockerd sets it). splitq's own
# tests do not depend on it (tests/deploy/compose_test.cc keeps its traffic off the host's
# network). dockerd keeps running after this script: stop it with `pkill dockerd`.
set -euo pipefail

die() { echo "docker-engine: error: $*" >&2; exit 1; }
say() { echo "docker-engine: $*"; }

CHECK=0
for arg in "$@"; do
  case $arg in
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (try --help)" ;;
  esac
done

MIRROR=${SPLITQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOG=${SPLITQ_DOCKERD_LOG:-/var/log/splitq-dockerd.log}
SECURITY=${SPLITQ_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PKGS=(docker.io docker-compose debootstrap apparmor)

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || die "not root and no sudo: run as root"
  if [[ -t 0 ]]; then SUDO=(sudo); else SUDO=(sudo -n); fi
fi

missing=()
for p in "${PKGS[@]}"; do
  [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true) == ii* ]] || missing+=("$p")
done
engine_up() { "${SUDO[@]}" docker info >/dev/null 2>&1; }
have_base() { "${SUDO[@]}" docker image inspect debian:12 >/dev/null 2>&1; }

if [[ $CHECK == 1 ]]; then
  status=0
  if [[ ${#missing[@]} -gt 0 ]]; then say "missing packages: ${missing[*]}"; status=1; fi
  if command -v docker >/dev/null && engine_up; then
    say "dockerd answers"
    if have_base; then say "debian:12 image present"; else say "no debian:12 image"; status=1; fi
  else
    say "no Docker daemon answers"; status=1
  fi
  exit $status
fi

t0=$SECONDS
if [[ ${#missing[@]} -gt 0 ]]; then
  say "installing ${missing[*]}"
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi
command -v docker-compose >/dev/null || die "docker-compose not on PATH after installing it"

if ! engine_up; then
  command -v dockerd >/dev/null || die "dockerd not found (package docker.io)"
  say "starting dockerd (log: $LOG)"
  "${SUDO[@]}" sh -c "nohup dockerd >>'$LOG' 2>&1 &"
  for _ in $(seq 1 60); do
    engine_up && break
    sleep 1
  done
  engine_up || die "dockerd did not answer within 60 s; see $LOG"
fi
say "engine: $("${SUDO[@]}" docker version --format 'server {{.Server.Version}}, client {{.Client.Version}}' 2>/dev/null || echo '?')"

if ! have_base; then
  root=$(mktemp -d /tmp/splitq-debian12.XXXXXX)
  trap '"${SUDO[@]}" rm -rf "$root"' EXIT
  say "making debian:12 with debootstrap --variant=minbase bookworm ($MIRROR)"
  "${SUDO[@]}" debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -20 "$root.log" >&2; die "debootstrap failed (log: $root.log)"; }
  # The image's apt sources: the same mirror, plus the updates and security suites.
  sources="deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main"
  [[ $SECURITY == none ]] || sources+="
deb $SECURITY bookworm-security main"
  printf '%s\n' "$sources" | "${SUDO[@]}" tee "$root/etc/apt/sources.list" >/dev/null
  "${SUDO[@]}" rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  "${SUDO[@]}" tar -C "$root" -c . | "${SUDO[@]}" docker import - debian:12 >/dev/null
  rm -f "$root.log"
fi
say "debian:12 image: $("${SUDO[@]}" docker image inspect debian:12 --format '{{.Size}}') bytes"
say "ready in $((SECONDS - t0)) s"
