//! The normalized file-system entry every source produces, and the layer tar
//! writer that checks and serializes it.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};

use super::sparse;

/// What kind of file an [`Entry`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link (target in [`Entry::link`]).
    Symlink,
    /// Hard link to an earlier entry (target path in [`Entry::link`]).
    Hardlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
}

/// One file-system object, as sources produce it and layers store it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the root, `/`-separated, without a leading `./` or
    /// `/`; the root itself is the empty string.
    pub path: String,
    /// The kind of object.
    pub kind: EntryKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Content size for regular files, 0 otherwise.
    pub size: u64,
    /// Symlink target, or hardlink target path.
    pub link: Option<Vec<u8>>,
    /// Device major number.
    pub dev_major: u32,
    /// Device minor number.
    pub dev_minor: u32,
    /// Extended attributes, by name.
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// The data map of a sparse regular file: `None` for a plain file, whose
    /// data reader yields all `size` bytes.
    ///
    /// When `Some`, the file's content is the listed data segments
    /// `(offset, length)`, in ascending order, not overlapping, each within
    /// `size` (see [`sparse::check`]); everything else is a hole and reads
    /// as zeros. The data reader then yields **only the segments' bytes**,
    /// concatenated in map order ([`Entry::data_len`] bytes), so a huge
    /// mostly-hole file is never read as zeros. Consumers that need the
    /// whole content wrap the reader in a [`sparse::DenseReader`] (see
    /// [`Entry::dense`]). Ignored for entries that are not files.
    pub sparse: Option<Vec<sparse::Segment>>,
}

impl Entry {
    /// A new entry with everything zero/empty but path and kind.
    pub fn new(path: String, kind: EntryKind) -> Entry {
        Entry {
            path,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: None,
            dev_major: 0,
            dev_minor: 0,
            xattrs: BTreeMap::new(),
            sparse: None,
        }
    }

    /// The bytes the entry's data reader yields: the segments' total for a
    /// sparse file, `size` for other files, 0 for the rest.
    pub fn data_len(&self) -> u64 {
        match (&self.kind, &self.sparse) {
            (EntryKind::File, Some(map)) => sparse::data_len(map),
            (EntryKind::File, None) => self.size,
            _ => 0,
        }
    }

    /// The whole content of a file entry from its data reader `data`: `size`
    /// bytes with the holes of a sparse file as zeros (for hashing or
    /// comparing content; unpacking writes the segments instead).
    pub fn dense<'a>(&self, data: &'a mut dyn Read) -> sparse::DenseReader<&'a mut dyn Read> {
        let size = if self.kind == EntryKind::File {
            self.size
        } else {
            0
        };
        match (&self.kind, &self.sparse) {
            (EntryKind::File, Some(map)) => sparse::DenseReader::new(data, map, size),
            _ => sparse::DenseReader::new(data, &[(0, size)], size),
        }
    }
}

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `..` component.
    #[error("path {0:?} contains '..'")]
    DotDot(String),
    /// A NUL byte or an empty name.
    #[error("path {0:?} is not a valid file name")]
    Invalid(String),
    /// An ancestor of the path is a symlink earlier in the layer.
    #[error("path {path:?} goes through {parent:?}, which is a symlink earlier in the archive")]
    ThroughSymlink {
        /// The entry.
        path: String,
        /// Its symlinked ancestor.
        parent: String,
    },
    /// A whiteout of `""`, `.` or `..` (`.wh.`, `.wh..`, `.wh...`): applied,
    /// it would remove the directory itself or its parent.
    #[error(
        "path {0:?} is a whiteout of no single file (a whiteout names one file of its directory)"
    )]
    BadWhiteout(String),
    /// A real file whose name starts with `.wh.`: in an OCI layer it would
    /// be read as a whiteout.
    #[error(
        "{0:?} is named like a whiteout (OCI layers reserve names starting with .wh.): rename it"
    )]
    ReservedName(String),
    /// A hardlink that does not point at an earlier non-directory entry.
    #[error("hardlink {path:?} points at {target:?}, which is not an earlier file in the archive")]
    HardlinkTarget {
        /// The hardlink.
        path: String,
        /// Its target.
        target: String,
    },
}

