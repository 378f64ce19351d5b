//! The image store: an [OCI image layout](https://github.com/opencontainers/image-spec/blob/main/image-layout.md).
//!
//! ```text
//! STORE/oci-layout            {"imageLayoutVersion":"1.0.0"}
//! STORE/index.json            one manifest descriptor per tag, tagged with
//!                             the org.opencontainers.image.ref.name annotation
//! STORE/blobs/sha256/<hex>    content-addressed, read-only blobs
//! STORE/.kiln/                kiln's private part, mode 0700 (it holds unpacked
//!                             images with their setuid files): tmp/ (writes in
//!                             progress), locks/ (index.lock, gc.lock), rootfs/
//!                             (the unpack cache), runs/ (run directories)
//! ```
//!
//! skopeo (`oci:STORE:NAME`), umoci (`--image STORE:NAME`) and podman read it as is.
//!
//! A store is used only when the caller owns it and no other user can
//! change it (the store directory and `.kiln` not group- or
//! world-writable), and none of its directories is a symlink: root must
//! not follow a directory another user swapped for a symlink into a
//! delete or an unpack elsewhere. [`StoreOptions::trust_owner`] accepts
//! a store of another user (as git's `safe.directory` does); symlinks are
//! refused even then.

mod blob;
mod export;
mod refs;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
};
use serde::Serialize;

pub(crate) use blob::sync_dir;
pub use blob::{BlobWriter, VerifiedReader};
pub use export::ExportFormat;
pub(crate) use refs::ref_name;
pub use refs::{ImageName, REF_NAME_ANNOTATION};

pub use crate::layer::MAX_JSON_SIZE;

/// The file in a run directory naming the manifest the run uses: while the
/// run lives (its directory is locked) gc keeps that image's blobs.
pub(crate) const PIN_FILE: &str = "image";

/// The format of kiln's private part (`.kiln/version`). A store made by a
/// newer kiln with another format is refused rather than damaged.
const KILN_FORMAT: u32 = 1;

/// Errors of the image store. Each names the step and the path it failed on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file system operation on the store failed.
    #[error("store: {op} {}: {source}", path.display())]
    Io {
        /// What kiln was doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// There is no store at the path (and the caller asked not to create one).
    #[error("store: no store at {}: {reason}", path.display())]
    NoStore {
        /// The path.
        path: PathBuf,
        /// Why it is not a store.
        reason: String,
    },
    /// No store location could be derived from the environment.
    #[error(
        "store: no store path: set KILN_HOME, XDG_DATA_HOME or HOME, or use {}",
        crate::words::Opt::Store
    )]
    NoDefaultPath,
    /// The store belongs to another user, another user can change it, or
    /// one of its directories is a symlink.
    #[error("store: {}: {reason}", path.display())]
    Untrusted {
        /// The directory concerned.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// The directory exists but is not an OCI image layout.
    #[error("store: {} is not an OCI image layout: {reason}", path.display())]
    NotALayout {
        /// The directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Content did not hash to the digest that names it.
    #[error("store: digest mismatch in {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        /// Which blob or stream.
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// A blob is referenced but absent.
    #[error("store: blob {0} is missing")]
    BlobMissing(String),
    /// A JSON document in the store is malformed.
    #[error("store: {what} {}: {reason}", path.display())]
    BadDocument {
        /// Which document.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The parse error.
        reason: String,
    },
    /// The image name is not valid.
    #[error("store: invalid image name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// No image has that name.
    #[error("store: no image named {0}")]
    ImageNotFound(String),
    /// gc cannot tell what a tag references: its document is missing or
    /// corrupt, so deleting anything might delete what it needs.
    #[error("store: gc stopped: {root} cannot be read ({reason}); remove it with `kiln rm` (or restore the blob) and run gc again")]
    Unreachable {
        /// The tag (or pinned run) whose graph is broken.
        root: String,
        /// The read error.
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An open image store.
///
/// ```no_run
/// let store = kiln::Store::open("/tmp/kiln-store")?;
/// for img in store.images()? {
///     println!("{} {}", img.name, img.digest);
/// }
/// # Ok::<(), kiln::store::StoreError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A held store lock; released on drop.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// One tagged image, as listed by [`Store::images`].
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    /// `name:tag`.
    pub name: String,
    /// Manifest digest.
    pub digest: String,
    /// Sum of the manifest, config and compressed layer sizes.
    pub size: u64,
    /// Number of layers.
    pub layers: usize,
    /// The config's `created` time, if set.
    pub created: Option<String>,
    /// Why the image cannot be used (its manifest or config is missing or
    /// corrupt), if so; size and layers are then what could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken: Option<String>,
}

/// A resolved image: its manifest and config.
#[derive(Debug, Clone)]
pub struct Image {
    /// The name it was resolved from.
    pub name: String,
    /// The manifest's descriptor in index.json.
    pub descriptor: Descriptor,
    /// The parsed manifest.
    pub manifest: ImageManifest,
    /// The parsed config.
    pub config: ImageConfiguration,
    /// The config blob's raw bytes (kept so exports keep its digest).
    pub config_bytes: Vec<u8>,
}

/// What [`Store::gc`] removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Blobs deleted.
    pub blobs_removed: u64,
    /// Bytes freed by deleted blobs.
    pub bytes_freed: u64,
    /// Stale temp files removed.
    pub temp_removed: u64,
    /// Cached root file systems of images no longer in the store removed.
    pub rootfs_removed: u64,
    /// Run directories of dead runs (kiln was killed) removed.
    pub runs_removed: u64,
}

/// One problem found by [`Store::fsck`].
#[derive(Debug, Clone, Serialize)]
pub struct FsckProblem {
    /// The blob or tag concerned.
    pub what: String,
    /// What is wrong.
    pub problem: String,
}

/// How [`Store::open_with`] opens a store.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Use a store that another user owns or can change (for example a
    /// CI group's shared store): that user can then change what kiln
    /// unpacks and runs. Default false. Symlinked store directories are
    /// refused regardless.
    pub trust_owner: bool,
    /// Fail with [`StoreError::NoStore`] instead of creating a store when
    /// there is none at the path (what reading commands want: a mistyped
    /// path must not become an empty store). Default false.
    pub must_exist: bool,
}

