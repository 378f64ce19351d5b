//! The superblock, feature flags and block group descriptors.

use super::error::ExtError;
use crate::source::disk::ReadAt;

/// Little-endian field readers over a byte slice. Callers pass offsets
/// inside fixed-size structures they have already bounds-checked; a short
/// slice reads as zeros rather than panicking.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// Reads exactly `buf.len()` bytes at `offset`, naming the offset on error.
pub(crate) fn read_exact(dev: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<(), ExtError> {
    dev.read_exact_at(buf, offset)
        .map_err(|source| ExtError::Io { offset, source })
}

// Feature flags (ext4 superblock, "s_feature_*").
pub(crate) const COMPAT_HAS_JOURNAL: u32 = 0x4;

pub(crate) const INCOMPAT_COMPRESSION: u32 = 0x1;
pub(crate) const INCOMPAT_FILETYPE: u32 = 0x2;
pub(crate) const INCOMPAT_RECOVER: u32 = 0x4;
pub(crate) const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
pub(crate) const INCOMPAT_META_BG: u32 = 0x10;
pub(crate) const INCOMPAT_EXTENTS: u32 = 0x40;
pub(crate) const INCOMPAT_64BIT: u32 = 0x80;
pub(crate) const INCOMPAT_MMP: u32 = 0x100;
pub(crate) const INCOMPAT_FLEX_BG: u32 = 0x200;
pub(crate) const INCOMPAT_EA_INODE: u32 = 0x400;
pub(crate) const INCOMPAT_DIRDATA: u32 = 0x1000;
pub(crate) const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub(crate) const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub(crate) const INCOMPAT_INLINE_DATA: u32 = 0x8000;
pub(crate) const INCOMPAT_ENCRYPT: u32 = 0x10000;
pub(crate) const INCOMPAT_CASEFOLD: u32 = 0x20000;

/// What this reader honors. RECOVER (a journal that was not replayed) is
/// accepted: the image is read as it is on disk, like `debugfs` does.
/// CASEFOLD only changes the htree hash, and directories are read linearly.
const INCOMPAT_SUPPORTED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_CASEFOLD;

const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (INCOMPAT_COMPRESSION, "compression"),
    (INCOMPAT_FILETYPE, "filetype"),
    (INCOMPAT_RECOVER, "needs_recovery"),
    (
        INCOMPAT_JOURNAL_DEV,
        "journal_dev (an external journal device, not a file system)",
    ),
    (INCOMPAT_META_BG, "meta_bg"),
    (INCOMPAT_EXTENTS, "extent"),
    (INCOMPAT_64BIT, "64bit"),
    (INCOMPAT_MMP, "mmp"),
    (INCOMPAT_FLEX_BG, "flex_bg"),
    (INCOMPAT_EA_INODE, "ea_inode"),
    (INCOMPAT_DIRDATA, "dirdata"),
    (INCOMPAT_CSUM_SEED, "metadata_csum_seed"),
    (INCOMPAT_LARGEDIR, "large_dir"),
    (INCOMPAT_INLINE_DATA, "inline_data"),
    (INCOMPAT_ENCRYPT, "encrypt"),
    (INCOMPAT_CASEFOLD, "casefold"),
];

pub(crate) const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub(crate) const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub(crate) const RO_COMPAT_GDT_CSUM: u32 = 0x10;
pub(crate) const RO_COMPAT_DIR_NLINK: u32 = 0x20;
pub(crate) const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
pub(crate) const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
pub(crate) const COMPAT_SPARSE_SUPER2: u32 = 0x200;

/// The superblock fields the reader uses.
#[derive(Debug, Clone)]
pub(crate) struct Superblock {
    pub inodes_count: u32,
    pub free_inodes: u32,
    pub blocks_count: u64,
    pub first_data_block: u32,
    pub block_size: u64,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub inode_size: u32,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub label: String,
    pub desc_size: u32,
    pub first_meta_bg: u32,
    pub backup_bgs: [u32; 2],
    pub group_count: u32,
}

