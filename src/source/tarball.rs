//! Tar streams (already decompressed) to [`Entry`] values.

use std::io::{self, Read};

use crate::layer::sparse::PaxSparse;
use crate::layer::{Entry, EntryKind, LayerError};

/// Records the first read error of a data stream, so a failed copy can be
/// blamed on the input (corrupt archive) rather than the output.
pub(crate) struct ErrTap<'a, R: ?Sized> {
    pub(crate) inner: &'a mut R,
    pub(crate) err: Option<String>,
    /// The expansion limit that first read broke, if that was the error.
    pub(crate) bomb: Option<crate::layer::codec::Expansion>,
}

impl<R: Read + ?Sized> Read for ErrTap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|e| {
            if self.err.is_none() {
                self.err = Some(e.to_string());
                self.bomb = crate::layer::codec::Expansion::of(e).cloned();
            }
        })
    }
}

/// Where an entry came from, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct EntryPos {
    /// Offset of the entry's header in the (decompressed) tar stream.
    pub offset: u64,
    /// The archive stored the path as absolute (it was made relative).
    pub absolute: bool,
}

/// Callback receiving each entry and its content.
pub type EntryFn<'a> = dyn FnMut(Entry, &mut dyn Read, EntryPos) -> Result<(), LayerError> + 'a;

/// Reads every entry of the tar stream `r`, in archive order.
///
/// `name` names the input in errors. Global PAX headers and GNU volume
/// labels are skipped. PAX sparse files (GNU formats 0.0, 0.1 and 1.0) come
/// out under their real path and size with their data map in
/// [`Entry::sparse`] (the reader yields only the stored data); old GNU
/// sparse files (type `S`) come out dense, their holes as zeros.
pub fn walk(r: impl Read, name: &str, f: &mut EntryFn<'_>) -> Result<(), LayerError> {
    let mut ar = tar::Archive::new(r);
    let entries = ar.entries().map_err(|e| corrupt(name, "read tar", 0, &e))?;
    let mut next_offset = 0u64;
    for item in entries {
        let mut te = item.map_err(|e| corrupt(name, "read tar header", next_offset, &e))?;
        let offset = te.raw_header_position();
        next_offset =
            te.raw_file_position() + te.header().entry_size().unwrap_or(0).div_ceil(512) * 512;
        let Some((mut e, absolute, sparse)) = to_entry(&mut te, name, offset)? else {
            continue;
        };
        if let Some(sp) = sparse {
            let bad = |reason: String| LayerError::Corrupt {
                step: "read sparse file map",
                path: name.to_string(),
                offset,
                reason: format!("{:?}: {reason}", e.path),
            };
            let stored = te.size();
            let map = match sp.map {
                // 1.0: the map starts the data; the segments' bytes follow.
                None => {
                    crate::layer::sparse::read_map(&mut te, sp.size, stored)
                        .map_err(bad)?
                        .0
                }
                Some(map) => {
                    let want = crate::layer::sparse::data_len(&map);
                    if want != stored {
                        return Err(bad(format!(
                            "the sparse map lists {want} bytes of data but the entry holds {stored}"
                        )));
                    }
                    map
                }
            };
            e.sparse = Some(map);
        }
        let mut tap = ErrTap {
            inner: &mut te,
            err: None,
            bomb: None,
        };
        f(e, &mut tap, EntryPos { offset, absolute })?;
    }
    Ok(())
}

fn corrupt(name: &str, step: &'static str, offset: u64, e: &io::Error) -> LayerError {
    LayerError::from_read(name, step, offset, e)
}

/// The `GNU.sparse.*` PAX records of a tar entry, read and checked: `None`
/// when it is not a PAX sparse file.
pub(crate) fn pax_sparse<R: Read>(te: &mut tar::Entry<'_, R>) -> Result<Option<PaxSparse>, String> {
    let Some(pax) = te
        .pax_extensions()
        .map_err(|x| format!("pax header: {x}"))?
    else {
        return Ok(None);
    };
    let mut records: Vec<(String, Vec<u8>)> = Vec::new();
    for x in pax {
        let x = x.map_err(|x| format!("pax record: {x}"))?;
        if let Ok(k) = x.key() {
            if k.starts_with("GNU.sparse.") {
                records.push((k.to_string(), x.value_bytes().to_vec()));
            }
        }
    }
    crate::layer::sparse::from_pax(records.iter().map(|(k, v)| (k.as_str(), &v[..])))
}

/// The entry, whether its path was absolute, and what its PAX records say
/// about it being sparse.
type Parsed = (Entry, bool, Option<PaxSparse>);

