//! Import: a source (directory, tarball, image archive) becomes an image in
//! the store.
//!
//! Root file-system sources become one normalized layer written in a single
//! streaming pass: read -> check paths -> tar -> hash (diff_id) -> compress
//! -> hash (blob digest) -> store. Memory stays flat whatever the input size.

mod archive;
mod via_vm;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use serde::Serialize;

pub use crate::layer::{
    check_whiteout, normalize_path, sparse, Compression, Encoder, Entry, EntryKind, LayerError,
    ParGzip, PathError, PathGuard, TarWriter,
};

use crate::digest::HashWriter;
use crate::progress::{Event, Events};
use crate::source::{self, archive::FileSet, ExpansionLimits};
use crate::store::{canonical_json, ImageName, Store, StoreError};

/// Errors of `kiln import`, each naming the step, the input and where in it.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Reading the input or writing the layer failed.
    #[error(transparent)]
    Layer(#[from] LayerError),
    /// A disk image, ISO or chunk stream could not be read (the error
    /// names the reader and the offset).
    #[error("import: {path}: {source}")]
    Disk {
        /// The input.
        path: String,
        /// What went wrong, where.
        #[source]
        source: crate::source::disk::chain::DiskError,
    },
    /// The VM that reads a file system (`ChainOptions::via_vm`) failed.
    #[error("import: {path}: {source}")]
    Vm {
        /// The input.
        path: String,
        /// What went wrong.
        #[source]
        source: crate::vm::VmError,
    },
    /// A store operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What to import.
pub enum ImportSource {
    /// A file or directory; its content decides how it is read.
    Path(PathBuf),
    /// A stream (e.g. stdin) holding a tarball or image archive.
    Reader(Box<dyn Read + Send>),
}

/// Options of [`Store::import`]. Build with [`ImportOptions::new`] and the
/// public fields; every field documents its default.
///
/// ```no_run
/// use kiln::{ImportOptions, ImportSource, Store};
/// let store = Store::open("/tmp/kiln-store")?;
/// let mut opts = ImportOptions::new("toolchain:v1");
/// opts.compression = kiln::Compression::Zstd;
/// opts.source_date_epoch = Some(1_700_000_000);
/// let report = store.import(ImportSource::Path("rootfs.tar.gz".into()), &opts)?;
/// println!("{} {}", report.name, report.manifest_digest);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct ImportOptions {
    /// `NAME[:TAG]` to tag the result with (tag defaults to `latest`).
    pub tag: String,
    /// Layer compression. Default gzip.
    pub compression: Compression,
    /// Compression level. Default 1 (gzip 0-9, zstd 1-19).
    pub level: Option<i32>,
    /// Clamp every mtime to this and use it as the image's `created` time
    /// (root file-system sources; image archives keep their layers and
    /// config). Default none: mtimes kept, no `created` (both reproducible).
    pub source_date_epoch: Option<i64>,
    /// Image architecture (`amd64`, `arm64`, ...). Default: the host's.
    pub arch: Option<String>,
    /// Image OS. Default `linux`.
    pub os: Option<String>,
    /// `KEY=VALUE` environment. Default: a standard `PATH`.
    pub env: Vec<String>,
    /// Working directory. Default none (`/`).
    pub workdir: Option<String>,
    /// Default command. Default none.
    pub cmd: Option<Vec<String>>,
    /// Entrypoint. Default none.
    pub entrypoint: Option<Vec<String>>,
    /// Labels. Default none.
    pub labels: BTreeMap<String, String>,
    /// Which image of a multi-image archive to import (a tag or ref name).
    /// Default: the only one; an error if there are several.
    pub image: Option<String>,
    /// Decompression-bomb limits.
    pub limits: ExpansionLimits,
    /// Choices for disk-image sources (`--path`, `--partition`,
    /// `--parent`, `--backing`). Default: detect everything.
    pub disk: crate::source::disk::chain::ChainOptions,
    /// The VM that reads a file system when `disk.via_vm` is set. Default:
    /// detected accelerator, a temp directory in the store.
    pub vm: crate::vm::VmOptions,
    /// How the owners of root file-system entries are rewritten. Default
    /// [`Owners::Keep`].
    pub owners: Owners,
}