/// Checks a store directory: a real directory (not a symlink), owned by
/// the caller and not writable by others unless `trust_owner`; a private
/// one (`.kiln/...`) is made mode 0700 when it is the caller's.
fn check_dir(path: &Path, trust_owner: bool, private: bool) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let untrusted = |reason: String| StoreError::Untrusted {
        path: path.to_path_buf(),
        reason,
    };
    // The store directory itself may be reached through a symlink the
    // caller chose; what is inside may not.
    let meta = if private
        || path
            .file_name()
            .is_some_and(|n| n == "blobs" || n == "sha256")
    {
        fs::symlink_metadata(path)
    } else {
        fs::metadata(path)
    }
    .map_err(|e| StoreError::io("inspect", path, e))?;
    if meta.file_type().is_symlink() {
        return Err(untrusted(
            "is a symlink: a store's directories must be real directories (someone may have swapped it)".into(),
        ));
    }
    if !meta.is_dir() {
        return Err(untrusted("is not a directory".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    let hint = format!("kiln uses only stores no other user can change (use {}, or set KILN_TRUST_STORE=1, to use it anyway if you trust them)", crate::words::Opt::TrustStore);
    if meta.uid() != me && !trust_owner {
        let owner =
            crate::sys::user_name(meta.uid()).unwrap_or_else(|| format!("uid {}", meta.uid()));
        return Err(untrusted(format!(
            "is owned by {owner}, not by you: {hint}"
        )));
    }
    // World-writable without the sticky bit: anyone may swap what is in
    // it. (Group-writable is a user-private-group umask as often as a
    // shared group, so it is left to the owner.)
    let world_writable = meta.mode() & 0o002 != 0 && meta.mode() & 0o1000 == 0;
    if world_writable && !trust_owner && !(private && meta.uid() == me) {
        return Err(untrusted(format!(
            "is writable by every user (mode {:o}): {hint}",
            meta.mode() & 0o7777
        )));
    }
    if private && meta.uid() == me && meta.mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .map_err(|e| StoreError::io("make private (chmod 0700)", path, e))?;
    }
    Ok(())
}

impl Store {
    /// The default store location: `$KILN_HOME`, else `$XDG_DATA_HOME/kiln`,
    /// else `~/.local/share/kiln`.
    pub fn default_path() -> Result<PathBuf, StoreError> {
        let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        if let Some(p) = nonempty("KILN_HOME") {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = nonempty("XDG_DATA_HOME") {
            return Ok(PathBuf::from(p).join("kiln"));
        }
        if let Some(p) = nonempty("HOME") {
            return Ok(PathBuf::from(p).join(".local/share/kiln"));
        }
        Err(StoreError::NoDefaultPath)
    }

    /// Opens the store at `root`, creating an empty layout if the directory
    /// does not exist or is empty. The caller must own the store (see the
    /// module documentation); [`Store::open_with`] can trust another owner.
    pub fn open(root: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(root, &StoreOptions::default())
    }

    /// [`Store::open`] with options.
    ///
    /// ```no_run
    /// use kiln::store::{Store, StoreOptions};
    /// // A CI group's shared store, owned by the `ci` user.
    /// let opts = StoreOptions { trust_owner: true, ..Default::default() };
    /// let store = Store::open_with("/srv/kiln", &opts)?;
    /// # Ok::<(), kiln::store::StoreError>(())
    /// ```
    pub fn open_with(root: impl AsRef<Path>, opts: &StoreOptions) -> Result<Store, StoreError> {
        let root = root.as_ref().to_path_buf();
        if let Ok(m) = fs::symlink_metadata(&root) {
            if m.file_type().is_symlink() && fs::metadata(&root).is_err() {
                let target = fs::read_link(&root).unwrap_or_default();
                return Err(StoreError::Untrusted {
                    path: root,
                    reason: format!(
                        "is a symlink to {}, which does not exist: create that directory or point the symlink elsewhere",
                        target.display()
                    ),
                });
            }
        }
        if let Ok(m) = fs::metadata(&root) {
            if !m.is_dir() {
                return Err(StoreError::Untrusted {
                    path: root,
                    reason: "is not a directory".into(),
                });
            }
        }
        // Someone else's directory is refused as such, store or not.
        let existed = root.is_dir();
        if existed {
            check_dir(&root, opts.trust_owner, false)?;
        }
        if opts.must_exist && !root.join("oci-layout").exists() {
            // Say why: missing, unreadable, or something else.
            let reason = match fs::metadata(&root) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => "it does not exist".to_string(),
                Err(e) => format!("cannot reach it: {e}"),
                Ok(_) => match fs::read_dir(&root).map(|mut it| it.next().is_none()) {
                    Err(e) => format!("cannot read it: {e}"),
                    Ok(true) => "it is an empty directory".to_string(),
                    Ok(false) => "it holds no oci-layout file".to_string(),
                },
            };
            return Err(StoreError::NoStore { path: root, reason });
        }
        let fresh = !root.exists();
        fs::create_dir_all(&root)
            .map_err(|e| StoreError::io("create store directory", &root, e))?;
        if fresh {
            if let Some(p) = root.parent() {
                let _ = sync_dir(if p.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    p
                });
            }
        }
        if !existed {
            check_dir(&root, opts.trust_owner, false)?;
        }
        let store = Store { root };
        // kiln's private part first (mode 0700), checked before anything
        // in it is used.
        store.private_dirs(opts.trust_owner)?;
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            // Several processes may open a new store at once: decide whether
            // the directory is ours to initialize under the index lock, and
            // re-check after taking it.
            let locks = store.locks_dir();
            fs::create_dir_all(&locks)
                .map_err(|e| StoreError::io("create directory", &locks, e))?;
            let _g = store.lock_index()?;
            if !layout.exists() {
                let has_other = fs::read_dir(&store.root)
                    .map_err(|e| StoreError::io("read store directory", &store.root, e))?
                    .filter_map(Result::ok)
                    .any(|e| e.file_name() != ".kiln");
                if has_other && !store.root.join("index.json").exists() {
                    return Err(StoreError::NotALayout {
                        path: store.root.clone(),
                        reason: "it is neither empty nor holds an oci-layout file".into(),
                    });
                }
                for d in [store.blobs_dir(), store.tmp_dir()] {
                    fs::create_dir_all(&d)
                        .map_err(|e| StoreError::io("create directory", &d, e))?;
                }
                // The new directories survive a power cut with the files
                // that will be renamed into them.
                for d in [
                    store.root.join("blobs"),
                    store.root.join(".kiln"),
                    store.root.clone(),
                ] {
                    sync_dir(&d)?;
                }
                if !store.root.join("index.json").exists() {
                    store.write_index(&empty_index())?;
                }
                // Written last: its presence means the layout is complete.
                store.write_small_file(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            }
        }
        store.check_layout_version()?;
        for d in [store.root.join("blobs"), store.blobs_dir()] {
            fs::create_dir_all(&d).map_err(|e| StoreError::io("create directory", &d, e))?;
            check_dir(&d, opts.trust_owner, false)?;
        }
        store.check_kiln_format()?;
        Ok(store)
    }

    /// `oci-layout` must say version 1.0.x (as umoci requires): another
    /// version may lay blobs out differently, and kiln would damage it.
    fn check_layout_version(&self) -> Result<(), StoreError> {
        let path = self.root.join("oci-layout");
        let bad = |reason: String| StoreError::NotALayout {
            path: self.root.clone(),
            reason,
        };
        let data = fs::read(&path).map_err(|e| StoreError::io("read", &path, e))?;
        let v: serde_json::Value = serde_json::from_slice(&data)
            .map_err(|e| bad(format!("oci-layout is not JSON: {e}")))?;
        match v.get("imageLayoutVersion").and_then(|x| x.as_str()) {
            Some(ver) if ver == "1.0.0" || ver.starts_with("1.0.") => Ok(()),
            Some(ver) => Err(bad(format!(
                "oci-layout says imageLayoutVersion {ver:?}; kiln reads 1.0.x"
            ))),
            None => Err(bad("oci-layout has no imageLayoutVersion".into())),
        }
    }

    /// `.kiln/version` holds the format of kiln's private part; written when
    /// absent, refused when newer than this kiln's.
    fn check_kiln_format(&self) -> Result<(), StoreError> {
        let path = self.root.join(".kiln/version");
        match fs::read_to_string(&path) {
            Ok(s) => match s.trim().parse::<u32>() {
                Ok(v) if v <= KILN_FORMAT => Ok(()),
                _ => Err(StoreError::NotALayout {
                    path: self.root.clone(),
                    reason: format!(
                        "its .kiln/version is {:?}: a newer kiln made it (this one knows format {KILN_FORMAT}); use that kiln",
                        s.trim()
                    ),
                }),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.write_small_file(&path, format!("{KILN_FORMAT}\n").as_bytes())
            }
            Err(e) => Err(StoreError::io("read", &path, e)),
        }
    }

    /// Creates `.kiln` and its directories with mode 0700, checks each
    /// (not a symlink, ours unless trusted) and makes an older store's
    /// ones private too.
    fn private_dirs(&self, trust_owner: bool) -> Result<(), StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        let base = self.root.join(".kiln");
        for d in [
            base.clone(),
            self.tmp_dir(),
            self.locks_dir(),
            base.join("rootfs"),
            base.join("runs"),
        ] {
            match fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::io("create directory", &d, e)),
            }
            check_dir(&d, trust_owner, true)?;
        }
        Ok(())
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join(".kiln/tmp")
    }
    fn locks_dir(&self) -> PathBuf {
        self.root.join(".kiln/locks")
    }

    /// Path of a blob (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs_dir().join(digest.digest())
    }

    /// Whether a blob is present (not verified).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// Starts writing a new blob. See [`BlobWriter`].
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        BlobWriter::new(self)
    }

    /// Writes a whole blob from memory.
    pub fn put_blob(&self, data: &[u8]) -> Result<(Digest, u64), StoreError> {
        let mut w = self.blob_writer()?;
        io::Write::write_all(&mut w, data)
            .map_err(|e| StoreError::io("write blob", &self.tmp_dir(), e))?;
        w.commit()
    }

    /// Opens a blob for streaming; the reader fails at the end if the content
    /// does not match `digest` (or `size`, when given).
    pub fn open_blob(
        &self,
        digest: &Digest,
        size: Option<u64>,
    ) -> Result<VerifiedReader<io::BufReader<File>>, StoreError> {
        let path = self.blob_path(digest);
        let f = File::open(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::BlobMissing(digest.to_string())
            } else {
                StoreError::io("open blob", &path, e)
            }
        })?;
        Ok(VerifiedReader::new(
            io::BufReader::with_capacity(1 << 20, f),
            digest.clone(),
            size,
            path,
        ))
    }

    /// Reads a small blob (at most [`MAX_JSON_SIZE`]) fully, verifying it.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        let mut r = self.open_blob(digest, None)?;
        let mut buf = Vec::new();
        (&mut r)
            .take(MAX_JSON_SIZE + 1)
            .read_to_end(&mut buf)
            .map_err(|e| StoreError::io("read blob", &path, e))?;
        if buf.len() as u64 > MAX_JSON_SIZE {
            return Err(StoreError::BadDocument {
                what: "blob",
                path,
                reason: "larger than 16 MiB".into(),
            });
        }
        // Reach EOF through the verifying reader so the digest is checked.
        let mut rest = [0u8; 1];
        r.read(&mut rest)
            .map_err(|e| StoreError::io("read blob", &path, e))?;
        Ok(buf)
    }

    fn lock(&self, name: &str, exclusive: bool) -> Result<StoreLock, StoreError> {
        let path = self.locks_dir().join(name);
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open lock file", &path, e))?;
        let r = if exclusive { f.lock() } else { f.lock_shared() };
        r.map_err(|e| StoreError::io("lock", &path, e))?;
        Ok(StoreLock { _file: f })
    }

    /// An exclusive lock on `.kiln/locks/NAME`.
    pub(crate) fn named_lock(&self, name: &str) -> Result<StoreLock, StoreError> {
        self.lock(name, true)
    }

    /// Serializes index.json updates between processes.
    fn lock_index(&self) -> Result<StoreLock, StoreError> {
        self.lock("index.lock", true)
    }

    /// Held (shared) by every operation that writes blobs before it
    /// references them, so `gc` (which takes it exclusively) never deletes a
    /// blob an import is about to tag.
    pub fn writer_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock("gc.lock", false)
    }

    /// Writes `path` atomically: a temp file in `.kiln/tmp` (which gc
    /// empties, so a crash leaks nothing), fsynced, renamed into place.
    /// Once renamed the file is in place: a failing directory fsync after
    /// that is a warning, not an error.
    fn write_small_file(&self, path: &Path, data: &[u8]) -> Result<(), StoreError> {
        let dir = path.parent().unwrap_or(&self.root);
        let tmp_dir = self.tmp_dir();
        let mut tmp = tempfile::NamedTempFile::with_prefix_in("small-", &tmp_dir)
            .map_err(|e| StoreError::io("create temp file", &tmp_dir, e))?;
        io::Write::write_all(&mut tmp, data).map_err(|e| StoreError::io("write", path, e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| StoreError::io("fsync", path, e))?;
        let perm = <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
        fs::set_permissions(tmp.path(), perm).map_err(|e| StoreError::io("chmod", path, e))?;
        tmp.persist(path)
            .map_err(|e| StoreError::io("rename into place", path, e.error))?;
        if let Err(e) = sync_dir(dir) {
            tracing::warn!(
                "{} was written, but {e}: the change may not survive a power cut",
                path.display()
            );
        }
        Ok(())
    }

    /// Reads index.json.
    pub fn read_index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.root.join("index.json");
        let data = fs::read(&path).map_err(|e| StoreError::io("read", &path, e))?;
        serde_json::from_slice(&data).map_err(|e| StoreError::BadDocument {
            what: "index.json",
            path,
            reason: e.to_string(),
        })
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), StoreError> {
        let data = canonical_json(index)?;
        self.write_small_file(&self.root.join("index.json"), &data)
    }

    /// Runs `f` on index.json under the index lock and writes the result back
    /// atomically.
    pub(crate) fn update_index<T>(
        &self,
        f: impl FnOnce(&mut ImageIndex) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _g = self.lock_index()?;
        let mut index = self.read_index()?;
        let out = f(&mut index)?;
        self.write_index(&index)?;
        Ok(out)
    }

    /// Points `name` at the manifest `descriptor` (which must already be in the
    /// store), replacing whatever the name pointed at.
    pub fn set_tag(&self, name: &ImageName, descriptor: &Descriptor) -> Result<(), StoreError> {
        let mut desc = descriptor.clone();
        let mut ann = desc.annotations().clone().unwrap_or_default();
        ann.insert(REF_NAME_ANNOTATION.to_string(), name.to_string());
        desc.set_annotations(Some(ann));
        self.update_index(|index| {
            let mut manifests: Vec<Descriptor> = index
                .manifests()
                .iter()
                .filter(|d| refs::ref_name(d) != Some(name.as_str()))
                .cloned()
                .collect();
            manifests.push(desc);
            manifests.sort_by(|a, b| refs::ref_name(a).cmp(&refs::ref_name(b)));
            index.set_manifests(manifests);
            Ok(())
        })
    }

    /// Resolves an image name (`name`, `name:tag`) or a manifest digest
    /// (`sha256:...`, or a unique prefix of at least 12 hex digits).
    pub fn resolve(&self, name: &str) -> Result<Image, StoreError> {
        let index = self.read_index()?;
        let desc = self.find_descriptor(&index, name)?;
        let name = refs::ref_name(&desc).unwrap_or(name).to_string();
        self.image_of(desc, name)
    }

    /// The image whose manifest blob is `digest` (`sha256:...`), whether or
    /// not a tag names it.
    pub(crate) fn image_of_manifest(&self, digest: &str) -> Result<Image, StoreError> {
        let d: Digest = digest.parse().map_err(|_| StoreError::InvalidName {
            name: digest.into(),
            reason: "not a digest",
        })?;
        let path = self.blob_path(&d);
        let size = fs::metadata(&path)
            .map_err(|_| StoreError::BlobMissing(d.to_string()))?
            .len();
        self.image_of(
            Descriptor::new(MediaType::ImageManifest, size, d),
            digest.to_string(),
        )
    }

    fn image_of(&self, desc: Descriptor, name: String) -> Result<Image, StoreError> {
        let manifest_bytes = self.read_blob(desc.digest())?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| StoreError::BadDocument {
                what: "manifest",
                path: self.blob_path(desc.digest()),
                reason: e.to_string(),
            })?;
        let config_bytes = self.read_blob(manifest.config().digest())?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| StoreError::BadDocument {
                what: "config",
                path: self.blob_path(manifest.config().digest()),
                reason: e.to_string(),
            })?;
        Ok(Image {
            name,
            descriptor: desc,
            manifest,
            config,
            config_bytes,
        })
    }

    fn find_descriptor(&self, index: &ImageIndex, name: &str) -> Result<Descriptor, StoreError> {
        let by_name = |n: &str| {
            index
                .manifests()
                .iter()
                .find(|d| refs::ref_name(d) == Some(n))
                .cloned()
        };
        // An exact name first: kiln's NAME:TAG, or a bare ref name another
        // tool wrote (skopeo's oci:STORE:foo writes "foo").
        if let Ok(want) = ImageName::parse(name) {
            if let Some(d) = by_name(want.as_str()) {
                return Ok(d);
            }
        }
        if let Some(d) = by_name(name) {
            return Ok(d);
        }
        let hexpart = name.strip_prefix("sha256:").unwrap_or(name);
        let all_hex = !hexpart.is_empty() && hexpart.bytes().all(|b| b.is_ascii_hexdigit());
        if all_hex
            && hexpart.len() < 12
            && (name.starts_with("sha256:") || hexpart.bytes().any(|b| b.is_ascii_digit()))
        {
            return Err(StoreError::InvalidName {
                name: name.into(),
                reason: "no image has that name, and a digest prefix needs at least 12 hex digits",
            });
        }
        let is_hex = hexpart.len() >= 12 && all_hex;
        if !is_hex {
            // An invalid name says why; a valid one was simply not found.
            return Err(StoreError::ImageNotFound(
                ImageName::parse(name)?.to_string(),
            ));
        }
        let hits: BTreeMap<String, Descriptor> = index
            .manifests()
            .iter()
            .filter(|d| d.digest().digest().starts_with(hexpart))
            .map(|d| (d.digest().to_string(), d.clone()))
            .collect();
        let mut it = hits.into_values();
        match (it.next(), it.next()) {
            (Some(d), None) => Ok(d),
            (None, _) => Err(StoreError::ImageNotFound(name.to_string())),
            _ => Err(StoreError::InvalidName {
                name: name.into(),
                reason: "digest prefix is ambiguous",
            }),
        }
    }

    /// Lists tagged images, sorted by name.
    pub fn images(&self) -> Result<Vec<ImageSummary>, StoreError> {
        let index = self.read_index()?;
        let mut out = Vec::new();
        for d in index.manifests() {
            let Some(name) = refs::ref_name(d) else {
                continue;
            };
            // Image indexes and artifacts other tools wrote are not images
            // kiln runs; a broken image is listed as broken (`fsck` says more).
            let is_manifest = matches!(d.media_type(), MediaType::ImageManifest)
                || d.media_type().to_string().contains("manifest.v2+json");
            let img = match self.resolve(d.digest().as_ref()) {
                Ok(img) => img,
                Err(e) if is_manifest => {
                    tracing::warn!("image {name} is broken: {e} (see `kiln fsck`)");
                    out.push(ImageSummary {
                        name: name.to_string(),
                        digest: d.digest().to_string(),
                        size: d.size(),
                        layers: 0,
                        created: None,
                        broken: Some(e.to_string()),
                    });
                    continue;
                }
                Err(_) => continue,
            };
            let size = d.size()
                + img.manifest.config().size()
                + img.manifest.layers().iter().map(|l| l.size()).sum::<u64>();
            out.push(ImageSummary {
                name: name.to_string(),
                digest: d.digest().to_string(),
                size,
                layers: img.manifest.layers().len(),
                created: img.config.created().clone(),
                broken: None,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Adds tag `dst` to the image `src`.
    pub fn tag(&self, src: &str, dst: &str) -> Result<ImageName, StoreError> {
        let _w = self.writer_lock()?;
        let index = self.read_index()?;
        let desc = self.find_descriptor(&index, src)?;
        let name = ImageName::parse(dst)?;
        self.set_tag(&name, &desc)?;
        Ok(name)
    }

    /// Removes a tag. Blobs stay until [`Store::gc`].
    pub fn remove(&self, name: &str) -> Result<String, StoreError> {
        let want = ImageName::parse(name)?;
        self.update_index(|index| {
            // kiln's NAME:TAG, else a bare ref name another tool wrote.
            let target = [want.as_str(), name]
                .into_iter()
                .find(|n| {
                    index
                        .manifests()
                        .iter()
                        .any(|d| refs::ref_name(d) == Some(*n))
                })
                .ok_or_else(|| StoreError::ImageNotFound(want.to_string()))?
                .to_string();
            let kept: Vec<Descriptor> = index
                .manifests()
                .iter()
                .filter(|d| refs::ref_name(d) != Some(target.as_str()))
                .cloned()
                .collect();
            index.set_manifests(kept);
            Ok(target)
        })
    }

    /// Every blob reachable from index.json.
    ///
    /// Documents are followed by content, not media type, so manifests and
    /// indexes written by other tools (Docker media types, artifacts) keep
    /// their blobs; a referenced document that cannot be read aborts gc.
    fn reachable(&self) -> Result<BTreeSet<String>, StoreError> {
        let index = self.read_index()?;
        let mut seen = BTreeSet::new();
        let mut todo: Vec<(Descriptor, String)> = index
            .manifests()
            .iter()
            .map(|d| {
                let tag = refs::ref_name(d)
                    .map(|n| format!("tag {n}"))
                    .unwrap_or_else(|| format!("index entry {}", d.digest()));
                (d.clone(), tag)
            })
            .collect();
        for digest in self.pinned_manifests() {
            if let Ok(img) = self.image_of_manifest(&digest) {
                todo.push((
                    img.descriptor,
                    format!("the image of a running sandbox ({digest})"),
                ));
            }
        }
        while let Some((d, root)) = todo.pop() {
            if !seen.insert(d.digest().digest().to_string()) {
                continue;
            }
            let json_like = d.media_type().to_string().contains("json")
                || matches!(
                    d.media_type(),
                    MediaType::ImageManifest | MediaType::ImageIndex
                );
            if !json_like || d.size() > MAX_JSON_SIZE {
                continue;
            }
            let bytes = self
                .read_blob(d.digest())
                .map_err(|e| StoreError::Unreachable {
                    root: root.clone(),
                    reason: e.to_string(),
                })?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let mut children: Vec<&serde_json::Value> = Vec::new();
            children.extend(v.get("config"));
            for key in ["layers", "manifests", "blobs"] {
                if let Some(arr) = v.get(key).and_then(|x| x.as_array()) {
                    children.extend(arr.iter());
                }
            }
            children.extend(v.get("subject"));
            for c in children {
                if let Ok(child) = serde_json::from_value::<Descriptor>(c.clone()) {
                    todo.push((child, root.clone()));
                }
            }
        }
        Ok(seen)
    }

    /// Manifests of live runs (their run directory is locked), from the
    /// run directories' pin files.
    fn pinned_manifests(&self) -> Vec<String> {
        let runs = self.root.join(".kiln/runs");
        let Ok(list) = fs::read_dir(&runs) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in list.flatten() {
            let Ok(pin) = fs::read_to_string(e.path().join(PIN_FILE)) else {
                continue;
            };
            let live = File::open(e.path()).is_ok_and(|f| f.try_lock_shared().is_err());
            if live {
                out.push(pin.trim().to_string());
            }
        }
        out
    }

    /// The lock [`Store::gc`] holds exclusively (writers hold it shared).
    pub(crate) fn gc_lock(&self) -> Result<StoreLock, StoreError> {
        self.lock("gc.lock", true)
    }

    /// The store's own part of gc: deletes blobs no tag (and no pinned
    /// run) reaches and stale temp files. The caller holds
    /// [`Store::gc_lock`]; the rest of gc (caches, run directories) is
    /// composed above the store.
    pub(crate) fn gc_blobs(&self) -> Result<GcReport, StoreError> {
        let keep = self.reachable()?;
        let mut report = GcReport::default();
        let dir = self.blobs_dir();
        for e in fs::read_dir(&dir).map_err(|e| StoreError::io("read directory", &dir, e))? {
            let e = e.map_err(|e| StoreError::io("read directory", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(e.path())
                .map_err(|err| StoreError::io("remove blob", &e.path(), err))?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
        // With the exclusive lock held no writer is running: every temp file is stale.
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp)
            .map_err(|e| StoreError::io("read directory", &tmp, e))?
            .flatten()
        {
            let p = e.path();
            let r = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            r.map_err(|err| StoreError::io("remove temp file", &p, err))?;
            report.temp_removed += 1;
        }
        // An older kiln wrote index.json's temp files beside it.
        for e in fs::read_dir(&self.root)
            .map_err(|e| StoreError::io("read directory", &self.root, e))?
            .flatten()
        {
            let stale = e.file_name().to_string_lossy().starts_with(".tmp-")
                && e.file_type().is_ok_and(|t| t.is_file());
            if stale {
                fs::remove_file(e.path())
                    .map_err(|err| StoreError::io("remove temp file", &e.path(), err))?;
                report.temp_removed += 1;
            }
        }
        Ok(report)
    }

    /// When index.json is missing or unreadable, rebuilds it: the damaged
    /// file is kept as `.kiln/index.json.damaged-SECONDS`, and every image
    /// manifest in `blobs/` is tagged `recovered:<first 12 hex digits>`
    /// (index.json is where names live, so they cannot be recovered; retag
    /// with `kiln tag`). Returns what was done, or `None` when index.json
    /// was fine.
    pub fn repair_index(&self) -> Result<Option<String>, StoreError> {
        let _g = self.lock_index()?;
        let path = self.root.join("index.json");
        match self.read_index() {
            Ok(_) => return Ok(None),
            Err(StoreError::BadDocument { .. }) => {}
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let kept = self.root.join(format!(".kiln/index.json.damaged-{secs}"));
        if path.exists() {
            fs::rename(&path, &kept).map_err(|e| StoreError::io("keep damaged", &path, e))?;
        }
        let dir = self.blobs_dir();
        let mut found = Vec::new();
        for e in fs::read_dir(&dir)
            .map_err(|e| StoreError::io("read directory", &dir, e))?
            .flatten()
        {
            let small = e
                .metadata()
                .is_ok_and(|m| m.is_file() && m.len() <= MAX_JSON_SIZE);
            let Ok(d) = format!("sha256:{}", e.file_name().to_string_lossy()).parse::<Digest>()
            else {
                continue;
            };
            if !small {
                continue;
            }
            let Ok(bytes) = self.read_blob(&d) else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let media = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
            let is_image = v.get("config").is_some_and(|c| c.get("digest").is_some())
                && v.get("layers").is_some_and(|l| l.is_array())
                && (media.is_empty() || media.contains("manifest"));
            if !is_image {
                continue;
            }
            let media = if media.is_empty() {
                MediaType::ImageManifest
            } else {
                MediaType::from(media)
            };
            let name = ImageName::parse(&format!("recovered:{}", &d.digest()[..12]))?;
            let mut desc = Descriptor::new(media, bytes.len() as u64, d);
            let mut ann = std::collections::HashMap::new();
            ann.insert(REF_NAME_ANNOTATION.to_string(), name.to_string());
            desc.set_annotations(Some(ann));
            found.push(desc);
        }
        found.sort_by(|a, b| refs::ref_name(a).cmp(&refs::ref_name(b)));
        let n = found.len();
        let mut index = empty_index();
        index.set_manifests(found);
        self.write_index(&index)?;
        Ok(Some(format!(
            "index.json was unreadable (kept as {}): tagged {n} image manifest(s) found in blobs/ as recovered:<digest> (retag them with `kiln tag`)",
            kept.display()
        )))
    }

    /// Verifies the store: every blob hashes to its name, every tag resolves
    /// and every blob an image references is present. Returns the problems.
    pub fn fsck(&self) -> Result<Vec<FsckProblem>, StoreError> {
        let mut problems = Vec::new();
        let dir = self.blobs_dir();
        for e in fs::read_dir(&dir).map_err(|e| StoreError::io("read directory", &dir, e))? {
            let e = e.map_err(|e| StoreError::io("read directory", &dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
                problems.push(FsckProblem {
                    what: e.path().display().to_string(),
                    problem: "not a sha256 blob name".into(),
                });
                continue;
            };
            let mut r = self.open_blob(&d, None)?;
            if let Err(err) = io::copy(&mut r, &mut io::sink()) {
                problems.push(FsckProblem {
                    what: d.to_string(),
                    problem: err.to_string(),
                });
            }
        }
        let index = self.read_index()?;
        for d in index.manifests() {
            let what = refs::ref_name(d)
                .map(str::to_string)
                .unwrap_or_else(|| d.digest().to_string());
            match self.resolve(d.digest().as_ref()) {
                Err(e) => problems.push(FsckProblem {
                    what,
                    problem: e.to_string(),
                }),
                Ok(img) => {
                    for l in img.manifest.layers() {
                        if !self.has_blob(l.digest()) {
                            problems.push(FsckProblem {
                                what: what.clone(),
                                problem: format!("layer {} missing", l.digest()),
                            });
                        }
                    }
                }
            }
        }
        Ok(problems)
    }
}

fn empty_index() -> ImageIndex {
    let mut idx = ImageIndex::default();
    idx.set_manifests(Vec::new());
    idx.set_media_type(Some(MediaType::ImageIndex));
    idx
}

/// Serializes an OCI document with sorted keys and no whitespace, so equal
/// documents always give equal bytes (oci-spec uses HashMaps for labels).
/// Keys are sorted explicitly, whatever serde_json features are enabled.
pub fn canonical_json<T: Serialize>(doc: &T) -> Result<Vec<u8>, StoreError> {
    let bad = |e: serde_json::Error| StoreError::BadDocument {
        what: "document being written",
        path: PathBuf::new(),
        reason: e.to_string(),
    };
    let v = sort_keys(serde_json::to_value(doc).map_err(bad)?);
    serde_json::to_vec(&v).map_err(bad)
}

fn sort_keys(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k, sort_keys(v)))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.into_iter().map(sort_keys).collect()),
        other => other,
    }
}
