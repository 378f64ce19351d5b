//! `kiln export`: an image as an oci-archive or a docker-archive tarball.

use std::io::{self, Read, Write};
use std::path::Path;

use oci_spec::image::{Descriptor, ImageIndex, MediaType};
use serde_json::json;

use super::{canonical_json, Image, ImageName, Store, StoreError, REF_NAME_ANNOTATION};
use crate::layer::{Entry, EntryKind, TarWriter};

/// Archive format of [`Store::export`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// A tar of an OCI image layout holding just this image
    /// (`skopeo copy oci-archive:FILE`, `podman load`).
    OciArchive,
    /// The `docker save` format with uncompressed layers (`docker load`,
    /// `podman load`, `skopeo copy docker-archive:FILE`).
    DockerArchive,
}

impl std::str::FromStr for ExportFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "oci-archive" | "oci" => Ok(ExportFormat::OciArchive),
            "docker-archive" | "docker" => Ok(ExportFormat::DockerArchive),
            other => Err(format!(
                "unknown export format {other:?} (oci-archive, docker-archive)"
            )),
        }
    }
}

fn wio(e: io::Error) -> StoreError {
    StoreError::io("write export", Path::new("<output>"), e)
}

fn file_entry(path: &str, size: u64) -> Entry {
    let mut e = Entry::new(path.to_string(), EntryKind::File);
    e.mode = 0o644;
    e.size = size;
    e
}

fn dir_entry(path: &str) -> Entry {
    let mut e = Entry::new(path.to_string(), EntryKind::Dir);
    e.mode = 0o755;
    e
}

/// The output of an export: remembers whether a write to it failed, so
/// the error is blamed on the output (a full disk) and not on the blob
/// being copied.
struct Output<'a> {
    inner: &'a mut dyn Write,
    failed: &'a std::cell::Cell<bool>,
}

impl Write for Output<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        if r.is_err() {
            self.failed.set(true);
        }
        r
    }
    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        if r.is_err() {
            self.failed.set(true);
        }
        r
    }
}

/// A file being exported: unnamed (`O_TMPFILE`) until it is complete, so
/// a killed export leaves nothing; where the file system has no
/// `O_TMPFILE`, a `.kiln-export-*` temp file beside the destination.
enum ExportFile {
    Unnamed(std::fs::File),
    Named(tempfile::NamedTempFile),
}

impl ExportFile {
    fn create(dir: &Path) -> Result<ExportFile, StoreError> {
        use rustix::fs::{Mode, OFlags};
        match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        ) {
            Ok(fd) => Ok(ExportFile::Unnamed(std::fs::File::from(fd))),
            Err(e)
                if [
                    rustix::io::Errno::OPNOTSUPP,
                    rustix::io::Errno::ISDIR,
                    rustix::io::Errno::INVAL,
                ]
                .contains(&e) =>
            {
                tempfile::NamedTempFile::with_prefix_in(".kiln-export-", dir)
                    .map(ExportFile::Named)
                    .map_err(|e| StoreError::io("create temp file", dir, e))
            }
            Err(e) => Err(StoreError::io("create temp file", dir, e.into())),
        }
    }

    fn file(&mut self) -> &mut std::fs::File {
        match self {
            ExportFile::Unnamed(f) => f,
            ExportFile::Named(t) => t.as_file_mut(),
        }
    }

    /// Gives the complete file its name, replacing what was there.
    fn publish(self, dir: &Path, path: &Path) -> Result<(), StoreError> {
        use std::os::fd::AsRawFd;
        match self {
            ExportFile::Named(t) => {
                let perm =
                    <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644);
                std::fs::set_permissions(t.path(), perm)
                    .map_err(|e| StoreError::io("chmod", path, e))?;
                t.persist(path)
                    .map_err(|e| StoreError::io("rename export into place", path, e.error))?;
            }
            ExportFile::Unnamed(f) => {
                // linkat through /proc needs no privilege (AT_EMPTY_PATH
                // does); it refuses an existing name, so a replacement
                // gets a temp name first, complete, then renamed over.
                let proc = format!("/proc/self/fd/{}", f.as_raw_fd());
                let link = |to: &Path| {
                    rustix::fs::linkat(
                        rustix::fs::CWD,
                        proc.as_str(),
                        rustix::fs::CWD,
                        to,
                        rustix::fs::AtFlags::SYMLINK_FOLLOW,
                    )
                };
                match link(path) {
                    Ok(()) => {}
                    Err(rustix::io::Errno::EXIST) => {
                        let tmp = dir.join(format!(".kiln-export-{}", std::process::id()));
                        let _ = std::fs::remove_file(&tmp);
                        link(&tmp).map_err(|e| StoreError::io("link export", &tmp, e.into()))?;
                        std::fs::rename(&tmp, path).map_err(|e| {
                            let _ = std::fs::remove_file(&tmp);
                            StoreError::io("rename export into place", path, e)
                        })?;
                    }
                    Err(e) => return Err(StoreError::io("link export", path, e.into())),
                }
            }
        }
        if let Err(e) = super::sync_dir(dir) {
            tracing::warn!("{} was written, but {e}", path.display());
        }
        Ok(())
    }
}

