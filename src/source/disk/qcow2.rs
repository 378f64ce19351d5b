//! qcow2 (QEMU copy-on-write, versions 2 and 3) as a [`ReadAt`].
//!
//! A guest offset is split into an index in the L1 table (one entry per L2
//! table), an index in that L2 table (one entry per cluster) and an offset in
//! the cluster. An L2 entry says where the cluster's data lives in the file,
//! that it is compressed (zlib raw deflate or zstd, one stream per cluster),
//! that it reads as zeros (version 3), or that it is unallocated: then it
//! comes from the backing file, which the caller supplies
//! ([`Qcow2::open_with_backing`]), or reads as zeros. Images with extended L2
//! entries (`extended_l2=on`) split each cluster into 32 subclusters with
//! their own allocated/zero bits.
//!
//! Refcounts and snapshots are not needed to read the active disk and are
//! ignored. L1 entries are validated when the image is opened; L2 tables are
//! read on demand into a small LRU cache and validated as they are used.

use std::fmt;
use std::io::{self, Read};
use std::sync::{Arc, Mutex, PoisonError};

use super::ReadAt;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// Bits 9-55 of L1 and standard L2 entries hold a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2_COMPRESSED: u64 = 1 << 62;
const L2_ZERO: u64 = 1;
/// qemu refuses L1 tables above 32 MiB (QCOW_MAX_L1_SIZE); so do we.
const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's limit for the backing file name (1023 bytes).
const MAX_BACKING_NAME: u32 = 1023;
/// 64 PiB: beyond what qemu creates, small enough that offset arithmetic
/// never overflows.
const MAX_SIZE: u64 = 1 << 56;
/// Memory the L2 cache may hold, and its bounds in tables.
const L2_CACHE_BYTES: u64 = 16 << 20;
const L2_CACHE_MAX_TABLES: usize = 64;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Errors from opening or reading a qcow2 image. Each names the byte offset
/// in the file where the input went wrong. Read errors reach
/// [`ReadAt::read_at`] callers as [`io::ErrorKind::InvalidData`] wrapping
/// this type.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The underlying source failed.
    #[error("qcow2: I/O error at offset {offset}: {source}")]
    Io {
        /// Where the read started.
        offset: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No "QFI\xfb" magic at offset 0, or the file is shorter than a header.
    #[error("qcow2: no qcow2 header at offset 0")]
    NotQcow2,
    /// Only versions 2 and 3 exist.
    #[error("qcow2: unsupported version {version} at offset 4")]
    Version {
        /// The version field.
        version: u32,
    },
    /// The cluster size is outside 512 B..2 MiB.
    #[error("qcow2: cluster_bits {bits} at offset 20 is outside 9..=21 (512 B to 2 MiB clusters)")]
    ClusterBits {
        /// The cluster_bits field.
        bits: u32,
    },
    /// The image is encrypted (AES or LUKS).
    #[error("qcow2: encrypted images (crypt_method {method} at offset 32) are not supported")]
    Encrypted {
        /// The crypt_method field.
        method: u32,
    },
    /// The data lives in an external file.
    #[error("qcow2: the image keeps its data in an external file{} (incompatible feature bit 2 at offset 72); not supported", name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default())]
    ExternalDataFile {
        /// The external data file name, from the header extension.
        name: Option<String>,
    },
    /// Incompatible feature bits this reader does not know.
    #[error("qcow2: unknown incompatible feature bits {bits:#x} at offset 72")]
    UnknownFeatures {
        /// The unknown bits.
        bits: u64,
    },
    /// Some header field is inconsistent.
    #[error("qcow2: bad header field at offset {offset}: {reason}")]
    Header {
        /// The field's offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The compression type is neither zlib (0) nor zstd (1).
    #[error("qcow2: unknown compression type {kind} at offset 104")]
    CompressionType {
        /// The compression_type field.
        kind: u8,
    },
    /// The disk size is absurd or the L1 table cannot cover it.
    #[error("qcow2: disk size {size} at offset 24 {reason}")]
    Size {
        /// The size field.
        size: u64,
        /// What is wrong.
        reason: String,
    },
    /// The L1 table is misplaced.
    #[error("qcow2: L1 table of {entries} entries at offset {l1_offset} {reason}")]
    L1 {
        /// The L1 offset field.
        l1_offset: u64,
        /// The L1 size field.
        entries: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// An L1 entry points at an unaligned or out-of-file L2 table.
    #[error("qcow2: L1 entry {index} at offset {offset} points to an L2 table at {l2_offset} that is {reason}")]
    L2Table {
        /// L1 index.
        index: u64,
        /// Offset of the L1 entry.
        offset: u64,
        /// The L2 table offset it holds.
        l2_offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// An L2 entry points at an unaligned or out-of-file data cluster.
    #[error(
        "qcow2: L2 entry at offset {offset} points to a data cluster at {host} that is {reason}"
    )]
    DataCluster {
        /// Offset of the L2 entry.
        offset: u64,
        /// The host offset it holds.
        host: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A compressed cluster does not decompress to one cluster.
    #[error("qcow2: compressed cluster at offset {offset} (L2 entry at {entry_offset}): {reason}")]
    Compressed {
        /// Host offset of the compressed data.
        offset: u64,
        /// Offset of the L2 entry.
        entry_offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An extended L2 entry marks a subcluster both allocated and zero.
    #[error("qcow2: extended L2 entry at offset {offset} marks subcluster {sub} both allocated and zero")]
    Subcluster {
        /// Offset of the L2 entry.
        offset: u64,
        /// Subcluster index.
        sub: u32,
    },
    /// The image has a backing file and none was supplied.
    #[error(
        "qcow2: the image has a backing file {name:?}: open it with Qcow2::open_with_backing ({})",
        crate::words::Opt::Backing
    )]
    BackingRequired {
        /// The backing file name from the header.
        name: String,
    },
    /// A backing file was supplied for an image without one.
    #[error("qcow2: a backing file was given but the header (offset 8) names none")]
    UnexpectedBacking,
}

impl From<Qcow2Error> for io::Error {
    fn from(e: Qcow2Error) -> io::Error {
        match e {
            Qcow2Error::Io { source, .. } => source,
            e => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// How compressed clusters are compressed (header field at offset 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), qemu's default.
    Zlib,
    /// One zstd frame per cluster.
    Zstd,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        })
    }
}

