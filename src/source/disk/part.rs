//! MBR and GPT partition tables.
//!
//! [`PartitionTable::read`] finds the table of a disk: a GPT when the MBR
//! holds a protective (0xEE) entry, else an MBR with its primary entries and
//! the logical partitions of its extended-partition chain, else none (a
//! whole-disk file system). Partitions are numbered as Linux numbers them:
//! primaries 1-4 by slot, logicals from 5 in chain order, GPT entries by
//! index + 1.
//!
//! Partitions that lie outside the disk or overlap an earlier one are left
//! out and the reason is kept in [`PartitionTable::notes`]; structural damage
//! (a looping EBR chain, both GPT headers bad) is an error.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::Arc;

use super::{ReadAt, Slice};

const MBR_SECTOR: u64 = 512;
/// Linux's limit on partitions per disk (DISK_MAX_PARTS) bounds the EBR walk.
const MAX_LOGICALS: usize = 256;
/// Bound on a GPT entry array (the usual one is 16 KiB).
const MAX_GPT_ARRAY: u64 = 4 << 20;

/// Errors from reading a partition table. Each names the byte offset on the
/// disk where the input went wrong.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// The underlying source failed.
    #[error("{table}: I/O error at offset {offset}: {source}")]
    Io {
        /// "mbr" or "gpt".
        table: &'static str,
        /// Where the read started.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An EBR link points outside the extended partition or the disk.
    #[error("mbr: EBR link at offset {offset} points outside the extended partition or the disk (LBA {lba})")]
    EbrOutOfRange {
        /// Offset of the link entry.
        offset: u64,
        /// The EBR sector it points to.
        lba: u64,
    },
    /// The EBR chain comes back to an EBR already read.
    #[error("mbr: EBR link at offset {offset} loops back to the EBR at LBA {lba}")]
    EbrLoop {
        /// Offset of the link entry.
        offset: u64,
        /// The EBR sector it points to.
        lba: u64,
    },
    /// More EBRs than Linux would read.
    #[error("mbr: EBR chain at offset {offset} has more than {limit} logical partitions")]
    TooManyLogicals {
        /// Offset of the EBR past the limit.
        offset: u64,
        /// The limit.
        limit: usize,
    },
    /// A protective MBR, but neither GPT header is usable.
    #[error("gpt: no usable header: primary: {primary}; backup: {backup}")]
    Gpt {
        /// What is wrong with the primary header.
        primary: GptProblem,
        /// What is wrong with the backup header.
        backup: GptProblem,
    },
    /// [`Partition::open`] on a disk too small for the partition.
    #[error(
        "part: partition {number} ends at byte {end}, past the end of the {disk_size}-byte disk"
    )]
    OutsideDisk {
        /// Partition number.
        number: u32,
        /// End of the partition in bytes.
        end: u64,
        /// Disk size.
        disk_size: u64,
    },
}

/// Why one GPT header (with its entry array) is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GptProblem {
    /// No "EFI PART" signature.
    #[error("no \"EFI PART\" signature at offset {offset}")]
    NoSignature {
        /// Header offset.
        offset: u64,
    },
    /// The header CRC32 does not match.
    #[error("header CRC32 mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc {
        /// Header offset.
        offset: u64,
        /// The CRC field.
        stored: u32,
        /// The CRC of the header bytes.
        computed: u32,
    },
    /// The entry array CRC32 does not match.
    #[error("entry array CRC32 mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    EntriesCrc {
        /// Entry array offset.
        offset: u64,
        /// The CRC field of the header.
        stored: u32,
        /// The CRC of the array.
        computed: u32,
    },
    /// Some header field is inconsistent.
    #[error("header at offset {offset}: {reason}")]
    Header {
        /// Header offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Reading failed.
    #[error("I/O error at offset {offset}: {message}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// The error.
        message: String,
    },
}

/// Which kind of table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// DOS/MBR, with logical partitions in an extended partition.
    Mbr,
    /// GUID Partition Table.
    Gpt,
}

