//! Stacks the disk readers by content detection into one chain, from the
//! outermost file to the file system:
//!
//! ```text
//! ISO 9660 ──▸ chunk folder ──┐
//! chunk folder on disk ───────┼─▸ VHD / qcow2 / raw ─▸ MBR / GPT ─▸ ext2/3/4
//! XVA ─▸ disk ────────────────┘
//! ISO 9660 holding a root tree ──────────────────────────────────▸ (walked directly)
//! ```
//!
//! Every step is detected from bytes, never from file names, and every step
//! reads the one below through [`ReadAt`], so nothing is copied to a
//! temporary file and nothing is mounted.
//!
//! A file system kiln has no reader for (xfs, btrfs, ...) is read with
//! [`ChainOptions::via_vm`]: the last step's bytes go to a throwaway VM
//! that mounts them and sends a tar back (the importer boots it).

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::chunks::{self, ChunkOptions, ChunkedStream};
use super::ext::{ExtError, ExtFs};
use super::iso9660::{Iso, IsoNode};
use super::part::{PartitionKind, PartitionTable};
use super::qcow2::Qcow2;
use super::vhd::Vhd;
use super::xva::Xva;
use super::{FileSource, ReadAt};
use crate::layer::Entry;
use crate::progress::human_bytes as human;

/// Why a disk-image chain could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The outermost file could not be opened.
    #[error("open {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// A reader failed (its message names the reader and the offset).
    #[error(transparent)]
    Reader(ReaderError),
    /// The chain has no file system kiln can read, or a choice is needed.
    #[error("{0}")]
    Unsupported(String),
    /// The file system is one kiln reads only in a VM (xfs, btrfs, ...):
    /// import it with [`ChainOptions::via_vm`]. `steps` is the chain down to
    /// it, its last step the file system (with [`Step::needs`] set).
    #[error("the file system{} is {fstype}, which kiln cannot read in userspace (it reads ext2/3/4): import it with {}, which mounts it inside a throwaway VM", where_.as_deref().map(|w| format!(" in {w}")).unwrap_or_default(), crate::words::Opt::ViaVm)]
    NeedsVm {
        /// The `mount` type of the file system.
        fstype: &'static str,
        /// Which partition holds it, when a partition table was searched.
        where_: Option<String>,
        /// The chain down to the file system, outermost first.
        steps: Vec<Step>,
    },
}

