#!/usr/bin/env bash
# Disk-image import benchmark (issue: vendor disk images). Side by side, same
# run, hyperfine medians:
#   kiln import BUILDD-DDK.iso, rootless (as an unprivileged user when one
#   exists, else the caller)
#   vs the manual root recipe: xorriso -osirrox extract of the chunks, zcat
#   into a .vhd, qemu-img convert to raw, losetup -P (+ partx -a), mount,
#   tar | gzip -1 (a cheaper stand-in for `docker import`'s layer write),
#   umount, losetup -d.
# and kiln's peak RSS. Prints a markdown table. Run as root (the recipe
# needs loop devices and mount).
#
#   scripts/bench/disk.sh [RUNS]     (default 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-3}
[ "$(id -u)" = 0 ] || { echo "bench/disk: run as root (the manual recipe mounts)" >&2; exit 1; }
export PATH="$HOME/.cargo/bin:$PATH"
iso=${KILN_BUILDD_ISO:-/var/cache/kiln-ci/buildd-ddk.iso}
scripts/make-buildd-iso.sh "$iso" >/dev/null
cargo build --release --quiet
w=$(mktemp -d /tmp/kiln-bench-disk.XXXXXX)
chmod 0755 "$w"
trap 'umount "$w/mnt" 2>/dev/null || true; rm -rf "$w"' EXIT
cp target/x86_64-unknown-linux-gnu/release/kiln "$w/kiln"
chmod 0755 "$w/kiln"
user=""
id -u kiln-sub >/dev/null 2>&1 && user=kiln-sub
as_user() { if [ -n "$user" ]; then runuser -u "$user" -- "$@"; else "$@"; fi; }
mkdir -p "$w/store" && [ -n "$user" ] && chown "$user" "$w/store"

cat >"$w/recipe.sh" <<SH
#!/usr/bin/env bash
set -euo pipefail
d=$w/recipe
rm -rf "\$d"; mkdir -p "\$d/mnt"
xorriso -osirrox on -indev "$iso" -extract /ddk "\$d/ddk" >/dev/null 2>&1
zcat "\$d"/ddk/xvda/chunk-*.gz > "\$d/xvda.vhd"
qemu-img convert -f vpc -O raw "\$d/xvda.vhd" "\$d/xvda.raw"
dev=\$(losetup -P --show -f "\$d/xvda.raw")
partx -a "\$dev" 2>/dev/null || true
mount -o ro "\${dev}p1" "\$d/mnt"
tar -C "\$d/mnt" --numeric-owner -cf - . | gzip -1 > "\$d/layer.tar.gz"
umount "\$d/mnt"
losetup -d "\$dev"
rm -rf "\$d"
SH
chmod +x "$w/recipe.sh"

hyperfine --style none --runs "$runs" --warmup 1 --export-json "$w/kiln.json" \
  --prepare "rm -rf $w/store/* $w/store/.kiln 2>/dev/null || true" \
  "${user:+runuser -u $user -- }$w/kiln --store $w/store import $iso -t ddk" >/dev/null
hyperfine --style none --runs "$runs" --warmup 1 --export-json "$w/recipe.json" \
  "$w/recipe.sh" >/dev/null
rm -rf "$w/store"/* "$w/store"/.kiln 2>/dev/null || true
rss=$(as_user /usr/bin/time -f %M "$w/kiln" --store "$w/store" import "$iso" -t ddk 2>&1 >/dev/null | tail -n1)
python3 - "$w" "$rss" "$user" <<'PY'
import json, sys
w, rss, user = sys.argv[1], int(sys.argv[2]), sys.argv[3]
med = lambda n: json.load(open(f"{w}/{n}.json"))["results"][0]["median"]
k, r = med("kiln"), med("recipe")
who = f"as {user}" if user else "as the caller"
print("| comparison | kiln | peer | ratio | target |")
print("|---|---:|---:|---:|---|")
print(f"| buildd DDK ISO to an OCI image ({who}) vs manual root recipe | {k:.2f} s | {r:.2f} s | {k/r:.2f}x | <= 0.4 |")
print(f"\nPeak RSS of kiln import: {rss/1024:.0f} MiB (target < 256 MiB).")
PY
