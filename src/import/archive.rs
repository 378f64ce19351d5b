//! Importing image archives: `docker save` output and OCI layouts/archives.
//!
//! OCI sources are copied blob for blob (digests verified), so the manifest
//! digest is kept. Docker archives keep their config bytes and layer
//! diff_ids; their uncompressed layers are compressed on the way in.
//!
//! Either way every layer is read through kiln's tar reader first, as an
//! unpack would read it: a layer with a `..` path or a whiteout of `.` or
//! `..` (which an unpacker would apply outside the layer's directory) is
//! refused at import, and its content must hash to the config's diff_id.

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use super::{build_config, ImportError, ImportOptions, ImportReport, Job, LayerInfo, LayerSink};
use crate::digest;
use crate::layer::LayerError;
use crate::progress::Event;
use crate::source::{self, archive::FileSet};
use crate::store::{ImageName, Store, REF_NAME_ANNOTATION};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Copies what is read through it to `sink`.
struct Tee<R, W> {
    inner: R,
    sink: W,
}

impl<R: io::Read, W: io::Write> io::Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sink.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Reads layer `member` of `set` (decompressed, within the bomb limits)
/// through the tar reader, which refuses unsafe paths, and writes the tar
/// stream to `sink`.
fn scan_layer(
    set: &FileSet,
    member: &str,
    display: &str,
    opts: &ImportOptions,
    sink: &mut dyn io::Write,
) -> Result<(), ImportError> {
    let (r, _) = set
        .open(member)
        .map_err(|e| bad(display, format!("open layer {member}: {e}")))?;
    let consumed = Arc::new(AtomicU64::new(0));
    let r = source::CountingReader::new(r, Arc::clone(&consumed));
    let (head, r) =
        source::peek(r, 64).map_err(|e| bad(display, format!("read layer {member}: {e}")))?;
    let codec = source::sniff_codec(&head);
    let dec = source::decoder(codec, r)
        .map_err(|e| bad(display, format!("decompress layer {member}: {e}")))?;
    let dec = source::BombGuard::new(dec, codec.map(|_| consumed), opts.limits);
    let mut tee = Tee { inner: dec, sink };
    let name = format!("{display}: layer {member}");
    source::tarball::walk(&mut tee, &name, &mut |_e, data, _pos| {
        io::copy(data, &mut io::sink())
            .map(|_| ())
            .map_err(|e| LayerError::from_read(&name, "read layer", 0, &e))
    })?;
    // What follows the end-of-archive blocks is part of the blob too.
    io::copy(&mut tee, &mut io::sink())
        .map_err(|e| LayerError::from_read(&name, "read layer", 0, &e))?;
    Ok(())
}

fn bad(path: &str, reason: impl Into<String>) -> ImportError {
    LayerError::Archive {
        path: path.to_string(),
        reason: reason.into(),
    }
    .into()
}

