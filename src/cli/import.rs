//! `kiln import`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use kiln::{Compression, Event, ExpansionLimits, ImportOptions, ImportSource};

use super::output::{print_json, Format};
use super::{create_store, Cli};

/// `kiln import SOURCE --tag NAME[:TAG]`
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A directory, a tarball (plain, gzip, zstd, xz, bzip2), a docker-save
    /// or OCI archive, an OCI layout directory, or `-` for stdin.
    pub source: PathBuf,
    /// Name for the image, NAME[:TAG] (tag defaults to latest).
    #[arg(short, long, value_name = "NAME[:TAG]")]
    pub tag: String,
    /// Layer compression: gzip (default), zstd or none.
    #[arg(long, default_value = "gzip", value_parser = parse_compression)]
    pub compression: Compression,
    /// Compression level (gzip 0-9, zstd 1-19; default 1).
    #[arg(long)]
    pub level: Option<i32>,
    /// Clamp mtimes to this and set the image's created time.
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "SECONDS")]
    pub source_date_epoch: Option<i64>,
    /// Image architecture (default: the host's).
    #[arg(long)]
    pub arch: Option<String>,
    /// Image OS (default: linux).
    #[arg(long)]
    pub os: Option<String>,
    /// Environment variable KEY=VALUE for the image config (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory for the image config.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Default command: a JSON array, or words split on spaces.
    #[arg(long)]
    pub cmd: Option<String>,
    /// Entrypoint: a JSON array, or words split on spaces.
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Label KEY=VALUE for the image config (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// Give every entry this owner, UID:GID (as tar --owner/--group;
    /// root file-system sources).
    #[arg(long, value_name = "UID:GID", conflicts_with = "map_caller")]
    pub owner: Option<String>,
    /// Files owned by you become root's (uid and gid 0) in the image;
    /// other owners are kept. Use it for a directory you unpacked or built
    /// as an unprivileged user (kiln warns when every file is yours).
    #[arg(long)]
    pub map_caller: bool,
    /// Which image of a multi-image archive to import.
    #[arg(long, value_name = "NAME")]
    pub image: Option<String>,
    /// Refuse inputs that decompress to more than this many bytes.
    #[arg(long, value_name = "BYTES")]
    pub max_size: Option<u64>,
    /// Refuse compressed inputs that expand more than N times (checked after 64 MiB).
    #[arg(long, value_name = "N")]
    pub max_ratio: Option<u64>,
    #[command(flatten)]
    pub disk: DiskArgs,
    /// Output format of the result.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// Choices for disk-image sources (ISO, chunk folders, XVA, VHD, qcow2,
/// raw disks), where detection alone cannot decide.
#[derive(clap::Args, Debug, Clone)]
pub struct DiskArgs {
    /// A file or folder inside an ISO to import from (default: the folder
    /// of disk chunks, else the ISO's own root tree).
    #[arg(long, value_name = "IN_ISO")]
    pub path: Option<String>,
    /// The partition to import (Linux numbering: MBR logicals from 5;
    /// default: the one holding a Linux root).
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
    /// The parent disk of a differencing VHD.
    #[arg(long, value_name = "FILE")]
    pub parent: Option<PathBuf>,
    /// The backing file of a qcow2 overlay.
    #[arg(long, value_name = "FILE")]
    pub backing: Option<PathBuf>,
    /// Read the file system inside a throwaway QEMU VM (for xfs, btrfs,
    /// f2fs, squashfs, ... which kiln has no userspace reader for).
    #[arg(long)]
    pub via_vm: bool,
}

impl DiskArgs {
    pub fn options(&self) -> kiln::disk::chain::ChainOptions {
        kiln::disk::chain::ChainOptions {
            path: self.path.clone(),
            partition: self.partition,
            parent: self.parent.clone(),
            backing: self.backing.clone(),
            max_stream: None,
            via_vm: self.via_vm,
        }
    }
}

/// `kiln probe`: what a disk-image source holds.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// An ISO, XVA, VHD, qcow2 or raw disk image, or a folder of chunks.
    pub source: PathBuf,
    #[command(flatten)]
    pub disk: DiskArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub format: Format,
}

/// What a source that is not a disk image is, when `probe` can tell: a
/// directory without chunks, a tar archive, a compressed tar archive.
fn not_a_disk(path: &std::path::Path) -> Option<String> {
    use std::io::Read;
    let import = "kiln import reads it directly (kiln import SOURCE -t NAME); kiln probe shows what a disk image holds";
    if path.is_dir() {
        let has_chunks = std::fs::read_dir(path)
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("chunk-"));
        if has_chunks {
            return None;
        }
        let what = if path.join("oci-layout").is_file() {
            "an OCI image layout"
        } else {
            "a directory without disk chunks (a root file system?)"
        };
        return Some(format!("{what}: {import}"));
    }
    let mut head = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1024)
        .read_to_end(&mut head)
        .ok()?;
    if kiln::source::tar_header_ok(&head) {
        return Some(format!("a tar archive: {import}"));
    }
    let codec = kiln::source::sniff_codec(&head)?;
    let file = std::fs::File::open(path).ok()?;
    let mut inner = Vec::new();
    kiln::source::decoder(Some(codec), file)
        .ok()?
        .take(1024)
        .read_to_end(&mut inner)
        .ok()?;
    kiln::source::tar_header_ok(&inner)
        .then(|| format!("a compressed ({codec:?}) tar archive: {import}"))
}

