#!/usr/bin/env bash
# kiln's main job on the bundled example image, end to end:
#   install what is needed, build kiln, build the busybox example rootfs,
#   import it (gzip'd tarball, detected by content) into a fresh store,
#   list and inspect it, read it with skopeo and umoci straight from the
#   store, run build steps in it and --commit, import the same rootfs as a
#   vendor-kit-like ISO (chunks > VHD > MBR > ext4), and export an archive
#   that podman/docker load.
# Run as root on a fresh Debian 12 machine (KILN_SKIP_SETUP=1 to skip apt).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${KILN_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet
kiln=$PWD/target/x86_64-unknown-linux-gnu/release/kiln
work=$(mktemp -d /tmp/kiln-demo.XXXXXX)
export KILN_HOME=$work/store
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build the example root file system (images/busybox) and gzip it"
images/busybox/build.sh "$work/busybox.tar"
gzip -c "$work/busybox.tar" >"$work/busybox-rootfs"   # no extension: kiln sniffs content
ls -l "$work/busybox-rootfs"

step "kiln import (rootless, no mounts, no loop devices)"
SOURCE_DATE_EPOCH=1700000000 "$kiln" import "$work/busybox-rootfs" --tag kiln/busybox:demo \
  --env BUILD=demo --cmd '["/bin/sh"]' --label org.opencontainers.image.title=kiln-demo

step "the same input again gives the same digest (reproducible)"
SOURCE_DATE_EPOCH=1700000000 "$kiln" import "$work/busybox.tar" --tag kiln/busybox:again \
  --env BUILD=demo --cmd '["/bin/sh"]' --label org.opencontainers.image.title=kiln-demo

step "kiln images"
"$kiln" images

step "kiln inspect (config)"
"$kiln" inspect kiln/busybox:demo | jq '.config | {architecture, created, config, rootfs}'

step "skopeo reads the store directly"
skopeo inspect "oci:$KILN_HOME:kiln/busybox:demo" | jq '{Digest, Architecture, Labels, Layers}'

step "umoci unpacks it"
umoci unpack --rootless --image "$KILN_HOME:kiln/busybox:demo" "$work/bundle" >/dev/null 2>&1
ls "$work/bundle/rootfs" | tr '\n' ' '; echo
"$work/bundle/rootfs/bin/busybox" echo "busybox from the unpacked image runs"

step "kiln run: a build step in the rootless sandbox (no network, caps dropped, seccomp)"
mkdir -p "$work/src"
printf 'kiln\nbuilds\nimages\nrootless\n' >"$work/src/words.txt"
"$kiln" run -v "$work/src:/src:ro" -v "$work:/out" -w /src kiln/busybox:demo -- \
  sh -c 'echo "inside: $(id -un)@$(hostname), pid $$, net: $(ls /sys/class/net)"; sort words.txt | tr a-z A-Z | tee /out/result.txt; grep -E "CapEff|NoNewPrivs|Seccomp:" /proc/self/status'
echo "on the host: $(tr '\n' ' ' <"$work/result.txt")"

step "kiln run --commit: bake the step's changes into a new image"
"$kiln" run --commit kiln/busybox:baked kiln/busybox:demo -- \
  sh -c 'mkdir -p /opt/tool && echo "#!/bin/sh" > /opt/tool/hello && echo "echo hello from the baked image" >> /opt/tool/hello && chmod +x /opt/tool/hello && rm /etc/os-release'
"$kiln" run kiln/busybox:baked /opt/tool/hello
"$kiln" run kiln/busybox:baked -- sh -c 'ls /etc/os-release 2>&1 || true'
"$kiln" images

step "exit codes: 124 on timeout, 127 not found"
set +e
"$kiln" run --timeout 1 kiln/busybox:demo sleep 30; echo "timeout -> $?"
"$kiln" run kiln/busybox:demo no-such-tool 2>/dev/null; echo "not found -> $?"
set -e

step "a vendor build kit: ISO > gzip chunks > VHD > MBR > ext4, imported without loop devices or mounts"
CHUNK_BYTES=1048576 scripts/make-ddk-like-iso.sh "$work/busybox.tar" "$work/kit.iso" 2>/dev/null
losetup -a | wc -l | sed 's/^/loop devices before: /'
"$kiln" probe "$work/kit.iso"
"$kiln" import "$work/kit.iso" --tag kiln/kit:demo
losetup -a | wc -l | sed 's/^/loop devices after:  /'
"$kiln" run kiln/kit:demo sh -c 'echo "hello from the kit: $(ls /bin | wc -l) programs in /bin"'

step "kiln export (oci-archive and docker-archive), fsck, gc"
"$kiln" export kiln/busybox:demo -o "$work/busybox-oci.tar"
"$kiln" export kiln/busybox:demo -o "$work/busybox-docker.tar" --format docker-archive
ls -l "$work"/busybox-*.tar
skopeo inspect "docker-archive:$work/busybox-docker.tar" | jq -c '{Architecture, Layers}'
"$kiln" fsck
"$kiln" rm kiln/busybox:again
"$kiln" gc

echo; echo "demo store left in $KILN_HOME (remove with: rm -rf $work)"
