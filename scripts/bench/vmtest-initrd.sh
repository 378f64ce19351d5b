#!/usr/bin/env bash
# Builds an initramfs that lets vmtest boot the host's Debian kernel: vmtest
# expects 9p and virtio built into the kernel, Debian ships them as modules.
# /init (static busybox) loads them, mounts vmtest's 9p root and hands over
# to vmtest's init= script. Usage: vmtest-initrd.sh OUT.cpio [KERNEL_RELEASE]
set -euo pipefail
out=$1
rel=${2:-$(uname -r)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/mods" "$work/proc" "$work/dev" "$work/newroot"
cp /bin/busybox "$work/bin/busybox"
file -L /bin/busybox | grep -q 'statically linked' || { echo "needs busybox-static" >&2; exit 1; }
n=0
: >"$work/order"
for m in virtio_pci virtio_console 9pnet_virtio 9p; do
  modprobe -S "$rel" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | awk '!seen[$0]++' | while read -r ko; do
  n=$((n + 1))
  case "$ko" in
    *.ko.xz) xz -dc "$ko" ;;
    *.ko.zst) zstd -dc "$ko" ;;
    *) cat "$ko" ;;
  esac >"$work/mods/$n.ko"
  echo "/mods/$n.ko" >>"$work/order"
done
cat >"$work/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /order); do /bin/busybox insmod "$m"; done
/bin/busybox mount -t 9p -o trans=virtio,cache=mmap,msize=1048576 /dev/root /newroot
init=$(/bin/busybox sed -n 's/.* init=\([^ ]*\).*/\1/p' /proc/cmdline)
/bin/busybox umount /proc
exec /bin/busybox switch_root /newroot "$init"
INIT
chmod 755 "$work/init"
(cd "$work" && find . | cpio -o -H newc --quiet) >"$out"