/// Normalizes an archive path: strips leading `/` and `./`, folds `//` and
/// `/./`, drops a trailing `/`. Returns the path and whether it was absolute.
///
/// ```
/// use kiln::import::normalize_path;
/// assert_eq!(normalize_path(b"./usr//bin/./sh").unwrap(), ("usr/bin/sh".to_string(), false));
/// assert_eq!(normalize_path(b"/etc/").unwrap(), ("etc".to_string(), true));
/// assert!(normalize_path(b"a/../../etc").is_err());
/// ```
pub fn normalize_path(raw: &[u8]) -> Result<(String, bool), PathError> {
    let s = std::str::from_utf8(raw)
        .map(str::to_string)
        .unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned());
    if raw.contains(&0) {
        return Err(PathError::Invalid(s));
    }
    if std::str::from_utf8(raw).is_err() {
        // Non-UTF-8 names are legal on Linux but cannot round-trip through the
        // String paths kiln uses; refuse them clearly rather than mangle them.
        return Err(PathError::Invalid(s));
    }
    let absolute = s.starts_with('/');
    let mut parts = Vec::new();
    for comp in s.split('/') {
        match comp {
            "" | "." => {}
            ".." => return Err(PathError::DotDot(s.clone())),
            c => parts.push(c),
        }
    }
    let path = parts.join("/");
    check_whiteout(&path)?;
    Ok((path, absolute))
}

/// Refuses a whiteout whose target is not one file of its directory: the
/// whiteouts of `""`, `.` and `..` (`.wh.`, `.wh..`, `.wh...`), which an
/// unpacker would apply to the directory itself or to its parent.
///
/// ```
/// use kiln::import::check_whiteout;
/// assert!(check_whiteout("etc/.wh.passwd").is_ok());
/// assert!(check_whiteout("etc/.wh..wh..opq").is_ok());
/// assert!(check_whiteout(".wh...").is_err());
/// assert!(check_whiteout("a/.wh..").is_err());
/// assert!(check_whiteout("a/.wh.").is_err());
/// ```
pub fn check_whiteout(path: &str) -> Result<(), PathError> {
    let name = path.rsplit('/').next().unwrap_or(path);
    match name.strip_prefix(".wh.") {
        Some("" | "." | "..") => Err(PathError::BadWhiteout(path.to_string())),
        _ => Ok(()),
    }
}

/// Tracks what a layer holds so far, to refuse entries that would write
/// through a symlink or hardlink to something outside the layer.
#[derive(Default)]
pub struct PathGuard {
    kinds: HashMap<String, EntryKind>,
}

impl PathGuard {
    /// Checks `e` against the entries seen so far and records it. A
    /// hardlink's target is normalized in place.
    pub fn check(&mut self, e: &mut Entry) -> Result<(), PathError> {
        if e.path.is_empty() && e.kind != EntryKind::Dir {
            return Err(PathError::Invalid(
                "./ (the root must be a directory)".into(),
            ));
        }
        self.check_ancestors(&e.path)?;
        check_whiteout(&e.path)?;
        if e.kind == EntryKind::Hardlink {
            let raw = e.link.clone().unwrap_or_default();
            let refuse = || PathError::HardlinkTarget {
                path: e.path.clone(),
                target: String::from_utf8_lossy(&raw).into_owned(),
            };
            let target = match normalize_path(&raw) {
                Ok((t, _)) if !t.is_empty() => t,
                _ => return Err(refuse()),
            };
            self.check_ancestors(&target).map_err(|_| refuse())?;
            let k = match self.kinds.get(&target) {
                Some(k) if *k != EntryKind::Dir => *k,
                _ => return Err(refuse()),
            };
            e.link = Some(target.into_bytes());
            // A hardlink is a file of the target's kind.
            self.record(&e.path, k);
            return Ok(());
        }
        self.record(&e.path, e.kind);
        Ok(())
    }

    fn check_ancestors(&self, path: &str) -> Result<(), PathError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            let parent = &path[..end + i];
            if self.kinds.get(parent) == Some(&EntryKind::Symlink) {
                return Err(PathError::ThroughSymlink {
                    path: path.to_string(),
                    parent: parent.to_string(),
                });
            }
            end += i + 1;
        }
        Ok(())
    }

    fn record(&mut self, path: &str, kind: EntryKind) {
        let was_dir = self.kinds.insert(path.to_string(), kind) == Some(EntryKind::Dir);
        if was_dir && kind != EntryKind::Dir {
            // The directory was replaced: what was under it is gone.
            let prefix = format!("{path}/");
            self.kinds.retain(|p, _| !p.starts_with(&prefix));
        }
    }
}

const BLOCK: usize = 512;

