#!/usr/bin/env bash
# kiln run --vm against vmtest, in the same run, hyperfine medians:
#   boot + `true` + power off + clean up, TCG, the host's Debian kernel
#   (kiln: the busybox image; vmtest: the host's root over 9p);
#   kiln's --timings breakdown (median of each step);
#   the file-system path in the guest: `tar -cf /dev/null /usr` of the
#   buildd image with the root kiln uses (an ext4 image of the tree behind
#   a qcow2 copy-on-write disk) against the tree over 9p
#   (KILN_VM_ROOTFS=9p: read-only, cache=loose, under an overlay in guest
#   memory) and over virtiofs (KILN_VM_ROOTFS=virtiofs, the same way), and
#   the same tar in the namespace backend for scale.
# Peers: vmtest 0.18 (`cargo install vmtest --version 0.18.0 --root
# /opt/vmtest`), which needs 9p and virtio built into its kernel: Debian
# ships them as modules, so scripts/bench/vmtest-initrd.sh gives it a
# static-busybox initramfs that loads them (busybox-static), and
# scripts/bench/qemu-tcg turns its -enable-kvm into TCG; vmtest runs
# qemu-ga from the host (qemu-guest-agent).
#
#   scripts/bench/vm.sh [RUNS]        (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-10}
export PATH="$HOME/.cargo/bin:$PATH"
kiln=$PWD/target/x86_64-unknown-linux-gnu/release/kiln
[ -x "$kiln" ] || cargo build --release --quiet
vmtest=${VMTEST:-/opt/vmtest/bin/vmtest}
[ -x "$vmtest" ] || { echo "vm.sh: no vmtest at $vmtest (cargo install vmtest --version 0.18.0 --locked --root /opt/vmtest)" >&2; exit 1; }
for t in hyperfine jq qemu-ga busybox cpio; do
  command -v "$t" >/dev/null || { echo "vm.sh: $t is missing (apt-get install hyperfine jq qemu-guest-agent busybox-static cpio)" >&2; exit 1; }
