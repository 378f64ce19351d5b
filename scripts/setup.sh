#!/usr/bin/env bash
# Installs what kiln's build, demo and tests need on a Debian 12 machine.
# Run as root (or with sudo available). Idempotent. Ends by checking that
# every tool the demo, tests and benchmarks call is present, and fails
# loudly naming the ones that are not.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(
  # the image clients kiln must interoperate with
  skopeo umoci podman crun uidmap catatonit fuse-overlayfs
  # example image and toolchain test input
  busybox-static mmdebstrap
  # compressors for input tests, tools the tests call
  zstd xz-utils bzip2 pigz jq attr libcap2-bin python3 util-linux strace
  # the static probe the security tests run inside sandboxes
  gcc libc6-dev
  # bsdtar: a second tar implementation that must read kiln's sparse layers
  libarchive-tools
  # disk-image readers: test ISOs, VHD/qcow2 (qemu-img, qemu-io), partition
  # tables (sfdisk), ext2/3/4 (mke2fs, debugfs, e2fsck), chunk streams, XVAs
  xorriso fdisk e2fsprogs gzip cpio
  # peers measured by the benchmarks
  hyperfine bubblewrap
  # throwaway VMs (import --via-vm): QEMU, a kernel to boot directly, and
  # the mkfs tools the tests make xfs/btrfs images with
  qemu-system-x86 linux-image-amd64 xfsprogs btrfs-progs
)
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
log=$(mktemp /tmp/kiln-setup.XXXXXX)
trap 'rm -f "$log"' EXIT
apt() {
  if ! $sudo apt-get "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: apt-get $* failed (output above)" >&2
    exit 1
  fi
}
apt update
# qemu-utils must come from the same QEMU release as qemu-system-x86: a
# machine may ship a newer qemu-utils (a backport) than the distribution's
# QEMU, and apt would then *remove* qemu-utils to install QEMU. Pinning
# both to QEMU's candidate makes it one consistent set (a downgrade of the
# backport, never a removal).
qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
[ -n "$qemu" ] && [ "$qemu" != "(none)" ] || {
  echo "setup: no installable qemu-system-x86 in the configured apt sources" >&2
  exit 1
}
# No recommends: the kernel package would pull firmware and bootloader
# tooling a VM host does not need.
apt install -y --no-install-recommends --allow-downgrades \
  "${pkgs[@]}" "qemu-utils=$qemu" "qemu-block-extra=$qemu"
if grep -A3 'will be REMOVED' "$log" >&2; then
  echo "setup: apt removed the packages above; kiln's setup must only add" >&2
  exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"
# Every command the demo, the tests and the benchmarks call.
tools=(
  skopeo umoci podman crun newuidmap newgidmap catatonit fuse-overlayfs
  busybox mmdebstrap zstd xz bzip2 pigz gzip zcat jq setfattr getfattr setcap
  python3 unshare taskset script strace cc bsdtar xorriso sfdisk mke2fs debugfs
  e2fsck cpio qemu-img qemu-io qemu-system-x86_64 mkfs.xfs mkfs.btrfs
  hyperfine bwrap cargo
)
missing=()
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
ls /boot/vmlinuz-* >/dev/null 2>&1 || missing+=("/boot/vmlinuz-* (linux-image-amd64)")
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: FAILED: missing after install: ${missing[*]}" >&2
  [ -n "$(command -v cargo)" ] || echo "setup: no Rust toolchain found: install one with rustup (https://rustup.rs)" >&2
  exit 1
fi
echo "setup: all ${#tools[@]} tools present; $(cargo --version); $(qemu-img --version | head -1)"
