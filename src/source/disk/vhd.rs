//! VHD (Microsoft Virtual Hard Disk, "conectix" footer) as a [`ReadAt`].
//!
//! Three disk types share one 512-byte big-endian footer:
//!
//! * **fixed**: the raw disk bytes followed by the footer;
//! * **dynamic**: a footer copy at offset 0, a "cxsparse" dynamic header, a
//!   block allocation table (BAT) of big-endian sector numbers, then blocks,
//!   each a sector bitmap followed by `block_size` data bytes; unallocated
//!   blocks read as zeros;
//! * **differencing**: a dynamic layout whose unallocated blocks, and the
//!   sectors of allocated blocks whose bitmap bit is clear, come from a parent
//!   disk the caller supplies ([`Vhd::open_with_parent`]).
//!
//! Everything the BAT points at is validated when the disk is opened (inside
//! the file, no overlaps), so reads only fail on I/O errors.

use std::fmt;
use std::io;
use std::sync::Arc;

use super::ReadAt;

const SECTOR: u64 = 512;
const FOOTER_LEN: usize = 512;
const DYN_HEADER_LEN: usize = 1024;
const UNALLOCATED: u32 = 0xFFFF_FFFF;
/// The VHD specification caps disks at 2040 GiB; Hyper-V and qemu stay below
/// it too. Accept up to 64 TiB so a slightly out-of-spec vendor image still
/// opens, while a corrupt size field is still refused.
const MAX_DISK_SIZE: u64 = 64 << 40;
/// Every known writer uses 2 MiB blocks (the spec default); the bounds only
/// keep the bitmap and per-block arithmetic sane.
const MIN_BLOCK_SIZE: u64 = 512;
const MAX_BLOCK_SIZE: u64 = 256 << 20;

/// Errors from opening a VHD. Each names the byte offset in the file where
/// the input went wrong.
#[derive(Debug, thiserror::Error)]
pub enum VhdError {
    /// The underlying source failed.
    #[error("vhd: I/O error at offset {offset}: {source}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is shorter than one footer.
    #[error("vhd: the file ({size} bytes) is too small to hold a 512-byte footer")]
    TooSmall {
        /// File size.
        size: u64,
    },
    /// Neither the end of the file nor offset 0 holds a "conectix" footer.
    #[error("vhd: no \"conectix\" footer at offset {offset} (nor a footer copy at offset 0)")]
    NoFooter {
        /// Where the footer was expected.
        offset: u64,
    },
    /// A footer's checksum does not match its bytes.
    #[error("vhd: footer checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    FooterChecksum {
        /// Footer offset.
        offset: u64,
        /// The checksum field.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// The footer's disk type is not fixed (2), dynamic (3) or differencing (4).
    #[error("vhd: unsupported disk type {disk_type} in the footer at offset {offset}")]
    DiskType {
        /// Footer offset.
        offset: u64,
        /// The disk type field.
        disk_type: u32,
    },
    /// The footer's current size is unusable.
    #[error("vhd: disk size {size} in the footer at offset {offset} {reason}")]
    DiskSize {
        /// Footer offset.
        offset: u64,
        /// The current size field.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A fixed disk's data does not fit before its footer.
    #[error("vhd: fixed disk of {size} bytes does not fit before the footer at offset {offset}")]
    FixedTooShort {
        /// Footer offset.
        offset: u64,
        /// The disk size.
        size: u64,
    },
    /// The footer's data offset does not lead to a "cxsparse" header.
    #[error("vhd: no \"cxsparse\" dynamic header at offset {offset}")]
    NoDynamicHeader {
        /// Where the header was expected.
        offset: u64,
    },
    /// The dynamic header's checksum does not match its bytes.
    #[error("vhd: dynamic header checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// Header offset.
        offset: u64,
        /// The checksum field.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// The block size is not a power of two in the accepted range.
    #[error("vhd: dynamic header at offset {offset}: block size {block_size} is not a power of two between 512 B and 256 MiB")]
    BlockSize {
        /// Header offset.
        offset: u64,
        /// The block size field.
        block_size: u32,
    },
    /// The BAT does not fit in the file.
    #[error("vhd: dynamic header at offset {offset}: BAT of {entries} entries at offset {bat_offset} does not fit in the {file_size}-byte file")]
    BatPastEnd {
        /// Header offset.
        offset: u64,
        /// BAT offset.
        bat_offset: u64,
        /// Number of BAT entries.
        entries: u64,
        /// File size.
        file_size: u64,
    },
    /// The BAT has fewer entries than the disk has blocks.
    #[error("vhd: dynamic header at offset {offset}: {entries} BAT entries of {block_size}-byte blocks cannot cover the disk size {size}")]
    BatTooSmall {
        /// Header offset.
        offset: u64,
        /// Number of BAT entries.
        entries: u64,
        /// Block size.
        block_size: u64,
        /// Disk size.
        size: u64,
    },
    /// A BAT entry points past the end of the file.
    #[error("vhd: BAT entry {index} at offset {offset} points past the end of the file (sector {sector})")]
    BlockPastEnd {
        /// Entry index (block number).
        index: u64,
        /// Offset of the entry in the file.
        offset: u64,
        /// The sector number it holds.
        sector: u32,
    },
    /// A BAT entry points into metadata or into another block.
    #[error("vhd: BAT entry {index} at offset {offset} (sector {sector}) overlaps {what}")]
    BlockOverlap {
        /// Entry index (block number).
        index: u64,
        /// Offset of the entry in the file.
        offset: u64,
        /// The sector number it holds.
        sector: u32,
        /// What it overlaps.
        what: String,
    },
    /// A differencing disk was opened without its parent.
    #[error(
        "vhd: differencing disk needs its parent {name:?}: open it with Vhd::open_with_parent"
    )]
    ParentRequired {
        /// The parent's name from the dynamic header.
        name: String,
    },
    /// A parent was supplied for a disk that is not differencing.
    #[error("vhd: a parent was given but the disk (footer at offset {offset}) is {kind}, not differencing")]
    UnexpectedParent {
        /// Footer offset.
        offset: u64,
        /// The disk type.
        kind: VhdKind,
    },
}