impl Store {
    /// Writes image `name` to `out` as an archive. The output is
    /// deterministic: the same image gives the same bytes.
    pub fn export(
        &self,
        name: &str,
        format: ExportFormat,
        out: &mut dyn Write,
    ) -> Result<(), StoreError> {
        self.export_blaming(name, format, out, Path::new("<output>"))
    }

    /// [`Store::export`], naming `out_name` in errors of the output.
    fn export_blaming(
        &self,
        name: &str,
        format: ExportFormat,
        out: &mut dyn Write,
        out_name: &Path,
    ) -> Result<(), StoreError> {
        let img = self.resolve(name)?;
        let failed = std::cell::Cell::new(false);
        let out = Output {
            inner: out,
            failed: &failed,
        };
        let r = (|| {
            let mut tw = TarWriter::new(io::BufWriter::with_capacity(1 << 20, out));
            match format {
                ExportFormat::OciArchive => self.export_oci(&img, &mut tw)?,
                ExportFormat::DockerArchive => self.export_docker(&img, &mut tw)?,
            }
            let mut w = tw.finish().map_err(wio)?;
            w.flush().map_err(wio)
        })();
        match r {
            Err(StoreError::Io { source, .. }) if failed.get() => {
                Err(StoreError::io("write export", out_name, source))
            }
            r => r,
        }
    }

