//! How messages name the options a user can change.
//!
//! An error often ends with the way out ("pick one with ..."). The library
//! names its own API there (`ImportOptions::image`); the `kiln` CLI calls
//! [`use_cli_flags`] first thing, and the same messages name its flags
//! (`--image`). No library message spells a flag itself: each names an
//! [`Opt`].

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

static CLI_FLAGS: AtomicBool = AtomicBool::new(false);

/// Makes messages name the `kiln` CLI's flags instead of the library's
/// options (the CLI calls this; an embedder with its own flags does not).
pub fn use_cli_flags() {
    CLI_FLAGS.store(true, Ordering::Relaxed);
}

/// Whether messages name CLI flags (see [`use_cli_flags`]).
pub fn cli_flags() -> bool {
    CLI_FLAGS.load(Ordering::Relaxed)
}

/// An option a message can point the user at.
///
/// ```
/// use kiln::words::Opt;
/// assert_eq!(Opt::Image.to_string(), "`ImportOptions::image`");
/// kiln::words::use_cli_flags();
/// assert_eq!(Opt::Image.to_string(), "--image");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Opt {
    /// Which image of a multi-image archive or layout.
    Image,
    /// A file or folder inside an ISO.
    Path,
    /// A partition of a disk image.
    Partition,
    /// Read the file system in a VM.
    ViaVm,
    /// A qcow2 image's backing file.
    Backing,
    /// The expansion limits of compressed input.
    MaxSizeRatio,
    /// The size limit (of a file system given to a VM).
    MaxSize,
    /// Where the store is.
    Store,
    /// Use a store another user can change.
    TrustStore,
    /// Give the caller's files to root.
    MapCaller,
    /// Give every file one owner (root).
    OwnerRoot,
    /// The user the command runs as.
    User,
    /// The user namespace mapping `keep-id`.
    UsernsKeepId,
    /// The user namespace mapping `self`.
    UsernsSelf,
    /// An on-disk upper layer.
    UpperDisk,
    /// The cgroup limits.
    Limits,
    /// Fail where the limits cannot be enforced.
    RequireLimits,
    /// Store a run's changes as an image.
    Commit,
}

/// How messages name a [`RunSpec`](crate::spec::RunSpec) field: by its
/// Rust name for the library, by the flag that sets it for the CLI
/// (`volumes` is `--volume`, `cap_add` is `--cap-add`).
///
/// ```
/// assert_eq!(kiln::words::field("cap_add"), "cap_add");
/// kiln::words::use_cli_flags();
/// assert_eq!(kiln::words::field("cap_add"), "--cap-add");
/// assert_eq!(kiln::words::field("volumes"), "--volume");
/// ```
pub fn field(name: &str) -> String {
    if !cli_flags() {
        return name.to_string();
    }
    match name {
        "argv" => "the command".into(),
        "volumes" => "--volume".into(),
        "ulimits" => "--ulimit".into(),
        "vm.memory_mib" => "--memory".into(),
        "vm.cpus" => "--cpus".into(),
        "vm.accel" => "--accel".into(),
        "vm.disk" => "--disk".into(),
        "vm.initrd" => "--initrd".into(),
        f => format!("--{}", f.replace('_', "-")),
    }
}

/// A field set to a value: `rootfs = copy`, or for the CLI `--rootfs copy`
/// (a flag without a value is just the flag).
pub fn field_value(name: &str, value: Option<&str>) -> String {
    match (value, cli_flags()) {
        (None, _) => field(name),
        (Some(v), true) => format!("{} {v}", field(name)),
        (Some(v), false) => format!("{name} = {v}"),
    }
}

impl Opt {
    /// The library's name and the CLI's flag.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Opt::Image => ("`ImportOptions::image`", "--image"),
            Opt::Path => ("`ChainOptions::path`", "--path"),
            Opt::Partition => ("`ChainOptions::partition`", "--partition"),
            Opt::ViaVm => ("`ChainOptions::via_vm`", "--via-vm"),
            Opt::Backing => ("`ChainOptions::backing`", "--backing"),
            Opt::MaxSizeRatio => ("`ExpansionLimits`", "--max-size/--max-ratio"),
            Opt::MaxSize => ("`VmOptions::max_bytes`", "--max-size"),
            Opt::Store => ("`Store::open` with a path", "--store"),
            Opt::TrustStore => ("`StoreOptions::trust_owner`", "--trust-store"),
            Opt::MapCaller => ("`Owners::ToRoot`", "--map-caller"),
            Opt::OwnerRoot => ("`Owners::All { uid: 0, gid: 0 }`", "--owner 0:0"),
            Opt::User => ("`RunSpec::user`", "--user"),
            Opt::UsernsKeepId => ("`Userns::KeepId`", "--userns keep-id"),
            Opt::UsernsSelf => ("`Userns::SelfOnly`", "--userns self"),
            Opt::UpperDisk => ("`Upper::Disk`", "--upper disk"),
            Opt::Limits => ("`RunSpec::memory`/`pids_limit`", "--memory/--pids-limit"),
            Opt::RequireLimits => ("`RunSpec::require_limits`", "--require-limits"),
            Opt::Commit => ("`RunSpec::commit`", "--commit"),
        }
    }
}

impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lib, cli) = self.names();
        f.write_str(if cli_flags() { cli } else { lib })
    }
}
