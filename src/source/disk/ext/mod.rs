//! A userspace, read-only ext2/ext3/ext4 reader: walks a file-system image
//! into kiln import [`Entry`] values without a loop device or a mount.
//!
//! The images are untrusted vendor data, so every on-disk number is checked
//! before it is used: inode numbers against the inode count, block numbers
//! against the block count, extent trees for depth, order and loops,
//! directory records against their block. Nothing is allocated by a size
//! field alone: file data is streamed, and what is held in memory (block
//! maps, directory listings) is bounded by the metadata actually on the
//! device.
//!
//! Supported: block sizes 1 KiB to 64 KiB, 32- and 64-bit group descriptors,
//! `meta_bg`, `flex_bg`, extents and ext2/3 indirect blocks, uninitialized
//! extents and holes (as zeros), `inline_data` files and directories, htree
//! directories (read linearly), `huge_file`, `extra_isize`, in-inode and
//! block xattrs (ACLs converted to the VFS format), `ea_inode` values, and
//! `metadata_csum` (the superblock checksum is verified, others ignored).
//! Refused with a clear error: `encrypt`, `compression`, `dirdata`,
//! external journal devices, and unknown incompatible features.

mod dir;
mod error;
mod inode;
mod superblock;
mod xattr;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use error::{ExtError, PathCtx};
pub(crate) use superblock::sniff_other;

use crate::layer::{Entry, EntryKind};
use crate::source::disk::ReadAt;
use inode::{
    Content, FileReader, Inode, FL_ENCRYPT, FL_EXTENTS, FL_INLINE_DATA, S_IFBLK, S_IFCHR, S_IFDIR,
    S_IFIFO, S_IFLNK, S_IFREG, S_IFSOCK,
};
use superblock::{read_exact, GroupDesc, Superblock, BG_INODE_UNINIT};

/// The root directory's inode number.
const ROOT_INO: u32 = 2;
/// Longest symlink target Linux accepts (`PATH_MAX` including the NUL).
const SYMLINK_MAX: u64 = 4095;
/// Longest path the walk produces: deeper trees are hostile (and each entry
/// copies its path, so this bounds the work per entry).
const PATH_LIMIT: usize = 32 * 1024;
/// Inode table cache: chunks of this many bytes...
const ITABLE_CHUNK: u64 = 16 * 1024;
/// ...and this many of them (16 MiB).
const ITABLE_CHUNKS: usize = 1024;
/// External xattr blocks cached (they are often shared by many files).
const XATTR_BLOCKS: usize = 64;

/// Which generation of the ext family an image is, judged by its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtKind {
    /// No journal, no ext4 features.
    Ext2,
    /// A journal, no ext4 features.
    Ext3,
    /// Any ext4 feature (extents, flex_bg, 64bit, huge_file, ...).
    Ext4,
}

impl fmt::Display for ExtKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExtKind::Ext2 => "ext2",
            ExtKind::Ext3 => "ext3",
            ExtKind::Ext4 => "ext4",
        })
    }
}

/// What the walk knows about an entry beyond [`Entry`]: its inode, and for
/// regular files how much of them is really stored (to keep sparse files
/// sparse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryInfo {
    /// The inode number.
    pub ino: u32,
    /// The inode's link count as stored (not trusted by the walk).
    pub links: u16,
    /// Bytes of the file's content that are stored on disk (initialized
    /// extents within the size); 0 for non-files.
    pub allocated: u64,
    /// The file has holes or uninitialized extents within its size, which
    /// read as zeros.
    pub sparse: bool,
}

/// One mapped piece of a file, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    /// Length in bytes (clipped to the file size).
    pub len: u64,
    /// False for preallocated (uninitialized) extents, which read as zeros.
    pub initialized: bool,
}

/// A small FIFO cache of inode-table chunks: the walk visits names in sorted
/// order, which jumps around the inode table.
#[derive(Default)]
pub(crate) struct ChunkCache {
    map: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
}

