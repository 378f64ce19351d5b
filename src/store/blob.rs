//! Content-addressed blobs: atomic writes, verified reads.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::image::Digest;
use tempfile::NamedTempFile;

use super::{Store, StoreError};
use crate::digest::{HashReader, HashWriter};

/// Writes one blob into the store: a temp file inside the store, hashed while
/// written, fsynced, then renamed to `blobs/sha256/<hex>`.
///
/// Dropping a `BlobWriter` without [`BlobWriter::commit`] removes the temp
/// file, so a failed write never leaves a partial blob behind. Committing a
/// blob that already exists is a no-op apart from the rename (idempotent).
pub struct BlobWriter {
    out: HashWriter<BufWriter<NamedTempFile>>,
    blobs_dir: PathBuf,
    tmp_path: PathBuf,
}

impl BlobWriter {
    pub(crate) fn new(store: &Store) -> Result<Self, StoreError> {
        let tmp_dir = store.tmp_dir();
        let tmp = NamedTempFile::with_prefix_in("blob-", &tmp_dir)
            .map_err(|e| StoreError::io("create temp blob", &tmp_dir, e))?;
        Ok(BlobWriter {
            tmp_path: tmp.path().to_path_buf(),
            out: HashWriter::new(BufWriter::with_capacity(1 << 20, tmp)),
            blobs_dir: store.blobs_dir(),
        })
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.out.count()
    }

    /// Finishes the blob and moves it into place; returns its digest and size.
    pub fn commit(self) -> Result<(Digest, u64), StoreError> {
        self.commit_inner(None)
    }

    /// Like [`commit`](Self::commit) but fails (and writes nothing) when the
    /// content does not hash to `expected`.
    pub fn commit_expect(self, expected: &Digest) -> Result<(Digest, u64), StoreError> {
        self.commit_inner(Some(expected))
    }

    fn commit_inner(self, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let (buf, digest, size) = self.out.finish();
        let tmp = buf
            .into_inner()
            .map_err(|e| StoreError::io("flush temp blob", &self.tmp_path, e.into_error()))?;
        if let Some(exp) = expected {
            if exp != &digest {
                return Err(StoreError::DigestMismatch {
                    what: "blob being written".into(),
                    expected: exp.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let tmp_path = tmp.path().to_path_buf();
        tmp.as_file()
            .sync_all()
            .map_err(|e| StoreError::io("fsync blob", &tmp_path, e))?;
        let dst = self.blobs_dir.join(digest.digest());
        // 0644 like skopeo and umoci: they rewrite an existing blob in place
        // when they copy into the same layout, and must be allowed to.
        let perm = <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
        fs::set_permissions(&tmp_path, perm)
            .map_err(|e| StoreError::io("chmod blob", &tmp_path, e))?;
        tmp.persist(&dst)
            .map_err(|e| StoreError::io("rename blob into place", &dst, e.error))?;
        sync_dir(&self.blobs_dir)?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// fsyncs a directory so a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// A blob reader that checks size and digest when it reaches the end.
///
/// A mismatch surfaces as an [`io::ErrorKind::InvalidData`] error from the
/// final `read`, so a corrupt blob can never be consumed silently.
pub struct VerifiedReader<R> {
    inner: Option<HashReader<R>>,
    expected: Digest,
    expected_size: Option<u64>,
    path: PathBuf,
}

impl<R: Read> VerifiedReader<R> {
    pub(crate) fn new(
        inner: R,
        expected: Digest,
        expected_size: Option<u64>,
        path: PathBuf,
    ) -> Self {
        VerifiedReader {
            inner: Some(HashReader::new(inner)),
            expected,
            expected_size,
            path,
        }
    }
}

impl<R: Read> Read for VerifiedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        let n = inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let Some(done) = self.inner.take() else {
                return Ok(0);
            };
            let (digest, size) = done.finish();
            if digest != self.expected || self.expected_size.is_some_and(|s| s != size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "blob {} is corrupt: content hashes to {} ({} bytes)",
                        self.path.display(),
                        digest,
                        size
                    ),
                ));
            }
        }
        Ok(n)
    }
}
