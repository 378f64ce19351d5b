//! `--commit`: a run's overlay upper directory becomes a new OCI layer on
//! top of the image, and a new image in the store.
//!
//! Overlay's on-disk format is translated to OCI's: a whiteout (a 0/0
//! character device) becomes `.wh.NAME`, an opaque directory (xattr
//! `user.overlay.opaque=y`, or `trusted.` when not in a user namespace)
//! gets a `.wh..wh..opq` entry, overlay's own xattrs are dropped, and the
//! caller's ids (root inside a rootless run) become 0. Entries are sorted and
//! normalized as imports are, so the same changes give the same digest.

use std::io;
use std::path::Path;

use oci_spec::image::{HistoryBuilder, ImageConfiguration};

use super::outcome::{CommitReport, RunError, RunResult};
use super::prepare::Prepared;
use crate::import::{rfc3339, ImportError, ImportOptions, LayerBuilder};
use crate::layer::{Entry, EntryKind, LayerError};
use crate::spec::RunSpec;
use crate::store::{ImageName, Store};
use crate::userns::{run_task, MapKind, Task};

fn is_overlay_xattr(k: &str) -> bool {
    k.starts_with("user.overlay.")
        || k.starts_with("trusted.overlay.")
        || k.starts_with("user.fuseoverlayfs.")
}

/// fuse-overlayfs marks an opaque directory with both a `.wh..opq`
/// whiteout device and a `.wh..wh..opq` file (and an xattr, handled as the
/// kernel's): neither is content.
fn is_fuse_opaque_marker(e: &Entry) -> bool {
    let name = e.path.rsplit('/').next().unwrap_or(&e.path);
    (name == ".wh..opq" && e.kind == EntryKind::Char)
        || (name == ".wh..wh..opq" && e.kind == EntryKind::File)
}

/// The mount points (volume targets, the working directory) that are
/// empty directories in `upper`, with their parents when those hold
/// nothing else: kiln made them to mount on, the command did not.
fn empty_mount_points(upper: &Path, mount_points: &[String]) -> std::collections::HashSet<String> {
    let mut skip = std::collections::HashSet::new();
    let mut targets: Vec<String> = mount_points
        .iter()
        .map(|m| m.trim_matches('/').to_string())
        .filter(|m| !m.is_empty())
        .collect();
    // Deepest first, so a parent sees its skipped children.
    targets.sort_by_key(|t| std::cmp::Reverse(t.matches('/').count()));
    for t in targets {
        let mut cur = Some(t.as_str());
        while let Some(p) = cur {
            let dir = upper.join(p);
            let only_skipped = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                && std::fs::read_dir(&dir).is_ok_and(|it| {
                    it.flatten()
                        .all(|e| skip.contains(&format!("{p}/{}", e.file_name().to_string_lossy())))
                });
            if !only_skipped {
                break;
            }
            skip.insert(p.to_string());
            cur = p.rsplit_once('/').map(|(parent, _)| parent);
        }
    }
    skip
}

