#!/usr/bin/env bash
# Installs and caches everything amiprep's tests need, idempotently:
#   - Debian packages: debootstrap, rpm, systemd (systemd-analyze), python3-venv
#   - a `debootstrap --variant=minbase` Debian root (cached), and a second one
#     with systemd, to install the amiprep packages into (cached)
#   - cargo-deb and cargo-generate-rpm (scripts/package), pinned
#   - a Python venv with a pinned moto[server] (EC2 stand-in for the tests)
# Prints `export` lines for the locations; scripts/test evaluates them.
set -euo pipefail

cache="${AMIPREP_TEST_CACHE:-$HOME/.cache/amiprep-tests}"
suite="${AMIPREP_DEBIAN_SUITE:-bookworm}"
mirror="${AMIPREP_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
moto_version="5.2.5"
mkdir -p "$cache"

log() { printf 'test-env: %s\n' "$*" >&2; }

# --moto-only: just the EC2 stand-in (what scripts/demo needs).
moto_only=0
[ "${1:-}" = "--moto-only" ] && moto_only=1

need_pkgs=()
if [ "$moto_only" = 0 ]; then
command -v debootstrap >/dev/null || need_pkgs+=(debootstrap)
command -v rpm >/dev/null || need_pkgs+=(rpm)
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)
command -v mkfifo >/dev/null || need_pkgs+=(coreutils)
command -v dpkg-deb >/dev/null || need_pkgs+=(dpkg-dev)
command -v apt-ftparchive >/dev/null || need_pkgs+=(apt-utils)
fi
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then need_pkgs+=(python3-venv); fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        log "missing packages: ${need_pkgs[*]} (run as root, or install them)"; exit 1
    fi
    log "installing ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >&2
fi

root="$cache/debian-$suite-minbase"
if [ "$moto_only" = 0 ] && [ ! -e "$root/.amiprep-complete" ]; then
    [ "$(id -u)" -eq 0 ] || { log "building the Debian root needs root"; exit 1; }
    log "building $root with debootstrap (once; cached)"
    rm -rf "$root.tmp"
    debootstrap --variant=minbase "$suite" "$root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"
    mv "$root.tmp" "$root"
    touch "$root/.amiprep-complete"
fi

# The packaging tests install the .deb files into a copy of this root: like
# a real image it has systemd (units to verify and enable, systemd-sysusers).
sysroot="$cache/debian-$suite-systemd"
if [ "$moto_only" = 0 ] && [ ! -e "$sysroot/.amiprep-complete" ]; then
    [ "$(id -u)" -eq 0 ] || { log "building the Debian root needs root"; exit 1; }
    log "building $sysroot with debootstrap (once; cached)"
    rm -rf "$sysroot.tmp"
    debootstrap --variant=minbase --include=systemd "$suite" "$sysroot.tmp" "$mirror" \
        >"$cache/debootstrap-systemd.log" 2>&1 \
        || { tail -20 "$cache/debootstrap-systemd.log" >&2; exit 1; }
    rm -rf "$sysroot"
    mv "$sysroot.tmp" "$sysroot"
    touch "$sysroot/.amiprep-complete"
fi

# Packaging tools for scripts/package, from crates.io, pinned.
cargo_deb_version="3.8.0"
cargo_generate_rpm_version="0.21.1"
installed="$(cargo install --list 2>/dev/null || true)"
if [ "$moto_only" = 0 ] && ! grep -q "^cargo-deb v$cargo_deb_version:" <<<"$installed"; then
    log "installing cargo-deb $cargo_deb_version"
    cargo install --locked --quiet cargo-deb --version "$cargo_deb_version" >&2
fi
if [ "$moto_only" = 0 ] && ! grep -q "^cargo-generate-rpm v$cargo_generate_rpm_version:" <<<"$installed"; then
    log "installing cargo-generate-rpm $cargo_generate_rpm_version"
    cargo install --locked --quiet cargo-generate-rpm --version "$cargo_generate_rpm_version" >&2
fi

venv="$cache/venv-moto-$moto_version"
if [ ! -x "$venv/bin/moto_server" ]; then
    log "creating $venv with moto[server]==$moto_version"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q "moto[server]==$moto_version" >&2
fi

echo "export AMIPREP_DEBIAN_ROOT='$root'"
echo "export AMIPREP_DEBIAN_SYSTEMD_ROOT='$sysroot'"
echo "export AMIPREP_MOTO_SERVER='$venv/bin/moto_server'"