/// The error of one reader of the chain, as that reader gives it (its
/// message names the reader and the offset), for an embedder to match.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReaderError {
    /// ISO 9660.
    #[error(transparent)]
    Iso(#[from] super::iso9660::IsoError),
    /// A stream of compressed chunks.
    #[error(transparent)]
    Chunks(#[from] super::chunks::ChunkError),
    /// An XVA (Xen) archive.
    #[error(transparent)]
    Xva(#[from] super::xva::XvaError),
    /// A VHD.
    #[error(transparent)]
    Vhd(#[from] super::vhd::VhdError),
    /// A qcow2 image.
    #[error(transparent)]
    Qcow2(#[from] super::qcow2::Qcow2Error),
    /// An MBR or GPT partition table.
    #[error(transparent)]
    Part(#[from] super::part::PartError),
    /// An ext2/3/4 file system.
    #[error(transparent)]
    Ext(#[from] ExtError),
}

macro_rules! reader_errors {
    ($($t:ty),*) => {$(
        impl From<$t> for DiskError {
            fn from(e: $t) -> Self {
                DiskError::Reader(ReaderError::from(e))
            }
        }
    )*};
}
reader_errors!(
    super::iso9660::IsoError,
    super::chunks::ChunkError,
    super::xva::XvaError,
    super::vhd::VhdError,
    super::qcow2::Qcow2Error,
    super::part::PartError,
    ExtError
);

/// Choices for the steps detection cannot make alone.
#[derive(Debug, Clone, Default)]
pub struct ChainOptions {
    /// A file or folder inside an ISO to use (`--path`).
    pub path: Option<String>,
    /// The partition number to use (`--partition`, Linux numbering).
    pub partition: Option<u32>,
    /// The parent of a differencing VHD (`--parent`).
    pub parent: Option<PathBuf>,
    /// The backing file of a qcow2 overlay (`--backing`).
    pub backing: Option<PathBuf>,
    /// Upper bound of a chunked stream's size when no descriptor gives it.
    pub max_stream: Option<u64>,
    /// The file system is to be read in a throwaway VM (`--via-vm`),
    /// whatever it is: the way to import xfs, btrfs, f2fs, squashfs, ... .
    /// The chain then ends at [`Chain::in_vm`]; the importer boots the VM.
    pub via_vm: bool,
}

/// One step of a chain: what `kiln probe` prints, and its JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    /// The reader: `iso9660`, `chunks`, `xva`, `vhd`, `qcow2`, `raw`,
    /// `mbr`/`gpt`, `ext2`/`ext3`/`ext4`, `tree`, `vm`, or the name of a
    /// file system read only in a VM (`btrfs`, `xfs`, ...).
    pub reader: String,
    /// What it holds, e.g. `vhd dynamic 626 MiB`.
    pub detail: String,
    /// Bytes this step presents to the next one (a disk's virtual size, a
    /// partition's or file system's size), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Where this step starts in the previous step's bytes (a partition's
    /// byte offset on its disk), when that is not 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The partition number (`mbr`/`gpt` steps).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// What reading this step needs that was not given, e.g. `--via-vm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needs: Option<String>,
}

impl Step {
    fn new(reader: impl Into<String>, detail: impl Into<String>, size: u64) -> Step {
        Step {
            reader: reader.into(),
            detail: detail.into(),
            size: Some(size),
            offset: None,
            partition: None,
            needs: None,
        }
    }
}

/// Prints a chain's steps as `kiln probe` does: `iso9660 ... ▸ chunks ...`.
pub fn display_steps(steps: &[Step]) -> String {
    let parts: Vec<String> = steps
        .iter()
        .map(|s| match &s.needs {
            Some(n) => format!("{} (needs {n})", s.detail),
            None => s.detail.clone(),
        })
        .collect();
    parts.join(" ▸ ")
}

/// The file system at the end of a chain.
enum Root {
    Ext(ExtFs),
    Iso(Iso, String),
    /// Read in a VM: the file system's bytes, its `mount` type.
    Vm(Arc<dyn ReadAt>, &'static str),
}

/// The `mount` type for what the ext reader's sniffing found, when the VM
/// can mount it.
fn mount_type(found: &str) -> Option<&'static str> {
    Some(match found {
        "xfs" => "xfs",
        "btrfs" => "btrfs",
        "squashfs" => "squashfs",
        "f2fs" => "f2fs",
        "erofs" => "erofs",
        "reiserfs" => "reiserfs",
        "jfs" => "jfs",
        "ntfs" => "ntfs3",
        "exfat" => "exfat",
        "a FAT file system" => "vfat",
        _ => return None,
    })
}

/// A [`ReadAt`] that counts the bytes read through it (progress of the
/// outermost source).
struct Counting {
    inner: Arc<dyn ReadAt>,
    read: Arc<AtomicU64>,
}

impl ReadAt for Counting {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }
}

/// An opened chain: its steps and the file system to walk.
///
/// ```no_run
/// use kiln::disk::chain::{Chain, ChainOptions};
/// let chain = Chain::open("kit.iso".as_ref(), &ChainOptions::default())?;
/// println!("{chain}");
/// chain.walk(|entry, _data| -> Result<(), kiln::disk::chain::DiskError> {
///     println!("{}", entry.path);
///     Ok(())
/// })?;
/// # Ok::<(), kiln::disk::chain::DiskError>(())
/// ```
pub struct Chain {
    /// The steps, outermost first.
    pub steps: Vec<Step>,
    root: Root,
    /// Size of the outermost source in bytes (0 for a chunk folder).
    pub outer_size: u64,
    read: Arc<AtomicU64>,
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&display_steps(&self.steps))
    }
}

const ISO_MAGIC_AT: usize = 0x8001;

fn read_head(src: &dyn ReadAt, n: usize) -> io::Result<Vec<u8>> {
    let len = usize::try_from(src.size()).unwrap_or(usize::MAX).min(n);
    let mut buf = vec![0u8; len];
    src.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

fn is_iso(head: &[u8]) -> bool {
    head.len() > ISO_MAGIC_AT + 5 && &head[ISO_MAGIC_AT..ISO_MAGIC_AT + 5] == b"CD001"
}

/// An XVA export: a tar whose first member is `ova.xml`.
fn is_xva(head: &[u8]) -> bool {
    head.len() >= 512 && crate::source::tar_header_ok(head) && head.starts_with(b"ova.xml\0")
}

fn has_vhd_footer(src: &dyn ReadAt) -> bool {
    let mut b = [0u8; 8];
    let size = src.size();
    (src.read_exact_at(&mut b, 0).is_ok() && &b == b"conectix")
        || (size >= 512 && src.read_exact_at(&mut b, size - 512).is_ok() && &b == b"conectix")
}

/// Whether `path` is something this module imports (a disk image, an ISO,
/// an XVA or a folder of chunks) rather than a tarball or a directory tree.
pub fn recognizes(path: &Path) -> bool {
    if path.is_dir() {
        return chunk_dir(path);
    }
    let Ok(src) = FileSource::open(path) else {
        return false;
    };
    let Ok(head) = read_head(&src, 64 << 10) else {
        return false;
    };
    if is_iso(&head) || is_xva(&head) || head.starts_with(b"QFI\xfb") || has_vhd_footer(&src) {
        return true;
    }
    if crate::source::tar_header_ok(&head) || crate::source::sniff_codec(&head).is_some() {
        return false;
    }
    // A raw disk (MBR/GPT boot signature), a bare ext file system, or
    // another file system a VM can read.
    (head.len() >= 512 && head[510..512] == [0x55, 0xaa])
        || (head.len() >= 1082 && head[1080..1082] == [0x53, 0xef])
        || mount_type(super::ext::sniff_other(&src)).is_some()
}

fn chunk_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| matches!(chunks::parse_chunk_name(n), Ok(Some(_))))
        })
    })
}

