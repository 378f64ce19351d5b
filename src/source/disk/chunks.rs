//! A disk stream stored as numbered compressed chunks, as in XenServer's
//! "dir-gzipped-chunks" VDIs (the DDK ISO's `ddk/xvda/chunk-000000000.gz`,
//! ...): the stream is the concatenation of the decompressed chunks in
//! *numeric* order.
//!
//! [`ChunkedStream`] is a [`ReadAt`] over that stream with random access and
//! no temporary copy:
//!
//! * Chunks are located by number, and a chunk's uncompressed size is learnt
//!   from the first pass through it. The gzip ISIZE trailer is *not* trusted
//!   for layout: it is the size mod 2^32 of one member only, and a chunk may
//!   hold several members (`cat a.gz b.gz`). It is checked, per member, when
//!   the pass reaches it.
//! * Within a chunk, zran-style seek points (every [`ChunkOptions::span`]
//!   bytes of output, 2 MiB by default) are recorded during that first pass,
//!   so a later random read decompresses at most one span, and a small LRU
//!   cache keeps recently decompressed spans.
//! * Reading the stream start to end is a single decompression pass: the
//!   pass that builds the index also produces the data that is read.
//!
//! ## Why miniz_oxide
//!
//! A seek point must capture the whole inflater state mid-stream. zlib's
//! zran.c does it by restarting a raw inflater at a byte position, priming
//! the leftover bits (`inflatePrime`) and presetting the 32 KiB dictionary;
//! flate2 exposes neither `inflatePrime` nor a raw inflater over zlib-rs.
//! miniz_oxide's core [`DecompressorOxide`] is `Clone` (plain data: state
//! machine, bit buffer, Huffman tables, about 11 KiB), and in its wrapping
//! output mode the 32 KiB output buffer *is* the dictionary. A seek point
//! is therefore a clone of the decompressor plus a copy of that buffer
//! (about 44 KiB), resumable at the exact compressed byte where the clone
//! was taken, in safe Rust. With the default span that is about 22 MiB of
//! seek points per GiB of stream, well inside the 64 MiB per 1 GB chunk
//! budget.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_COMPUTE_ADLER32, TINFL_FLAG_HAS_MORE_INPUT, TINFL_FLAG_PARSE_ZLIB_HEADER,
};
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::iso9660::{Iso, IsoError, IsoNode};
use super::{FileSource, ReadAt};

/// The deflate dictionary size; also the wrapping output buffer's size.
const WINDOW: usize = 32 * 1024;
/// Compressed bytes read from a chunk at a time.
const IN_PIECE: usize = 64 * 1024;
/// Largest ova.xml read.
const OVA_MAX: u64 = 16 << 20;
/// Chunk numbers have at most this many digits (XenServer writes 9).
const MAX_DIGITS: usize = 12;