/// One import: its options and where its events go (it derefs to the
/// [`ImportOptions`]).
pub(crate) struct Job<'a> {
    opts: &'a ImportOptions,
    events: Events<'a>,
}

impl std::ops::Deref for Job<'_> {
    type Target = ImportOptions;
    fn deref(&self) -> &ImportOptions {
        self.opts
    }
}

impl Job<'_> {
    /// Hands an event to the caller (see [`Store::import_with_events`]).
    pub(crate) fn emit(&self, e: Event) {
        self.events.emit(e);
    }
}

/// How an import rewrites the owners of root file-system entries
/// (directories, tarballs, disk images; image archives keep their layers).
///
/// A directory an unprivileged user unpacked or built belongs to that
/// user; in a sandbox, root would then not own `/etc`. [`Owners::ToRoot`]
/// gives the caller's files to root, as `tar --owner=0 --group=0` would
/// for all.
///
/// ```
/// use kiln::import::{ImportOptions, Owners};
/// let mut opts = ImportOptions::new("toolchain");
/// opts.owners = Owners::ToRoot { uid: 1000, gid: 1000 };
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Owners {
    /// Owners as the source has them.
    #[default]
    Keep,
    /// Every entry gets this owner.
    All {
        /// The uid.
        uid: u32,
        /// The gid.
        gid: u32,
    },
    /// Entries owned by `uid` become uid 0 and entries of group `gid`
    /// become gid 0; other owners are kept.
    ToRoot {
        /// The uid that becomes 0.
        uid: u32,
        /// The gid that becomes 0.
        gid: u32,
    },
}

impl ImportOptions {
    /// Options with every default and the given tag.
    pub fn new(tag: impl Into<String>) -> Self {
        ImportOptions {
            tag: tag.into(),
            compression: Compression::Gzip,
            level: None,
            source_date_epoch: None,
            arch: None,
            os: None,
            env: Vec::new(),
            workdir: None,
            cmd: None,
            entrypoint: None,
            labels: BTreeMap::new(),
            image: None,
            limits: ExpansionLimits::default(),
            disk: crate::source::disk::chain::ChainOptions::default(),
            vm: crate::vm::VmOptions::default(),
            owners: Owners::Keep,
        }
    }

    fn has_metadata(&self) -> bool {
        self.arch.is_some()
            || self.os.is_some()
            || !self.env.is_empty()
            || self.workdir.is_some()
            || self.cmd.is_some()
            || self.entrypoint.is_some()
            || !self.labels.is_empty()
    }
}

/// One layer of an imported image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInfo {
    /// Compressed blob digest.
    pub digest: String,
    /// Uncompressed tar digest.
    pub diff_id: String,
    /// Compressed size.
    pub size: u64,
    /// Layer media type.
    pub media_type: String,
}

/// The result of an import.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The tag written.
    pub name: String,
    /// What the source was.
    pub source_kind: String,
    /// Manifest digest: the image's identity.
    pub manifest_digest: String,
    /// Config digest.
    pub config_digest: String,
    /// The layers.
    pub layers: Vec<LayerInfo>,
    /// Entries written (root file-system sources).
    pub entries: u64,
}

/// The standard PATH used when an image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host's architecture in OCI terms.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// An uncompressed layer stream on its way into the store: hashed once for
/// the diff_id, compressed, hashed again (compressed) and written as a blob.
pub(crate) struct LayerSink {
    out: BufWriter<HashWriter<Encoder<crate::store::BlobWriter>>>,
    compression: Compression,
}

impl LayerSink {
    pub(crate) fn new(
        store: &Store,
        compression: Compression,
        level: Option<i32>,
    ) -> Result<Self, ImportError> {
        let enc =
            Encoder::new(store.blob_writer()?, compression, level).map_err(LayerError::Write)?;
        Ok(LayerSink {
            out: BufWriter::with_capacity(256 << 10, HashWriter::new(enc)),
            compression,
        })
    }

