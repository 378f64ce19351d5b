//! A directory tree to [`Entry`] values, in sorted depth-first order.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::layer::sparse::Segment;
use crate::layer::{Entry, EntryKind, LayerError};
use crate::sys;

pub use crate::layer::rootless::{decode_rootless, encode_rootless, ROOTLESS_XATTR};

/// Host-specific xattrs that never go into a layer.
const SKIP_XATTRS: &[&str] = &[ROOTLESS_XATTR, "security.selinux"];

/// Callback receiving each entry with its content (empty for non-files).
pub type DirEntryFn<'a> = dyn FnMut(Entry, &mut dyn Read) -> Result<(), LayerError> + 'a;

/// Walks `root`, calling `f` for the root itself and then every object
/// below it, each directory before its children, siblings sorted by name
/// bytes. Hardlinked files become [`EntryKind::Hardlink`] entries pointing
/// at the first path seen. Sockets are skipped (they cannot be archived).
pub fn walk(root: &Path, f: &mut DirEntryFn<'_>) -> Result<u64, LayerError> {
    let mut links: HashMap<(u64, u64), String> = HashMap::new();
    let mut skipped = 0;
    visit(root, String::new(), &mut links, &mut skipped, f)?;
    Ok(skipped)
}

fn io_err(path: &Path, step: &'static str, e: io::Error) -> LayerError {
    LayerError::ReadFile {
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
) -> Result<(), LayerError> {
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
            // Holes, where the file system reports them, stay holes.
            let map = data_map(&file, e.size);
            let segments = map.clone().unwrap_or_else(|| vec![(0, e.size)]);
            e.sparse = map;
            let mut r = FileReader {
                file,
                path: path.to_path_buf(),
                segments,
                idx: 0,
                done: 0,
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
                    return Err(LayerError::Unsupported {
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

/// The data segments of a file of `size` bytes that has holes, from
/// `lseek(SEEK_DATA/SEEK_HOLE)`; `None` for a file without holes, and on
/// file systems that cannot tell (their files all read as data).
fn data_map(file: &File, size: u64) -> Option<Vec<Segment>> {
    use rustix::fs::{seek, SeekFrom};
    if size == 0 {
        return None;
    }
    // One call answers for the common file without holes.
    if seek(file, SeekFrom::Hole(0)).ok()? >= size {
        return None;
    }
    let mut map = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data past pos: the rest is a hole.
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        if data >= size {
            break;
        }
        let hole = seek(file, SeekFrom::Hole(data)).ok()?.min(size);
        if hole <= data {
            return None; // a confused file system: read it all
        }
        map.push((data, hole - data));
        pos = hole;
    }
    Some(map)
}

/// A file being archived: reads its data segments (the whole file when it
/// has no holes) with positioned reads; read errors name the file.
struct FileReader {
    file: File,
    path: PathBuf,
    segments: Vec<Segment>,
    /// The segment being read...
    idx: usize,
    /// ...and how much of it was.
    done: u64,
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(&(off, len)) = self.segments.get(self.idx) else {
                return Ok(0);
            };
            if self.done >= len {
                self.idx += 1;
                self.done = 0;
                continue;
            }
            if buf.is_empty() {
                return Ok(0);
            }
            let want = buf
                .len()
                .min(usize::try_from(len - self.done).unwrap_or(usize::MAX));
            let n = self
                .file
                .read_at(&mut buf[..want], off + self.done)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("read {}: {e}", self.path.display()))
                })?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read {}: the file shrank while being read (expected data at offset {})",
                        self.path.display(),
                        off + self.done
                    ),
                ));
            }
            self.done += n as u64;
            return Ok(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_are_found_and_only_data_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("sparse")).unwrap();
        f.set_len(10 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(b"middle", 5 << 20).unwrap();
        drop(f);
        std::fs::write(dir.path().join("dense"), vec![1u8; 100_000]).unwrap();
        let mut seen = Vec::new();
        walk(dir.path(), &mut |e, r| {
            let mut data = Vec::new();
            r.read_to_end(&mut data).unwrap();
            assert_eq!(data.len() as u64, e.data_len(), "{}", e.path);
            seen.push((e.path.clone(), e.sparse.clone(), data));
            Ok(())
        })
        .unwrap();
        let (_, map, data) = &seen[1];
        assert_eq!((&seen[1].0[..], map), ("dense", &None));
        assert_eq!(data.len(), 100_000);
        let (_, map, data) = &seen[2];
        // Where the file system keeps holes (tmpfs, ext4, xfs, btrfs...),
        // the map has the two written blocks, whatever their size.
        if let Some(map) = map {
            assert_eq!(map.len(), 2, "{map:?}");
            assert_eq!(map[0].0, 0);
            assert!(map[1].0 <= 5 << 20 && map[1].0 + map[1].1 >= (5 << 20) + 6);
            assert_eq!(&data[..4], b"head");
            let at = usize::try_from(map[0].1 + (5 << 20) - map[1].0).unwrap();
            assert_eq!(&data[at..at + 6], b"middle");
        }
    }
}