/// The VHD disk type (footer field at offset 60).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdKind {
    /// Raw bytes followed by the footer.
    Fixed,
    /// Sparse, unallocated blocks read as zeros.
    Dynamic,
    /// Sparse over a parent disk.
    Differencing,
}

impl fmt::Display for VhdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VhdKind::Fixed => "fixed",
            VhdKind::Dynamic => "dynamic",
            VhdKind::Differencing => "differencing",
        })
    }
}

/// A VHD image read as its virtual disk.
///
/// ```no_run
/// use kiln::disk::{vhd::Vhd, FileSource, ReadAt};
/// use std::sync::Arc;
///
/// let file: Arc<dyn ReadAt> = Arc::new(FileSource::open("disk.vhd".as_ref())?);
/// let disk = Vhd::open(file)?;
/// println!("{}", disk.describe()); // e.g. "vhd dynamic 626 MiB"
/// let mut mbr = [0u8; 512];
/// disk.read_exact_at(&mut mbr, 0)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Vhd {
    src: Arc<dyn ReadAt>,
    kind: VhdKind,
    size: u64,
    creator_app: [u8; 4],
    unique_id: [u8; 16],
    /// Block size (dynamic and differencing; 0 for fixed).
    block_size: u64,
    /// Bytes of sector bitmap in front of each block (a whole number of sectors).
    bitmap_size: u64,
    /// One entry per block of the disk (only the entries the disk size needs).
    bat: Vec<u32>,
    parent: Option<Arc<dyn ReadAt>>,
    parent_name: Option<String>,
    parent_unique_id: Option<[u8; 16]>,
}

impl fmt::Debug for Vhd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vhd")
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("parent_name", &self.parent_name)
            .finish()
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The one's complement of the byte sum, skipping the 4-byte checksum field
/// (footer and dynamic header use the same scheme).
fn checksum(buf: &[u8], field: usize) -> u32 {
    let sum = buf
        .iter()
        .enumerate()
        .filter(|(i, _)| *i < field || *i >= field + 4)
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    !sum
}