    /// Uncompressed bytes written so far.
    fn written(&self) -> u64 {
        self.out.get_ref().count() + self.out.buffer().len() as u64
    }

    /// Compresses the rest and commits the blob.
    pub(crate) fn finish(self) -> Result<LayerInfo, ImportError> {
        let hw = self
            .out
            .into_inner()
            .map_err(|e| LayerError::Write(e.into_error()))?;
        let (enc, diff_id, _) = hw.finish();
        let (digest, size) = enc.finish().map_err(LayerError::Write)?.commit()?;
        Ok(LayerInfo {
            digest: digest.to_string(),
            diff_id: diff_id.to_string(),
            size,
            media_type: self.compression.media_type().to_string(),
        })
    }
}

impl Write for LayerSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Writes one layer blob from a stream of entries.
pub(crate) struct LayerBuilder {
    tar: TarWriter<LayerSink>,
    guard: PathGuard,
    epoch: Option<i64>,
    max_bytes: u64,
    source_name: String,
    owners: Owners,
    /// Entries added, and how many of them belong to the caller (when
    /// the caller is not root), for the ownership warning.
    added: u64,
    callers: u64,
}

impl LayerBuilder {
    pub(crate) fn new(
        store: &Store,
        opts: &ImportOptions,
        source_name: &str,
    ) -> Result<Self, ImportError> {
        Ok(LayerBuilder {
            tar: TarWriter::new(LayerSink::new(store, opts.compression, opts.level)?),
            guard: PathGuard::default(),
            epoch: opts.source_date_epoch,
            max_bytes: opts.limits.max_bytes,
            source_name: source_name.to_string(),
            owners: opts.owners,
            added: 0,
            callers: 0,
        })
    }

    /// Checks, normalizes and appends one entry. `offset` locates it in the input.
    pub(crate) fn add(
        &mut self,
        mut e: Entry,
        data: &mut dyn Read,
        offset: u64,
    ) -> Result<(), LayerError> {
        self.guard
            .check(&mut e)
            .map_err(|reason| LayerError::UnsafeEntry {
                source_name: self.source_name.clone(),
                offset,
                reason,
            })?;
        if let Some(epoch) = self.epoch {
            e.mtime = e.mtime.min(epoch);
        }
        // One xattr policy for every source: host labels never enter a layer,
        // and a rootless unpacker's owner record becomes the real owner.
        e.xattrs.remove("security.selinux");
        if let Some(v) = e.xattrs.remove(source::dir::ROOTLESS_XATTR) {
            if let Some((uid, gid)) = source::dir::decode_rootless(&v) {
                if uid != u32::MAX {
                    e.uid = u64::from(uid);
                }
                if gid != u32::MAX {
                    e.gid = u64::from(gid);
                }
            }
        }
        let me = rustix::process::getuid().as_raw();
        self.added += 1;
        if me != 0 && e.uid == u64::from(me) {
            self.callers += 1;
        }
        match self.owners {
            Owners::Keep => {}
            Owners::All { uid, gid } => {
                e.uid = u64::from(uid);
                e.gid = u64::from(gid);
            }
            Owners::ToRoot { uid, gid } => {
                if e.uid == u64::from(uid) {
                    e.uid = 0;
                }
                if e.gid == u64::from(gid) {
                    e.gid = 0;
                }
            }
        }
        if let (EntryKind::File, Some(map)) = (e.kind, &e.sparse) {
            // Sources check their maps; a bad one is a bug, named anyway.
            sparse::check(map, e.size).map_err(|m| LayerError::Corrupt {
                step: "read sparse file map",
                path: self.source_name.clone(),
                offset,
                reason: format!("{:?}: {m}", e.path),
            })?;
        }
        let content = TarWriter::<LayerSink>::content_size(&e).map_err(LayerError::Write)?;
        let written = self.tar.inner_ref().written();
        if written.saturating_add(content) > self.max_bytes {
            return Err(LayerError::Bomb {
                path: self.source_name.clone(),
                exceeded: crate::layer::codec::Expansion::Layer {
                    limit: self.max_bytes,
                    entry: e.path.clone(),
                },
            });
        }
        let mut tap = source::tarball::ErrTap {
            inner: data,
            err: None,
            bomb: None,
        };
        if let Err(err) = self.tar.append(&e, &mut tap) {
            if tap.err.is_none() && err.kind() != io::ErrorKind::UnexpectedEof {
                return Err(LayerError::Write(err));
            }
            // Name the entry whose content could not be read (a tripped
            // bomb guard is its own error, whatever entry it tripped in).
            let err = match tap.bomb.take() {
                Some(x) => io::Error::new(io::ErrorKind::InvalidData, x),
                None if crate::layer::codec::Expansion::of(&err).is_some() => err,
                None => io::Error::new(err.kind(), format!("{err} (in entry {:?})", e.path)),
            };
            return Err(LayerError::from_read(
                &self.source_name,
                "read file data",
                offset,
                &err,
            ));
        }
        Ok(())
    }