/// Imports the image held by `set`.
pub(crate) fn import_archive(
    store: &Store,
    set: &FileSet,
    display: &str,
    name: &ImageName,
    opts: &Job<'_>,
) -> Result<ImportReport, ImportError> {
    if set.exists("manifest.json") {
        import_docker(store, set, display, name, opts)
    } else if set.exists("index.json") {
        import_oci(store, set, display, name, opts)
    } else {
        Err(bad(display, "looks like an image archive but has neither manifest.json (docker save) nor index.json (OCI)"))
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(
    set: &FileSet,
    member: &str,
    display: &str,
) -> Result<(T, Vec<u8>), ImportError> {
    let bytes = set
        .read_small(member)
        .map_err(|e| bad(display, format!("read {member}: {e}")))?;
    let v =
        serde_json::from_slice(&bytes).map_err(|e| bad(display, format!("parse {member}: {e}")))?;
    Ok((v, bytes))
}

/// Names a user may give for a docker RepoTag: with or without `docker.io/library/` and `:latest`.
fn tag_matches(tag: &str, want: &str) -> bool {
    let norm = |s: &str| {
        let s = s.strip_prefix("docker.io/").unwrap_or(s);
        let s = s.strip_prefix("library/").unwrap_or(s);
        let s = s.strip_prefix("localhost/").unwrap_or(s);
        let last = s.rsplit('/').next().unwrap_or(s);
        if last.contains(':') {
            s.to_string()
        } else {
            format!("{s}:latest")
        }
    };
    norm(tag) == norm(want)
}

fn import_docker(
    store: &Store,
    set: &FileSet,
    display: &str,
    name: &ImageName,
    opts: &Job<'_>,
) -> Result<ImportReport, ImportError> {
    let (entries, _): (Vec<DockerEntry>, _) = read_json(set, "manifest.json", display)?;
    let all_tags = || {
        entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = match &opts.image {
        Some(want) => entries
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|t| tag_matches(t, want)))
            .ok_or_else(|| {
                bad(
                    display,
                    format!(
                        "no image {want:?} in the archive (it holds: {})",
                        all_tags()
                    ),
                )
            })?,
        None => match entries.as_slice() {
            [one] => one,
            [] => return Err(bad(display, "manifest.json lists no image")),
            _ => {
                return Err(bad(
                    display,
                    format!(
                        "the archive holds {} images ({}): pick one with {}",
                        entries.len(),
                        all_tags(),
                        crate::words::Opt::Image
                    ),
                ))
            }
        },
    };
    let config_bytes = set
        .read_small(&entry.config)
        .map_err(|e| bad(display, format!("read config {}: {e}", entry.config)))?;
    // Legacy archives name the config <hex>.json, newer ones blobs/sha256/<hex>.
    let stem = entry
        .config
        .rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json");
    if stem.len() == 64
        && stem.bytes().all(|b| b.is_ascii_hexdigit())
        && digest::of_bytes(&config_bytes).digest() != stem
    {
        return Err(bad(
            display,
            format!("config {} does not match its name's digest", entry.config),
        ));
    }
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| bad(display, format!("parse config {}: {e}", entry.config)))?;
    let diff_ids = config.rootfs().diff_ids().clone();
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(
            display,
            format!(
                "config lists {} diff_ids but manifest.json {} layers",
                diff_ids.len(),
                entry.layers.len()
            ),
        ));
    }
    opts.emit(Event::Detected {
        kind: "docker-archive".into(),
        total: None,
    });
    let mut layers = Vec::new();
    for (i, member) in entry.layers.iter().enumerate() {
        // The sink hashes the uncompressed stream once: that is the diff_id.
        let mut sink = LayerSink::new(store, opts.compression, opts.level)?;
        scan_layer(set, member, display, opts, &mut sink)?;
        let info = sink.finish()?;
        if info.diff_id != diff_ids[i] {
            return Err(bad(
                display,
                format!(
                    "layer {member} hashes to {} but the config says {}",
                    info.diff_id, diff_ids[i]
                ),
            ));
        }
        opts.emit(Event::LayerWritten {
            digest: info.digest.clone(),
            size: info.size,
        });
        layers.push(info);
    }
    let config_out = if opts.has_metadata() {
        build_config(opts, Some(config), &[], "")?
    } else {
        config_bytes
    };
    let (manifest_digest, config_digest) = store.write_image(&config_out, &layers, name)?;
    Ok(ImportReport {
        name: name.to_string(),
        source_kind: "docker-archive".into(),
        manifest_digest,
        config_digest,
        layers,
        entries: 0,
    })
}

fn blob_member(d: &Descriptor) -> String {
    format!("blobs/{}/{}", d.digest().algorithm(), d.digest().digest())
}

/// Copies one blob verbatim, verifying its digest and size.
fn copy_blob(
    store: &Store,
    set: &FileSet,
    d: &Descriptor,
    display: &str,
) -> Result<(), ImportError> {
    if store.has_blob(d.digest()) {
        return Ok(());
    }
    let member = blob_member(d);
    let (mut r, size) = set
        .open(&member)
        .map_err(|e| bad(display, format!("open {member}: {e}")))?;
    if size != d.size() {
        return Err(bad(
            display,
            format!("{member} is {size} bytes, its descriptor says {}", d.size()),
        ));
    }
    let mut w = store.blob_writer()?;
    io::copy(&mut r, &mut w).map_err(|e| LayerError::from_read(display, "copy blob", 0, &e))?;
    w.commit_expect(d.digest())
        .map_err(|e| bad(display, format!("{member}: {e}")))?;
    Ok(())
}

fn ref_names(d: &Descriptor) -> Vec<String> {
    let Some(a) = d.annotations() else {
        return Vec::new();
    };
    ["io.containerd.image.name", REF_NAME_ANNOTATION]
        .iter()
        .filter_map(|k| a.get(*k).cloned())
        .collect()
}

