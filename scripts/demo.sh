#!/usr/bin/env bash
# kiln's main job on the bundled example image, end to end:
#   install what is needed, build kiln, build the busybox example rootfs,
#   import it (gzip'd tarball, detected by content) into a fresh store,
#   list and inspect it, read it with skopeo and umoci straight from the
#   store, run build steps in it and --commit, import the same rootfs as a
#   vendor-kit-like ISO (chunks > VHD > MBR > ext4), build a bootable disk
#   image inside a throwaway VM and boot it, and export an archive that
#   podman/docker load.
# Run as root on a fresh Debian 12 machine (KILN_SKIP_SETUP=1 to skip apt).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${KILN_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
# Milliseconds a command took, printed after it.
timed() {
  local t0 t1
  t0=$(date +%s%N)
  "$@"
  t1=$(date +%s%N)
  printf '   (%d ms)\n' $(((t1 - t0) / 1000000))
}

step "build kiln (cargo build --release; the first build takes a few minutes)"
cargo build --release
work=$(mktemp -d /tmp/kiln-demo.XXXXXX)
chmod 0755 "$work"
mkdir "$work/bin"
cp target/x86_64-unknown-linux-gnu/release/kiln "$work/bin/kiln"
kiln=$work/bin/kiln
# kiln is rootless: as root, the demo runs kiln as an unprivileged user
# with a subuid range (created here if needed, as the tests do).
if [ "$(id -u)" = 0 ]; then
  user=kiln-demo
  id -u "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
  for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -q "^$user:" "$f" || echo "$user:400000:65536" >>"$f"
  done
  chown "$user:" "$work"
  as() { runuser -u "$user" -- env HOME="$(getent passwd "$user" | cut -d: -f6)" KILN_HOME="$work/store" PATH="$PATH" "$@"; }
  trap 'rm -rf "$work"' EXIT
else
  user=$(id -un)
  as() { env KILN_HOME="$work/store" "$@"; }
  # Files a run left owned by subordinate ids go through kiln unshare.
  trap '"$kiln" unshare rm -rf "$work" 2>/dev/null || rm -rf "$work"' EXIT
fi
echo "kiln runs as $user ($(as id -u)); store: $work/store (removed at the end)"
export KILN_HOME=$work/store

step "build the example root file system (images/busybox) and gzip it"
images/busybox/build.sh "$work/busybox.tar"
gzip -c "$work/busybox.tar" >"$work/busybox-rootfs"   # no extension: kiln sniffs content
chmod a+r "$work"/busybox*
ls -l "$work/busybox-rootfs"

step "kiln import (rootless, no mounts, no loop devices)"
timed as env SOURCE_DATE_EPOCH=1700000000 "$kiln" import "$work/busybox-rootfs" --tag kiln/busybox:demo \
  --env BUILD=demo --cmd '["/bin/sh"]' --label org.opencontainers.image.title=kiln-demo

step "the same input again gives the same digest (reproducible)"
as env SOURCE_DATE_EPOCH=1700000000 "$kiln" import "$work/busybox.tar" --tag kiln/busybox:again \
  --env BUILD=demo --cmd '["/bin/sh"]' --label org.opencontainers.image.title=kiln-demo

step "kiln images"
as "$kiln" images

step "kiln inspect (config)"
as "$kiln" inspect kiln/busybox:demo | jq '.config | {architecture, created, config, rootfs}'

step "skopeo reads the store directly"
as skopeo inspect "oci:$KILN_HOME:kiln/busybox:demo" | jq '{Digest, Architecture, Labels, Layers}'

step "umoci unpacks it"
as umoci unpack --rootless --image "$KILN_HOME:kiln/busybox:demo" "$work/bundle" >/dev/null 2>&1
ls "$work/bundle/rootfs" | tr '\n' ' '; echo
as "$work/bundle/rootfs/bin/busybox" echo "busybox from the unpacked image runs"