    /// Finishes the tar stream and commits the blob.
    pub(crate) fn finish(self) -> Result<(LayerInfo, u64), ImportError> {
        let entries = self.tar.entries();
        let info = self.tar.finish().map_err(LayerError::Write)?.finish()?;
        Ok((info, entries))
    }
}

impl Store {
    /// Imports `source` as a new image tagged `opts.tag`.
    ///
    /// The kind of source is detected from its content: a directory (or an
    /// OCI layout directory), a tarball (plain, gzip, zstd, xz, bzip2), a
    /// `docker save` archive, or an OCI archive. Nothing is tagged unless the
    /// whole import succeeded; blobs of a failed import are left for `gc`.
    pub fn import(
        &self,
        source: ImportSource,
        opts: &ImportOptions,
    ) -> Result<ImportReport, ImportError> {
        self.import_job(
            source,
            &Job {
                opts,
                events: Events::none(),
            },
        )
    }

    /// [`Store::import`], handing what happens to `on_event` as it
    /// happens: what the source was detected as, bytes read, a disk
    /// image's chain, slow steps, warnings, each layer written (the same
    /// style as `Sandbox::run_with_events`).
    ///
    /// ```no_run
    /// use kiln::{Event, ImportOptions, ImportSource, Store};
    /// let store = Store::open("/tmp/kiln-store")?;
    /// let mut warnings = Vec::new();
    /// let report = store.import_with_events(
    ///     ImportSource::Path("rootfs.tar".into()),
    ///     &ImportOptions::new("toolchain"),
    ///     &mut |e| {
    ///         if let Event::Warning(w) = e {
    ///             warnings.push(w);
    ///         }
    ///     },
    /// )?;
    /// println!("{} ({} warnings)", report.name, warnings.len());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn import_with_events(
        &self,
        source: ImportSource,
        opts: &ImportOptions,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<ImportReport, ImportError> {
        self.import_job(
            source,
            &Job {
                opts,
                events: Events::to(on_event),
            },
        )
    }