/// Serializes entries as a deterministic POSIX (ustar + PAX) tar stream.
///
/// Only the fields of [`Entry`] are written: no user/group names, no atime or
/// ctime, so equal trees give equal bytes.
pub struct TarWriter<W: Write> {
    out: W,
    entries: u64,
}

fn octal(field: &mut [u8], v: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    // "%d %s=%s\n" where %d counts the whole record including itself.
    let base = 1 + key.len() + 1 + value.len() + 1;
    let mut len = base + 1;
    while base + len.to_string().len() != len {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    /// Starts a tar stream on `out`.
    pub fn new(out: W) -> Self {
        TarWriter { out, entries: 0 }
    }

    /// The writer the tar stream goes to.
    pub fn inner_ref(&self) -> &W {
        &self.out
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    // One argument per ustar field: a struct would only rename them.
    #[allow(clippy::too_many_arguments)]
    fn header(
        name: &[u8],
        typeflag: u8,
        mode: u32,
        uid: u64,
        gid: u64,
        size: u64,
        mtime: i64,
        link: &[u8],
        dev: (u32, u32),
    ) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        octal(&mut h[100..108], u64::from(mode & 0o7777));
        octal(&mut h[108..116], uid);
        octal(&mut h[116..124], gid);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], mtime.max(0) as u64);
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if typeflag == b'3' || typeflag == b'4' {
            octal(&mut h[329..337], u64::from(dev.0));
            octal(&mut h[337..345], u64::from(dev.1));
        }
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }

    /// How a file entry's content will be stored: the normalized map when
    /// it is written as a PAX sparse entry (holes of at least
    /// [`sparse::MIN_HOLES`]), `None` when written plain.
    fn sparse_layout(e: &Entry) -> io::Result<Option<Vec<sparse::Segment>>> {
        let (EntryKind::File, Some(map)) = (e.kind, &e.sparse) else {
            return Ok(None);
        };
        sparse::check(map, e.size).map_err(|m| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: bad sparse map: {m}", e.path),
            )
        })?;
        let map = sparse::normalize(map);
        Ok(sparse::worth_storing(&map, e.size).then_some(map))
    }

    /// The bytes of content (after the header) the entry will take in the
    /// tar stream, before padding: the map block and data of a sparse
    /// entry, `size` for another file, 0 for the rest.
    pub fn content_size(e: &Entry) -> io::Result<u64> {
        Ok(match Self::sparse_layout(e)? {
            Some(map) => sparse::encode_map(&map, e.size).len() as u64 + sparse::data_len(&map),
            None if e.kind == EntryKind::File => e.size,
            None => 0,
        })
    }

    /// Writes one entry. For files, `data` must yield exactly
    /// [`Entry::data_len`] bytes: all `size` bytes of a plain file, only the
    /// segments' bytes of a sparse one ([`Entry::sparse`]).
    ///
    /// A sparse file whose holes total at least [`sparse::MIN_HOLES`] is
    /// written in the PAX sparse format 1.0 (see [`sparse`]); one with
    /// smaller holes is written as a plain file, holes as zeros.
    pub fn append(&mut self, e: &Entry, data: &mut dyn Read) -> io::Result<()> {
        match (Self::sparse_layout(e)?, &e.sparse) {
            (Some(map), _) => self.write_entry(e, Some(&map), data),
            (None, Some(map)) if e.kind == EntryKind::File => {
                let mut dense = sparse::DenseReader::new(data, map, e.size);
                self.write_entry(e, None, &mut dense)
            }
            _ => self.write_entry(e, None, data),
        }
    }

    /// Writes one entry whose `data` yields `e.size` bytes (`map` `None`) or
    /// the data of `map` (valid and normalized), stored sparse.
    fn write_entry(
        &mut self,
        e: &Entry,
        map: Option<&[sparse::Segment]>,
        data: &mut dyn Read,
    ) -> io::Result<()> {
        let mut name = if e.path.is_empty() {
            "./".to_string()
        } else {
            e.path.clone()
        };
        if e.kind == EntryKind::Dir && !e.path.is_empty() {
            name.push('/');
        }
        let link = e.link.as_deref().unwrap_or_default();
        let mut pax = Vec::new();
        let map_block = map.map(|m| sparse::encode_map(m, e.size));
        let name_field = if map.is_some() {
            // GNU tar's layout: the real name and size in GNU.sparse.*
            // records, a stand-in name in the header (a fixed 0 where GNU
            // tar puts its pid: layers must be reproducible). No `path`
            // record: a reader that does not know the format must not put
            // the map-prefixed data under the real name.
            pax_record(&mut pax, "GNU.sparse.major", b"1");
            pax_record(&mut pax, "GNU.sparse.minor", b"0");
            pax_record(&mut pax, "GNU.sparse.name", name.as_bytes());
            pax_record(
                &mut pax,
                "GNU.sparse.realsize",
                e.size.to_string().as_bytes(),
            );
            let stand_in = match name.rsplit_once('/') {
                Some((dir, base)) => format!("{dir}/GNUSparseFile.0/{base}"),
                None => format!("./GNUSparseFile.0/{name}"),
            };
            truncate_name(&stand_in)
        } else if name.len() <= 100 {
            name.as_bytes().to_vec()
        } else {
            pax_record(&mut pax, "path", name.as_bytes());
            truncate_name(&name)
        };
        let link_field: Vec<u8> = if link.len() <= 100 {
            link.to_vec()
        } else {
            pax_record(&mut pax, "linkpath", link);
            link[..100].to_vec()
        };
        let data_len = match map {
            Some(m) => sparse::data_len(m),
            None if e.kind == EntryKind::File => e.size,
            None => 0,
        };
        let size = data_len + map_block.as_ref().map_or(0, |b| b.len() as u64);
        let big = 0o7777777;
        if e.uid > big {
            pax_record(&mut pax, "uid", e.uid.to_string().as_bytes());
        }
        if e.gid > big {
            pax_record(&mut pax, "gid", e.gid.to_string().as_bytes());
        }
        if size > 0o77777777777 {
            pax_record(&mut pax, "size", size.to_string().as_bytes());
        }
        if e.mtime < 0 || e.mtime > 0o77777777777 {
            pax_record(&mut pax, "mtime", e.mtime.to_string().as_bytes());
        }
        for (k, v) in &e.xattrs {
            pax_record(&mut pax, &format!("SCHILY.xattr.{k}"), v);
        }
        if !pax.is_empty() {
            let pname = truncate_name(&format!(
                "PaxHeaders/{}",
                e.path.rsplit('/').next().unwrap_or("")
            ));
            let h = Self::header(
                &pname,
                b'x',
                0o644,
                0,
                0,
                pax.len() as u64,
                e.mtime,
                b"",
                (0, 0),
            );
            self.out.write_all(&h)?;
            self.out.write_all(&pax)?;
            pad(&mut self.out, pax.len() as u64)?;
        }
        let typeflag = match e.kind {
            EntryKind::File => b'0',
            EntryKind::Hardlink => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::Char => b'3',
            EntryKind::Block => b'4',
            EntryKind::Dir => b'5',
            EntryKind::Fifo => b'6',
        };
        let clamp = |v: u64| v.min(big);
        let h = Self::header(
            &name_field,
            typeflag,
            e.mode,
            clamp(e.uid),
            clamp(e.gid),
            size.min(0o77777777777),
            e.mtime.clamp(0, 0o77777777777),
            &link_field,
            (e.dev_major, e.dev_minor),
        );
        self.out.write_all(&h)?;
        if let Some(b) = &map_block {
            self.out.write_all(b)?;
        }
        if data_len > 0 {
            let n = io::copy(&mut data.take(data_len), &mut self.out)?;
            if n != data_len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: expected {data_len} bytes of content, got {n}", e.path),
                ));
            }
        }
        if size > 0 {
            pad(&mut self.out, size)?;
        }
        self.entries += 1;
        Ok(())
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; BLOCK * 2])?;
        Ok(self.out)
    }
}

