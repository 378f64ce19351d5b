//! Inodes, block mapping (extent trees and indirect blocks) and the
//! streaming file-data reader.

use std::collections::HashSet;
use std::io;

use super::error::{ExtError, PathCtx};
use super::superblock::{le16, le32, read_exact, INCOMPAT_64BIT, RO_COMPAT_HUGE_FILE};
use super::ExtFs;
use crate::source::disk::ReadAt;

pub(crate) const S_IFMT: u16 = 0xF000;
pub(crate) const S_IFSOCK: u16 = 0xC000;
pub(crate) const S_IFLNK: u16 = 0xA000;
pub(crate) const S_IFREG: u16 = 0x8000;
pub(crate) const S_IFBLK: u16 = 0x6000;
pub(crate) const S_IFDIR: u16 = 0x4000;
pub(crate) const S_IFCHR: u16 = 0x2000;
pub(crate) const S_IFIFO: u16 = 0x1000;

pub(crate) const FL_ENCRYPT: u32 = 0x800;
pub(crate) const FL_HUGE_FILE: u32 = 0x40000;
pub(crate) const FL_EXTENTS: u32 = 0x80000;
pub(crate) const FL_EA_INODE: u32 = 0x200000;
pub(crate) const FL_INLINE_DATA: u32 = 0x1000_0000;

/// The size of `i_block`, which holds the block map, a fast symlink, a
/// device number or the first bytes of inline data.
pub(crate) const I_BLOCK_LEN: usize = 60;

/// Deepest extent tree the kernel builds (`EXT4_MAX_EXTENT_DEPTH`).
const MAX_EXTENT_DEPTH: u16 = 5;

/// Bytes read from the device at once for file data.
pub(crate) const READ_CHUNK: usize = 1 << 20;

/// One parsed inode.
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    pub ino: u32,
    /// Byte offset of the inode on the device.
    pub offset: u64,
    pub raw: Vec<u8>,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub links: u16,
    pub flags: u32,
    pub file_acl: u64,
    pub blocks_512: u64,
    pub extra_isize: usize,
}

impl Inode {
    pub(crate) fn parse(
        fs: &ExtFs,
        ino: u32,
        offset: u64,
        raw: Vec<u8>,
    ) -> Result<Inode, ExtError> {
        let sb = &fs.sb;
        let mode = le16(&raw, 0x0);
        let uid = u32::from(le16(&raw, 0x2)) | (u32::from(le16(&raw, 0x78)) << 16);
        let gid = u32::from(le16(&raw, 0x18)) | (u32::from(le16(&raw, 0x7A)) << 16);
        let flags = le32(&raw, 0x20);
        let mut size = u64::from(le32(&raw, 0x4));
        // i_size_high was i_dir_acl for directories before large_dir.
        if mode & S_IFMT != S_IFDIR || sb.has_incompat(super::superblock::INCOMPAT_LARGEDIR) {
            size |= u64::from(le32(&raw, 0x6C)) << 32;
        }
        let mut file_acl = u64::from(le32(&raw, 0x68));
        if sb.has_incompat(INCOMPAT_64BIT) {
            file_acl |= u64::from(le16(&raw, 0x76)) << 32;
        }
        let mut blocks = u64::from(le32(&raw, 0x1C));
        if sb.has_ro_compat(RO_COMPAT_HUGE_FILE) {
            blocks |= u64::from(le16(&raw, 0x74)) << 32;
            if flags & FL_HUGE_FILE != 0 {
                // huge_file: i_blocks counts file-system blocks, not sectors.
                blocks = blocks.saturating_mul(sb.block_size / 512);
            }
        }
        let extra_isize = if raw.len() > 128 {
            usize::from(le16(&raw, 0x80))
        } else {
            0
        };
        if 128 + extra_isize > raw.len() || !extra_isize.is_multiple_of(4) {
            return Err(ExtError::BadInode {
                ino,
                path: PathCtx::default(),
                offset,
                reason: format!(
                    "i_extra_isize {extra_isize} does not fit a {}-byte inode",
                    raw.len()
                ),
            });
        }
        // i_mtime is a signed 32-bit count; ext4's 256-byte inodes extend it
        // with two "epoch" bits in i_mtime_extra (the rest is nanoseconds),
        // added as bits 32-33 on top of the sign-extended value, as the
        // kernel decodes it.
        let mut mtime = i64::from(le32(&raw, 0x10) as i32);
        if extra_isize >= 0x0C {
            mtime += i64::from(le32(&raw, 0x88) & 3) << 32;
        }
        Ok(Inode {
            ino,
            offset,
            mode,
            uid,
            gid,
            size,
            mtime,
            links: le16(&raw, 0x1A),
            flags,
            file_acl,
            blocks_512: blocks,
            extra_isize,
            raw,
        })
    }