fn read(src: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<(), VhdError> {
    src.read_exact_at(buf, offset)
        .map_err(|source| VhdError::Io { offset, source })
}

/// Reads from `src`, zero-filling whatever lies past its end (a parent
/// smaller than its child reads as zeros there).
fn read_or_zero(src: &dyn ReadAt, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let avail = src.size().saturating_sub(offset);
    let n = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
    src.read_exact_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}

struct Footer {
    offset: u64,
    kind: VhdKind,
    data_offset: u64,
    size: u64,
    creator_app: [u8; 4],
    unique_id: [u8; 16],
}

fn parse_footer(b: &[u8; FOOTER_LEN], offset: u64) -> Result<Footer, VhdError> {
    let stored = be32(b, 64);
    let computed = checksum(b, 64);
    if stored != computed {
        return Err(VhdError::FooterChecksum {
            offset,
            stored,
            computed,
        });
    }
    let kind = match be32(b, 60) {
        2 => VhdKind::Fixed,
        3 => VhdKind::Dynamic,
        4 => VhdKind::Differencing,
        disk_type => return Err(VhdError::DiskType { offset, disk_type }),
    };
    // Virtual PC (creator "vpc ") and old qemu ("qemu") derive the size from
    // the CHS geometry at offset 56, Hyper-V ("win "), disk2vhd and newer
    // qemu ("qem2", force_size) from current_size. Every writer keeps
    // current_size equal to or above the geometry's size, so current_size is
    // the one that never truncates the disk.
    let size = be64(b, 48);
    if !size.is_multiple_of(SECTOR) {
        return Err(VhdError::DiskSize {
            offset,
            size,
            reason: "is not a multiple of 512",
        });
    }
    if size > MAX_DISK_SIZE {
        return Err(VhdError::DiskSize {
            offset,
            size,
            reason: "is larger than 64 TiB",
        });
    }
    let mut creator_app = [0u8; 4];
    creator_app.copy_from_slice(&b[28..32]);
    let mut unique_id = [0u8; 16];
    unique_id.copy_from_slice(&b[68..84]);
    Ok(Footer {
        offset,
        kind,
        data_offset: be64(b, 16),
        size,
        creator_app,
        unique_id,
    })
}

/// Finds the footer. Dynamic and differencing disks keep a copy at offset 0
/// (qemu reads that one first, so a tail footer lost to truncation does not
/// matter); fixed disks only have the one at the end.
fn find_footer(src: &dyn ReadAt) -> Result<Footer, VhdError> {
    let file_size = src.size();
    if file_size < FOOTER_LEN as u64 {
        return Err(VhdError::TooSmall { size: file_size });
    }
    let mut head_err = None;
    let mut head = [0u8; FOOTER_LEN];
    read(src, &mut head, 0)?;
    if &head[..8] == b"conectix" {
        match parse_footer(&head, 0) {
            Ok(f) if f.kind != VhdKind::Fixed => return Ok(f),
            // A fixed disk whose data happens to start with a footer: the
            // real footer is the one at the end.
            Ok(_) => {}
            Err(e) => head_err = Some(e),
        }
    }
    let end = file_size - FOOTER_LEN as u64;
    let mut tail = [0u8; FOOTER_LEN];
    read(src, &mut tail, end)?;
    if &tail[..8] == b"conectix" {
        return parse_footer(&tail, end);
    }
    Err(head_err.unwrap_or(VhdError::NoFooter { offset: end }))
}

/// UTF-16 big-endian, up to the first NUL.
fn utf16be(b: &[u8]) -> String {
    let units: Vec<u16> = (0..b.len() / 2)
        .map(|i| be16(b, 2 * i))
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

impl Vhd {
    /// Opens a fixed or dynamic VHD. A differencing disk fails with
    /// [`VhdError::ParentRequired`], which names the parent.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<Vhd, VhdError> {
        Vhd::open_inner(src, None)
    }

    /// Opens a differencing VHD over `parent`, the parent's virtual disk
    /// (itself typically a [`Vhd`]). Unallocated blocks, and sectors whose
    /// bitmap bit is clear, read from `parent`; past its end they read as
    /// zeros. The caller is responsible for picking the right parent (compare
    /// [`Vhd::parent_unique_id`] with the parent's [`Vhd::unique_id`]).
    pub fn open_with_parent(
        src: Arc<dyn ReadAt>,
        parent: Arc<dyn ReadAt>,
    ) -> Result<Vhd, VhdError> {
        Vhd::open_inner(src, Some(parent))
    }

    fn open_inner(src: Arc<dyn ReadAt>, parent: Option<Arc<dyn ReadAt>>) -> Result<Vhd, VhdError> {
        let file_size = src.size();
        let footer = find_footer(&*src)?;
        if parent.is_some() && footer.kind != VhdKind::Differencing {
            return Err(VhdError::UnexpectedParent {
                offset: footer.offset,
                kind: footer.kind,
            });
        }
        let mut vhd = Vhd {
            src: src.clone(),
            kind: footer.kind,
            size: footer.size,
            creator_app: footer.creator_app,
            unique_id: footer.unique_id,
            block_size: 0,
            bitmap_size: 0,
            bat: Vec::new(),
            parent: None,
            parent_name: None,
            parent_unique_id: None,
        };
        if footer.kind == VhdKind::Fixed {
            // The footer sits right after the data (or, for a fixed disk
            // whose tail footer is missing, nowhere: find_footer refused it).
            if footer.size > footer.offset {
                return Err(VhdError::FixedTooShort {
                    offset: footer.offset,
                    size: footer.size,
                });
            }
            return Ok(vhd);
        }

        let dh = footer.data_offset;
        if dh
            .checked_add(DYN_HEADER_LEN as u64)
            .is_none_or(|end| end > file_size)
        {
            return Err(VhdError::NoDynamicHeader { offset: dh });
        }
        let mut h = [0u8; DYN_HEADER_LEN];
        read(&*src, &mut h, dh)?;
        if &h[..8] != b"cxsparse" {
            return Err(VhdError::NoDynamicHeader { offset: dh });
        }
        let stored = be32(&h, 36);
        let computed = checksum(&h, 36);
        if stored != computed {
            return Err(VhdError::HeaderChecksum {
                offset: dh,
                stored,
                computed,
            });
        }
        let bs32 = be32(&h, 32);
        let block_size = u64::from(bs32);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(VhdError::BlockSize {
                offset: dh,
                block_size: bs32,
            });
        }
        // One bit per sector, padded to whole sectors.
        let bitmap_size = (block_size / SECTOR).div_ceil(8).div_ceil(SECTOR) * SECTOR;
        let bat_offset = be64(&h, 16);
        let entries = u64::from(be32(&h, 28));
        let bat_bytes = entries * 4;
        if bat_offset
            .checked_add(bat_bytes)
            .is_none_or(|end| end > file_size)
        {
            return Err(VhdError::BatPastEnd {
                offset: dh,
                bat_offset,
                entries,
                file_size,
            });
        }
        let blocks = footer.size.div_ceil(block_size);
        if blocks > entries {
            return Err(VhdError::BatTooSmall {
                offset: dh,
                entries,
                block_size,
                size: footer.size,
            });
        }
        // `blocks <= entries` and the BAT fits in the file, so this
        // allocation is bounded by the file size.
        let mut raw = vec![0u8; (blocks * 4) as usize];
        read(&*src, &mut raw, bat_offset)?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| be32(c, 0)).collect();
        drop(raw);

        vhd.block_size = block_size;
        vhd.bitmap_size = bitmap_size;
        vhd.validate_bat(&bat, bat_offset, entries, dh, file_size)?;
        vhd.bat = bat;

        if footer.kind == VhdKind::Differencing {
            let name = utf16be(&h[64..576]);
            let mut id = [0u8; 16];
            id.copy_from_slice(&h[40..56]);
            vhd.parent_unique_id = Some(id);
            match parent {
                Some(p) => vhd.parent = Some(p),
                None => return Err(VhdError::ParentRequired { name }),
            }
            vhd.parent_name = Some(name);
        }
        Ok(vhd)
    }

    /// Every allocated block must lie inside the file and overlap neither the
    /// metadata nor another block: reads then never fail on structure, and
    /// a crafted BAT cannot make one file sector appear at many disk offsets.
    fn validate_bat(
        &self,
        bat: &[u32],
        bat_offset: u64,
        entries: u64,
        dh: u64,
        file_size: u64,
    ) -> Result<(), VhdError> {
        let stride = self.bitmap_size + self.block_size;
        let entry_off = |i: usize| bat_offset + 4 * i as u64;
        let allocated = bat.iter().filter(|s| **s != UNALLOCATED).count() as u64;
        let mut blocks: Vec<(u64, usize)> = Vec::new();
        for (i, &sector) in bat.iter().enumerate() {
            if sector == UNALLOCATED {
                continue;
            }
            let start = u64::from(sector) * SECTOR;
            if start + stride > file_size {
                return Err(VhdError::BlockPastEnd {
                    index: i as u64,
                    offset: entry_off(i),
                    sector,
                });
            }
            if blocks.is_empty() {
                // All blocks are inside the file, so if they do not fit side
                // by side some overlap: the sort below finds which. Reserve
                // only once that is plausible.
                blocks.reserve(allocated.min(file_size / stride + 1) as usize);
            }
            blocks.push((start, i));
        }
        let metadata = [
            (
                0u64,
                FOOTER_LEN as u64,
                "the footer copy at offset 0".to_string(),
            ),
            (
                dh,
                DYN_HEADER_LEN as u64,
                format!("the dynamic header at offset {dh}"),
            ),
            (
                bat_offset,
                (entries * 4).div_ceil(SECTOR) * SECTOR,
                format!("the BAT at offset {bat_offset}"),
            ),
        ];
        for &(start, i) in &blocks {
            for (m_start, m_len, what) in &metadata {
                if start < m_start + m_len && *m_start < start + stride {
                    return Err(VhdError::BlockOverlap {
                        index: i as u64,
                        offset: entry_off(i),
                        sector: bat[i],
                        what: what.clone(),
                    });
                }
            }
        }
        blocks.sort_unstable();
        for w in blocks.windows(2) {
            let ((a, ai), (b, bi)) = (w[0], w[1]);
            if a + stride > b {
                return Err(VhdError::BlockOverlap {
                    index: bi as u64,
                    offset: entry_off(bi),
                    sector: bat[bi],
                    what: format!("block {ai} (sector {})", bat[ai]),
                });
            }
        }
        Ok(())
    }

    /// The disk type.
    pub fn kind(&self) -> VhdKind {
        self.kind
    }

    /// The block size of a dynamic or differencing disk.
    pub fn block_size(&self) -> Option<u64> {
        (self.kind != VhdKind::Fixed).then_some(self.block_size)
    }

    /// The footer's creator application, e.g. `"win "` (Hyper-V), `"qem2"`.
    pub fn creator_app(&self) -> String {
        String::from_utf8_lossy(&self.creator_app).into_owned()
    }

    /// The footer's unique id (a differencing child records its parent's).
    pub fn unique_id(&self) -> [u8; 16] {
        self.unique_id
    }

    /// The parent's unique id, for a differencing disk.
    pub fn parent_unique_id(&self) -> Option<[u8; 16]> {
        self.parent_unique_id
    }

    /// The parent's name from the dynamic header (Hyper-V stores an absolute
    /// path), for a differencing disk.
    pub fn parent_name(&self) -> Option<&str> {
        self.parent_name.as_deref()
    }

    /// Whether the block holding `offset` is allocated in this file. Cheap
    /// (no I/O) and block-granular: `false` means the block reads as zeros
    /// (dynamic) or from the parent (differencing); fixed disks are fully
    /// allocated. Past the end: `false`.
    pub fn allocated(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        match self.kind {
            VhdKind::Fixed => true,
            _ => self
                .bat
                .get((offset / self.block_size) as usize)
                .is_some_and(|s| *s != UNALLOCATED),
        }
    }

    /// A one-line summary, e.g. `vhd dynamic 626 MiB`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "vhd {} {}",
            self.kind,
            crate::progress::human_bytes(self.size)
        );
        if let Some(name) = &self.parent_name {
            s.push_str(&format!(", parent {name:?}"));
        }
        s
    }

    /// Reads `buf.len()` bytes at `pos` that all lie in one block.
    fn read_in_block(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let index = (pos / self.block_size) as usize;
        let in_block = pos % self.block_size;
        let sector = self.bat.get(index).copied().unwrap_or(UNALLOCATED);
        if sector == UNALLOCATED {
            match &self.parent {
                Some(p) => return read_or_zero(&**p, buf, pos),
                None => {
                    buf.fill(0);
                    return Ok(());
                }
            }
        }
        let bitmap_at = u64::from(sector) * SECTOR;
        let data_at = bitmap_at + self.bitmap_size + in_block;
        let Some(parent) = &self.parent else {
            // Dynamic disks: qemu and Hyper-V zero-fill a block when they
            // allocate it (qemu even sets every bitmap bit), so the data is
            // authoritative and the bitmap is not consulted, as in qemu.
            return self.src.read_exact_at(buf, data_at);
        };
        // Differencing: bit set (most significant bit first, as in Xen's
        // libvhd and Hyper-V) = the sector is in this file; clear = parent.
        let first = in_block / SECTOR;
        let last = (in_block + buf.len() as u64 - 1) / SECTOR;
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        self.src.read_exact_at(&mut bits, bitmap_at + first / 8)?;
        let bit = |s: u64| {
            let byte = bits[((s / 8) - first / 8) as usize];
            byte & (0x80 >> (s % 8)) != 0
        };
        let mut s = first;
        let mut done = 0usize;
        while s <= last {
            let here = bit(s);
            let mut e = s + 1;
            while e <= last && bit(e) == here {
                e += 1;
            }
            // Bytes of buf covered by sectors [s, e).
            let run_end = (e * SECTOR).min(in_block + buf.len() as u64);
            let len = (run_end - (in_block + done as u64)) as usize;
            let chunk = &mut buf[done..done + len];
            let at = in_block + done as u64;
            if here {
                self.src
                    .read_exact_at(chunk, bitmap_at + self.bitmap_size + at)?;
            } else {
                read_or_zero(&**parent, chunk, pos - in_block + at)?;
            }
            done += len;
            s = e;
        }
        Ok(())
    }
}

