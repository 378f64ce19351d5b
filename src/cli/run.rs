//! `kiln run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use kiln::sandbox::Sandbox;
use kiln::spec::{Network, RunSpec, SpecError, Volume};

use super::{open_store, Cli};

/// `kiln run [OPTIONS] IMAGE [--] [CMD [ARGS...]]`
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Set KEY=VALUE, or pass KEY from the host environment (repeatable).
    #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read KEY=VALUE lines from a file (repeatable).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Working directory inside the sandbox (default: the image's, else /).
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Host name inside the sandbox.
    #[arg(long, default_value = "kiln")]
    pub hostname: String,
    /// Network: none (only lo, the default) or host (with --vm: QEMU's user
    /// network, the guest at 10.0.2.15 reaching the host's loopback at
    /// 10.0.2.2).
    #[arg(long, default_value = "none", value_parser = parse_network)]
    pub network: Network,
    /// User to run as inside the sandbox, UID[:GID] or NAME[:GROUP] from
    /// the image's /etc/passwd and /etc/group (default 0:0).
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Stop the sandbox after this long (exit code 124): SIGTERM to the
    /// command, SIGKILL after --timeout-grace. Seconds, or 90s, 5m, 2h.
    #[arg(long, value_name = "DURATION", value_parser = kiln::spec::parse_duration)]
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when --timeout fires (0: kill at once).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = kiln::spec::parse_duration)]
    pub timeout_grace: Duration,
    /// Mount the image read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Bind mount SRC:DST[:OPTIONS] (repeatable); OPTIONS from ro, rw,
    /// dev, suid (default rw, nodev, nosuid).
    #[arg(short, long = "volume", value_name = "SRC:DST[:OPTIONS]")]
    pub volume: Vec<String>,
    /// Seccomp profile: default, or unconfined to turn filtering off.
    #[arg(long, default_value = "default", value_parser = ["default", "unconfined"])]
    pub seccomp: String,
    /// Allow nested user namespaces inside the sandbox.
    #[arg(long)]
    pub allow_userns: bool,
    /// Pass stdin to the command (default: /dev/null).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a pseudo-terminal (its controlling tty); with -i,
    /// the terminal's input goes to it (raw mode).
    #[arg(short, long)]
    pub tty: bool,
    /// After exit code 0, store the run's changes as a new image NAME[:TAG].
    #[arg(long, value_name = "NAME[:TAG]")]
    pub commit: Option<String>,
    /// Clamp committed mtimes and set the new image's created time.
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "SECONDS")]
    pub source_date_epoch: Option<i64>,
    /// User namespace mode: auto (the caller is root inside, plus its
    /// /etc/subuid range when it has one), keep-id (the caller keeps its uid
    /// and gid inside) or self (only the caller is mapped, as root).
    #[arg(long, default_value = "auto", value_parser = ["auto", "keep-id", "self"])]
    pub userns: String,
    /// The run's writable root: auto (kernel overlayfs, else fuse-overlayfs,
    /// else a copy, with a warning), overlay, fuse-overlay or copy.
    #[arg(long, default_value = "auto", value_parser = ["auto", "overlay", "fuse-overlay", "copy"])]
    pub rootfs: String,
    /// Where the run's writes to its root go: auto (memory, or disk with
    /// --commit), memory (a tmpfs only the sandbox sees; nothing touches the
    /// host's disk) or disk (a run directory in the store).
    #[arg(long, default_value = "auto", value_parser = ["auto", "memory", "disk"])]
    pub upper: String,
    /// Same as --rootfs copy.
    #[arg(long)]
    pub rootfs_copy: bool,
    /// Keep a capability (CAP_NAME or NAME; repeatable).
    #[arg(long, value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Resource limit NAME=SOFT[:HARD], e.g. nofile=1024 (repeatable; never
    /// above the current hard limit).
    #[arg(long, value_name = "NAME=SOFT[:HARD]")]
    pub ulimit: Vec<String>,
    /// Memory limit, e.g. 2g (needs a delegated cgroup v2; else a warning).
    /// Also caps /tmp, /dev/shm and the in-memory upper layer.
    #[arg(long, value_name = "SIZE", value_parser = kiln::spec::parse_size)]
    pub memory: Option<u64>,
    /// Size limit of /tmp (a tmpfs), e.g. 512m [default: a quarter of RAM].
    #[arg(long, value_name = "SIZE", value_parser = kiln::spec::parse_size)]
    pub tmpfs_size: Option<u64>,
    /// Size limit of /dev/shm [default: 64m].
    #[arg(long, value_name = "SIZE", value_parser = kiln::spec::parse_size)]
    pub shm_size: Option<u64>,
    /// Size limit of what the command may write to its root with --upper
    /// memory [default: a quarter of RAM].
    #[arg(long, value_name = "SIZE", value_parser = kiln::spec::parse_size)]
    pub upper_size: Option<u64>,
    /// Process limit (needs a delegated cgroup v2; else a warning).
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// Fail (exit 125) instead of warning when --memory or --pids-limit
    /// cannot be enforced on this host.
    #[arg(long)]
    pub require_limits: bool,
    /// Run the command in a throwaway QEMU VM with a kernel of its own
    /// (loop devices, partitions, mounts, modules), KVM when it really
    /// works, else TCG. --memory is then the guest's memory.
    #[arg(long)]
    pub vm: bool,
    /// With --vm: the kernel to boot [default: the host's newest
    /// /boot/vmlinuz-* with its /lib/modules].
    #[arg(long, value_name = "FILE", requires = "vm")]
    pub kernel: Option<PathBuf>,
    /// With --vm: words added to the guest kernel's command line.
    #[arg(long, value_name = "ARGS", requires = "vm", allow_hyphen_values = true)]
    pub kernel_cmdline: Option<String>,
    /// With --vm: an initramfs whose files are added to kiln's (firmware,
    /// modules a kernel of your own needs); kiln's agent stays /init.
    #[arg(long, value_name = "FILE", requires = "vm")]
    pub initrd: Option<PathBuf>,
    /// With --vm: a scratch disk of SIZE for loop, partition and file
    /// system work, /dev/disk/by-id/virtio-kiln-disk (and $KILN_DISK) in
    /// the guest; sparse, gone with the run.
    #[arg(long, value_name = "SIZE", requires = "vm", value_parser = kiln::spec::parse_size)]
    pub disk: Option<u64>,
    /// With --vm: virtual CPUs.
    #[arg(long, value_name = "N", requires = "vm", default_value_t = 1)]
    pub cpus: u32,
    /// With --vm: the accelerator, auto (KVM after a probe shows it works,
    /// else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"], requires = "vm")]
    pub accel: String,
    /// With --vm: print where the time went (kernel and initramfs, QEMU's
    /// start, the kernel's boot, the guest's setup, the command, the
    /// shutdown) to stderr after the run.
    #[arg(long, requires = "vm")]
    pub timings: bool,
    /// Write the run's result as JSON to FILE (also when kiln fails: exit
    /// code 125, the error and the stage; the path is checked first).
    #[arg(long, value_name = "FILE")]
    pub json_status: Option<PathBuf>,
    /// Image name or digest.
    pub image: String,
    /// Command and arguments (default: the image's Entrypoint and Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn parse_network(s: &str) -> Result<Network, String> {
    match s {
        "none" => Ok(Network::None),
        "host" => Ok(Network::Host),
        o => Err(format!("unknown network {o:?} (none, host)")),
    }
}

