//! The record of a cached tree: one line per entry (path, kind, mode,
//! owners, size and the SHA-256 of a file's content or a symlink's target),
//! written when the tree is unpacked and compared with the tree by
//! `kiln fsck --rootfs`.
//!
//! ```text
//! kiln-tree 1
//! etc/passwd\tf\t644\t0\t0\t1207\t<sha256 hex>
//! bin/sh\tl\t777\t0\t0\t7\tbusybox
//! ```
//!
//! Paths and link targets are escaped (`%XX` for bytes outside printable
//! ASCII, for `%` and for space), so any name fits on one line.

use std::fs::{self, File};
use std::io::{self, BufRead, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::{Digest as _, Sha256};

const HEADER: &str = "kiln-tree 1";

/// What a record says about its tree as a whole.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct TreeSummary {
    /// Entries below the root (the root itself not counted).
    pub entries: u64,
    /// Bytes of regular-file content.
    pub bytes: u64,
    /// `sha256:` of the record file.
    pub record: String,
}

fn escape(out: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02x}"));
        }
    }
}

/// One line per entry, in walk order (names sorted bytewise per directory).
fn lines(root: &Path) -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    walk(root, &mut Vec::new(), &mut out)?;
    Ok(out)
}

fn walk(dir: &Path, rel: &mut Vec<u8>, out: &mut Vec<(String, String)>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let path = dir.join(&name);
        let len = rel.len();
        if !rel.is_empty() {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let meta = fs::symlink_metadata(&path)?;
        let ft = meta.file_type();
        let (kind, size, detail) = if ft.is_file() {
            let mut h = Sha256::new();
            let mut f = File::open(&path)?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                h.update(&buf[..n]);
            }
            ('f', meta.len(), hex::encode(h.finalize()))
        } else if ft.is_symlink() {
            let mut t = String::new();
            escape(&mut t, fs::read_link(&path)?.as_os_str().as_bytes());
            ('l', 0, t)
        } else if ft.is_dir() {
            ('d', 0, "-".into())
        } else if ft.is_fifo() {
            ('p', 0, "-".into())
        } else if ft.is_socket() {
            ('s', 0, "-".into())
        } else {
            ('c', 0, format!("{}", meta.rdev()))
        };
        let mut key = String::new();
        escape(&mut key, rel);
        let line = format!(
            "{kind}\t{:o}\t{}\t{}\t{size}\t{detail}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid()
        );
        out.push((key, line));
        if ft.is_dir() {
            walk(&path, rel, out)?;
        }
        rel.truncate(len);
    }
    Ok(())
}

/// Walks the tree at `root` and writes its record to `out` (fsynced).
pub(crate) fn write(root: &Path, out: &Path) -> io::Result<TreeSummary> {
    let entries = lines(root)?;
    let mut text = String::with_capacity(entries.len() * 96);
    text.push_str(HEADER);
    text.push('\n');
    let mut bytes = 0u64;
    for (k, l) in &entries {
        if l.starts_with('f') {
            bytes += l
                .split('\t')
                .nth(4)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
        }
        text.push_str(k);
        text.push('\t');
        text.push_str(l);
        text.push('\n');
    }
    let mut f = File::create(out)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(TreeSummary {
        entries: entries.len() as u64,
        bytes,
        record: format!("sha256:{}", hex::encode(Sha256::digest(text.as_bytes()))),
    })
}

/// Compares the tree at `root` with its record; returns what differs (at
/// most `limit` lines, then a count), empty when they match.
pub(crate) fn verify(
    root: &Path,
    record: &Path,
    summary: &TreeSummary,
    limit: usize,
) -> io::Result<Vec<String>> {
    let data = fs::read(record)?;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
    if got != summary.record {
        return Ok(vec![format!(
            "its record {} is damaged (hashes to {got}, the completion marker says {})",
            record.display(),
            summary.record
        )]);
    }
    let mut want = std::collections::BTreeMap::new();
    for (i, line) in io::BufReader::new(&data[..]).lines().enumerate() {
        let line = line?;
        if i == 0 {
            if line != HEADER {
                return Ok(vec![format!("{}: unknown format", record.display())]);
            }
            continue;
        }
        if let Some((k, rest)) = line.split_once('\t') {
            want.insert(k.to_string(), rest.to_string());
        }
    }
    let mut problems = Vec::new();
    let mut count = 0usize;
    let mut note = |p: String| {
        count += 1;
        if problems.len() < limit {
            problems.push(p);
        }
    };
    for (k, l) in lines(root)? {
        match want.remove(&k) {
            None => note(format!("/{k}: not in the image")),
            Some(w) if w != l => note(format!("/{k}: {}", what_differs(&w, &l))),
            Some(_) => {}
        }
    }
    for k in want.keys() {
        note(format!("/{k}: missing"));
    }
    if count > problems.len() {
        problems.push(format!("... {} more", count - problems.len()));
    }
    Ok(problems)
}

fn what_differs(want: &str, got: &str) -> String {
    let w: Vec<&str> = want.split('\t').collect();
    let g: Vec<&str> = got.split('\t').collect();
    let field = |i: usize| w.get(i) != g.get(i);
    if field(0) {
        "changed kind".into()
    } else if field(4) || field(5) {
        if w.first() == Some(&"l") {
            "link target changed".into()
        } else {
            "content changed".into()
        }
    } else if field(1) {
        format!(
            "mode changed ({} -> {})",
            w.get(1).unwrap_or(&"?"),
            g.get(1).unwrap_or(&"?")
        )
    } else {
        "owner changed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_finds_every_kind_of_change() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("root");
        fs::create_dir_all(root.join("etc")).expect("mkdir");
        fs::write(root.join("etc/passwd"), b"root:x:0:0\n").expect("write");
        fs::write(root.join("odd name %\n"), b"x").expect("write");
        std::os::unix::fs::symlink("etc/passwd", root.join("link")).expect("symlink");
        let rec = d.path().join("tree");
        let s = write(&root, &rec).expect("record");
        assert_eq!(s.entries, 4);
        assert_eq!(s.bytes, 12);
        assert!(verify(&root, &rec, &s, 10).expect("verify").is_empty());
        assert!(fs::read_to_string(&rec)
            .expect("read")
            .contains("odd%20name%20%25%0a\tf"));

        fs::write(root.join("etc/passwd"), b"root:x:0:1\n").expect("flip");
        fs::remove_file(root.join("link")).expect("rm");
        fs::write(root.join("new"), b"").expect("new");
        let p = verify(&root, &rec, &s, 10).expect("verify");
        assert_eq!(
            p,
            vec![
                "/etc/passwd: content changed".to_string(),
                "/new: not in the image".into(),
                "/link: missing".into()
            ]
        );
        assert_eq!(verify(&root, &rec, &s, 1).expect("verify").len(), 2);

        fs::write(&rec, b"kiln-tree 1\n").expect("truncate");
        let p = verify(&root, &rec, &s, 10).expect("verify");
        assert!(p[0].contains("record"), "{p:?}");
    }
}
