//! `RunSpec`: what to run and how, validated once and shared by backends.

use std::path::PathBuf;
use std::time::Duration;

/// How a run's writable root file system is made over the cached image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RootfsMode {
    /// Kernel overlayfs; where it cannot be mounted, fuse-overlayfs (when
    /// installed), else a private copy of the image, each with a warning.
    #[default]
    Auto,
    /// Kernel overlayfs only (`userxattr` in the user namespace).
    Overlay,
    /// fuse-overlayfs only (its daemon runs inside the sandbox).
    FuseOverlay,
    /// A private copy of the image (slow for big images; `--commit` is
    /// refused, since a copy cannot tell deletions apart).
    Copy,
}

/// Where a run's writable upper layer (and its overlay work dir) lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Upper {
    /// In memory unless the run commits: [`Upper::Disk`] with
    /// [`RunSpec::commit`], else [`Upper::Memory`].
    #[default]
    Auto,
    /// A tmpfs that only the sandbox's mount namespace sees: nothing of the
    /// run touches the host's disk, and nothing is left to clean up, even
    /// after SIGKILL. Writes to the root count against memory (up to
    /// [`RunSpec::upper_size`], and can swap); build outputs belong on a
    /// volume anyway.
    Memory,
    /// A run directory in the store (`.kiln/runs/run-*`), locked for the
    /// run's lifetime, removed afterwards or, after a crash, by the next
    /// run or `kiln gc`. Needed by `--commit`.
    Disk,
}

/// How a run's user namespace is mapped (see [`crate::userns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Userns {
    /// Real root: every id maps to itself. Unprivileged: the caller is root
    /// inside, plus its `/etc/subuid`/`/etc/subgid` range when it has one and
    /// `newuidmap`/`newgidmap` exist; else the caller alone.
    #[default]
    Auto,
    /// Keep the caller's uid and gid inside (podman's `--userns keep-id`):
    /// the caller maps to itself, and the command runs as the caller unless
    /// `user` says otherwise. Maps only the caller.
    KeepId,
    /// Map only the caller (as root), even when a subid range exists.
    SelfOnly,
}

/// Network of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Network {
    /// A private network namespace with only `lo`, up. The default.
    #[default]
    None,
    /// The host's network namespace.
    Host,
}

/// A bind mount from the host into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Volume {
    /// Host path (must exist).
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: String,
    /// Read-only bind.
    pub read_only: bool,
    /// Device nodes under it open (default false: `nodev`).
    #[serde(default)]
    pub dev: bool,
    /// setuid/setgid bits and file capabilities under it act on exec
    /// (default false: `nosuid`; no_new_privs voids them for the command
    /// anyway).
    #[serde(default)]
    pub suid: bool,
}

impl Volume {
    /// A read-write, nosuid, nodev bind of `source` at `target`.
    ///
    /// ```
    /// let v = kiln::spec::Volume::new("/src", "/work");
    /// assert!(!v.read_only && !v.dev && !v.suid);
    /// ```
    pub fn new(source: impl Into<PathBuf>, target: impl Into<String>) -> Volume {
        Volume {
            source: source.into(),
            target: target.into(),
            read_only: false,
            dev: false,
            suid: false,
        }
    }
}

impl std::str::FromStr for Volume {
    type Err = SpecError;
    /// Parses `SRC:DST[:OPTIONS]`, OPTIONS a comma-separated list of
    /// `ro`, `rw`, `dev`, `nodev`, `suid`, `nosuid`.
    ///
    /// ```
    /// let v: kiln::spec::Volume = "/src:/work:ro,dev".parse().unwrap();
    /// assert!(v.read_only && v.dev && !v.suid);
    /// assert!("/src:/work:exec".parse::<kiln::spec::Volume>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || {
            SpecError::invalid(
                "volumes",
                format!("{s:?}: expected SRC:DST[:OPTIONS], OPTIONS from ro, rw, dev, nodev, suid, nosuid"),
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, opts) = match parts.as_slice() {
            [s, d] => (*s, *d, ""),
            [s, d, o] => (*s, *d, *o),
            _ => return Err(bad()),
        };
        if src.is_empty() || dst.is_empty() {
            return Err(bad());
        }
        let mut v = Volume::new(src, dst);
        for o in opts.split(',').filter(|o| !o.is_empty()) {
            match o {
                "ro" => v.read_only = true,
                "rw" => v.read_only = false,
                "dev" => v.dev = true,
                "nodev" => v.dev = false,
                "suid" => v.suid = true,
                "nosuid" => v.suid = false,
                _ => return Err(bad()),
            }
        }
        Ok(v)
    }
}

