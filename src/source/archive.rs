//! Image archives: `docker save` tarballs, OCI archives and OCI layout
//! directories, seen as a set of named files with random access.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::layer::sparse::{data_len, read_map, DenseReader, PaxSparse, Segment};
use crate::layer::{normalize_path, LayerError};

/// Whether a (normalized) top-level tar member name belongs to an image
/// archive rather than a root file system.
pub fn is_archive_member(name: &str) -> bool {
    let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let first = name.split('/').next().unwrap_or("");
    matches!(
        name,
        "oci-layout" | "index.json" | "manifest.json" | "repositories" | "blobs"
    ) || first == "blobs"
        || hex64(first)
        || [".json", ".tar", ".tar.gz"]
            .iter()
            .any(|ext| first.strip_suffix(ext).is_some_and(hex64))
}

/// Looks at the tar headers within `head` (the first bytes of a
/// decompressed stream) and says whether they are an image archive.
pub fn looks_like_archive(head: &[u8]) -> bool {
    let mut names = Vec::new();
    let mut off = 0usize;
    while off + 512 <= head.len() && names.len() < 16 {
        let h = &head[off..off + 512];
        if h.iter().all(|b| *b == 0) || !super::tar_header_ok(h) {
            break;
        }
        let size = crate::layer::codec::tar_number(&h[124..136]).unwrap_or(0);
        let typeflag = h[156];
        let mut name: Vec<u8> = h[..100].iter().copied().take_while(|b| *b != 0).collect();
        if &h[257..262] == b"ustar" && h[345] != 0 {
            let mut prefix: Vec<u8> = h[345..500]
                .iter()
                .copied()
                .take_while(|b| *b != 0)
                .collect();
            prefix.push(b'/');
            prefix.extend_from_slice(&name);
            name = prefix;
        }
        if !matches!(typeflag, b'x' | b'g' | b'L' | b'K') {
            if let Ok((n, _)) = normalize_path(&name) {
                if !n.is_empty() {
                    names.push(n);
                }
            }
        }
        off += 512 + (size as usize).div_ceil(512) * 512;
    }
    !names.is_empty() && names.iter().all(|n| is_archive_member(n))
}

/// A set of files addressed by name: a directory or an uncompressed tar file.
pub enum FileSet {
    /// An OCI layout directory.
    Dir(PathBuf),
    /// A tar file, indexed once.
    Tar {
        /// The tar file.
        path: PathBuf,
        /// The members, by name.
        files: HashMap<String, Member>,
    },
}

/// Where a member of a tar [`FileSet`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Offset of its (stored) data in the tar file.
    pub offset: u64,
    /// Its size (the real size of a sparse member).
    pub size: u64,
    /// The data map of a PAX sparse member, whose stored data is only the
    /// segments' bytes.
    pub sparse: Option<Vec<Segment>>,
}

impl FileSet {
    /// Indexes the members of an uncompressed tar file (headers only, seeking
    /// over file data). Symlinks and hardlinks between members are resolved.
    pub fn index_tar(path: &Path, display: &str) -> Result<FileSet, LayerError> {
        let f = File::open(path).map_err(|e| LayerError::Open {
            path: display.into(),
            source: e,
        })?;
        let mut ar = tar::Archive::new(f);
        let mut files = HashMap::new();
        let mut links: Vec<(String, String)> = Vec::new();
        let entries = ar
            .entries_with_seek()
            .map_err(|e| LayerError::from_read(display, "index archive", 0, &e))?;
        let mut at = 0;
        for item in entries {
            let mut e =
                item.map_err(|e| LayerError::from_read(display, "index archive", at, &e))?;
            at = e.raw_header_position();
            let sparse =
                super::tarball::pax_sparse(&mut e).map_err(|reason| LayerError::Corrupt {
                    step: "index archive",
                    path: display.into(),
                    offset: at,
                    reason,
                })?;
            let raw_name = match sparse.as_ref().and_then(|s| s.name.clone()) {
                Some(n) => n,
                None => e.path_bytes().into_owned(),
            };
            let Ok((name, _)) = normalize_path(&raw_name) else {
                continue;
            };
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let (offset, stored) = (e.raw_file_position(), e.size());
                    let member = match sparse {
                        None => Member {
                            offset,
                            size: stored,
                            sparse: None,
                        },
                        Some(sp) => sparse_member(path, offset, stored, sp).map_err(|reason| {
                            LayerError::Corrupt {
                                step: "index archive",
                                path: display.into(),
                                offset: at,
                                reason: format!("{name}: {reason}"),
                            }
                        })?,
                    };
                    files.insert(name, member);
                }
                tar::EntryType::Symlink => {
                    if let Some(t) = e.link_name_bytes() {
                        let parent = name.rsplit_once('/').map_or("", |(p, _)| p);
                        let joined = format!("{parent}/{}", String::from_utf8_lossy(&t));
                        links.push((name, joined));
                    }
                }
                tar::EntryType::Link => {
                    if let Some(t) = e.link_name_bytes() {
                        links.push((name, String::from_utf8_lossy(&t).into_owned()));
                    }
                }
                _ => {}
            }
        }
        for (name, target) in links {
            let t = resolve_dots(&target);
            if let Some(v) = t.and_then(|t| files.get(&t).cloned()) {
                files.insert(name, v);
            }
        }
        Ok(FileSet::Tar {
            path: path.to_path_buf(),
            files,
        })
    }

    /// Whether `name` exists.
    pub fn exists(&self, name: &str) -> bool {
        match self {
            FileSet::Dir(d) => safe_join(d, name).is_some_and(|p| p.is_file()),
            FileSet::Tar { files, .. } => files.contains_key(name),
        }
    }

    /// Opens `name` for reading.
    pub fn open(&self, name: &str) -> io::Result<(Box<dyn Read + Send>, u64)> {
        let nf = || {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} is not in the archive"),
            )
        };
        match self {
            FileSet::Dir(d) => {
                let p = safe_join(d, name).ok_or_else(nf)?;
                // Regular files only, never through a symlink, never blocking
                // on a FIFO, and never more than the size seen at open.
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&p)?;
                let md = f.metadata()?;
                if !md.is_file() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{name} is not a regular file"),
                    ));
                }
                let len = md.len();
                Ok((
                    Box::new(io::BufReader::with_capacity(1 << 20, f).take(len)),
                    len,
                ))
            }
            FileSet::Tar { path, files } => {
                let m = files.get(name).ok_or_else(nf)?;
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(m.offset))?;
                let r = io::BufReader::with_capacity(1 << 20, f);
                Ok(match &m.sparse {
                    None => (Box::new(r.take(m.size)), m.size),
                    Some(map) => (
                        Box::new(DenseReader::new(r.take(data_len(map)), map, m.size)),
                        m.size,
                    ),
                })
            }
        }
    }

    /// Reads a small member (JSON) fully; refuses anything over 16 MiB.
    pub fn read_small(&self, name: &str) -> io::Result<Vec<u8>> {
        let (r, size) = self.open(name)?;
        if size > crate::layer::MAX_JSON_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name} is {size} bytes, more than a JSON document may be"),
            ));
        }
        let mut buf = Vec::with_capacity(size as usize);
        r.take(crate::layer::MAX_JSON_SIZE).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