/// A GPT GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// Builds a GUID from the groups of its text form
    /// `AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE` (the first three groups are
    /// stored little-endian, the last two big-endian).
    pub const fn from_fields(a: u32, b: u16, c: u16, d: u16, e: u64) -> Guid {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        let d = d.to_be_bytes();
        let e = e.to_be_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], e[2], e[3], e[4], e[5],
            e[6], e[7],
        ])
    }

    /// The unused-entry GUID.
    pub const ZERO: Guid = Guid([0; 16]);
    /// Linux filesystem data.
    pub const LINUX_FILESYSTEM: Guid =
        Guid::from_fields(0x0FC6_3DAF, 0x8483, 0x4772, 0x8E79, 0x3D69_D847_7DE4);
    /// Linux root (x86-64), from the Discoverable Partitions Specification.
    pub const LINUX_ROOT_X86_64: Guid =
        Guid::from_fields(0x4F68_BCE3, 0xE8CD, 0x4DB1, 0x96E7, 0xFBCA_F984_B709);
    /// Linux root (x86).
    pub const LINUX_ROOT_X86: Guid =
        Guid::from_fields(0x4447_9540, 0xF297, 0x41B2, 0x9AF7, 0xD131_D5F0_458A);
    /// Linux root (AArch64).
    pub const LINUX_ROOT_AARCH64: Guid =
        Guid::from_fields(0xB921_B045, 0x1DF0, 0x41C3, 0xAF44, 0x4C6F_280D_3FAE);
    /// Linux root (32-bit ARM).
    pub const LINUX_ROOT_ARM: Guid =
        Guid::from_fields(0x69DA_D710, 0x2CE4, 0x4E3C, 0xB16C, 0x21A1_D49A_BE3D);
    /// Linux /usr (x86-64).
    pub const LINUX_USR_X86_64: Guid =
        Guid::from_fields(0x8484_680C, 0x9521, 0x48C6, 0x9C11, 0xB072_0656_F69E);
    /// Linux /home.
    pub const LINUX_HOME: Guid =
        Guid::from_fields(0x933A_C7E1, 0x2EB4, 0x4F13, 0xB844, 0x0E14_E2AE_F915);
    /// Linux swap.
    pub const LINUX_SWAP: Guid =
        Guid::from_fields(0x0657_FD6D, 0xA4AB, 0x43C4, 0x84E5, 0x0933_C84B_4F4F);
    /// Linux LVM.
    pub const LINUX_LVM: Guid =
        Guid::from_fields(0xE6D6_D379, 0xF507, 0x44C2, 0xA23C, 0x238F_2A3D_F928);
    /// EFI system partition.
    pub const EFI_SYSTEM: Guid =
        Guid::from_fields(0xC12A_7328, 0xF81F, 0x11D2, 0xBA4B, 0x00A0_C93E_C93B);
    /// BIOS boot partition (GRUB core image).
    pub const BIOS_BOOT: Guid =
        Guid::from_fields(0x2168_6148, 0x6449, 0x6E6F, 0x744E, 0x6564_6564_4649);
    /// Microsoft basic data (FAT, NTFS, exFAT).
    pub const MICROSOFT_BASIC_DATA: Guid =
        Guid::from_fields(0xEBD0_A0A2, 0xB9E5, 0x4433, 0x87C0, 0x68B6_B726_99C7);

    /// A human name for well-known partition types.
    pub fn name(&self) -> Option<&'static str> {
        Some(match *self {
            Guid::LINUX_FILESYSTEM => "Linux filesystem",
            Guid::LINUX_ROOT_X86_64 => "Linux root (x86-64)",
            Guid::LINUX_ROOT_X86 => "Linux root (x86)",
            Guid::LINUX_ROOT_AARCH64 => "Linux root (ARM-64)",
            Guid::LINUX_ROOT_ARM => "Linux root (ARM)",
            Guid::LINUX_USR_X86_64 => "Linux /usr (x86-64)",
            Guid::LINUX_HOME => "Linux home",
            Guid::LINUX_SWAP => "Linux swap",
            Guid::LINUX_LVM => "Linux LVM",
            Guid::EFI_SYSTEM => "EFI System",
            Guid::BIOS_BOOT => "BIOS boot",
            Guid::MICROSOFT_BASIC_DATA => "Microsoft basic data",
            _ => return None,
        })
    }

    /// Linux filesystem data or a Linux root partition: where a root file
    /// system is to be looked for.
    pub fn is_linux_data(&self) -> bool {
        self.is_linux_root() || *self == Guid::LINUX_FILESYSTEM
    }

    /// One of the Discoverable Partitions Specification root types.
    pub fn is_linux_root(&self) -> bool {
        matches!(
            *self,
            Guid::LINUX_ROOT_X86_64
                | Guid::LINUX_ROOT_X86
                | Guid::LINUX_ROOT_AARCH64
                | Guid::LINUX_ROOT_ARM
        )
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        b[10..].iter().try_for_each(|x| write!(f, "{x:02X}"))
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// What a partition table says a partition holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKind {
    /// An MBR type byte (0x83 Linux, 0x07 NTFS, 0x0c FAT32 LBA, ...).
    Mbr(u8),
    /// A GPT type GUID and the partition's name.
    Gpt {
        /// The partition type.
        type_guid: Guid,
        /// The partition name (UTF-16 on disk).
        name: String,
    },
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based number as Linux gives it (MBR logicals start at 5).
    pub number: u32,
    /// Offset of the first byte on the disk.
    pub start_bytes: u64,
    /// Length in bytes.
    pub size_bytes: u64,
    /// Type (and GPT name).
    pub kind: PartitionKind,
    /// MBR boot flag (0x80), or GPT attribute bit 2 (legacy BIOS bootable).
    pub bootable: bool,
}

impl Partition {
    /// The partition's bytes as a window of `disk`.
    pub fn open(&self, disk: &Arc<dyn ReadAt>) -> Result<Slice, PartError> {
        Slice::new(disk.clone(), self.start_bytes, self.size_bytes).ok_or(PartError::OutsideDisk {
            number: self.number,
            end: self.start_bytes.saturating_add(self.size_bytes),
            disk_size: disk.size(),
        })
    }