/// A small LRU of L2 tables, keyed by their file offset.
struct L2Cache {
    tick: u64,
    cap: usize,
    slots: Vec<(u64, u64, Arc<[u64]>)>,
}

/// A qcow2 image read as its virtual disk.
///
/// ```no_run
/// use kiln::disk::{qcow2::{Qcow2, Qcow2Error}, FileSource, ReadAt};
/// use std::sync::Arc;
///
/// let file: Arc<dyn ReadAt> = Arc::new(FileSource::open("disk.qcow2".as_ref())?);
/// let disk = match Qcow2::open(file.clone()) {
///     Err(Qcow2Error::BackingRequired { name }) => {
///         let base: Arc<dyn ReadAt> = Arc::new(Qcow2::open(Arc::new(FileSource::open(name.as_ref())?))?);
///         Qcow2::open_with_backing(file, base)?
///     }
///     other => other?,
/// };
/// println!("{}", disk.describe()); // e.g. "qcow2 v3 10 GiB, 64 KiB clusters, zlib"
/// let mut mbr = [0u8; 512];
/// disk.read_exact_at(&mut mbr, 0)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Qcow2 {
    src: Arc<dyn ReadAt>,
    version: u32,
    cluster_bits: u32,
    size: u64,
    /// Extended L2 entries: 128 bits per cluster, 32 subclusters.
    extended_l2: bool,
    /// Entries per L2 table.
    l2_entries: u64,
    l1: Vec<u64>,
    compression: Compression,
    backing: Option<Arc<dyn ReadAt>>,
    backing_name: Option<String>,
    backing_format: Option<String>,
    l2_cache: Mutex<L2Cache>,
    /// The last decompressed cluster (by its L2 entry), so small sequential
    /// reads do not decompress the same cluster again and again.
    last_compressed: Mutex<Option<(u64, Arc<[u8]>)>>,
}

impl fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qcow2")
            .field("version", &self.version)
            .field("cluster_bits", &self.cluster_bits)
            .field("size", &self.size)
            .field("extended_l2", &self.extended_l2)
            .field("compression", &self.compression)
            .field("backing_name", &self.backing_name)
            .finish()
    }
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

fn read(src: &dyn ReadAt, buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
    src.read_exact_at(buf, offset)
        .map_err(|source| Qcow2Error::Io { offset, source })
}

fn header_err(offset: u64, reason: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Header {
        offset,
        reason: reason.into(),
    }
}

/// Where the bytes of one guest unit (a cluster, or a subcluster with
/// extended L2 entries) come from.
enum Loc {
    /// At this file offset (of the requested guest byte).
    Data(u64),
    Zero,
    /// Unallocated: the backing file, or zeros.
    Backing,
    /// Inside the compressed cluster with this L2 entry, stored at
    /// `entry_offset` in the file.
    Compressed {
        entry: u64,
        entry_offset: u64,
    },
}

impl Qcow2 {
    /// Opens an image without a backing file. An image with one fails with
    /// [`Qcow2Error::BackingRequired`], which names it.
    pub fn open(src: Arc<dyn ReadAt>) -> Result<Qcow2, Qcow2Error> {
        Qcow2::open_inner(src, None)
    }

    /// Opens an image over `backing`, the virtual disk of its backing file
    /// (see [`Qcow2::backing_file`]). Unallocated clusters read from it, and
    /// as zeros past its end, as in qemu.
    pub fn open_with_backing(
        src: Arc<dyn ReadAt>,
        backing: Arc<dyn ReadAt>,
    ) -> Result<Qcow2, Qcow2Error> {
        Qcow2::open_inner(src, Some(backing))
    }

