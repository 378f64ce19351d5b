//! Unpack: image layers -> a root file system directory.
//!
//! Extraction is path-safe against hostile layers: every parent directory is
//! opened with `openat2(RESOLVE_IN_ROOT)`, so `..` and symlinks (absolute or
//! relative, from this layer or a lower one) resolve inside the root and can
//! never redirect a write to the host; the final component is created with
//! `*at` calls that do not follow it. OCI whiteouts (`.wh.NAME`) and opaque
//! directories (`.wh..wh..opq`) are applied.
//!
//! Rootless unpack (not root): owners that cannot be set are recorded in the
//! `user.rootlesscontainers` xattr (as umoci does), device nodes become empty
//! files, and `security.*`/`trusted.*` xattrs the kernel refuses are skipped;
//! all are counted in the [`UnpackReport`].

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read, Seek};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps, XattrFlags,
};
use rustix::io::Errno;

mod cache;
pub(crate) mod record;

pub use cache::{chain_id, CachedRootfs, RootfsDamage};

use crate::layer::{sparse, Entry, EntryKind, LayerError};
use crate::source::dir::{encode_rootless, ROOTLESS_XATTR};
use crate::store::{Store, StoreError};

/// Errors of unpacking, naming the layer, the entry and the step.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// A file system operation in the destination failed.
    #[error("unpack: {step} {path:?} (layer {layer}): {source}")]
    Io {
        /// What kiln was doing.
        step: &'static str,
        /// The entry path inside the root file system.
        path: String,
        /// The layer digest.
        layer: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The layer stream itself is bad (corrupt, truncated, unsafe path).
    #[error("unpack: layer {layer}: {source}")]
    Layer {
        /// The layer digest.
        layer: String,
        /// What went wrong reading it.
        #[source]
        source: LayerError,
    },
    /// The destination exists and is not empty.
    #[error("unpack: destination {} exists and is not empty", .0.display())]
    NotEmpty(PathBuf),
    /// A layer's content does not match the image config's diff_id.
    #[error("unpack: {0}")]
    Verify(String),
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Options of [`Store::unpack`].
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Record owners in `user.rootlesscontainers` instead of chown'ing.
    /// Default (`None`): rootless unless running as root.
    pub rootless: Option<bool>,
}

/// What an unpack did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UnpackReport {
    /// Layers applied.
    pub layers: usize,
    /// Entries created or replaced.
    pub entries: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Owners recorded in `user.rootlesscontainers` (rootless).
    pub rootless_owners: u64,
    /// Device nodes written as empty files (rootless).
    pub devices_as_files: u64,
    /// xattrs the kernel refused (rootless `security.*`/`trusted.*`).
    pub xattrs_skipped: u64,
}

pub(crate) fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

impl Store {
    /// Unpacks image `name` into `dest` (created; must be absent or empty).
    ///
    /// ```no_run
    /// let store = kiln::Store::open("/tmp/kiln-store")?;
    /// let report = store.unpack("busybox", "/tmp/rootfs".as_ref(), &Default::default())?;
    /// println!("{} entries", report.entries);
    /// # Ok::<(), kiln::unpack::UnpackError>(())
    /// ```
    pub fn unpack(
        &self,
        name: &str,
        dest: &Path,
        opts: &UnpackOptions,
    ) -> Result<UnpackReport, UnpackError> {
        let img = self.resolve(name)?;
        let io_err = |step, e| UnpackError::Io {
            step,
            path: dest.display().to_string(),
            layer: "-".into(),
            source: e,
        };
        if dest.exists() {
            let mut it = fs::read_dir(dest).map_err(|e| io_err("read destination", e))?;
            if it.next().is_some() {
                return Err(UnpackError::NotEmpty(dest.to_path_buf()));
            }
        } else {
            fs::create_dir_all(dest).map_err(|e| io_err("create destination", e))?;
        }
        let mut u = Unpacker::new(dest, opts.rootless.unwrap_or(!is_root()))
            .map_err(|e| io_err("open destination", e))?;
        for layer in img.manifest.layers() {
            let r = self.layer_reader(layer)?;
            u.apply_layer(r, layer.digest().as_ref())?;
        }
        u.finish()
    }
}

