//! A directory tree to [`Entry`] values, in sorted depth-first order.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::import::{Entry, EntryKind, ImportError};
use crate::sys;

/// The xattr in which rootless unpackers (umoci, kiln) record a file's real
/// owner when they could not chown it.
pub const ROOTLESS_XATTR: &str = "user.rootlesscontainers";

/// Host-specific xattrs that never go into a layer.
const SKIP_XATTRS: &[&str] = &[ROOTLESS_XATTR, "security.selinux"];

/// Callback receiving each entry with its content (empty for non-files).
pub type DirEntryFn<'a> = dyn FnMut(Entry, &mut dyn Read) -> Result<(), ImportError> + 'a;

/// Walks `root`, calling `f` for the root itself and then every object
/// below it, each directory before its children, siblings sorted by name
/// bytes. Hardlinked files become [`EntryKind::Hardlink`] entries pointing
/// at the first path seen. Sockets are skipped (they cannot be archived).
pub fn walk(root: &Path, f: &mut DirEntryFn<'_>) -> Result<u64, ImportError> {
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut skipped = 0;
    visit(root, String::new(), &mut links, &mut skipped, f)?;
    Ok(skipped)
}

fn io_err(path: &Path, step: &'static str, e: io::Error) -> ImportError {
    ImportError::ReadFile {
        step,
        path: path.to_path_buf(),
        source: e,
    }
}

fn visit(
    path: &Path,
    rel: String,
    links: &mut HashMap<(u64, u64), String>,
    skipped: &mut u64,
    f: &mut DirEntryFn<'_>,
) -> Result<(), ImportError> {
    let md = fs::symlink_metadata(path).map_err(|e| io_err(path, "stat", e))?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_file() {
        EntryKind::File
    } else if ft.is_char_device() {
        EntryKind::Char
    } else if ft.is_block_device() {
        EntryKind::Block
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        *skipped += 1;
        tracing::warn!(path = %path.display(), "skipping socket: sockets cannot be stored in a layer");
        return Ok(());
    };
    let mut e = Entry::new(rel.clone(), kind);
    e.mode = md.mode() & 0o7777;
    e.uid = u64::from(md.uid());
    e.gid = u64::from(md.gid());
    e.mtime = md.mtime();
    for name in sys::llistxattr(path).map_err(|e| io_err(path, "list xattrs", e))? {
        let key = String::from_utf8_lossy(&name).into_owned();
        let value = match sys::lgetxattr(path, &name) {
            Ok(v) => v,
            // Raced with a removal, or a trusted.* attribute we may not read.
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENODATA) | Some(libc::EPERM)) => {
                continue
            }
            Err(err) => return Err(io_err(path, "read xattr", err)),
        };
        if key == ROOTLESS_XATTR {
            if let Some((uid, gid)) = decode_rootless(&value) {
                // u32::MAX ("noop id") leaves that half of the owner as on disk.
                if uid != u32::MAX {
                    e.uid = u64::from(uid);
                }
                if gid != u32::MAX {
                    e.gid = u64::from(gid);
                }
            }
        }
        if !SKIP_XATTRS.contains(&key.as_str()) {
            e.xattrs.insert(key, value);
        }
    }
    if matches!(kind, EntryKind::Char | EntryKind::Block) {
        (e.dev_major, e.dev_minor) = sys::dev_major_minor(md.rdev());
    }
    // Device nodes are never linked: overlayfs whiteouts (0/0 devices) share
    // one inode, and each must stay a node of its own.
    if matches!(kind, EntryKind::File | EntryKind::Fifo) && md.nlink() > 1 {
        let key = (md.dev(), md.ino());
        if let Some(first) = links.get(&key) {
            e.kind = EntryKind::Hardlink;
            e.link = Some(first.clone().into_bytes());
            return f(e, &mut io::empty());
        }
        links.insert(key, rel.clone());
    }
    match kind {
        EntryKind::Symlink => {
            let target = fs::read_link(path).map_err(|e| io_err(path, "readlink", e))?;
            e.link = Some(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec());
            f(e, &mut io::empty())
        }
        EntryKind::File => {
            e.size = md.len();
            let file = File::open(path).map_err(|e| io_err(path, "open", e))?;
            let mut r = FileReader {
                file,
                path: path.to_path_buf(),
            };
            f(e, &mut r)
        }
        EntryKind::Dir => {
            f(e, &mut io::empty())?;
            let mut names: Vec<_> = fs::read_dir(path)
                .map_err(|e| io_err(path, "read directory", e))?
                .map(|d| d.map(|d| d.file_name()))
                .collect::<Result<_, _>>()
                .map_err(|e| io_err(path, "read directory", e))?;
            names.sort_by(|a, b| {
                std::os::unix::ffi::OsStrExt::as_bytes(a.as_os_str())
                    .cmp(std::os::unix::ffi::OsStrExt::as_bytes(b.as_os_str()))
            });
            for n in names {
                let Some(s) = n.to_str() else {
                    return Err(ImportError::Unsupported {
                        path: path.join(&n).display().to_string(),
                        what: "file name that is not valid UTF-8".into(),
                    });
                };
                let child_rel = if rel.is_empty() {
                    s.to_string()
                } else {
                    format!("{rel}/{s}")
                };
                visit(&path.join(&n), child_rel, links, skipped, f)?;
            }
            Ok(())
        }
        _ => f(e, &mut io::empty()),
    }
}

/// A file being archived; read errors name the file.
struct FileReader {
    file: File,
    path: PathBuf,
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file
            .read(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", self.path.display())))
    }
}

/// Decodes the `user.rootlesscontainers` protobuf (`uint32 uid = 1; uint32 gid = 2;`).
pub fn decode_rootless(v: &[u8]) -> Option<(u32, u32)> {
    let (mut uid, mut gid) = (0u32, 0u32);
    let mut i = 0;
    while i < v.len() {
        let key = v[i];
        i += 1;
        let mut val: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *v.get(i)?;
            i += 1;
            val |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return None;
            }
        }
        match key {
            0x08 => uid = u32::try_from(val).ok()?,
            0x10 => gid = u32::try_from(val).ok()?,
            _ => return None,
        }
    }
    Some((uid, gid))
}

/// Encodes the `user.rootlesscontainers` protobuf.
pub fn encode_rootless(uid: u32, gid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, mut v) in [(0x08u8, uid), (0x10u8, gid)] {
        if v == 0 {
            continue;
        }
        out.push(key);
        while v >= 0x80 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rootless_xattr_round_trip() {
        for (u, g) in [(0, 0), (1000, 1000), (65534, 5), (300, 0), (u32::MAX, 1)] {
            assert_eq!(decode_rootless(&encode_rootless(u, g)), Some((u, g)));
        }
        assert_eq!(decode_rootless(&[0x08]), None);
    }
}