/// A PAX sparse member at `offset` (`stored` bytes) of the tar at `path`:
/// its map is read (from the data for format 1.0) and checked.
fn sparse_member(path: &Path, offset: u64, stored: u64, sp: PaxSparse) -> Result<Member, String> {
    let (map, skip) = match sp.map {
        Some(map) => (map, 0),
        None => {
            let mut f = File::open(path).map_err(|e| e.to_string())?;
            f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
            let mut r = io::BufReader::new(f).take(stored);
            read_map(&mut r, sp.size, stored)?
        }
    };
    if data_len(&map) != stored - skip {
        return Err(format!(
            "the sparse map lists {} bytes of data but the member holds {}",
            data_len(&map),
            stored - skip
        ));
    }
    Ok(Member {
        offset: offset + skip,
        size: sp.size,
        sparse: Some(map),
    })
}

/// Joins a member name under `dir` refusing `..` and absolute names.
fn safe_join(dir: &Path, name: &str) -> Option<PathBuf> {
    let (n, abs) = normalize_path(name.as_bytes()).ok()?;
    (!abs && !n.is_empty()).then(|| dir.join(n))
}

/// Resolves `.` and `..` textually, refusing to climb above the root.
fn resolve_dots(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_members() {
        let h = "a".repeat(64);
        for n in [
            "manifest.json",
            "repositories",
            "oci-layout",
            "index.json",
            "blobs/sha256/x",
            &format!("{h}/layer.tar"),
            &format!("{h}.json"),
            &format!("{h}.tar"),
        ] {
            assert!(is_archive_member(n), "{n}");
        }
        for n in ["etc", "bin/sh", "usr", "json"] {
            assert!(!is_archive_member(n), "{n}");
        }
        assert_eq!(resolve_dots("a/b/../c"), Some("a/c".into()));
        assert_eq!(resolve_dots("../x"), None);
    }

    #[test]
    fn sparse_members_read_with_their_holes() {
        use crate::layer::{Entry, EntryKind, TarWriter};
        let mut w = TarWriter::new(Vec::new());
        let mut e = Entry::new("blobs/sha256/aa".into(), EntryKind::File);
        e.size = 1 << 20;
        e.sparse = Some(vec![(0, 3), ((1 << 20) - 3, 3)]);
        w.append(&e, &mut &b"abcxyz"[..]).unwrap();
        let mut plain = Entry::new("index.json".into(), EntryKind::File);
        plain.size = 2;
        w.append(&plain, &mut &b"{}"[..]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar");
        std::fs::write(&path, w.finish().unwrap()).unwrap();
        let set = FileSet::index_tar(&path, "a.tar").unwrap();
        assert!(set.exists("blobs/sha256/aa"));
        let (mut r, size) = set.open("blobs/sha256/aa").unwrap();
        assert_eq!(size, 1 << 20);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let mut want = vec![0u8; 1 << 20];
        want[..3].copy_from_slice(b"abc");
        want[(1 << 20) - 3..].copy_from_slice(b"xyz");
        assert!(got == want);
        assert_eq!(set.read_small("index.json").unwrap(), b"{}");
    }
}