/// Applies layers, in order, to one root directory.
pub struct Unpacker {
    root: OwnedFd,
    rootless: bool,
    /// Create device nodes (real root only); otherwise they become empty
    /// files, as in a rootless unpack.
    devices: bool,
    /// Directory metadata applied at the end (children change mtimes, and a
    /// read-only directory must stay writable while layers are applied).
    dirs: HashMap<String, (u32, i64)>,
    layer: String,
    this_layer: HashSet<String>,
    report: UnpackReport,
}

impl Unpacker {
    /// Opens `root` (an existing directory) for unpacking.
    pub fn new(root: &Path, rootless: bool) -> io::Result<Unpacker> {
        let fd = rfs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Unpacker {
            root: fd,
            rootless,
            devices: true,
            dirs: HashMap::new(),
            layer: "-".into(),
            this_layer: HashSet::new(),
            report: UnpackReport::default(),
        })
    }

    /// Never creates device nodes: they become empty files (as a rootless
    /// unpack makes them). The rootfs cache is unpacked so: runs get their
    /// /dev from kiln, and a cached tree must hold nothing that opens a
    /// host device.
    pub fn without_devices(mut self) -> Unpacker {
        self.devices = false;
        self
    }

    fn err(&self, step: &'static str, path: &str, e: impl Into<io::Error>) -> UnpackError {
        UnpackError::Io {
            step,
            path: path.to_string(),
            layer: self.layer.clone(),
            source: e.into(),
        }
    }

    /// Opens a directory of the root, resolving symlinks and `..` inside it.
    fn open_dir(&self, path: &str) -> Result<OwnedFd, Errno> {
        open_in_root(&self.root, path)
    }

    /// Opens a directory, creating it and its missing parents (mode 0755),
    /// resolved inside the root (see [`ensure_dir_in_root`]).
    fn ensure_dir(&mut self, path: &str) -> Result<OwnedFd, UnpackError> {
        ensure_dir_in_root(&self.root, path).map_err(|(step, e)| self.err(step, path, e))
    }

    /// Applies one (uncompressed) layer tar stream.
    pub fn apply_layer(&mut self, r: impl Read, layer: &str) -> Result<(), UnpackError> {
        self.layer = layer.to_string();
        self.this_layer.clear();
        self.report.layers += 1;
        let mut failure: Option<UnpackError> = None;
        let res = crate::source::tarball::walk(r, layer, &mut |e, data, _pos| {
            if let Err(err) = self.entry(e, data) {
                failure = Some(err);
                return Err(LayerError::Archive {
                    path: layer.to_string(),
                    reason: "stopped".into(),
                });
            }
            Ok(())
        });
        if let Some(f) = failure {
            return Err(f);
        }
        res.map_err(|source| UnpackError::Layer {
            layer: layer.to_string(),
            source,
        })
    }

    /// Applies one entry (as a layer would).
    pub(crate) fn entry(&mut self, e: Entry, data: &mut dyn Read) -> Result<(), UnpackError> {
        if e.path.is_empty() {
            // The root itself: only its metadata.
            if e.kind == EntryKind::Dir {
                self.dirs.insert(String::new(), (e.mode, e.mtime));
            }
            return Ok(());
        }
        let (parent, name) = split(&e.path);
        if let Some(target) = name.strip_prefix(".wh.") {
            // Every tar stream is checked when read; entries from elsewhere
            // (a copied tree) are checked here.
            crate::layer::check_whiteout(&e.path).map_err(|err| {
                self.err(
                    "apply whiteout",
                    &e.path,
                    io::Error::new(io::ErrorKind::InvalidData, err.to_string()),
                )
            })?;
            self.report.whiteouts += 1;
            let pfd = self.ensure_dir(parent)?;
            if target == ".wh..opq" {
                return self.opaque(&pfd, parent);
            }
            return remove_at(&pfd, target.as_ref())
                .map_err(|err| self.err("apply whiteout", &e.path, err));
        }
        let pfd = self.ensure_dir(parent)?;
        // Replace what a lower layer (or an earlier entry) left there, except
        // that a directory over a directory merges.
        match rfs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if !(is_dir && e.kind == EntryKind::Dir) {
                    remove_at(&pfd, name.as_ref())
                        .map_err(|err| self.err("replace", &e.path, err))?;
                }
            }
            Err(Errno::NOENT) => {}
            Err(err) => return Err(self.err("stat", &e.path, err)),
        }
        self.this_layer.insert(e.path.clone());
        self.report.entries += 1;
        match e.kind {
            EntryKind::Dir => {
                match rfs::mkdirat(&pfd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(err) => return Err(self.err("mkdir", &e.path, err)),
                }
                self.dirs.insert(e.path.clone(), (e.mode, e.mtime));
            }
            EntryKind::File => {
                let fd =
                    create_new(&pfd, name).map_err(|err| self.err("create file", &e.path, err))?;
                let mut f = fs::File::from(fd);
                let short =
                    || io::Error::new(io::ErrorKind::UnexpectedEof, "layer ended inside the file");
                match &e.sparse {
                    None => {
                        let n = io::copy(&mut data.take(e.size), &mut f)
                            .map_err(|err| self.err("write file", &e.path, err))?;
                        if n != e.size {
                            return Err(self.err("write file", &e.path, short()));
                        }
                    }
                    Some(map) => {
                        // Only the data segments are written: the holes
                        // between them and after the last stay holes.
                        sparse::check(map, e.size).map_err(|m| {
                            self.err(
                                "write sparse file",
                                &e.path,
                                io::Error::new(io::ErrorKind::InvalidData, m),
                            )
                        })?;
                        for (off, len) in sparse::normalize(map) {
                            f.seek(io::SeekFrom::Start(off))
                                .map_err(|err| self.err("write sparse file", &e.path, err))?;
                            let n = io::copy(&mut (&mut *data).take(len), &mut f)
                                .map_err(|err| self.err("write sparse file", &e.path, err))?;
                            if n != len {
                                return Err(self.err("write sparse file", &e.path, short()));
                            }
                        }
                        f.set_len(e.size)
                            .map_err(|err| self.err("write sparse file", &e.path, err))?;
                    }
                }
            }
            EntryKind::Symlink => {
                let target = e.link.clone().unwrap_or_default();
                rfs::symlinkat(target.as_slice(), &pfd, name)
                    .map_err(|err| self.err("symlink", &e.path, err))?;
            }
            EntryKind::Hardlink => {
                let raw = e.link.clone().unwrap_or_default();
                let (target, _) = crate::layer::normalize_path(&raw).map_err(|err| {
                    self.err("hardlink", &e.path, io::Error::other(err.to_string()))
                })?;
                let (tparent, tname) = split(&target);
                let tfd = self
                    .open_dir(tparent)
                    .map_err(|err| self.err("resolve hardlink target", &target, err))?;
                rfs::linkat(&tfd, tname, &pfd, name, AtFlags::empty())
                    .map_err(|err| self.err("hardlink", &e.path, err))?;
                // The link shares the target's inode and metadata.
                return Ok(());
            }
            EntryKind::Char | EntryKind::Block | EntryKind::Fifo => {
                let ft = match e.kind {
                    EntryKind::Char => FileType::CharacterDevice,
                    EntryKind::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let dev = rfs::makedev(e.dev_major, e.dev_minor);
                let made = if self.devices || e.kind == EntryKind::Fifo {
                    rfs::mknodat(&pfd, name, ft, Mode::from_raw_mode(0o600), dev)
                } else {
                    Err(Errno::PERM)
                };
                match made {
                    Ok(()) => {}
                    Err(Errno::PERM) if e.kind != EntryKind::Fifo => {
                        // Only real root may create devices (not root of a
                        // user namespace): leave an empty file (as umoci does).
                        let fd = create_new(&pfd, name)
                            .map_err(|err| self.err("create device placeholder", &e.path, err))?;
                        drop(fd);
                        self.report.devices_as_files += 1;
                    }
                    Err(err) => return Err(self.err("mknod", &e.path, err)),
                }
            }
        }
        self.metadata(&pfd, name, &e)
    }

    fn metadata(&mut self, pfd: &OwnedFd, name: &str, e: &Entry) -> Result<(), UnpackError> {
        let is_link = e.kind == EntryKind::Symlink;
        let proc_path = format!("/proc/self/fd/{}/{name}", pfd.as_raw_fd());
        let mut record = self.rootless;
        if !self.rootless {
            let uid = rustix::fs::Uid::from_raw(u32::try_from(e.uid).unwrap_or(u32::MAX));
            let gid = rustix::fs::Gid::from_raw(u32::try_from(e.gid).unwrap_or(u32::MAX));
            match rfs::chownat(pfd, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) => {}
                // Inside a subid mapping, ids beyond the range cannot be
                // owners: record them as a rootless unpack would.
                Err(Errno::INVAL) => record = true,
                Err(err) => return Err(self.err("chown", &e.path, err)),
            }
        }
        if record && (e.uid, e.gid) != (0, 0) && !is_link {
            let (u, g) = (
                u32::try_from(e.uid).unwrap_or(u32::MAX),
                u32::try_from(e.gid).unwrap_or(u32::MAX),
            );
            rfs::lsetxattr(
                proc_path.as_str(),
                ROOTLESS_XATTR,
                &encode_rootless(u, g),
                XattrFlags::empty(),
            )
            .map_err(|err| self.err("record owner (user.rootlesscontainers)", &e.path, err))?;
            self.report.rootless_owners += 1;
        }
        for (k, v) in &e.xattrs {
            if is_link && k.starts_with("user.") {
                continue;
            }
            match rfs::lsetxattr(proc_path.as_str(), k.as_str(), v, XattrFlags::empty()) {
                Ok(()) => {}
                Err(Errno::PERM | Errno::NOTSUP | Errno::ACCESS)
                    if (self.rootless || in_userns()) && !k.starts_with("user.") =>
                {
                    self.report.xattrs_skipped += 1
                }
                Err(err) => return Err(self.err("set xattr", &e.path, err)),
            }
        }
        if e.kind == EntryKind::Dir {
            return Ok(());
        }
        if !is_link {
            // After chown, which clears setuid/setgid.
            rfs::chmodat(
                pfd,
                name,
                Mode::from_raw_mode(e.mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(|err| self.err("chmod", &e.path, err))?;
        }
        set_mtime(pfd, name, e.mtime).map_err(|err| self.err("set mtime", &e.path, err))
    }

    /// `.wh..wh..opq`: hide what lower layers put in `dir`.
    fn opaque(&self, pfd: &OwnedFd, dir: &str) -> Result<(), UnpackError> {
        let listing = fs::read_dir(format!("/proc/self/fd/{}", pfd.as_raw_fd()))
            .map_err(|e| self.err("read opaque directory", dir, e))?;
        for ent in listing {
            let ent = ent.map_err(|e| self.err("read opaque directory", dir, e))?;
            let raw = ent.file_name();
            let Some(n) = raw.to_str().map(str::to_string) else {
                // Not UTF-8, so not from this layer (its paths are strings):
                // hidden like every other lower entry.
                remove_at(pfd, raw.as_os_str())
                    .map_err(|e| self.err("apply opaque whiteout", dir, e))?;
                continue;
            };
            let child = if dir.is_empty() {
                n.clone()
            } else {
                format!("{dir}/{n}")
            };
            if !self.this_layer.contains(&child) {
                remove_at(pfd, n.as_ref())
                    .map_err(|e| self.err("apply opaque whiteout", &child, e))?;
            }
        }
        Ok(())
    }

    /// Applies deferred directory modes and mtimes, deepest first.
    pub fn finish(mut self) -> Result<UnpackReport, UnpackError> {
        let mut dirs: Vec<(String, (u32, i64))> = self.dirs.drain().collect();
        dirs.sort_by(|a, b| {
            b.0.matches('/')
                .count()
                .cmp(&a.0.matches('/').count())
                .then(b.0.cmp(&a.0))
        });
        for (path, (mode, mtime)) in dirs {
            let (parent, name) = if path.is_empty() {
                ("", ".")
            } else {
                split(&path)
            };
            let Ok(pfd) = self.open_dir(parent) else {
                continue;
            };
            // A whiteout may have removed it since.
            if rfs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW).is_err() {
                continue;
            }
            rfs::chmodat(
                &pfd,
                name,
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(|e| self.err("chmod directory", &path, e))?;
            set_mtime(&pfd, name, mtime).map_err(|e| self.err("set directory mtime", &path, e))?;
        }
        Ok(self.report)
    }
}

