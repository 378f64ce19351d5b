#!/usr/bin/env bash
# Boots a disk image built by build-image.sh in QEMU (TCG, no root, no
# loop device, no mount): kiln imports the image (MBR > ext2, read in
# userspace), the kernel and initramfs come out of it with `kiln run`, and
# QEMU boots them with the image as its disk. Prints the guest's console;
# exits 0 once the image's /sbin/init printed its ready line.
#
#   images/vm-disk/boot.sh DISK.img
#
# KILN names the kiln binary (default: kiln on PATH); the store is kiln's
# default (KILN_HOME, ...).
set -euo pipefail
img=${1:?usage: boot.sh DISK.img}
kiln=${KILN:-kiln}
work=$(mktemp -d /tmp/vm-disk-boot.XXXXXX)
trap 'rm -rf "$work"' EXIT
tag=vm-disk-boot:$$
"$kiln" import "$img" --tag "$tag" >/dev/null
"$kiln" run "$tag" cat /boot/vmlinuz >"$work/vmlinuz"
"$kiln" run "$tag" cat /boot/initrd.img >"$work/initrd.img"
"$kiln" rm "$tag" >/dev/null 2>&1 || true
echo "boot: kernel $(stat -c %s "$work/vmlinuz") bytes, initramfs $(stat -c %s "$work/initrd.img") bytes; booting $img"
# A copy-on-write overlay keeps the image as built.
qemu-img create -q -f qcow2 -F raw -b "$(realpath "$img")" "$work/disk.qcow2"
bios=()
[ -e /usr/share/qemu/qboot.rom ] && bios=(-bios /usr/share/qemu/qboot.rom)
timeout "${BOOT_TIMEOUT:-180}" qemu-system-x86_64 -nodefaults -no-user-config -nographic -no-reboot \
  -machine q35 -accel tcg -m 512 -smp 1 "${bios[@]}" \
  -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 cryptomgr.notests" \
  -drive "file=$work/disk.qcow2,format=qcow2,if=virtio" \
  -serial stdio </dev/null | tee "$work/console" | tr -d '\r'
grep -q 'vm-disk: ready' "$work/console" || { echo "boot: no ready line from the image" >&2; exit 1; }
