#!/usr/bin/env bash
# make.sh - regenerate the crafted bad images in this directory (committed;
# tests/disk_bad_images.rs opens each with the reader its name prefix names
# and expects a clean error, never a panic or a hang).
#
# Each image starts as a small valid one made by the real tool (qemu-img,
# sfdisk, xorriso, mke2fs + debugfs, gzip, tar) or by perl's pack, and is then
# damaged at one documented spot with perl.  Every file stays under 64 KiB.
# Runs unprivileged; needs qemu-utils, fdisk, xorriso, e2fsprogs, gzip,
# tar, perl.
set -euo pipefail
cd "$(dirname "$0")"
PATH="$PATH:/usr/sbin:/sbin"
for t in qemu-img qemu-io sfdisk xorriso mke2fs debugfs gzip tar sha1sum perl; do
    command -v "$t" >/dev/null || { echo "make.sh: missing tool: $t" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/kiln-bad.XXXXXX")
trap 'rm -rf "$work"' EXIT
rm -rf ./*.vhd ./*.qcow2 ./*.img ./*.iso ./*.gz ./*.xva ./chunks-*/

# patch FILE OFFSET PACK-TEMPLATE VALUE...: overwrite bytes at OFFSET.
patch() {
    perl -e 'my ($f, $at, $tpl, @v) = @ARGV;
             open(my $h, "+<", $f) or die "$f: $!"; binmode $h;
             seek($h, $at, 0) or die; print $h pack($tpl, @v); close $h or die;' "$@"
}

# --- VHD -----------------------------------------------------------------------
# A dynamic VHD with 4 KiB blocks (qemu's are 2 MiB, too big to commit):
# footer copy, dynamic header at 512, BAT at 1536 (blocks 1 and 3 allocated),
# two blocks (512-byte bitmap + data), footer.  $1: BAT entry of block 3.
vhd_dynamic() {
    perl -e '
    use strict;
    sub csum { my ($b, $at) = @_; my $s = 0; $s += $_ for unpack("C*", $b);
               substr($b, $at, 4) = pack("N", ~$s & 0xffffffff); $b }
    sub footer { my ($size) = @_;
        my $f = pack("a8 N N Q> N a4 N a4 Q> Q> N N N a16 C", "conectix", 2, 0x10000,
                     512, 0, "kiln", 0x10000, "Wi2k", $size, $size,
                     (16 << 16) | (4 << 8) | 17, 3, 0, "\x07" x 16, 0);
        csum(pack("a512", $f), 64) }
    my ($bs, $size) = (4096, 4 * 4096);
    my $img = footer($size);
    my $h = pack("a8 Q> Q> N N N N a16", "cxsparse", 0xffffffffffffffff,
                 1536, 0x10000, 4, $bs, 0, "\x09" x 16);
    $img .= csum(pack("a1024", $h), 36);
    $img .= pack("a512", pack("N4", 0xffffffff, 4, 0xffffffff, $ARGV[0]) . "\xff" x 496);
    $img .= pack("a512", "\xff") . chr($_) x $bs for (0x11, 0x33);
    $img .= footer($size);
    print $img;' "$1"
}
# BAT entry 3 (at byte 1548) points at sector 100000: past the end of the file.
vhd_dynamic 100000 > vhd-bat-past-eof.vhd
# A fixed VHD whose last 200 bytes (most of the footer) are cut off.
head -c 16384 /dev/zero | tr '\0' 'v' > "$work/v.raw"
qemu-img convert -f raw -O vpc -o subformat=fixed,force_size=on "$work/v.raw" "$work/fixed.vhd"
head -c $(( $(stat -c %s "$work/fixed.vhd") - 200 )) "$work/fixed.vhd" > vhd-truncated-footer.vhd

# --- qcow2 -----------------------------------------------------------------------
# 512-byte clusters, a few written: L1 at a small offset.
qemu-img create -q -f qcow2 -o cluster_size=512 "$work/q.qcow2" 64K
qemu-io -f qcow2 -c 'write -P 0x41 0 1536' -c 'write -P 0x7 32768 512' "$work/q.qcow2" >/dev/null
# l1_table_offset (header byte 40) far past the end of the 5 KiB file.
cp "$work/q.qcow2" qcow2-l1-past-eof.qcow2
patch qcow2-l1-past-eof.qcow2 40 'Q>' $(( 1 << 40 ))
# size (header byte 24): 2^62 bytes, an absurd disk.
cp "$work/q.qcow2" qcow2-absurd-size.qcow2
patch qcow2-absurd-size.qcow2 24 'Q>' $(( 1 << 62 ))
# The first L1 entry points at an L2 table past the end of the file.
cp "$work/q.qcow2" qcow2-l2-past-eof.qcow2
l1=$(perl -e 'open(my $h, "<", $ARGV[0]) or die; binmode $h; seek($h, 40, 0);
              read($h, my $b, 8); print unpack("Q>", $b)' "$work/q.qcow2")
patch qcow2-l2-past-eof.qcow2 "$l1" 'Q>' $(( (1 << 63) | (1 << 30) ))

# --- MBR / GPT ---------------------------------------------------------------------
truncate -s 60K "$work/mbr.img"
sfdisk -q --no-reread --no-tell-kernel "$work/mbr.img" >/dev/null <<'EOF'
label: dos
unit: sectors

start=4, size=20, type=83
start=24, size=60, type=5
start=28, size=10, type=83
start=40, size=10, type=83
EOF
# The second EBR's link (its entry 2) points back at the first EBR (relative
# LBA 0 of the extended partition): a cyclic chain.
cp "$work/mbr.img" mbr-ebr-loop.img
perl -e '
    open(my $h, "+<", $ARGV[0]) or die; binmode $h;
    sub rd { my ($at, $n) = @_; seek($h, $at, 0); read($h, my $b, $n); $b }
    my $ext = unpack("V", rd(446 + 16 + 8, 4));             # entry 2 of the MBR
    my $next = unpack("V", rd($ext * 512 + 446 + 16 + 8, 4)); # EBR 1 -> EBR 2
    $next or die "no second EBR";
    seek($h, ($ext + $next) * 512 + 446 + 16, 0);
    print $h pack("C4 C C3 V V", 0, 0, 0, 0, 5, 0, 0, 0, 0, 24);
    close $h;' mbr-ebr-loop.img
truncate -s 60K "$work/gpt.img"
sfdisk -q --no-reread --no-tell-kernel "$work/gpt.img" >/dev/null <<'EOF'
label: gpt
unit: sectors
first-lba: 34

start=34, size=20, type=L, name=root
EOF
# One byte of each header (primary at LBA 1, backup at the last LBA) is
# changed after its CRC: neither header is usable.
cp "$work/gpt.img" gpt-bad-crcs.img
patch gpt-bad-crcs.img $(( 512 + 0x50 )) 'V' 129                  # entry count
patch gpt-bad-crcs.img $(( 61440 - 512 + 0x50 )) 'V' 129

# --- ISO 9660 ------------------------------------------------------------------------
mkdir -p "$work/tree/d/sub"
# (No regular file: xorriso puts file data after a run of zero sectors.)
ln -s "/$(printf 'component-of-a-long-symlink-target/%.0s' $(seq 12))end" "$work/tree/far"
xorriso -as mkisofs -quiet -no-pad -R -V BAD -o "$work/rr.iso" "$work/tree" 2>/dev/null
# xorriso leaves trailing all-zero sectors (33 in all): cut them and shrink
# the volume space size (PVD bytes 80..88, both-endian) to match, so the
# images stay under 64 KiB.
perl -e '
    open(my $h, "+<", $ARGV[0]) or die; binmode $h; local $/; my $img = <$h>;
    my $n = length($img) / 2048;
    $n-- while $n > 17 && substr($img, ($n - 1) * 2048, 2048) =~ /^\0*$/;
    seek($h, 0x8000 + 80, 0); print $h pack("V N", $n, $n);
    truncate($h, $n * 2048) or die; close $h;' "$work/rr.iso"
# Directory "D/SUB" (its record in D's extent) is pointed at the root
# directory's extent: a loop back to an ancestor.
cp "$work/rr.iso" iso-dir-loop.iso
perl -e '
    open(my $h, "+<", $ARGV[0]) or die; binmode $h;
    sub rd { my ($at, $n) = @_; seek($h, $at, 0); read($h, my $b, $n); $b }
    my $root = unpack("V", rd(0x8000 + 156 + 2, 4));
    # Find the record named $want among the directory at LBA $lba.
    sub find { my ($lba, $want) = @_;
        my $dir = rd($lba * 2048, 2048);
        my $at = 0;
        while ($at < 2048) {
            my $len = ord(substr($dir, $at, 1)); last if !$len;
            my $nl = ord(substr($dir, $at + 32, 1));
            my $name = substr($dir, $at + 33, $nl);
            return ($lba * 2048 + $at, unpack("V", substr($dir, $at + 2, 4))) if $name eq $want;
            $at += $len;
        }
        die "no $want";
    }
    my (undef, $d) = find($root, "D");
    my ($rec) = find($d, "SUB");
    seek($h, $rec + 2, 0); print $h pack("V N", $root, $root);
    close $h;' iso-dir-loop.iso
# The symlink's Rock Ridge data continues in a CE area; the first entry of
# that area becomes a CE pointing at the area itself: a continuation loop.
cp "$work/rr.iso" iso-ce-loop.iso
perl -e '
    open(my $h, "+<", $ARGV[0]) or die; binmode $h;
    local $/; my $img = <$h>;
    # A CE entry: "CE", length 28, version 1, then block, offset and length,
    # each as both-endian 32-bit numbers.
    $img =~ /CE\x1c\x01(.{4}).{4}(.{4}).{4}(.{4}).{4}/s or die "no CE entry";
    my ($blk, $off, $len) = (unpack("V", $1), unpack("V", $2), unpack("V", $3));
    seek($h, $blk * 2048 + $off, 0);
    print $h "CE\x1c\x01" . pack("V N V N V N", $blk, $blk, $off, $off, $len, $len);
    close $h;' iso-ce-loop.iso
# The primary volume descriptor claims a root directory far past the end.
cp "$work/rr.iso" iso-root-past-eof.iso
patch iso-root-past-eof.iso $(( 0x8000 + 156 + 2 )) 'V N' 999999 999999

# --- ext4 ------------------------------------------------------------------------------
mkdir -p "$work/etree/a/b"
echo data > "$work/etree/a/b/f"
head -c 5000 /dev/zero | tr '\0' 'e' > "$work/etree/file"
mkext() { truncate -s 60K "$1"
         mke2fs -q -F -t ext4 -b 1024 -N 16 -U 4b494c4e-0000-4000-8000-00000000000e \
             -E hash_seed=4b494c4e-0000-4000-8000-00000000000f -d "$work/etree" "$1" >/dev/null 2>&1; }
# /a/b/up is a second name of /a (debugfs ln makes any link, even to a
# directory): a directory cycle.
mkext ext4-dir-cycle.img
debugfs -w -R "ln /a /a/b/up" ext4-dir-cycle.img >/dev/null 2>&1
# /file's extent header (the start of i_block) claims depth 0x7fff.
mkext ext4-extent-depth.img
debugfs -w -R "sif /file block[1] $(( (0x7fff << 16) | 4 ))" ext4-extent-depth.img >/dev/null 2>&1
# /file's only extent (depth 0) points at a block past the end of the
# file system.
mkext ext4-extent-past-end.img
debugfs -w -R "sif /file block[5] 9999999" ext4-extent-past-end.img >/dev/null 2>&1

# --- chunked streams -----------------------------------------------------------------------
# Chunks 0 and 2 with no chunk 1.
mkdir chunks-gap
seq 1 1000 | gzip -n > chunks-gap/chunk-000000000.gz
seq 1001 2000 | gzip -n > chunks-gap/chunk-000000002.gz
# A gzip bomb: 48 KiB that inflate to 48 MiB of zeros (the test opens it with
# a 16 MiB limit).
head -c $(( 48 << 20 )) /dev/zero | gzip -n -9 > chunks-bomb.gz
# A chunk cut short in the middle of its deflate data.
seq 1 20000 | gzip -n > "$work/c.gz"
head -c 4000 "$work/c.gz" > chunks-truncated.gz

# --- XVA -------------------------------------------------------------------------------------
xv=$work/xva
mkdir -p "$xv/Ref:1"
head -c 4096 /dev/zero | tr '\0' 'x' > "$xv/Ref:1/00000000"
sha1sum "$xv/Ref:1/00000000" | cut -d' ' -f1 | tr -d '\n' > "$xv/Ref:1/00000000.checksum"
cat > "$xv/ova.xml" <<'EOF'
<?xml version="1.0" ?>
<value><struct>
<member><name>objects</name><value><array><data>
<value><struct>
  <member><name>class</name><value>VDI</value></member>
  <member><name>id</name><value>Ref:1</value></member>
  <member><name>snapshot</name><value><struct>
    <member><name>virtual_size</name><value>4096</value></member>
  </struct></value></member>
</struct></value>
</data></array></value></member>
</struct></value>
EOF
tar --format=gnu --numeric-owner --owner=0 --group=0 --mtime=@0 -C "$xv" -cf "$work/x.xva" ova.xml
tar --format=gnu --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$xv" \
    -rf "$work/x.xva" Ref:1
# One byte of block 0's data changed: its SHA-1 no longer matches.
cp "$work/x.xva" xva-bad-checksum.xva
perl -e '
    open(my $h, "+<", $ARGV[0]) or die; binmode $h; local $/; my $t = <$h>;
    my $at = index($t, "Ref:1/00000000\0"); $at >= 0 or die;
    seek($h, $at + 512 + 100, 0); print $h "y"; close $h;' xva-bad-checksum.xva
# The export cut off in the middle of the block (its tar header says 4096
# bytes).
perl -e '
    open(my $h, "<", $ARGV[0]) or die; binmode $h; local $/; my $t = <$h>;
    my $at = index($t, "Ref:1/00000000\0"); $at >= 0 or die;
    print substr($t, 0, $at + 512 + 1000);' "$work/x.xva" > xva-truncated.xva

ls -l
for f in *; do
    [ -f "$f" ] || continue
    [ "$(stat -c %s "$f")" -lt 65536 ] || { echo "make.sh: $f is 64 KiB or more" >&2; exit 1; }
done