    fn end(&self) -> u64 {
        self.start_bytes + self.size_bytes
    }
}

/// A disk's partition table.
///
/// ```no_run
/// use kiln::disk::{part::PartitionTable, FileSource, ReadAt};
/// use std::sync::Arc;
///
/// let disk: Arc<dyn ReadAt> = Arc::new(FileSource::open("disk.img".as_ref())?);
/// match PartitionTable::read(&disk)? {
///     None => println!("no partition table: a whole-disk file system"),
///     Some(table) => {
///         println!("{}", table.describe()); // e.g. "mbr: p1 0x83 625 MiB, p5 0x83 100 MiB"
///         for p in &table.partitions {
///             let bytes = p.open(&disk)?;
///             println!("p{}: {} bytes", p.number, bytes.size());
///         }
///     }
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct PartitionTable {
    /// MBR or GPT.
    pub scheme: Scheme,
    /// Logical sector size the table is expressed in (512, or 4096 for a
    /// GPT found at LBA 1 of 4 KiB sectors).
    pub sector_size: u64,
    /// The GPT disk GUID.
    pub disk_guid: Option<Guid>,
    /// The data partitions, by number (MBR extended containers excluded).
    pub partitions: Vec<Partition>,
    /// What was skipped or repaired, and why (e.g. a partition past the end
    /// of the disk, the backup GPT header used in place of the primary).
    pub notes: Vec<String>,
}

fn le16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0f | 0x85)
}

/// One 16-byte MBR/EBR entry.
struct MbrEntry {
    status: u8,
    kind: u8,
    lba: u64,
    sectors: u64,
}

fn mbr_entries(sector: &[u8; 512]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..462 + 16 * i];
        MbrEntry {
            status: e[0],
            kind: e[4],
            lba: u64::from(le32(e, 8)),
            sectors: u64::from(le32(e, 12)),
        }
    })
}

impl PartitionTable {
    /// Reads the table of `disk`: `Ok(None)` when there is none (no 0x55AA
    /// signature, or an MBR-looking sector with no valid entry, e.g. a FAT
    /// boot sector).
    pub fn read(disk: &Arc<dyn ReadAt>) -> Result<Option<PartitionTable>, PartError> {
        if disk.size() < MBR_SECTOR {
            return Ok(None);
        }
        let mut mbr = [0u8; 512];
        disk.read_exact_at(&mut mbr, 0)
            .map_err(|source| PartError::Io {
                table: "mbr",
                offset: 0,
                source,
            })?;
        if mbr[510..] != [0x55, 0xaa] {
            return Ok(None);
        }
        let entries = mbr_entries(&mbr);
        // A partition table has boot flags 0x00 or 0x80 only; a file
        // system's boot sector has code or data there.
        if entries.iter().any(|e| e.status & 0x7f != 0) {
            return Ok(None);
        }
        if entries.iter().any(|e| e.kind == 0xee) {
            return read_gpt(&**disk).map(Some);
        }
        if entries.iter().all(|e| e.kind == 0 || e.sectors == 0) {
            return Ok(None);
        }
        read_mbr(&**disk, &entries).map(Some)
    }

    /// A one-line summary, e.g. `mbr: p1 0x83 625 MiB, p5 0x83 100 MiB` or
    /// `gpt: p1 EFI System 100 MiB "EFI", p2 Linux filesystem 1 GiB`.
    pub fn describe(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Mbr => "mbr",
            Scheme::Gpt => "gpt",
        };
        let mut s = format!("{scheme}:");
        if self.sector_size != 512 {
            s.push_str(&format!(" ({}-byte sectors)", self.sector_size));
        }
        if self.partitions.is_empty() {
            s.push_str(" no partitions");
        }
        for (i, p) in self.partitions.iter().enumerate() {
            s.push_str(if i == 0 { " " } else { ", " });
            let kind = match &p.kind {
                PartitionKind::Mbr(t) => format!("{t:#04x}"),
                PartitionKind::Gpt { type_guid, .. } => type_guid
                    .name()
                    .map_or_else(|| type_guid.to_string(), str::to_string),
            };
            s.push_str(&format!("p{} {kind}", p.number));
            if p.bootable {
                s.push_str(" (boot)");
            }
            s.push_str(&format!(" {}", crate::progress::human_bytes(p.size_bytes)));
            if let PartitionKind::Gpt { name, .. } = &p.kind {
                if !name.is_empty() {
                    s.push_str(&format!(" {name:?}"));
                }
            }
        }
        s
    }

    /// Keeps the candidates inside the disk that overlap no earlier one
    /// (by number), noting why the others are left out.
    fn accept(&mut self, disk_size: u64, candidates: Vec<Partition>) {
        for p in candidates {
            if p.end() > disk_size {
                self.notes.push(format!(
                    "partition {} (bytes {}..{}) ends past the end of the {disk_size}-byte disk: skipped",
                    p.number,
                    p.start_bytes,
                    p.end()
                ));
                continue;
            }
            if let Some(q) = self
                .partitions
                .iter()
                .find(|q| p.start_bytes < q.end() && q.start_bytes < p.end())
            {
                self.notes.push(format!(
                    "partition {} (bytes {}..{}) overlaps partition {}: skipped",
                    p.number,
                    p.start_bytes,
                    p.end(),
                    q.number
                ));
                continue;
            }
            self.partitions.push(p);
        }
        self.partitions.sort_by_key(|p| p.number);
    }
}