/// Identifies well-known non-ext contents, so "xfs is not supported" can be
/// said instead of "bad magic".
pub(crate) fn sniff_other(dev: &dyn ReadAt) -> &'static str {
    let size = dev.size();
    let at = |off: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        (off + len as u64 <= size && dev.read_exact_at(&mut b, off).is_ok()).then_some(b)
    };
    let is = |off: u64, magic: &[u8]| at(off, magic.len()).is_some_and(|b| b == magic);
    if is(0, b"XFSB") {
        "xfs"
    } else if is(0x10040, b"_BHRfS_M") {
        "btrfs"
    } else if is(0, b"hsqs") || is(0, b"sqsh") {
        "squashfs"
    } else if is(1024, &0xF2F5_2010u32.to_le_bytes()) {
        "f2fs"
    } else if is(1024, &0xE0F5_E1E2u32.to_le_bytes()) {
        "erofs"
    } else if is(0x10034, b"ReIsEr") {
        "reiserfs"
    } else if is(0x8000, b"JFS1") {
        "jfs"
    } else if is(0, b"LUKS\xba\xbe") {
        "a LUKS encrypted volume"
    } else if is(0x8001, b"CD001") {
        "an ISO 9660 image"
    } else if is(3, b"NTFS    ") {
        "ntfs"
    } else if is(3, b"EXFAT   ") {
        "exfat"
    } else if is(0x52, b"FAT32   ") || is(0x36, b"FAT12   ") || is(0x36, b"FAT16   ") {
        "a FAT file system"
    } else if is(4086, b"SWAPSPACE2") || is(4086, b"SWAP-SPACE") {
        "a swap area"
    } else if is(512, b"EFI PART") {
        "a GPT-partitioned disk (pick a partition first)"
    } else if is(510, &[0x55, 0xaa]) {
        "an MBR-partitioned disk or boot sector (pick a partition first)"
    } else if is(0, b"QFI\xfb") {
        "a qcow2 disk image"
    } else if is(0, b"conectix") {
        "a VHD disk image"
    } else {
        "no recognizable file system"
    }
}