    fn import_job(
        &self,
        source: ImportSource,
        opts: &Job<'_>,
    ) -> Result<ImportReport, ImportError> {
        let name = ImageName::parse(&opts.tag)?;
        let _writer = self.writer_lock()?;
        let counter = Arc::new(AtomicU64::new(0));
        let (display, raw, total, path): (
            String,
            Box<dyn Read + Send>,
            Option<u64>,
            Option<PathBuf>,
        ) = match source {
            ImportSource::Path(p) => {
                let display = p.display().to_string();
                let md = std::fs::metadata(&p).map_err(|e| LayerError::Open {
                    path: display.clone(),
                    source: e,
                })?;
                if crate::source::disk::chain::recognizes(&p) {
                    return self.import_disk(&p, &display, &name, opts);
                }
                if md.is_dir() {
                    // Through a symlink to a directory: walk the directory itself.
                    let real = std::fs::canonicalize(&p).map_err(|e| LayerError::Open {
                        path: display.clone(),
                        source: e,
                    })?;
                    return self.import_dir(&real, &display, &name, opts);
                }
                let f = File::open(&p).map_err(|e| LayerError::Open {
                    path: display.clone(),
                    source: e,
                })?;
                (
                    display,
                    Box::new(io::BufReader::with_capacity(1 << 20, f)),
                    Some(md.len()),
                    Some(p),
                )
            }
            ImportSource::Reader(r) => ("-".to_string(), r, None, None),
        };
        let counted = source::CountingReader::new(raw, Arc::clone(&counter));
        let (head, r) = source::peek(counted, 64 << 10)
            .map_err(|e| LayerError::from_read(&display, "read", 0, &e))?;
        if head.is_empty() {
            return Err(LayerError::Unsupported {
                path: display,
                what: "the input is empty".into(),
            }
            .into());
        }
        let codec = source::sniff_codec(&head);
        // Disk-image magic is only meaningful in raw, non-tar input.
        if codec.is_none() && !source::tar_header_ok(&head) {
            if let Some(what) = source::sniff_unsupported(&head) {
                // A disk image the chain recognizes never gets here from a
                // path: this is stdin (readers seek) or an image the chain
                // has no reader for.
                let why = if path.is_none() {
                    "disk images are read from a file, not a stream: save it to a file and import that"
                } else {
                    "kiln has no reader for it"
                };
                return Err(LayerError::Unsupported {
                    path: display,
                    what: format!("{what}; {why}"),
                }
                .into());
            }
        }
        let dec = source::decoder(codec, r)
            .map_err(|e| LayerError::from_read(&display, "start decompressor", 0, &e))?;
        // Every input is held to --max-size; compressed ones also to --max-ratio.
        let ratio_counter = codec.map(|_| Arc::clone(&counter));
        let guarded = source::BombGuard::new(dec, ratio_counter, opts.limits);
        // Counts decompressed bytes so errors can say where in the stream they happened.
        let dcount = Arc::new(AtomicU64::new(0));
        let guarded = source::CountingReader::new(guarded, Arc::clone(&dcount));
        let step = if codec.is_some() {
            "decompress"
        } else {
            "read"
        };
        let (dhead, stream) = source::peek(guarded, 256 << 10).map_err(|e| {
            LayerError::from_read(&display, step, dcount.load(Ordering::Relaxed), &e)
        })?;
        if dhead.is_empty() {
            return Err(LayerError::Unsupported {
                path: display,
                what: format!(
                    "the {} stream decompresses to nothing",
                    codec.map(|c| c.to_string()).unwrap_or_default()
                ),
            }
            .into());
        }
        let ctext = codec.map(|c| format!(" ({c})")).unwrap_or_default();
        if source::archive::looks_like_archive(&dhead) {
            opts.emit(Event::Detected {
                kind: format!("image archive{ctext}"),
                total,
            });
            let spooled;
            let set = match (&path, codec) {
                (Some(p), None) => FileSet::index_tar(p, &display)?,
                _ => {
                    // Compressed or streamed archives need random access: spool
                    // the decompressed tar into the store's temp dir.
                    let mut tmp = tempfile::NamedTempFile::with_prefix_in(
                        "archive-",
                        self.root().join(".kiln/tmp"),
                    )
                    .map_err(LayerError::Write)?;
                    let mut stream = stream;
                    copy_classified(&mut stream, tmp.as_file_mut(), &display, &dcount)?;
                    spooled = tmp;
                    FileSet::index_tar(spooled.path(), &display)?
                }
            };
            let report = archive::import_archive(self, &set, &display, &name, opts)?;
            opts.emit(Event::Progress {
                done: counter.load(Ordering::Relaxed),
                total,
            });
            return Ok(report);
        }
        if !source::tar_header_ok(&dhead) {
            if dhead.len() >= 263 && &dhead[257..262] == b"ustar" {
                return Err(LayerError::Corrupt {
                    step: "read tar header",
                    path: display,
                    offset: 0,
                    reason: "the first tar header has a bad checksum".into(),
                }
                .into());
            }
            let magic: String = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
            return Err(LayerError::Unsupported {
                path: display,
                what: format!("not a directory, tarball or image archive (first bytes {magic})"),
            }
            .into());
        }
        opts.emit(Event::Detected {
            kind: format!("tarball{ctext}"),
            total,
        });
        // The history names the source kind but not its compression: the same
        // tree gives the same image whether it came gzip'd or plain.
        let kind = "tarball".to_string();
        let mut layer = LayerBuilder::new(self, opts, &display)?;
        let mut last = 0u64;
        let mut absolute: (u64, Option<String>) = (0, None);
        source::tarball::walk(stream, &display, &mut |e, data, pos| {
            if pos.absolute {
                absolute.0 += 1;
                absolute.1.get_or_insert_with(|| format!("/{}", e.path));
            }
            layer.add(e, data, pos.offset)?;
            let done = counter.load(Ordering::Relaxed);
            if done - last >= 4 << 20 {
                last = done;
                opts.emit(Event::Progress { done, total });
            }
            Ok(())
        })?;
        opts.emit(Event::Progress {
            done: counter.load(Ordering::Relaxed),
            total,
        });
        if let (n @ 1.., Some(first)) = absolute {
            opts.emit(Event::Warning(format!("{display}: {n} entries had absolute paths (first: {first}); stored relative to the image root")),
            );
        }
        self.finish_rootfs(layer, &name, opts, &kind)
    }