/// Linux capability names, by number (`CAP_CHOWN` is 0).
pub const CAPABILITIES: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// The number of a capability named `CAP_X`, `X` or `x`.
///
/// ```
/// assert_eq!(kiln::spec::capability("CAP_SYS_CHROOT"), Some(18));
/// assert_eq!(kiln::spec::capability("net_raw"), Some(13));
/// assert_eq!(kiln::spec::capability("CAP_NOPE"), None);
/// ```
pub fn capability(name: &str) -> Option<u32> {
    let up = name.to_ascii_uppercase();
    let bare = up.strip_prefix("CAP_").unwrap_or(&up);
    CAPABILITIES
        .iter()
        .position(|c| *c == bare)
        .map(|i| i as u32)
}

/// Resource limits `--ulimit` accepts, with their `RLIMIT_*` numbers.
pub const RLIMITS: &[(&str, u32)] = &[
    ("cpu", 0),
    ("fsize", 1),
    ("data", 2),
    ("stack", 3),
    ("core", 4),
    ("rss", 5),
    ("nproc", 6),
    ("nofile", 7),
    ("memlock", 8),
    ("as", 9),
    ("locks", 10),
    ("sigpending", 11),
    ("msgqueue", 12),
    ("nice", 13),
    ("rtprio", 14),
];

/// A resource limit for the command.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ulimit {
    /// The `RLIMIT_*` number.
    pub resource: u32,
    /// Its name (`nofile`, ...).
    pub name: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

impl std::str::FromStr for Ulimit {
    type Err = SpecError;
    /// Parses `NAME=SOFT[:HARD]` (`unlimited` allowed).
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let bad = || {
            SpecError::invalid(
                "ulimits",
                format!(
                    "{s:?}: expected NAME=SOFT[:HARD], NAME one of {}",
                    RLIMITS.iter().map(|r| r.0).collect::<Vec<_>>().join(" ")
                ),
            )
        };
        let (name, vals) = s.split_once('=').ok_or_else(bad)?;
        let resource = RLIMITS
            .iter()
            .find(|r| r.0 == name)
            .map(|r| r.1)
            .ok_or_else(bad)?;
        let num = |v: &str| {
            if v == "unlimited" {
                Ok(u64::MAX)
            } else {
                v.parse::<u64>().map_err(|_| bad())
            }
        };
        let (soft, hard) = match vals.split_once(':') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(vals)?, num(vals)?),
        };
        if soft > hard {
            return Err(SpecError::invalid(
                "ulimits",
                format!("{s:?}: soft limit above hard limit"),
            ));
        }
        Ok(Ulimit {
            resource,
            name: name.to_string(),
            soft,
            hard,
        })
    }
}

/// Errors of an invalid run spec. Each names the [`RunSpec`] field at
/// fault by its Rust name, for matching; the message names it as
/// [`crate::words::field`] does (the `kiln` CLI's flag there).
///
/// ```
/// use kiln::spec::{RunSpec, SpecError};
/// let mut spec = RunSpec::new("busybox");
/// spec.cap_add.push(99);
/// match spec.validate() {
///     Err(SpecError::Invalid { field: "cap_add", .. }) => {}
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// A field's value is invalid.
    #[error("run: {}", invalid_text(field, reason))]
    Invalid {
        /// The [`RunSpec`] field (`env`, `volumes`, `cap_add`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// `field` needs what another field's value rules out.
    #[error("run: {} needs {needs} (not {}): {why}", crate::words::field(field), crate::words::field_value(other, *other_value))]
    Conflict {
        /// The field that cannot be honoured (`commit`).
        field: &'static str,
        /// What it needs.
        needs: &'static str,
        /// The field that rules it out.
        other: &'static str,
        /// That field's value, where it is not a flag.
        other_value: Option<&'static str>,
        /// Why.
        why: &'static str,
    },
    /// A `ulimits` hard limit is above the calling process's, which only
    /// `CAP_SYS_RESOURCE` on the host could raise.
    #[error("run: {} {name}={soft}:{hard}: the hard limit is above the current hard limit {current} (raising it needs CAP_SYS_RESOURCE on the host)", crate::words::field("ulimits"))]
    UlimitAboveHard {
        /// The limit's name (`nofile`).
        name: String,
        /// The soft limit asked for.
        soft: u64,
        /// The hard limit asked for.
        hard: u64,
        /// The current hard limit.
        current: u64,
    },
}

