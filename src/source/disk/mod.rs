//! Userspace readers for vendor disk images: no loop device, no mount.
//!
//! Every layer of a disk-image chain (ISO 9660 ▸ chunked stream ▸ VHD/qcow2/
//! raw ▸ MBR/GPT ▸ ext2/3/4) reads from the layer below through [`ReadAt`],
//! a random-access byte source, and most offer themselves as one to the layer
//! above. Each reader has its own error type that names the reader and the
//! byte offset where the input went wrong.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

pub mod chain;
pub mod chunks;
pub mod ext;
pub mod iso9660;
pub mod part;
pub mod qcow2;
pub mod vhd;
pub mod xva;

/// A read-only, random-access byte source of known size.
///
/// ```
/// use kiln::disk::{ReadAt, Slice};
/// use std::sync::Arc;
///
/// let bytes: Arc<dyn ReadAt> = Arc::new(b"hello world".to_vec());
/// let world = Slice::new(bytes, 6, 5).unwrap();
/// let mut buf = [0u8; 5];
/// world.read_exact_at(&mut buf, 0).unwrap();
/// assert_eq!(&buf, b"world");
/// ```
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`. Returns 0 only at or past
    /// the end ([`ReadAt::size`]).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Total size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`, or fails with `UnexpectedEof` naming the
    /// offset when the source ends first.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("source ends at offset {offset}"),
                    ))
                }
                Ok(n) => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= self.len() {
            return Ok(0);
        }
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }

    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }

    fn size(&self) -> u64 {
        (**self).size()
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_at(buf, offset)
    }

    fn size(&self) -> u64 {
        (**self).size()
    }
}

/// A regular file as a [`ReadAt`] (positional reads, so it is shareable).
#[derive(Debug)]
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Opens `path` for reading.
    pub fn open(path: &Path) -> io::Result<FileSource> {
        let file = File::open(path)?;
        FileSource::new(file)
    }

    /// Wraps an open file; its size is taken now.
    pub fn new(file: File) -> io::Result<FileSource> {
        let size = file.metadata()?.len();
        Ok(FileSource { file, size })
    }
}

impl ReadAt for FileSource {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.size - offset).unwrap_or(usize::MAX));
        self.file.read_at(&mut buf[..n], offset)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

/// A window `[start, start + len)` of another source, e.g. a partition.
#[derive(Clone)]
pub struct Slice {
    inner: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl fmt::Debug for Slice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slice")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl Slice {
    /// The window, or `None` when it does not fit inside `inner`.
    pub fn new(inner: Arc<dyn ReadAt>, start: u64, len: u64) -> Option<Slice> {
        let end = start.checked_add(len)?;
        (end <= inner.size()).then_some(Slice { inner, start, len })
    }
}

impl ReadAt for Slice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.len - offset).unwrap_or(usize::MAX));
        self.inner.read_at(&mut buf[..n], self.start + offset)
    }

    fn size(&self) -> u64 {
        self.len
    }
}

/// A sequential [`io::Read`] over a [`ReadAt`], from `offset` to the end.
pub struct Cursor<R> {
    inner: R,
    offset: u64,
}

impl<R: ReadAt> Cursor<R> {
    /// Starts reading `inner` at `offset`.
    pub fn new(inner: R, offset: u64) -> Self {
        Cursor { inner, offset }
    }
}

impl<R: ReadAt> io::Read for Cursor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn slice_bounds_and_cursor() {
        let data: Arc<dyn ReadAt> = Arc::new((0u8..100).collect::<Vec<u8>>());
        assert!(Slice::new(data.clone(), 90, 11).is_none());
        assert!(Slice::new(data.clone(), u64::MAX, 2).is_none());
        let s = Slice::new(data, 10, 20).unwrap();
        let mut out = Vec::new();
        Cursor::new(&s, 15).read_to_end(&mut out).unwrap();
        assert_eq!(out, (25u8..30).collect::<Vec<u8>>());
        let mut buf = [0u8; 8];
        let err = s.read_exact_at(&mut buf, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