fn import_oci(
    store: &Store,
    set: &FileSet,
    display: &str,
    name: &ImageName,
    opts: &Job<'_>,
) -> Result<ImportReport, ImportError> {
    let (index, _): (ImageIndex, _) = read_json(set, "index.json", display)?;
    let all = || {
        index
            .manifests()
            .iter()
            .flat_map(ref_names)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut desc = match &opts.image {
        Some(want) => index
            .manifests()
            .iter()
            .find(|d| {
                ref_names(d)
                    .iter()
                    .any(|n| n == want || tag_matches(n, want))
            })
            .cloned()
            .ok_or_else(|| {
                bad(
                    display,
                    format!("no image {want:?} in the layout (it holds: {})", all()),
                )
            })?,
        None => match index.manifests().as_slice() {
            [one] => one.clone(),
            [] => return Err(bad(display, "index.json lists no manifest")),
            many => {
                return Err(bad(
                    display,
                    format!(
                        "the layout holds {} images ({}): pick one with {}",
                        many.len(),
                        all(),
                        crate::words::Opt::Image
                    ),
                ))
            }
        },
    };
    // A multi-platform index: pick the manifest for the wanted platform.
    for _ in 0..4 {
        if desc.media_type() != &MediaType::ImageIndex {
            break;
        }
        let member = blob_member(&desc);
        let (nested, bytes): (ImageIndex, _) = read_json(set, &member, display)?;
        if digest::of_bytes(&bytes) != *desc.digest() {
            return Err(bad(display, format!("{member} does not match its digest")));
        }
        let arch = opts
            .arch
            .clone()
            .unwrap_or_else(|| super::host_arch().to_string());
        let os = opts.os.clone().unwrap_or_else(|| "linux".to_string());
        desc = nested
            .manifests()
            .iter()
            .find(|d| {
                d.platform().as_ref().is_some_and(|p| {
                    p.architecture().to_string() == arch && p.os().to_string() == os
                })
            })
            .cloned()
            .ok_or_else(|| bad(display, format!("no manifest for {os}/{arch} in {member}")))?;
    }
    opts.emit(Event::Detected {
        kind: "OCI image".into(),
        total: None,
    });
    let member = blob_member(&desc);
    let (manifest, manifest_bytes): (ImageManifest, _) = read_json(set, &member, display)?;
    if digest::of_bytes(&manifest_bytes) != *desc.digest() {
        return Err(bad(
            display,
            format!("manifest {member} does not match its digest"),
        ));
    }
    let config_member = blob_member(manifest.config());
    let config_bytes = set
        .read_small(&config_member)
        .map_err(|e| bad(display, format!("read config {config_member}: {e}")))?;
    if digest::of_bytes(&config_bytes) != *manifest.config().digest() {
        return Err(bad(
            display,
            format!("config {config_member} does not match its digest"),
        ));
    }
    let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
        .map_err(|e| bad(display, format!("parse config: {e}")))?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(bad(
            display,
            format!(
                "the config lists {} diff_ids but the manifest {} layers",
                diff_ids.len(),
                manifest.layers().len()
            ),
        ));
    }
    // Every layer read as an unpack would read it, before anything is
    // stored: unsafe paths and wrong diff_ids are refused here.
    for (l, want) in manifest.layers().iter().zip(diff_ids) {
        let member = blob_member(l);
        let mut hash = digest::HashWriter::new(io::sink());
        scan_layer(set, &member, display, opts, &mut hash)?;
        let (_, got, _) = hash.finish();
        if got.to_string() != *want {
            return Err(bad(
                display,
                format!("layer {member} uncompresses to {got}, but the config says {want}"),
            ));
        }
    }
    copy_blob(store, set, manifest.config(), display)?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        copy_blob(store, set, l, display)?;
        opts.emit(Event::LayerWritten {
            digest: l.digest().to_string(),
            size: l.size(),
        });
        layers.push(LayerInfo {
            digest: l.digest().to_string(),
            diff_id: String::new(),
            size: l.size(),
            media_type: l.media_type().to_string(),
        });
    }
    for (l, id) in layers.iter_mut().zip(config.rootfs().diff_ids()) {
        l.diff_id = id.to_string();
    }
    let (manifest_digest, config_digest) = if opts.has_metadata() {
        let cfg = build_config(opts, Some(config), &[], "")?;
        store.write_image(&cfg, &layers, name)?
    } else {
        // Keep the manifest byte for byte: same digest as the source.
        store.put_blob(&manifest_bytes)?;
        let mt = manifest
            .media_type()
            .clone()
            .unwrap_or(MediaType::ImageManifest);
        let d = Descriptor::new(mt, manifest_bytes.len() as u64, desc.digest().clone());
        store.set_tag(name, &d)?;
        (
            desc.digest().to_string(),
            manifest.config().digest().to_string(),
        )
    };
    Ok(ImportReport {
        name: name.to_string(),
        source_kind: "oci".into(),
        manifest_digest,
        config_digest,
        layers,
        entries: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::tag_matches;

    #[test]
    fn docker_tag_matching() {
        assert!(tag_matches("busybox:latest", "busybox"));
        assert!(tag_matches(
            "docker.io/library/busybox:latest",
            "busybox:latest"
        ));
        assert!(tag_matches("localhost/kit:1", "kit:1"));
        assert!(!tag_matches("busybox:1", "busybox"));
    }
}