/// Errors of the chunked-stream reader; each names the chunk and offset.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// A chunk could not be read.
    #[error("chunks: {chunk}: read at compressed offset {offset}: {source}")]
    Io {
        /// Chunk name.
        chunk: String,
        /// Compressed offset.
        offset: u64,
        /// Cause.
        source: io::Error,
    },
    /// A directory could not be listed or a file opened.
    #[error("chunks: {path}: {source}")]
    Dir {
        /// The path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The ISO holding the chunks failed.
    #[error(transparent)]
    Iso(#[from] IsoError),
    /// No chunk files at all.
    #[error("chunks: no chunk-NNN files in {0}")]
    NoChunks(String),
    /// A chunk number is absent.
    #[error("chunks: chunk number {number} is missing (the chunk after the gap is {next})")]
    Gap {
        /// The missing number.
        number: u64,
        /// The first chunk after the gap.
        next: String,
    },
    /// Two files carry the same number.
    #[error("chunks: {first} and {second} both claim chunk number {number}")]
    Duplicate {
        /// The number.
        number: u64,
        /// One file.
        first: String,
        /// The other.
        second: String,
    },
    /// A chunk number too large to be real.
    #[error("chunks: {0}: chunk number is absurdly large")]
    BadNumber(String),
    /// A gzip or zlib header is invalid.
    #[error("chunks: {chunk}: bad {what} header at compressed offset {offset}: {why}")]
    BadHeader {
        /// Chunk name.
        chunk: String,
        /// gzip or zlib.
        what: &'static str,
        /// Compressed offset of the header.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The deflate data is invalid.
    #[error("chunks: {chunk}: corrupt deflate data at compressed offset {offset} (uncompressed offset {out}): {why}")]
    Corrupt {
        /// Chunk name.
        chunk: String,
        /// Compressed offset.
        offset: u64,
        /// Uncompressed offset within the chunk.
        out: u64,
        /// What the inflater said.
        why: String,
    },
    /// The chunk ends inside compressed data.
    #[error("chunks: {chunk}: truncated: compressed data ends at offset {offset} (uncompressed offset {out})")]
    Truncated {
        /// Chunk name.
        chunk: String,
        /// Where the data ends.
        offset: u64,
        /// Uncompressed offset within the chunk.
        out: u64,
    },
    /// A CRC-32, ISIZE or Adler-32 check failed.
    #[error("chunks: {chunk}: {what} mismatch in the trailer at compressed offset {offset}")]
    Checksum {
        /// Chunk name.
        chunk: String,
        /// Which check.
        what: &'static str,
        /// Trailer offset.
        offset: u64,
    },
    /// Bytes after the compressed data.
    #[error("chunks: {chunk}: unexpected data after the compressed stream at offset {offset}")]
    Trailing {
        /// Chunk name.
        chunk: String,
        /// Offset of the first extra byte.
        offset: u64,
    },
    /// Decompression went past the stream bound (ova.xml size or the limit).
    #[error("chunks: {chunk}: decompresses past the limit of {limit} bytes (at uncompressed chunk offset {offset})")]
    TooBig {
        /// Chunk name.
        chunk: String,
        /// Uncompressed offset within the chunk.
        offset: u64,
        /// The bound.
        limit: u64,
    },
    /// ova.xml's size disagrees with the chunks.
    #[error("chunks: ova.xml gives the disk size {expected} bytes but the chunks decompress to {actual} bytes")]
    SizeMismatch {
        /// ova.xml's size.
        expected: u64,
        /// The chunks' total.
        actual: u64,
    },
    /// ova.xml is unreadable.
    #[error("chunks: ova.xml at byte {offset}: {why}")]
    Ova {
        /// Byte offset in ova.xml.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A chunk failed earlier; it stays failed.
    #[error("chunks: {chunk}: failed earlier: {why}")]
    Failed {
        /// Chunk name.
        chunk: String,
        /// The first error.
        why: String,
    },
}

impl From<ChunkError> for io::Error {
    fn from(e: ChunkError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// How a chunk is stored, from its name's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `.gz`: one or more gzip members.
    Gzip,
    /// `.zz`: one zlib stream.
    Zlib,
    /// No extension: stored as is.
    Raw,
}

/// Tuning and bounds of a [`ChunkedStream`].
#[derive(Debug, Clone)]
pub struct ChunkOptions {
    /// The stream size a descriptor (ova.xml) promises. When set, it is the
    /// stream's [`ReadAt::size`], decompression past it is an error, and so
    /// is a stream that turns out shorter. When unset, the stream is fully
    /// indexed at open to learn its size.
    pub expected_size: Option<u64>,
    /// Upper bound of the stream size when `expected_size` is unset (a
    /// decompression bomb fails at this offset). Default 256 GiB.
    pub limit: u64,
    /// Output bytes between seek points. Default 2 MiB.
    pub span: u64,
    /// Decompressed spans kept in the LRU cache. Default 8.
    pub cache_spans: usize,
    /// Threads used to index several chunks at once. Default: the CPUs.
    pub threads: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            expected_size: None,
            limit: 256 << 30,
            span: 2 << 20,
            cache_spans: 8,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Parses `chunk-000000012.gz` style names: the number and the codec.
/// Returns `Ok(None)` for names that are not chunks.
pub fn parse_chunk_name(name: &str) -> Result<Option<(u64, Codec)>, ChunkError> {
    let Some(rest) = name
        .strip_prefix("chunk-")
        .or_else(|| name.strip_prefix("chunk"))
    else {
        return Ok(None);
    };
    let (digits, codec) = match rest.split_once('.') {
        None => (rest, Codec::Raw),
        Some((d, "gz")) => (d, Codec::Gzip),
        Some((d, "zz")) => (d, Codec::Zlib),
        Some(_) => return Ok(None),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > MAX_DIGITS {
        return Err(ChunkError::BadNumber(name.to_string()));
    }
    let n = if significant.is_empty() {
        0
    } else {
        significant
            .parse::<u64>()
            .map_err(|_| ChunkError::BadNumber(name.to_string()))?
    };
    Ok(Some((n, codec)))
}

/// The inflater state at one point of a chunk; cloning it is a seek point.
#[derive(Clone)]
struct Inflater {
    st: Box<DecompressorOxide>,
    /// The wrapping output buffer = the last 32 KiB of output.
    window: Box<[u8]>,
    wpos: usize,
    /// Compressed offset of the next input byte.
    in_off: u64,
    /// Uncompressed offset within the chunk.
    out_off: u64,
    phase: Phase,
    crc: crc32fast::Hasher,
    member_out: u64,
    members: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Expecting a gzip member header (or the end of the chunk).
    Header,
    Deflate,
    End,
}

/// Compressed input, read in pieces.
struct InBuf {
    data: Vec<u8>,
    start: u64,
}

impl InBuf {
    fn new() -> InBuf {
        InBuf {
            data: Vec::new(),
            start: 0,
        }
    }

    /// The bytes from `off` on (up to a piece), empty at the end.
    fn at<'a>(&'a mut self, c: &Chunk, off: u64) -> Result<&'a [u8], ChunkError> {
        let end = self.start + self.data.len() as u64;
        if off < self.start || off >= end {
            let want =
                IN_PIECE.min(usize::try_from(c.src.size().saturating_sub(off)).unwrap_or(IN_PIECE));
            self.data.resize(want, 0);
            c.src
                .read_exact_at(&mut self.data, off)
                .map_err(|source| c.io(off, source))?;
            self.start = off;
        }
        let skip = usize::try_from(off - self.start).unwrap_or(0);
        Ok(&self.data[skip..])
    }
}

impl Inflater {
    fn new(codec: Codec) -> Inflater {
        Inflater {
            st: Box::default(),
            window: vec![0u8; WINDOW].into_boxed_slice(),
            wpos: 0,
            in_off: 0,
            out_off: 0,
            phase: if codec == Codec::Gzip {
                Phase::Header
            } else {
                Phase::Deflate
            },
            crc: crc32fast::Hasher::new(),
            member_out: 0,
            members: 0,
        }
    }

    /// One step: a header, or one inflate call. Output goes to `sink`.
    fn step(
        &mut self,
        c: &Chunk,
        inb: &mut InBuf,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), ChunkError> {
        match self.phase {
            Phase::End => Ok(()),
            Phase::Header => self.header(c),
            Phase::Deflate => self.inflate(c, inb, sink),
        }
    }

    fn header(&mut self, c: &Chunk) -> Result<(), ChunkError> {
        let size = c.src.size();
        let off = self.in_off;
        let bad = |why: &str| ChunkError::BadHeader {
            chunk: c.name.clone(),
            what: "gzip",
            offset: off,
            why: why.to_string(),
        };
        if off >= size {
            if self.members == 0 {
                return Err(bad("the chunk is empty"));
            }
            self.phase = Phase::End;
            return Ok(());
        }
        let mut h = [0u8; 10];
        let n = c.src.read_at(&mut h, off).map_err(|e| c.io(off, e))?;
        if self.members > 0 && h[..n].iter().all(|&b| b == 0) && c.zeros_from(off)? {
            // Zero padding after the last member (tape-style), as gzip -d
            // tolerates it.
            self.phase = Phase::End;
            return Ok(());
        }
        if n < 2 || h[0] != 0x1f || h[1] != 0x8b {
            return Err(if self.members > 0 {
                ChunkError::Trailing {
                    chunk: c.name.clone(),
                    offset: off,
                }
            } else {
                bad("no gzip magic 1f 8b")
            });
        }
        if n < 10 {
            return Err(bad("shorter than 10 bytes"));
        }
        if h[2] != 8 {
            return Err(bad(&format!("compression method {} is not deflate", h[2])));
        }
        let flags = h[3];
        if flags & 0xe0 != 0 {
            return Err(bad("reserved flag bits set"));
        }
        let mut pos = off + 10;
        if flags & 0x04 != 0 {
            let mut x = [0u8; 2];
            c.src
                .read_exact_at(&mut x, pos)
                .map_err(|_| bad("truncated FEXTRA"))?;
            pos += 2 + u64::from(u16::from_le_bytes(x));
        }
        for bit in [0x08u8, 0x10] {
            if flags & bit != 0 {
                // FNAME / FCOMMENT: NUL-terminated, bounded by the chunk.
                pos = c
                    .find_nul(pos)
                    .ok_or_else(|| bad("unterminated name or comment"))?
                    + 1;
            }
        }
        if flags & 0x02 != 0 {
            pos += 2;
        }
        if pos > size {
            return Err(bad("header runs past the end of the chunk"));
        }
        self.in_off = pos;
        self.st.init();
        self.wpos = 0;
        self.crc = crc32fast::Hasher::new();
        self.member_out = 0;
        self.members += 1;
        self.phase = Phase::Deflate;
        Ok(())
    }

    fn inflate(
        &mut self,
        c: &Chunk,
        inb: &mut InBuf,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), ChunkError> {
        let size = c.src.size();
        let avail = inb.at(c, self.in_off)?;
        let more = self.in_off + (avail.len() as u64) < size;
        let mut flags = 0;
        if c.codec == Codec::Zlib {
            flags |= TINFL_FLAG_PARSE_ZLIB_HEADER | TINFL_FLAG_COMPUTE_ADLER32;
        }
        if more {
            flags |= TINFL_FLAG_HAS_MORE_INPUT;
        }
        let (status, used, written) =
            decompress(&mut self.st, avail, &mut self.window, self.wpos, flags);
        let produced = &self.window[self.wpos..self.wpos + written];
        if c.codec == Codec::Gzip {
            self.crc.update(produced);
        }
        sink(produced);
        self.in_off += used as u64;
        self.out_off += written as u64;
        self.member_out += written as u64;
        self.wpos = (self.wpos + written) & (WINDOW - 1);
        let corrupt = |why: &str| ChunkError::Corrupt {
            chunk: c.name.clone(),
            offset: self.in_off,
            out: self.out_off,
            why: why.to_string(),
        };
        match status {
            TINFLStatus::Done => {
                if c.codec == Codec::Gzip {
                    self.trailer(c)?;
                    self.phase = Phase::Header;
                } else {
                    if self.in_off < size && !c.zeros_from(self.in_off)? {
                        return Err(ChunkError::Trailing {
                            chunk: c.name.clone(),
                            offset: self.in_off,
                        });
                    }
                    self.phase = Phase::End;
                }
                Ok(())
            }
            TINFLStatus::NeedsMoreInput | TINFLStatus::HasMoreOutput => {
                if used == 0 && written == 0 {
                    return Err(corrupt("the inflater made no progress"));
                }
                Ok(())
            }
            TINFLStatus::FailedCannotMakeProgress => Err(ChunkError::Truncated {
                chunk: c.name.clone(),
                offset: self.in_off,
                out: self.out_off,
            }),
            TINFLStatus::Adler32Mismatch => Err(ChunkError::Checksum {
                chunk: c.name.clone(),
                what: "Adler-32",
                offset: self.in_off,
            }),
            TINFLStatus::Failed | TINFLStatus::BadParam => Err(corrupt("invalid deflate data")),
            #[allow(unreachable_patterns)]
            _ => Ok(()),
        }
    }

    /// The gzip trailer: CRC-32 and ISIZE (the member size mod 2^32).
    fn trailer(&mut self, c: &Chunk) -> Result<(), ChunkError> {
        let off = self.in_off;
        let mut t = [0u8; 8];
        c.src
            .read_exact_at(&mut t, off)
            .map_err(|_| ChunkError::Truncated {
                chunk: c.name.clone(),
                offset: off,
                out: self.out_off,
            })?;
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        let bad = |what| ChunkError::Checksum {
            chunk: c.name.clone(),
            what,
            offset: off,
        };
        if crc != self.crc.clone().finalize() {
            return Err(bad("CRC-32"));
        }
        // Truncation to 32 bits is the format: ISIZE is the size mod 2^32.
        if isize != self.member_out as u32 {
            return Err(bad("ISIZE"));
        }
        self.in_off += 8;
        Ok(())
    }
}

/// One chunk file and its index.
struct Chunk {
    name: String,
    codec: Codec,
    src: Arc<dyn ReadAt>,
    state: Mutex<ChunkState>,
}

struct ChunkState {
    /// `points[k]` starts span `k`; `points[0]` is the chunk start.
    points: Vec<Arc<Inflater>>,
    /// The furthest position reached; `None` once the chunk is done.
    frontier: Option<Box<Inflater>>,
    /// Uncompressed size, once known.
    size: Option<u64>,
    /// Output of the frontier's current span, when complete from its start.
    pending: Vec<u8>,
    pending_ok: bool,
    failed: Option<String>,
}

impl Chunk {
    fn io(&self, offset: u64, source: io::Error) -> ChunkError {
        ChunkError::Io {
            chunk: self.name.clone(),
            offset,
            source,
        }
    }

    /// Whether everything from `off` to the end is zero bytes.
    fn zeros_from(&self, mut off: u64) -> Result<bool, ChunkError> {
        let mut buf = vec![0u8; IN_PIECE];
        while off < self.src.size() {
            let n = self
                .src
                .read_at(&mut buf, off)
                .map_err(|e| self.io(off, e))?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
            off += n as u64;
        }
        Ok(true)
    }

    /// Offset of the first NUL at or after `off`.
    fn find_nul(&self, mut off: u64) -> Option<u64> {
        let mut buf = [0u8; 512];
        loop {
            let n = self.src.read_at(&mut buf, off).ok()?;
            if n == 0 {
                return None;
            }
            if let Some(i) = buf[..n].iter().position(|&b| b == 0) {
                return Some(off + i as u64);
            }
            off += n as u64;
        }
    }

    fn lock(&self) -> MutexGuard<'_, ChunkState> {
        // A panic while holding the lock cannot leave the index half-updated
        // in a way that matters more than the panic itself; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn failed(&self, why: &str) -> ChunkError {
        ChunkError::Failed {
            chunk: self.name.clone(),
            why: why.to_string(),
        }
    }
}

/// A decompressed span: its start offset in the chunk and its bytes.
type Span = (u64, Arc<Vec<u8>>);

struct Cache {
    cap: usize,
    tick: u64,
    items: Vec<(usize, usize, u64, Arc<Vec<u8>>)>,
}

impl Cache {
    fn get(&mut self, ci: usize, k: usize) -> Option<Arc<Vec<u8>>> {
        self.tick += 1;
        let t = self.tick;
        self.items
            .iter_mut()
            .find(|i| i.0 == ci && i.1 == k)
            .map(|i| {
                i.2 = t;
                i.3.clone()
            })
    }

    fn put(&mut self, ci: usize, k: usize, data: Arc<Vec<u8>>) {
        self.tick += 1;
        if let Some(i) = self.items.iter_mut().find(|i| i.0 == ci && i.1 == k) {
            i.2 = self.tick;
            return;
        }
        if self.items.len() >= self.cap {
            if let Some(oldest) = (0..self.items.len()).min_by_key(|&i| self.items[i].2) {
                self.items.swap_remove(oldest);
            }
        }
        if self.cap > 0 {
            self.items.push((ci, k, self.tick, data));
        }
    }
}

/// A disk stream made of numbered compressed chunks, as one [`ReadAt`].
///
/// ```no_run
/// use kiln::disk::chunks::{ChunkedStream, ChunkOptions};
/// use kiln::disk::ReadAt;
///
/// let stream = ChunkedStream::from_dir("ddk/xvda".as_ref(), ChunkOptions::default())?;
/// let mut sector = [0u8; 512];
/// stream.read_exact_at(&mut sector, 0)?;
/// println!("{}", stream.describe());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ChunkedStream {
    chunks: Vec<Chunk>,
    opts: ChunkOptions,
    size: u64,
    /// Stream end offsets of the leading run of fully indexed chunks.
    ends: Mutex<Vec<u64>>,
    cache: Mutex<Cache>,
}

impl fmt::Debug for ChunkedStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkedStream")
            .field("chunks", &self.chunks.len())
            .field("size", &self.size)
            .finish()
    }
}