fn open_file(path: &Path) -> Result<Arc<dyn ReadAt>, DiskError> {
    Ok(Arc::new(FileSource::open(path).map_err(|e| {
        DiskError::Open {
            path: path.display().to_string(),
            source: e,
        }
    })?))
}

fn chunk_opts(opts: &ChainOptions) -> ChunkOptions {
    let mut c = ChunkOptions::default();
    if let Some(m) = opts.max_stream {
        c.limit = m;
    }
    c
}

impl Chain {
    /// Opens `path` and detects every step down to the file system.
    pub fn open(path: &Path, opts: &ChainOptions) -> Result<Chain, DiskError> {
        let read = Arc::new(AtomicU64::new(0));
        let mut steps = Vec::new();
        if path.is_dir() {
            let stream = ChunkedStream::from_dir(path, chunk_opts(opts))?;
            steps.push(Step::new("chunks", stream.describe(), stream.size()));
            let disk: Arc<dyn ReadAt> = Arc::new(stream);
            let root = open_disk(disk, opts, &mut steps)?;
            return Ok(Chain {
                steps,
                root,
                outer_size: 0,
                read,
            });
        }
        let file = open_file(path)?;
        let outer_size = file.size();
        let outer: Arc<dyn ReadAt> = Arc::new(Counting {
            inner: file,
            read: Arc::clone(&read),
        });
        let head = read_head(&*outer, 64 << 10).map_err(|e| DiskError::Open {
            path: path.display().to_string(),
            source: e,
        })?;
        let root = if is_iso(&head) {
            open_iso(outer, opts, &mut steps)?
        } else if is_xva(&head) {
            let xva = Xva::open(Arc::clone(&outer))?;
            steps.push(Step::new("xva", xva.describe(), outer.size()));
            let disk = xva
                .disks()
                .first()
                .cloned()
                .ok_or_else(|| DiskError::Unsupported("the XVA export holds no disk".into()))?;
            open_disk(disk, opts, &mut steps)?
        } else {
            open_disk(outer, opts, &mut steps)?
        };
        Ok(Chain {
            steps,
            root,
            outer_size,
            read,
        })
    }