    fn open_inner(
        src: Arc<dyn ReadAt>,
        backing: Option<Arc<dyn ReadAt>>,
    ) -> Result<Qcow2, Qcow2Error> {
        let file_size = src.size();
        if file_size < 72 {
            return Err(Qcow2Error::NotQcow2);
        }
        let mut h = [0u8; 104];
        let hlen = (file_size.min(104)) as usize;
        read(&*src, &mut h[..hlen], 0)?;
        if &h[..4] != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(Qcow2Error::Version { version });
        }
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Qcow2Error::ClusterBits { bits: cluster_bits });
        }
        let cluster_size = 1u64 << cluster_bits;
        let method = be32(&h, 32);
        if method != 0 {
            return Err(Qcow2Error::Encrypted { method });
        }

        // Version 2 headers are 72 bytes; version 3 ones say how long they
        // are (at least 104) and carry feature bits.
        let (header_len, incompat) = if version == 3 {
            if hlen < 104 {
                return Err(Qcow2Error::NotQcow2);
            }
            let len = u64::from(be32(&h, 100));
            if len < 104 || !len.is_multiple_of(8) || len > cluster_size.min(file_size) {
                return Err(header_err(100, format!("header length {len} is not a multiple of 8 between 104 and the cluster (and file) size")));
            }
            (len, be64(&h, 72))
        } else {
            (72, 0)
        };
        // The header cluster holds header, extensions and the backing name.
        let head_len = cluster_size.min(file_size) as usize;
        let mut head = vec![0u8; head_len];
        read(&*src, &mut head, 0)?;

        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Qcow2Error::UnknownFeatures { bits: unknown });
        }
        // Dirty (refcounts may be stale) and corrupt (qemu found metadata
        // damage and stopped writing) do not stop read-only use; qemu also
        // opens such images read-only.
        let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(header_err(
                20,
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        let compression = if version == 3 && header_len > 104 {
            match head[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                kind => return Err(Qcow2Error::CompressionType { kind }),
            }
        } else {
            Compression::Zlib
        };
        // qemu sets the compression-type feature bit exactly when the type
        // is not zlib, so that older readers refuse the image.
        if (compression != Compression::Zlib) != (incompat & INCOMPAT_COMPRESSION != 0) {
            return Err(header_err(
                72,
                format!("compression type {compression} disagrees with incompatible feature bit 3"),
            ));
        }

        let backing_offset = be64(&h, 8);
        let backing_len = be32(&h, 16);
        let backing_name = if backing_offset != 0 {
            let end = backing_offset.checked_add(u64::from(backing_len));
            if backing_len == 0
                || backing_len > MAX_BACKING_NAME
                || backing_offset < header_len
                || end.is_none_or(|e| e > head_len as u64)
            {
                return Err(header_err(8, format!("backing file name of {backing_len} bytes at offset {backing_offset} is outside the header cluster or longer than 1023 bytes")));
            }
            let start = backing_offset as usize;
            Some(String::from_utf8_lossy(&head[start..start + backing_len as usize]).into_owned())
        } else {
            None
        };

        // Header extensions: (type, length, data padded to 8) up to an end
        // marker, inside the header cluster (and before the backing name).
        let ext_end = if backing_offset != 0 {
            backing_offset as usize
        } else {
            head_len
        };
        let mut pos = header_len as usize;
        let mut backing_format = None;
        let mut data_file = None;
        while pos + 8 <= ext_end {
            let kind = be32(&head, pos);
            let len = be32(&head, pos + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data = pos + 8;
            let next = data.checked_add(len.div_ceil(8) * 8);
            let Some(next) = next.filter(|n| *n <= ext_end) else {
                return Err(header_err(
                    pos as u64,
                    format!(
                        "header extension {kind:#x} of {len} bytes overruns the header cluster"
                    ),
                ));
            };
            match kind {
                EXT_BACKING_FORMAT => {
                    backing_format =
                        Some(String::from_utf8_lossy(&head[data..data + len]).into_owned())
                }
                EXT_DATA_FILE => {
                    data_file = Some(String::from_utf8_lossy(&head[data..data + len]).into_owned())
                }
                _ => {}
            }
            pos = next;
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile { name: data_file });
        }

        let size = be64(&h, 24);
        if size > MAX_SIZE {
            return Err(Qcow2Error::Size {
                size,
                reason: "is larger than 64 PiB".into(),
            });
        }
        let l2_entries = cluster_size / if extended_l2 { 16 } else { 8 };
        let needed_l1 = size.div_ceil(cluster_size * l2_entries);
        let l1_entries = u64::from(be32(&h, 36));
        let l1_offset = be64(&h, 40);
        if l1_entries < needed_l1 {
            return Err(Qcow2Error::Size {
                size,
                reason: format!("needs {needed_l1} L1 entries but the L1 table (size at offset 36) has {l1_entries}"),
            });
        }
        let l1_err = |reason| Qcow2Error::L1 {
            l1_offset,
            entries: l1_entries,
            reason,
        };
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(l1_err("is larger than 32 MiB"));
        }
        if !l1_offset.is_multiple_of(cluster_size) {
            return Err(l1_err("is not cluster-aligned"));
        }
        // Only the entries the disk size needs are used (and so read).
        if l1_offset
            .checked_add(needed_l1 * 8)
            .is_none_or(|e| e > file_size)
        {
            return Err(l1_err("does not fit in the file"));
        }
        let mut raw = vec![0u8; (needed_l1 * 8) as usize];
        read(&*src, &mut raw, l1_offset)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        drop(raw);
        for (i, e) in l1.iter().enumerate() {
            let l2_offset = e & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            let reason = if !l2_offset.is_multiple_of(cluster_size) {
                "not cluster-aligned"
            } else if l2_offset + cluster_size > file_size {
                "past the end of the file"
            } else {
                continue;
            };
            return Err(Qcow2Error::L2Table {
                index: i as u64,
                offset: l1_offset + 8 * i as u64,
                l2_offset,
                reason,
            });
        }

        match (&backing_name, &backing) {
            (Some(name), None) => return Err(Qcow2Error::BackingRequired { name: name.clone() }),
            (None, Some(_)) => return Err(Qcow2Error::UnexpectedBacking),
            _ => {}
        }

        let cap = ((L2_CACHE_BYTES / cluster_size) as usize).clamp(4, L2_CACHE_MAX_TABLES);
        Ok(Qcow2 {
            src,
            version,
            cluster_bits,
            size,
            extended_l2,
            l2_entries,
            l1,
            compression,
            backing,
            backing_name,
            backing_format,
            l2_cache: Mutex::new(L2Cache {
                tick: 0,
                cap,
                slots: Vec::with_capacity(cap),
            }),
            last_compressed: Mutex::new(None),
        })
    }

    /// The format version, 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// How compressed clusters are compressed.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// The backing file name from the header, as qemu wrote it (often
    /// relative to the image's directory).
    pub fn backing_file(&self) -> Option<&str> {
        self.backing_name.as_deref()
    }

    /// The backing file's format from the header extension (e.g. "qcow2").
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// A one-line summary, e.g. `qcow2 v3 10 GiB, 64 KiB clusters, zlib`.
    pub fn describe(&self) -> String {
        use crate::progress::human_bytes as human_size;
        let mut s = format!(
            "qcow2 v{} {}, {} clusters",
            self.version,
            human_size(self.size),
            human_size(self.cluster_size())
        );
        if self.version == 3 {
            s.push_str(&format!(", {}", self.compression));
        }
        if self.extended_l2 {
            s.push_str(", extended L2");
        }
        if let Some(name) = &self.backing_name {
            s.push_str(&format!(", backing {name:?}"));
        }
        s
    }

    /// Whether any data for the cluster holding `offset` is in this file
    /// (allocated, compressed or zero clusters); `false` means it reads from
    /// the backing file or as zeros. Reads the L2 table (cached).
    pub fn allocated(&self, offset: u64) -> io::Result<bool> {
        if offset >= self.size {
            return Ok(false);
        }
        Ok(!matches!(self.locate(offset)?, Loc::Backing))
    }

    fn l2_table(&self, l2_offset: u64) -> io::Result<Arc<[u64]>> {
        {
            let mut c = self.l2_cache.lock().unwrap_or_else(PoisonError::into_inner);
            c.tick += 1;
            let tick = c.tick;
            if let Some(slot) = c.slots.iter_mut().find(|s| s.0 == l2_offset) {
                slot.1 = tick;
                return Ok(slot.2.clone());
            }
        }
        let mut raw = vec![0u8; self.cluster_size() as usize];
        read(&*self.src, &mut raw, l2_offset)?;
        let table: Arc<[u64]> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let mut c = self.l2_cache.lock().unwrap_or_else(PoisonError::into_inner);
        let tick = c.tick;
        if c.slots.len() < c.cap {
            c.slots.push((l2_offset, tick, table.clone()));
        } else if let Some(lru) = c.slots.iter_mut().min_by_key(|s| s.1) {
            *lru = (l2_offset, tick, table.clone());
        }
        Ok(table)
    }

    /// Where the guest byte at `pos` (< size) lives.
    fn locate(&self, pos: u64) -> io::Result<Loc> {
        let cluster_size = self.cluster_size();
        let cluster = pos >> self.cluster_bits;
        let in_cluster = pos & (cluster_size - 1);
        let Some(&l1e) = self.l1.get((cluster / self.l2_entries) as usize) else {
            return Ok(Loc::Backing);
        };
        let l2_offset = l1e & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(Loc::Backing);
        }
        let table = self.l2_table(l2_offset)?;
        let index = (cluster % self.l2_entries) as usize;
        let width = if self.extended_l2 { 2 } else { 1 };
        let entry = table.get(index * width).copied().unwrap_or(0);
        let entry_offset = l2_offset + (index * width * 8) as u64;
        if entry & L2_COMPRESSED != 0 {
            return Ok(Loc::Compressed {
                entry,
                entry_offset,
            });
        }
        let host = entry & OFFSET_MASK;
        let data = |host: u64, at: u64| -> io::Result<Loc> {
            let reason = if !host.is_multiple_of(cluster_size) {
                "not cluster-aligned"
            } else if host + cluster_size > self.src.size() {
                "past the end of the file"
            } else {
                return Ok(Loc::Data(host + at));
            };
            Err(Qcow2Error::DataCluster {
                offset: entry_offset,
                host,
                reason,
            }
            .into())
        };
        if !self.extended_l2 {
            // The zero flag exists from version 3 on; version 2 writers
            // leave the bit clear, so honouring it always is harmless.
            if entry & L2_ZERO != 0 {
                return Ok(Loc::Zero);
            }
            if host == 0 {
                return Ok(Loc::Backing);
            }
            return data(host, in_cluster);
        }
        let bitmap = table.get(index * 2 + 1).copied().unwrap_or(0);
        let sub_bits = self.cluster_bits - 5;
        let sub = (in_cluster >> sub_bits) as u32;
        let alloc = bitmap & (1 << sub) != 0;
        let zero = bitmap & (1 << (32 + sub)) != 0;
        match (alloc, zero) {
            (true, true) => Err(Qcow2Error::Subcluster {
                offset: entry_offset,
                sub,
            }
            .into()),
            (true, false) if host != 0 => data(host, in_cluster),
            (true, false) => Err(Qcow2Error::DataCluster {
                offset: entry_offset,
                host,
                reason: "zero although a subcluster is marked allocated",
            }
            .into()),
            (false, true) => Ok(Loc::Zero),
            (false, false) => Ok(Loc::Backing),
        }
    }

    /// The decompressed cluster of a compressed L2 entry.
    fn decompress(&self, entry: u64, entry_offset: u64) -> io::Result<Arc<[u8]>> {
        {
            let last = self
                .last_compressed
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some((e, data)) = &*last {
                if *e == entry {
                    return Ok(data.clone());
                }
            }
        }
        // The descriptor's low `62 - (cluster_bits - 8)` bits are the byte
        // offset of the data, the next `cluster_bits - 8` bits the number of
        // 512-byte sectors it spans beyond the first, so the stored length is
        // only an upper bound (up to the end of a sector).
        let shift = 62 - (self.cluster_bits - 8);
        let offset = entry & ((1u64 << shift) - 1);
        let sectors = ((entry >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        let bound = sectors * 512 - (offset & 511);
        let err = |reason: String| -> io::Error {
            Qcow2Error::Compressed {
                offset,
                entry_offset,
                reason,
            }
            .into()
        };
        let file_size = self.src.size();
        if offset >= file_size {
            return Err(err("starts past the end of the file".into()));
        }
        // The last compressed cluster may end before its last sector does.
        let len = bound.min(file_size - offset) as usize;
        let mut input = vec![0u8; len];
        read(&*self.src, &mut input, offset)?;
        let cluster_size = self.cluster_size() as usize;
        let mut out = vec![0u8; cluster_size];
        match self.compression {
            Compression::Zlib => {
                // qemu writes raw deflate (window bits -12, no zlib header)
                // and accepts a stream that fills the cluster, ended or not.
                let mut d = flate2::Decompress::new(false);
                d.decompress(&input, &mut out, flate2::FlushDecompress::Finish)
                    .map_err(|e| err(format!("deflate: {e}")))?;
                if d.total_out() != cluster_size as u64 {
                    return Err(err(format!(
                        "deflate stream yields {} bytes, not a {cluster_size}-byte cluster",
                        d.total_out()
                    )));
                }
            }
            Compression::Zstd => {
                // One frame per cluster, possibly followed by padding.
                let mut d = zstd::stream::read::Decoder::with_buffer(&input[..])
                    .map_err(|e| err(format!("zstd: {e}")))?
                    .single_frame();
                // No qemu-written frame needs a window above the cluster
                // size; cap it so a crafted frame cannot ask for 128 MiB+.
                d.window_log_max(23)
                    .map_err(|e| err(format!("zstd: {e}")))?;
                d.read_exact(&mut out).map_err(|e| {
                    err(format!(
                        "zstd frame does not fill the {cluster_size}-byte cluster: {e}"
                    ))
                })?;
            }
        }
        let out: Arc<[u8]> = out.into();
        *self
            .last_compressed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((entry, out.clone()));
        Ok(out)
    }
}

/// Reads from `src`, zero-filling whatever lies past its end.
fn read_or_zero(src: &dyn ReadAt, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let avail = src.size().saturating_sub(offset);
    let n = buf.len().min(usize::try_from(avail).unwrap_or(usize::MAX));
    src.read_exact_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(())
}

impl ReadAt for Qcow2 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
        let unit_bits = if self.extended_l2 {
            self.cluster_bits - 5
        } else {
            self.cluster_bits
        };
        let unit = 1u64 << unit_bits;
        // Adjacent units stored back to back in the file are read with one
        // call: (file offset, start in buf, length).
        let mut pending: Option<(u64, usize, usize)> = None;
        let flush = |p: &mut Option<(u64, usize, usize)>, buf: &mut [u8]| -> io::Result<()> {
            if let Some((host, start, len)) = p.take() {
                self.src.read_exact_at(&mut buf[start..start + len], host)?;
            }
            Ok(())
        };
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let room = unit - (pos & (unit - 1));
            let len = (n - done).min(usize::try_from(room).unwrap_or(usize::MAX));
            match self.locate(pos)? {
                Loc::Data(host) => match &mut pending {
                    Some((h, s, l)) if *h + *l as u64 == host && *s + *l == done => *l += len,
                    _ => {
                        flush(&mut pending, buf)?;
                        pending = Some((host, done, len));
                    }
                },
                loc => {
                    flush(&mut pending, buf)?;
                    let chunk = &mut buf[done..done + len];
                    match loc {
                        Loc::Zero => chunk.fill(0),
                        Loc::Backing => match &self.backing {
                            Some(b) => read_or_zero(&**b, chunk, pos)?,
                            None => chunk.fill(0),
                        },
                        Loc::Compressed {
                            entry,
                            entry_offset,
                        } => {
                            let data = self.decompress(entry, entry_offset)?;
                            let at = (pos & (self.cluster_size() - 1)) as usize;
                            chunk.copy_from_slice(&data[at..at + len]);
                        }
                        Loc::Data(_) => {}
                    }
                }
            }
            done += len;
        }
        flush(&mut pending, buf)?;
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// Opens `data` as a qcow2 image (over a backing file of a repeated byte
/// when it has one) and reads its virtual disk, ignoring errors: the entry
/// point of a future cargo-fuzz target.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    let src: Arc<dyn ReadAt> = Arc::new(data.to_vec());
    let disk = match Qcow2::open(src.clone()) {
        Err(Qcow2Error::BackingRequired { .. }) => {
            let backing: Arc<dyn ReadAt> = Arc::new(vec![0x5au8; 64 << 10]);
            Qcow2::open_with_backing(src, backing)
        }
        other => other,
    };
    if let Ok(disk) = disk {
        super::part::fuzz_read_all(&disk);
    }
}