/// An opened ext2/3/4 file system.
///
/// ```no_run
/// use std::sync::Arc;
/// use kiln::disk::{FileSource, ReadAt};
/// use kiln::disk::ext::{ExtError, ExtFs};
///
/// let dev: Arc<dyn ReadAt> = Arc::new(FileSource::open("rootfs.img".as_ref())?);
/// let fs = ExtFs::open(dev)?;
/// println!("{}", fs.describe()); // ext4 "rootfs" 23,412 inodes
/// fs.walk(|entry, data| -> Result<(), ExtError> {
///     let n = std::io::copy(data, &mut std::io::sink()).map_err(|e| ExtError::Io { offset: 0, source: e })?;
///     println!("{} ({n} bytes)", entry.path);
///     Ok(())
/// })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ExtFs {
    dev: Arc<dyn ReadAt>,
    sb: Superblock,
    groups: Vec<GroupDesc>,
    cache: Mutex<ChunkCache>,
    xattr_cache: Mutex<ChunkCache>,
    sockets: AtomicU64,
    /// Metadata bytes read since the walk started (see [`ExtFs::charge`]).
    meta_read: AtomicU64,
    /// Walks under way: metadata reads are only counted during walks.
    walks: AtomicU64,
}

/// Marks a walk as under way while alive.
struct WalkGuard<'a>(&'a AtomicU64);

impl Drop for WalkGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl fmt::Debug for ExtFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExtFs")
            .field("kind", &self.kind())
            .field("label", &self.sb.label)
            .field("block_size", &self.sb.block_size)
            .field("blocks", &self.sb.blocks_count)
            .field("inodes", &self.sb.inodes_count)
            .finish()
    }
}

