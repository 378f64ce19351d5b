//! A root of its own for a host command kiln starts inside a user
//! namespace (QEMU for a VM run): an empty read-only tmpfs with the host's
//! system directories read-only and exactly the paths the command needs,
//! at the same places, entered with `pivot_root`; the caller's home, `/tmp`,
//! `/var` and the rest of the store are not there. New IPC, UTS and (unless
//! the command needs the host's network) network namespaces.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{self as m, MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;

/// The host's directories a program needs to start and find its data
/// (read-only); `/dev` and `/proc` come as they are.
const SYSTEM: &[&str] = &[
    "/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc", "/sys",
];

/// Enters the walls: must run in a process that is root of its own user
/// namespace, before it executes the command. `paths` are shown at the
/// same places (writable or not), `tmpfs` directories get an empty tmpfs
/// each; `scratch` is an empty directory the new
/// root is built on (it ends up unreachable).
pub fn enter_walls(
    paths: &[(PathBuf, bool)],
    tmpfs: &[PathBuf],
    network: bool,
    scratch: &Path,
) -> io::Result<()> {
    let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
    if !network {
        flags |= UnshareFlags::NEWNET;
    }
    super::unshare(flags)?;
    let step = |what: String| move |e: rustix::io::Errno| io::Error::other(format!("{what}: {e}"));
    m::mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(step("make the mounts private".into()))?;
    fs::create_dir_all(scratch)?;
    let root = scratch;
    m::mount(
        "tmpfs",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        c"mode=0755",
    )
    .map_err(step(format!("mount a tmpfs on {}", root.display())))?;
    let inside = |host: &Path| root.join(host.strip_prefix("/").unwrap_or(host));
    let mut shown: Vec<PathBuf> = Vec::new();
    for dir in SYSTEM {
        let host = Path::new(dir);
        let Ok(meta) = fs::symlink_metadata(host) else {
            continue;
        };
        let at = inside(host);
        if meta.file_type().is_symlink() {
            // Merged /usr: /bin -> usr/bin stays a link.
            std::os::unix::fs::symlink(fs::read_link(host)?, &at)?;
            continue;
        }
        show(host, &at, false, true)?;
        shown.push(host.to_path_buf());
    }
    for dir in ["/dev", "/proc"] {
        let at = inside(Path::new(dir));
        fs::create_dir_all(&at)?;
        m::mount_bind_recursive(dir, &at).map_err(step(format!("bind {dir}")))?;
    }
    for (host, writable) in paths {
        // Already there under a system directory (read-only) and not to be
        // written: nothing to add.
        if !writable && shown.iter().any(|s| host.starts_with(s)) {
            continue;
        }
        let at = inside(host);
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::metadata(host)?.is_dir() {
            fs::create_dir_all(&at)?;
        } else if !at.exists() {
            fs::File::create(&at)?;
        }
        show(host, &at, *writable, false)?;
    }
    for dir in tmpfs {
        let at = inside(dir);
        fs::create_dir_all(&at)?;
        m::mount(
            "tmpfs",
            &at,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            c"mode=0755,size=1m",
        )
        .map_err(step(format!("mount a tmpfs on {}", dir.display())))?;
    }
    // Nothing more is made in the new root itself.
    m::mount_remount(
        root,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .map_err(step("make the new root read-only".into()))?;
    rustix::process::chdir(root).map_err(step("chdir to the new root".into()))?;
    rustix::process::pivot_root(".", ".").map_err(step("pivot_root".into()))?;
    // The old root is stacked under the new one at "/": detach it.
    m::unmount(".", UnmountFlags::DETACH).map_err(step("detach the old root".into()))?;
    rustix::process::chdir("/").map_err(step("chdir /".into()))?;
    Ok(())
}

/// Binds `host` at `at`, read-only unless `writable`, nosuid and nodev
/// either way, without touching flags the namespace locked. A path's own
/// mount only unless `recursive` (so the new root, built under the run
/// directory, is not shown inside itself), or when mounts the namespace
/// locked lie below it, which only a recursive bind may carry.
fn show(host: &Path, at: &Path, writable: bool, recursive: bool) -> io::Result<()> {
    if fs::metadata(host)?.is_dir() {
        fs::create_dir_all(at)?;
    }
    let bound = if recursive {
        m::mount_bind_recursive(host, at)
    } else {
        m::mount_bind(host, at).or_else(|e| match e {
            rustix::io::Errno::INVAL => m::mount_bind_recursive(host, at),
            e => Err(e),
        })
    };
    bound.map_err(|e| io::Error::other(format!("bind {}: {e}", host.display())))?;
    let mut attrs = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if !writable {
        attrs |= libc::MOUNT_ATTR_RDONLY;
    }
    super::set_mount_attrs_recursive(at, attrs)
        .map_err(|e| io::Error::other(format!("set the flags of {}: {e}", host.display())))
}