impl ChunkedStream {
    /// Builds the stream from named chunk sources. Names that are not
    /// `chunk-N[.gz|.zz]` are ignored; numbers must run 0, 1, 2, ... with
    /// no gap or duplicate.
    pub fn new(
        files: Vec<(String, Arc<dyn ReadAt>)>,
        opts: ChunkOptions,
    ) -> Result<ChunkedStream, ChunkError> {
        let mut numbered: BTreeMap<u64, (String, Codec, Arc<dyn ReadAt>)> = BTreeMap::new();
        for (name, src) in files {
            let Some((n, codec)) = parse_chunk_name(&name)? else {
                continue;
            };
            if let Some((first, _, _)) = numbered.get(&n) {
                let (first, second) = if first.as_str() <= name.as_str() {
                    (first.clone(), name)
                } else {
                    (name, first.clone())
                };
                return Err(ChunkError::Duplicate {
                    number: n,
                    first,
                    second,
                });
            }
            numbered.insert(n, (name, codec, src));
        }
        if numbered.is_empty() {
            return Err(ChunkError::NoChunks("the given files".into()));
        }
        let mut chunks = Vec::with_capacity(numbered.len());
        for (expect, (n, (name, codec, src))) in (0u64..).zip(numbered) {
            if n != expect {
                return Err(ChunkError::Gap {
                    number: expect,
                    next: name,
                });
            }
            let raw_size = (codec == Codec::Raw).then(|| src.size());
            chunks.push(Chunk {
                name,
                codec,
                state: Mutex::new(ChunkState {
                    points: vec![Arc::new(Inflater::new(codec))],
                    frontier: raw_size.is_none().then(|| Box::new(Inflater::new(codec))),
                    size: raw_size,
                    pending: Vec::new(),
                    pending_ok: true,
                    failed: None,
                }),
                src,
            });
        }
        let opts = ChunkOptions {
            span: opts.span.clamp(WINDOW as u64, 1 << 30),
            threads: opts.threads.max(1),
            ..opts
        };
        let mut s = ChunkedStream {
            chunks,
            size: opts.expected_size.unwrap_or(0),
            cache: Mutex::new(Cache {
                cap: opts.cache_spans,
                tick: 0,
                items: Vec::new(),
            }),
            opts,
            ends: Mutex::new(Vec::new()),
        };
        if s.opts.expected_size.is_none() {
            // No descriptor: the size can only come from a full pass.
            s.size = s.index_all()?;
        }
        Ok(s)
    }