step "kiln run: a build step in the rootless sandbox (no network, caps dropped, seccomp)"
mkdir -p "$work/src" "$work/out"
[ "$(id -u)" = 0 ] && chown "$user:" "$work/out"
printf 'kiln\nbuilds\nimages\nrootless\n' >"$work/src/words.txt"
chmod -R a+rX "$work/src"
timed as "$kiln" run -v "$work/src:/src:ro" -v "$work/out:/out" -w /src kiln/busybox:demo -- \
  sh -c 'echo "inside: $(id -un)@$(hostname), pid $$, net: $(ls /sys/class/net)"; sort words.txt | tr a-z A-Z | tee /out/result.txt; grep -E "CapEff|NoNewPrivs|Seccomp:" /proc/self/status'
echo "on the host: $(tr '\n' ' ' <"$work/out/result.txt")"

step "kiln run --commit: bake the step's changes into a new image"
as "$kiln" run --commit kiln/busybox:baked kiln/busybox:demo -- \
  sh -c 'mkdir -p /opt/tool && echo "#!/bin/sh" > /opt/tool/hello && echo "echo hello from the baked image" >> /opt/tool/hello && chmod +x /opt/tool/hello && rm /etc/os-release'
as "$kiln" run kiln/busybox:baked /opt/tool/hello
as "$kiln" run kiln/busybox:baked -- sh -c 'ls /etc/os-release 2>&1 || true'
as "$kiln" images

step "exit codes: 124 on timeout, 127 not found"
set +e
as "$kiln" run --timeout 1 kiln/busybox:demo sleep 30; echo "timeout -> $?"
as "$kiln" run kiln/busybox:demo no-such-tool 2>/dev/null; echo "not found -> $?"
set -e

step "a vendor build kit: ISO > gzip chunks > VHD > MBR > ext4, imported without loop devices or mounts"
CHUNK_BYTES=1048576 ALLOW_NONROOT=1 scripts/make-ddk-like-iso.sh "$work/busybox.tar" "$work/kit.iso" 2>/dev/null
chmod a+r "$work/kit.iso"
losetup -a | wc -l | sed 's/^/loop devices before: /'
as "$kiln" probe "$work/kit.iso"
timed as "$kiln" import "$work/kit.iso" --tag kiln/kit:demo --map-caller
losetup -a | wc -l | sed 's/^/loop devices after:  /'
as "$kiln" run kiln/kit:demo sh -c 'echo "hello from the kit: $(ls /bin | wc -l) programs in /bin"'

step "kiln run --vm: build a bootable disk image in a throwaway VM (losetup -P, mkfs, mount: the guest's), boot it"
mkdir -p "$work/vm-out"
cp -r images/vm-disk "$work/recipe"
chmod -R a+rX "$work/recipe"
[ "$(id -u)" = 0 ] && chown "$user:" "$work/vm-out"
losetup -a | wc -l | sed 's/^/loop devices before: /'
timed as "$kiln" run --vm --timings -v "$work/vm-out:/out" -v /boot:/host-boot:ro \
  -v "$work/recipe:/recipe:ro" kiln/busybox:demo -- sh /recipe/build-image.sh /out
losetup -a | wc -l | sed 's/^/loop devices after:  /'
timed as env KILN="$kiln" bash "$work/recipe/boot.sh" "$work/vm-out/disk.img"

step "kiln export (oci-archive and docker-archive), fsck, gc"
timed as "$kiln" export kiln/busybox:demo -o "$work/out/busybox-oci.tar"
as "$kiln" export kiln/busybox:demo -o "$work/out/busybox-docker.tar" --format docker-archive
ls -l "$work"/out/busybox-*.tar
as skopeo inspect "docker-archive:$work/out/busybox-docker.tar" | jq -c '{Architecture, Layers}'
as "$kiln" fsck
as "$kiln" rm kiln/busybox:again
as "$kiln" gc

echo; echo "demo done; removing $work"
