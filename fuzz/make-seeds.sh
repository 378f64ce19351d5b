#!/usr/bin/env bash
# make-seeds.sh OUTDIR - small valid images, one directory per fuzz target
# (OUTDIR/iso9660, OUTDIR/chunks, ...), made with the real tools where they
# can make small ones (xorriso, mke2fs -d, sfdisk, qemu-img/qemu-io, gzip,
# tar) and with perl's pack where they cannot (a dynamic VHD with 4 KiB
# blocks: qemu's are 2 MiB).  Nothing here is committed: scripts/fuzz.sh
# makes them at fuzz time.  Works unprivileged.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
out=$1
PATH="$PATH:/usr/sbin:/sbin"
for t in xorriso mke2fs sfdisk qemu-img qemu-io gzip tar sha1sum perl; do
    command -v "$t" >/dev/null || { echo "make-seeds: missing tool: $t" >&2; exit 1; }
done
mkdir -p "$out"/{iso9660,chunks,xva,vhd,qcow2,part,ext}
work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-seeds.XXXXXX")
trap 'rm -rf "$work"' EXIT

# A small tree: nested dirs, a symlink, a long name, a 3 KB file.
tree=$work/tree
mkdir -p "$tree/d/e"
echo hello > "$tree/d/e/f"
ln -s ../d "$tree/link"
ln -s "/$(printf 'long-target-%.0s' 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20)" "$tree/far"
echo x > "$tree/$(printf 'name%.0s' $(seq 40))"
head -c 3000 /dev/zero | tr '\0' 'x' > "$tree/big"
mkfifo "$tree/fifo"

# --- iso9660: Rock Ridge + Joliet, Joliet only, plain --------------------------
x() { xorriso -as mkisofs -quiet -no-pad "$@" 2>/dev/null; }
x -R -J -V RR -o "$out/iso9660/rr.iso" "$tree"
x --norock -J -V JOLIET -o "$out/iso9660/joliet.iso" "$tree"
x --norock -V PLAIN -o "$out/iso9660/plain.iso" "$tree"

# --- ext: ext2, ext4 (extents, csums, no journal: too small), inline data,
#     ext4 without extents (indirect blocks) ---------------------------------
e() { local n=$1 size=$2; shift 2
      truncate -s "$size" "$out/ext/$n.img"
      mke2fs -q -F -b 1024 -N 32 -d "$tree" "$@" "$out/ext/$n.img" >/dev/null 2>&1; }
e ext2 64K -t ext2
e ext4 128K -t ext4
e inline 128K -t ext4 -O inline_data
e noext 128K -t ext4 -O ^extent,^64bit

# --- part: MBR with logicals, GPT (names, attributes) -------------------------
truncate -s 64K "$out/part/mbr.img"
sfdisk -q --no-reread --no-tell-kernel "$out/part/mbr.img" >/dev/null <<'EOF'
label: dos
unit: sectors

start=4, size=20, type=83, bootable
start=24, size=60, type=5
start=28, size=10, type=83
start=40, size=10, type=82
start=90, size=30, type=c
EOF
truncate -s 64K "$out/part/gpt.img"
sfdisk -q --no-reread --no-tell-kernel "$out/part/gpt.img" >/dev/null <<'EOF'
label: gpt
unit: sectors
first-lba: 34

start=34, size=20, type=L, name=root
start=54, size=20, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, attrs=LegacyBIOSBootable
EOF

# --- qcow2: 512-byte clusters (data, zero clusters), compressed (deflate and
#     zstd), version 2, an overlay over a backing file ---------------------
head -c 8192 /dev/urandom > "$work/r.raw"
truncate -s 64K "$work/r.raw"
q=$out/qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 "$q/small.qcow2" 64K
qemu-io -f qcow2 -c 'write -P 0x41 0 1536' -c 'write -z 4096 1024' \
    -c 'write -P 0x7 32768 512' "$q/small.qcow2" >/dev/null
qemu-img convert -f raw -O qcow2 -c -o cluster_size=4096 "$work/r.raw" "$q/deflate.qcow2"
qemu-img convert -f raw -O qcow2 -c -o cluster_size=4096,compression_type=zstd \
    "$work/r.raw" "$q/zstd.qcow2" 2>/dev/null || true