    pub(crate) fn kind(&self) -> u16 {
        self.mode & S_IFMT
    }

    pub(crate) fn i_block(&self) -> &[u8] {
        &self.raw[0x28..0x28 + I_BLOCK_LEN]
    }

    pub(crate) fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    pub(crate) fn bad(&self, reason: impl Into<String>) -> ExtError {
        ExtError::BadInode {
            ino: self.ino,
            path: PathCtx::default(),
            offset: self.offset,
            reason: reason.into(),
        }
    }
}

/// A run of contiguous blocks: `len` blocks of the file from logical block
/// `logical` are at device block `physical`; an uninitialized (preallocated)
/// run reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
    pub init: bool,
}

impl Run {
    pub(crate) fn end(&self) -> u64 {
        self.logical + self.len
    }
}

/// Collects runs, merging adjacent ones so data is read in large pieces.
struct Runs {
    runs: Vec<Run>,
    /// Logical blocks at or past this are beyond the file and dropped.
    limit: u64,
}

impl Runs {
    fn push(&mut self, r: Run) {
        if r.logical >= self.limit || r.len == 0 {
            return;
        }
        let r = Run {
            len: r.len.min(self.limit - r.logical),
            ..r
        };
        if let Some(last) = self.runs.last_mut() {
            if last.end() == r.logical
                && last.physical + last.len == r.physical
                && last.init == r.init
            {
                last.len += r.len;
                return;
            }
        }
        self.runs.push(r);
    }
}

struct MapCtx<'a> {
    fs: &'a ExtFs,
    ino: u32,
    /// Metadata blocks of this block map already visited: a block seen
    /// twice is a loop or an amplification attack.
    visited: HashSet<u64>,
    out: Runs,
}