    /// The chunks in a host directory. `ova.xml` in that directory or its
    /// parent, when present, gives the expected size (the `<vdi>` whose
    /// `source` is `file://DIRNAME`, or the only `<vdi>`).
    pub fn from_dir(dir: &Path, opts: ChunkOptions) -> Result<ChunkedStream, ChunkError> {
        let derr = |path: &Path, source| ChunkError::Dir {
            path: path.to_path_buf(),
            source,
        };
        let mut files: Vec<(String, Arc<dyn ReadAt>)> = Vec::new();
        for ent in fs::read_dir(dir).map_err(|e| derr(dir, e))? {
            let ent = ent.map_err(|e| derr(dir, e))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if parse_chunk_name(&name)?.is_none() {
                continue;
            }
            let p = ent.path();
            let src = FileSource::open(&p).map_err(|e| derr(&p, e))?;
            files.push((name, Arc::new(src)));
        }
        if files.is_empty() {
            return Err(ChunkError::NoChunks(dir.display().to_string()));
        }
        let dirname = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        let mut opts = opts;
        if opts.expected_size.is_none() {
            for cand in [
                Some(dir.join("ova.xml")),
                dir.parent().map(|p| p.join("ova.xml")),
            ]
            .into_iter()
            .flatten()
            {
                if let Ok(src) = FileSource::open(&cand) {
                    opts.expected_size = ova_size(&src, &dirname)?;
                    break;
                }
            }
        }
        ChunkedStream::new(files, opts)
    }