    fn import_dir(
        &self,
        dir: &std::path::Path,
        display: &str,
        name: &ImageName,
        opts: &Job<'_>,
    ) -> Result<ImportReport, ImportError> {
        if dir.join("oci-layout").is_file() && dir.join("index.json").is_file() {
            opts.emit(Event::Detected {
                kind: "OCI layout directory".into(),
                total: None,
            });
            let set = FileSet::Dir(dir.to_path_buf());
            return archive::import_archive(self, &set, display, name, opts);
        }
        opts.emit(Event::Detected {
            kind: "directory".into(),
            total: None,
        });
        let mut layer = LayerBuilder::new(self, opts, display)?;
        let mut count = 0u64;
        let skipped = source::dir::walk(dir, &mut |e, data| {
            count += 1;
            layer.add(e, data, 0)
        })?;
        if opts.owners == Owners::Keep && layer.added > 0 && layer.callers == layer.added {
            opts.emit(Event::Warning(format!(
                    "every file of {display} is owned by you (uid {}): in the image they belong to that uid, and root in the sandbox cannot write /etc; use {} to give them to root (or {})",
                    rustix::process::getuid().as_raw(),
                    crate::words::Opt::MapCaller,
                    crate::words::Opt::OwnerRoot
                )),
            );
        }
        if skipped > 0 {
            opts.emit(Event::Warning(format!(
                "skipped {skipped} socket(s): sockets cannot be stored in a layer"
            )));
        }
        self.finish_rootfs(layer, name, opts, "directory")
    }