impl MapCtx<'_> {
    fn bad(&self, offset: u64, reason: impl Into<String>) -> ExtError {
        ExtError::BadBlockMap {
            ino: self.ino,
            path: PathCtx::default(),
            offset,
            reason: reason.into(),
        }
    }

    fn check_range(&self, at: u64, physical: u64, len: u64) -> Result<(), ExtError> {
        let total = self.fs.sb.blocks_count;
        if physical == 0 || physical.checked_add(len).is_none_or(|e| e > total) {
            return Err(self.bad(
                at,
                format!("blocks {physical}..+{len} are outside the file system ({total} blocks)"),
            ));
        }
        Ok(())
    }

    fn read_meta_block(&mut self, at: u64, block: u64) -> Result<Vec<u8>, ExtError> {
        self.check_range(at, block, 1)?;
        if !self.visited.insert(block) {
            return Err(self.bad(
                at,
                format!("block map node at block {block} is referenced twice (loop)"),
            ));
        }
        let bs = self.fs.sb.block_size;
        self.fs.charge(bs)?;
        let mut buf = vec![0u8; bs as usize];
        read_exact(&*self.fs.dev, &mut buf, block * bs)?;
        Ok(buf)
    }

    /// Walks one extent tree node (`node` is at device byte `at`).
    fn extent_node(
        &mut self,
        node: &[u8],
        at: u64,
        depth_want: Option<u16>,
        min_logical: u64,
        next_free: &mut u64,
    ) -> Result<(), ExtError> {
        if node.len() < 12 || le16(node, 0) != 0xF30A {
            return Err(self.bad(at, "extent header magic is not 0xf30a"));
        }
        let entries = usize::from(le16(node, 2));
        let max = usize::from(le16(node, 4));
        let depth = le16(node, 6);
        if entries > max || 12 + max * 12 > node.len() {
            return Err(self.bad(
                at,
                format!(
                    "extent node claims {entries} entries (max {max}) in {} bytes",
                    node.len()
                ),
            ));
        }
        if depth > MAX_EXTENT_DEPTH {
            return Err(self.bad(
                at,
                format!("extent tree depth {depth} is over the maximum {MAX_EXTENT_DEPTH}"),
            ));
        }
        // Each level must be exactly one shallower than its parent: with the
        // depth bounded this also rules out cycles through index nodes.
        if let Some(want) = depth_want {
            if depth != want {
                return Err(self.bad(
                    at,
                    format!("extent node has depth {depth}, its parent expects {want}"),
                ));
            }
        }
        for i in 0..entries {
            let e = &node[12 + i * 12..24 + i * 12];
            let eat = at + 12 + i as u64 * 12;
            let lblock = u64::from(le32(e, 0));
            if lblock < min_logical {
                return Err(self.bad(
                    eat,
                    format!("extent entry for block {lblock} is below its index ({min_logical})"),
                ));
            }
            if depth == 0 {
                let raw_len = le16(e, 4);
                // A length over 32768 marks an uninitialized (fallocated)
                // extent of raw_len - 32768 blocks, which reads as zeros.
                let (len, init) = if raw_len > 32768 {
                    (u64::from(raw_len - 32768), false)
                } else {
                    (u64::from(raw_len), true)
                };
                let physical = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                if len == 0 {
                    return Err(self.bad(eat, "zero-length extent"));
                }
                // Extents must be sorted and disjoint across the whole tree;
                // this is what makes a duplicated leaf or a crafted overlap
                // an error rather than repeated data.
                if lblock < *next_free {
                    return Err(self.bad(
                        eat,
                        format!(
                            "extent for block {lblock} overlaps or precedes the previous one (ends at {next_free})"
                        ),
                    ));
                }
                self.check_range(eat, physical, len)?;
                *next_free = lblock + len;
                self.out.push(Run {
                    logical: lblock,
                    physical,
                    len,
                    init,
                });
            } else {
                let child = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
                if lblock < *next_free {
                    return Err(self.bad(
                        eat,
                        format!("extent index for block {lblock} is out of order"),
                    ));
                }
                if lblock >= self.out.limit {
                    // Beyond the end of the file (preallocated past EOF).
                    break;
                }
                let buf = self.read_meta_block(eat, child)?;
                let bs = self.fs.sb.block_size;
                self.extent_node(&buf, child * bs, Some(depth - 1), lblock, next_free)?;
            }
        }
        Ok(())
    }

    /// Walks an indirect block of `level` (1 = its entries are data blocks)
    /// whose first entry maps logical block `base`.
    fn indirect(&mut self, at: u64, block: u64, level: u32, base: u64) -> Result<(), ExtError> {
        if base >= self.out.limit {
            return Ok(());
        }
        let buf = self.read_meta_block(at, block)?;
        let bs = self.fs.sb.block_size;
        let per = bs / 4;
        let span = per.pow(level - 1);
        for i in 0..per {
            let logical = base + i * span;
            if logical >= self.out.limit {
                break;
            }
            let ptr = u64::from(le32(&buf, (i * 4) as usize));
            if ptr == 0 {
                continue; // a hole
            }
            let pat = block * bs + i * 4;
            if level == 1 {
                self.check_range(pat, ptr, 1)?;
                self.out.push(Run {
                    logical,
                    physical: ptr,
                    len: 1,
                    init: true,
                });
            } else {
                self.indirect(pat, ptr, level - 1, logical)?;
            }
        }
        Ok(())
    }
}

impl ExtFs {
    /// The highest number of logical blocks the inode's block map can
    /// address.
    fn max_blocks(&self, inode: &Inode) -> u64 {
        if inode.has(FL_EXTENTS) {
            // Extent logical block numbers are 32-bit.
            1 << 32
        } else {
            let per = self.sb.block_size / 4;
            12 + per + per * per + per * per * per
        }
    }