/// Where --json-status goes: checked writable before the run, written
/// (temp file + rename) whatever the outcome.
struct StatusFile {
    path: PathBuf,
    dir: PathBuf,
}

impl StatusFile {
    fn check(path: &std::path::Path) -> Result<StatusFile> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if path.is_dir() {
            bail!("--json-status {}: is a directory", path.display());
        }
        tempfile::Builder::new()
            .prefix(".kiln-status-")
            .tempfile_in(&dir)
            .with_context(|| format!("--json-status {}: cannot write there", path.display()))?;
        Ok(StatusFile {
            path: path.to_path_buf(),
            dir,
        })
    }

    fn write(&self, value: &serde_json::Value) -> Result<()> {
        let mut t = tempfile::Builder::new()
            .prefix(".kiln-status-")
            .tempfile_in(&self.dir)
            .with_context(|| format!("write {}", self.path.display()))?;
        std::io::Write::write_all(&mut t, &serde_json::to_vec_pretty(value)?)
            .with_context(|| format!("write {}", self.path.display()))?;
        t.persist(&self.path)
            .with_context(|| format!("write {}", self.path.display()))?;
        Ok(())
    }
}

/// The library's run error inside a CLI error, if it is one.
fn run_error(e: &anyhow::Error) -> Option<&kiln::sandbox::RunError> {
    e.downcast_ref::<kiln::sandbox::RunError>()
        .or_else(|| e.downcast_ref::<Hinted>().map(|h| &h.error))
}