    /// Bytes of the outermost source read so far (progress).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Walks the file system: every object as an [`Entry`] with its data,
    /// parents first, children sorted by name. A file with holes carries its
    /// data map in [`Entry::sparse`] and its reader yields only the data.
    /// A chain that ends in a VM ([`Chain::in_vm`]) is not walked here.
    pub fn walk<E, F>(&self, f: F) -> Result<(), E>
    where
        E: From<DiskError>,
        F: FnMut(Entry, &mut dyn Read) -> Result<(), E>,
    {
        match &self.root {
            Root::Ext(fs) => {
                let mut f = f;
                // mke2fs's lost+found is file-system housekeeping, not part
                // of the tree the vendor put there.
                fs.walk(|e, d| {
                    if e.path == "lost+found" || e.path.starts_with("lost+found/") {
                        return Ok(());
                    }
                    f(e, d).map_err(WalkErr)
                })
                .map_err(|e: WalkErr<E>| e.0)
            }
            Root::Iso(iso, sub) => {
                let mut f = f;
                iso.walk(sub, |e, d| f(e, d).map_err(WalkErr))
                    .map_err(|e: WalkErr<E>| e.0)
            }
            Root::Vm(_, fstype) => Err(E::from(DiskError::Unsupported(format!(
                "the file system is {fstype}, which is read in a VM: the importer walks it"
            )))),
        }
    }

    /// The file system's bytes and its `mount` type when the chain was
    /// opened with [`ChainOptions::via_vm`]: what a VM is to read.
    pub fn in_vm(&self) -> Option<(&dyn ReadAt, &'static str)> {
        match &self.root {
            Root::Vm(src, fstype) => Some((&**src, fstype)),
            Root::Ext(_) | Root::Iso(..) => None,
        }
    }

    /// Sockets the file system held, which a layer cannot store.
    pub fn sockets_skipped(&self) -> u64 {
        match &self.root {
            Root::Ext(fs) => fs.sockets_skipped(),
            Root::Iso(..) | Root::Vm(..) => 0,
        }
    }
}

/// Carries the caller's error through a reader's walk.
struct WalkErr<E>(E);

impl<E: From<DiskError>> From<ExtError> for WalkErr<E> {
    fn from(e: ExtError) -> Self {
        WalkErr(E::from(DiskError::from(e)))
    }
}

impl<E: From<DiskError>> From<super::iso9660::IsoError> for WalkErr<E> {
    fn from(e: super::iso9660::IsoError) -> Self {
        WalkErr(E::from(DiskError::from(e)))
    }
}

/// Inside an ISO: `--path`, else a folder of chunks, else a root tree.
fn open_iso(
    src: Arc<dyn ReadAt>,
    opts: &ChainOptions,
    steps: &mut Vec<Step>,
) -> Result<Root, DiskError> {
    let size = src.size();
    let iso = Iso::open(src)?;
    steps.push(Step::new("iso9660", iso.describe(), size));
    let node = match &opts.path {
        Some(p) => iso.lookup(p)?.ok_or_else(|| {
            DiskError::Unsupported(format!(
                "{} {p}: no such file or folder in the ISO",
                crate::words::Opt::Path
            ))
        })?,
        None => match find_chunk_dir(&iso, iso.root(), 0)? {
            Some(n) => n,
            None if looks_like_root(&iso, iso.root())? => iso.root().clone(),
            None => {
                return Err(DiskError::Unsupported(format!(
                    "the ISO holds no folder of disk chunks and no root file system (etc/, usr/); pick a file or folder with {}",
                    crate::words::Opt::Path
                )))
            }
        },
    };
    if node.is_dir() {
        if iso.read_dir(&node)?.iter().any(|c| is_chunk(&c.name)) {
            let stream = ChunkedStream::from_iso(&iso, &node, chunk_opts(opts))?;
            steps.push(Step::new(
                "chunks",
                format!("{} in /{}", stream.describe(), node.path),
                stream.size(),
            ));
            let disk: Arc<dyn ReadAt> = Arc::new(stream);
            return open_disk(disk, opts, steps);
        }
        steps.push(Step {
            size: None,
            ..Step::new("tree", format!("tree /{}", node.path), 0)
        });
        let sub = node.path.clone();
        return Ok(Root::Iso(iso, sub));
    }
    let file = iso.open_file(&node)?;
    open_disk(file, opts, steps)
}