/// An invalid field's message: the field (as [`crate::words::field`]
/// names it), then what is wrong; a missing command says only that.
fn invalid_text(field: &str, reason: &str) -> String {
    if field == "argv" {
        reason.to_string()
    } else {
        format!("{}: {reason}", crate::words::field(field))
    }
}

impl SpecError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        SpecError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// What to run, built with the public fields and checked by [`RunSpec::validate`].
///
/// ```
/// let mut spec = kiln::spec::RunSpec::new("busybox");
/// spec.argv = Some(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]);
/// spec.validate().unwrap();
/// ```
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    /// Image name or digest.
    pub image: String,
    /// Command and arguments. Default: the image's Entrypoint + Cmd.
    pub argv: Option<Vec<String>>,
    /// Extra `KEY=VALUE` environment, applied over the image's Env. Default none.
    pub env: Vec<String>,
    /// Working directory inside the sandbox. Default: the image's, else `/`.
    pub workdir: Option<String>,
    /// Host name. Default `kiln`.
    pub hostname: String,
    /// Network. Default [`Network::None`].
    pub network: Network,
    /// User and group to run as inside the sandbox. Default 0:0 (the caller,
    /// mapped to root in a user namespace).
    pub user: (u32, u32),
    /// `NAME[:GROUP]` to look up in the image's /etc/passwd and /etc/group
    /// instead of `user` (numbers pass through). Default none.
    pub user_name: Option<String>,
    /// Fail (exit 125) instead of warning when `memory` or `pids_limit`
    /// cannot be enforced (no delegated cgroup v2). Default false.
    pub require_limits: bool,
    /// Stop the sandbox after this long (exit code 124): SIGTERM to the
    /// command, then SIGKILL to the whole sandbox after
    /// [`timeout_grace`](Self::timeout_grace). Default none.
    pub timeout: Option<Duration>,
    /// How long a timed-out command has between SIGTERM and SIGKILL, as
    /// `timeout -k` gives. Default 10 s; zero kills at once.
    pub timeout_grace: Duration,
    /// Mount the image read-only (no overlay upper). Default false.
    pub read_only: bool,
    /// Bind mounts. Default none.
    pub volumes: Vec<Volume>,
    /// Pass the caller's stdin to the command. Default false (/dev/null).
    pub stdin: bool,
    /// Give the command a pseudo-terminal as stdin, stdout and stderr (its
    /// controlling terminal, also at `/dev/console`), relayed to the caller's
    /// stdout; `TERM` is set. With `stdin` the caller's input is relayed
    /// too, and a caller terminal is put in raw mode for the run. Default
    /// false.
    pub tty: bool,
    /// After a successful run (exit code 0), store the run's changes as a new
    /// layer on top of the image, tagged with this name. Default none.
    pub commit: Option<String>,
    /// Clamp committed mtimes to this and set the new image's `created`.
    /// Default none.
    pub source_date_epoch: Option<i64>,
    /// How the user namespace is mapped. Default [`Userns::Auto`].
    pub userns: Userns,
    /// Where the run's writes to its root go. Default [`Upper::Auto`].
    pub upper: Upper,
    /// Capabilities the command keeps (numbers, see [`capability`]).
    /// Default none: every capability is dropped.
    pub cap_add: Vec<u32>,
    /// Resource limits, never above the caller's current hard limits.
    /// Default none.
    pub ulimits: Vec<Ulimit>,
    /// Memory limit in bytes (cgroup v2 `memory.max`), applied when the caller
    /// has a delegated cgroup; otherwise the run goes on with a warning.
    pub memory: Option<u64>,
    /// Maximum number of processes (cgroup v2 `pids.max`), same rules.
    pub pids_limit: Option<u64>,
    /// Size limit of the sandbox's `/tmp` tmpfs in bytes. Default: a
    /// quarter of the host's RAM, and at most `memory`.
    pub tmpfs_size: Option<u64>,
    /// Size limit of `/dev/shm` in bytes. Default 64 MiB (as Docker's),
    /// at most `memory`.
    pub shm_size: Option<u64>,
    /// Size limit of the in-memory upper layer ([`Upper::Memory`]): what
    /// the command may write to its root. Default: a quarter of the
    /// host's RAM, and at most `memory`.
    pub upper_size: Option<u64>,
    /// Forward SIGINT/SIGTERM/SIGHUP/SIGQUIT received by the calling thread
    /// to the command (blocks them in the caller during the run). Default false.
    pub forward_signals: bool,
    /// What runs the command, with that backend's own options. Default
    /// [`Backend::Namespace`] with [`NsOptions::default`].
    pub backend: Backend,
}

