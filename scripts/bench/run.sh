#!/usr/bin/env bash
# Run benchmark (issue: kiln run). Side by side in one run, hyperfine medians:
#   kiln run bb /bin/true (cached image)  vs  bwrap --unshare-all --die-with-parent on the same rootfs
#     (also with --upper disk: a run directory in the store instead of a tmpfs)
#                                         vs  podman run --rm --network none (with this host's work-arounds)
#   kiln run on the 445 MB buildd image   vs  kiln run on busybox (start-up must not grow with image size)
#   a C build of 300 files inside kiln    vs  the same build on the host
# and the peak RSS of kiln during a run. Prints a markdown table.
#
#   scripts/bench/run.sh [RUNS]     (default 10; run as root for podman)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-10}
export PATH="$HOME/.cargo/bin:$PATH"
tar=${KILN_BUILDD_TAR:-/var/cache/kiln-ci/buildd.tar}
scripts/make-buildd-tar.sh "$tar" >/dev/null
cargo build --release --quiet
kiln=$PWD/target/x86_64-unknown-linux-gnu/release/kiln
w=$(mktemp -d /tmp/kiln-bench-run.XXXXXX)
trap 'rm -rf "$w"' EXIT
export KILN_HOME=$w/store
images/busybox/build.sh "$w/bb.tar"
$kiln import "$w/bb.tar" -t bb >/dev/null
$kiln import "$tar" -t buildd >/dev/null
$kiln run bb true && $kiln run buildd true
rootfs=$($kiln rootfs bb)

hf() { local name=$1; shift; hyperfine --style none -N --runs "$runs" --warmup 2 --export-json "$w/$name.json" "$@" >/dev/null; }
hf kiln "$kiln run bb /bin/true"
hf kiln-disk "$kiln run --upper disk bb /bin/true"
hf bwrap "bwrap --unshare-all --die-with-parent --ro-bind $rootfs / --proc /proc --dev /dev /bin/true"
hf kiln-buildd "$kiln run buildd /bin/true"
podman_ok=0
if [ "$(id -u)" = 0 ] && command -v podman >/dev/null; then
  P="podman --root $w/proot --runroot $w/prun --storage-driver vfs --events-backend none"
  $kiln export bb -o "$w/bb-docker.tar" --format docker-archive
  $P load -q -i "$w/bb-docker.tar" >/dev/null
  lim="--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
  cat >"$w/podman-true" <<SH
#!/bin/sh
exec unshare -m sh -c 'mount -t tmpfs none /sys/fs/cgroup/unified 2>/dev/null; exec $P run --rm --network none --cgroups=disabled $lim localhost/bb:latest /bin/true'
SH
  chmod +x "$w/podman-true"
  hf podman "$w/podman-true"
  podman_ok=1
fi

# The rootless case users run: an unprivileged user with a subuid range
# (newuidmap/newgidmap), and the same user with --userns self.
rootless_ok=0
if [ "$(id -u)" = 0 ] && id -u kiln-sub >/dev/null 2>&1 && grep -q '^kiln-sub:' /etc/subuid; then
  chmod 0755 "$w"
  mkdir "$w/u"
  cp "$kiln" "$w/u/kiln"
  cp "$w/bb.tar" "$w/u/bb.tar"
  chown -R kiln-sub: "$w/u"
  u() { runuser -u kiln-sub -- env HOME="$w/u" KILN_HOME="$w/u/store" PATH="$PATH" "$@"; }
  u "$w/u/kiln" import "$w/u/bb.tar" -t bb >/dev/null
  u "$w/u/kiln" run bb true
  urootfs=$(u "$w/u/kiln" rootfs bb)
  uhf() { local name=$1; shift; u hyperfine --style none -N --runs "$runs" --warmup 2 --export-json "$w/u/$name.json" "$@" >/dev/null; }
  uhf kiln-sub "$w/u/kiln run bb /bin/true"
  uhf kiln-self "$w/u/kiln run --userns self bb /bin/true"
  uhf bwrap-sub "bwrap --unshare-all --die-with-parent --ro-bind $urootfs / --proc /proc --dev /dev /bin/true"
  cp "$w"/u/*.json "$w/"
  rootless_ok=1
fi

# A C project of 300 files, built inside the buildd image and on the host.
proj=$w/proj
scripts/bench/c-project.sh "$proj"
chmod -R a+rwX "$proj"
hyperfine --style none --runs 5 --warmup 1 --prepare "make -s -C $proj clean" --export-json "$w/build-kiln.json" \
  "$kiln run -v $proj:/src -w /src buildd make -s -j2" >/dev/null
hyperfine --style none --runs 5 --warmup 1 --prepare "make -s -C $proj clean" --export-json "$w/build-host.json" \
  "make -s -C $proj -j2" >/dev/null

rss=$(/usr/bin/time -f %M "$kiln" run bb /bin/true 2>&1 >/dev/null | tail -n1)
python3 - "$w" "$runs" "$podman_ok" "$rss" "$rootless_ok" <<'PY'
import json, sys
w, runs, podman_ok, rss, rootless_ok = sys.argv[1:]
m = lambda n: json.load(open(f"{w}/{n}.json"))["results"][0]["median"]
rows = [
    ("`kiln run bb /bin/true`", m("kiln"), "`bwrap --unshare-all --die-with-parent` (same rootfs)", m("bwrap"), "<= 1.2"),
    ("`kiln run --upper disk bb /bin/true`", m("kiln-disk"), "`bwrap --unshare-all --die-with-parent` (same rootfs)", m("bwrap"), "(<= 1.2)"),
]
if rootless_ok == "1":
    rows += [
        ("`kiln run bb /bin/true`, a user with a subuid range", m("kiln-sub"), "`bwrap --unshare-all --die-with-parent`, the same user", m("bwrap-sub"), "<= 1.2"),
        ("`kiln run --userns self bb /bin/true`, the same user", m("kiln-self"), "`bwrap --unshare-all --die-with-parent`, the same user", m("bwrap-sub"), "<= 1.2"),
    ]
if podman_ok == "1":
    rows.append(("`kiln run bb /bin/true`", m("kiln"), "`podman run --rm --network none`", m("podman"), "< 0.1"))
rows += [
    ("`kiln run buildd /bin/true` (445 MB image)", m("kiln-buildd"), "`kiln run bb /bin/true` (2 MB image)", m("kiln"), "<= 1.2"),
    ("C build, 300 files, `make -j2` in kiln", m("build-kiln"), "the same build on the host", m("build-host"), "<= 1.05"),
]
print(f"Medians of {runs} runs (builds: 5), hyperfine, same machine, same run.\n")
print("| kiln | median | peer | median | ratio | target |")
print("|---|---:|---|---:|---:|---|")
for a, ta, b, tb, t in rows:
    fa = f"{ta*1000:.1f} ms" if ta < 1 else f"{ta:.2f} s"
    fb = f"{tb*1000:.1f} ms" if tb < 1 else f"{tb:.2f} s"
    print(f"| {a} | {fa} | {b} | {fb} | {ta/tb:.2f}x | {t} |")
print(f"\nPeak RSS of the kiln processes during `kiln run bb /bin/true`: {int(rss)/1024:.1f} MiB (target < 10 MiB).")
PY