fn is_chunk(name: &str) -> bool {
    matches!(chunks::parse_chunk_name(name), Ok(Some(_)))
}

fn looks_like_root(iso: &Iso, dir: &IsoNode) -> Result<bool, DiskError> {
    Ok(iso
        .read_dir(dir)?
        .iter()
        .any(|c| c.is_dir() && (c.name == "etc" || c.name == "usr")))
}

/// The first folder (breadth-first, sorted, at most 4 levels deep) that
/// holds chunk files.
fn find_chunk_dir(iso: &Iso, dir: &IsoNode, depth: u32) -> Result<Option<IsoNode>, DiskError> {
    let mut level = vec![dir.clone()];
    for _ in depth..4 {
        let mut next = Vec::new();
        for d in &level {
            let mut kids = iso.read_dir(d)?;
            kids.sort_by(|a, b| a.name.cmp(&b.name));
            if kids.iter().any(|c| !c.is_dir() && is_chunk(&c.name)) {
                return Ok(Some(d.clone()));
            }
            next.extend(kids.into_iter().filter(IsoNode::is_dir));
        }
        level = next;
    }
    Ok(None)
}

/// A disk (container format detected) down to its file system.
fn open_disk(
    src: Arc<dyn ReadAt>,
    opts: &ChainOptions,
    steps: &mut Vec<Step>,
) -> Result<Root, DiskError> {
    let mut magic = [0u8; 4];
    let _ = src.read_exact_at(&mut magic, 0);
    let disk: Arc<dyn ReadAt> = if &magic == b"QFI\xfb" {
        let q = match &opts.backing {
            Some(b) => Qcow2::open_with_backing(src, open_file(b)?)?,
            None => Qcow2::open(src)?,
        };
        steps.push(Step::new("qcow2", q.describe(), q.size()));
        Arc::new(q)
    } else if has_vhd_footer(&*src) {
        let v = match &opts.parent {
            Some(p) => Vhd::open_with_parent(src, open_file(p)?)?,
            None => Vhd::open(src)?,
        };
        steps.push(Step::new("vhd", v.describe(), v.size()));
        Arc::new(v)
    } else {
        steps.push(Step::new(
            "raw",
            format!("raw {}", human(src.size())),
            src.size(),
        ));
        src
    };
    let Some(table) = PartitionTable::read(&disk)? else {
        return open_fs(disk, opts, steps);
    };
    let parts = &table.partitions;
    let chosen = match opts.partition {
        Some(n) => parts.iter().find(|p| p.number == n).ok_or_else(|| {
            DiskError::Unsupported(format!(
                "{} {n}: no such partition ({})",
                crate::words::Opt::Partition,
                table.describe()
            ))
        })?,
        None => {
            // The partition that holds a Linux root (etc/ or usr/); with
            // --via-vm, else the first one holding a file system the VM
            // can mount.
            let mut found = None;
            for p in parts {
                let slice: Arc<dyn ReadAt> = Arc::new(p.open(&disk)?);
                if ExtFs::open(slice)
                    .and_then(|fs| fs.has_linux_root())
                    .unwrap_or(false)
                {
                    found = Some(p);
                    break;
                }
            }
            if found.is_none() {
                let candidate = vm_root_candidate(parts, &disk)?;
                if opts.via_vm {
                    found = candidate;
                } else if let Some(p) = candidate {
                    // Readable only in a VM: say so, with the chain down to
                    // the file system (what `kiln probe` prints).
                    steps.push(partition_step(p, " (the likeliest root)"));
                    let slice: Arc<dyn ReadAt> = Arc::new(p.open(&disk)?);
                    return Err(needs_vm(
                        &*slice,
                        Some(format!(
                            "{} p{} (no partition holds an ext2/3/4 Linux root)",
                            scheme_of(p),
                            p.number
                        )),
                        steps,
                    ));
                }
            }
            found.ok_or_else(|| {
                DiskError::Unsupported(format!(
                    "no partition holds an ext2/3/4 Linux root ({}); pick one with {}",
                    table.describe(),
                    crate::words::Opt::Partition
                ))
            })?
        }
    };
    let why = match (opts.partition, opts.via_vm) {
        (Some(_), _) => String::new(),
        (None, false) => " (has a Linux root)".into(),
        (None, true) => format!(
            " (the likeliest root: pick another with {})",
            crate::words::Opt::Partition
        ),
    };
    steps.push(partition_step(chosen, &why));
    let slice: Arc<dyn ReadAt> = Arc::new(chosen.open(&disk)?);
    open_fs(slice, opts, steps)
}