/// What runs the command. Every [`RunSpec`] field applies to each backend;
/// what only one backend knows is in its options.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Backend {
    /// Linux namespaces on the host's kernel (`sandbox/ns`): user, mount,
    /// pid, ipc, uts, cgroup and network namespaces, an overlay root,
    /// capabilities dropped, no_new_privs, seccomp.
    Namespace(NsOptions),
    /// A throwaway QEMU VM (`sandbox/vm`): a kernel of its own (the
    /// image's, else the host's), the image's tree as an ext4 disk behind a
    /// copy-on-write disk of the run (or, with [`RunSpec::commit`], under an
    /// overlay whose upper layer is a disk the commit reads), kiln's guest
    /// agent as PID 1, QEMU behind walls of its own. For what the host
    /// kernel must not do for a build: loop devices, partitions, mounts,
    /// device-mapper, kernel modules.
    Vm(VmRunOptions),
}

impl Default for Backend {
    fn default() -> Backend {
        Backend::Namespace(NsOptions::default())
    }
}

impl Backend {
    /// The namespace backend's options, if that is the backend.
    pub fn ns(&self) -> Option<&NsOptions> {
        match self {
            Backend::Namespace(o) => Some(o),
            Backend::Vm(_) => None,
        }
    }

    /// The namespace backend's options, to change them, if that is the
    /// backend.
    pub fn ns_mut(&mut self) -> Option<&mut NsOptions> {
        match self {
            Backend::Namespace(o) => Some(o),
            Backend::Vm(_) => None,
        }
    }

    /// The VM backend's options, if that is the backend.
    pub fn vm(&self) -> Option<&VmRunOptions> {
        match self {
            Backend::Vm(o) => Some(o),
            Backend::Namespace(_) => None,
        }
    }
}

/// Options of the VM backend.
///
/// ```
/// let mut spec = kiln::RunSpec::new("busybox");
/// spec.backend = kiln::Backend::Vm(kiln::spec::VmRunOptions::default());
/// assert_eq!(spec.backend.vm().map(|o| o.cpus), Some(1));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRunOptions {
    /// The kernel to boot. Default: the image's own newest
    /// `/boot/vmlinuz-*` with its `/lib/modules`, else the host's
    /// (`KILN_VM_KERNEL` overrides the host's).
    pub kernel: Option<PathBuf>,
    /// Words added to the kernel command line. Default none.
    pub kernel_cmdline: Vec<String>,
    /// Guest memory in MiB. Default 1024.
    pub memory_mib: u32,
    /// Virtual CPUs. Default 1.
    pub cpus: u32,
    /// The accelerator; `None` chooses: KVM when a probe shows it really
    /// works on this host, else TCG. Default `None`.
    pub accel: Option<crate::vm::Accel>,
    /// An initramfs whose files are added to kiln's (firmware or modules a
    /// kernel of your own needs); kiln's agent stays `/init`. Default none.
    pub initrd: Option<PathBuf>,
    /// A scratch disk of this many bytes for the command (sparse, in the
    /// run directory, gone with the run), for loop, partition and file
    /// system work: `/dev/disk/by-id/virtio-kiln-disk`, also in
    /// `$KILN_DISK`. Default none.
    pub disk: Option<u64>,
}

impl Default for VmRunOptions {
    fn default() -> VmRunOptions {
        VmRunOptions {
            kernel: None,
            kernel_cmdline: Vec::new(),
            memory_mib: 1024,
            cpus: 1,
            accel: None,
            initrd: None,
            disk: None,
        }
    }
}

