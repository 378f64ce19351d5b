//! Running commands inside an image.
//!
//! [`Sandbox::run`] checks a [`RunSpec`] once
//! (`validate` gives a `ValidSpec`), prepares what every backend needs
//! (`prepare.rs`: the image, its process parameters, the id map, the
//! leased root file system, the run directory, the cgroup), hands the run
//! to the spec's [`Backend`], and ends it the same way for all
//! (`outcome.rs`; `commit.rs` for `--commit`). The namespace backend
//! (`ns/`) runs the command in a user namespace (the caller maps to root),
//! private mount, pid, ipc, uts, cgroup and (by default) network
//! namespaces, over an overlay of the cached tree, with kiln's own init as
//! PID 1. The VM backend (`vm.rs`) runs it in a throwaway QEMU VM with a
//! kernel of its own.

mod cgroup;
pub(crate) mod commit;
pub(crate) mod ns;
mod outcome;
mod prepare;
mod pty;
mod signals;
mod vm;

pub use outcome::{CommitReport, RunError, RunEvent, RunResult, Stream, Timing};
pub(crate) use prepare::reap_dead_runs;

use std::io;
use std::path::PathBuf;
use std::time::Instant;

use crate::spec::{Backend, RunSpec};
use crate::store::Store;

/// Runs commands in images of a store.
///
/// ```no_run
/// use kiln::{sandbox::Sandbox, spec::RunSpec, Store};
/// let store = Store::open("/tmp/kiln-store")?;
/// let mut spec = RunSpec::new("busybox");
/// spec.argv = Some(vec!["sh".into(), "-c".into(), "echo hello".into()]);
/// let result = Sandbox::new(store).run(&spec)?;
/// assert_eq!(result.exit_code, 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Sandbox {
    store: Store,
    helper: Option<PathBuf>,
}

impl Sandbox {
    /// A sandbox runner over `store`.
    pub fn new(store: Store) -> Sandbox {
        Sandbox {
            store,
            helper: None,
        }
    }

    /// The binary that sets the sandbox up (it is re-executed as
    /// `BINARY __sandbox-init`). Default: this process's executable when it
    /// is `kiln` or called [`crate::helper::dispatch`], else
    /// `$KILN_HELPER`, else `kiln` on `PATH`.
    pub fn with_helper(mut self, path: PathBuf) -> Sandbox {
        self.helper = Some(path);
        self
    }

    /// Runs `spec` to completion. Output goes to the caller's stdout/stderr.
    pub fn run(&self, spec: &RunSpec) -> Result<RunResult, RunError> {
        self.run_inner(spec, None)
    }

    /// Runs `spec`, handing the command's output and the run's state to
    /// `on_event` instead of the caller's stdout/stderr (for embedders that
    /// log or stream build output themselves).
    ///
    /// ```no_run
    /// use kiln::sandbox::{RunEvent, Sandbox, Stream};
    /// let store = kiln::Store::open("/tmp/kiln-store")?;
    /// let mut spec = kiln::spec::RunSpec::new("busybox");
    /// spec.argv = Some(vec!["echo".into(), "hi".into()]);
    /// let mut out = Vec::new();
    /// Sandbox::new(store).run_with_events(&spec, &mut |e| {
    ///     if let RunEvent::Output { stream: Stream::Stdout, data } = e {
    ///         out.extend_from_slice(data);
    ///     }
    /// })?;
    /// assert_eq!(out, b"hi\n");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn run_with_events(
        &self,
        spec: &RunSpec,
        on_event: &mut dyn FnMut(RunEvent<'_>),
    ) -> Result<RunResult, RunError> {
        self.run_inner(spec, Some(on_event))
    }

    fn run_inner(
        &self,
        spec: &RunSpec,
        events: Option<&mut dyn FnMut(RunEvent<'_>)>,
    ) -> Result<RunResult, RunError> {
        let start = Instant::now();
        let spec = spec.validate()?;
        let helper = self.helper.as_deref();
        // Without -t, the command never holds the caller's terminal as its
        // stdout or stderr (where tcsetattr would reconfigure it): its
        // output comes as events that go to kiln's own stdout and stderr.
        let mut to_caller = |e: RunEvent<'_>| {
            // Flushed at once: a progress line without a newline shows now.
            if let RunEvent::Output { stream, data } = e {
                let _ = match stream {
                    Stream::Stdout => {
                        let mut out = io::stdout().lock();
                        io::Write::write_all(&mut out, data)
                            .and_then(|()| io::Write::flush(&mut out))
                    }
                    Stream::Stderr => io::Write::write_all(&mut io::stderr().lock(), data),
                };
            }
        };
        let events: Option<&mut dyn FnMut(RunEvent<'_>)> = match events {
            None if !spec.tty
                && (rustix::termios::isatty(io::stdout())
                    || rustix::termios::isatty(io::stderr())) =>
            {
                Some(&mut to_caller)
            }
            Some(e) => Some(e),
            None => None,
        };
        let mut prepared = prepare::prepare(&self.store, helper, &spec)?;
        let mut result = match &spec.backend {
            Backend::Namespace(ns) => ns::run(&prepared, ns, helper, &spec, start, events)?,
            Backend::Vm(vm) => vm::run(&prepared, vm, helper, &spec, start, events)?,
        };
        result.warnings.append(&mut prepared.warnings);
        commit::finish(&self.store, helper, &spec, &mut prepared, result)
    }
}