/// CRC32C (Castagnoli) without the final inversion, as ext4's checksums use
/// it (the kernel's `crc32c(seed, ...)`).
pub(crate) fn crc32c_raw(mut crc: u32, data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

fn bad(field: &'static str, reason: impl Into<String>) -> ExtError {
    ExtError::BadSuperblock {
        field,
        reason: reason.into(),
    }
}

impl Superblock {
    pub(crate) fn read(dev: &dyn ReadAt) -> Result<Superblock, ExtError> {
        if dev.size() < 2048 {
            return Err(ExtError::NotExt {
                found: "a device too small for any file system",
            });
        }
        let mut sb = [0u8; 1024];
        read_exact(dev, &mut sb, 1024)?;
        if le16(&sb, 0x38) != 0xEF53 {
            return Err(ExtError::NotExt {
                found: sniff_other(dev),
            });
        }
        let compat = le32(&sb, 0x5C);
        let incompat = le32(&sb, 0x60);
        let ro_compat = le32(&sb, 0x64);
        let rev = le32(&sb, 0x4C);

        if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            // s_checksum_type 1 is crc32c, the only one defined.
            if sb[0x175] != 1 {
                return Err(bad(
                    "s_checksum_type",
                    format!("unknown checksum type {}", sb[0x175]),
                ));
            }
            let stored = le32(&sb, 0x3FC);
            let computed = crc32c_raw(!0, &sb[..0x3FC]);
            if stored != computed {
                return Err(ExtError::Checksum {
                    what: "superblock",
                    offset: 1024,
                    stored,
                    computed,
                });
            }
        }

        let unknown = incompat & !INCOMPAT_SUPPORTED;
        if unknown != 0 {
            let mut names = Vec::new();
            for bit in 0..32 {
                let f = 1u32 << bit;
                if unknown & f != 0 {
                    match INCOMPAT_NAMES.iter().find(|(v, _)| *v == f) {
                        Some((_, n)) => names.push((*n).to_string()),
                        None => names.push(format!("{f:#x}")),
                    }
                }
            }
            return Err(ExtError::UnsupportedFeatures {
                names: names.join(", "),
            });
        }

        let log = le32(&sb, 0x18);
        // 1 KiB << 6 = 64 KiB, the largest block size ext4 defines.
        if log > 6 {
            return Err(bad(
                "s_log_block_size",
                format!("{log} (block size 1 KiB << {log} is over 64 KiB)"),
            ));
        }
        let block_size = 1024u64 << log;
        let mut blocks_count = u64::from(le32(&sb, 0x4));
        if incompat & INCOMPAT_64BIT != 0 {
            blocks_count |= u64::from(le32(&sb, 0x150)) << 32;
        }
        // Every block number below the count can then be turned into a byte
        // offset without overflow.
        if blocks_count.checked_mul(block_size).is_none() {
            return Err(bad(
                "s_blocks_count",
                format!("{blocks_count} blocks of {block_size} bytes overflow 64 bits"),
            ));
        }
        let first_data_block = le32(&sb, 0x14);
        if u64::from(first_data_block) >= blocks_count {
            return Err(bad(
                "s_first_data_block",
                format!("{first_data_block} is not below the block count {blocks_count}"),
            ));
        }
        let blocks_per_group = le32(&sb, 0x20);
        if blocks_per_group == 0 {
            return Err(bad("s_blocks_per_group", "0"));
        }
        let inodes_per_group = le32(&sb, 0x28);
        // The inode bitmap of a group is one block.
        if inodes_per_group == 0 || u64::from(inodes_per_group) > block_size * 8 {
            return Err(bad(
                "s_inodes_per_group",
                format!("{inodes_per_group} (must be 1..={})", block_size * 8),
            ));
        }
        let inode_size = if rev == 0 {
            128
        } else {
            u32::from(le16(&sb, 0x58))
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || u64::from(inode_size) > block_size {
            return Err(bad(
                "s_inode_size",
                format!("{inode_size} (must be a power of two, 128..=block size)"),
            ));
        }
        let desc_size = if incompat & INCOMPAT_64BIT != 0 {
            let d = u32::from(le16(&sb, 0xFE));
            if d < 64 || !d.is_power_of_two() || u64::from(d) > block_size {
                return Err(bad(
                    "s_desc_size",
                    format!("{d} (64bit needs a power of two, 64..=block size)"),
                ));
            }
            d
        } else {
            32
        };
        let group_count64 =
            (blocks_count - u64::from(first_data_block)).div_ceil(u64::from(blocks_per_group));
        // Every group's descriptor must fit on the device: this bounds the
        // memory the descriptor table takes by the device size.
        if group_count64.saturating_mul(u64::from(desc_size)) > dev.size() {
            return Err(bad(
                "s_blocks_count",
                format!(
                    "{blocks_count} blocks in groups of {blocks_per_group} need {group_count64} group descriptors, more than the {}-byte device can hold",
                    dev.size()
                ),
            ));
        }
        let group_count = u32::try_from(group_count64)
            .map_err(|_| bad("s_blocks_count", format!("{group_count64} groups")))?;
        let inodes_count = le32(&sb, 0x0);
        if u64::from(inodes_count) > u64::from(inodes_per_group) * group_count64 {
            return Err(bad(
                "s_inodes_count",
                format!(
                    "{inodes_count} is more than {group_count} groups of {inodes_per_group} inodes"
                ),
            ));
        }
        let label_raw = &sb[0x78..0x88];
        let label_end = label_raw.iter().position(|&b| b == 0).unwrap_or(16);
        Ok(Superblock {
            inodes_count,
            free_inodes: le32(&sb, 0x10),
            blocks_count,
            first_data_block,
            block_size,
            blocks_per_group,
            inodes_per_group,
            inode_size,
            compat,
            incompat,
            ro_compat,
            label: String::from_utf8_lossy(&label_raw[..label_end]).into_owned(),
            desc_size,
            first_meta_bg: le32(&sb, 0x104),
            backup_bgs: [le32(&sb, 0x24C), le32(&sb, 0x250)],
            group_count,
        })
    }

    pub(crate) fn has_incompat(&self, f: u32) -> bool {
        self.incompat & f != 0
    }

    pub(crate) fn has_ro_compat(&self, f: u32) -> bool {
        self.ro_compat & f != 0
    }

    /// Whether group `g` holds a superblock backup (and so, without
    /// meta_bg, a group descriptor table copy) at its start.
    fn group_has_super(&self, g: u32) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == self.backup_bgs[0] || g == self.backup_bgs[1];
        }
        if g <= 1 || !self.has_ro_compat(RO_COMPAT_SPARSE_SUPER) {
            return true;
        }
        // sparse_super: backups in groups 0, 1 and powers of 3, 5 and 7.
        for base in [3u32, 5, 7] {
            let mut p = base;
            while p < g {
                match p.checked_mul(base) {
                    Some(n) => p = n,
                    None => break,
                }
            }
            if p == g {
                return true;
            }
        }
        false
    }

    /// The block holding descriptor block `i` (of `descs_per_block`
    /// descriptors each).
    fn desc_block(&self, i: u64) -> u64 {
        let first = u64::from(self.first_data_block) + 1;
        if !self.has_incompat(INCOMPAT_META_BG) || i < u64::from(self.first_meta_bg) {
            return first + i;
        }
        // meta_bg: each "meta group" of descs_per_block groups keeps its one
        // descriptor block in its own first group (after the superblock
        // backup, if that group has one), so the table never needs to grow
        // contiguously when the file system is resized.
        let per = self.block_size / u64::from(self.desc_size);
        let g = i * per;
        let first_block = u64::from(self.first_data_block) + g * u64::from(self.blocks_per_group);
        let has_super = u32::try_from(g).is_ok_and(|g| self.group_has_super(g));
        first_block + u64::from(has_super)
    }
}