fn to_entry<R: Read>(
    te: &mut tar::Entry<'_, R>,
    name: &str,
    offset: u64,
) -> Result<Option<Parsed>, LayerError> {
    use tar::EntryType as T;
    // A PAX sparse file: its real path and size are in GNU.sparse.* records.
    let sparse = pax_sparse(te).map_err(|reason| LayerError::Corrupt {
        step: "read sparse file header",
        path: name.to_string(),
        offset,
        reason: format!("{:?}: {reason}", String::from_utf8_lossy(&te.path_bytes())),
    })?;
    if sparse.is_some()
        && te.header().entry_type() != T::Regular
        && te.header().entry_type() != T::Continuous
    {
        return Err(corrupt(
            name,
            "read sparse file header",
            offset,
            &io::Error::other(format!(
                "{:?}: GNU.sparse records on an entry of type {:?}",
                String::from_utf8_lossy(&te.path_bytes()),
                te.header().entry_type().as_byte() as char
            )),
        ));
    }
    let h = te.header();
    let kind = match h.entry_type() {
        T::Regular | T::Continuous | T::GNUSparse => EntryKind::File,
        T::Directory => EntryKind::Dir,
        T::Symlink => EntryKind::Symlink,
        T::Link => EntryKind::Hardlink,
        T::Char => EntryKind::Char,
        T::Block => EntryKind::Block,
        T::Fifo => EntryKind::Fifo,
        T::XGlobalHeader | T::GNULongName | T::GNULongLink | T::XHeader => return Ok(None),
        other => {
            // 'V' (volume label) and vendor types carry no file.
            if other.as_byte() == b'V' {
                return Ok(None);
            }
            return Err(LayerError::Corrupt {
                step: "read tar header",
                path: name.to_string(),
                offset,
                reason: format!("unsupported tar entry type {:?}", other.as_byte() as char),
            });
        }
    };
    let bad = |what: &str, e: io::Error| {
        corrupt(
            name,
            "read tar header",
            offset,
            &io::Error::new(e.kind(), format!("{what}: {e}")),
        )
    };
    let path = match sparse.as_ref().and_then(|s| s.name.clone()) {
        Some(real) => real,
        None => te.path_bytes().into_owned(),
    };
    let (path, absolute) =
        crate::layer::normalize_path(&path).map_err(|e| LayerError::UnsafeEntry {
            source_name: name.to_string(),
            offset,
            reason: e,
        })?;
    let mut e = Entry::new(path, kind);
    e.mode = h.mode().map_err(|x| bad("mode", x))? & 0o7777;
    e.uid = h.uid().map_err(|x| bad("uid", x))?;
    e.gid = h.gid().map_err(|x| bad("gid", x))?;
    e.mtime = h.mtime().map_err(|x| bad("mtime", x))? as i64;
    if kind == EntryKind::File {
        e.size = sparse.as_ref().map_or(te.size(), |s| s.size);
    }
    if matches!(kind, EntryKind::Char | EntryKind::Block) {
        e.dev_major = h
            .device_major()
            .map_err(|x| bad("device major", x))?
            .unwrap_or(0);
        e.dev_minor = h
            .device_minor()
            .map_err(|x| bad("device minor", x))?
            .unwrap_or(0);
    }
    if matches!(kind, EntryKind::Symlink | EntryKind::Hardlink) {
        e.link = te.link_name_bytes().map(|l| l.into_owned());
        if e.link.as_ref().is_none_or(|l| l.is_empty()) {
            return Err(corrupt(
                name,
                "read tar header",
                offset,
                &io::Error::other(format!("link {:?} has no target", e.path)),
            ));
        }
    }
    if let Some(pax) = te.pax_extensions().map_err(|x| bad("pax header", x))? {
        for ext in pax {
            let ext = ext.map_err(|x| bad("pax record", x))?;
            let Ok(key) = ext.key() else { continue };
            let num = || std::str::from_utf8(ext.value_bytes()).ok().map(str::trim);
            if let Some(x) = key.strip_prefix("SCHILY.xattr.") {
                // Linux caps an xattr value at 64 KiB (XATTR_SIZE_MAX).
                if ext.value_bytes().len() > 65_536 {
                    return Err(corrupt(
                        name,
                        "read tar header",
                        offset,
                        &io::Error::other(format!(
                            "xattr {x:?} of {:?} is {} bytes, more than the 64 KiB Linux allows",
                            e.path,
                            ext.value_bytes().len()
                        )),
                    ));
                }
                e.xattrs.insert(x.to_string(), ext.value_bytes().to_vec());
            } else if key == "uid" {
                e.uid = num().and_then(|v| v.parse().ok()).unwrap_or(e.uid);
            } else if key == "gid" {
                e.gid = num().and_then(|v| v.parse().ok()).unwrap_or(e.gid);
            } else if key == "mtime" {
                let secs = num()
                    .and_then(|v| v.split('.').next())
                    .and_then(|v| v.parse().ok());
                e.mtime = secs.unwrap_or(e.mtime);
            }
        }
    }
    Ok(Some((e, absolute, sparse)))
}