fn read_mbr(disk: &dyn ReadAt, entries: &[MbrEntry; 4]) -> Result<PartitionTable, PartError> {
    let mut table = PartitionTable {
        scheme: Scheme::Mbr,
        sector_size: MBR_SECTOR,
        disk_guid: None,
        partitions: Vec::new(),
        notes: Vec::new(),
    };
    let mut candidates = Vec::new();
    let mut next_logical = 5u32;
    let mut ebrs_read = 0usize;
    for (i, e) in entries.iter().enumerate() {
        let number = i as u32 + 1;
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        if e.lba == 0 {
            table.notes.push(format!(
                "partition {number} starts at LBA 0 (the MBR itself): skipped"
            ));
            continue;
        }
        if is_extended(e.kind) {
            read_ebr_chain(
                disk,
                e,
                446 + 16 * i as u64,
                &mut next_logical,
                &mut ebrs_read,
                &mut candidates,
                &mut table.notes,
            )?;
            continue;
        }
        candidates.push(Partition {
            number,
            start_bytes: e.lba * MBR_SECTOR,
            size_bytes: e.sectors * MBR_SECTOR,
            kind: PartitionKind::Mbr(e.kind),
            bootable: e.status == 0x80,
        });
    }
    candidates.sort_by_key(|p| p.number);
    table.accept(disk.size(), candidates);
    Ok(table)
}

/// Walks the EBR chain of the extended partition `ext`. Following Linux,
/// each EBR's data entries are relative to that EBR and its link to the
/// next EBR is relative to the start of the extended partition.
fn read_ebr_chain(
    disk: &dyn ReadAt,
    ext: &MbrEntry,
    ext_entry_offset: u64,
    next_logical: &mut u32,
    ebrs_read: &mut usize,
    out: &mut Vec<Partition>,
    notes: &mut Vec<String>,
) -> Result<(), PartError> {
    let ext_start = ext.lba;
    let ext_end = ext.lba + ext.sectors;
    let disk_sectors = disk.size() / MBR_SECTOR;
    let mut ebr = ext_start;
    let mut link_offset = ext_entry_offset;
    let mut seen = HashSet::new();
    loop {
        if ebr >= ext_end || ebr >= disk_sectors {
            return Err(PartError::EbrOutOfRange {
                offset: link_offset,
                lba: ebr,
            });
        }
        if !seen.insert(ebr) {
            return Err(PartError::EbrLoop {
                offset: link_offset,
                lba: ebr,
            });
        }
        *ebrs_read += 1;
        if *ebrs_read > MAX_LOGICALS {
            return Err(PartError::TooManyLogicals {
                offset: ebr * MBR_SECTOR,
                limit: MAX_LOGICALS,
            });
        }
        let mut sector = [0u8; 512];
        disk.read_exact_at(&mut sector, ebr * MBR_SECTOR)
            .map_err(|source| PartError::Io {
                table: "mbr",
                offset: ebr * MBR_SECTOR,
                source,
            })?;
        if sector[510..] != [0x55, 0xaa] {
            notes.push(format!(
                "EBR at offset {} has no 0x55AA signature: logical partitions end there",
                ebr * MBR_SECTOR
            ));
            return Ok(());
        }
        let mut next = None;
        for (j, e) in mbr_entries(&sector).iter().enumerate() {
            if e.kind == 0 || e.sectors == 0 {
                continue;
            }
            let at = ebr * MBR_SECTOR + 446 + 16 * j as u64;
            if is_extended(e.kind) {
                if next.is_none() {
                    next = Some((ext_start + e.lba, at));
                }
                continue;
            }
            let number = *next_logical;
            *next_logical += 1;
            let start = ebr + e.lba;
            if e.lba == 0 || start + e.sectors > ext_end {
                notes.push(format!(
                    "logical partition {number} (entry at offset {at}) lies outside its extended partition: skipped"
                ));
                continue;
            }
            out.push(Partition {
                number,
                start_bytes: start * MBR_SECTOR,
                size_bytes: e.sectors * MBR_SECTOR,
                kind: PartitionKind::Mbr(e.kind),
                bootable: e.status == 0x80,
            });
        }
        match next {
            Some((lba, at)) => {
                ebr = lba;
                link_offset = at;
            }
            None => return Ok(()),
        }
    }
}

/// A validated GPT header with its entry array.
struct Gpt {
    sector_size: u64,
    header_offset: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entry_size: usize,
    array: Vec<u8>,
}