    /// A disk image, ISO, XVA or chunk folder: the file system at the end of
    /// the detected chain, walked in userspace (no loop device, no mount).
    fn import_disk(
        &self,
        path: &std::path::Path,
        display: &str,
        name: &ImageName,
        opts: &Job<'_>,
    ) -> Result<ImportReport, ImportError> {
        let mut copts = opts.disk.clone();
        copts.max_stream.get_or_insert(opts.limits.max_bytes);
        // A VM's files (a copy of the file system, its output) live in the
        // store's temp directory for the import only.
        let mut _vm_work = None;
        let mut vm = opts.vm.clone();
        if copts.via_vm {
            if vm.work.as_os_str().is_empty() {
                let tmp = self.root().join(".kiln/tmp");
                let dir = tempfile::Builder::new()
                    .prefix("vm-")
                    .tempdir_in(&tmp)
                    .map_err(|e| ImportError::Vm {
                        path: display.to_string(),
                        source: crate::vm::VmError::Io {
                            step: "create a work directory",
                            path: tmp.display().to_string(),
                            source: e,
                        },
                    })?;
                vm.work = dir.path().to_path_buf();
                _vm_work = Some(dir);
            }
            if vm.cache.as_os_str().is_empty() {
                vm.cache = self.root().join(".kiln/vm");
            }
            if vm.accel_state.as_os_str().is_empty() {
                vm.accel_state = crate::vm::default_accel_state()
                    .unwrap_or_else(|| self.root().join(".kiln/vm-accel"));
            }
            vm.max_bytes = vm.max_bytes.min(opts.limits.max_bytes);
        }
        let disk_err = |e: crate::source::disk::chain::DiskError| ImportError::Disk {
            path: display.to_string(),
            source: e,
        };
        let chain = crate::source::disk::chain::Chain::open(path, &copts).map_err(disk_err)?;
        let total = (chain.outer_size > 0).then_some(chain.outer_size);
        opts.emit(Event::DiskChain(chain.to_string()));
        opts.emit(Event::Detected {
            kind: chain.to_string(),
            total,
        });
        let mut layer = LayerBuilder::new(self, opts, display)?;
        let mut n = 0u64;
        /// The walk fails in a reader or in the layer writer.
        enum Fail {
            Disk(crate::source::disk::chain::DiskError),
            Import(ImportError),
        }
        impl From<crate::source::disk::chain::DiskError> for Fail {
            fn from(e: crate::source::disk::chain::DiskError) -> Self {
                Fail::Disk(e)
            }
        }
        impl From<ImportError> for Fail {
            fn from(e: ImportError) -> Self {
                Fail::Import(e)
            }
        }
        let mut note = |n: &str| opts.emit(Event::Step(n.to_string()));
        let add = |e: Entry, data: &mut dyn Read| -> Result<(), Fail> {
            n += 1;
            if n.is_multiple_of(256) {
                opts.emit(Event::Progress {
                    done: chain.bytes_read().min(chain.outer_size),
                    total,
                });
            }
            layer.add(e, data, 0).map_err(|e| Fail::Import(e.into()))
        };
        let walked = match chain.in_vm() {
            Some((src, fstype)) => via_vm::walk(src, fstype, &vm, display, &mut note, add),
            None => chain.walk(add),
        };
        match walked {
            Ok(()) => {}
            Err(Fail::Disk(e)) => return Err(disk_err(e)),
            Err(Fail::Import(e)) => return Err(e),
        }
        if chain.sockets_skipped() > 0 {
            opts.emit(Event::Warning(format!(
                "skipped {} socket(s): sockets cannot be stored in a layer",
                chain.sockets_skipped()
            )));
        }
        let kind = chain
            .steps
            .iter()
            .map(|s| s.reader.as_str())
            .collect::<Vec<_>>()
            .join(" > ");
        self.finish_rootfs(layer, name, opts, &kind)
    }

    fn finish_rootfs(
        &self,
        layer: LayerBuilder,
        name: &ImageName,
        opts: &Job<'_>,
        kind: &str,
    ) -> Result<ImportReport, ImportError> {
        let (info, entries) = layer.finish()?;
        opts.emit(Event::LayerWritten {
            digest: info.digest.clone(),
            size: info.size,
        });
        let config = build_config(
            opts,
            None,
            std::slice::from_ref(&info.diff_id),
            &format!("kiln import ({kind})"),
        )?;
        let (manifest_digest, config_digest) =
            self.write_image(&config, std::slice::from_ref(&info), name)?;
        Ok(ImportReport {
            name: name.to_string(),
            source_kind: kind.to_string(),
            manifest_digest,
            config_digest,
            layers: vec![info],
            entries,
        })
    }

    /// Writes config + manifest blobs for `layers` and tags the manifest.
    pub(crate) fn write_image(
        &self,
        config_bytes: &[u8],
        layers: &[LayerInfo],
        name: &ImageName,
    ) -> Result<(String, String), ImportError> {
        // Every layer must be here: a tag whose layers are gone (a gc
        // since they were written) is a broken image, not a committed one.
        for l in layers {
            let d = parse_digest(&l.digest)?;
            if !self.has_blob(&d) {
                return Err(crate::store::StoreError::BlobMissing(d.to_string()).into());
            }
        }
        let (config_digest, config_size) = self.put_blob(config_bytes)?;
        let mut descs = Vec::new();
        for l in layers {
            descs.push(Descriptor::new(
                MediaType::from(l.media_type.as_str()),
                l.size,
                parse_digest(&l.digest)?,
            ));
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_size,
                config_digest.clone(),
            ))
            .layers(descs)
            .build()
            .map_err(|e| LayerError::Archive {
                path: name.to_string(),
                reason: format!("build manifest: {e}"),
            })?;
        let bytes = canonical_json(&manifest)?;
        let (md, msize) = self.put_blob(&bytes)?;
        let desc = Descriptor::new(MediaType::ImageManifest, msize, md.clone());
        self.set_tag(name, &desc)?;
        Ok((md.to_string(), config_digest.to_string()))
    }
}