    /// The chunks in directory `dir` of an ISO (e.g. `ddk/xvda`), with
    /// `ova.xml` looked up in it or its parent as in [`Self::from_dir`].
    pub fn from_iso(
        iso: &Iso,
        dir: &IsoNode,
        opts: ChunkOptions,
    ) -> Result<ChunkedStream, ChunkError> {
        let mut files: Vec<(String, Arc<dyn ReadAt>)> = Vec::new();
        for n in iso.read_dir(dir)? {
            if n.is_file() && parse_chunk_name(&n.name)?.is_some() {
                files.push((n.name.clone(), iso.open_file(&n)?));
            }
        }
        if files.is_empty() {
            return Err(ChunkError::NoChunks(format!("ISO directory /{}", dir.path)));
        }
        let mut opts = opts;
        if opts.expected_size.is_none() {
            let parent = dir.path.rsplit_once('/').map_or("", |(p, _)| p);
            for cand in [format!("{}/ova.xml", dir.path), format!("{parent}/ova.xml")] {
                if let Some(n) = iso.lookup(&cand)? {
                    if n.is_file() {
                        let src = iso.open_file(&n)?;
                        let dirname = dir.path.rsplit('/').next().unwrap_or("");
                        opts.expected_size = ova_size(&*src, dirname)?;
                        break;
                    }
                }
            }
        }
        ChunkedStream::new(files, opts)
    }

    /// `chunks: 160 gzip chunks, 1.2 GiB stream`.
    pub fn describe(&self) -> String {
        let codec = match self.chunks.first().map(|c| c.codec) {
            Some(Codec::Gzip) => "gzip",
            Some(Codec::Zlib) => "zlib",
            _ => "raw",
        };
        format!(
            "chunks: {} {codec} chunks, {} stream",
            self.chunks.len(),
            crate::progress::human_bytes(self.size)
        )
    }

    /// Number of chunk files.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    /// Indexes every chunk (in parallel), checking every CRC and the total
    /// size; returns the total size.
    pub fn index_all(&self) -> Result<u64, ChunkError> {
        self.index_range(0, self.chunks.len())?;
        self.update_ends()?;
        let ends = self.ends_lock();
        Ok(ends.last().copied().unwrap_or(0))
    }

    fn ends_lock(&self) -> MutexGuard<'_, Vec<u64>> {
        self.ends.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bound(&self) -> u64 {
        self.opts.expected_size.unwrap_or(self.opts.limit)
    }