/// Options of the namespace backend.
///
/// ```
/// let mut spec = kiln::RunSpec::new("busybox");
/// if let Some(ns) = spec.backend.ns_mut() {
///     ns.rootfs = kiln::spec::RootfsMode::FuseOverlay;
/// }
/// assert!(spec.backend.ns().is_some_and(|o| o.seccomp));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NsOptions {
    /// How the run's writable root is made. Default [`RootfsMode::Auto`].
    pub rootfs: RootfsMode,
    /// Install the default seccomp filter (kexec, modules, bpf,
    /// perf_event_open, keyrings, userfaultfd, clock and swap changes,
    /// reboot, mount, nested user namespaces... fail with EPERM). Default true.
    pub seccomp: bool,
    /// Allow nested user namespaces (unshare, setns, clone(CLONE_NEWUSER)).
    /// Default false.
    pub allow_userns: bool,
}

impl Default for NsOptions {
    fn default() -> NsOptions {
        NsOptions {
            rootfs: RootfsMode::Auto,
            seccomp: true,
            allow_userns: false,
        }
    }
}

/// A [`RunSpec`] that [`RunSpec::validate`] accepted: what the backends
/// take, so a spec is checked once, before anything starts.
#[derive(Debug, Clone, Copy)]
pub struct ValidSpec<'a>(&'a RunSpec);

impl std::ops::Deref for ValidSpec<'_> {
    type Target = RunSpec;
    fn deref(&self) -> &RunSpec {
        self.0
    }
}

impl RunSpec {
    /// A spec with every default for `image`.
    pub fn new(image: impl Into<String>) -> RunSpec {
        RunSpec {
            image: image.into(),
            argv: None,
            env: Vec::new(),
            workdir: None,
            hostname: "kiln".into(),
            network: Network::None,
            user: (0, 0),
            user_name: None,
            timeout: None,
            timeout_grace: Duration::from_secs(10),
            require_limits: false,
            read_only: false,
            volumes: Vec::new(),
            stdin: false,
            tty: false,
            commit: None,
            source_date_epoch: None,
            userns: Userns::Auto,
            upper: Upper::Auto,
            cap_add: Vec::new(),
            ulimits: Vec::new(),
            memory: None,
            pids_limit: None,
            tmpfs_size: None,
            shm_size: None,
            upper_size: None,
            forward_signals: false,
            backend: Backend::default(),
        }
    }

    /// Whether the run's upper layer goes to a tmpfs (see [`Upper`]).
    /// [`Upper::Auto`] picks disk with `--commit`, and on kernels older
    /// than 6.6, whose tmpfs has no `user.*` xattrs for overlayfs's
    /// whiteouts.
    pub fn upper_in_memory(&self) -> bool {
        match self.upper {
            Upper::Memory => true,
            Upper::Disk => false,
            Upper::Auto => self.commit.is_none() && tmpfs_has_user_xattrs(),
        }
    }

    /// The sizes of `/tmp`, `/dev/shm` and the in-memory upper layer, in
    /// bytes: the spec's, else the defaults (see the fields), each capped
    /// by `memory` when it is set (tmpfs pages are memory).
    ///
    /// ```
    /// let mut spec = kiln::spec::RunSpec::new("busybox");
    /// spec.memory = Some(1 << 30);
    /// let (tmp, shm, upper) = spec.tmpfs_sizes();
    /// assert!(tmp <= 1 << 30 && upper <= 1 << 30);
    /// assert_eq!(shm, 64 << 20);
    /// ```
    pub fn tmpfs_sizes(&self) -> (u64, u64, u64) {
        let quarter = host_memory().map_or(1 << 30, |m| m / 4);
        let cap = |v: u64| self.memory.map_or(v, |m| v.min(m));
        (
            cap(self.tmpfs_size.unwrap_or(quarter)),
            cap(self.shm_size.unwrap_or(64 << 20)),
            cap(self.upper_size.unwrap_or(quarter)),
        )
    }