fn set_mtime(pfd: &OwnedFd, name: &str, mtime: i64) -> Result<(), Errno> {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    rfs::utimensat(
        pfd,
        name,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
}

/// Opens directory `path` of the tree at `root`, creating it and its
/// missing parents (mode 0755).
///
/// Missing directories are created where the path resolves *inside the
/// root*: symlinks met on the way are followed by hand (absolute ones
/// from the root, `..` never above it), like a chroot'ed `mkdir -p`.
pub fn ensure_dir_in_root(root: &OwnedFd, path: &str) -> Result<OwnedFd, (&'static str, Errno)> {
    match open_in_root(root, path) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(("open parent directory", e)),
    }
    let mut todo: std::collections::VecDeque<String> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    let mut done: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = todo.pop_front() {
        match c.as_str() {
            "." => continue,
            ".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        // `done` holds no symlinks, so this resolves without surprises.
        let cur = open_in_root(root, &done.join("/")).map_err(|e| ("open parent directory", e))?;
        match rfs::statat(&cur, c.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => done.push(c),
                FileType::Symlink => {
                    links += 1;
                    if links > 40 {
                        return Err(("resolve parent directory", Errno::LOOP));
                    }
                    let target = rfs::readlinkat(&cur, c.as_str(), Vec::new())
                        .map_err(|e| ("readlink", e))?;
                    let target = target.to_string_lossy().into_owned();
                    if target.starts_with('/') {
                        done.clear();
                    }
                    for comp in target.split('/').filter(|x| !x.is_empty()).rev() {
                        todo.push_front(comp.to_string());
                    }
                }
                _ => return Err(("create parent directory", Errno::NOTDIR)),
            },
            Err(Errno::NOENT) => {
                match rfs::mkdirat(&cur, c.as_str(), Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(("create parent directory", e)),
                }
                done.push(c);
            }
            Err(e) => return Err(("stat parent directory", e)),
        }
    }
    open_in_root(root, &done.join("/")).map_err(|e| ("open parent directory", e))
}

/// Opens a directory of the tree at `root`, resolving symlinks and `..`
/// inside it (`openat2(RESOLVE_IN_ROOT)`).
pub fn open_in_root(root: &OwnedFd, path: &str) -> Result<OwnedFd, Errno> {
    let p = if path.is_empty() { "." } else { path };
    rfs::openat2(
        root,
        p,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Creates a new regular file (mode 0600 until metadata is applied),
/// never following or reusing what is there.
fn create_new(dir: &OwnedFd, name: &str) -> Result<OwnedFd, Errno> {
    let flags = OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rfs::openat(dir, name, flags, Mode::from_raw_mode(0o600))
}

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Whether this process is in a user namespace other than the initial one
/// (root there may not set `trusted.*` xattrs, for example).
fn in_userns() -> bool {
    fs::read_to_string("/proc/self/uid_map")
        .map(|m| m.split_whitespace().collect::<Vec<_>>() != ["0", "0", "4294967295"])
        .unwrap_or(false)
}

use crate::sys::tree::remove_at;
pub use crate::sys::tree::remove_tree;
