#!/usr/bin/env bash
# Installs what kiln's build, demo and tests need on a Debian 12 machine.
# Run as root (or with sudo available). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(
  # the image clients kiln must interoperate with
  skopeo umoci podman crun uidmap catatonit fuse-overlayfs
  # example image and toolchain test input
  busybox-static mmdebstrap
  # compressors for input tests, tools the tests call
  zstd xz-utils bzip2 pigz jq attr libcap2-bin python3 util-linux
  # bsdtar: a second tar implementation that must read kiln's sparse layers
  libarchive-tools
  # disk-image readers: test ISOs, VHD/qcow2 (qemu-img, qemu-io), partition
  # tables (sfdisk), ext2/3/4 (mke2fs, debugfs, e2fsck), chunk streams, XVAs
  xorriso qemu-utils fdisk e2fsprogs gzip
  # peers measured by the benchmarks
  hyperfine bubblewrap
)
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo
$sudo apt-get update -qq
$sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null
# Throwaway VMs (import --via-vm): QEMU, a kernel to boot directly, and the
# mkfs tools the tests make xfs/btrfs images with. No recommends: the kernel
# package would pull firmware and bootloader tooling a VM host does not need.
$sudo apt-get install -y -qq --no-install-recommends \
  qemu-system-x86 linux-image-amd64 xfsprogs btrfs-progs >/dev/null
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null; then
  echo "setup: no Rust toolchain found: install one with rustup (https://rustup.rs)" >&2
  exit 1
fi
echo "setup: system packages installed; $(cargo --version)"