    /// Checks every field once, before anything starts.
    pub fn validate(&self) -> Result<ValidSpec<'_>, SpecError> {
        let bad = |field, m: String| Err(SpecError::invalid(field, m));
        if let Some(a) = &self.argv {
            if a.is_empty() {
                return bad("argv", "empty command".into());
            }
        }
        for kv in &self.env {
            if !kv.contains('=') || kv.starts_with('=') {
                return bad("env", format!("entry {kv:?} is not KEY=VALUE"));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return bad(
                    "workdir",
                    format!("working directory {w:?} is not absolute"),
                );
            }
        }
        if self.hostname.is_empty()
            || self.hostname.len() > 64
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return bad(
                "hostname",
                format!("host name {:?} is not a valid host name", self.hostname),
            );
        }
        for v in &self.volumes {
            if !v.target.starts_with('/') || v.target.split('/').any(|c| c == "..") {
                return bad(
                    "volumes",
                    format!("volume target {:?} must be absolute without '..'", v.target),
                );
            }
            if !v.source.exists() {
                return bad(
                    "volumes",
                    format!("volume source {} does not exist", v.source.display()),
                );
            }
        }
        let conflict = |needs, other, other_value, why| {
            Err(SpecError::Conflict {
                field: "commit",
                needs,
                other,
                other_value,
                why,
            })
        };
        let ns_rootfs = self.backend.ns().map(|o| o.rootfs);
        if self.commit.is_some() && ns_rootfs == Some(RootfsMode::Copy) {
            return conflict(
                "an overlay",
                "rootfs",
                Some("copy"),
                "a copy cannot tell deletions from the image",
            );
        }
        if self.commit.is_some() && self.upper == Upper::Memory {
            return conflict(
                "the upper layer on disk",
                "upper",
                Some("memory"),
                "it is read after the sandbox is gone",
            );
        }
        if self.commit.is_some() && self.read_only {
            return conflict(
                "a writable root",
                "read_only",
                None,
                "the command's changes are the commit",
            );
        }
        if let Some(c) = &self.commit {
            crate::store::ImageName::parse(c)
                .map_err(|e| SpecError::invalid("commit", e.to_string()))?;
        }
        for &c in &self.cap_add {
            if c as usize >= CAPABILITIES.len() {
                return bad(
                    "cap_add",
                    format!(
                        "capability number {c} is unknown (the last is {}, CAP_{})",
                        CAPABILITIES.len() - 1,
                        CAPABILITIES[CAPABILITIES.len() - 1]
                    ),
                );
            }
        }
        for u in &self.ulimits {
            if rlimit_resource(u.resource).is_none() {
                return bad(
                    "ulimits",
                    format!("{}: resource number {} is unknown", u.name, u.resource),
                );
            }
            if u.soft > u.hard {
                return bad(
                    "ulimits",
                    format!("{}: soft limit above hard limit", u.name),
                );
            }
            let (_, cur_hard) = current_rlimit(u.resource);
            if u.hard > cur_hard {
                return Err(SpecError::UlimitAboveHard {
                    name: u.name.clone(),
                    soft: u.soft,
                    hard: u.hard,
                    current: cur_hard,
                });
            }
        }
        for (field, v) in [
            ("tmpfs_size", self.tmpfs_size),
            ("shm_size", self.shm_size),
            ("upper_size", self.upper_size),
            ("memory", self.memory),
        ] {
            if v == Some(0) {
                return bad(field, "must be more than 0 bytes".into());
            }
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("timeout", "must be positive".into());
        }
        if let Backend::Vm(vm) = &self.backend {
            self.validate_vm(vm)?;
        }
        Ok(ValidSpec(self))
    }
}

