#!/bin/sh
# Runs inside `kiln run --vm` (busybox is enough): builds a bootable disk
# image the way vendor recipes do on a host, but with the guest's loop
# devices, partitions and mounts, which the host never sees.
#
#   kiln run --vm -v OUT:/out -v /boot:/host-boot:ro -v images/vm-disk:/recipe:ro \
#       busybox sh /recipe/build-image.sh /out
#
# Writes OUT/disk.img: an MBR disk whose one ext2 partition holds the
# guest's own root file system, /sbin/init that prints a ready line and
# powers off, and /boot/vmlinuz + /boot/initrd.img (the running kernel and
# an initramfs with the modules it needs to mount the partition).
set -eu
out=${1:-/out}
rel=$(uname -r)
mods=/lib/modules/$rel
kernel=/host-boot/vmlinuz-$rel
[ -r "$kernel" ] || { echo "build-image: $kernel not readable (bind the host's /boot at /host-boot)" >&2; exit 1; }
[ -r "$mods/modules.dep" ] || { echo "build-image: no module tree at $mods" >&2; exit 1; }
img=$out/disk.img
rm -f "$img"
dd if=/dev/zero of="$img" bs=1M count=0 seek=64 2>/dev/null

echo "build-image: partition $img (MBR, one Linux partition)"
# busybox fdisk: new primary partition 1 over the whole disk, write.
printf 'o\nn\np\n1\n\n\nw\n' | fdisk "$img" >/dev/null 2>&1 || true
modprobe loop
dev=$(losetup -f)
losetup -P "$dev" "$img"
i=0
while [ ! -b "${dev}p1" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b "${dev}p1" ] || { echo "build-image: ${dev}p1 did not appear" >&2; exit 1; }
echo "build-image: $dev attached, make a file system on ${dev}p1"
mke2fs -q -L root "${dev}p1" >/dev/null
modprobe ext4
target=/mnt/target
mkdir -p "$target"
mount -t ext4 "${dev}p1" "$target"

echo "build-image: copy the root file system in"
for d in bin sbin usr etc root; do
  [ -e "/$d" ] && cp -a "/$d" "$target/"
done
for d in proc sys dev tmp boot; do mkdir -p "$target/$d"; done
# (busybox's /sbin/init is a link to busybox: replaced, not written through)
rm -f "$target/sbin/init"
cat >"$target/sbin/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
echo "vm-disk: ready: the image built in a kiln VM booted ($(uname -r), root $(awk '$2 == "/" {print $1}' /proc/mounts | tail -1))"
poweroff -f
INIT
chmod 0755 "$target/sbin/init"

echo "build-image: install the kernel and an initramfs"
cp "$kernel" "$target/boot/vmlinuz"
ird=/tmp/initramfs
mkdir -p "$ird/bin" "$ird/modules" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/newroot"
cp /bin/busybox "$ird/bin/busybox"
# A module and what it needs, dependencies first (from modules.dep).
deps() {
  local line d
  line=$(grep "/$1\.ko[.a-z]*:" "$mods/modules.dep" | head -n 1)
  [ -n "$line" ] || return 0
  for d in ${line#*:}; do
    d=${d##*/}
    deps "${d%%.ko*}"
  done
  echo "${line%%:*}"
}
: >"$ird/modules/order"
for m in $(for n in virtio_pci virtio_blk crc32c_generic ext4; do deps $n; done | awk '!seen[$0]++'); do
  name=${m##*/}
  case "$name" in
  *.ko.xz) unxz -c "$mods/$m" >"$ird/modules/${name%.xz}" ;;
  *.ko.gz) gunzip -c "$mods/$m" >"$ird/modules/${name%.gz}" ;;
  *.ko) cp "$mods/$m" "$ird/modules/$name" ;;
  *) echo "build-image: cannot load $m" >&2; exit 1 ;;
  esac
  echo "${name%.xz}" | sed 's/\.gz$//' >>"$ird/modules/order"
done
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in $(cat /modules/order); do insmod /modules/$m; done
i=0
while [ ! -b /dev/vda1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 /dev/vda1 /newroot || { echo "initramfs: cannot mount /dev/vda1"; poweroff -f; }
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
INIT
chmod 0755 "$ird/init"
(cd "$ird" && find . | cpio -o -H newc 2>/dev/null | gzip -9) >"$target/boot/initrd.img"

echo "build-image: unmount and detach"
umount "$target"
losetup -d "$dev"
ls -ls "$img"
echo "build-image: done"