fn scheme_of(p: &super::part::Partition) -> &'static str {
    if matches!(p.kind, PartitionKind::Gpt { .. }) {
        "gpt"
    } else {
        "mbr"
    }
}

/// The step for partition `p`, its detail ending in `why`.
fn partition_step(p: &super::part::Partition, why: &str) -> Step {
    let scheme = scheme_of(p);
    let kind = match &p.kind {
        PartitionKind::Mbr(t) => format!("0x{t:02x}"),
        PartitionKind::Gpt { type_guid, name } => type_guid
            .name()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{name:?}")),
    };
    Step {
        offset: Some(p.start_bytes),
        partition: Some(p.number),
        ..Step::new(
            scheme,
            format!("{scheme} p{} {kind} {}{why}", p.number, human(p.size_bytes)),
            p.size_bytes,
        )
    }
}

/// [`DiskError::NeedsVm`] for the file system in `src`, with its step
/// (marked as needing `--via-vm`) at the end of `steps`.
fn needs_vm(src: &dyn ReadAt, where_: Option<String>, steps: &mut Vec<Step>) -> DiskError {
    let found = super::ext::sniff_other(src);
    let Some(fstype) = mount_type(found) else {
        return DiskError::Unsupported(format!(
            "the file system is {found}, which kiln cannot read (it reads ext2/3/4)"
        ));
    };
    steps.push(Step {
        needs: Some(crate::words::Opt::ViaVm.to_string()),
        ..Step::new(
            fstype,
            format!("{fstype} {}", human(src.size())),
            src.size(),
        )
    });
    DiskError::NeedsVm {
        fstype,
        where_,
        steps: std::mem::take(steps),
    }
}

/// For `--via-vm` when no partition holds an ext Linux root: the one most
/// likely to be the root among those the VM can mount. Boot and firmware
/// partitions (EFI System, BIOS boot, FAT, exFAT) never are; a partition
/// typed as a Linux root wins, then the largest.
fn vm_root_candidate<'a>(
    parts: &'a [super::part::Partition],
    disk: &Arc<dyn ReadAt>,
) -> Result<Option<&'a super::part::Partition>, DiskError> {
    use super::part::Guid;
    let mut best: Option<(&super::part::Partition, (bool, u64))> = None;
    for p in parts {
        let (firmware, root_type) = match &p.kind {
            PartitionKind::Gpt { type_guid, .. } => (
                *type_guid == Guid::EFI_SYSTEM || *type_guid == Guid::BIOS_BOOT,
                matches!(
                    *type_guid,
                    Guid::LINUX_ROOT_X86_64
                        | Guid::LINUX_ROOT_X86
                        | Guid::LINUX_ROOT_AARCH64
                        | Guid::LINUX_ROOT_ARM
                ),
            ),
            PartitionKind::Mbr(t) => (*t == 0xef, false),
        };
        if firmware {
            continue;
        }
        let slice: Arc<dyn ReadAt> = Arc::new(p.open(disk)?);
        let Some(fstype) = mount_type(super::ext::sniff_other(&*slice)) else {
            continue;
        };
        if fstype == "vfat" || fstype == "exfat" {
            continue;
        }
        let rank = (root_type, p.size_bytes);
        if best.is_none_or(|(_, r)| rank > r) {
            best = Some((p, rank));
        }
    }
    Ok(best.map(|(p, _)| p))
}