done
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -1)
release=${kernel#/boot/vmlinuz-}
tar=${KILN_BUILDD_TAR:-/var/cache/kiln-ci/buildd.tar}
scripts/make-buildd-tar.sh "$tar" >/dev/null
w=$(mktemp -d /tmp/kiln-bench-vm.XXXXXX)
trap 'rm -rf "$w"' EXIT
export KILN_VM_ACCEL=tcg

images/busybox/build.sh "$w/bb.tar"
"$kiln" --store "$w/s" import "$w/bb.tar" -t bb >/dev/null
"$kiln" --store "$w/s" import "$tar" -t buildd >/dev/null
"$kiln" --store "$w/s" run --vm bb true # kernel and initramfs made once
"$kiln" --store "$w/s" run --vm buildd true

mkdir -p "$w/vmtest/bin"
scripts/bench/vmtest-initrd.sh "$w/vmtest/initrd.cpio" "$release"
ln -s "$PWD/scripts/bench/qemu-tcg" "$w/vmtest/bin/qemu-system-x86_64"
cat >"$w/vmtest/vmtest.toml" <<TOML
[[target]]
name = "true"
kernel = "$kernel"
command = "true"
[target.vm]
num_cpus = 1
memory = "1G"
extra_args = ["-initrd", "$w/vmtest/initrd.cpio"]
TOML
vmtest_cmd="env PATH=$w/vmtest/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin $vmtest -c $w/vmtest/vmtest.toml"
$vmtest_cmd >/dev/null 2>&1 || { echo "vm.sh: vmtest does not run here:" >&2; $vmtest_cmd >&2; exit 1; }

hyperfine --style none -N --runs "$runs" --warmup 1 --export-json "$w/boot.json" \
  "$kiln --store $w/s run --vm bb true" "$vmtest_cmd" >/dev/null
median() { jq -r ".results[$2].median" "$w/$1.json"; }
k=$(median boot 0); v=$(median boot 1)

# --timings: the median of each step over the runs.
for i in $(seq "$runs"); do
  "$kiln" --store "$w/s" run --vm --timings --json-status "$w/t$i.json" bb true 2>/dev/null
done
steps=$(jq -s -r '
  [.[].timings] | transpose | map({step: .[0].step, ms: (map(.ms) | sort | .[length/2|floor])})
  | map("\(.step) \(.ms|floor) ms") | join(", ")' "$w"/t*.json)

hyperfine --style none -N --runs "$(( runs / 2 > 3 ? runs / 2 : 3 ))" --warmup 1 --export-json "$w/tar.json" \
  "$kiln --store $w/s run --vm buildd tar -cf /dev/null /usr" \
  "env KILN_VM_ROOTFS=9p $kiln --store $w/s run --vm buildd tar -cf /dev/null /usr" \
  "$kiln --store $w/s run buildd tar -cf /dev/null /usr" \
  "env KILN_VM_ROOTFS=virtiofs $kiln --store $w/s run --vm buildd tar -cf /dev/null /usr" >/dev/null
tv=$(median tar 0); t9=$(median tar 1); tn=$(median tar 2); tf=$(median tar 3)

# What TCG is for: a real build, correct and isolated, not fast. The C
# project of scripts/bench/run.sh (300 files), bound in (virtiofs).
proj=$w/proj
scripts/bench/c-project.sh "$proj"
hyperfine --style none -N --runs 3 --prepare "make -s -C $proj clean" --export-json "$w/build.json" \
  "$kiln --store $w/s run --vm --cpus 2 -v $proj:/src -w /src buildd make -s -j2" \
  "$kiln --store $w/s run -v $proj:/src -w /src buildd make -s -j2" >/dev/null
bv=$(median build 0); bn=$(median build 1)

# Binds: virtiofs (the default where virtiofsd is installed) against 9p,
# a metadata-heavy pass over the project (stat every file, read every one).
walk="sh -c 'ls -lR /src >/dev/null; cat /src/*/*.c /src/*.c >/dev/null 2>&1; true'"
hyperfine --style none -N --runs "$(( runs / 2 > 3 ? runs / 2 : 3 ))" --warmup 1 --export-json "$w/binds.json" \
  "$kiln --store $w/s run --vm -v $proj:/src buildd $walk" \
  "env KILN_VM_BINDS=9p $kiln --store $w/s run --vm -v $proj:/src buildd $walk" >/dev/null
fv=$(median binds 0); f9=$(median binds 1)

printf '| what (TCG, %s, median of %s) | kiln | peer | ratio |\n|---|---|---|---|\n' "$release" "$runs"
awk -v k="$k" -v v="$v" 'BEGIN { printf "| `kiln run --vm busybox true` vs vmtest `true` | %.2f s | %.2f s | %.2fx |\n", k, v, k / v }'
awk -v a="$tv" -v b="$t9" 'BEGIN { printf "| `run --vm buildd tar -cf /dev/null /usr`: ext4 image root vs the tree over 9p | %.2f s | %.2f s | %.2fx |\n", a, b, a / b }'
awk -v a="$tv" -v b="$tf" 'BEGIN { printf "| the same tar: ext4 image root vs the tree over virtiofs | %.2f s | %.2f s | %.2fx |\n", a, b, a / b }'
awk -v a="$tv" -v b="$tn" 'BEGIN { printf "| the same tar: --vm (ext4 image) vs the namespace backend | %.2f s | %.2f s | %.2fx |\n", a, b, a / b }'
awk -v a="$bv" -v b="$bn" 'BEGIN { printf "| C build, 300 files, `make -j2`: --vm --cpus 2 vs the namespace backend (3 runs) | %.1f s | %.1f s | %.1fx |\n", a, b, a / b }'
awk -v a="$fv" -v b="$f9" 'BEGIN { printf "| a bind of the C project, `ls -lR` + `cat` of every file, whole run: virtiofs vs 9p | %.2f s | %.2f s | %.2fx |\n", a, b, a / b }'
echo
echo "kiln run --vm --timings (medians): $steps"