pub fn probe(a: &ProbeArgs) -> Result<i32> {
    // Disk detection first (an XVA is a tar too); when it finds nothing,
    // say what the input is if it is another kind kiln imports.
    use kiln::disk::chain::{display_steps, Chain, DiskError};
    // A file system kiln reads only in a VM is a finding, not a failure:
    // the chain down to it, its last step saying what it needs.
    let steps = match Chain::open(&a.source, &a.disk.options()) {
        Ok(c) => c.steps,
        Err(DiskError::NeedsVm { steps, .. }) => steps,
        Err(e) => match not_a_disk(&a.source) {
            Some(what) => anyhow::bail!("probe {}: {what}", a.source.display()),
            None => return Err(e).with_context(|| format!("probe {}", a.source.display())),
        },
    };
    if a.format == Format::Json {
        print_json(&serde_json::json!({
            "source": a.source.display().to_string(),
            "chain": steps,
        }))?;
    } else {
        println!("{}", display_steps(&steps));
    }
    Ok(0)
}

fn parse_compression(s: &str) -> Result<Compression, String> {
    s.parse()
}

fn parse_words(s: &str) -> Result<Vec<String>> {
    if s.trim_start().starts_with('[') {
        return serde_json::from_str(s)
            .with_context(|| format!("parse {s:?} as a JSON array of strings"));
    }
    Ok(s.split_whitespace().map(str::to_string).collect())
}

pub fn run(cli: &Cli, a: &ImportArgs) -> Result<i32> {
    let store = create_store(cli)?;
    let mut opts = ImportOptions::new(a.tag.clone());
    opts.compression = a.compression;
    opts.level = a.level;
    opts.source_date_epoch = a.source_date_epoch;
    opts.arch = a.arch.clone();
    opts.os = a.os.clone();
    opts.env = a.env.clone();
    for kv in &opts.env {
        if !kv.contains('=') {
            bail!("--env {kv:?}: expected KEY=VALUE");
        }
    }
    opts.workdir = a.workdir.clone();
    opts.cmd = a.cmd.as_deref().map(parse_words).transpose()?;
    opts.entrypoint = a.entrypoint.as_deref().map(parse_words).transpose()?;
    let mut labels = BTreeMap::new();
    for kv in &a.label {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--label {kv:?}: expected KEY=VALUE")
        };
        labels.insert(k.to_string(), v.to_string());
    }
    opts.labels = labels;
    opts.image = a.image.clone();
    if let Some(o) = &a.owner {
        let parsed = o
            .split_once(':')
            .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
        let Some((uid, gid)) = parsed else {
            anyhow::bail!("--owner {o:?}: expected numeric UID:GID, e.g. 0:0");
        };
        opts.owners = kiln::import::Owners::All { uid, gid };
    } else if a.map_caller {
        opts.owners = kiln::import::Owners::ToRoot {
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        };
    }
    let mut limits = ExpansionLimits::default();
    if let Some(m) = a.max_size {
        limits.max_bytes = m;
    }
    if let Some(r) = a.max_ratio {
        limits.max_ratio = r;
    }
    opts.limits = limits;
    opts.disk = a.disk.options();

    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        b
    });
    let mut on_event = |e: Event| match (&bar, e) {
        (Some(b), Event::Detected { kind, total }) => {
            b.set_message(format!("importing {kind}"));
            if let Some(t) = total {
                b.set_length(t);
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
            }
        }
        (Some(b), Event::Progress { done, .. }) => b.set_position(done),
        (Some(b), Event::DiskChain(c) | Event::Step(c)) => b.println(format!("kiln: {c}")),
        (Some(b), Event::Warning(w)) => b.println(format!("warning: {w}")),
        (None, Event::Warning(w)) => eprintln!("kiln: warning: {w}"),
        (None, Event::DiskChain(c) | Event::Step(c)) => eprintln!("kiln: {c}"),
        _ => {}
    };
    let source = if a.source.as_os_str() == "-" {
        ImportSource::Reader(Box::new(std::io::stdin()))
    } else {
        ImportSource::Path(a.source.clone())
    };
    let result = store.import_with_events(source, &opts, &mut on_event);
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let report = result?;
    if a.format == Format::Json {
        print_json(&report)?;
    } else {
        println!("{} {}", report.name, report.manifest_digest);
    }
    Ok(0)
}