pub fn run(cli: &Cli, a: &RunArgs) -> Result<i32> {
    let status = a
        .json_status
        .as_deref()
        .map(StatusFile::check)
        .transpose()?;
    let outcome = run_inner(cli, a);
    let failed_code = outcome
        .as_ref()
        .err()
        .and_then(run_error)
        .map_or(125, |r| r.exit_code());
    if let Some(f) = &status {
        let value = match &outcome {
            Ok(r) => serde_json::to_value(r)?,
            Err(e) => serde_json::json!({
                "exit_code": failed_code,
                "error": crate::error_chain(e),
                "stage": run_error(e).map_or("setup", |r| r.stage()),
            }),
        };
        f.write(&value)?;
    }
    let result = match outcome {
        Ok(r) => r,
        // A guest kernel panic has its own exit code.
        Err(e) if failed_code != 125 => {
            eprintln!("kiln: error: {}", crate::error_chain(&e));
            return Ok(failed_code);
        }
        Err(e) => return Err(e),
    };
    if result.timed_out {
        eprintln!(
            "kiln: timed out after {} s{}",
            a.timeout.map_or(0.0, |t| t.as_secs_f64()),
            if result.signal == Some(9) {
                format!(
                    ": SIGTERM, then SIGKILL after {} s",
                    a.timeout_grace.as_secs_f64()
                )
            } else {
                ": SIGTERM".to_string()
            }
        );
    }
    for w in &result.warnings {
        eprintln!("kiln: warning: {w}");
    }
    if a.timings {
        let steps: Vec<String> = result
            .timings
            .iter()
            .map(|t| format!("{} {:.0} ms", t.step, t.duration.as_secs_f64() * 1e3))
            .collect();
        eprintln!(
            "kiln: timings: {} (total {:.0} ms)",
            steps.join(", "),
            result.duration.as_secs_f64() * 1e3
        );
    }
    if let Some(c) = &result.committed {
        eprintln!(
            "kiln: committed {} {} ({} entries)",
            c.name, c.manifest_digest, c.entries
        );
    } else if a.commit.is_some() {
        eprintln!(
            "kiln: not committed: the command exited with {}",
            result.exit_code
        );
    }
    Ok(result.exit_code)
}

