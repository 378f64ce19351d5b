#!/usr/bin/env bash
# Makes the disk-image test and benchmark input: the buildd toolchain rootfs
# (scripts/make-buildd-tar.sh) as a DDK-like ISO (ISO 9660 > ddk/xvda gzip
# chunks > dynamic VHD > MBR > ext4), with scripts/make-ddk-like-iso.sh.
#
#   scripts/make-buildd-iso.sh [OUT]   (default /var/cache/kiln-ci/buildd-ddk.iso)
#
# Cached: does nothing when OUT exists. Runs as root (the generator keeps
# owners and device nodes). CHUNK_BYTES etc. pass through to the generator.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/var/cache/kiln-ci/buildd-ddk.iso}
tar=${KILN_BUILDD_TAR:-/var/cache/kiln-ci/buildd.tar}
if [ -s "$out" ]; then
  echo "make-buildd-iso: $out exists, reusing it"
  exit 0
fi
scripts/make-buildd-tar.sh "$tar"
mkdir -p "$(dirname "$out")"
tmp="$out.tmp.$$.iso"
trap 'rm -f "$tmp" "$tmp.manifest"' EXIT
scripts/make-ddk-like-iso.sh "$tar" "$tmp"
chmod 0644 "$tmp" "$tmp.manifest"
mv "$tmp.manifest" "$out.manifest"
mv "$tmp" "$out"
trap - EXIT
ls -l "$out"