    /// Indexes chunks `from..to` completely, on up to `threads` threads.
    fn index_range(&self, from: usize, to: usize) -> Result<(), ChunkError> {
        let next = AtomicUsize::new(from);
        let errors: Mutex<Vec<(usize, ChunkError)>> = Mutex::new(Vec::new());
        let threads = self.opts.threads.min(to.saturating_sub(from)).max(1);
        let work = || loop {
            let ci = next.fetch_add(1, Ordering::Relaxed);
            if ci >= to {
                break;
            }
            if let Err(e) = self.advance(ci, u64::MAX, false) {
                errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((ci, e));
                next.store(to, Ordering::Relaxed);
            }
        };
        if threads == 1 {
            work();
        } else {
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(work);
                }
            });
        }
        let mut errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
        errors.sort_by_key(|e| e.0);
        match errors.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Advances chunk `ci`'s first pass until a seek point lies beyond
    /// `until` (or the chunk ends). With `cache`, the spans produced go to
    /// the cache.
    fn advance(&self, ci: usize, until: u64, cache: bool) -> Result<(), ChunkError> {
        let c = &self.chunks[ci];
        let mut st = c.lock();
        if let Some(why) = &st.failed {
            return Err(c.failed(why));
        }
        let r = self.advance_locked(ci, c, &mut st, until, cache);
        if let Err(e) = &r {
            st.failed = Some(e.to_string());
            st.frontier = None;
        }
        r
    }

    fn advance_locked(
        &self,
        ci: usize,
        c: &Chunk,
        st: &mut ChunkState,
        until: u64,
        cache: bool,
    ) -> Result<(), ChunkError> {
        let Some(mut f) = st.frontier.take() else {
            return Ok(());
        };
        if !cache {
            st.pending_ok = false;
            st.pending = Vec::new();
        }
        let span = self.opts.span;
        let bound = self.bound();
        let mut inb = InBuf::new();
        loop {
            let last = st.points.last().map_or(0, |p| p.out_off);
            if last > until {
                break;
            }
            let pending = &mut st.pending;
            let keep = cache && st.pending_ok;
            f.step(c, &mut inb, &mut |b: &[u8]| {
                if keep {
                    pending.extend_from_slice(b);
                }
            })?;
            if f.out_off > bound {
                return Err(ChunkError::TooBig {
                    chunk: c.name.clone(),
                    offset: f.out_off,
                    limit: bound,
                });
            }
            let done = f.phase == Phase::End;
            if done || f.out_off - last >= span {
                let k = st.points.len() - 1;
                if st.pending_ok && cache && st.pending.len() as u64 == f.out_off - last {
                    let data = Arc::new(std::mem::take(&mut st.pending));
                    self.cache_lock().put(ci, k, data);
                }
                st.pending = Vec::new();
                st.pending_ok = cache;
                if done {
                    st.size = Some(f.out_off);
                    return Ok(());
                }
                st.points.push(Arc::new((*f).clone()));
            }
        }
        st.frontier = Some(f);
        Ok(())
    }

    fn cache_lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Extends `ends` over the leading run of completed chunks; checks the
    /// bounds and, once all are done, the expected size.
    fn update_ends(&self) -> Result<(), ChunkError> {
        let mut ends = self.ends_lock();
        while ends.len() < self.chunks.len() {
            let ci = ends.len();
            let c = &self.chunks[ci];
            let size = {
                let st = c.lock();
                if let Some(why) = &st.failed {
                    return Err(c.failed(why));
                }
                match st.size {
                    Some(s) => s,
                    None => break,
                }
            };
            let start = ends.last().copied().unwrap_or(0);
            let end = start.saturating_add(size);
            if end > self.bound() {
                return Err(match self.opts.expected_size {
                    Some(expected) => ChunkError::SizeMismatch {
                        expected,
                        actual: end,
                    },
                    None => ChunkError::TooBig {
                        chunk: c.name.clone(),
                        offset: self.bound() - start,
                        limit: self.bound(),
                    },
                });
            }
            ends.push(end);
        }
        if ends.len() == self.chunks.len() {
            if let (Some(expected), Some(&actual)) = (self.opts.expected_size, ends.last()) {
                if expected != actual {
                    return Err(ChunkError::SizeMismatch { expected, actual });
                }
            }
        }
        Ok(())
    }

    /// The chunk holding stream offset `x`, and the offset within it.
    fn locate(&self, x: u64) -> Result<Option<(usize, u64)>, ChunkError> {
        loop {
            self.update_ends()?;
            let (ci, start) = {
                let ends = self.ends_lock();
                let i = ends.partition_point(|&e| e <= x);
                if i < ends.len() {
                    let start = if i == 0 { 0 } else { ends[i - 1] };
                    return Ok(Some((i, x - start)));
                }
                if ends.len() == self.chunks.len() {
                    return Ok(None);
                }
                (ends.len(), ends.last().copied().unwrap_or(0))
            };
            // Chunk `ci` is the first one not fully indexed.
            let reached = {
                let st = self.chunks[ci].lock();
                st.frontier.as_ref().map_or(0, |f| f.out_off)
            };
            let want = x - start;
            if want < reached {
                return Ok(Some((ci, want)));
            }
            if want - reached <= 2 * self.opts.span {
                // Near the frontier: a sequential read. Advance with caching.
                self.advance(ci, want, true)?;
                let st = self.chunks[ci].lock();
                if st.size.is_none() {
                    return Ok(Some((ci, want)));
                }
                continue;
            }
            // Far ahead: index this chunk and the next few in parallel.
            let to = (ci + self.opts.threads).min(self.chunks.len());
            self.index_range(ci, to)?;
        }
    }

    /// The decompressed span holding chunk offset `off`: (span start, data).
    fn span_at(&self, ci: usize, off: u64) -> Result<Option<Span>, ChunkError> {
        let c = &self.chunks[ci];
        let (k, start, end, point) = {
            let needs = {
                let st = c.lock();
                if let Some(why) = &st.failed {
                    return Err(c.failed(why));
                }
                st.size.is_none() && st.points.last().is_none_or(|p| p.out_off <= off)
            };
            if needs {
                self.advance(ci, off, true)?;
            }
            let st = c.lock();
            let k = st
                .points
                .partition_point(|p| p.out_off <= off)
                .saturating_sub(1);
            let start = st.points.get(k).map_or(0, |p| p.out_off);
            let end = match (st.points.get(k + 1), st.size) {
                (Some(p), _) => p.out_off,
                (None, Some(s)) => s,
                (None, None) => return Err(c.failed("index incomplete")),
            };
            if off >= end {
                return Ok(None);
            }
            let Some(point) = st.points.get(k).cloned() else {
                return Err(c.failed("no seek point"));
            };
            (k, start, end, point)
        };
        if let Some(d) = self.cache_lock().get(ci, k) {
            return Ok(Some((start, d)));
        }
        // Decompress one span from its seek point (outside the chunk lock,
        // so other spans of the chunk can be read meanwhile).
        let mut f = (*point).clone();
        let mut inb = InBuf::new();
        let want = usize::try_from(end - start).map_err(|_| c.failed("span too large"))?;
        let mut data = Vec::with_capacity(want);
        while f.out_off < end && f.phase != Phase::End {
            f.step(c, &mut inb, &mut |b: &[u8]| data.extend_from_slice(b))?;
        }
        data.truncate(want);
        if data.len() != want {
            return Err(ChunkError::Corrupt {
                chunk: c.name.clone(),
                offset: f.in_off,
                out: f.out_off,
                why: "the data changed since it was indexed".into(),
            });
        }
        let data = Arc::new(data);
        self.cache_lock().put(ci, k, data.clone());
        Ok(Some((start, data)))
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<usize, ChunkError> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let Some((ci, off)) = self.locate(offset)? else {
            // The chunks end before the promised size.
            let actual = self.ends_lock().last().copied().unwrap_or(0);
            return Err(ChunkError::SizeMismatch {
                expected: self.size,
                actual,
            });
        };
        let c = &self.chunks[ci];
        if c.codec == Codec::Raw {
            let n = buf
                .len()
                .min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
            return c.src.read_at(&mut buf[..n], off).map_err(|e| c.io(off, e));
        }
        let Some((start, data)) = self.span_at(ci, off)? else {
            return Err(c.failed("offset past the indexed end"));
        };
        let skip = usize::try_from(off - start).unwrap_or(usize::MAX);
        let avail = data.get(skip..).unwrap_or(&[]);
        let n = buf
            .len()
            .min(avail.len())
            .min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
        buf[..n].copy_from_slice(&avail[..n]);
        Ok(n)
    }
}