#[cfg(test)]
mod tests {
    use super::super::Cursor;
    use super::*;
    use std::io::Write;

    const CB: u32 = 12; // 4 KiB clusters: 512 L2 entries, 2 MiB per L2 table
    const CS: usize = 1 << CB;

    /// A version-3 image of `size` bytes: header cluster 0, L1 at cluster 1,
    /// L2 at cluster 2; the caller appends data clusters from cluster 3 and
    /// sets L2 entries with [`set_l2`].
    fn image(size: u64) -> Vec<u8> {
        image_bits(CB, size)
    }

    fn image_bits(cb: u32, size: u64) -> Vec<u8> {
        let cs = 1usize << cb;
        let mut img = vec![0u8; 3 * cs];
        img[..4].copy_from_slice(MAGIC);
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[20..24].copy_from_slice(&cb.to_be_bytes());
        img[24..32].copy_from_slice(&size.to_be_bytes());
        let l1 = size.div_ceil((cs * cs / 8) as u64) as u32;
        img[36..40].copy_from_slice(&l1.max(1).to_be_bytes());
        img[40..48].copy_from_slice(&(cs as u64).to_be_bytes());
        img[96..100].copy_from_slice(&4u32.to_be_bytes());
        img[100..104].copy_from_slice(&104u32.to_be_bytes());
        let l1e = (2 * cs as u64) | (1 << 63);
        img[cs..cs + 8].copy_from_slice(&l1e.to_be_bytes());
        img
    }

