#!/usr/bin/env bash
# Before/after: one kiln binary against another in the same run, on the
# same machine state, with hyperfine medians (for a refactor that must not
# change speed):
#   kiln run bb /bin/true     (cached busybox image; start-up cost)
#   kiln import buildd.tar    (the 445 MB Debian buildd rootfs; gzip, zstd)
# Prints a markdown table with the after/before ratio of each median.
#
#   scripts/bench/compare.sh BEFORE_KILN [AFTER_KILN] [RUNS]
# AFTER_KILN defaults to this checkout's release build; RUNS to 10 (run)
# and RUNS/2 (import). Build BEFORE_KILN from an older commit, e.g.
#   git worktree add /tmp/before OLD && (cd /tmp/before && cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/../.."
before=${1:?usage: compare.sh BEFORE_KILN [AFTER_KILN] [RUNS]}
after=${2:-$PWD/target/x86_64-unknown-linux-gnu/release/kiln}
runs=${3:-10}
export PATH="$HOME/.cargo/bin:$PATH"
tar=${KILN_BUILDD_TAR:-/var/cache/kiln-ci/buildd.tar}
scripts/make-buildd-tar.sh "$tar" >/dev/null
w=$(mktemp -d /tmp/kiln-bench-compare.XXXXXX)
trap 'rm -rf "$w"' EXIT
images/busybox/build.sh "$w/bb.tar"
# Each binary its own store (the same format), each image cached first.
for who in before after; do
  k=${!who}
  "$k" --store "$w/$who" import "$w/bb.tar" -t bb >/dev/null
  "$k" --store "$w/$who" run bb true
done
cat "$tar" >/dev/null # warm the page cache

hf() { # name, prepare, runs, command...
  local name=$1 prep=$2 n=$3; shift 3
  hyperfine --style none -N --runs "$n" --warmup 2 --prepare "$prep" --export-json "$w/$name.json" "$@" >/dev/null
}
median() { jq -r ".results[$2].median" "$w/$1.json"; }
half=$(( runs / 2 > 2 ? runs / 2 : 3 ))
hf run true "$runs" "$before --store $w/before run bb /bin/true" "$after --store $w/after run bb /bin/true"
hf gzip "rm -rf $w/i" "$half" "$before --store $w/i import $tar -t b" "$after --store $w/i import $tar -t b"
hf zstd "rm -rf $w/i" "$half" "$before --store $w/i import $tar -t b --compression zstd" \
  "$after --store $w/i import $tar -t b --compression zstd"

echo "| what | before (median) | after (median) | after/before |"
echo "|---|---|---|---|"
row() {
  local b a
  b=$(median "$1" 0) a=$(median "$1" 1)
  awk -v n="$2" -v b="$b" -v a="$a" -v u="$3" -v s="$4" \
    'BEGIN { printf "| %s | %.*f %s | %.*f %s | %.2f |\n", n, 1, b*s, u, 1, a*s, u, a/b }'
}
row run "\`kiln run bb /bin/true\`" ms 1000
row gzip "\`kiln import\` buildd.tar (gzip)" s 1
row zstd "\`kiln import --compression zstd\` buildd.tar" s 1
