//! The unpacked-rootfs cache: one read-only tree per layer chain, shared by
//! every run of every image that has that chain.
//!
//! ```text
//! STORE/.kiln/rootfs/<chain-id hex>[-suffix]/        one entry, published by rename:
//!     root/                                          the tree
//!     tree                                           its record (see record.rs)
//!     done                                           completion marker, written last
//! STORE/.kiln/rootfs/.tmp-*                          unpacks in progress, or entries
//!                                                    un-published before deletion
//! STORE/.kiln/locks/rootfs-<key>.lock                held while one process unpacks
//! ```
//!
//! An entry is trusted only when its `done` marker names its key: a tree
//! that is being deleted is renamed away first, so a crash never leaves a
//! half tree under the final name, and an entry without a valid marker
//! (an older kiln's, or damaged) is replaced. The tree is synced to disk
//! (`syncfs`) before it is published. Runs hold a shared flock on the
//! entry; whoever deletes one takes it exclusively.

use std::fs;
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use sha2::{Digest as _, Sha256};

use super::record::TreeSummary;
use super::{UnpackError, Unpacker};
use crate::store::{Store, StoreError};
use crate::userns::{remove_tree_mapped, run_task, IdMap, MapKind, Task};

/// The OCI ChainID of a config's layers: `ChainID(L0) = DiffID(L0)`,
/// `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`.
///
/// ```
/// let ids = ["sha256:aa".to_string(), "sha256:bb".to_string()];
/// let one = kiln::unpack::chain_id(&ids[..1]);
/// assert_eq!(one, "sha256:aa");
/// assert!(kiln::unpack::chain_id(&ids).starts_with("sha256:"));
/// ```
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = String::new();
    for (i, d) in diff_ids.iter().enumerate() {
        chain = if i == 0 {
            d.clone()
        } else {
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{chain} {d}")))
            )
        };
    }
    chain
}

/// Hashes what is read through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Where a cached root file system is, and whether this call unpacked it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedRootfs {
    /// The read-only tree.
    pub path: PathBuf,
    /// The layer chain it holds.
    pub chain_id: String,
    /// True when this call unpacked it (false: it was cached, possibly by a
    /// concurrent call this one waited for).
    pub unpacked: bool,
}

/// The completion marker of a cache entry (`done`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Marker {
    format: u32,
    chain_id: String,
    key: String,
    #[serde(flatten)]
    tree: TreeSummary,
}

/// One damaged or incomplete cache entry, as found by [`Store::fsck_rootfs`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootfsDamage {
    /// The entry's directory.
    pub entry: PathBuf,
    /// Tags of images that use it.
    pub images: Vec<String>,
    /// What differs from the record made at unpack.
    pub problems: Vec<String>,
    /// Whether [`Store::fsck_rootfs`] removed it (with `repair`).
    pub removed: bool,
}

fn cache_key(config: &ImageConfiguration, map: &IdMap) -> String {
    let chain = chain_id(config.rootfs().diff_ids());
    let hex = chain.strip_prefix("sha256:").unwrap_or(&chain).to_string();
    match map.cache_suffix() {
        Some(s) => format!("{hex}-{s}"),
        None => hex,
    }
}

/// The marker of `entry` when it is a complete entry for `key`.
fn complete(entry: &Path, key: &str) -> Option<Marker> {
    use std::io::Read as _;
    let mut data = Vec::new();
    fs::File::open(entry.join("done"))
        .ok()?
        .take(64 << 10)
        .read_to_end(&mut data)
        .ok()?;
    let m: Marker = serde_json::from_slice(&data).ok()?;
    (m.format == 1 && m.key == key).then_some(m)
}

/// The caller's map for cached trees: what its runs use by default.
fn default_map() -> IdMap {
    IdMap::detect(false, false)
}

/// The cache keys an image may have here: root's, the caller's alone, and
/// the caller's current subid mapping.
fn keys_of(config: &ImageConfiguration, subids: &IdMap) -> [String; 3] {
    [
        cache_key(config, &IdMap::identity()),
        cache_key(config, &IdMap::caller(0, 0, false)),
        cache_key(config, subids),
    ]
}

fn io_err(step: &'static str, path: &Path, e: std::io::Error) -> UnpackError {
    UnpackError::Io {
        step,
        path: path.display().to_string(),
        layer: "-".into(),
        source: e,
    }
}

impl Store {
    pub(crate) fn rootfs_dir(&self) -> PathBuf {
        self.root().join(".kiln/rootfs")
    }