    fn set_l2(img: &mut [u8], index: usize, entry: u64) {
        let at = 2 * CS + 8 * index;
        img[at..at + 8].copy_from_slice(&entry.to_be_bytes());
    }

    fn open(img: Vec<u8>) -> Result<Qcow2, Qcow2Error> {
        Qcow2::open(Arc::new(img))
    }

    fn read_all(d: &dyn ReadAt) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        Cursor::new(d, 0).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn data_zero_and_unallocated_clusters() {
        let mut img = image(4 * CS as u64);
        img.extend_from_slice(&[0x11; CS]); // cluster 3
        img.extend_from_slice(&[0x22; CS]); // cluster 4
        set_l2(&mut img, 0, (3 * CS as u64) | (1 << 63));
        set_l2(&mut img, 1, 4 * CS as u64);
        set_l2(&mut img, 2, (4 * CS as u64) | L2_ZERO); // zero flag wins
        let d = open(img).unwrap();
        assert_eq!(d.describe(), "qcow2 v3 16 KiB, 4 KiB clusters, zlib");
        let all = read_all(&d).unwrap();
        assert_eq!(all.len(), 4 * CS);
        assert!(all[..CS].iter().all(|b| *b == 0x11));
        assert!(all[CS..2 * CS].iter().all(|b| *b == 0x22));
        assert!(all[2 * CS..].iter().all(|b| *b == 0));
        assert!(d.allocated(0).unwrap() && d.allocated(2 * CS as u64).unwrap());
        assert!(!d.allocated(3 * CS as u64).unwrap());
    }