/// Where a run's changes are.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Changes<'a> {
    /// The namespace backend's overlay upper directory, on the host: files
    /// the sandbox's root made belong to the caller (or, in a subid
    /// mapping, are read from inside it).
    Dir(&'a Path),
    /// The VM backend's upper disk: an ext4 image whose `upper/` directory
    /// the guest's overlay wrote, with the guest's (the image's) owners.
    /// The guest removed the mount points it made before it unmounted.
    Ext4(&'a Path),
}

/// The directory of [`Changes::Ext4`] that holds the overlay's upper layer.
pub(crate) const EXT4_UPPER: &str = "upper";

/// An ext4 upper disk's `upper/` tree as entries relative to it.
fn walk_ext4(img: &Path, f: &mut crate::source::dir::DirEntryFn<'_>) -> Result<(), LayerError> {
    use crate::source::disk::ext::{ExtError, ExtFs};
    enum Fail {
        Layer(LayerError),
        Ext(ExtError),
    }
    impl From<ExtError> for Fail {
        fn from(e: ExtError) -> Fail {
            Fail::Ext(e)
        }
    }
    let archive = |reason: String| LayerError::Archive {
        path: img.display().to_string(),
        reason,
    };
    let dev = crate::source::disk::FileSource::open(img)
        .map_err(|e| archive(format!("open the run's upper disk: {e}")))?;
    let fs = ExtFs::open(std::sync::Arc::new(dev))
        .map_err(|e| archive(format!("read the run's upper disk: {e}")))?;
    let prefix = format!("{EXT4_UPPER}/");
    let strip = |p: &[u8]| p.strip_prefix(prefix.as_bytes()).map(<[u8]>::to_vec);
    fs.walk(
        |mut e: Entry, data: &mut dyn io::Read| -> Result<(), Fail> {
            if e.path == EXT4_UPPER {
                e.path = String::new();
            } else if let Some(rest) = e.path.strip_prefix(&prefix) {
                e.path = rest.to_string();
            } else {
                return Ok(()); // overlay's work directory, lost+found
            }
            if e.kind == EntryKind::Hardlink {
                e.link = e.link.as_deref().and_then(strip);
                if e.link.is_none() {
                    return Err(Fail::Layer(archive(format!(
                        "/{}: a hard link out of the upper layer",
                        e.path
                    ))));
                }
            }
            f(e, data).map_err(Fail::Layer)
        },
    )
    .map_err(|e| match e {
        Fail::Layer(e) => e,
        Fail::Ext(e) => archive(format!("read the run's upper disk: {e}")),
    })
}

/// Turns a run's `changes` into a layer on top of `base` and tags it
/// `name`. Empty directories at `mount_points` (sandbox paths) of an upper
/// directory are left out.
pub(crate) fn commit(
    store: &Store,
    base: &crate::store::Image,
    changes: Changes<'_>,
    name: &str,
    created_by: &str,
    epoch: Option<i64>,
    mount_points: &[String],
) -> Result<CommitReport, ImportError> {
    let (skip, display, rootless) = match changes {
        Changes::Dir(upper) => (
            empty_mount_points(upper, mount_points),
            format!("run upper dir {}", upper.display()),
            !rustix::process::getuid().is_root(),
        ),
        Changes::Ext4(img) => (
            Default::default(),
            format!("run upper disk {}", img.display()),
            false,
        ),
    };
    let name = ImageName::parse(name)?;
    let _w = store.writer_lock()?;
    let mut opts = ImportOptions::new(name.to_string());
    opts.source_date_epoch = epoch;
    let mut layer = LayerBuilder::new(store, &opts, &display)?;
    let (my_uid, my_gid) = (
        u64::from(rustix::process::getuid().as_raw()),
        u64::from(rustix::process::getgid().as_raw()),
    );
    let mut add = |mut e: Entry, data: &mut dyn io::Read| {
        if e.path.is_empty() || is_fuse_opaque_marker(&e) {
            return Ok(()); // the upper dir itself is not part of the image
        }
        if e.kind == EntryKind::Dir && skip.contains(e.path.trim_end_matches('/')) {
            return Ok(());
        }
        // The command made a file named like a whiteout: in the layer it
        // would delete something (or, as `.wh...`, try to reach the
        // parent). Refused; overlay's own whiteouts are 0/0 devices.
        let is_whiteout = e.kind == EntryKind::Char && (e.dev_major, e.dev_minor) == (0, 0);
        let name = e.path.rsplit('/').next().unwrap_or(&e.path);
        if name.starts_with(".wh.") && !is_whiteout {
            return Err(LayerError::UnsafeEntry {
                source_name: display.clone(),
                offset: 0,
                reason: crate::layer::PathError::ReservedName(format!("/{}", e.path)),
            });
        }
        if rootless {
            // Root in the sandbox is the caller on the host.
            if e.uid == my_uid {
                e.uid = 0;
            }
            if e.gid == my_gid {
                e.gid = 0;
            }
        }
        if e.kind == EntryKind::Char && (e.dev_major, e.dev_minor) == (0, 0) {
            let (parent, base) = e
                .path
                .rsplit_once('/')
                .map_or(("", e.path.as_str()), |(p, b)| (p, b));
            let mut w = Entry::new(
                if parent.is_empty() {
                    format!(".wh.{base}")
                } else {
                    format!("{parent}/.wh.{base}")
                },
                EntryKind::File,
            );
            w.mode = 0o644;
            w.mtime = e.mtime;
            return layer.add(w, &mut io::empty(), 0);
        }
        let opaque = e.kind == EntryKind::Dir
            && e.xattrs.iter().any(|(k, v)| {
                (k.ends_with("overlay.opaque") || k == "user.fuseoverlayfs.opaque")
                    && v.as_slice() == b"y"
            });
        e.xattrs.retain(|k, _| !is_overlay_xattr(k));
        let path = e.path.clone();
        let mtime = e.mtime;
        layer.add(e, data, 0)?;
        if opaque {
            let mut o = Entry::new(format!("{path}/.wh..wh..opq"), EntryKind::File);
            o.mode = 0o644;
            o.mtime = mtime;
            layer.add(o, &mut io::empty(), 0)?;
        }
        Ok(())
    };
    match changes {
        Changes::Dir(upper) => {
            crate::source::dir::walk(upper, &mut add)?;
        }
        Changes::Ext4(img) => walk_ext4(img, &mut add)?,
    }
    let (info, entries) = layer.finish()?;
    // The base config, one more diff_id and a history entry.
    let mut cfg: ImageConfiguration = base.config.clone();
    let mut rootfs = cfg.rootfs().clone();
    let mut ids = rootfs.diff_ids().clone();
    ids.push(info.diff_id.clone());
    rootfs.set_diff_ids(ids);
    cfg.set_rootfs(rootfs);
    let mut h = HistoryBuilder::default()
        .created_by(created_by.to_string())
        .comment("kiln run --commit".to_string());
    if let Some(t) = epoch {
        h = h.created(rfc3339(t));
        cfg.set_created(Some(rfc3339(t)));
    }
    let mut history = cfg.history().clone().unwrap_or_default();
    history.push(h.build().map_err(|e| LayerError::Archive {
        path: name.to_string(),
        reason: e.to_string(),
    })?);
    cfg.set_history(Some(history));
    let config_bytes = crate::store::canonical_json(&cfg)?;
    let mut layers: Vec<crate::import::LayerInfo> = base
        .manifest
        .layers()
        .iter()
        .map(|l| crate::import::LayerInfo {
            digest: l.digest().to_string(),
            diff_id: String::new(),
            size: l.size(),
            media_type: l.media_type().to_string(),
        })
        .collect();
    layers.push(info.clone());
    let (manifest_digest, _) = store.write_image(&config_bytes, &layers, &name)?;
    Ok(CommitReport {
        name: name.to_string(),
        manifest_digest,
        layer_digest: info.digest,
        entries,
    })
}

/// After a run: with `spec.commit` and exit code 0, the run's upper layer
/// becomes a new image (made inside the caller's subid mapping when its
/// files belong to subordinate ids). A failed commit keeps the run
/// directory and says where.
pub(crate) fn finish(
    store: &Store,
    helper: Option<&Path>,
    spec: &RunSpec,
    p: &mut Prepared,
    mut result: RunResult,
) -> Result<RunResult, RunError> {
    // A successful run with --commit: its upper layer becomes a new image.
    let (name, rundir) = match (&spec.commit, result.exit_code, p.rundir.as_mut()) {
        (Some(name), 0, Some(d)) => (name, d),
        (Some(_), 0, None) => {
            return Err(RunError::Unsupported(
                "commit needs the upper layer on disk".into(),
            ))
        }
        _ => return Ok(result),
    };
    let created_by = format!("kiln run {}", cfg_argv_display(&spec.argv));
    let mut mount_points: Vec<String> = spec.volumes.iter().map(|v| v.target.clone()).collect();
    mount_points.push(p.workdir.clone());
    let upper = rundir.path.join("upper");
    let upper_disk = rundir.path.join(crate::sandbox::vm::UPPER_DISK);
    let committed = if matches!(spec.backend, crate::spec::Backend::Vm(_)) {
        // The guest's upper disk is the caller's file, with the image's
        // owners inside.
        commit(
            store,
            &p.img,
            Changes::Ext4(&upper_disk),
            name,
            &created_by,
            spec.source_date_epoch,
            &mount_points,
        )
        .map_err(|e| e.to_string())
    } else if p.map.kind == MapKind::Subids {
        // The upper dir holds files of subordinate ids the caller cannot
        // read: commit from inside the same mapping.
        let task = Task::Commit {
            store: store.root().to_path_buf(),
            manifest: p.img.descriptor.digest().to_string(),
            upper,
            name: name.clone(),
            created_by,
            epoch: spec.source_date_epoch,
            mount_points,
        };
        run_task(helper, &p.map, &task)
            .map_err(|e| format!("commit inside the subid mapping: {e}"))
            .and_then(|out| {
                serde_json::from_str(&out)
                    .map_err(|e| format!("commit inside the subid mapping: {e}"))
            })
    } else {
        commit(
            store,
            &p.img,
            Changes::Dir(&upper),
            name,
            &created_by,
            spec.source_date_epoch,
            &mount_points,
        )
        .map_err(|e| e.to_string())
    };
    match committed {
        Ok(c) => result.committed = Some(c),
        Err(reason) => {
            // The command succeeded: its changes are not thrown away.
            return Err(match rundir.keep() {
                Ok(kept) => RunError::CommitKept { reason, kept },
                Err(e) => {
                    RunError::host(format!("run: commit: {reason}; keep the run directory"), e)
                }
            });
        }
    }
    Ok(result)
}

fn cfg_argv_display(argv: &Option<Vec<String>>) -> String {
    argv.as_ref()
        .map(|a| a.join(" "))
        .unwrap_or_else(|| "(image command)".into())
}