    /// The block map of `inode`, as sorted runs of blocks below `size`.
    pub(crate) fn block_map(&self, inode: &Inode) -> Result<Vec<Run>, ExtError> {
        let bs = self.sb.block_size;
        let blocks = inode.size.div_ceil(bs);
        if blocks > self.max_blocks(inode) {
            return Err(inode.bad(format!(
                "size {} is more than its block map can address",
                inode.size
            )));
        }
        let mut ctx = MapCtx {
            fs: self,
            ino: inode.ino,
            visited: HashSet::new(),
            out: Runs {
                runs: Vec::new(),
                limit: blocks,
            },
        };
        let ib = inode.i_block();
        let ib_at = inode.offset + 0x28;
        if inode.has(FL_EXTENTS) {
            let mut next_free = 0;
            ctx.extent_node(ib, ib_at, None, 0, &mut next_free)?;
        } else {
            let per = bs / 4;
            for i in 0..15usize {
                let ptr = u64::from(le32(ib, i * 4));
                if ptr == 0 {
                    continue;
                }
                let at = ib_at + i as u64 * 4;
                match i {
                    0..=11 => {
                        ctx.check_range(at, ptr, 1)?;
                        ctx.out.push(Run {
                            logical: i as u64,
                            physical: ptr,
                            len: 1,
                            init: true,
                        });
                    }
                    12 => ctx.indirect(at, ptr, 1, 12)?,
                    13 => ctx.indirect(at, ptr, 2, 12 + per)?,
                    _ => ctx.indirect(at, ptr, 3, 12 + per + per * per)?,
                }
            }
        }
        Ok(ctx.out.runs)
    }

    /// Reads all of a small object (symlink target, directory, xattr value
    /// inode) through its block map into memory. `cap` bounds the size.
    pub(crate) fn read_small(&self, inode: &Inode, cap: u64) -> Result<Vec<u8>, ExtError> {
        if inode.size > cap {
            return Err(inode.bad(format!(
                "size {} is over the {cap}-byte limit for this kind of object",
                inode.size
            )));
        }
        let runs = self.block_map(inode)?;
        let mut r = FileReader::new(self, inode.ino, inode.size, Content::Runs(runs));
        let mut out = Vec::with_capacity(inode.size as usize);
        io::Read::read_to_end(&mut r, &mut out).map_err(|e| ExtError::Io {
            offset: inode.offset,
            source: e,
        })?;
        Ok(out)
    }
}

/// Where a file's bytes come from.
pub(crate) enum Content {
    /// Mapped blocks (holes and uninitialized runs read as zeros).
    Runs(Vec<Run>),
    /// Inline data, already in memory.
    Inline(Vec<u8>),
}

/// Streams exactly `size` bytes of a file: mapped data in reads of up to
/// [`READ_CHUNK`] bytes, holes as zeros without touching the device; or,
/// [`FileReader::data_only`], only the data of [`Content::data_map`].
pub(crate) struct FileReader<'a> {
    dev: &'a dyn ReadAt,
    bs: u64,
    ino: u32,
    size: u64,
    pos: u64,
    content: Content,
    /// Skip holes (and uninitialized runs) instead of reading them as zeros.
    skip_holes: bool,
    /// Index of the first run that may still cover `pos`.
    idx: usize,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    buf_pos: u64,
}

impl<'a> FileReader<'a> {
    pub(crate) fn new(fs: &'a ExtFs, ino: u32, size: u64, content: Content) -> FileReader<'a> {
        FileReader {
            dev: &*fs.dev,
            bs: fs.sb.block_size,
            ino,
            size,
            pos: 0,
            content,
            skip_holes: false,
            idx: 0,
            buf: Vec::new(),
            buf_pos: 0,
        }
    }

    /// Makes the reader yield only the bytes of [`Content::data_map`], in
    /// order, skipping the holes.
    pub(crate) fn data_only(mut self) -> Self {
        self.skip_holes = true;
        self
    }
}

impl Content {
    /// The file's data segments `(offset, length)` in bytes for a file of
    /// `size` bytes with `bs`-byte blocks: initialized runs clipped to the
    /// size, touching ones merged; inline data is one segment at 0. The
    /// rest (unmapped and uninitialized ranges) reads as zeros.
    pub(crate) fn data_map(&self, bs: u64, size: u64) -> Vec<(u64, u64)> {
        let mut map: Vec<(u64, u64)> = Vec::new();
        let mut push = |start: u64, end: u64| {
            if start >= end {
                return;
            }
            if let Some(last) = map.last_mut() {
                if last.0 + last.1 == start {
                    last.1 += end - start;
                    return;
                }
            }
            map.push((start, end - start));
        };
        match self {
            Content::Inline(data) => push(0, (data.len() as u64).min(size)),
            Content::Runs(runs) => {
                for r in runs.iter().filter(|r| r.init) {
                    let start = r.logical.saturating_mul(bs);
                    push(start.min(size), r.end().saturating_mul(bs).min(size));
                }
            }
        }
        map
    }
}

impl io::Read for FileReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(n) = self.read_some(out)? {
                return Ok(n);
            }
        }
    }
}

