//! Compression sniffing and decoding of input streams, tar header checks,
//! and the guard that stops decompression bombs.

use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A stream compression format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// gzip (also several concatenated members).
    Gzip,
    /// zstd (also several frames).
    Zstd,
    /// xz.
    Xz,
    /// bzip2.
    Bzip2,
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Codec::Gzip => "gzip",
            Codec::Zstd => "zstd",
            Codec::Xz => "xz",
            Codec::Bzip2 => "bzip2",
        })
    }
}

/// Recognizes a compression format from the first bytes of a stream.
///
/// ```
/// use kiln::source::{sniff_codec, Codec};
/// assert_eq!(sniff_codec(&[0x1f, 0x8b, 8, 0]), Some(Codec::Gzip));
/// assert_eq!(sniff_codec(b"ustar"), None);
/// ```
pub fn sniff_codec(head: &[u8]) -> Option<Codec> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Codec::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Codec::Zstd)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Codec::Xz)
    } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
        Some(Codec::Bzip2)
    } else {
        None
    }
}

/// Names formats kiln recognizes but cannot import (yet), for a clear error.
pub fn sniff_unsupported(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"QFI\xfb") {
        Some("a qcow2 disk image")
    } else if head.starts_with(b"conectix") {
        Some("a VHD disk image")
    } else if head.len() > 0x8006 && &head[0x8001..0x8006] == b"CD001" {
        Some("an ISO 9660 image")
    } else if head.starts_with(b"PK\x03\x04") {
        Some("a zip archive")
    } else if head.starts_with(b"7z\xbc\xaf") {
        Some("a 7z archive")
    } else if head.len() >= 1082 && head[1080..1082] == [0x53, 0xef] {
        Some("an ext2/3/4 file system image")
    } else if head.len() >= 512 && head[510..512] == [0x55, 0xaa] && !tar_header_ok(head) {
        Some("a disk image with a partition table")
    } else {
        None
    }
}

/// Whether the first 512 bytes are a tar header with a valid checksum.
pub fn tar_header_ok(head: &[u8]) -> bool {
    if head.len() < 512 {
        return false;
    }
    let h = &head[..512];
    h.iter().any(|b| *b != 0) && tar_checksum_ok(h)
}

/// Whether a 512-byte tar header's checksum field matches its bytes (the
/// field itself counted as spaces).
pub(crate) fn tar_checksum_ok(h: &[u8]) -> bool {
    let sum: u64 = h
        .iter()
        .take(512)
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u64::from(b)
            }
        })
        .sum();
    h.len() >= 512 && tar_number(&h[148..156]) == Some(sum)
}

/// A tar header's number field: octal digits after optional spaces, ended
/// by NUL, space or the field's end (empty is 0), or GNU base-256 (first
/// byte's high bit set) for sizes of 8 GiB and more. `None` for garbage.
///
/// The one parser of tar numbers for kiln's own header reading (archive
/// indexes, XVA members, sniffing); entries themselves go through the
/// `tar` crate.
pub(crate) fn tar_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let start = field.iter().take_while(|&&b| b == b' ').count();
    let digits = field[start..]
        .iter()
        .take_while(|b| (b'0'..=b'7').contains(*b))
        .count();
    let (num, rest) = field[start..].split_at(digits);
    if !rest.iter().all(|&b| b == 0 || b == b' ') {
        return None;
    }
    num.iter().try_fold(0u64, |v, &d| {
        v.checked_mul(8)?.checked_add(u64::from(d - b'0'))
    })
}

/// Wraps `r` in the decoder for `codec` (multi-member/multi-frame aware).
pub fn decoder<'a>(
    codec: Option<Codec>,
    r: impl Read + Send + 'a,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match codec {
        None => Box::new(r),
        Some(Codec::Gzip) => Box::new(flate2::read::MultiGzDecoder::new(
            io::BufReader::with_capacity(1 << 16, r),
        )),
        Some(Codec::Zstd) => Box::new(zstd::stream::read::Decoder::new(r)?),
        Some(Codec::Xz) => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        Some(Codec::Bzip2) => Box::new(bzip2::read::MultiBzDecoder::new(r)),
    })
}

/// Reads the first `n` bytes (or fewer at EOF) and returns them with a reader
/// that yields the whole stream again.
pub fn peek<'a, R: Read + Send + 'a>(
    mut r: R,
    n: usize,
) -> io::Result<(Vec<u8>, Box<dyn Read + Send + 'a>)> {
    let mut head = Vec::with_capacity(n);
    (&mut r).take(n as u64).read_to_end(&mut head)?;
    let again = io::Cursor::new(head.clone()).chain(r);
    Ok((head, Box::new(again)))
}