/// Formats `n` with thousands separators (`23,412`).
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl ExtFs {
    /// Opens the file system on `src` (a partition or a whole image):
    /// reads and checks the superblock and every group descriptor.
    ///
    /// Fails with [`ExtError::NotExt`] naming what `src` holds when it is
    /// not ext2/3/4, and [`ExtError::UnsupportedFeatures`] when the file
    /// system needs features this reader does not implement.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<ExtFs, ExtError> {
        let sb = Superblock::read(&*src)?;
        let groups = superblock::read_group_descs(&*src, &sb)?;
        Ok(ExtFs {
            dev: src,
            sb,
            groups,
            cache: Mutex::new(ChunkCache::default()),
            xattr_cache: Mutex::new(ChunkCache::default()),
            sockets: AtomicU64::new(0),
            meta_read: AtomicU64::new(0),
            walks: AtomicU64::new(0),
        })
    }

    /// The volume label (may be empty).
    pub fn label(&self) -> &str {
        &self.sb.label
    }

    /// ext2, ext3 or ext4, from the feature flags.
    pub fn kind(&self) -> ExtKind {
        use superblock::*;
        let incompat4 = INCOMPAT_EXTENTS
            | INCOMPAT_64BIT
            | INCOMPAT_FLEX_BG
            | INCOMPAT_INLINE_DATA
            | INCOMPAT_EA_INODE
            | INCOMPAT_CSUM_SEED
            | INCOMPAT_LARGEDIR
            | INCOMPAT_CASEFOLD
            | INCOMPAT_MMP;
        let ro4 = RO_COMPAT_HUGE_FILE
            | RO_COMPAT_GDT_CSUM
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE
            | RO_COMPAT_METADATA_CSUM
            | 0x200 // bigalloc
            | 0x2000; // project
        if self.sb.incompat & incompat4 != 0 || self.sb.ro_compat & ro4 != 0 {
            ExtKind::Ext4
        } else if self.sb.compat & COMPAT_HAS_JOURNAL != 0 {
            ExtKind::Ext3
        } else {
            ExtKind::Ext2
        }
    }

    /// The block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.sb.block_size
    }

    /// The total number of inodes.
    pub fn inode_count(&self) -> u64 {
        u64::from(self.sb.inodes_count)
    }

    /// Inodes in use, per the superblock's free count.
    pub fn used_inodes(&self) -> u64 {
        u64::from(self.sb.inodes_count.saturating_sub(self.sb.free_inodes))
    }

    /// A one-line description, e.g. `ext4 "ddkroot" 23,412 inodes` (the
    /// inodes in use).
    pub fn describe(&self) -> String {
        let label = if self.sb.label.is_empty() {
            "(no label)".to_string()
        } else {
            format!("{:?}", self.sb.label)
        };
        format!(
            "{} {label} {} inodes",
            self.kind(),
            thousands(self.used_inodes())
        )
    }

    /// Whether the root directory looks like a Linux root file system (has
    /// `etc` or `usr`), to pick the right partition of a disk.
    pub fn has_linux_root(&self) -> Result<bool, ExtError> {
        let root = self.inode(ROOT_INO)?;
        if root.kind() != S_IFDIR {
            return Ok(false);
        }
        Ok(self
            .read_dir(&root)?
            .iter()
            .any(|d| d.name == b"etc" || d.name == b"usr"))
    }

    /// Sockets the last walks skipped (they cannot be stored in a layer).
    pub fn sockets_skipped(&self) -> u64 {
        self.sockets.load(Ordering::Relaxed)
    }

    /// The mapped pieces of inode `ino`'s content, sorted, contiguous ones
    /// merged; the gaps are holes. Inline-data files have none.
    pub fn file_extents(&self, ino: u32) -> Result<Vec<Extent>, ExtError> {
        let inode = self.inode(ino)?;
        if inode.has(FL_INLINE_DATA) || !matches!(inode.kind(), S_IFREG | S_IFDIR | S_IFLNK) {
            return Ok(Vec::new());
        }
        if inode.kind() == S_IFLNK && self.is_fast_symlink(&inode) {
            return Ok(Vec::new());
        }
        let bs = self.sb.block_size;
        Ok(self
            .block_map(&inode)?
            .into_iter()
            .map(|r| {
                let logical = r.logical * bs;
                Extent {
                    logical,
                    physical: r.physical * bs,
                    len: (r.len * bs).min(inode.size - logical),
                    initialized: r.init,
                }
            })
            .collect())
    }

    /// Reads inode `ino`, checking that it exists and is in use.
    pub(crate) fn inode(&self, ino: u32) -> Result<Inode, ExtError> {
        let oor = |reason: String| ExtError::InodeOutOfRange {
            ino: u64::from(ino),
            path: PathCtx::default(),
            reason,
        };
        if ino == 0 || ino > self.sb.inodes_count {
            return Err(oor(format!(
                "the file system has inodes 1..={}",
                self.sb.inodes_count
            )));
        }
        let ipg = self.sb.inodes_per_group;
        let group = (ino - 1) / ipg;
        let index = (ino - 1) % ipg;
        let Some(gd) = self.groups.get(group as usize) else {
            return Err(oor(format!("group {group} does not exist")));
        };
        if gd.flags & BG_INODE_UNINIT != 0 || index >= ipg.saturating_sub(gd.itable_unused) {
            return Err(oor(format!(
                "it is in the never-used part of block group {group}"
            )));
        }
        let isz = u64::from(self.sb.inode_size);
        let offset = gd.inode_table * self.sb.block_size + u64::from(index) * isz;
        let chunk = self.itable_chunk(offset / ITABLE_CHUNK)?;
        let start = (offset % ITABLE_CHUNK) as usize;
        // Inode tables are block aligned and inode sizes are powers of two
        // no larger than a block, so an inode never straddles two chunks;
        // a chunk is only short at the end of the device.
        let Some(raw) = chunk.get(start..start + isz as usize) else {
            return Err(ExtError::Io {
                offset,
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "inode past the end of the device",
                ),
            });
        };
        let inode = Inode::parse(self, ino, offset, raw.to_vec())?;
        if inode.mode == 0 {
            return Err(inode.bad("the inode is not in use (mode 0)"));
        }
        Ok(inode)
    }

    /// Counts metadata bytes read by a walk. In a sound file system every
    /// directory block, block-map node and inode-table chunk belongs to one
    /// object, so a walk reads about the device's size of metadata at most.
    /// A hostile image can make thousands of inodes share one huge
    /// directory or extent tree, turning a small image into an endless
    /// walk: past a few times the device size, the walk stops.
    pub(crate) fn charge(&self, bytes: u64) -> Result<(), ExtError> {
        if self.walks.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let limit = self.dev.size().saturating_mul(4).saturating_add(256 << 20);
        let total = self.meta_read.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if total > limit {
            return Err(ExtError::MetadataAmplification { limit });
        }
        Ok(())
    }

    /// Reads `len` bytes at `start` through `cache` (FIFO, `max` entries).
    pub(crate) fn cached_read(
        &self,
        cache: &Mutex<ChunkCache>,
        max: usize,
        start: u64,
        len: u64,
    ) -> Result<Arc<Vec<u8>>, ExtError> {
        if let Ok(c) = cache.lock() {
            if let Some(v) = c.map.get(&start) {
                return Ok(v.clone());
            }
        }
        self.charge(len)?;
        let mut buf = vec![0u8; len as usize];
        read_exact(&*self.dev, &mut buf, start)?;
        let buf = Arc::new(buf);
        if let Ok(mut c) = cache.lock() {
            if c.order.len() >= max {
                if let Some(old) = c.order.pop_front() {
                    c.map.remove(&old);
                }
            }
            c.order.push_back(start);
            c.map.insert(start, buf.clone());
        }
        Ok(buf)
    }

    fn itable_chunk(&self, idx: u64) -> Result<Arc<Vec<u8>>, ExtError> {
        let start = idx * ITABLE_CHUNK;
        let len = ITABLE_CHUNK.min(self.dev.size().saturating_sub(start));
        self.cached_read(&self.cache, ITABLE_CHUNKS, start, len)
    }

    /// An external xattr block, cached: many files often share one.
    pub(crate) fn xattr_block(&self, block: u64) -> Result<Arc<Vec<u8>>, ExtError> {
        let bs = self.sb.block_size;
        self.cached_read(&self.xattr_cache, XATTR_BLOCKS, block * bs, bs)
    }

    /// Whether a symlink's target is stored in i_block itself.
    fn is_fast_symlink(&self, inode: &Inode) -> bool {
        // A fast symlink has no data blocks; only an xattr block may count
        // in i_blocks. e2fsprogs also requires the target to fit i_block.
        let ea = if inode.file_acl != 0 {
            self.sb.block_size / 512
        } else {
            0
        };
        inode.size < inode::I_BLOCK_LEN as u64
            && (inode.blocks_512.saturating_sub(ea) == 0
                || !inode.has(FL_EXTENTS) && inode.blocks_512 == 0)
    }

    fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>, ExtError> {
        if inode.size == 0 || inode.size > SYMLINK_MAX {
            return Err(inode.bad(format!(
                "symlink target length {} is not in 1..={SYMLINK_MAX}",
                inode.size
            )));
        }
        let target = if inode.has(FL_INLINE_DATA) {
            let d = self.inline_content(inode)?;
            if d.len() as u64 != inode.size {
                return Err(inode.bad(format!(
                    "inline symlink of {} bytes holds only {}",
                    inode.size,
                    d.len()
                )));
            }
            d
        } else if self.is_fast_symlink(inode) {
            inode.i_block()[..inode.size as usize].to_vec()
        } else {
            self.read_small(inode, SYMLINK_MAX)?
        };
        if target.contains(&0) {
            return Err(inode.bad("symlink target contains a NUL byte"));
        }
        Ok(target)
    }

    fn file_content(&self, inode: &Inode) -> Result<(Content, u64, bool), ExtError> {
        if inode.has(FL_INLINE_DATA) {
            let data = self.inline_content(inode)?;
            let stored = data.len() as u64;
            return Ok((Content::Inline(data), stored, stored < inode.size));
        }
        let runs = self.block_map(inode)?;
        let bs = self.sb.block_size;
        let mut allocated = 0u64;
        let mut covered = 0u64;
        for r in &runs {
            let bytes = (r.len * bs).min(inode.size.saturating_sub(r.logical * bs));
            covered += bytes;
            if r.init {
                allocated += bytes;
            }
        }
        let sparse = allocated < inode.size || covered < inode.size;
        Ok((Content::Runs(runs), allocated, sparse))
    }

    /// Walks the whole tree, calling `f` with each entry and its content
    /// (empty for non-files): the root first (path `""`), then depth first,
    /// each directory before its children, siblings sorted by name bytes.
    ///
    /// A regular file (or fifo) inode met again becomes an
    /// [`EntryKind::Hardlink`] to the first path; sockets are skipped and
    /// counted ([`ExtFs::sockets_skipped`]). A file with holes or
    /// uninitialized extents comes with its data map in [`Entry::sparse`]
    /// and its reader yields only the mapped data (wrap it with
    /// [`Entry::dense`] for the whole content); other files' readers yield
    /// exactly `entry.size` bytes. Read errors are [`io::Error`]s wrapping
    /// an [`ExtError`].
    pub fn walk<E, F>(&self, mut f: F) -> Result<(), E>
    where
        E: From<ExtError>,
        F: FnMut(Entry, &mut dyn io::Read) -> Result<(), E>,
    {
        self.walk_with(|e, _, r| f(e, r))
    }

    /// Like [`ExtFs::walk`], also passing each entry's [`EntryInfo`]
    /// (inode number, allocated bytes, sparseness).
    pub fn walk_with<E, F>(&self, mut f: F) -> Result<(), E>
    where
        E: From<ExtError>,
        F: FnMut(Entry, &EntryInfo, &mut dyn io::Read) -> Result<(), E>,
    {
        struct Frame {
            children: Vec<dir::DirEnt>,
            next: usize,
            /// Length of this directory's path in the shared path buffer.
            path_len: usize,
        }
        if self.walks.fetch_add(1, Ordering::Relaxed) == 0 {
            self.meta_read.store(0, Ordering::Relaxed);
        }
        let _guard = WalkGuard(&self.walks);
        let root = self.inode(ROOT_INO).map_err(|e| e.at_path(""))?;
        if root.kind() != S_IFDIR {
            return Err(ExtError::BadInode {
                ino: ROOT_INO,
                path: PathCtx(Some(String::new())),
                offset: root.offset,
                reason: "the root inode is not a directory".into(),
            }
            .into());
        }
        let children = self.read_dir(&root).map_err(|e| e.at_path(""))?;
        let (e, info) = self.entry(&root, String::new(), EntryKind::Dir)?;
        f(e, &info, &mut io::empty())?;
        let mut dirs: HashMap<u32, String> = HashMap::from([(ROOT_INO, String::new())]);
        let mut files: HashMap<u32, String> = HashMap::new();
        // One path buffer for the whole walk: a frame only remembers its
        // length, so deep trees cost O(depth) memory, not O(depth²).
        let mut path = String::new();
        let mut stack = vec![Frame {
            children,
            next: 0,
            path_len: 0,
        }];
        while let Some(top) = stack.last_mut() {
            let Some(child) = top.children.get(top.next) else {
                stack.pop();
                continue;
            };
            top.next += 1;
            path.truncate(top.path_len);
            let Ok(name) = std::str::from_utf8(&child.name) else {
                let lossy = String::from_utf8_lossy(&child.name);
                return Err(ExtError::NonUtf8Name {
                    path: if path.is_empty() {
                        lossy.into_owned()
                    } else {
                        format!("{path}/{lossy}")
                    },
                }
                .into());
            };
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(name);
            if path.len() > PATH_LIMIT {
                return Err(ExtError::PathTooLong {
                    prefix: path.chars().take(200).collect(),
                    limit: PATH_LIMIT,
                }
                .into());
            }
            let ino = child.ino;
            let inode = self.inode(ino).map_err(|e| e.at_path(&path))?;
            if inode.has(FL_ENCRYPT) {
                return Err(ExtError::Unsupported {
                    what: format!("/{path} (inode {ino}) is encrypted (fscrypt)"),
                }
                .into());
            }
            let kind = match inode.kind() {
                S_IFREG => EntryKind::File,
                S_IFDIR => EntryKind::Dir,
                S_IFLNK => EntryKind::Symlink,
                S_IFCHR => EntryKind::Char,
                S_IFBLK => EntryKind::Block,
                S_IFIFO => EntryKind::Fifo,
                S_IFSOCK => {
                    self.sockets.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(path = %path, "skipping socket: sockets cannot be stored in a layer");
                    continue;
                }
                other => {
                    return Err(ExtError::BadInode {
                        ino,
                        path: PathCtx(Some(path.clone())),
                        offset: inode.offset,
                        reason: format!("unknown file type {:#o}", other >> 12),
                    }
                    .into())
                }
            };
            let (mut e, mut info) = self.entry(&inode, path.clone(), kind)?;
            match kind {
                EntryKind::Dir => {
                    if let Some(first) = dirs.get(&ino) {
                        return Err(ExtError::DirCycle {
                            ino,
                            first: first.clone(),
                            second: path.clone(),
                            offset: child.offset,
                        }
                        .into());
                    }
                    dirs.insert(ino, path.clone());
                    let children = self.read_dir(&inode).map_err(|e| e.at_path(&path))?;
                    f(e, &info, &mut io::empty())?;
                    stack.push(Frame {
                        children,
                        next: 0,
                        path_len: path.len(),
                    });
                }
                EntryKind::File | EntryKind::Fifo => {
                    // Every file is remembered, whatever its link count says:
                    // link counts are not trusted.
                    if let Some(first) = files.get(&ino) {
                        e.kind = EntryKind::Hardlink;
                        e.size = 0;
                        e.link = Some(first.clone().into_bytes());
                        f(e, &info, &mut io::empty())?;
                        continue;
                    }
                    files.insert(ino, path.clone());
                    if kind == EntryKind::Fifo {
                        f(e, &info, &mut io::empty())?;
                        continue;
                    }
                    let (content, allocated, sparse) =
                        self.file_content(&inode).map_err(|e| e.at_path(&path))?;
                    info.allocated = allocated;
                    info.sparse = sparse;
                    e.size = inode.size;
                    // A sparse file's reader yields only the stored data;
                    // the map says where it goes.
                    e.sparse = sparse.then(|| content.data_map(self.sb.block_size, inode.size));
                    let mut r = FileReader::new(self, ino, inode.size, content);
                    if sparse {
                        r = r.data_only();
                    }
                    f(e, &info, &mut r)?;
                }
                EntryKind::Symlink => {
                    e.link = Some(self.symlink_target(&inode).map_err(|e| e.at_path(&path))?);
                    f(e, &info, &mut io::empty())?;
                }
                EntryKind::Char | EntryKind::Block => {
                    (e.dev_major, e.dev_minor) = device_number(inode.i_block());
                    f(e, &info, &mut io::empty())?;
                }
                EntryKind::Hardlink => {}
            }
        }
        Ok(())
    }

    fn entry(
        &self,
        inode: &Inode,
        path: String,
        kind: EntryKind,
    ) -> Result<(Entry, EntryInfo), ExtError> {
        let xattrs = self.xattrs(inode).map_err(|e| e.at_path(&path))?;
        let mut e = Entry::new(path, kind);
        e.xattrs = xattrs;
        e.mode = u32::from(inode.mode) & 0o7777;
        e.uid = u64::from(inode.uid);
        e.gid = u64::from(inode.gid);
        e.mtime = inode.mtime;
        let info = EntryInfo {
            ino: inode.ino,
            links: inode.links,
            allocated: 0,
            sparse: false,
        };
        Ok((e, info))
    }
}