fn parse_gpt_at(disk: &dyn ReadAt, ss: u64, lba: u64) -> Result<Gpt, GptProblem> {
    let offset = lba * ss;
    let io_err = |offset: u64, e: io::Error| GptProblem::Io {
        offset,
        message: e.to_string(),
    };
    let mut h = vec![0u8; ss as usize];
    disk.read_exact_at(&mut h, offset)
        .map_err(|e| io_err(offset, e))?;
    if &h[..8] != b"EFI PART" {
        return Err(GptProblem::NoSignature { offset });
    }
    let bad = |reason: String| GptProblem::Header { offset, reason };
    let header_size = u64::from(le32(&h, 12));
    if !(92..=ss).contains(&header_size) {
        return Err(bad(format!(
            "header size {header_size} is outside 92..={ss}"
        )));
    }
    let stored = le32(&h, 16);
    h[16..20].fill(0);
    let computed = crc32fast::hash(&h[..header_size as usize]);
    if stored != computed {
        return Err(GptProblem::HeaderCrc {
            offset,
            stored,
            computed,
        });
    }
    let my_lba = le64(&h, 24);
    if my_lba != lba {
        return Err(bad(format!(
            "it says it is at LBA {my_lba}, but it was read at LBA {lba}"
        )));
    }
    let disk_sectors = disk.size() / ss;
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    if last_usable >= disk_sectors || first_usable > last_usable.saturating_add(1) {
        return Err(bad(format!(
            "usable LBAs {first_usable}..={last_usable} do not fit a disk of {disk_sectors} sectors"
        )));
    }
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&h[56..72]);
    let array_lba = le64(&h, 72);
    let count = u64::from(le32(&h, 80));
    let entry_size = u64::from(le32(&h, 84));
    // The spec allows 128 * 2^n bytes per entry.
    if entry_size < 128 || !entry_size.is_power_of_two() || entry_size > 4096 {
        return Err(bad(format!(
            "entry size {entry_size} is not 128 * 2^n up to 4096"
        )));
    }
    let array_len = count * entry_size;
    if array_len > MAX_GPT_ARRAY {
        return Err(bad(format!(
            "{count} entries of {entry_size} bytes exceed 4 MiB"
        )));
    }
    let array_offset = array_lba.checked_mul(ss);
    let Some(array_offset) =
        array_offset.filter(|o| o.checked_add(array_len).is_some_and(|e| e <= disk.size()))
    else {
        return Err(bad(format!(
            "entry array at LBA {array_lba} ({array_len} bytes) is outside the disk"
        )));
    };
    let mut array = vec![0u8; array_len as usize];
    disk.read_exact_at(&mut array, array_offset)
        .map_err(|e| io_err(array_offset, e))?;
    let stored = le32(&h, 88);
    let computed = crc32fast::hash(&array);
    if stored != computed {
        return Err(GptProblem::EntriesCrc {
            offset: array_offset,
            stored,
            computed,
        });
    }
    Ok(Gpt {
        sector_size: ss,
        header_offset: offset,
        first_usable,
        last_usable,
        disk_guid: Guid(disk_guid),
        entry_size: entry_size as usize,
        array,
    })
}

fn read_gpt(disk: &dyn ReadAt) -> Result<PartitionTable, PartError> {
    let size = disk.size();
    // The header is at LBA 1: byte 512 on 512-byte-sector disks, byte 4096
    // on 4Kn disks (whose images keep the 4 KiB layout). When neither has a
    // signature, the backup may still be found at either sector size.
    let sizes: Vec<u64> = [512u64, 4096]
        .into_iter()
        .filter(|ss| size >= 2 * ss)
        .collect();
    let found = sizes.iter().copied().find(|&ss| {
        let mut sig = [0u8; 8];
        disk.read_exact_at(&mut sig, ss).is_ok() && &sig == b"EFI PART"
    });
    let primary_ss = found.unwrap_or(MBR_SECTOR);
    let mut notes = Vec::new();
    let gpt = match parse_gpt_at(disk, primary_ss, 1) {
        Ok(g) => g,
        Err(primary) => {
            // The primary's alternate-LBA field cannot be trusted when the
            // primary is bad: the backup is in the last sector of the disk.
            let mut backup_err = None;
            let mut backup = None;
            for ss in found.map_or(sizes.clone(), |ss| vec![ss]) {
                match parse_gpt_at(disk, ss, size / ss - 1) {
                    Ok(g) => {
                        backup = Some(g);
                        break;
                    }
                    Err(e) => {
                        backup_err.get_or_insert(e);
                    }
                }
            }
            match (backup, backup_err) {
                (Some(g), _) => {
                    notes.push(format!(
                        "primary GPT header unusable ({primary}); using the backup at offset {}",
                        g.header_offset
                    ));
                    g
                }
                (None, Some(backup)) => return Err(PartError::Gpt { primary, backup }),
                (None, None) => {
                    let backup = GptProblem::NoSignature {
                        offset: size.saturating_sub(MBR_SECTOR),
                    };
                    return Err(PartError::Gpt { primary, backup });
                }
            }
        }
    };
    let mut table = PartitionTable {
        scheme: Scheme::Gpt,
        sector_size: gpt.sector_size,
        disk_guid: Some(gpt.disk_guid),
        partitions: Vec::new(),
        notes,
    };
    let mut candidates = Vec::new();
    for (i, e) in gpt.array.chunks_exact(gpt.entry_size).enumerate() {
        let mut t = [0u8; 16];
        t.copy_from_slice(&e[..16]);
        let type_guid = Guid(t);
        if type_guid == Guid::ZERO {
            continue;
        }
        let number = i as u32 + 1;
        let first = le64(e, 32);
        let last = le64(e, 40);
        if last < first || first < gpt.first_usable || last > gpt.last_usable {
            table.notes.push(format!(
                "partition {number} (LBAs {first}..={last}) is outside the usable LBAs {}..={}: skipped",
                gpt.first_usable, gpt.last_usable
            ));
            continue;
        }
        let units: Vec<u16> = (0..36)
            .map(|k| le16(e, 56 + 2 * k))
            .take_while(|u| *u != 0)
            .collect();
        candidates.push(Partition {
            number,
            // last_usable < disk sectors, so these do not overflow.
            start_bytes: first * gpt.sector_size,
            size_bytes: (last - first + 1) * gpt.sector_size,
            kind: PartitionKind::Gpt {
                type_guid,
                name: String::from_utf16_lossy(&units),
            },
            bootable: le64(e, 48) & (1 << 2) != 0,
        });
    }
    table.accept(size, candidates);
    Ok(table)
}

