#!/usr/bin/env bash
# Installs and caches everything amiprep's tests need, idempotently:
#   - Debian packages: debootstrap, rpm, systemd (systemd-analyze), python3-venv,
#     postgresql (its server binaries, for the multi-controller tests)
#   - a `debootstrap --variant=minbase` Debian root (cached), and a second one
#     with systemd, to install the amiprep packages into (cached)
#   - cargo-deb and cargo-generate-rpm (scripts/package), pinned
#   - a Python venv with a pinned moto[server] (EC2 stand-in for the tests)
#   - for the system tier: qemu, and a Debian root shaped like a cloud image
#     with its kernel and initramfs (cached; AMIPREP_NO_VM=1 skips it)
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
# Several controllers sharing state: a private PostgreSQL cluster per test
# (tests/src/postgres.rs), from Debian's server package.
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_pkgs+=(postgresql)
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

# --- system tier: a Debian root shaped like a cloud image, for real VMs -----
# qemu-system-x86 boots it, e2fsprogs (mkfs.ext4 -d) turns it into a disk
# without loop mounts, qemu-utils makes the copy-on-write overlays. The root
# has what a Debian cloud image has (systemd, udev, openssh-server, cloud-init
# with the Ec2 datasource, sudo, rsyslog, a kernel); its kernel and initramfs
# are copied out for direct kernel boot. The tests add amiprep's .deb and
# their configuration to a copy of it (tests/src/vm/image.rs).
# AMIPREP_NO_VM=1 skips all of it.
vm_pkgs=()
if [ "$moto_only" = 0 ] && [ "${AMIPREP_NO_VM:-0}" = 0 ]; then
command -v qemu-system-x86_64 >/dev/null || vm_pkgs+=(qemu-system-x86)
command -v qemu-img >/dev/null || vm_pkgs+=(qemu-utils)
command -v mkfs.ext4 >/dev/null || vm_pkgs+=(e2fsprogs)
if [ ${#vm_pkgs[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || { log "missing packages: ${vm_pkgs[*]} (run as root, or install them)"; exit 1; }
    log "installing ${vm_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${vm_pkgs[@]}" >&2
fi
vmroot="$cache/debian-$suite-vm"
if [ ! -e "$vmroot/.amiprep-complete" ]; then
    [ "$(id -u)" -eq 0 ] || { log "building the VM root needs root"; exit 1; }
    log "building $vmroot with debootstrap (once; cached)"
    r="$vmroot.tmp"
    # A finished debootstrap is kept when only the shaping below failed.
    if [ ! -e "$r/.amiprep-debootstrapped" ]; then
        rm -rf "$r"
        # python3-cffi-backend: debootstrap does not resolve the virtual
        # packages python3-cryptography depends on.
        debootstrap --variant=minbase \
            --include=systemd,systemd-sysv,udev,dbus,openssh-server,cloud-init,python3-cffi-backend,sudo,linux-image-amd64,ifupdown,isc-dhcp-client,iproute2,rsyslog,netbase,procps \
            "$suite" "$r" "$mirror" >"$cache/debootstrap-vm.log" 2>&1 \
            || { tail -20 "$cache/debootstrap-vm.log" >&2; exit 1; }
        touch "$r/.amiprep-debootstrapped"
    fi
    # The disk is one ext4 filesystem labelled `root` (no partition table:
    # the kernel is booted directly). Debian's cloud images mount it rw from
    # fstab after the kernel mounted it as the command line says.
    printf 'LABEL=root / ext4 defaults,errors=remount-ro 0 1\n' >"$r/etc/fstab"
    # net.ifnames=0 on the kernel command line names the one NIC eth0.
    printf 'auto lo\niface lo inet loopback\n\nallow-hotplug eth0\niface eth0 inet dhcp\n' \
        >"$r/etc/network/interfaces"
    # The metadata service is qemu's guestfwd to the fake IMDS: no DMI
    # probing needed, and cloud-init leaves the network to ifupdown.
    cat >"$r/etc/cloud/cloud.cfg.d/90-amiprep-vm.cfg" <<'CFG'
datasource_list: [ Ec2, None ]
datasource:
  Ec2:
    strict_id: false
    metadata_urls: [ "http://169.254.169.254" ]
    timeout: 5
    max_wait: 60
network:
  config: disabled
# No locales package: the default en_US.UTF-8 fails cloud-config.service.
locale: C.UTF-8
CFG
    # Like a cloud image: no identity of its own. The first boot makes the
    # machine id; cloud-init makes the host keys.
    : >"$r/etc/machine-id"
    rm -f "$r/var/lib/dbus/machine-id" "$r"/etc/ssh/ssh_host_*
    echo localhost >"$r/etc/hostname"
    rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*_Packages
    boot="$r/.amiprep-boot"
    mkdir -p "$boot"
    cp "$(ls -1 "$r"/boot/vmlinuz-* | tail -1)" "$boot/vmlinuz"
    cp "$(ls -1 "$r"/boot/initrd.img-* | tail -1)" "$boot/initrd.img"
    rm -rf "$vmroot"
    mv "$vmroot.tmp" "$vmroot"
    touch "$vmroot/.amiprep-complete"
fi
echo "export AMIPREP_VM_ROOT='$vmroot'"
fi
# --- end of the system tier --------------------------------------------------

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