impl RunSpec {
    /// What the VM backend does not do (yet, or at all), each a clear error
    /// naming the option.
    fn validate_vm(&self, vm: &VmRunOptions) -> Result<(), SpecError> {
        let no = |field: &'static str, why: &str| {
            Err(SpecError::invalid(
                field,
                format!("is not supported with the VM backend: {why}"),
            ))
        };
        if vm.memory_mib < 128 {
            return Err(SpecError::invalid(
                "vm.memory_mib",
                format!(
                    "{} MiB is too little for a guest (at least 128)",
                    vm.memory_mib
                ),
            ));
        }
        if vm.cpus == 0 || vm.cpus > 64 {
            return Err(SpecError::invalid(
                "vm.cpus",
                format!("{} virtual CPUs: give 1 to 64", vm.cpus),
            ));
        }
        if let Some(size) = vm.disk {
            if !(1 << 20..=16 << 40).contains(&size) {
                return Err(SpecError::invalid(
                    "vm.disk",
                    format!("{size} bytes: give 1M to 16T"),
                ));
            }
        }
        if self.upper == Upper::Disk && self.commit.is_none() {
            return no(
                "upper",
                "the guest's writes go to a copy-on-write disk of the run (or, with commit, an upper disk)",
            );
        }
        if self.memory.is_some() {
            return no("memory", "the guest's memory is vm.memory_mib");
        }
        if self.pids_limit.is_some() {
            return no("pids_limit", "limits in the guest are not there yet");
        }
        if !self.cap_add.is_empty() {
            return no(
                "cap_add",
                "the command runs as root of its own kernel with every capability",
            );
        }
        if !self.ulimits.is_empty() {
            return no("ulimits", "limits in the guest are not there yet");
        }
        if self.userns == Userns::KeepId {
            return no("userns", "the guest has its own users");
        }
        Ok(())
    }
}

/// The host's RAM in bytes (`MemTotal` of /proc/meminfo).
fn host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Parses a duration: seconds (fractions allowed), or a number with `ms`,
/// `s`, `m` or `h`.
///
/// ```
/// use kiln::spec::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
/// assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
/// assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
/// assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
/// assert!(parse_duration("-1").is_err());
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90, 1.5, 5m, 2h)"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    let secs = n * scale;
    if !(secs.is_finite() && (0.0..1e10).contains(&secs)) {
        return Err(format!("{s:?} is not a duration (e.g. 90, 1.5, 5m, 2h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size: bytes, or a number with `k`, `m`, `g` or `t` (powers of
/// 1024; `KiB`, `MB` and the like are read the same).
///
/// ```
/// use kiln::spec::parse_size;
/// assert_eq!(parse_size("512"), Ok(512));
/// assert_eq!(parse_size("64m"), Ok(64 << 20));
/// assert_eq!(parse_size("2GiB"), Ok(2 << 30));
/// assert!(parse_size("lots").is_err());
/// assert!(parse_size("99999999999t").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a size (bytes, or a number with k, m, g or t)");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// The calling process's (soft, hard) limit for an `RLIMIT_*` number
/// (unlimited for a number this kernel interface does not know).
pub fn current_rlimit(resource: u32) -> (u64, u64) {
    let Some(res) = rlimit_resource(resource) else {
        return (u64::MAX, u64::MAX);
    };
    let r = rustix::process::getrlimit(res);
    (r.current.unwrap_or(u64::MAX), r.maximum.unwrap_or(u64::MAX))
}

/// The resource of an `RLIMIT_*` number, `None` for one beyond
/// `RLIMIT_RTTIME` (15).
pub(crate) fn rlimit_resource(n: u32) -> Option<rustix::process::Resource> {
    use rustix::process::Resource as R;
    Some(match n {
        0 => R::Cpu,
        1 => R::Fsize,
        2 => R::Data,
        3 => R::Stack,
        4 => R::Core,
        5 => R::Rss,
        6 => R::Nproc,
        7 => R::Nofile,
        8 => R::Memlock,
        9 => R::As,
        10 => R::Locks,
        11 => R::Sigpending,
        12 => R::Msgqueue,
        13 => R::Nice,
        14 => R::Rtprio,
        15 => R::Rttime,
        _ => return None,
    })
}

/// Whether this kernel's tmpfs stores `user.*` xattrs (Linux 6.6 and later).
fn tmpfs_has_user_xattrs() -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    kernel_at_least(&release, (6, 6))
}

/// Whether a kernel release string (`6.1.0-26-amd64`) is at least `want`.
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= want
}

#[cfg(test)]
mod kernel_tests {
    use super::kernel_at_least;

    #[test]
    fn kernel_releases_compare_by_number() {
        assert!(kernel_at_least("6.18.44-fc-v657", (6, 6)));
        assert!(kernel_at_least("6.6.0", (6, 6)));
        assert!(!kernel_at_least("6.1.0-26-amd64", (6, 6)));
        assert!(!kernel_at_least("5.15.0-91-generic", (6, 6)));
        assert!(kernel_at_least("7.0", (6, 6)));
        assert!(!kernel_at_least("garbage", (6, 6)));
    }
}
