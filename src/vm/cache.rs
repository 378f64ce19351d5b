//! Files made once and kept between VMs (a kernel's PVH `vmlinux`, its
//! module tree as an ext4 image, an initramfs, an image's tree as an ext4
//! image): named by a key of what they are made from, written to a temp
//! file and renamed into place, so a reader never sees half a file and two
//! makers at once both end with a whole one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{io_err, VmError};

/// What identifies a file without reading it: device, inode, size and
/// modification time (empty when it cannot be read).
pub(crate) fn stamp(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .map(|m| {
            format!(
                "{}:{}:{}:{}.{}",
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            )
        })
        .unwrap_or_default()
}

/// A short name for `key`: 32 hex digits of its SHA-256.
pub(crate) fn key_name(key: &str) -> String {
    let d = crate::digest::of_bytes(key.as_bytes());
    d.digest().chars().take(32).collect()
}

/// `path`, made by `make` (given a temp file beside it) unless it exists.
pub(crate) fn made_once(
    path: &Path,
    make: impl FnOnce(&Path) -> Result<(), VmError>,
) -> Result<PathBuf, VmError> {
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let tmp = tempfile::Builder::new()
        .prefix(".making-")
        .tempfile_in(dir)
        .map_err(io_err("create a file in", dir))?;
    make(tmp.path())?;
    tmp.persist(path).map_err(|e| VmError::Io {
        step: "write",
        path: path.display().to_string(),
        source: e.error,
    })?;
    Ok(path.to_path_buf())
}

/// Makes an ext4 image of a tree: sized from the tree plus room for
/// writes, no journal, no reserved blocks, inode tables left for the
/// kernel to initialize. `$1` the tree, `$2` the image, `$3` the room in KiB.
const MAKE_EXT4: &str = r#"set -e
kb=$(du -s -k -x "$1" | cut -f1)
n=$(find "$1" -xdev | wc -l)
mke2fs -q -F -t ext4 -O ^has_journal,^resize_inode -m 0 -b 4096 \
  -E root_owner=0:0,lazy_itable_init=1 -N $((n + 65536)) -L kiln \
  -d "$1" "$2" "$((kb + kb / 4 + $3))k"
"#;

/// Who reads the tree for [`ext4_of_tree`]: this process, or a helper in
/// a user-namespace mapping (as root there, so every file of a tree owned
/// by subordinate ids is readable and keeps its owner in the image).
pub(crate) enum Reader<'a> {
    /// This process.
    Caller,
    /// A helper (the given binary, or kiln's) inside the mapping.
    Mapped(Option<&'a Path>, &'a crate::userns::IdMap),
}

/// Writes an ext4 image of `tree` to `out` with `room_kib` KiB free
/// (`mke2fs -d`, e2fsprogs).
pub(crate) fn ext4_of_tree(
    tree: &Path,
    out: &Path,
    room_kib: u64,
    reader: Reader<'_>,
) -> Result<(), VmError> {
    let mke2fs = crate::sys::find_tool("mke2fs").ok_or_else(|| {
        VmError::Agent(
            "be given its root: mke2fs not found (install e2fsprogs); a VM's root is an ext4 image of the image's tree".into(),
        )
    })?;
    let sh = crate::sys::find_tool("sh").unwrap_or_else(|| PathBuf::from("/bin/sh"));
    let script = format!(
        "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin\n{MAKE_EXT4}",
        mke2fs.parent().unwrap_or(Path::new("/sbin")).display()
    );
    let argv: Vec<String> = vec![
        sh.display().to_string(),
        "-c".into(),
        script,
        "sh".into(),
        tree.display().to_string(),
        out.display().to_string(),
        room_kib.to_string(),
    ];
    let dir = out.parent().unwrap_or(Path::new("/"));
    let output = match reader {
        Reader::Caller => std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output(),
        Reader::Mapped(helper, map) => {
            crate::userns::spawn_mapped(helper, map, argv, dir).and_then(|c| c.wait_with_output())
        }
    }
    .map_err(io_err("run mke2fs for", tree))?;
    if !output.status.success() {
        return Err(io_err("make an ext4 image of", tree)(io::Error::other(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        )));
    }
    Ok(())
}

/// Writes an empty ext4 file system of `size_kib` KiB to `out` (sparse,
/// no journal: the guest unmounts it before the host reads it), its root
/// owned by 0:0.
pub(crate) fn empty_ext4(out: &Path, size_kib: u64) -> Result<(), VmError> {
    let mke2fs = crate::sys::find_tool("mke2fs").ok_or_else(|| {
        VmError::Agent("be given an upper disk: mke2fs not found (install e2fsprogs)".into())
    })?;
    let output = std::process::Command::new(&mke2fs)
        .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal,^resize_inode"])
        .args([
            "-m",
            "0",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0,lazy_itable_init=1",
        ])
        .args(["-L", "kiln-upper"])
        .arg(out)
        .arg(format!("{size_kib}k"))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io_err("run mke2fs for", out))?;
    if !output.status.success() {
        return Err(io_err("make an ext4 file system in", out)(
            io::Error::other(String::from_utf8_lossy(&output.stderr).trim().to_string()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_made_once_and_names_follow_their_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/x");
        let mut calls = 0;
        for _ in 0..2 {
            made_once(&path, |tmp| {
                calls += 1;
                fs::write(tmp, b"data").map_err(io_err("write", tmp))
            })
            .expect("made");
        }
        assert_eq!(calls, 1);
        assert_eq!(fs::read(&path).expect("read"), b"data");
        let failed = made_once(&dir.path().join("y"), |_| Err(VmError::Agent("no".into())));
        assert!(failed.is_err());
        assert!(!dir.path().join("y").exists(), "nothing half-made is left");
        assert_eq!(key_name("a").len(), 32);
        assert_ne!(key_name("a"), key_name("b"));
        assert_ne!(stamp(&path), "");
        assert_eq!(stamp(&dir.path().join("none")), "");
    }
}