fn truncate_name(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    b[..b.len().min(100)].to_vec()
}

fn pad<W: Write>(w: &mut W, size: u64) -> io::Result<()> {
    let rem = (size % BLOCK as u64) as usize;
    if rem != 0 {
        w.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, link: Option<&str>) -> Entry {
        let mut e = Entry::new(path.into(), kind);
        e.link = link.map(|l| l.as_bytes().to_vec());
        e
    }

    #[test]
    fn guard_refuses_writes_through_symlinks_and_outside_hardlinks() {
        let mut g = PathGuard::default();
        g.check(&mut entry("etc", EntryKind::Dir, None)).unwrap();
        g.check(&mut entry("etc/passwd", EntryKind::File, None))
            .unwrap();
        g.check(&mut entry("evil", EntryKind::Symlink, Some("/etc")))
            .unwrap();
        assert!(matches!(
            g.check(&mut entry("evil/shadow", EntryKind::File, None)),
            Err(PathError::ThroughSymlink { .. })
        ));
        g.check(&mut entry("pw", EntryKind::Hardlink, Some("etc/passwd")))
            .unwrap();
        g.check(&mut entry("pw2", EntryKind::Hardlink, Some("/etc/passwd")))
            .unwrap();
        assert!(matches!(
            g.check(&mut entry("out", EntryKind::Hardlink, Some("host/file"))),
            Err(PathError::HardlinkTarget { .. })
        ));
        assert!(matches!(
            g.check(&mut entry("d", EntryKind::Hardlink, Some("etc"))),
            Err(PathError::HardlinkTarget { .. })
        ));
        // A directory replaced by a symlink forgets its children.
        g.check(&mut entry("d2", EntryKind::Dir, None)).unwrap();
        g.check(&mut entry("d2/shadow", EntryKind::File, None))
            .unwrap();
        g.check(&mut entry("d2", EntryKind::Symlink, Some("/etc")))
            .unwrap();
        assert!(g
            .check(&mut entry("h", EntryKind::Hardlink, Some("d2/shadow")))
            .is_err());
        // The root must be a directory; a hardlink cannot name it.
        assert!(g
            .check(&mut entry("", EntryKind::Symlink, Some("/etc")))
            .is_err());
        assert!(g
            .check(&mut entry("r", EntryKind::Hardlink, Some("./")))
            .is_err());
        assert!(g
            .check(&mut entry(
                "r",
                EntryKind::Hardlink,
                Some("../../etc/shadow")
            ))
            .is_err());
        // Replacing the symlink by a directory makes the path usable again.
        g.check(&mut entry("evil", EntryKind::Dir, None)).unwrap();
        g.check(&mut entry("evil/ok", EntryKind::File, None))
            .unwrap();
    }

    #[test]
    fn pax_record_length_counts_itself() {
        for n in [1usize, 5, 90, 95, 994, 995, 9990] {
            let mut out = Vec::new();
            pax_record(&mut out, "path", "x".repeat(n).as_bytes());
            let sp = out.iter().position(|b| *b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "n={n}");
        }
    }

    #[test]
    fn tar_round_trips_through_the_tar_crate() {
        let mut w = TarWriter::new(Vec::new());
        let mut f = entry("a/long/", EntryKind::File, None);
        f.path = format!("dir/{}", "n".repeat(150));
        f.size = 3;
        f.mode = 0o4755;
        f.uid = 3_000_000;
        f.xattrs.insert(
            "security.capability".into(),
            vec![1, 0, 0, 2, 0, 0x20, 0, 0],
        );
        w.append(&entry("dir", EntryKind::Dir, None), &mut io::empty())
            .unwrap();
        w.append(&f, &mut &b"abc"[..]).unwrap();
        let buf = w.finish().unwrap();
        let mut ar = tar::Archive::new(&buf[..]);
        let mut it = ar.entries().unwrap();
        let d = it.next().unwrap().unwrap();
        assert_eq!(d.path_bytes().as_ref(), b"dir/");
        let mut e = it.next().unwrap().unwrap();
        assert_eq!(e.path().unwrap().to_str().unwrap(), f.path);
        assert_eq!(e.header().mode().unwrap(), 0o4755);
        let pax: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().to_string(), x.value_bytes().to_vec())
            })
            .collect();
        assert!(pax.contains(&("uid".into(), b"3000000".to_vec())));
        assert!(pax.contains(&(
            "SCHILY.xattr.security.capability".into(),
            vec![1, 0, 0, 2, 0, 0x20, 0, 0]
        )));
        let mut s = String::new();
        e.read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
    }

    fn sparse_file(path: &str, size: u64, map: Vec<sparse::Segment>) -> Entry {
        let mut e = entry(path, EntryKind::File, None);
        e.size = size;
        e.mode = 0o640;
        e.mtime = 1_700_000_000;
        e.sparse = Some(map);
        e
    }

    /// The segments' bytes of `map`: segment i is filled with byte i+1.
    fn seg_data(map: &[sparse::Segment]) -> Vec<u8> {
        map.iter()
            .enumerate()
            .flat_map(|(i, s)| vec![i as u8 + 1; s.1 as usize])
            .collect()
    }

    #[test]
    fn sparse_files_are_written_in_pax_sparse_1_0() {
        let map = vec![(0, 100), (1 << 20, 4096), ((3 << 20) - 10, 10)];
        let e = sparse_file("usr/lib/f", 3 << 20, map.clone());
        let data = seg_data(&map);
        let write = |e: &Entry| {
            let mut w = TarWriter::new(Vec::new());
            w.append(e, &mut &data[..]).unwrap();
            w.finish().unwrap()
        };
        let buf = write(&e);
        // Reproducible: the same entry gives the same bytes.
        assert_eq!(buf, write(&e));
        let enc = sparse::encode_map(&map, 3 << 20);
        assert_eq!(
            TarWriter::<Vec<u8>>::content_size(&e).unwrap(),
            enc.len() as u64 + 4206
        );
        // What a reader that does not know the format sees (the tar crate).
        let mut ar = tar::Archive::new(&buf[..]);
        let mut it = ar.entries().unwrap();
        let mut te = it.next().unwrap().unwrap();
        assert_eq!(te.path_bytes().as_ref(), b"usr/lib/GNUSparseFile.0/f");
        assert_eq!(te.header().entry_type(), tar::EntryType::Regular);
        assert_eq!(te.size(), enc.len() as u64 + 4206);
        let pax: Vec<(String, String)> = te
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().into(), x.value().unwrap().into())
            })
            .collect();
        let want: Vec<(String, String)> = [
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "usr/lib/f"),
            ("GNU.sparse.realsize", "3145728"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(pax, want);
        let mut body = Vec::new();
        te.read_to_end(&mut body).unwrap();
        assert_eq!(&body[..enc.len()], &enc[..]);
        assert_eq!(&body[enc.len()..], &data[..]);
        // kiln's own reader gives the entry back.
        let mut got = Vec::new();
        crate::source::tarball::walk(&buf[..], "t", &mut |g, r, _| {
            let mut d = Vec::new();
            r.read_to_end(&mut d).unwrap();
            got.push((g, d));
            Ok(())
        })
        .unwrap();
        assert_eq!(got.len(), 1);
        let (g, d) = &got[0];
        assert_eq!(
            (g.path.as_str(), g.size, g.mode),
            ("usr/lib/f", 3 << 20, 0o640)
        );
        assert_eq!(g.sparse.as_deref(), Some(&map[..]));
        assert_eq!(d, &data);
        // A file at the root gets GNU tar's "./GNUSparseFile.0/NAME".
        let buf = write(&sparse_file("top", 3 << 20, map.clone()));
        let mut ar = tar::Archive::new(&buf[..]);
        let te = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(te.path_bytes().as_ref(), b"./GNUSparseFile.0/top");
    }

    #[test]
    fn small_holes_are_written_plain_and_bad_maps_refused() {
        // 64 KiB - 1 of holes: a plain entry, the same bytes as the dense file.
        let size = 10 + sparse::MIN_HOLES - 1;
        let map = vec![(0, 5), (size - 5, 5)];
        let data = seg_data(&map);
        let mut w = TarWriter::new(Vec::new());
        let e = sparse_file("f", size, map.clone());
        assert_eq!(TarWriter::<Vec<u8>>::content_size(&e).unwrap(), size);
        w.append(&e, &mut &data[..]).unwrap();
        let sparse_buf = w.finish().unwrap();
        let mut dense = Vec::new();
        e.dense(&mut &data[..]).read_to_end(&mut dense).unwrap();
        let mut plain = e.clone();
        plain.sparse = None;
        let mut w = TarWriter::new(Vec::new());
        w.append(&plain, &mut &dense[..]).unwrap();
        assert_eq!(sparse_buf, w.finish().unwrap());
        // One more byte of holes: sparse.
        let e = sparse_file("f", size + 1, vec![(0, 5), (size - 4, 5)]);
        let mut w = TarWriter::new(Vec::new());
        w.append(&e, &mut &data[..]).unwrap();
        assert!(w.finish().unwrap().len() < 4096);
        // Maps that break the contract are refused, naming the file.
        for bad in [
            vec![(10, 5), (0, 5)],
            vec![(0, 10), (5, 10)],
            vec![(size, 1)],
        ] {
            let e = sparse_file("bad/f", size, bad);
            let mut w = TarWriter::new(Vec::new());
            let err = w.append(&e, &mut io::repeat(0)).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            assert!(err.to_string().contains("bad/f: bad sparse map"), "{err}");
        }
        // Data shorter than the map says.
        let e = sparse_file("short", 1 << 20, vec![(0, 10)]);
        let mut w = TarWriter::new(Vec::new());
        let err = w.append(&e, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}
