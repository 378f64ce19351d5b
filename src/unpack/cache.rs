//! The unpacked-rootfs cache: one read-only tree per layer chain, shared by
//! every run of every image that has that chain.
//!
//! ```text
//! STORE/.kiln/rootfs/<chain-id hex>[-rootless]/     complete trees only (renamed into place)
//! STORE/.kiln/rootfs/.tmp-*                        unpacks in progress (removed by gc)
//! STORE/.kiln/locks/rootfs-<key>.lock              held while one process unpacks
//! ```

use std::fs;
use std::path::PathBuf;

use oci_spec::image::ImageConfiguration;
use sha2::{Digest as _, Sha256};

use super::{is_root, UnpackError, Unpacker};
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

fn cache_key(config: &ImageConfiguration, map: &IdMap) -> String {
    let chain = chain_id(config.rootfs().diff_ids());
    let hex = chain.strip_prefix("sha256:").unwrap_or(&chain).to_string();
    match map.cache_suffix() {
        Some(s) => format!("{hex}-{s}"),
        None => hex,
    }
}

impl Store {
    pub(crate) fn rootfs_dir(&self) -> PathBuf {
        self.root().join(".kiln/rootfs")
    }

    /// Returns the cached root file system of image `name`, unpacking it
    /// first if needed. Concurrent callers for the same chain wait on a lock
    /// while one unpacks; the tree appears atomically (rename) when complete,
    /// so a crash never leaves a half tree in the cache.
    pub fn rootfs(&self, name: &str) -> Result<CachedRootfs, UnpackError> {
        let img = self.resolve(name)?;
        self.rootfs_of(&img)
    }

    /// [`Store::rootfs`] for an image already resolved.
    pub fn rootfs_of(&self, img: &crate::store::Image) -> Result<CachedRootfs, UnpackError> {
        let map = if is_root() {
            IdMap::identity()
        } else {
            let (u, g) = (
                rustix::process::getuid().as_raw(),
                rustix::process::getgid().as_raw(),
            );
            IdMap::caller(u, g, false)
        };
        self.rootfs_mapped(img, &map, None)
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
        let path = dir.join(&key);
        if path.is_dir() {
            return Ok(CachedRootfs {
                path,
                chain_id,
                unpacked: false,
            });
        }
        // Hold the writer lock (shared) so gc does not remove our temp tree.
        let _w = self.writer_lock()?;
        let _l = self.named_lock(&format!("rootfs-{key}.lock"))?;
        if path.is_dir() {
            return Ok(CachedRootfs {
                path,
                chain_id,
                unpacked: false,
            });
        }
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(&dir)
            .map_err(|e| StoreError::io("create temp directory", &dir, e))?;
        let tmp_path = tmp.keep();
        let result = (|| {
            match map.kind {
                MapKind::Subids => {
                    let task = Task::Unpack {
                        store: self.root().to_path_buf(),
                        manifest: img.descriptor.digest().to_string(),
                        dest: tmp_path.clone(),
                    };
                    run_task(helper, map, &task).map_err(|e| UnpackError::Io {
                        step: "unpack inside the subid mapping",
                        path: tmp_path.display().to_string(),
                        layer: String::new(),
                        source: e,
                    })?;
                }
                kind => {
                    self.unpack_layers(img, &tmp_path, kind == MapKind::Caller)?;
                }
            }
            fs::rename(&tmp_path, &path)
                .map_err(|e| StoreError::io("rename rootfs into place", &path, e))?;
            Ok::<(), UnpackError>(())
        })();
        if let Err(e) = result {
            let _ = remove_tree_mapped(&tmp_path, helper);
            return Err(e);
        }
        Ok(CachedRootfs {
            path,
            chain_id,
            unpacked: true,
        })
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
                path: String::new(),
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

    /// Removes cached trees no image in the index uses, and abandoned temp
    /// trees. Called by [`Store::gc`] with the gc lock held.
    pub(crate) fn gc_rootfs(&self) -> Result<u64, StoreError> {
        let dir = self.rootfs_dir();
        if !dir.is_dir() {
            return Ok(0);
        }
        let mut keep = std::collections::HashSet::new();
        // The caller's current subid mapping (a cache of another mapping is
        // stale: its owners would be wrong).
        let subids = IdMap::detect(false, false);
        for d in self.read_index()?.manifests() {
            if let Ok(img) = self.resolve(d.digest().as_ref()) {
                keep.insert(cache_key(&img.config, &IdMap::identity()));
                keep.insert(cache_key(&img.config, &IdMap::caller(0, 0, false)));
                keep.insert(cache_key(&img.config, &subids));
            }
        }
        let mut removed = 0;
        for e in fs::read_dir(&dir)
            .map_err(|e| StoreError::io("read directory", &dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            // In use by a run (it holds a shared lock): leave it. Our lock
            // is held until the tree is gone, so no run starts on it.
            let _lock = match fs::File::open(e.path()) {
                Ok(f) if f.try_lock().is_err() => continue,
                Ok(f) => Some(f),
                Err(_) => None,
            };
            remove_tree_mapped(&e.path(), None)
                .map_err(|err| StoreError::io("remove cached rootfs", &e.path(), err))?;
            removed += 1;
        }
        Ok(removed)
    }
}