impl FileReader<'_> {
    /// One step of [`io::Read::read`]: `None` after skipping a hole.
    fn read_some(&mut self, out: &mut [u8]) -> io::Result<Option<usize>> {
        if self.pos >= self.size || out.is_empty() {
            return Ok(Some(0));
        }
        let left = self.size - self.pos;
        let want = out.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let runs = match &self.content {
            Content::Inline(data) => {
                // Inline data shorter than i_size: the rest reads as zeros.
                let start = usize::try_from(self.pos).unwrap_or(usize::MAX);
                let n = if start < data.len() {
                    let n = want.min(data.len() - start);
                    out[..n].copy_from_slice(&data[start..start + n]);
                    n
                } else if self.skip_holes {
                    self.pos = self.size;
                    return Ok(None);
                } else {
                    out[..want].fill(0);
                    want
                };
                self.pos += n as u64;
                return Ok(Some(n));
            }
            Content::Runs(runs) => runs,
        };
        // Served from the read-ahead buffer?
        if self.pos >= self.buf_pos && self.pos < self.buf_pos + self.buf.len() as u64 {
            let off = (self.pos - self.buf_pos) as usize;
            let n = want.min(self.buf.len() - off);
            out[..n].copy_from_slice(&self.buf[off..off + n]);
            self.pos += n as u64;
            return Ok(Some(n));
        }
        let lblock = self.pos / self.bs;
        while self.idx < runs.len() && runs[self.idx].end() <= lblock {
            self.idx += 1;
        }
        let run = runs.get(self.idx).copied();
        match run {
            Some(r) if r.logical <= lblock && r.init => {
                let run_end = (r.end() * self.bs).min(self.size);
                let n_run = run_end - self.pos;
                let dev_off = (r.physical + (lblock - r.logical)) * self.bs + self.pos % self.bs;
                let io_err = |e: io::Error| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "ext: inode {}: read data at byte offset {dev_off}: {e}",
                            self.ino
                        ),
                    )
                };
                if want >= READ_CHUNK / 4 {
                    // Large caller buffer: read straight into it.
                    let n = want.min(usize::try_from(n_run).unwrap_or(usize::MAX));
                    self.dev
                        .read_exact_at(&mut out[..n], dev_off)
                        .map_err(io_err)?;
                    self.pos += n as u64;
                    return Ok(Some(n));
                }
                let chunk = READ_CHUNK.min(usize::try_from(n_run).unwrap_or(usize::MAX));
                self.buf.resize(chunk, 0);
                self.dev
                    .read_exact_at(&mut self.buf, dev_off)
                    .map_err(io_err)?;
                self.buf_pos = self.pos;
                let n = want.min(chunk);
                out[..n].copy_from_slice(&self.buf[..n]);
                self.pos += n as u64;
                Ok(Some(n))
            }
            other => {
                // A hole up to the next run, or an uninitialized run.
                let end = match other {
                    Some(r) if r.logical <= lblock => r.end() * self.bs,
                    Some(r) => r.logical * self.bs,
                    None => self.size,
                }
                .min(self.size);
                if self.skip_holes {
                    // Always forward: `end` is past the current block.
                    self.pos = end;
                    return Ok(None);
                }
                let n = want.min(usize::try_from(end - self.pos).unwrap_or(usize::MAX));
                out[..n].fill(0);
                self.pos += n as u64;
                Ok(Some(n))
            }
        }
    }
}