qemu-img create -q -f qcow2 -o cluster_size=512,compat=0.10 "$q/v2.qcow2" 16K
qemu-img create -q -f qcow2 -o cluster_size=512 -b "$q/small.qcow2" -F qcow2 "$q/overlay.qcow2"
qemu-io -f qcow2 -c 'write -P 0x42 512 512' "$q/overlay.qcow2" >/dev/null

# --- vhd: fixed (qemu-img), empty dynamic (qemu-img), and a dynamic and a
#     differencing one with 4 KiB blocks and data (perl) ---------------------
qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$work/r.raw" "$out/vhd/fixed.vhd"
qemu-img create -q -f vpc -o subformat=dynamic "$out/vhd/empty-dynamic.vhd" 1M
perl -e '
use strict;
sub csum { my ($b, $at) = @_; my $s = 0; $s += $_ for unpack("C*", $b);
           substr($b, $at, 4) = pack("N", ~$s & 0xffffffff); $b }
sub footer { my ($type, $size, $dataoff) = @_;
    my $f = pack("a8 N N Q> N a4 N a4 Q> Q> N N N a16 C", "conectix", 2, 0x10000,
                 $dataoff, 0, "kiln", 0x10000, "Wi2k", $size, $size,
                 (16 << 16) | (4 << 8) | 17, $type, 0, "\x07" x 16, 0);
    csum(pack("a512", $f), 64) }
for my $type (3, 4) {
    my ($bs, $size) = (4096, 4 * 4096);
    my $img = footer($type, $size, 512);
    my $h = pack("a8 Q> Q> N N N N a16 N N a512", "cxsparse", 0xffffffffffffffff,
                 1536, 0x10000, 4, $bs, 0, "\x09" x 16, 0, 0,
                 join("", map { pack("n", ord) } split //, "parent.vhd"));
    $img .= csum(pack("a1024", $h), 36);
    # BAT: blocks 1 and 3 allocated (sector numbers of their bitmaps).
    $img .= pack("a512", pack("N4", 0xffffffff, 4, 0xffffffff, 13) . "\xff" x 496);
    for my $fill (0x11, 0x33) {
        $img .= pack("a512", "\xff") . chr($fill) x $bs;
    }
    $img .= footer($type, $size, 512);
    my $name = $type == 3 ? "dynamic4k.vhd" : "differencing4k.vhd";
    open(my $o, ">", "$ARGV[0]/$name") or die; binmode $o; print $o $img; close $o;
}' "$out/vhd"

# --- chunks: a gzip chunk, a multi-member gzip chunk, a zlib chunk --------------
seq 1 3000 > "$work/text"
gzip -n -c "$work/text" > "$out/chunks/one.gz"
{ head -c 5000 "$work/text" | gzip -n -1; tail -c +5001 "$work/text" | gzip -n -9; } \
    > "$out/chunks/members.gz"
if command -v pigz >/dev/null; then pigz -z -c "$work/text" > "$out/chunks/zlib.zz"; fi

# --- xva: ova.xml and Ref:1 blocks of 4 KiB (the first block gives the size;
#     block 1 is omitted: zeros), each with its SHA-1 ------------------------
xv=$work/xva
mkdir -p "$xv/Ref:1"
head -c 4096 "$work/r.raw" > "$xv/Ref:1/00000000"
tail -c 4096 "$work/r.raw" > "$xv/Ref:1/00000002"
for b in 00000000 00000002; do
    sha1sum "$xv/Ref:1/$b" | cut -d' ' -f1 | tr -d '\n' > "$xv/Ref:1/$b.checksum"
done
cat > "$xv/ova.xml" <<'EOF'
<?xml version="1.0" ?>
<value><struct>
<member><name>version</name><value><struct>
  <member><name>export_vsn</name><value>2</value></member>
</struct></value></member>
<member><name>objects</name><value><array><data>
<value><struct>
  <member><name>class</name><value>VDI</value></member>
  <member><name>id</name><value>Ref:1</value></member>
  <member><name>snapshot</name><value><struct>
    <member><name>name_label</name><value>xvda</value></member>
    <member><name>virtual_size</name><value>12288</value></member>
  </struct></value></member>
</struct></value>
</data></array></value></member>
</struct></value>
EOF
tar --format=gnu --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$xv" \
    -cf "$out/xva/small.xva" ova.xml
tar --format=gnu --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$xv" \
    -rf "$out/xva/small.xva" Ref:1

for d in "$out"/*/; do
    echo "make-seeds: $(basename "$d"): $(ls "$d" | wc -l) seed(s), $(du -sk "$d" | cut -f1) KiB" >&2
done