/// Decodes a device number from i_block: the old 16-bit encoding (8-bit
/// major and minor) in word 0, or, when word 0 is zero, the new 32-bit one
/// in word 1 (minor bits 0-7 and 20-31, major bits 8-19), as the kernel's
/// `old_decode_dev` / `new_decode_dev`.
fn device_number(ib: &[u8]) -> (u32, u32) {
    let old = superblock::le32(ib, 0);
    if old != 0 {
        ((old >> 8) & 0xff, old & 0xff)
    } else {
        let d = superblock::le32(ib, 4);
        ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00))
    }
}

/// Opens `data` as an ext image and walks everything, reading a bounded
/// amount of each file, ignoring all errors: the body of a fuzz target.
/// Must never panic, hang, or allocate without bound.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    let dev: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let Ok(fs) = ExtFs::open(dev) else { return };
    let _ = fs.describe();
    let _ = fs.has_linux_root();
    // Holes are legal and read as zeros: cap what a hostile size can make
    // the fuzzer stream.
    let mut budget: u64 = 64 << 20;
    let _ = fs.walk_with(|e, info, r| -> Result<(), ExtError> {
        let cap = budget.min(4 << 20);
        if let Ok(n) = io::copy(&mut io::Read::take(r, cap), &mut io::sink()) {
            budget = budget.saturating_sub(n);
        }
        let _ = e.path.len();
        if e.kind == EntryKind::File {
            let _ = fs.file_extents(info.ino);
        }
        Ok(())
    });
}
