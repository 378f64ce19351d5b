//! What a run ends with, whatever backend ran it: the result, the events
//! reported on the way, and the errors.

use std::path::PathBuf;
use std::time::Duration;

use crate::spec::SpecError;
use crate::store::StoreError;
use crate::unpack::UnpackError;

/// Errors that stop a run before or around the command (exit code 125).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The image could not be resolved.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image could not be unpacked.
    #[error(transparent)]
    Unpack(#[from] UnpackError),
    /// The run's changes could not be committed.
    #[error("run: commit: {0}")]
    Commit(#[from] crate::import::ImportError),
    /// The command succeeded but its changes could not be committed; they
    /// are kept in `kept` (the run's upper directory) until `kiln gc`.
    #[error("run: commit: {reason}; the command's changes are kept in {} until the store's next gc", kept.display())]
    CommitKept {
        /// Why the commit failed.
        reason: String,
        /// The upper directory holding the changes.
        kept: PathBuf,
    },
    /// A host-side step failed.
    #[error("run: {step}: {source}")]
    Host {
        /// What kiln was doing.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host cannot run sandboxes, with the reason and the fix.
    #[error("run: {0}")]
    Unsupported(String),
    /// The VM backend's machine could not start or ended without the
    /// command's status (a guest kernel panic says so, with the console).
    #[error("run: {0}")]
    Vm(#[from] crate::vm::VmError),
}

impl RunError {
    /// Which stage of the run failed: `spec`, `image`, `unpack`, `commit`,
    /// `host`, `unsupported` or `vm` (as `kiln run --json-status` records it).
    pub fn stage(&self) -> &'static str {
        match self {
            RunError::Spec(_) => "spec",
            RunError::Store(_) => "image",
            RunError::Unpack(_) => "unpack",
            RunError::Commit(_) | RunError::CommitKept { .. } => "commit",
            RunError::Host { .. } => "host",
            RunError::Unsupported(_) => "unsupported",
            RunError::Vm(_) => "vm",
        }
    }

    /// The exit code a command line reports for this error: 125, or
    /// [`crate::vm::GUEST_PANIC_EXIT`] when a VM's kernel panicked.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Vm(crate::vm::VmError::GuestPanic { .. }) => crate::vm::GUEST_PANIC_EXIT,
            _ => 125,
        }
    }

    pub(crate) fn host(step: impl Into<String>, source: std::io::Error) -> RunError {
        RunError::Host {
            step: step.into(),
            source,
        }
    }
}

/// The outcome of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunResult {
    /// The exit code, container convention: the command's own code; 124 on
    /// timeout; 125 if kiln failed inside the sandbox; 126 not executable;
    /// 127 not found; 128+N killed by signal N.
    pub exit_code: i32,
    /// The signal that killed the command, if any.
    pub signal: Option<i32>,
    /// Whether the timeout fired.
    pub timed_out: bool,
    /// Wall time of the run (serialized as `duration_ms`).
    #[serde(rename = "duration_ms", serialize_with = "as_millis")]
    pub duration: Duration,
    /// The manifest digest of the image that ran.
    pub image_digest: String,
    /// The image `--commit` made (only after exit code 0).
    pub committed: Option<CommitReport>,
    /// Things the caller asked for that this host could not do (for example
    /// cgroup limits without a delegated cgroup).
    pub warnings: Vec<String>,
    /// Where the time went, step by step (the VM backend: preparing,
    /// kernel and initramfs, QEMU's start, the kernel's boot, the guest's
    /// setup, the command, the shutdown). Empty for the namespace backend.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<Timing>,
}

/// A run's exit code and signal from the command's exit code (128+N for
/// signal N): a timeout is 124, with SIGTERM, or SIGKILL when the grace
/// ran out. The same for every backend.
pub(crate) fn settle(code: i32, timed_out: bool, killed: bool) -> (i32, Option<i32>) {
    if timed_out {
        return (
            124,
            Some(if killed { libc::SIGKILL } else { libc::SIGTERM }),
        );
    }
    (code, (129..=192).contains(&code).then(|| code - 128))
}

/// One step of a run and how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    /// What was done.
    pub step: &'static str,
    /// How long it took (serialized as `ms`, fractional).
    #[serde(rename = "ms", serialize_with = "as_fractional_millis")]
    pub duration: Duration,
}

fn as_fractional_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1e4).round() / 10.0)
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The command's stdout.
    Stdout,
    /// The command's stderr (and kiln's own messages from inside the sandbox).
    Stderr,
}

/// What [`Sandbox::run_with_events`](super::Sandbox::run_with_events) reports while a run goes on.
#[derive(Debug)]
#[non_exhaustive]
pub enum RunEvent<'a> {
    /// The sandbox helper started (its host pid).
    Started {
        /// Host pid of the helper process.
        pid: u32,
    },
    /// A chunk of output.
    Output {
        /// Which stream.
        stream: Stream,
        /// The bytes, as read.
        data: &'a [u8],
    },
    /// Something the run could not do as asked (for example kernel
    /// overlayfs unavailable, so fuse-overlayfs serves instead). Every
    /// warning is also in [`RunResult::warnings`].
    Warning {
        /// What happened, in a sentence.
        message: &'a str,
    },
}

/// What a commit produced.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CommitReport {
    /// The new image's name.
    pub name: String,
    /// Its manifest digest.
    pub manifest_digest: String,
    /// The new layer's digest.
    pub layer_digest: String,
    /// Entries in the new layer (whiteouts included).
    pub entries: u64,
}
