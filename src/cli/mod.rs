//! The `kiln` command line: clap definitions and the glue that calls the
//! library. Nothing outside this module uses clap.

mod export;
mod images;
mod import;
mod output;
mod run;
mod unpack;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use kiln::Store;

/// kiln: rootless image-build sandbox runtime.
#[derive(Parser, Debug)]
#[command(name = "kiln", version, about, propagate_version = true)]
pub struct Cli {
    /// Image store directory (an OCI image layout).
    /// Default: $KILN_HOME, else $XDG_DATA_HOME/kiln, else ~/.local/share/kiln.
    #[arg(long, global = true, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// Use a store that another user owns or can change (kiln refuses
    /// one otherwise): that user can then change what kiln runs.
    #[arg(long, global = true, env = "KILN_TRUST_STORE", value_parser = clap::builder::BoolishValueParser::new())]
    pub trust_store: bool,

    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command inside an image (rootless namespace sandbox).
    Run(Box<run::RunArgs>),
    /// Import a directory, tarball, docker-save or OCI archive, or a disk
    /// image (ISO, chunk folder, XVA, VHD, qcow2, raw; MBR/GPT; ext2/3/4).
    Import(Box<import::ImportArgs>),
    /// List images.
    Images(images::ImagesArgs),
    /// Show an image's manifest and config as JSON.
    Inspect(images::InspectArgs),
    /// Give an image another name.
    Tag(images::TagArgs),
    /// Remove image names (blobs go at the next gc).
    Rm(images::RmArgs),
    /// Delete blobs no image uses, and stale temp files.
    Gc(images::GcArgs),
    /// Verify every blob's digest and every image's references (and with
    /// --rootfs every cached tree); --repair fixes what can be fixed.
    Fsck(images::FsckArgs),
    /// Write an image as an oci-archive or docker-archive tarball.
    Export(export::ExportArgs),
    /// Unpack an image's layers into a directory (path-safe, whiteouts applied).
    Unpack(unpack::UnpackArgs),
    /// Print the path of the image's cached, read-only root file system
    /// (unpacked once per layer chain, shared by every run); --drop and
    /// --rebuild remove it.
    Rootfs(unpack::RootfsArgs),
    /// Show what a disk image, ISO, XVA or chunk folder holds: the detected
    /// chain down to the file system.
    Probe(import::ProbeArgs),
    /// Print the OCI digest (sha256:...) of files, or of stdin with `-`.
    Digest(export::DigestArgs),
}

/// Opens the store named by `--store` or the default location.
pub fn open_store(cli: &Cli) -> Result<Store> {
    let path = match &cli.store {
        Some(p) => p.clone(),
        None => Store::default_path()?,
    };
    let opts = kiln::StoreOptions {
        trust_owner: cli.trust_store,
    };
    Store::open_with(&path, &opts).with_context(|| format!("open store {}", path.display()))
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    match &cli.command {
        Command::Import(a) => import::run(&cli, a),
        Command::Run(a) => run::run(&cli, a),
        Command::Images(a) => images::images(&cli, a),
        Command::Inspect(a) => images::inspect(&cli, a),
        Command::Tag(a) => images::tag(&cli, a),
        Command::Rm(a) => images::rm(&cli, a),
        Command::Gc(a) => images::gc(&cli, a),
        Command::Fsck(a) => images::fsck(&cli, a),
        Command::Export(a) => export::run(&cli, a),
        Command::Digest(a) => export::digest(a),
        Command::Probe(a) => import::probe(a),
        Command::Unpack(a) => unpack::run(&cli, a),
        Command::Rootfs(a) => unpack::rootfs(&cli, a),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks (conflicting names, bad defaults, env flags),
        // which otherwise run only in debug builds at parse time.
        super::Cli::command().debug_assert();
    }

    #[test]
    fn trust_store_and_sizes_parse() {
        let cli = super::Cli::try_parse_from([
            "kiln",
            "--trust-store",
            "run",
            "--tmpfs-size",
            "512m",
            "--memory",
            "2g",
            "img",
        ])
        .expect("parses");
        assert!(cli.trust_store);
        let super::Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.tmpfs_size, Some(512 << 20));
        assert_eq!(r.memory, Some(2 << 30));
        assert!(super::Cli::try_parse_from(["kiln", "run", "--shm-size", "lots", "img"]).is_err());
    }
}
