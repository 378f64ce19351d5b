//! `RunSpec`: what to run and how, validated once and shared by backends.

use std::path::PathBuf;
use std::time::Duration;

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
}

impl std::str::FromStr for Volume {
    type Err = SpecError;
    /// Parses `SRC:DST[:ro|rw]`.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [s, d] => (*s, *d, false),
            [s, d, "ro"] => (*s, *d, true),
            [s, d, "rw"] => (*s, *d, false),
            _ => {
                return Err(SpecError::Invalid(format!(
                    "volume {s:?}: expected SRC:DST[:ro|rw]"
                )))
            }
        };
        Ok(Volume {
            source: PathBuf::from(src),
            target: dst.to_string(),
            read_only: ro,
        })
    }
}

/// Errors of an invalid run spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A field is invalid.
    #[error("run spec: {0}")]
    Invalid(String),
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
    /// Kill the whole sandbox after this long (exit code 124). Default none.
    pub timeout: Option<Duration>,
    /// Mount the image read-only (no overlay upper). Default false.
    pub read_only: bool,
    /// Bind mounts. Default none.
    pub volumes: Vec<Volume>,
    /// Install the default seccomp filter (kexec, modules, bpf,
    /// perf_event_open, keyrings, userfaultfd, clock and swap changes,
    /// reboot, mount, nested user namespaces... fail with EPERM). Default true.
    pub seccomp: bool,
    /// Allow nested user namespaces (unshare, setns, clone(CLONE_NEWUSER)).
    /// Default false.
    pub allow_userns: bool,
    /// Pass the caller's stdin to the command. Default false (/dev/null).
    pub stdin: bool,
    /// After a successful run (exit code 0), store the run's changes as a new
    /// layer on top of the image, tagged with this name. Default none.
    pub commit: Option<String>,
    /// Clamp committed mtimes to this and set the new image's `created`.
    /// Default none.
    pub source_date_epoch: Option<i64>,
    /// Forward SIGINT/SIGTERM/SIGHUP/SIGQUIT received by the calling thread
    /// to the command (blocks them in the caller during the run). Default false.
    pub forward_signals: bool,
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
            timeout: None,
            read_only: false,
            volumes: Vec::new(),
            seccomp: true,
            allow_userns: false,
            stdin: false,
            commit: None,
            source_date_epoch: None,
            forward_signals: false,
        }
    }

    /// Checks every field once, before anything starts.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::Invalid(m));
        if let Some(a) = &self.argv {
            if a.is_empty() {
                return bad("empty command".into());
            }
        }
        for kv in &self.env {
            if !kv.contains('=') || kv.starts_with('=') {
                return bad(format!("environment entry {kv:?} is not KEY=VALUE"));
            }
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') {
                return bad(format!("working directory {w:?} is not absolute"));
            }
        }
        if self.hostname.is_empty()
            || self.hostname.len() > 64
            || !self
                .hostname
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return bad(format!(
                "host name {:?} is not a valid host name",
                self.hostname
            ));
        }
        for v in &self.volumes {
            if !v.target.starts_with('/') || v.target.split('/').any(|c| c == "..") {
                return bad(format!(
                    "volume target {:?} must be absolute without '..'",
                    v.target
                ));
            }
            if !v.source.exists() {
                return bad(format!(
                    "volume source {} does not exist",
                    v.source.display()
                ));
            }
        }
        if self.commit.is_some() && self.read_only {
            return bad("--commit needs a writable root (not --read-only)".into());
        }
        if let Some(c) = &self.commit {
            crate::store::ImageName::parse(c).map_err(|e| SpecError::Invalid(e.to_string()))?;
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("timeout must be positive".into());
        }
        Ok(())
    }
}
