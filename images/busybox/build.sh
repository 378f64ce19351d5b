#!/usr/bin/env bash
# Builds the bundled example image's root file system as a reproducible tarball
# from Debian's busybox-static package: /bin/busybox plus one symlink per
# applet, a minimal /etc, and the usual empty directories.
#
#   images/busybox/build.sh OUT.tar
#
# Needs: busybox-static (apt-get install busybox-static), GNU tar.
set -euo pipefail
out=${1:?usage: build.sh OUT.tar}
bb=${BUSYBOX:-/bin/busybox}
[ -x "$bb" ] || { echo "build.sh: $bb not found: apt-get install busybox-static" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/tmp,proc,sys,dev,home,work}
cp "$bb" "$root/bin/busybox"
chmod 0755 "$root/bin/busybox"
for applet in $("$bb" --list-full); do
  case "$applet" in bin/busybox) continue ;; esac
  mkdir -p "$root/$(dirname "$applet")"
  ln -sf /bin/busybox "$root/$applet"
done
cat >"$root/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat >"$root/etc/group" <<'G'
root:x:0:
nogroup:x:65534:
G
echo kiln >"$root/etc/hostname"
printf 'NAME="kiln busybox example"\nID=kiln-busybox\n' >"$root/etc/os-release"
chmod 1777 "$root/tmp" "$root/var/tmp"
chmod 0700 "$root/root"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=pax \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$root" -cf "$out" .
