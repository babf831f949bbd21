#!/usr/bin/env bash
# offline-deps.sh: carry splitq's Debian 12 build dependencies to a host without a package
# registry (the GPU host) as .deb files, and unpack them there into a prefix.
#
#   scripts/offline-deps.sh download DIR [core|all]   on Debian 12 with network (root or not)
#   scripts/offline-deps.sh unpack DIR PREFIX         on the target host; needs no network
#   scripts/offline-deps.sh env PREFIX                print the export lines for PREFIX
#
# The package list lives in scripts/deps.list (tags core/services; see the comments there).
# `download` fetches the candidate version of every listed package with `apt-get download`,
# checks each file against the sha256 of the apt index, and writes DIR/MANIFEST:
#   PACKAGE VERSION ARCH SHA256 SIZE FILE
# `unpack` verifies DIR/MANIFEST, extracts every listed .deb into PREFIX (dpkg-deb -x, or
# ar+tar where dpkg is missing), merges PREFIX/lib into PREFIX/usr/lib (Debian 12 still ships
# some libraries in /lib), and rewrites what points outside the prefix:
#   - absolute symlinks (libz.so -> /lib/x86_64-linux-gnu/libz.so.1.2.13) become relative
#     links inside PREFIX;
#   - absolute paths in CMake config files and pkg-config files ("/usr/lib/libgloo.so.0.5.0",
#     Debian's "/usr/lib/x86_64-linux-gnu/cmake/absl" relocation check, prefix=/usr, ...)
#     get PREFIX put in front.
# It then checks the highest GLIBC symbol version the unpacked binaries need against the host.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEPS_LIST=${SPLITQ_DEPS_LIST:-$SCRIPT_DIR/deps.list}
MULTIARCH=x86_64-linux-gnu
STAMP=.splitq-offline-deps   # in PREFIX: marks a prefix made by this script

die() { echo "offline-deps: error: $*" >&2; exit 1; }
say() { echo "offline-deps: $*"; }
warn() { echo "offline-deps: warning: $*" >&2; }

usage() {
  cat <<EOF
usage: $(basename "$0") download DIR [core|all]
       $(basename "$0") unpack DIR PREFIX
       $(basename "$0") env PREFIX
       $(basename "$0") --help

download DIR [core|all]
    Fetch splitq's Debian 12 .deb set into DIR with apt-get download and write DIR/MANIFEST
    (package, version, arch, sha256, size, file). 'core' (absl, yaml-cpp, spdlog+fmt, CLI11,
    gtest, benchmark) is enough for kernels/, quant/ and the tests; 'all' (the default) adds
    gRPC, protobuf, re2, c-ares, OpenSSL, zlib, pkgconf and gloo for the services.
    Needs Debian 12 with 'apt-get update' done; no root needed. Never fetches libtorch.
    Packages are listed in $DEPS_LIST.

unpack DIR PREFIX
    Verify DIR/MANIFEST's checksums, extract every .deb into PREFIX (a new or empty folder, or
    one made by an earlier unpack), make the prefix self-contained (absolute symlinks and the
    absolute paths in *.cmake / *.pc files now point into PREFIX) and print the environment and
    cmake lines to use. Works offline; dpkg is optional (falls back to ar + tar).

env PREFIX
    Print the export lines (LIBRARY_PATH, LD_LIBRARY_PATH, PKG_CONFIG_PATH) for an unpacked
    PREFIX, for use as: eval "\$($(basename "$0") env PREFIX)"
EOF
}