impl ReadAt for Vhd {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
        let buf = &mut buf[..n];
        if self.kind == VhdKind::Fixed {
            self.src.read_exact_at(buf, offset)?;
            return Ok(n);
        }
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let room = self.block_size - pos % self.block_size;
            let len = (n - done).min(usize::try_from(room).unwrap_or(usize::MAX));
            self.read_in_block(&mut buf[done..done + len], pos)?;
            done += len;
        }
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// Opens `data` as a VHD (with a parent of zeros when it is differencing)
/// and reads its virtual disk, ignoring errors: the entry point of a future
/// cargo-fuzz target.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    let src: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let disk = match Vhd::open(src.clone()) {
        Err(VhdError::ParentRequired { .. }) => {
            let parent: Arc<dyn ReadAt> = Arc::new(vec![0x5au8; 64 << 10]);
            Vhd::open_with_parent(src, parent)
        }
        other => other,
    };
    if let Ok(disk) = disk {
        super::part::fuzz_read_all(&disk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn set_checksum(b: &mut [u8], field: usize) {
        b[field..field + 4].fill(0);
        let c = checksum(b, field);
        b[field..field + 4].copy_from_slice(&c.to_be_bytes());
    }

    fn footer(kind: u32, size: u64, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[28..32].copy_from_slice(b"test");
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&kind.to_be_bytes());
        f[68..84].copy_from_slice(&[7u8; 16]);
        set_checksum(&mut f, 64);
        f
    }

    /// A dynamic (kind 3) or differencing (4) disk of 4 blocks of 4 KiB:
    /// block 1 allocated and filled with 0x11, block 3 with 0x33. Layout:
    /// footer copy 0, header 512, BAT 1536 (512 bytes), block 1 at 2048,
    /// block 3 at 2048 + 512 + 4096, footer at the end.
    fn dynamic(kind: u32) -> Vec<u8> {
        let bs = 4096u64;
        let size = 4 * bs;
        let mut img = footer(kind, size, 512);
        let mut h = vec![0u8; 1024];
        h[..8].copy_from_slice(b"cxsparse");
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        h[24..28].copy_from_slice(&0x0001_0000u32.to_be_bytes());
        h[28..32].copy_from_slice(&4u32.to_be_bytes());
        h[32..36].copy_from_slice(&(bs as u32).to_be_bytes());
        h[40..56].copy_from_slice(&[9u8; 16]);
        for (i, u) in "parent.vhd".encode_utf16().enumerate() {
            h[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        set_checksum(&mut h, 36);
        img.extend_from_slice(&h);
        let mut bat = vec![0xffu8; 512];
        bat[4..8].copy_from_slice(&4u32.to_be_bytes());
        bat[12..16].copy_from_slice(&(4u32 + 9).to_be_bytes());
        img.extend_from_slice(&bat);
        for fill in [0x11u8, 0x33] {
            let mut bitmap = vec![0u8; 512];
            bitmap[0] = 0xff; // 8 sectors = the whole 4 KiB block
            img.extend_from_slice(&bitmap);
            img.extend_from_slice(&vec![fill; bs as usize]);
        }
        img.extend_from_slice(&footer(kind, size, 512));
        img
    }

    fn open(img: Vec<u8>) -> Result<Vhd, VhdError> {
        Vhd::open(Arc::new(img))
    }

    fn read_all(d: &dyn ReadAt) -> Vec<u8> {
        let mut out = Vec::new();
        Cursor::new(d, 0).read_to_end(&mut out).unwrap();
        out
    }

    use super::super::Cursor;

    #[test]
    fn fixed_reads_data_before_footer() {
        let mut img: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        img.extend_from_slice(&footer(2, 4096, u64::MAX));
        let d = open(img.clone()).unwrap();
        assert_eq!(d.kind(), VhdKind::Fixed);
        assert_eq!(read_all(&d), img[..4096]);
        assert_eq!(d.describe(), "vhd fixed 4 KiB");
        assert!(d.allocated(0) && !d.allocated(4096));
    }

    #[test]
    fn dynamic_reads_blocks_and_zeros() {
        let d = open(dynamic(3)).unwrap();
        let all = read_all(&d);
        assert_eq!(all.len(), 16384);
        assert!(all[..4096].iter().all(|b| *b == 0));
        assert!(all[4096..8192].iter().all(|b| *b == 0x11));
        assert!(all[8192..12288].iter().all(|b| *b == 0));
        assert!(all[12288..].iter().all(|b| *b == 0x33));
        assert!(!d.allocated(0) && d.allocated(4096));
        // A read straddling blocks.
        let mut buf = [0u8; 8];
        d.read_exact_at(&mut buf, 8188).unwrap();
        assert_eq!(buf, [0x11, 0x11, 0x11, 0x11, 0, 0, 0, 0]);
    }

    #[test]
    fn differencing_uses_bitmap_and_parent() {
        let mut img = dynamic(4);
        // Block 1: only sectors 1 and 2 are in the child.
        img[2048] = 0b0110_0000;
        assert!(matches!(
            open(img.clone()),
            Err(VhdError::ParentRequired { ref name }) if name == "parent.vhd"
        ));
        let parent: Arc<dyn ReadAt> = Arc::new(vec![0xeeu8; 16384]);
        let d = Vhd::open_with_parent(Arc::new(img), parent).unwrap();
        assert_eq!(d.parent_name(), Some("parent.vhd"));
        assert_eq!(d.parent_unique_id(), Some([9u8; 16]));
        let all = read_all(&d);
        assert!(all[..4096].iter().all(|b| *b == 0xee));
        assert!(all[4096..4608].iter().all(|b| *b == 0xee));
        assert!(all[4608..5632].iter().all(|b| *b == 0x11));
        assert!(all[5632..8192].iter().all(|b| *b == 0xee));
        assert!(all[12288..].iter().all(|b| *b == 0x33));
        // Unaligned read across the run boundaries.
        let mut buf = [0u8; 1030];
        d.read_exact_at(&mut buf, 4605).unwrap();
        assert_eq!(&buf[..3], &[0xee; 3]);
        assert!(buf[3..1027].iter().all(|b| *b == 0x11));
        assert_eq!(&buf[1027..], &[0xee; 3]);
    }

    #[test]
    fn parent_for_dynamic_is_refused() {
        let parent: Arc<dyn ReadAt> = Arc::new(vec![0u8; 16]);
        let e = Vhd::open_with_parent(Arc::new(dynamic(3)), parent).unwrap_err();
        assert!(
            matches!(
                e,
                VhdError::UnexpectedParent {
                    kind: VhdKind::Dynamic,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn truncated_and_missing_footer() {
        assert!(matches!(
            open(vec![0u8; 100]),
            Err(VhdError::TooSmall { size: 100 })
        ));
        let e = open(vec![0u8; 4096]).unwrap_err();
        assert!(matches!(e, VhdError::NoFooter { offset: 3584 }), "{e}");
        // A fixed disk cut in its footer.
        let mut img = vec![0u8; 4096];
        img.extend_from_slice(&footer(2, 4096, u64::MAX)[..300]);
        assert!(matches!(open(img).unwrap_err(), VhdError::NoFooter { .. }));
    }

    #[test]
    fn bad_footer_checksum_names_offset() {
        let mut img = vec![0u8; 1024];
        let mut f = footer(2, 1024, u64::MAX);
        f[100] ^= 1;
        img.extend_from_slice(&f);
        let e = open(img).unwrap_err();
        assert!(
            matches!(e, VhdError::FooterChecksum { offset: 1024, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("offset 1024"), "{e}");
    }

    #[test]
    fn dynamic_with_bad_head_copy_falls_back_to_tail() {
        let mut img = dynamic(3);
        img[100] ^= 1; // head copy checksum now wrong
        let d = open(img).unwrap();
        assert_eq!(d.kind(), VhdKind::Dynamic);
        let mut img = dynamic(3);
        img[100] ^= 1;
        let n = img.len();
        img[n - 100] ^= 1;
        // Tail is bad too: the tail's error wins (it is the canonical footer).
        assert!(matches!(
            open(img).unwrap_err(),
            VhdError::FooterChecksum { offset, .. } if offset == (n - 512) as u64
        ));
    }

    #[test]
    fn bad_header_checksum() {
        let mut img = dynamic(3);
        img[512 + 200] ^= 1;
        let e = open(img).unwrap_err();
        assert!(
            matches!(e, VhdError::HeaderChecksum { offset: 512, .. }),
            "{e}"
        );
    }

    fn patch_header(img: &mut [u8], at: usize, bytes: &[u8]) {
        img[512 + at..512 + at + bytes.len()].copy_from_slice(bytes);
        set_checksum(&mut img[512..1536], 36);
    }

    fn patch_footers(img: &mut [u8], at: usize, bytes: &[u8]) {
        let n = img.len();
        for start in [0, n - 512] {
            img[start + at..start + at + bytes.len()].copy_from_slice(bytes);
            set_checksum(&mut img[start..start + 512], 64);
        }
    }

    #[test]
    fn absurd_block_sizes() {
        for bs in [0u32, 1000, 256, 1 << 30] {
            let mut img = dynamic(3);
            patch_header(&mut img, 32, &bs.to_be_bytes());
            let e = open(img).unwrap_err();
            assert!(
                matches!(e, VhdError::BlockSize { offset: 512, block_size } if block_size == bs),
                "{e}"
            );
        }
    }

    #[test]
    fn absurd_disk_sizes() {
        let mut img = dynamic(3);
        patch_footers(&mut img, 48, &(1u64 << 60).to_be_bytes());
        assert!(matches!(
            open(img).unwrap_err(),
            VhdError::DiskSize { size, .. } if size == 1 << 60
        ));
        let mut img = dynamic(3);
        patch_footers(&mut img, 48, &1000u64.to_be_bytes());
        assert!(matches!(open(img).unwrap_err(), VhdError::DiskSize { .. }));
        // Larger than the BAT can cover.
        let mut img = dynamic(3);
        patch_footers(&mut img, 48, &(1u64 << 30).to_be_bytes());
        let e = open(img).unwrap_err();
        assert!(matches!(e, VhdError::BatTooSmall { entries: 4, .. }), "{e}");
        // Fixed disk claiming more than the file holds.
        let mut img = vec![0u8; 1024];
        img.extend_from_slice(&footer(2, 1 << 20, u64::MAX));
        assert!(matches!(
            open(img).unwrap_err(),
            VhdError::FixedTooShort { offset: 1024, .. }
        ));
    }

    #[test]
    fn bat_past_end_of_file() {
        let mut img = dynamic(3);
        patch_header(&mut img, 28, &0x4000_0000u32.to_be_bytes());
        let e = open(img).unwrap_err();
        assert!(
            matches!(
                e,
                VhdError::BatPastEnd {
                    offset: 512,
                    bat_offset: 1536,
                    ..
                }
            ),
            "{e}"
        );
        let mut img = dynamic(3);
        patch_header(&mut img, 16, &u64::MAX.to_be_bytes());
        assert!(matches!(
            open(img).unwrap_err(),
            VhdError::BatPastEnd { .. }
        ));
    }

    #[test]
    fn bat_entry_past_end_names_entry() {
        let mut img = dynamic(3);
        img[1536 + 12..1536 + 16].copy_from_slice(&999_999u32.to_be_bytes());
        let e = open(img).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vhd: BAT entry 3 at offset 1548 points past the end of the file (sector 999999)"
        );
    }

    #[test]
    fn overlapping_blocks() {
        let mut img = dynamic(3);
        img[1536 + 12..1536 + 16].copy_from_slice(&5u32.to_be_bytes());
        let e = open(img).unwrap_err();
        assert!(matches!(e, VhdError::BlockOverlap { index: 3, .. }), "{e}");
        let mut img = dynamic(3);
        img[1536 + 4..1536 + 8].copy_from_slice(&2u32.to_be_bytes());
        let e = open(img).unwrap_err();
        assert!(
            e.to_string()
                .contains("overlaps the dynamic header at offset 512"),
            "{e}"
        );
    }

    #[test]
    fn no_dynamic_header() {
        let mut img = dynamic(3);
        patch_footers(&mut img, 16, &(1u64 << 40).to_be_bytes());
        assert!(
            matches!(open(img).unwrap_err(), VhdError::NoDynamicHeader { offset } if offset == 1 << 40)
        );
        let mut img = dynamic(3);
        img[512] = b'X';
        assert!(matches!(
            open(img).unwrap_err(),
            VhdError::NoDynamicHeader { offset: 512 }
        ));
    }

    #[test]
    fn unknown_disk_type() {
        let mut img = dynamic(3);
        patch_footers(&mut img, 60, &5u32.to_be_bytes());
        assert!(matches!(
            open(img).unwrap_err(),
            VhdError::DiskType { disk_type: 5, .. }
        ));
    }

    #[test]
    fn fuzz_input_survives_garbage() {
        fuzz_input(&[]);
        fuzz_input(&dynamic(3));
        fuzz_input(&dynamic(4));
        let mut img = dynamic(4);
        img[2048] = 0xaa;
        fuzz_input(&img);
    }
}