/// Reads a fuzzed disk, ignoring errors: all of it up to 4 MiB, else 64
/// spread 64 KiB windows (a mutated size field must not make a fuzz run
/// read terabytes of zeros).
pub(crate) fn fuzz_read_all(disk: &dyn ReadAt) {
    const CHUNK: u64 = 64 << 10;
    let size = disk.size();
    let mut buf = vec![0u8; CHUNK as usize];
    let offsets: Vec<u64> = if size <= 4 << 20 {
        (0..size.div_ceil(CHUNK)).map(|i| i * CHUNK).collect()
    } else {
        (0..64)
            .map(|i| (size / 64) * i)
            .chain([size - CHUNK])
            .collect()
    };
    for o in offsets {
        let _ = disk.read_exact_at(&mut buf[..(size - o).min(CHUNK) as usize], o);
    }
}

/// Reads `data` as a disk: its partition table, then every partition's
/// bytes, ignoring errors: the entry point of a future cargo-fuzz target.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    let disk: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    if let Ok(Some(table)) = PartitionTable::read(&disk) {
        let _ = table.describe();
        for p in &table.partitions {
            if let Ok(s) = p.open(&disk) {
                fuzz_read_all(&s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(v: Vec<u8>) -> Arc<dyn ReadAt> {
        Arc::new(v)
    }

    fn set_entry(
        img: &mut [u8],
        sector_at: usize,
        slot: usize,
        status: u8,
        kind: u8,
        lba: u32,
        sectors: u32,
    ) {
        let e = sector_at + 446 + 16 * slot;
        img[e] = status;
        img[e + 4] = kind;
        img[e + 8..e + 12].copy_from_slice(&lba.to_le_bytes());
        img[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        img[sector_at + 510] = 0x55;
        img[sector_at + 511] = 0xaa;
    }

    /// 1 MiB disk: p1 0x83 at LBA 1 (100 sectors), extended at 200..2000
    /// with logicals at 201 (10 sectors) and 301 (20 sectors, boot).
    fn mbr_disk() -> Vec<u8> {
        let mut img = vec![0u8; 1 << 20];
        set_entry(&mut img, 0, 0, 0x00, 0x83, 1, 100);
        set_entry(&mut img, 0, 1, 0x00, 0x05, 200, 1800);
        set_entry(&mut img, 200 * 512, 0, 0, 0x83, 1, 10);
        set_entry(&mut img, 200 * 512, 1, 0, 0x05, 100, 50);
        set_entry(&mut img, 300 * 512, 0, 0x80, 0x82, 1, 20);
        img
    }

    #[test]
    fn mbr_with_logicals() {
        let d = disk(mbr_disk());
        let t = PartitionTable::read(&d).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Mbr);
        let got: Vec<_> = t
            .partitions
            .iter()
            .map(|p| (p.number, p.start_bytes, p.size_bytes))
            .collect();
        assert_eq!(
            got,
            vec![(1, 512, 51200), (5, 201 * 512, 5120), (6, 301 * 512, 10240)]
        );
        assert!(t.partitions[2].bootable);
        assert_eq!(
            t.describe(),
            "mbr: p1 0x83 50 KiB, p5 0x83 5 KiB, p6 0x82 (boot) 10 KiB"
        );
        let s = t.partitions[1].open(&d).unwrap();
        assert_eq!(s.size(), 5120);
        assert!(t.notes.is_empty(), "{:?}", t.notes);
    }

    #[test]
    fn no_table() {
        assert!(PartitionTable::read(&disk(vec![0u8; 4096]))
            .unwrap()
            .is_none());
        assert!(PartitionTable::read(&disk(vec![0u8; 10]))
            .unwrap()
            .is_none());
        // A boot sector with 0x55AA but code where the entries would be.
        let mut img = vec![0x4eu8; 4096];
        img[510] = 0x55;
        img[511] = 0xaa;
        assert!(PartitionTable::read(&disk(img)).unwrap().is_none());
        // Signature, valid flags, no entries.
        let mut img = vec![0u8; 4096];
        img[510] = 0x55;
        img[511] = 0xaa;
        assert!(PartitionTable::read(&disk(img)).unwrap().is_none());
    }

    #[test]
    fn cyclic_ebr_chain() {
        let mut img = mbr_disk();
        // The second EBR links back to the first.
        set_entry(&mut img, 300 * 512, 1, 0, 0x05, 0, 50);
        let e = PartitionTable::read(&disk(img)).unwrap_err();
        assert!(
            matches!(e, PartError::EbrLoop { offset, lba: 200 } if offset == 300 * 512 + 446 + 16),
            "{e}"
        );
        // An EBR linking to itself.
        let mut img = mbr_disk();
        set_entry(&mut img, 200 * 512, 1, 0, 0x05, 0, 50);
        assert!(matches!(
            PartitionTable::read(&disk(img)).unwrap_err(),
            PartError::EbrLoop { lba: 200, .. }
        ));
    }

    #[test]
    fn long_ebr_chain_is_bounded() {
        let mut img = vec![0u8; 2 << 20];
        set_entry(&mut img, 0, 0, 0, 0x05, 1, 4000);
        for i in 0..400u32 {
            let at = (1 + i as usize * 2) * 512;
            set_entry(&mut img, at, 0, 0, 0x83, 1, 1);
            set_entry(&mut img, at, 1, 0, 0x05, 2 * (i + 1), 2);
        }
        let e = PartitionTable::read(&disk(img)).unwrap_err();
        assert!(
            matches!(e, PartError::TooManyLogicals { limit: 256, .. }),
            "{e}"
        );
    }

    #[test]
    fn ebr_out_of_range() {
        let mut img = mbr_disk();
        set_entry(&mut img, 200 * 512, 1, 0, 0x05, 5000, 50);
        let e = PartitionTable::read(&disk(img)).unwrap_err();
        assert!(
            matches!(e, PartError::EbrOutOfRange { lba: 5200, .. }),
            "{e}"
        );
    }

    #[test]
    fn out_of_range_and_overlapping_are_skipped() {
        let mut img = mbr_disk();
        set_entry(&mut img, 0, 2, 0, 0x83, 50, 10); // overlaps p1
        set_entry(&mut img, 0, 3, 0, 0x83, 3000, 100_000); // past the 1 MiB disk
        let t = PartitionTable::read(&disk(img)).unwrap().unwrap();
        let numbers: Vec<u32> = t.partitions.iter().map(|p| p.number).collect();
        assert_eq!(numbers, vec![1, 5, 6]);
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("partition 3") && n.contains("overlaps partition 1")),
            "{:?}",
            t.notes
        );
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("partition 4") && n.contains("past the end")),
            "{:?}",
            t.notes
        );
    }

    /// A 1 MiB GPT disk with 128 entries: p1 EFI System (100 sectors from
    /// the first usable LBA) "EFI", p3 Linux root x86-64 (the rest, legacy
    /// BIOS bootable) "root"; primary and backup headers and arrays.
    fn gpt_disk(ss: usize) -> Vec<u8> {
        let sectors = (1usize << 20) / ss;
        let mut img = vec![0u8; 1 << 20];
        set_entry(&mut img, 0, 0, 0, 0xee, 1, (sectors - 1) as u32);
        let entries_sectors = 128 * 128 / ss;
        let mut array = vec![0u8; 128 * 128];
        let mut put = |i: usize, t: Guid, first: u64, last: u64, name: &str, attrs: u64| {
            let e = &mut array[128 * i..128 * (i + 1)];
            e[..16].copy_from_slice(&t.0);
            e[16] = i as u8 + 1;
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
            e[48..56].copy_from_slice(&attrs.to_le_bytes());
            for (k, u) in name.encode_utf16().enumerate() {
                e[56 + 2 * k..58 + 2 * k].copy_from_slice(&u.to_le_bytes());
            }
        };
        let first_usable = 2 + entries_sectors as u64;
        let last_usable = (sectors - 2 - entries_sectors) as u64;
        put(
            0,
            Guid::EFI_SYSTEM,
            first_usable,
            first_usable + 99,
            "EFI",
            0,
        );
        put(
            2,
            Guid::LINUX_ROOT_X86_64,
            first_usable + 100,
            last_usable,
            "root",
            4,
        );
        let array_crc = crc32fast::hash(&array);
        for (hdr_lba, alt_lba, array_lba) in [
            (1u64, sectors as u64 - 1, 2u64),
            (
                sectors as u64 - 1,
                1,
                (sectors - 1 - entries_sectors) as u64,
            ),
        ] {
            let mut h = vec![0u8; 92];
            h[..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&hdr_lba.to_le_bytes());
            h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
            h[40..48].copy_from_slice(&first_usable.to_le_bytes());
            h[48..56].copy_from_slice(&last_usable.to_le_bytes());
            h[56..72].copy_from_slice(&[0xab; 16]);
            h[72..80].copy_from_slice(&array_lba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&array_crc.to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            let at = hdr_lba as usize * ss;
            img[at..at + 92].copy_from_slice(&h);
            let at = array_lba as usize * ss;
            img[at..at + array.len()].copy_from_slice(&array);
        }
        img
    }

    #[test]
    fn gpt_entries_names_and_types() {
        let t = PartitionTable::read(&disk(gpt_disk(512))).unwrap().unwrap();
        assert_eq!(t.scheme, Scheme::Gpt);
        assert_eq!(t.sector_size, 512);
        assert!(t.notes.is_empty(), "{:?}", t.notes);
        assert_eq!(t.partitions.len(), 2);
        let p1 = &t.partitions[0];
        assert_eq!(
            (p1.number, p1.start_bytes, p1.size_bytes),
            (1, 34 * 512, 100 * 512)
        );
        let p3 = &t.partitions[1];
        assert_eq!(p3.number, 3);
        assert!(p3.bootable);
        match &p3.kind {
            PartitionKind::Gpt { type_guid, name } => {
                assert!(type_guid.is_linux_root() && type_guid.is_linux_data());
                assert_eq!(name, "root");
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(
            Guid::LINUX_FILESYSTEM.to_string(),
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        );
        assert_eq!(
            t.describe(),
            "gpt: p1 EFI System 50 KiB \"EFI\", p3 Linux root (x86-64) (boot) 940.5 KiB \"root\""
        );
    }

    #[test]
    fn gpt_4k_sectors() {
        let t = PartitionTable::read(&disk(gpt_disk(4096)))
            .unwrap()
            .unwrap();
        assert_eq!(t.sector_size, 4096);
        assert_eq!(t.partitions[0].start_bytes, 6 * 4096);
    }

    #[test]
    fn gpt_4k_backup_without_primary_signature() {
        let mut img = gpt_disk(4096);
        img[4096] = b'X';
        let t = PartitionTable::read(&disk(img)).unwrap().unwrap();
        assert_eq!(t.sector_size, 4096);
        assert_eq!(t.partitions.len(), 2);
        assert!(
            t.notes[0].contains("no \"EFI PART\" signature at offset 512"),
            "{:?}",
            t.notes
        );
    }

    #[test]
    fn gpt_bad_primary_crc_uses_backup() {
        let mut img = gpt_disk(512);
        img[512 + 40] ^= 1; // first_usable, under the header CRC
        let t = PartitionTable::read(&disk(img)).unwrap().unwrap();
        assert_eq!(t.partitions.len(), 2);
        assert!(
            t.notes[0].contains("header CRC32 mismatch at offset 512"),
            "{:?}",
            t.notes
        );
        assert!(
            t.notes[0].contains("backup at offset 1048064"),
            "{:?}",
            t.notes
        );
        // A bad entry array behind the primary header: backup too.
        let mut img = gpt_disk(512);
        img[1024 + 200] ^= 1;
        let t = PartitionTable::read(&disk(img)).unwrap().unwrap();
        assert!(
            t.notes[0].contains("entry array CRC32 mismatch at offset 1024"),
            "{:?}",
            t.notes
        );
    }

    #[test]
    fn gpt_both_bad() {
        let mut img = gpt_disk(512);
        img[512 + 40] ^= 1;
        let n = img.len();
        img[n - 512] = b'X';
        let e = PartitionTable::read(&disk(img)).unwrap_err();
        match &e {
            PartError::Gpt { primary, backup } => {
                assert!(matches!(primary, GptProblem::HeaderCrc { offset: 512, .. }));
                assert_eq!(
                    *backup,
                    GptProblem::NoSignature {
                        offset: (n - 512) as u64
                    }
                );
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn gpt_absurd_entry_array() {
        let mut img = gpt_disk(512);
        // 2^32 - 1 entries: refused before any allocation.
        img[512 + 80..512 + 84].copy_from_slice(&u32::MAX.to_le_bytes());
        img[512 + 16..512 + 20].fill(0);
        let crc = crc32fast::hash(&img[512..512 + 92]);
        img[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        let n = img.len();
        img[n - 512] = b'X';
        let e = PartitionTable::read(&disk(img)).unwrap_err();
        assert!(e.to_string().contains("exceed 4 MiB"), "{e}");
    }

    #[test]
    fn fuzz_input_survives_garbage() {
        fuzz_input(&[]);
        fuzz_input(&mbr_disk());
        fuzz_input(&gpt_disk(512));
    }
}