fn open_fs(
    src: Arc<dyn ReadAt>,
    opts: &ChainOptions,
    steps: &mut Vec<Step>,
) -> Result<Root, DiskError> {
    if opts.via_vm {
        let found = super::ext::sniff_other(&*src);
        let fstype = if ExtFs::open(Arc::clone(&src)).is_ok() {
            "ext4"
        } else {
            mount_type(found).ok_or_else(|| {
                DiskError::Unsupported(format!(
                    "the file system is {found}, which the VM cannot mount either"
                ))
            })?
        };
        steps.push(Step::new(
            "vm",
            format!("{fstype} {} (read in a VM)", human(src.size())),
            src.size(),
        ));
        return Ok(Root::Vm(src, fstype));
    }
    let size = src.size();
    match ExtFs::open(Arc::clone(&src)) {
        Ok(fs) => {
            steps.push(Step::new(fs.kind().to_string(), fs.describe(), size));
            Ok(Root::Ext(fs))
        }
        Err(ExtError::NotExt { found }) => Err(DiskError::Unsupported(match mount_type(found) {
            Some(_) => return Err(needs_vm(&*src, None, steps)),
            None if found == "no recognizable file system" => format!(
                "{} is not a disk image, partition table or file system kiln knows at offset 0 (it reads ISO 9660, XVA, chunk folders, VHD, qcow2, raw disks with MBR/GPT, and ext2/3/4; {} for what Linux mounts)",
                human(size),
                crate::words::Opt::ViaVm
            ),
            None => format!("the file system is {found}, which kiln cannot read (it reads ext2/3/4)"),
        })),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::part::{Guid, Partition};
    use super::*;

    const MIB: u64 = 1 << 20;

    fn part(number: u32, start: u64, size: u64, type_guid: Guid) -> Partition {
        Partition {
            number,
            start_bytes: start,
            size_bytes: size,
            kind: PartitionKind::Gpt {
                type_guid,
                name: String::new(),
            },
            bootable: false,
        }
    }

    #[test]
    fn the_vm_root_is_never_a_boot_partition_and_prefers_root_types_then_size() {
        let mut disk = vec![0u8; (4 * MIB) as usize];
        // p1: an EFI System partition with FAT32, p2 and p3: xfs.
        disk[0x52..0x5a].copy_from_slice(b"FAT32   ");
        disk[MIB as usize..MIB as usize + 4].copy_from_slice(b"XFSB");
        disk[2 * MIB as usize..2 * MIB as usize + 4].copy_from_slice(b"XFSB");
        let disk: Arc<dyn ReadAt> = Arc::new(disk);
        let parts = vec![
            part(1, 0, MIB, Guid::EFI_SYSTEM),
            part(2, MIB, MIB, Guid::LINUX_FILESYSTEM),
            part(3, 2 * MIB, 2 * MIB, Guid::LINUX_FILESYSTEM),
        ];
        let got = vm_root_candidate(&parts, &disk).unwrap().map(|p| p.number);
        assert_eq!(got, Some(3), "the largest xfs");
        let mut typed = parts.clone();
        typed[1] = part(2, MIB, MIB, Guid::LINUX_ROOT_X86_64);
        let got = vm_root_candidate(&typed, &disk).unwrap().map(|p| p.number);
        assert_eq!(got, Some(2), "the one typed as a Linux root");
        // FAT alone is not a root, even when it is not typed EFI.
        let fat_only = vec![part(1, 0, MIB, Guid::LINUX_FILESYSTEM)];
        assert!(vm_root_candidate(&fat_only, &disk).unwrap().is_none());
    }
}
