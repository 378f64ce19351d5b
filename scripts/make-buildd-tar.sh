#!/usr/bin/env bash
# Makes the "real toolchain" test and benchmark input: a Debian bookworm
# buildd root file system (gcc, make, dpkg-dev...) as an uncompressed tarball,
# about 445 MB and 13k entries.
#
#   scripts/make-buildd-tar.sh [OUT]    (default /var/cache/kiln-ci/buildd.tar)
#
# Cached: does nothing when OUT exists. Needs mmdebstrap and network access to
# a Debian mirror; runs as root (mode root) or unprivileged (mode unshare,
# which needs /etc/subuid).
set -euo pipefail
out=${1:-/var/cache/kiln-ci/buildd.tar}
if [ -s "$out" ]; then
  echo "make-buildd-tar: $out exists, reusing it"
  exit 0
fi
mkdir -p "$(dirname "$out")"
mode=root
[ "$(id -u)" = 0 ] || mode=unshare
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tmp="$out.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# A fixed SOURCE_DATE_EPOCH keeps the tarball's mtimes stable across rebuilds.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000} \
  mmdebstrap --quiet --variant=buildd --mode="$mode" --format=tar bookworm "$tmp" "$mirror"
chmod 0644 "$tmp"
mv "$tmp" "$out"
trap - EXIT
ls -l "$out"