/// The per-group data the reader needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GroupDesc {
    pub inode_table: u64,
    pub flags: u16,
    pub itable_unused: u32,
}

pub(crate) const BG_INODE_UNINIT: u16 = 0x1;

/// Reads and checks every group descriptor.
pub(crate) fn read_group_descs(
    dev: &dyn ReadAt,
    sb: &Superblock,
) -> Result<Vec<GroupDesc>, ExtError> {
    let ds = u64::from(sb.desc_size);
    let per_block = sb.block_size / ds;
    let count = u64::from(sb.group_count);
    let nblocks = count.div_ceil(per_block);
    let table_blocks =
        (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(sb.block_size);
    let mut out = Vec::with_capacity(sb.group_count as usize);
    let mut buf = vec![0u8; sb.block_size as usize];
    for i in 0..nblocks {
        let block = sb.desc_block(i);
        if block >= sb.blocks_count {
            return Err(ExtError::BadGroupDesc {
                group: u32::try_from(i * per_block).unwrap_or(u32::MAX),
                offset: block.saturating_mul(sb.block_size),
                reason: format!("descriptor block {block} is past the end"),
            });
        }
        let offset = block * sb.block_size;
        read_exact(dev, &mut buf, offset)?;
        for j in 0..per_block {
            let g = i * per_block + j;
            if g >= count {
                break;
            }
            let d = &buf[(j * ds) as usize..((j + 1) * ds) as usize];
            let mut inode_table = u64::from(le32(d, 0x8));
            let mut itable_unused = u32::from(le16(d, 0x1C));
            if ds >= 64 {
                inode_table |= u64::from(le32(d, 0x28)) << 32;
                itable_unused |= u32::from(le16(d, 0x32)) << 16;
            }
            let group = g as u32;
            let doff = offset + j * ds;
            if inode_table == 0
                || inode_table
                    .checked_add(table_blocks)
                    .is_none_or(|end| end > sb.blocks_count)
            {
                return Err(ExtError::BadGroupDesc {
                    group,
                    offset: doff,
                    reason: format!(
                        "inode table at block {inode_table} ({table_blocks} blocks) is outside the file system ({} blocks)",
                        sb.blocks_count
                    ),
                });
            }
            // The "uninitialized" flags are only meaningful when group
            // descriptors are checksummed; the kernel ignores them otherwise.
            let csummed = sb.has_ro_compat(RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM);
            out.push(GroupDesc {
                inode_table,
                flags: if csummed { le16(d, 0x12) } else { 0 },
                itable_unused: if csummed { itable_unused } else { 0 },
            });
        }
    }
    Ok(out)
}