    /// Returns the cached root file system of image `name` for the caller's
    /// runs (the id mapping `kiln run` uses by default), unpacking it first
    /// if needed. Concurrent callers for the same chain wait on a lock
    /// while one unpacks; the tree appears atomically (rename) when complete,
    /// so a crash never leaves a half tree in the cache.
    pub fn rootfs(&self, name: &str) -> Result<CachedRootfs, UnpackError> {
        let img = self.resolve(name)?;
        self.rootfs_of(&img)
    }

    /// Whether image `img`'s tree for the caller's default runs is already
    /// cached (a first run unpacks it, which takes a while for a big image).
    pub fn rootfs_is_cached(&self, img: &crate::store::Image) -> bool {
        let key = cache_key(&img.config, &default_map());
        complete(&self.rootfs_dir().join(&key), &key).is_some()
    }

    /// [`Store::rootfs`] for an image already resolved.
    pub fn rootfs_of(&self, img: &crate::store::Image) -> Result<CachedRootfs, UnpackError> {
        self.rootfs_mapped(img, &default_map(), None)
    }

    /// The cached root file system of `img` for runs mapped by `map`: real
    /// owners for the identity map, owners in `user.rootlesscontainers`
    /// for the caller alone, and for a subid map real (mapped) owners,
    /// written by a helper inside that mapping (`helper`: the kiln binary).
    pub fn rootfs_mapped(
        &self,
        img: &crate::store::Image,
        map: &IdMap,
        helper: Option<&std::path::Path>,
    ) -> Result<CachedRootfs, UnpackError> {
        let key = cache_key(&img.config, map);
        let chain_id = chain_id(img.config.rootfs().diff_ids());
        let dir = self.rootfs_dir();
        let entry = dir.join(&key);
        let found = |unpacked| CachedRootfs {
            path: entry.join("root"),
            chain_id: chain_id.clone(),
            unpacked,
        };
        if complete(&entry, &key).is_some() {
            return Ok(found(false));
        }
        // Hold the writer lock (shared) so gc does not remove our temp tree.
        let _w = self.writer_lock()?;
        let _l = self.named_lock(&format!("rootfs-{key}.lock"))?;
        if complete(&entry, &key).is_some() {
            return Ok(found(false));
        }
        if fs::symlink_metadata(&entry).is_ok() {
            // Incomplete (an older kiln's entry, or damaged): replace it.
            if !self.unpublish(&entry, helper)? {
                return Err(io_err(
                    "replace the incomplete cached tree",
                    &entry,
                    std::io::Error::other(
                        "a running sandbox still uses it; try again when it ends",
                    ),
                ));
            }
        }
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&dir)
            .map_err(|e| StoreError::io("create temp directory", &dir, e))?;
        let tmp_path = tmp.keep();
        let result = (|| {
            let root = tmp_path.join("root");
            fs::create_dir(&root).map_err(|e| io_err("create", &root, e))?;
            let record = tmp_path.join("tree");
            let tree = match map.kind {
                MapKind::Subids => {
                    let task = Task::Unpack {
                        store: self.root().to_path_buf(),
                        manifest: img.descriptor.digest().to_string(),
                        dest: root.clone(),
                        record: record.clone(),
                    };
                    let out = run_task(helper, map, &task)
                        .map_err(|e| io_err("unpack inside the subid mapping", &root, e))?;
                    serde_json::from_str(&out).map_err(|e| {
                        io_err(
                            "unpack inside the subid mapping",
                            &root,
                            std::io::Error::other(format!("bad report {out:?}: {e}")),
                        )
                    })?
                }
                kind => {
                    self.unpack_layers(img, &root, kind == MapKind::Caller)?;
                    super::record::write(&root, &record)
                        .map_err(|e| io_err("record the unpacked tree", &root, e))?
                }
            };
            let marker = Marker {
                format: 1,
                chain_id: chain_id.clone(),
                key: key.clone(),
                tree,
            };
            let done = tmp_path.join("done");
            let bytes = serde_json::to_vec(&marker)
                .map_err(|e| io_err("write", &done, std::io::Error::other(e)))?;
            fs::write(&done, bytes).map_err(|e| io_err("write", &done, e))?;
            // Durable before it is published: after a power cut the entry
            // is either absent or whole.
            let fd = fs::File::open(&tmp_path).map_err(|e| io_err("open", &tmp_path, e))?;
            rustix::fs::syncfs(&fd)
                .map_err(|e| io_err("sync the unpacked tree (syncfs)", &tmp_path, e.into()))?;
            fs::rename(&tmp_path, &entry)
                .map_err(|e| StoreError::io("rename rootfs into place", &entry, e))?;
            if let Err(e) = crate::store::sync_dir(&dir) {
                tracing::warn!("{e}: the cached tree may not survive a power cut");
            }
            Ok::<(), UnpackError>(())
        })();
        if let Err(e) = result {
            let _ = remove_tree_mapped(&tmp_path, helper);
            return Err(e);
        }
        Ok(found(true))
    }

    /// [`Store::rootfs_mapped`] plus a shared lock on the entry, held by a
    /// run for its lifetime (gc and [`Store::drop_rootfs`] leave an entry
    /// alone while anyone holds it). Retries when the entry was deleted
    /// between the lookup and the lock.
    pub(crate) fn lease_rootfs(
        &self,
        img: &crate::store::Image,
        map: &IdMap,
        helper: Option<&std::path::Path>,
    ) -> Result<(CachedRootfs, fs::File), UnpackError> {
        use std::os::unix::fs::MetadataExt;
        let key = cache_key(&img.config, map);
        for _ in 0..5 {
            let r = self.rootfs_mapped(img, map, helper)?;
            let entry = self.rootfs_dir().join(&key);
            let f = match fs::File::open(&entry) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &entry, e)),
            };
            f.lock_shared()
                .map_err(|e| io_err("lock", &entry, std::io::Error::other(e)))?;
            // Still the entry found complete (not renamed away meanwhile)?
            // A published entry is only ever renamed, never emptied in
            // place, so the same inode is the same complete tree.
            let same = match (f.metadata(), fs::metadata(&entry)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                return Ok((r, f));
            }
        }
        Err(io_err(
            "use the cached tree",
            &self.rootfs_dir().join(&key),
            std::io::Error::other("it was removed again and again by a concurrent gc; run again"),
        ))
    }

    /// Takes `entry` out of the cache: renames it to a temp name (so no
    /// one finds a half-deleted tree under its name), then deletes it.
    /// Returns false, and leaves it, when a run holds it.
    fn unpublish(&self, entry: &Path, helper: Option<&Path>) -> Result<bool, StoreError> {
        let dir = self.rootfs_dir();
        let lock = match fs::File::open(entry) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(StoreError::io("open", entry, e)),
        };
        if lock.try_lock().is_err() {
            return Ok(false);
        }
        let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
        let doomed = if name.as_deref().is_some_and(|n| n.starts_with(".tmp-")) {
            entry.to_path_buf()
        } else {
            let to = dir.join(format!(
                ".tmp-del-{}-{}",
                std::process::id(),
                name.unwrap_or_default()
            ));
            fs::rename(entry, &to)
                .map_err(|e| StoreError::io("un-publish cached rootfs", entry, e))?;
            // The rename first, durably: a crash from here on leaves only
            // a temp name, which gc removes.
            crate::store::sync_dir(&dir)?;
            to
        };
        remove_tree_mapped(&doomed, helper)
            .map_err(|e| StoreError::io("remove cached rootfs", &doomed, e))?;
        Ok(true)
    }

    /// Removes image `name`'s cached trees (every id mapping), so its next
    /// run unpacks it afresh. Fails, removing nothing more, when a running
    /// sandbox uses one. Returns how many were removed.
    ///
    /// ```no_run
    /// let store = kiln::Store::open("/tmp/kiln-store")?;
    /// store.drop_rootfs("busybox")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn drop_rootfs(&self, name: &str) -> Result<u64, UnpackError> {
        let img = self.resolve(name)?;
        let _w = self.writer_lock()?;
        let mut removed = 0;
        for key in keys_of(&img.config, &default_map()) {
            let _l = self.named_lock(&format!("rootfs-{key}.lock"))?;
            let entry = self.rootfs_dir().join(&key);
            if fs::symlink_metadata(&entry).is_err() {
                continue;
            }
            if !self.unpublish(&entry, None)? {
                return Err(io_err(
                    "drop the cached tree",
                    &entry,
                    std::io::Error::other("a running sandbox uses it; try again when it ends"),
                ));
            }
            removed += 1;
        }
        Ok(removed)
    }

    /// Compares every cached tree with the record made when it was
    /// unpacked (content hashes, sizes, modes, owners, link targets).
    /// With `repair`, damaged or incomplete entries not in use are
    /// removed (the next run unpacks them again).
    pub fn fsck_rootfs(&self, repair: bool) -> Result<Vec<RootfsDamage>, StoreError> {
        let dir = self.rootfs_dir();
        let subids = default_map();
        let mut users: std::collections::HashMap<String, Vec<String>> = Default::default();
        for d in self.read_index()?.manifests() {
            if let Ok(img) = self.resolve(d.digest().as_ref()) {
                let name = crate::store::ref_name(d)
                    .unwrap_or(d.digest().as_ref())
                    .to_string();
                let keys: std::collections::BTreeSet<String> =
                    keys_of(&img.config, &subids).into_iter().collect();
                for k in keys {
                    users.entry(k).or_default().push(name.clone());
                }
            }
        }
        let mut out = Vec::new();
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map_err(|e| StoreError::io("read directory", &dir, e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".tmp-"))
            .collect();
        names.sort();
        for key in names {
            let entry = dir.join(&key);
            let problems = match complete(&entry, &key) {
                None => vec!["incomplete: no valid completion marker (an interrupted unpack or removal, or an older kiln's cache)".to_string()],
                Some(m) => verify_tree(&entry, &key, &m.tree).unwrap_or_else(|e| {
                    vec![format!("cannot verify: {e}")]
                }),
            };
            if problems.is_empty() {
                continue;
            }
            let mut removed = false;
            let mut problems = problems;
            if repair {
                let _w = self.writer_lock()?;
                let _l = self.named_lock(&format!("rootfs-{key}.lock"))?;
                removed = self.unpublish(&entry, None)?;
                if !removed {
                    problems.push("not removed: a running sandbox uses it".into());
                }
            }
            out.push(RootfsDamage {
                images: users.remove(&key).unwrap_or_default(),
                entry,
                problems,
                removed,
            });
        }
        Ok(out)
    }

    /// Applies every layer of `img` to the existing directory `dest`.
    pub(crate) fn unpack_layers(
        &self,
        img: &crate::store::Image,
        dest: &std::path::Path,
        rootless: bool,
    ) -> Result<super::UnpackReport, UnpackError> {
        // No device nodes in the cache (they would open host devices for
        // whoever reaches the tree); runs get kiln's /dev.
        let mut u = Unpacker::new(dest, rootless)
            .map_err(|e| StoreError::io("open", dest, e))?
            .without_devices();
        let diff_ids = img.config.rootfs().diff_ids();
        if diff_ids.len() != img.manifest.layers().len() {
            return Err(UnpackError::Verify(format!(
                "image {} has {} layers but its config lists {} diff_ids",
                img.descriptor.digest(),
                img.manifest.layers().len(),
                diff_ids.len()
            )));
        }
        for (layer, want) in img.manifest.layers().iter().zip(diff_ids) {
            // The cache is keyed by the config's diff_ids, so the unpacked
            // bytes must be the ones they name: an image that claims
            // another's diff_ids must not plant its tree under their key.
            let mut r = HashingReader {
                inner: self.layer_reader(layer)?,
                hash: Sha256::new(),
            };
            u.apply_layer(&mut r, layer.digest().as_ref())?;
            std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| UnpackError::Io {
                step: "read layer",
                path: self.blob_path(layer.digest()).display().to_string(),
                layer: layer.digest().to_string(),
                source: e,
            })?;
            let got = format!("sha256:{}", hex::encode(r.hash.finalize()));
            if &got != want {
                return Err(UnpackError::Verify(format!(
                    "layer {} uncompresses to {got}, but the image config says {want}",
                    layer.digest()
                )));
            }
        }
        u.finish()
    }

    /// Removes cached trees no image in the index uses, incomplete
    /// entries, and abandoned temp trees; never one a run holds. Called by
    /// [`Store::gc`] with the gc lock held.
    pub(crate) fn gc_rootfs(&self) -> Result<u64, StoreError> {
        let dir = self.rootfs_dir();
        if !dir.is_dir() {
            return Ok(0);
        }
        let mut keep = std::collections::HashSet::new();
        // The caller's current subid mapping (a cache of another mapping is
        // stale: its owners would be wrong).
        let subids = default_map();
        for d in self.read_index()?.manifests() {
            if let Ok(img) = self.resolve(d.digest().as_ref()) {
                keep.extend(keys_of(&img.config, &subids));
            }
        }
        let mut removed = 0;
        for e in fs::read_dir(&dir)
            .map_err(|e| StoreError::io("read directory", &dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) && complete(&e.path(), &name).is_some() {
                continue;
            }
            if self.unpublish(&e.path(), None)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// [`record::verify`](super::record::verify) of an entry. A subid tree is
/// verified inside the caller's subid mapping, where it was recorded (the
/// owners are the mapped ones there, and the caller may not read every
/// file outside it).
fn verify_tree(entry: &Path, key: &str, tree: &TreeSummary) -> std::io::Result<Vec<String>> {
    let (root, record) = (entry.join("root"), entry.join("tree"));
    let map = default_map();
    let mapped = map.kind == MapKind::Subids
        && map
            .cache_suffix()
            .is_some_and(|s| key.ends_with(&format!("-{s}")));
    if !mapped {
        return super::record::verify(&root, &record, tree, 20);
    }
    let task = Task::Verify {
        root,
        record,
        tree: serde_json::to_string(tree).map_err(std::io::Error::other)?,
    };
    let out = run_task(None, &map, &task)?;
    serde_json::from_str(&out).map_err(std::io::Error::other)
}