# Packages of deps.list that carry any of the given tags.
list_packages() {
  [[ -r $DEPS_LIST ]] || die "package list $DEPS_LIST not found"
  awk -v want="$*" '
    BEGIN { n = split(want, w, " ") }
    { sub(/#.*/, "") }
    NF >= 2 {
      k = split($2, t, ",")
      for (i = 1; i <= k; i++) for (j = 1; j <= n; j++) if (t[i] == w[j]) { print $1; next }
    }' "$DEPS_LIST"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

abs_path() { # realpath -m where it exists, else a plain join
  if realpath -m / >/dev/null 2>&1; then realpath -m "$1"
  else case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac
  fi
}

env_lines() { # PREFIX
  local p=$1
  local libs="$p/usr/lib/$MULTIARCH:$p/usr/lib"
  cat <<EOF
export LIBRARY_PATH="$libs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PKG_CONFIG_PATH="$p/usr/lib/$MULTIARCH/pkgconfig:$p/usr/share/pkgconfig\${PKG_CONFIG_PATH:+:\$PKG_CONFIG_PATH}"
EOF
}

# ---------------------------------------------------------------------------------------
cmd_download() {
  [[ $# -ge 1 && $# -le 2 ]] || { usage >&2; exit 2; }
  local dir=$1 set=${2:-all}
  local tags
  case $set in
    core) tags="core" ;;
    all) tags="core services" ;;
    *) die "unknown set '$set' (expected core or all)" ;;
  esac
  command -v apt-get >/dev/null || die "apt-get not found: 'download' runs on Debian 12"
  command -v dpkg-deb >/dev/null || die "dpkg-deb not found: 'download' runs on Debian 12"
  if [[ -r /etc/debian_version ]] && [[ $(cut -d. -f1 /etc/debian_version) != 12 ]]; then
    warn "this is Debian $(cat /etc/debian_version), not 12: package names may not resolve"
  fi
  mkdir -p "$dir" || die "cannot create $dir"
  dir=$(cd "$dir" && pwd)

  local -a pkgs
  mapfile -t pkgs < <(list_packages $tags)
  [[ ${#pkgs[@]} -gt 0 ]] || die "no packages tagged '$tags' in $DEPS_LIST"
  say "set '$set': ${#pkgs[@]} packages -> $dir"

  local -a aptopts=(-q -o Acquire::Retries=3)
  [[ $(id -u) -eq 0 ]] && aptopts+=(-o APT::Sandbox::User=root)  # no _apt sandbox warning

  local manifest_tmp="$dir/MANIFEST.tmp.$$" empty
  empty=$(mktemp -d)
  trap 'rm -f "$manifest_tmp"; rm -rf "$empty"' EXIT
  {
    echo "# splitq offline .deb set '$set', made by scripts/offline-deps.sh download"
    echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) on Debian $(cat /etc/debian_version 2>/dev/null || echo '?')"
    echo "# PACKAGE VERSION ARCH SHA256 SIZE FILE"
  } >"$manifest_tmp"

  # 'URI' FILE SIZE SHA256:HEX per package, from the apt index (candidate versions). One
  # apt-get call; if it fails, ask one by one to name the culprit. (Run in an empty folder:
  # apt-get download lists nothing for files already in the current folder.)
  local pkg line out
  local -a uris=()
  if ! out=$(cd "$empty" && apt-get "${aptopts[@]}" download --print-uris "${pkgs[@]}" 2>&1); then
    for pkg in "${pkgs[@]}"; do
      line=$(cd "$empty" && apt-get "${aptopts[@]}" download --print-uris "$pkg" 2>&1) ||
        die "apt-get download cannot resolve package '$pkg' (apt-get update done? Debian 12?): ${line##*$'\n'}"
    done
    die "apt-get download --print-uris failed: ${out##*$'\n'}"
  fi
  # apt prints them in its own order: key them by the package name that starts FILE.
  local -A uri_of=()
  while IFS= read -r line; do
    read -r _ file _ <<<"$line"
    uri_of[${file%%_*}]=$line
  done < <(grep "^'" <<<"$out")
  for pkg in "${pkgs[@]}"; do
    [[ -n ${uri_of[$pkg]:-} ]] || die "apt-get download --print-uris gave no entry for '$pkg'"
    uris+=("${uri_of[$pkg]}")
  done

  # Fetch what is missing or damaged, again in one call with a per-package fallback.
  local file size want got ver arch total=0 i
  local -a need=() needfiles=() files=()
  for i in "${!pkgs[@]}"; do
    read -r _ file size want <<<"${uris[$i]}"
    want=${want#SHA256:}
    [[ $want =~ ^[0-9a-f]{64}$ ]] || die "no SHA256 in apt's index entry for '${pkgs[$i]}': ${uris[$i]}"
    if ! [[ -f $dir/$file && $(sha256_of "$dir/$file") == "$want" ]]; then
      rm -f "$dir/$file"
      need+=("${pkgs[$i]}")
      needfiles+=("$file")
    fi
  done
  if [[ ${#need[@]} -gt 0 ]]; then
    say "downloading ${#need[@]} packages"
    if ! (cd "$dir" && apt-get "${aptopts[@]}" download "${need[@]}" >/dev/null); then
      for pkg in "${need[@]}"; do
        (cd "$dir" && apt-get "${aptopts[@]}" download "$pkg" >/dev/null) ||
          die "apt-get download failed for package '$pkg'"
      done
    fi
  fi
  for i in "${!need[@]}"; do
    [[ -f $dir/${needfiles[$i]} ]] || die "apt-get download of '${need[$i]}' did not produce ${needfiles[$i]}"
  done
  local fetched=${#need[@]}

  for i in "${!pkgs[@]}"; do
    pkg=${pkgs[$i]}
    read -r _ file size want <<<"${uris[$i]}"
    want=${want#SHA256:}
    got=$(sha256_of "$dir/$file")
    [[ $got == "$want" ]] || die "sha256 mismatch for '$pkg' ($file): index $want, file $got"
    ver=$(dpkg-deb -f "$dir/$file" Version)
    arch=$(dpkg-deb -f "$dir/$file" Architecture)
    printf '%s %s %s %s %s %s\n' "$pkg" "$ver" "$arch" "$got" "$size" "$file" >>"$manifest_tmp"
    files+=("$file")
    total=$((total + size))
  done

  # Remove .deb files that an earlier MANIFEST listed but this set does not.
  if [[ -f $dir/MANIFEST ]]; then
    local old
    while read -r _ _ _ _ _ old; do
      [[ -n $old && -f $dir/$old ]] || continue
      if ! printf '%s\n' "${files[@]}" | grep -qxF -- "$old"; then
        rm -f "$dir/$old" && say "removed $old (not in set '$set')"
      fi
    done < <(grep -v '^#' "$dir/MANIFEST")
  fi
  mv "$manifest_tmp" "$dir/MANIFEST"
  rm -rf "$empty"
  trap - EXIT

  check_closure "$dir" "${pkgs[@]}"

  say "fetched $fetched, kept $((${#pkgs[@]} - fetched)) already present"
  say "$(awk -v t=$total 'BEGIN { printf "%d packages, %.1f MiB (%d bytes)", '${#pkgs[@]}', t / 1048576, t }') in $dir"
  say "manifest: $dir/MANIFEST"
  local other
  other=$(find "$dir" -maxdepth 1 -name '*.deb' | wc -l)
  [[ $other -eq ${#pkgs[@]} ]] || warn "$dir holds $other .deb files, ${#pkgs[@]} in MANIFEST (unpack uses the MANIFEST ones)"
}

# Warn about Depends/Pre-Depends of the set that are neither carried nor deliberately skipped.
check_closure() { # DIR PKG...
  local dir=$1; shift
  local -a have skip
  have=("$@")
  mapfile -t skip < <(list_packages skip)
  local f deps alt ok missing=""
  while read -r _ _ _ _ _ f; do
    deps=$(dpkg-deb -f "$dir/$f" Pre-Depends Depends | sed -E 's/^[A-Za-z-]+: //' | tr ',' '\n')
    while read -r alt; do
      [[ -n $alt ]] || continue
      ok=0
      # "a (>= 1) | b:any" -> any alternative carried or skipped is fine
      for name in $(sed -E 's/\([^)]*\)//g; s/:[a-z0-9]+//g; s/\|/ /g' <<<"$alt"); do
        if printf '%s\n' "${have[@]}" "${skip[@]}" | grep -qxF -- "$name"; then ok=1; break; fi
      done
      [[ $ok -eq 1 ]] || missing+="  $(dpkg-deb -f "$dir/$f" Package) -> $alt"$'\n'
    done <<<"$deps"
  done < <(grep -v '^#' "$dir/MANIFEST")
  if [[ -n $missing ]]; then
    warn "dependencies neither carried nor marked 'skip' in $DEPS_LIST:"
    printf '%s' "$missing" >&2
  else
    say "dependency closure: every Depends is carried or deliberately skipped"
  fi
}

# ---------------------------------------------------------------------------------------
extract_deb() { # DEB PREFIX
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$1" "$2"
  else
    command -v ar >/dev/null || die "neither dpkg-deb nor ar (binutils) found to unpack $1"
    local member
    member=$(ar t "$1" | grep '^data\.tar') || die "no data.tar member in $1"
    case $member in
      *.xz) ar p "$1" "$member" | tar -xJ -C "$2" ;;
      *.zst) ar p "$1" "$member" | zstd -dc | tar -x -C "$2" ;;
      *.gz) ar p "$1" "$member" | tar -xz -C "$2" ;;
      *) ar p "$1" "$member" | tar -x -C "$2" ;;
    esac
  fi
}

cmd_unpack() {
  [[ $# -eq 2 ]] || { usage >&2; exit 2; }
  local dir=$1 prefix
  [[ -d $dir ]] || die "no such directory: $dir"
  [[ -f $dir/MANIFEST ]] || die "$dir/MANIFEST not found (make it with: $(basename "$0") download $dir)"
  prefix=$(abs_path "$2")
  [[ $prefix =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "PREFIX '$prefix' must be an absolute path of [A-Za-z0-9._/+-]"
  [[ $prefix != *-[IL] ]] || die "PREFIX '$prefix' must not end in -I or -L"
  case $prefix/ in
    /|/usr/*|/lib/*|/lib64/*|/bin/*|/sbin/*|/etc/*|/proc/*|/sys/*|/dev/*)
      die "PREFIX '$prefix' must not be under / system folders (use e.g. /opt/dep)" ;;
  esac
  command -v sha256sum >/dev/null || die "sha256sum not found"

  # 1. Verify the manifest.
  local manifest_sum n=0 bad=0 pkg ver arch sha size file
  manifest_sum=$(sha256_of "$dir/MANIFEST")
  local -a debs=()
  while read -r pkg ver arch sha size file; do
    [[ -n $pkg && $pkg != \#* ]] || continue
    n=$((n + 1))
    if [[ ! -f $dir/$file ]]; then
      echo "  missing: $file ($pkg)" >&2; bad=$((bad + 1)); continue
    fi
    if [[ $(sha256_of "$dir/$file") != "$sha" ]]; then
      echo "  checksum mismatch: $file ($pkg)" >&2; bad=$((bad + 1)); continue
    fi
    debs+=("$dir/$file")
  done <"$dir/MANIFEST"
  [[ $n -gt 0 ]] || die "$dir/MANIFEST lists no packages"
  [[ $bad -eq 0 ]] || die "$bad of $n .deb files in $dir are missing or corrupt"
  say "verified $n .deb files against $dir/MANIFEST"

  # 2. A fresh prefix (or one this script made: it is wiped and redone).
  if [[ -f $prefix/$STAMP ]] && [[ $(head -n1 "$prefix/$STAMP") == "$manifest_sum" ]] &&
     [[ ${SPLITQ_FORCE_UNPACK:-0} != 1 ]]; then
    say "$prefix already holds this set (stamp $prefix/$STAMP); nothing to do (SPLITQ_FORCE_UNPACK=1 redoes it)"
    print_usage_lines "$prefix"
    return 0
  fi
  if [[ -d $prefix ]] && [[ -n $(ls -A "$prefix") ]]; then
    [[ -f $prefix/$STAMP ]] || die "$prefix is not empty and was not made by this script; give a new or empty folder"
    say "clearing $prefix (made by an earlier unpack)"
    find "$prefix" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  fi
  mkdir -p "$prefix" || die "cannot create $prefix (not root? pick another PREFIX)"

  local deb
  for deb in "${debs[@]}"; do
    extract_deb "$deb" "$prefix" || die "extracting $deb failed"
  done
  say "extracted $n packages into $prefix"

  # 3. Merge PREFIX/{lib,bin,sbin} into PREFIX/usr/* (Debian 12 still ships zlib1g etc. in
  #    /lib), leaving compat symlinks, so one library folder holds everything.
  local top
  for top in lib lib64 bin sbin; do
    if [[ -d $prefix/$top && ! -L $prefix/$top ]]; then
      mkdir -p "$prefix/usr/$top"
      cp -a "$prefix/$top/." "$prefix/usr/$top/"
      rm -rf "${prefix:?}/$top"
      ln -s "usr/$top" "$prefix/$top"
    fi
  done

  # 3b. Copy the multiarch headers (usr/include/x86_64-linux-gnu/openssl/opensslconf.h, ...)
  #     into usr/include too: the compiler searches its own /usr/include/<multiarch>, never the
  #     prefix's, and CMake only adds -isystem PREFIX/usr/include. The prefix is single-arch.
  local ma=$prefix/usr/include/$MULTIARCH rel
  if [[ -d $ma ]]; then
    while IFS= read -r -d '' f; do
      rel=${f#"$ma"/}
      if [[ -e $prefix/usr/include/$rel ]]; then
        warn "multiarch header $rel also exists in usr/include; keeping the latter"
      else
        mkdir -p "$(dirname "$prefix/usr/include/$rel")"
        cp -a "$f" "$prefix/usr/include/$rel"
      fi
    done < <(find "$ma" \( -type f -o -type l \) -print0)
  fi

  # 4. Absolute symlinks -> relative links inside the prefix.
  local link target fixed=0
  while IFS= read -r -d '' link; do
    target=$(readlink "$link")
    [[ $target == /* ]] || continue
    ln -sfn "$(realpath -m --relative-to="$(dirname "$link")" "$prefix$target")" "$link"
    fixed=$((fixed + 1))
  done < <(find "$prefix/usr" -type l -print0)
  say "rewrote $fixed absolute symlinks to relative ones"
  # Dangling library links (libibverbs-dev's libmlx5.so etc. point into ibverbs-providers,
  # not carried) are removed, so that no find_library can pick one.
  local dangling
  dangling=$(find "$prefix/usr/lib" -xtype l 2>/dev/null || true)
  if [[ -n $dangling ]]; then
    while IFS= read -r link; do rm -f "$link"; done <<<"$dangling"
    say "removed $(wc -l <<<"$dangling") dangling library symlinks: $(xargs -n1 basename <<<"$dangling" | tr '\n' ' ')"
  fi

  # 5. Absolute paths in CMake and pkg-config files (and any text linker script *.so) ->
  #    under the prefix. A path is rewritten where /usr or /lib starts it right after a quote,
  #    '=', ';', '(', blank, -I or -L, or at the start of a line; the loop catches adjacent ones.
  local f rewritten=0
  local -a texts=()
  while IFS= read -r -d '' f; do texts+=("$f"); done < <(
    find "$prefix/usr" -type f \( -name '*.cmake' -o -name '*.pc' \) -print0
    find "$prefix/usr/lib" -type f -name '*.so' -size -4k -print0 2>/dev/null |
      xargs -0 -r grep -lZ 'GNU ld script' 2>/dev/null || true)
  local re='(^|["'"'"'=;( 	]|-I|-L)(/usr|/lib|/lib64)(/|"|'"'"'|;|\)| |	|$)'
  for f in "${texts[@]}"; do
    if grep -qE "$re" "$f"; then
      sed -i -E ":a; s#$re#\\1$prefix\\2\\3#; ta" "$f"
      rewritten=$((rewritten + 1))
    fi
  done
  say "rewrote absolute paths in $rewritten of ${#texts[@]} CMake/pkg-config files"

  # 6. Glibc check: the highest GLIBC_x.y symbol version the unpacked binaries need.
  local need host
  if command -v readelf >/dev/null; then
    need=$(find "$prefix/usr/lib" "$prefix/usr/bin" -type f \( -name '*.so*' -o -perm -u+x \) -print0 2>/dev/null |
           xargs -0 -r readelf -W --dyn-syms 2>/dev/null | grep -o 'GLIBC_[0-9][0-9.]*' | sort -uV | tail -n1 || true)
    host=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}' || true)
    if [[ -n $need && -n $host ]]; then
      if [[ $(printf '%s\n' "${need#GLIBC_}" "$host" | sort -V | head -n1) != "${need#GLIBC_}" ]]; then
        warn "the unpacked libraries need $need but this host has glibc $host: linking or running will fail"
      else
        say "glibc: binaries need up to $need, host has $host: fine"
      fi
    fi
  fi

  printf '%s\n%s\n' "$manifest_sum" "unpacked from $(abs_path "$dir") on $(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$prefix/$STAMP"
  print_usage_lines "$prefix"
}

print_usage_lines() { # PREFIX
  local p=$1
  cat <<EOF

Use it with (bash):
$(env_lines "$p")
  TORCH_CMAKE=\$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -DCMAKE_PREFIX_PATH="\$TORCH_CMAKE;$p/usr" -DTORCH_CUDA_ARCH_LIST=9.0 -DCMAKE_CUDA_ARCHITECTURES=90
EOF
  if ! command -v pkg-config >/dev/null; then
    echo "  (no pkg-config on this host: add -DPKG_CONFIG_EXECUTABLE=$p/usr/bin/pkgconf; gRPC's re2 lookup needs it)"
  fi
}

cmd_env() {
  [[ $# -eq 1 ]] || { usage >&2; exit 2; }
  local p
  p=$(abs_path "$1")
  [[ -f $p/$STAMP ]] || die "$p was not made by '$(basename "$0") unpack'"
  env_lines "$p"
}

# ---------------------------------------------------------------------------------------
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case $1 in
  -h|--help|help) usage ;;
  download) shift; cmd_download "$@" ;;
  unpack) shift; cmd_unpack "$@" ;;
  env) shift; cmd_env "$@" ;;
  *) echo "offline-deps: unknown command '$1'" >&2; usage >&2; exit 2 ;;
esac
