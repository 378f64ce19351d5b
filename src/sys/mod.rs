//! The only module with `unsafe` and raw syscalls.
//!
//! Everything here is a thin, documented wrapper that returns
//! [`std::io::Result`]; callers attach the path and the step to errors.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Lists the extended attribute names of `path` without following a final symlink.
///
/// File systems without xattr support give an empty list.
pub fn llistxattr(path: &Path) -> io::Result<Vec<Vec<u8>>> {
    let c = cstring(path)?;
    let mut buf: Vec<u8> = vec![0; 1024];
    loop {
        // SAFETY: `c` is a valid NUL-terminated string and `buf` is a writable buffer of
        // exactly `buf.len()` bytes; the kernel writes at most that many.
        let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            buf.truncate(n as usize);
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => {
                // SAFETY: as above, a size query with a NULL buffer writes nothing.
                let need = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
                if need < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf.resize(need as usize + 1, 0);
            }
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(err),
        }
    }
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Reads one extended attribute of `path` without following a final symlink.
pub fn lgetxattr(path: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let c = cstring(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    let mut buf: Vec<u8> = vec![0; 256];
    loop {
        // SAFETY: `c` and `n` are valid NUL-terminated strings; `buf` is writable for
        // `buf.len()` bytes and the kernel writes at most that many.
        let r =
            unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r >= 0 {
            buf.truncate(r as usize);
            return Ok(buf);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) {
            return Err(err);
        }
        // SAFETY: a size query with a NULL buffer writes nothing.
        let need = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
        if need < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.resize(need as usize + 1, 0);
    }
}

/// Splits a `st_rdev` into (major, minor) the way glibc does.
pub fn dev_major_minor(rdev: u64) -> (u32, u32) {
    (libc::major(rdev), libc::minor(rdev))
}