fn run_inner(cli: &Cli, a: &RunArgs) -> Result<kiln::sandbox::RunResult> {
    let store = open_store(cli)?;
    let mut spec = RunSpec::new(a.image.clone());
    spec.argv = (!a.command.is_empty()).then(|| a.command.clone());
    for f in &a.env_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("read --env-file {}", f.display()))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            spec.env.push(line.to_string());
        }
    }
    for e in &a.env {
        if e.contains('=') {
            spec.env.push(e.clone());
        } else if let Ok(v) = std::env::var(e) {
            spec.env.push(format!("{e}={v}"));
        }
    }
    spec.workdir = a.workdir.clone();
    spec.hostname = a.hostname.clone();
    spec.network = a.network;
    if let Some(u) = &a.user {
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (u.parse::<u32>(), g.parse::<u32>()),
            None => (u.parse::<u32>(), u.parse::<u32>()),
        };
        match (uid, gid) {
            (Ok(uid), Ok(gid)) => spec.user = (uid, gid),
            // A name: looked up in the image's /etc/passwd and /etc/group.
            _ => spec.user_name = Some(u.clone()),
        }
    }
    if let Some(t) = a.timeout {
        if t.is_zero() {
            bail!("--timeout must be positive");
        }
        spec.timeout = Some(t);
    }
    spec.timeout_grace = a.timeout_grace;
    spec.require_limits = a.require_limits;
    spec.read_only = a.read_only;
    for v in &a.volume {
        spec.volumes.push(v.parse::<Volume>()?);
    }
    if a.vm {
        for (given, flag) in [
            (a.seccomp != "default", "--seccomp"),
            (a.allow_userns, "--allow-userns"),
            (a.rootfs != "auto" || a.rootfs_copy, "--rootfs"),
        ] {
            if given {
                bail!(
                    "{flag} is an option of the namespace backend; a --vm run has its own kernel"
                );
            }
        }
        let memory_mib = match a.memory {
            Some(m) => u32::try_from(m >> 20).unwrap_or(u32::MAX),
            None => kiln::spec::VmRunOptions::default().memory_mib,
        };
        spec.backend = kiln::Backend::Vm(kiln::spec::VmRunOptions {
            kernel: a.kernel.clone(),
            kernel_cmdline: a
                .kernel_cmdline
                .iter()
                .flat_map(|c| c.split_whitespace().map(str::to_string))
                .collect(),
            memory_mib,
            cpus: a.cpus,
            accel: match a.accel.as_str() {
                "kvm" => Some(kiln::vm::Accel::Kvm),
                "tcg" => Some(kiln::vm::Accel::Tcg),
                _ => None,
            },
            initrd: a.initrd.clone(),
            disk: a.disk,
        });
    } else if let Some(ns) = spec.backend.ns_mut() {
        ns.seccomp = a.seccomp == "default";
        ns.allow_userns = a.allow_userns;
    }
    spec.stdin = a.interactive;
    spec.tty = a.tty;
    for c in &a.cap_add {
        let Some(n) = kiln::spec::capability(c) else {
            bail!("--cap-add {c:?}: unknown capability")
        };
        spec.cap_add.push(n);
    }
    for u in &a.ulimit {
        spec.ulimits.push(u.parse()?);
    }
    if !a.vm {
        spec.memory = a.memory;
    }
    spec.tmpfs_size = a.tmpfs_size;
    spec.shm_size = a.shm_size;
    spec.upper_size = a.upper_size;
    spec.userns = match a.userns.as_str() {
        "keep-id" => kiln::spec::Userns::KeepId,
        "self" => kiln::spec::Userns::SelfOnly,
        _ => kiln::spec::Userns::Auto,
    };
    if let Some(ns) = spec.backend.ns_mut() {
        ns.rootfs = match (a.rootfs_copy, a.rootfs.as_str()) {
            (true, _) | (_, "copy") => kiln::spec::RootfsMode::Copy,
            (_, "overlay") => kiln::spec::RootfsMode::Overlay,
            (_, "fuse-overlay") => kiln::spec::RootfsMode::FuseOverlay,
            _ => kiln::spec::RootfsMode::Auto,
        };
    }
    spec.upper = match a.upper.as_str() {
        "memory" => kiln::spec::Upper::Memory,
        "disk" => kiln::spec::Upper::Disk,
        _ => kiln::spec::Upper::Auto,
    };
    spec.pids_limit = a.pids_limit;
    spec.commit = a.commit.clone();
    spec.source_date_epoch = a.source_date_epoch;
    spec.forward_signals = true;
    if rustix::termios::isatty(std::io::stderr()) {
        if let Ok(img) = store.resolve(&spec.image) {
            if !store.rootfs_is_cached(&img) {
                eprintln!(
                    "kiln: unpacking {} for its first run ({} layer(s), {})...",
                    img.name,
                    img.manifest.layers().len(),
                    super::output::human_size(img.manifest.layers().iter().map(|l| l.size()).sum())
                );
            }
        }
    }
    Sandbox::new(store)
        .run(&spec)
        .map_err(|e| hinted(e, &spec.image))
}

/// A run error with the CLI's way out added (a missing command: name one
/// after the image). It keeps the error for its stage.
#[derive(Debug)]
pub struct Hinted {
    hint: String,
    /// The library's error.
    pub error: kiln::sandbox::RunError,
}

impl std::fmt::Display for Hinted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error, self.hint)
    }
}

impl std::error::Error for Hinted {}

fn hinted(e: kiln::sandbox::RunError, image: &str) -> anyhow::Error {
    match &e {
        kiln::sandbox::RunError::Spec(SpecError::Invalid {
            field: "argv",
            reason,
        }) if reason.starts_with("no command") => {
            let hint = format!("name one after the image, e.g. kiln run {image} -- sh");
            anyhow::Error::new(Hinted { hint, error: e })
        }
        _ => e.into(),
    }
}