    /// Like [`Store::export`] into a file. The file has no name until it
    /// is complete (`O_TMPFILE`, then linked in), so a failed or killed
    /// export leaves nothing; on file systems without `O_TMPFILE` it is
    /// written as `.kiln-export-*` beside `path` and renamed.
    pub fn export_to_path(
        &self,
        name: &str,
        format: ExportFormat,
        path: &Path,
    ) -> Result<(), StoreError> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp = ExportFile::create(dir)?;
        self.export_blaming(name, format, tmp.file(), path)?;
        tmp.file()
            .sync_all()
            .map_err(|e| StoreError::io("fsync", path, e))?;
        tmp.publish(dir, path)
    }

    fn append_blob<W: Write>(
        &self,
        tw: &mut TarWriter<W>,
        member: &str,
        d: &Descriptor,
    ) -> Result<(), StoreError> {
        let mut r = self.open_blob(d.digest(), Some(d.size()))?;
        let e = file_entry(member, d.size());
        tw.append(&e, &mut r)
            .map_err(|e| StoreError::io("export blob", &self.blob_path(d.digest()), e))?;
        // Drain to EOF through the verifier (append read exactly size bytes).
        let mut rest = [0u8; 1];
        r.read(&mut rest)
            .map_err(|e| StoreError::io("verify blob", &self.blob_path(d.digest()), e))?;
        Ok(())
    }

    fn export_oci<W: Write>(&self, img: &Image, tw: &mut TarWriter<W>) -> Result<(), StoreError> {
        let name = ImageName::parse(&img.name).ok();
        let mut desc = Descriptor::new(
            img.descriptor.media_type().clone(),
            img.descriptor.size(),
            img.descriptor.digest().clone(),
        );
        if let Some(n) = &name {
            let mut ann = std::collections::HashMap::new();
            ann.insert(REF_NAME_ANNOTATION.to_string(), n.to_string());
            desc.set_annotations(Some(ann));
        }
        let mut index = ImageIndex::default();
        index.set_media_type(Some(MediaType::ImageIndex));
        index.set_manifests(vec![desc]);
        let index_bytes = canonical_json(&index)?;
        let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
        tw.append(
            &file_entry("oci-layout", layout.len() as u64),
            &mut &layout[..],
        )
        .map_err(wio)?;
        tw.append(
            &file_entry("index.json", index_bytes.len() as u64),
            &mut &index_bytes[..],
        )
        .map_err(wio)?;
        tw.append(&dir_entry("blobs"), &mut io::empty())
            .map_err(wio)?;
        tw.append(&dir_entry("blobs/sha256"), &mut io::empty())
            .map_err(wio)?;
        let mut blobs = vec![img.descriptor.clone(), img.manifest.config().clone()];
        blobs.extend(img.manifest.layers().iter().cloned());
        let mut seen = std::collections::BTreeSet::new();
        for d in blobs {
            if seen.insert(d.digest().to_string()) {
                self.append_blob(tw, &format!("blobs/sha256/{}", d.digest().digest()), &d)?;
            }
        }
        Ok(())
    }

    fn export_docker<W: Write>(
        &self,
        img: &Image,
        tw: &mut TarWriter<W>,
    ) -> Result<(), StoreError> {
        let diff_ids = img.config.rootfs().diff_ids();
        if diff_ids.len() != img.manifest.layers().len() {
            return Err(StoreError::BadDocument {
                what: "config",
                path: self.blob_path(img.manifest.config().digest()),
                reason: "diff_ids and layers differ in number".into(),
            });
        }
        let config_name = format!("{}.json", img.manifest.config().digest().digest());
        let mut layer_names = Vec::new();
        for (l, diff_id) in img.manifest.layers().iter().zip(diff_ids) {
            let dir = diff_id
                .strip_prefix("sha256:")
                .unwrap_or(diff_id)
                .to_string();
            let member = format!("{dir}/layer.tar");
            // First pass: the uncompressed size (tar needs it up front).
            let size = io::copy(&mut self.layer_reader(l)?, &mut io::sink())
                .map_err(|e| StoreError::io("decompress layer", &self.blob_path(l.digest()), e))?;
            tw.append(&dir_entry(&dir), &mut io::empty()).map_err(wio)?;
            let mut r = crate::digest::HashReader::new(self.layer_reader(l)?);
            tw.append(&file_entry(&member, size), &mut r)
                .map_err(|e| StoreError::io("export layer", &self.blob_path(l.digest()), e))?;
            let (got, _) = r.finish();
            if got.to_string() != *diff_id {
                return Err(StoreError::DigestMismatch {
                    what: format!("layer {}", l.digest()),
                    expected: diff_id.clone(),
                    actual: got.to_string(),
                });
            }
            layer_names.push(member);
        }
        let c = &img.config_bytes;
        tw.append(&file_entry(&config_name, c.len() as u64), &mut &c[..])
            .map_err(wio)?;
        let tags: Vec<String> = ImageName::parse(&img.name)
            .map(|n| vec![n.to_string()])
            .unwrap_or_default();
        let manifest = serde_json::to_vec(
            &json!([{ "Config": config_name, "RepoTags": tags, "Layers": layer_names }]),
        )
        .map_err(|e| StoreError::BadDocument {
            what: "manifest.json",
            path: "<export>".into(),
            reason: e.to_string(),
        })?;
        tw.append(
            &file_entry("manifest.json", manifest.len() as u64),
            &mut &manifest[..],
        )
        .map_err(wio)?;
        if let Ok(n) = ImageName::parse(&img.name) {
            let top = img.manifest.config().digest().digest().to_string();
            let repos =
                serde_json::to_vec(&json!({ n.repository(): { n.tag(): top } })).map_err(|e| {
                    StoreError::BadDocument {
                        what: "repositories",
                        path: "<export>".into(),
                        reason: e.to_string(),
                    }
                })?;
            tw.append(
                &file_entry("repositories", repos.len() as u64),
                &mut &repos[..],
            )
            .map_err(wio)?;
        }
        Ok(())
    }

    /// An uncompressed, digest-verified reader of a layer blob.
    pub fn layer_reader(&self, layer: &Descriptor) -> Result<Box<dyn Read + Send>, StoreError> {
        let r = self.open_blob(layer.digest(), Some(layer.size()))?;
        let path = self.blob_path(layer.digest());
        let (head, r) =
            crate::layer::codec::peek(r, 16).map_err(|e| StoreError::io("read layer", &path, e))?;
        let codec = crate::layer::codec::sniff_codec(&head);
        crate::layer::codec::decoder(codec, r)
            .map_err(|e| StoreError::io("decompress layer", &path, e))
    }
}
