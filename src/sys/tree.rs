//! Removing trees without following symlinks, one directory descriptor at
//! a time, so no removal ever leaves the directory it was given.

use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, FileType, Mode, OFlags, CWD};
use rustix::io::Errno;

/// Removes a directory tree an unpack created, making read-only
/// directories writable first.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::other("bad path"))?;
    let pfd = rfs::openat(
        CWD,
        parent,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    remove_at(&pfd, name.as_ref())
}

/// Removes `name` in `dir` (recursively for a directory), not following
/// symlinks. `name` must be one entry of `dir`: `""`, `.`, `..` and
/// anything with a `/` are refused, so no removal ever leaves `dir`.
pub(crate) fn remove_at(dir: &OwnedFd, name: &std::ffi::OsStr) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to remove {name:?}: not a name in the directory"),
        ));
    }
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
        Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            // Make it writable first: lower layers may have left it read-only.
            let _ = rfs::chmodat(dir, name, Mode::from_raw_mode(0o700), AtFlags::empty());
            let sub = rfs::openat(
                dir,
                name,
                OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            // Names as bytes: a sandbox may create names that are not UTF-8.
            let names: Vec<std::ffi::OsString> =
                fs::read_dir(format!("/proc/self/fd/{}", sub.as_fd().as_raw_fd()))?
                    .filter_map(Result::ok)
                    .map(|d| d.file_name())
                    .collect();
            for n in &names {
                remove_at(&sub, n.as_os_str())?;
            }
            rfs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(Into::into)
        }
        Ok(_) => rfs::unlinkat(dir, name, AtFlags::empty()).map_err(Into::into),
    }
}