    fn compressed_entry(offset: u64, len: usize) -> u64 {
        let shift = 62 - (CB - 8);
        let extra = ((offset % 512) as usize + len).div_ceil(512) as u64 - 1;
        L2_COMPRESSED | (extra << shift) | offset
    }

    #[test]
    fn compressed_zlib_and_zstd_clusters() {
        let plain: Vec<u8> = (0..CS).map(|i| (i / 100) as u8).collect();
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        deflate.write_all(&plain).unwrap();
        let deflated = deflate.finish().unwrap();
        let mut img = image(2 * CS as u64);
        let off = img.len() as u64 + 100; // compressed data need not be aligned
        img.extend_from_slice(&[0u8; 100]);
        img.extend_from_slice(&deflated);
        set_l2(&mut img, 1, compressed_entry(off, deflated.len()));
        let d = open(img.clone()).unwrap();
        let all = read_all(&d).unwrap();
        assert_eq!(&all[CS..], &plain[..]);

        // The same with zstd: type byte at 104, feature bit 3.
        let zst = zstd::bulk::compress(&plain, 3).unwrap();
        let mut img = image(2 * CS as u64);
        img[100..104].copy_from_slice(&112u32.to_be_bytes());
        img[104] = 1;
        img[79] |= INCOMPAT_COMPRESSION as u8;
        let off = img.len() as u64;
        img.extend_from_slice(&zst);
        img.extend_from_slice(&[0xee; 300]); // trailing garbage in the sector
        set_l2(&mut img, 0, compressed_entry(off, zst.len() + 300));
        let d = open(img).unwrap();
        assert_eq!(d.compression(), Compression::Zstd);
        let all = read_all(&d).unwrap();
        assert_eq!(&all[..CS], &plain[..]);
    }

