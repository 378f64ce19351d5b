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

    /// More log output on stderr (repeat for more): `kiln -vv COMMAND`.
    /// Given before the command (`run -v` is a volume); KILN_LOG=debug
    /// works anywhere.
    #[arg(short, long, action = clap::ArgAction::Count)]
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
    /// Print a shell completion script: kiln completions bash >
    /// /etc/bash_completion.d/kiln (also zsh, fish, elvish, powershell).
    Completions(CompletionsArgs),
    /// Write the manual pages (kiln.1 and kiln-COMMAND.1) into a folder,
    /// e.g. kiln man /usr/local/share/man/man1.
    Man(ManArgs),
    /// Run a host command inside your user namespace mapping (root there,
    /// your /etc/subuid range mapped), e.g. to remove files a run left
    /// owned by subordinate ids: kiln unshare rm -rf DIR.
    Unshare(UnshareArgs),
}

/// `kiln completions SHELL`
#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// `kiln man DIR`
#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// The folder to write the pages into (created if missing).
    pub dir: PathBuf,
}

/// Writes `kiln.1` and one `kiln-COMMAND.1` per command into `dir`.
fn write_man_pages(dir: &std::path::Path) -> Result<i32> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("man: create {}", dir.display()))?;
    let top = Cli::command();
    let mut pages = vec![("kiln".to_string(), top.clone())];
    for sub in top.get_subcommands() {
        let name = format!("kiln-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, cmd) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut page)
            .with_context(|| format!("man: render {name}"))?;
        std::fs::write(&path, page).with_context(|| format!("man: write {}", path.display()))?;
    }
    Ok(0)
}

/// `kiln unshare CMD [ARGS...]`
#[derive(clap::Args, Debug)]
pub struct UnshareArgs {
    /// Command and arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// The store path and how it was chosen (said in errors).
fn store_path(cli: &Cli) -> Result<(PathBuf, &'static str)> {
    let nonempty = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    Ok(match &cli.store {
        Some(p) => (p.clone(), "--store"),
        None => (
            Store::default_path()?,
            if nonempty("KILN_HOME") {
                "$KILN_HOME"
            } else if nonempty("XDG_DATA_HOME") {
                "$XDG_DATA_HOME/kiln, the default"
            } else {
                "~/.local/share/kiln, the default"
            },
        ),
    })
}

fn open(cli: &Cli, must_exist: bool) -> Result<Store> {
    let (path, how) = store_path(cli)?;
    let opts = kiln::StoreOptions {
        trust_owner: cli.trust_store,
        must_exist,
    };
    Store::open_with(&path, &opts).map_err(|e| {
        let hint = if matches!(e, kiln::store::StoreError::NoStore { .. }) {
            "; import an image first (kiln import), or name the store with --store or KILN_HOME"
        } else {
            ""
        };
        anyhow::anyhow!("{e} (store chosen by {how}){hint}")
    })
}

/// Opens the existing store named by `--store` or the default location
/// (commands that only read, or need an image: a mistyped path is an
/// error, not a new empty store).
pub fn open_store(cli: &Cli) -> Result<Store> {
    open(cli, true)
}

/// Opens the store, creating it if needed (commands that add images).
pub fn create_store(cli: &Cli) -> Result<Store> {
    open(cli, false)
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
        Command::Unshare(a) => Ok(kiln::userns::unshare(&a.command)?),
        Command::Man(a) => write_man_pages(&a.dir),
        Command::Completions(a) => {
            use clap::CommandFactory;
            clap_complete::generate(a.shell, &mut Cli::command(), "kiln", &mut std::io::stdout());
            Ok(0)
        }
    }
    .map_err(|e| with_store_hint(&cli, e))
}

/// A missing image's error names the store searched and how it was chosen.
fn with_store_hint(cli: &Cli, e: anyhow::Error) -> anyhow::Error {
    use kiln::sandbox::RunError;
    use kiln::store::StoreError;
    let not_found = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::ImageNotFound(_))
        ) || matches!(
            c.downcast_ref::<RunError>(),
            Some(RunError::Store(StoreError::ImageNotFound(_)))
        ) || matches!(
            c.downcast_ref::<kiln::unpack::UnpackError>(),
            Some(kiln::unpack::UnpackError::Store(StoreError::ImageNotFound(
                _
            )))
        )
    });
    match (not_found, store_path(cli)) {
        (true, Ok((path, how))) => anyhow::anyhow!(
            "{} in store {} (chosen by {how}; `kiln images` lists what it holds)",
            crate::error_chain(&e),
            path.display()
        ),
        _ => e,
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

    #[test]
    fn dash_v_is_verbose_before_the_command_and_a_volume_in_run() {
        let cli = super::Cli::try_parse_from(["kiln", "-vv", "run", "-v", "/a:/b", "img"])
            .expect("parses");
        assert_eq!(cli.verbose, 2);
        let super::Command::Run(r) = cli.command else {
            panic!("not run")
        };
        assert_eq!(r.volume, vec!["/a:/b".to_string()]);
    }
}