/// Copies a decompressing stream, classifying read errors as input errors.
fn copy_classified(
    r: &mut dyn Read,
    w: &mut dyn Write,
    display: &str,
    pos: &AtomicU64,
) -> Result<u64, ImportError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = match r.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(LayerError::from_read(
                    display,
                    "decompress",
                    pos.load(Ordering::Relaxed),
                    &e,
                )
                .into())
            }
        };
        w.write_all(&buf[..k]).map_err(LayerError::Write)?;
        n += k as u64;
    }
}

pub(crate) fn parse_digest(s: &str) -> Result<Digest, ImportError> {
    s.parse::<Digest>().map_err(|e| {
        LayerError::Archive {
            path: s.to_string(),
            reason: format!("bad digest: {e}"),
        }
        .into()
    })
}

/// Builds the image config for an import. `base` is an existing config to
/// amend (archives); `diff_ids` are the layers.
pub(crate) fn build_config(
    opts: &ImportOptions,
    base: Option<ImageConfiguration>,
    diff_ids: &[String],
    created_by: &str,
) -> Result<Vec<u8>, ImportError> {
    let bad = |e: String| LayerError::Archive {
        path: opts.tag.clone(),
        reason: format!("build config: {e}"),
    };
    let created = opts.source_date_epoch.map(rfc3339);
    let mut cfg = match base {
        Some(c) => c,
        None => {
            for d in diff_ids {
                parse_digest(d)?;
            }
            let ids = diff_ids.to_vec();
            let mut hist = HistoryBuilder::default()
                .created_by(created_by.to_string())
                .comment("kiln".to_string());
            if let Some(c) = &created {
                hist = hist.created(c.clone());
            }
            let rootfs = RootFsBuilder::default()
                .typ("layers")
                .diff_ids(ids)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let mut b = ImageConfigurationBuilder::default()
                .architecture(Arch::from(host_arch()))
                .os(Os::Linux)
                .rootfs(rootfs)
                .history(vec![hist.build().map_err(|e| bad(e.to_string()))?]);
            if let Some(c) = &created {
                b = b.created(c.clone());
            }
            b.build().map_err(|e| bad(e.to_string()))?
        }
    };
    if let Some(a) = &opts.arch {
        cfg.set_architecture(Arch::from(a.as_str()));
    }
    if let Some(o) = &opts.os {
        cfg.set_os(Os::from(o.as_str()));
    }
    if created.is_some() {
        cfg.set_created(created);
    }
    let mut c = cfg
        .config()
        .clone()
        .unwrap_or_else(|| ConfigBuilder::default().build().unwrap_or_default());
    let mut env = c.env().clone().unwrap_or_default();
    for kv in &opts.env {
        let key = kv.split('=').next().unwrap_or(kv);
        env.retain(|e| e.split('=').next() != Some(key));
        env.push(kv.clone());
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    c.set_env(Some(env));
    if let Some(w) = &opts.workdir {
        c.set_working_dir(Some(w.clone()));
    }
    if let Some(cmd) = &opts.cmd {
        c.set_cmd(Some(cmd.clone()));
    }
    if let Some(ep) = &opts.entrypoint {
        c.set_entrypoint(Some(ep.clone()));
    }
    if !opts.labels.is_empty() {
        let mut l = c.labels().clone().unwrap_or_default();
        l.extend(opts.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        c.set_labels(Some(l));
    }
    cfg.set_config(Some(c));
    Ok(canonical_json(&cfg)?)
}

/// Formats seconds since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