    #[test]
    fn corrupt_compressed_cluster_is_a_read_error() {
        let mut img = image(CS as u64);
        let off = img.len() as u64;
        img.extend_from_slice(&[0xff; 512]);
        set_l2(&mut img, 0, compressed_entry(off, 512));
        let d = open(img).unwrap();
        let e = read_all(&d).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .contains(&format!("compressed cluster at offset {off}")),
            "{e}"
        );
    }

    #[test]
    fn backing_required_and_used() {
        let mut img = image(2 * CS as u64);
        let name = b"base.qcow2";
        img[8..16].copy_from_slice(&512u64.to_be_bytes());
        img[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        img[512..512 + name.len()].copy_from_slice(name);
        img.extend_from_slice(&[0x11; CS]);
        set_l2(&mut img, 1, 3 * CS as u64);
        let e = open(img.clone()).unwrap_err();
        assert!(
            matches!(e, Qcow2Error::BackingRequired { ref name } if name == "base.qcow2"),
            "{e}"
        );
        let base: Arc<dyn ReadAt> = Arc::new(vec![0x77u8; CS + 10]);
        let d = Qcow2::open_with_backing(Arc::new(img), base).unwrap();
        assert_eq!(d.backing_file(), Some("base.qcow2"));
        let all = read_all(&d).unwrap();
        assert!(all[..CS].iter().all(|b| *b == 0x77));
        assert!(all[CS..].iter().all(|b| *b == 0x11));
        // Backing smaller than the overlay: zeros past its end.
        let mut img2 = image(2 * CS as u64);
        img2[8..16].copy_from_slice(&512u64.to_be_bytes());
        img2[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        img2[512..512 + name.len()].copy_from_slice(name);
        let base: Arc<dyn ReadAt> = Arc::new(vec![0x77u8; 10]);
        let d = Qcow2::open_with_backing(Arc::new(img2), base).unwrap();
        let all = read_all(&d).unwrap();
        assert_eq!(&all[..10], &[0x77; 10]);
        assert!(all[10..].iter().all(|b| *b == 0));
        let base: Arc<dyn ReadAt> = Arc::new(vec![0u8; 10]);
        assert!(matches!(
            Qcow2::open_with_backing(Arc::new(image(CS as u64)), base),
            Err(Qcow2Error::UnexpectedBacking)
        ));
    }

    #[test]
    fn header_refusals() {
        assert!(matches!(open(vec![0u8; 10]), Err(Qcow2Error::NotQcow2)));
        assert!(matches!(open(vec![0u8; 4096]), Err(Qcow2Error::NotQcow2)));
        let mut img = image(CS as u64);
        img[7] = 4;
        assert!(matches!(open(img), Err(Qcow2Error::Version { version: 4 })));
        for bits in [8u32, 22, 63] {
            let mut img = image(CS as u64);
            img[20..24].copy_from_slice(&bits.to_be_bytes());
            assert!(matches!(open(img), Err(Qcow2Error::ClusterBits { bits: b }) if b == bits));
        }
        let mut img = image(CS as u64);
        img[35] = 2;
        assert!(matches!(
            open(img),
            Err(Qcow2Error::Encrypted { method: 2 })
        ));
        let mut img = image(CS as u64);
        img[79] |= 1 << 5;
        assert!(matches!(
            open(img),
            Err(Qcow2Error::UnknownFeatures { bits: 0x20 })
        ));
        let mut img = image(CS as u64);
        img[79] |= INCOMPAT_DATA_FILE as u8;
        let e = open(img).unwrap_err();
        assert!(
            matches!(e, Qcow2Error::ExternalDataFile { name: None }),
            "{e}"
        );
        let mut img = image(CS as u64);
        img[100..104].copy_from_slice(&112u32.to_be_bytes());
        img[104] = 7;
        assert!(matches!(
            open(img),
            Err(Qcow2Error::CompressionType { kind: 7 })
        ));
        let mut img = image(CS as u64);
        img[100..104].copy_from_slice(&112u32.to_be_bytes());
        img[104] = 1; // zstd without the feature bit
        assert!(matches!(
            open(img),
            Err(Qcow2Error::Header { offset: 72, .. })
        ));
        // Dirty and corrupt bits do not prevent reading.
        let mut img = image(CS as u64);
        img[79] |= (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) as u8;
        assert!(open(img).is_ok());
    }

    #[test]
    fn absurd_sizes_and_l1() {
        let mut img = image(CS as u64);
        img[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            open(img),
            Err(Qcow2Error::Size { size: u64::MAX, .. })
        ));
        // Size needs more L1 entries than the table has.
        let mut img = image(CS as u64);
        img[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = open(img).unwrap_err();
        assert!(e.to_string().contains("L1 entries"), "{e}");
        // A huge L1 table that claims to cover a huge size.
        let mut img = image(CS as u64);
        img[24..32].copy_from_slice(&(1u64 << 50).to_be_bytes());
        img[36..40].copy_from_slice(&(1u32 << 29).to_be_bytes());
        assert!(matches!(
            open(img),
            Err(Qcow2Error::L1 {
                reason: "is larger than 32 MiB",
                ..
            })
        ));
        let mut img = image(CS as u64);
        img[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes());
        img[36..40].copy_from_slice(&(1u32 << 19).to_be_bytes());
        assert!(matches!(
            open(img),
            Err(Qcow2Error::L1 {
                reason: "does not fit in the file",
                ..
            })
        ));
        let mut img = image(CS as u64);
        img[47] = 8;
        assert!(matches!(
            open(img),
            Err(Qcow2Error::L1 {
                reason: "is not cluster-aligned",
                ..
            })
        ));
    }

    #[test]
    fn l2_table_past_end_names_l1_entry() {
        let mut img = image(CS as u64);
        img[CS..CS + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
        let e = open(img).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("qcow2: L1 entry 0 at offset {CS} points to an L2 table at 1099511627776 that is past the end of the file")
        );
        let mut img = image(CS as u64);
        img[CS + 6] = 0x12;
        assert!(matches!(
            open(img),
            Err(Qcow2Error::L2Table {
                reason: "not cluster-aligned",
                ..
            })
        ));
    }

    #[test]
    fn data_cluster_past_end_is_a_read_error() {
        let mut img = image(2 * CS as u64);
        set_l2(&mut img, 1, 1 << 40);
        let d = open(img).unwrap();
        let mut buf = [0u8; 16];
        d.read_exact_at(&mut buf, 0).unwrap();
        let e = d.read_exact_at(&mut buf, CS as u64).unwrap_err();
        let inner = e.get_ref().unwrap().downcast_ref::<Qcow2Error>().unwrap();
        assert!(
            matches!(inner, Qcow2Error::DataCluster { offset, host, reason: "past the end of the file" }
                if *offset == 2 * CS as u64 + 8 && *host == 1 << 40),
            "{inner}"
        );
    }

    /// 16 KiB clusters with extended L2 entries (16 bytes each): cluster 0
    /// at file cluster 3 with subclusters 0 and 2 allocated, 1 zero, the
    /// rest unallocated (backing: none, so zeros).
    #[test]
    fn extended_l2_subclusters() {
        let cs = 1usize << 14;
        let sub = cs / 32;
        let mut img = image_bits(14, cs as u64);
        img[79] |= INCOMPAT_EXTL2 as u8;
        img.extend((0..cs).map(|i| (i / sub) as u8 + 1));
        let l2 = 2 * cs;
        img[l2..l2 + 8].copy_from_slice(&(3 * cs as u64).to_be_bytes());
        let bitmap: u64 = 0b101 | (0b10 << 32);
        img[l2 + 8..l2 + 16].copy_from_slice(&bitmap.to_be_bytes());
        let d = open(img.clone()).unwrap();
        assert!(d.describe().contains("extended L2"), "{}", d.describe());
        let all = read_all(&d).unwrap();
        assert!(all[..sub].iter().all(|b| *b == 1));
        assert!(all[sub..2 * sub].iter().all(|b| *b == 0));
        assert!(all[2 * sub..3 * sub].iter().all(|b| *b == 3));
        assert!(all[3 * sub..].iter().all(|b| *b == 0));
        // Allocated and zero at once is corruption.
        let bitmap: u64 = 0b1 | (0b1 << 32);
        img[l2 + 8..l2 + 16].copy_from_slice(&bitmap.to_be_bytes());
        let d = open(img.clone()).unwrap();
        let e = read_all(&d).unwrap_err();
        let inner = e.get_ref().unwrap().downcast_ref::<Qcow2Error>().unwrap();
        assert!(
            matches!(inner, Qcow2Error::Subcluster { offset, sub: 0 } if *offset == l2 as u64),
            "{inner}"
        );
        // Extended L2 entries need 16 KiB clusters or more.
        let mut img = image_bits(13, 8192);
        img[79] |= INCOMPAT_EXTL2 as u8;
        assert!(matches!(
            open(img),
            Err(Qcow2Error::Header { offset: 20, .. })
        ));
    }

    #[test]
    fn extension_overrun() {
        let mut img = image(CS as u64);
        img[104..108].copy_from_slice(&0x1234u32.to_be_bytes());
        img[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            open(img),
            Err(Qcow2Error::Header { offset: 104, .. })
        ));
    }

    #[test]
    fn fuzz_input_survives_garbage() {
        fuzz_input(&[]);
        fuzz_input(&image(CS as u64));
        let mut img = image(1 << 30);
        img[36..40].copy_from_slice(&1u32.to_be_bytes());
        fuzz_input(&img);
    }
}