/// Counts bytes read through it into a shared counter (for progress and for
/// the decompression-bomb check).
pub struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> CountingReader<R> {
    /// Wraps `inner`; the count is readable through `count` from anywhere.
    pub fn new(inner: R, count: Arc<AtomicU64>) -> Self {
        CountingReader { inner, count }
    }
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Limits against decompression bombs.
#[derive(Debug, Clone, Copy)]
pub struct ExpansionLimits {
    /// Largest decompressed stream accepted. Default 256 GiB.
    pub max_bytes: u64,
    /// Largest decompressed/compressed ratio accepted once more than
    /// `ratio_after` bytes came out. Default 500 (real root file systems
    /// compress 3-10x; a gzip bomb of zeros is about 1000x).
    pub max_ratio: u64,
    /// Output size below which the ratio is not checked. Default 64 MiB.
    pub ratio_after: u64,
}

impl Default for ExpansionLimits {
    fn default() -> Self {
        ExpansionLimits {
            max_bytes: 256 << 30,
            max_ratio: 500,
            ratio_after: 64 << 20,
        }
    }
}

/// Which expansion limit an input broke: the payload of the `io::Error` a
/// tripped [`BombGuard`] returns, and the detail of
/// [`LayerError::Bomb`](super::LayerError::Bomb).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Expansion {
    /// The decompressed stream grew past [`ExpansionLimits::max_bytes`].
    #[error(
        "decompression bomb or oversized input: the stream exceeds the limit of {limit} bytes"
    )]
    Size {
        /// The limit in bytes.
        limit: u64,
    },
    /// The stream expanded more than [`ExpansionLimits::max_ratio`] times.
    #[error("decompression bomb: about {compressed} compressed bytes expanded to {expanded} bytes, more than {max_ratio}:1")]
    Ratio {
        /// Compressed bytes read so far.
        compressed: u64,
        /// Bytes they expanded to.
        expanded: u64,
        /// The ratio limit.
        max_ratio: u64,
    },
    /// The layer being written would grow past the size limit.
    #[error("decompression bomb or oversized input: the layer would exceed {limit} bytes at entry {entry:?}")]
    Layer {
        /// The limit in bytes.
        limit: u64,
        /// The entry that would cross it.
        entry: String,
    },
}

impl Expansion {
    /// The [`Expansion`] inside an I/O error, however deeply readers
    /// wrapped it (an `io::Error` payload, or an error's source chain).
    pub fn of(e: &io::Error) -> Option<&Expansion> {
        let mut cur: &(dyn std::error::Error + 'static) = e.get_ref()?;
        loop {
            if let Some(x) = cur.downcast_ref::<Expansion>() {
                return Some(x);
            }
            if let Some(inner) = cur.downcast_ref::<io::Error>() {
                if let Some(r) = inner.get_ref() {
                    cur = r;
                    continue;
                }
            }
            cur = cur.source()?;
        }
    }
}

/// Stops a decompressed stream that expands beyond [`ExpansionLimits`].
pub struct BombGuard<R> {
    inner: R,
    compressed: Option<Arc<AtomicU64>>,
    out: u64,
    limits: ExpansionLimits,
}

impl<R: Read> BombGuard<R> {
    /// `compressed` counts the bytes consumed from the compressed input;
    /// `None` for an uncompressed input (only `max_bytes` applies).
    pub fn new(inner: R, compressed: Option<Arc<AtomicU64>>, limits: ExpansionLimits) -> Self {
        BombGuard {
            inner,
            compressed,
            out: 0,
            limits,
        }
    }
}

impl<R: Read> Read for BombGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        if self.out > self.limits.max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                Expansion::Size {
                    limit: self.limits.max_bytes,
                },
            ));
        }
        // Without a compressed counter (plain input) only the size limit applies.
        if let Some(c) = &self.compressed {
            let c = c.load(Ordering::Relaxed).max(1);
            if self.out > self.limits.ratio_after && self.out / c > self.limits.max_ratio {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    Expansion::Ratio {
                        compressed: c,
                        expanded: self.out,
                        max_ratio: self.limits.max_ratio,
                    },
                ));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bomb_guard_trips_on_ratio_and_size() {
        let zeros = vec![0u8; 1 << 20];
        let counter = Arc::new(AtomicU64::new(10));
        let lim = ExpansionLimits {
            max_bytes: u64::MAX,
            max_ratio: 100,
            ratio_after: 4096,
        };
        let mut g = BombGuard::new(&zeros[..], Some(Arc::clone(&counter)), lim);
        let err = io::copy(&mut g, &mut io::sink()).unwrap_err();
        assert!(
            matches!(
                Expansion::of(&err),
                Some(Expansion::Ratio { max_ratio: 100, .. })
            ),
            "{err}"
        );
        // Found through a wrapping error too (readers wrap what they read).
        let wrapped = io::Error::other(err);
        assert!(Expansion::of(&wrapped).is_some());
        assert!(Expansion::of(&io::Error::other("decompression bomb")).is_none());
        let lim = ExpansionLimits {
            max_bytes: 1000,
            max_ratio: u64::MAX,
            ratio_after: 0,
        };
        let mut g = BombGuard::new(&zeros[..], Some(Arc::new(AtomicU64::new(1 << 30))), lim);
        assert!(io::copy(&mut g, &mut io::sink()).is_err());
        let mut ok = BombGuard::new(
            &zeros[..],
            Some(Arc::new(AtomicU64::new(1 << 19))),
            ExpansionLimits::default(),
        );
        assert_eq!(io::copy(&mut ok, &mut io::sink()).unwrap(), 1 << 20);
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff_codec(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Some(Codec::Zstd));
        assert_eq!(sniff_codec(b"BZh9"), Some(Codec::Bzip2));
        assert_eq!(
            sniff_codec(&[0xfd, b'7', b'z', b'X', b'Z', 0]),
            Some(Codec::Xz)
        );
        assert_eq!(
            sniff_unsupported(b"QFI\xfb\0\0\0\x03"),
            Some("a qcow2 disk image")
        );
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(b"file");
        assert!(!tar_header_ok(&h));
        assert_eq!(tar_number(b"0000644\0"), Some(0o644));
        assert_eq!(tar_number(b"  1750 \0"), Some(0o1750));
        assert_eq!(tar_number(b"\0\0\0\0"), Some(0));
        assert_eq!(tar_number(b"12x4\0"), None);
        assert_eq!(
            tar_number(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]),
            Some(2 << 32)
        );
        assert_eq!(tar_number(&[0xff; 12]), None, "base-256 past u64");
    }
}
