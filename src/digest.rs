//! SHA-256 digests and hashing readers/writers.
//!
//! `sha2` picks the CPU's SHA extensions (SHA-NI) at run time when present.

use std::io::{self, Read, Write};

use oci_spec::image::{Digest, Sha256Digest};
use sha2::{Digest as _, Sha256};

/// Builds an OCI [`Digest`] from a finished SHA-256 hasher.
pub fn finish(hasher: Sha256) -> Digest {
    from_hex(&hex::encode(hasher.finalize()))
}

/// Builds an OCI [`Digest`] from 64 lower-case hex characters produced by us.
pub(crate) fn from_hex(hex: &str) -> Digest {
    match hex.parse::<Sha256Digest>() {
        Ok(d) => d.into(),
        // We only ever pass the output of hex::encode of a 32-byte hash.
        Err(e) => unreachable!("internal: bad sha256 hex {hex}: {e}"),
    }
}

/// SHA-256 of a byte slice, as an OCI digest.
///
/// ```
/// let d = kiln::digest::of_bytes(b"");
/// assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
/// ```
pub fn of_bytes(data: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(data);
    finish(h)
}

/// SHA-256 of everything `r` yields, and its length.
pub fn of_reader(mut r: impl Read) -> io::Result<(Digest, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok((finish(h), n)),
            Ok(k) => {
                h.update(&buf[..k]);
                n += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A writer that hashes and counts every byte it passes on.
pub struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashWriter {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Returns the inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, finish(self.hasher), self.count)
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes and counts every byte read through it.
pub struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    /// Returns the digest and count of everything read so far.
    pub fn finish(self) -> (Digest, u64) {
        (finish(self.hasher), self.count)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}
