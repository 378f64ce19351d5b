#!/usr/bin/env bash
# Import benchmark (issue: kiln foundation). Measures, side by side in one
# run, medians of several runs with hyperfine, on the Debian buildd rootfs
# tarball (scripts/make-buildd-tar.sh):
#   kiln import --compression zstd   vs  zstd -1 -T0 -c FILE | sha256sum
#   kiln import (gzip)               vs  umoci raw add-layer
#                                    vs  podman import + podman save --format oci-dir
#   kiln digest                      vs  openssl sha256, coreutils sha256sum
# and kiln's peak RSS. Prints a markdown table (paste it into the README).
#
#   scripts/bench/import.sh [RUNS]      (default 5; run as root for podman)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-5}
export PATH="$HOME/.cargo/bin:$PATH"
tar=${KILN_BUILDD_TAR:-/var/cache/kiln-ci/buildd.tar}
scripts/make-buildd-tar.sh "$tar" >/dev/null
cargo build --release --quiet
kiln=$PWD/target/x86_64-unknown-linux-gnu/release/kiln
w=$(mktemp -d /tmp/kiln-bench.XXXXXX)
trap 'rm -rf "$w"' EXIT
cat "$tar" >/dev/null # warm the page cache

hf() { # name, prepare, command...
  local name=$1 prep=$2; shift 2
  hyperfine --style none --runs "$runs" --warmup 1 --prepare "$prep" --export-json "$w/$name.json" "$@" >/dev/null
}
median() { jq -r '.results[0].median' "$w/$1.json"; }

hf kiln-zstd "rm -rf $w/s" "$kiln --store $w/s import $tar -t b --compression zstd"
hf zstd-pipe "true" "zstd -q -1 -T0 -c $tar | sha256sum"
hf kiln-gzip "rm -rf $w/s" "$kiln --store $w/s import $tar -t b"
hf umoci "rm -rf $w/l && umoci init --layout $w/l && umoci new --image $w/l:b" \
  "umoci raw add-layer --image $w/l:b $tar"
podman_ok=1
if [ "$(id -u)" = 0 ] && command -v podman >/dev/null; then
  P="podman --root $w/proot --runroot $w/prun --events-backend none"
  hf podman "$P rmi -af >/dev/null 2>&1; rm -rf $w/pout" \
    "$P import -q $tar b:1 >/dev/null && $P save -q --format oci-dir -o $w/pout b:1"
  $P rmi -af >/dev/null 2>&1 || true
else
  podman_ok=0
fi
hf kiln-digest "true" "$kiln digest $tar"
hf openssl "true" "openssl sha256 $tar"
hf sha256sum "true" "sha256sum $tar"

rss() { /usr/bin/time -f %M "$@" 2>&1 >/dev/null | tail -n1; }
rm -rf "$w/s"; rss_gzip=$(rss "$kiln" --store "$w/s" import "$tar" -t b)
rm -rf "$w/s"; rss_zstd=$(rss "$kiln" --store "$w/s" import "$tar" -t b --compression zstd)

python3 - "$w" "$runs" "$podman_ok" "$rss_gzip" "$rss_zstd" "$tar" <<'PY'
import json, os, sys
w, runs, podman_ok, rss_g, rss_z, tar = sys.argv[1:]
m = lambda n: json.load(open(f"{w}/{n}.json"))["results"][0]["median"]
size = os.path.getsize(tar) / 1e6
rows = [
    ("`kiln import --compression zstd`", m("kiln-zstd"), "`zstd -1 -T0 -c \\| sha256sum`", m("zstd-pipe"), "<= 1.3"),
    ("`kiln import` (gzip)", m("kiln-gzip"), "`umoci raw add-layer`", m("umoci"), "<= 0.8"),
]
if podman_ok == "1":
    rows.append(("`kiln import` (gzip)", m("kiln-gzip"), "`podman import` + `podman save --format oci-dir`", m("podman"), "<= 0.25"))
rows += [
    ("`kiln digest` (SHA-256)", m("kiln-digest"), "`openssl sha256`", m("openssl"), "~1"),
    ("`kiln digest` (SHA-256)", m("kiln-digest"), "coreutils `sha256sum`", m("sha256sum"), "< 1"),
]
print(f"Input: buildd rootfs tarball, {size:.0f} MB; medians of {runs} runs (hyperfine), one machine, same run.\n")
print("| kiln | median | peer | median | ratio | target |")
print("|---|---:|---|---:|---:|---|")
for a, ta, b, tb, target in rows:
    print(f"| {a} | {ta:.2f} s | {b} | {tb:.2f} s | {ta/tb:.2f}x | {target} |")
print(f"\nPeak RSS of `kiln import`: gzip {int(rss_g)/1024:.0f} MiB, zstd {int(rss_z)/1024:.0f} MiB (target < 256 MiB).")
PY