impl ReadAt for ChunkedStream {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        Ok(self.read_inner(buf, offset)?)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// The `<vdi size=...>` of an XVA version 1 ova.xml for chunk directory
/// `dirname`: the vdi whose `source` is `file://DIRNAME`, else the only one.
fn ova_size(src: &dyn ReadAt, dirname: &str) -> Result<Option<u64>, ChunkError> {
    let len = src.size();
    if len > OVA_MAX {
        return Err(ChunkError::Ova {
            offset: OVA_MAX,
            why: format!("{len} bytes is too large for a descriptor"),
        });
    }
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
    src.read_exact_at(&mut buf, 0)
        .map_err(|e| ChunkError::Ova {
            offset: 0,
            why: e.to_string(),
        })?;
    let text = String::from_utf8_lossy(&buf);
    let vdis =
        super::xva::ova_v1_vdis(&text).map_err(|(offset, why)| ChunkError::Ova { offset, why })?;
    let want = format!("file://{dirname}");
    let pick = vdis
        .iter()
        .find(|v| v.source.as_deref() == Some(want.as_str()))
        .or(if vdis.len() == 1 { vdis.first() } else { None });
    Ok(pick.and_then(|v| v.size))
}

/// Decodes `data` as one gzip chunk, then as one zlib chunk, reading all of
/// it and a few random spans; for fuzzing. Never panics.
#[doc(hidden)]
pub fn fuzz_input(data: &[u8]) {
    for name in ["chunk-0.gz", "chunk-0.zz"] {
        let src: Arc<dyn ReadAt> = Arc::new(data.to_vec());
        let opts = ChunkOptions {
            limit: 64 << 20,
            span: 64 << 10,
            threads: 1,
            ..ChunkOptions::default()
        };
        let Ok(s) = ChunkedStream::new(vec![(name.to_string(), src)], opts) else {
            continue;
        };
        let mut buf = vec![0u8; 100_000];
        let mut off = 0;
        while let Ok(n) = s.read_at(&mut buf, off) {
            if n == 0 {
                break;
            }
            off += n as u64;
        }
        for o in [0, s.size() / 3, s.size() / 2, s.size().saturating_sub(1)] {
            let _ = s.read_at(&mut buf[..4096], o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn zz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Compressible but not trivially so: a xorshift byte stream with runs.
    fn data(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let run = (x % 7) as usize + 1;
            for _ in 0..run {
                v.push((x >> 24) as u8 % 16);
            }
        }
        v.truncate(n);
        v
    }

    fn src(v: Vec<u8>) -> Arc<dyn ReadAt> {
        Arc::new(v)
    }

    fn opts() -> ChunkOptions {
        ChunkOptions {
            span: 64 << 10,
            cache_spans: 2,
            threads: 2,
            ..ChunkOptions::default()
        }
    }

    fn read_all(s: &ChunkedStream) -> Vec<u8> {
        let mut out = vec![0u8; usize::try_from(s.size()).unwrap()];
        let mut off = 0;
        while off < out.len() {
            let end = (off + 10_000).min(out.len());
            let n = s.read_at(&mut out[off..end], off as u64).unwrap();
            assert!(n > 0);
            off += n;
        }
        out
    }

    #[test]
    fn names() {
        assert_eq!(
            parse_chunk_name("chunk-000000010.gz").unwrap(),
            Some((10, Codec::Gzip))
        );
        assert_eq!(
            parse_chunk_name("chunk-9.zz").unwrap(),
            Some((9, Codec::Zlib))
        );
        assert_eq!(parse_chunk_name("chunk-0").unwrap(), Some((0, Codec::Raw)));
        assert_eq!(
            parse_chunk_name("chunk-000000000000000000003").unwrap(),
            Some((3, Codec::Raw))
        );
        assert_eq!(parse_chunk_name("ova.xml").unwrap(), None);
        assert_eq!(parse_chunk_name("chunk-1.txt").unwrap(), None);
        assert!(matches!(
            parse_chunk_name("chunk-99999999999999999999.gz"),
            Err(ChunkError::BadNumber(_))
        ));
    }

    #[test]
    fn multi_member_mixed_codecs_random_access() {
        let a = data(300_000, 1);
        let b = data(200_000, 2);
        let c = data(150_000, 3);
        let mut gz_two = gz(&a[..100_000]);
        gz_two.extend(gz(&a[100_000..]));
        let files = vec![
            ("chunk-2".to_string(), src(c.clone())),
            ("chunk-0.gz".to_string(), src(gz_two)),
            ("chunk-1.zz".to_string(), src(zz(&b))),
            ("README".to_string(), src(b"x".to_vec())),
        ];
        let s = ChunkedStream::new(files, opts()).unwrap();
        let whole: Vec<u8> = [a, b, c].concat();
        assert_eq!(s.size(), whole.len() as u64);
        assert_eq!(read_all(&s), whole);
        let mut x = 88172645463325252u64;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let off = (x % whole.len() as u64) as usize;
            let len = ((x >> 32) % 70_000) as usize;
            let mut buf = vec![0u8; len];
            let n = s.read_at(&mut buf, off as u64).unwrap();
            assert!(n > 0 || len == 0);
            assert_eq!(&buf[..n], &whole[off..off + n]);
        }
    }

    #[test]
    fn lazy_with_expected_size() {
        let a = data(500_000, 4);
        let b = data(500_000, 5);
        let whole = [a.clone(), b.clone()].concat();
        let mk = |expected| {
            ChunkedStream::new(
                vec![
                    ("chunk-0.gz".to_string(), src(gz(&a))),
                    ("chunk-1.gz".to_string(), src(gz(&b))),
                ],
                ChunkOptions {
                    expected_size: Some(expected),
                    ..opts()
                },
            )
            .unwrap()
        };
        // Read the end first (indexes chunk 0 on the way), then the start.
        let s = mk(1_000_000);
        let mut buf = vec![0u8; 1000];
        s.read_exact_at(&mut buf, 999_000).unwrap();
        assert_eq!(buf, whole[999_000..]);
        s.read_exact_at(&mut buf, 10).unwrap();
        assert_eq!(buf, whole[10..1010]);
        // Too small a promise: a bomb bound.
        let s = mk(900_000);
        let err = s.read_exact_at(&mut buf, 899_000).unwrap_err().to_string();
        assert!(
            err.contains("chunk-1.gz") || err.contains("900000"),
            "{err}"
        );
        // Too large a promise: mismatch at the end.
        let s = mk(1_100_000);
        let err = s
            .read_exact_at(&mut buf, 1_050_000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1100000") && err.contains("1000000"), "{err}");
    }

    #[test]
    fn gaps_duplicates_and_bad_data() {
        let g = gz(&data(1000, 6));
        let gap = ChunkedStream::new(
            vec![
                ("chunk-000000000.gz".into(), src(g.clone())),
                ("chunk-000000002.gz".into(), src(g.clone())),
            ],
            opts(),
        )
        .unwrap_err();
        assert!(
            matches!(&gap, ChunkError::Gap { number: 1, next } if next == "chunk-000000002.gz"),
            "{gap}"
        );
        let dup = ChunkedStream::new(
            vec![
                ("chunk-0.gz".into(), src(g.clone())),
                ("chunk-000.gz".into(), src(g.clone())),
            ],
            opts(),
        )
        .unwrap_err();
        assert!(
            matches!(dup, ChunkError::Duplicate { number: 0, .. }),
            "{dup}"
        );
        let missing0 =
            ChunkedStream::new(vec![("chunk-1.gz".into(), src(g.clone()))], opts()).unwrap_err();
        assert!(matches!(missing0, ChunkError::Gap { number: 0, .. }));

        let one =
            |bytes: Vec<u8>| ChunkedStream::new(vec![("chunk-0.gz".into(), src(bytes))], opts());
        let mut truncated = g.clone();
        truncated.truncate(g.len() - 20);
        let e = one(truncated).unwrap_err();
        assert!(
            matches!(e, ChunkError::Truncated { .. } | ChunkError::Corrupt { .. }),
            "{e}"
        );
        let mut badcrc = g.clone();
        let l = badcrc.len();
        badcrc[l - 8] ^= 1;
        assert!(matches!(
            one(badcrc).unwrap_err(),
            ChunkError::Checksum { what: "CRC-32", .. }
        ));
        let mut badsize = g.clone();
        badsize[l - 1] ^= 1;
        assert!(matches!(
            one(badsize).unwrap_err(),
            ChunkError::Checksum { what: "ISIZE", .. }
        ));
        let e = one(b"not gzip at all".to_vec()).unwrap_err();
        assert!(matches!(e, ChunkError::BadHeader { offset: 0, .. }), "{e}");
        let mut trailing = g.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(
            one(trailing).unwrap_err(),
            ChunkError::Trailing { .. }
        ));
        let mut padded = g.clone();
        padded.extend_from_slice(&[0u8; 4096]);
        assert_eq!(one(padded).unwrap().size(), 1000);
        assert!(matches!(
            one(Vec::new()).unwrap_err(),
            ChunkError::BadHeader { .. }
        ));
    }

    #[test]
    fn bomb_is_bounded() {
        let zeros = gz(&vec![0u8; 8 << 20]);
        let e = ChunkedStream::new(
            vec![("chunk-0.gz".into(), src(zeros))],
            ChunkOptions {
                limit: 1 << 20,
                ..opts()
            },
        )
        .unwrap_err();
        assert!(
            matches!(&e, ChunkError::TooBig { chunk, limit: 1048576, .. } if chunk == "chunk-0.gz"),
            "{e}"
        );
    }

    #[test]
    fn mutation_no_panic() {
        let a = data(200_000, 9);
        let seeds = [gz(&a), zz(&a)];
        let mut x = 0x9E3779B97F4A7C15u64;
        let start = std::time::Instant::now();
        for round in 0..2000 {
            let mut d = seeds[round % 2].clone();
            for _ in 0..1 + round % 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly the header and the first deflate block headers.
                let pos = if x.is_multiple_of(3) {
                    (x >> 8) as usize % d.len()
                } else {
                    (x >> 8) as usize % 64.min(d.len())
                };
                d[pos] ^= (x >> 40) as u8 | 1;
            }
            fuzz_input(&d);
        }
        assert!(start.elapsed().as_secs() < 120);
    }
}
