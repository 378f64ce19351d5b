//! The namespace backend, host side: prepare the run, start the sandbox,
//! write its uid/gid maps, wait (with timeout and signal forwarding), clean
//! up.
//!
//! Process tree of a run from the CLI, or from any single-threaded caller
//! (compare bubblewrap, which clones itself the same way):
//!
//! ```text
//! kiln (host)          clone(user, mnt, pid, cgroup); waits for init's ack, writes
//!  │                    uid_map/gid_map, then one byte on a pipe; waits; cleans up
//!  └─ init (PID 1)     builds the root; clones the command into a nested user ns
//!      └─ the command  own net, uts, ipc ns; caps dropped, no_new_privs, seccomp
//! ```
//!
//! A caller with threads cannot clone safely, so there kiln execs a helper,
//! `kiln __sandbox-init`, which clones init the same way, sends kiln init's
//! pid once init has acknowledged, and relays its exit.
//!
//! Every process has PDEATHSIG=SIGKILL towards its parent, armed before
//! kiln maps init (see [`init`] for the handshake), so SIGKILL of kiln
//! takes the tree down; the pid namespace dies with its init and the mount
//! namespace with its last process. The run's upper layer is by default a
//! tmpfs inside that mount namespace, so nothing of the run is on the
//! host. With `Upper::Disk` it is a run directory in the store, which
//! carries a lock held by kiln: the next run or `kiln gc` removes
//! directories whose lock is free.

mod init;
mod seccomp;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use rustix::process::{Pid, Signal, WaitOptions};

use super::prepare::Prepared;
use super::{RunError, RunResult};
use crate::spec::{Network, NsOptions, Userns, ValidSpec};
use crate::userns::{IdMap, MapKind};

pub(crate) use init::helper_main;

/// Name of the hidden subcommand the helper runs as.
pub(crate) const HELPER_ARG: &str = "__sandbox-init";
/// Written into the run's work directory when the root is a copy.
const COPY_MARKER: &str = ".kiln-copy";
/// Environment variable carrying the helper's configuration (JSON).
const CONFIG_ENV: &str = "KILN_SANDBOX_CONFIG";

/// What the helper needs, computed on the host.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct InitConfig {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// Mount a tmpfs here first (inside the sandbox): `upper`, `work` and
    /// `merged` are in it.
    pub scratch: Option<PathBuf>,
    pub read_only: bool,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub workdir: String,
    pub hostname: String,
    pub network: Network,
    pub user: (u32, u32),
    pub volumes: Vec<crate::spec::Volume>,
    /// setgroups(2) is denied in the user namespace (single-id mapping).
    pub setgroups_denied: bool,
    pub seccomp: bool,
    pub allow_userns: bool,
    pub cap_add: Vec<u32>,
    pub ulimits: Vec<crate::spec::Ulimit>,
    pub keep_id: bool,
    pub rootfs: crate::spec::RootfsMode,
    /// fuse-overlayfs as found on the caller's PATH (set for an exec'd
    /// helper, whose environment is cleared); None: init looks it up when
    /// it needs it.
    #[serde(default)]
    pub fuse_overlayfs: Option<PathBuf>,
    pub tty: bool,
    /// Only the caller is mapped: a copied root records owners in
    /// `user.rootlesscontainers` instead of chown'ing.
    pub copy_rootless: bool,
    /// The pty slave's host path (bound to /dev/console).
    pub tty_name: Option<PathBuf>,
    /// Sizes of /tmp, /dev/shm and the in-memory upper layer, in bytes.
    pub tmp_size: u64,
    pub shm_size: u64,
    pub upper_size: u64,
    /// The mapped id ranges `(first, count)` inside the sandbox's user
    /// namespace, which the command's nested one maps onto themselves.
    pub uid_ranges: Vec<(u32, u32)>,
    pub gid_ranges: Vec<(u32, u32)>,
    /// kiln's pid, which an exec'd helper checks is still its parent
    /// (0: not checked).
    #[serde(default)]
    pub parent_pid: i32,
    /// The descriptor number of the warnings pipe's write end in init
    /// (-1: none, warnings go to stderr).
    #[serde(default = "no_fd")]
    pub warn_fd: i32,
    /// `KILN_NO_KERNEL_OVERLAY` is set: `RootfsMode::Auto` treats kernel
    /// overlayfs as unavailable (a host whose overlayfs misbehaves).
    #[serde(default)]
    pub no_kernel_overlay: bool,
    /// Messages name the CLI's flags (see [`crate::words`]): an exec'd
    /// helper does not inherit the setting.
    #[serde(default)]
    pub cli_flags: bool,
}

fn no_fd() -> i32 {
    -1
}

/// Explains why unprivileged user namespaces may be unavailable.
fn userns_hint() -> String {
    let read = |p: &str| fs::read_to_string(p).ok().map(|s| s.trim().to_string());
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return "unprivileged user namespaces are disabled (sysctl kernel.unprivileged_userns_clone=0)".into();
    }
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return "user namespaces are disabled (sysctl user.max_user_namespaces=0)".into();
    }
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return "AppArmor restricts unprivileged user namespaces (sysctl kernel.apparmor_restrict_unprivileged_userns=1)".into();
    }
    "the helper could not create its namespaces (see its message above)".into()
}

/// Runs a prepared spec in the namespace backend; the caller adds the
/// preparation's warnings and does the commit.
pub(crate) fn run(
    p: &Prepared,
    ns: &NsOptions,
    helper: Option<&Path>,
    spec: &ValidSpec<'_>,
    start: Instant,
    events: Option<&mut dyn FnMut(super::RunEvent<'_>)>,
) -> Result<RunResult, RunError> {
    let map = &p.map;
    let (scratch, base) = match &p.rundir {
        Some(d) => (None, d.path.clone()),
        None => (Some(p.runs.clone()), p.runs.join("root")),
    };
    let uid = rustix::process::getuid().as_raw();
    let (tmp_size, shm_size, upper_size) = spec.tmpfs_sizes();
    let ranges = |v: &[crate::userns::IdExtent]| v.iter().map(|e| (e.inside, e.count)).collect();
    let cfg = InitConfig {
        lower: p.rootfs.path.clone(),
        upper: scratch.as_ref().unwrap_or(&base).join("upper"),
        work: scratch.as_ref().unwrap_or(&base).join("work"),
        merged: base,
        scratch,
        read_only: spec.read_only,
        argv: p.argv.clone(),
        env: p.env.clone(),
        workdir: p.workdir.clone(),
        hostname: spec.hostname.clone(),
        network: spec.network,
        user: p.user,
        keep_id: spec.userns == Userns::KeepId && uid != 0,
        rootfs: ns.rootfs,
        fuse_overlayfs: None,
        tty: spec.tty,
        copy_rootless: map.kind == MapKind::Caller,
        tty_name: None,
        volumes: spec
            .volumes
            .iter()
            .map(|v| crate::spec::Volume {
                source: fs::canonicalize(&v.source).unwrap_or_else(|_| v.source.clone()),
                ..v.clone()
            })
            .collect(),
        setgroups_denied: map.kind == MapKind::Caller,
        seccomp: ns.seccomp,
        allow_userns: ns.allow_userns,
        cap_add: spec.cap_add.clone(),
        ulimits: spec.ulimits.clone(),
        tmp_size,
        shm_size,
        upper_size,
        uid_ranges: ranges(&map.uids),
        gid_ranges: ranges(&map.gids),
        parent_pid: rustix::process::getpid().as_raw_nonzero().get(),
        warn_fd: -1,
        no_kernel_overlay: std::env::var_os("KILN_NO_KERNEL_OVERLAY")
            .is_some_and(|v| !v.is_empty() && v != "0"),
        cli_flags: crate::words::cli_flags(),
    };
    // Init's warnings (the overlay fallbacks) come back on a pipe and join
    // the result's warnings.
    let (warn_r, warn_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| RunError::host("pipe", e.into()))?;
    let pty = if spec.tty {
        Some(super::pty::Pty::open().map_err(|e| RunError::host("open a pseudo-terminal", e))?)
    } else {
        None
    };
    let mut cfg = cfg;
    cfg.tty_name = pty.as_ref().map(|p| p.path());
    // A single-threaded kiln (the CLI) forks the helper: no second exec of
    // kiln, no dynamic loading; an embedder's threads make fork unsafe, so
    // there (or with an explicit helper, or KILN_HELPER_EXEC=1) the helper
    // is exec'd.
    // -i without -t from a terminal: the command reads a pipe kiln feeds,
    // so it can never reconfigure (tcsetattr) the caller's terminal.
    let (stdin_r, stdin_w) = if spec.stdin && !spec.tty && rustix::termios::isatty(io::stdin()) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| RunError::host("pipe", e.into()))?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let launch = if helper.is_none()
        && std::env::var_os("KILN_HELPER_EXEC").is_none()
        && crate::sys::single_threaded()
    {
        cfg.warn_fd = std::os::fd::AsRawFd::as_raw_fd(&warn_w);
        Launch::Fork(Box::new(cfg), stdin_r)
    } else {
        cfg.warn_fd = init::HELPER_WARN_FD;
        cfg.fuse_overlayfs = crate::sys::find_tool("fuse-overlayfs");
        let json = serde_json::to_string(&cfg)
            .map_err(|e| RunError::host("serialize sandbox config", io::Error::other(e)))?;
        let mut cmd = Command::new(crate::userns::helper_path(helper));
        cmd.arg(HELPER_ARG).env_clear().env(CONFIG_ENV, json);
        if let Some(pty) = &pty {
            cmd.stdin(pty.slave()?)
                .stdout(pty.slave()?)
                .stderr(pty.slave()?);
        } else if let Some(r) = stdin_r {
            cmd.stdin(std::process::Stdio::from(r));
        } else if !spec.stdin {
            cmd.stdin(std::process::Stdio::null());
        }
        crate::sys::pre_exec_pdeathsig(&mut cmd);
        let pipe = || {
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| RunError::host("pipe", e.into()))
        };
        let (report_r, report_w) = pipe()?;
        let (go_r, go_w) = pipe()?;
        // The helper finds them as descriptors 3 and 4.
        const _: () = assert!(
            init::HELPER_REPORT_FD == 3 && init::HELPER_GO_FD == 4 && init::HELPER_WARN_FD == 5
        );
        crate::sys::pre_exec_pass_fds(&mut cmd, &[&report_w, &go_r, &warn_w])
            .map_err(|e| RunError::host("pass pipes to the sandbox helper", e))?;
        Launch::Exec {
            cmd,
            report: report_r,
            go: go_w,
        }
    };
    // Forwarded signals are handled through a signalfd below; the helper
    // unblocks everything itself.
    let mut sigs = super::signals::FORWARDED.to_vec();
    if pty.is_some() {
        sigs.push(libc::SIGWINCH);
    }
    let forwarding = super::signals::Forwarding::start(&sigs, spec.forward_signals)?;
    let sigfd = forwarding.fd.as_ref();
    let relay = Relay {
        sigfd,
        pty,
        cgroup: p.cgroup.as_ref(),
        input: stdin_w,
        warnings: Warnings {
            read: Some(warn_r),
            write: Some(warn_w),
            lines: Vec::new(),
            partial: Vec::new(),
        },
    };
    let result = supervise(launch, spec, map, relay, start, &p.img, events);
    drop(forwarding);
    let result = result?;
    // A copy (the last fallback) cannot tell deletions from the image.
    if spec.commit.is_some() && result.exit_code == 0 {
        if let Some(d) = &p.rundir {
            if d.path.join("work").join(COPY_MARKER).exists() {
                return Err(RunError::Unsupported(format!(
                    "commit needs overlayfs, and this run fell back to a copy of the image ({}): nothing was committed",
                    result.warnings.join("; ")
                )));
            }
        }
    }
    Ok(result)
}

/// Reads what is available from a non-blocking pipe; false at EOF.
fn pump(
    fd: &std::os::fd::OwnedFd,
    stream: super::Stream,
    events: &mut dyn FnMut(super::RunEvent<'_>),
) -> bool {
    let mut buf = [0u8; 16384];
    loop {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return false,
            Ok(n) => events(super::RunEvent::Output {
                stream,
                data: &buf[..n],
            }),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return true,
            Err(_) => return false,
        }
    }
}

/// What kiln relays while the sandbox runs: forwarded signals, the pty,
/// and the caller's input when it goes through a pipe.
struct Relay<'a> {
    sigfd: Option<&'a std::os::fd::OwnedFd>,
    pty: Option<super::pty::Pty>,
    cgroup: Option<&'a super::cgroup::RunCgroup>,
    warnings: Warnings,
    /// The write end of the command's stdin pipe (`-i` without `-t` from
    /// a terminal: the command never holds the caller's terminal).
    input: Option<std::os::fd::OwnedFd>,
}

/// Input bytes kiln holds for a pty that is not reading (then it stops
/// reading its own stdin until the command catches up).
const MAX_PENDING: usize = 1 << 20;

/// Kills and reaps the helper when supervision ends early (an error after
/// it started), so an embedder is never left with a stopped or
/// unsupervised sandbox.
struct ReapGuard {
    pid: Pid,
    armed: bool,
}

impl Drop for ReapGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = rustix::process::kill_process(self.pid, Signal::KILL);
            while let Err(rustix::io::Errno::INTR) =
                rustix::process::waitpid(Some(self.pid), WaitOptions::empty())
            {}
        }
    }
}

/// Init's warnings pipe, read while the sandbox runs.
struct Warnings {
    /// The read end, until end of file (init closes its end once the root
    /// is built; a closed pipe must leave the poll set, or it spins).
    read: Option<std::os::fd::OwnedFd>,
    /// kiln's copy of the write end, dropped once the helper has its own.
    write: Option<std::os::fd::OwnedFd>,
    lines: Vec<String>,
    partial: Vec<u8>,
}

impl Warnings {
    /// Takes the complete lines that are there (the pipe is non-blocking);
    /// each is passed on as a [`super::RunEvent::Warning`] too.
    fn drain(&mut self, events: &mut Option<&mut dyn FnMut(super::RunEvent<'_>)>) {
        let mut buf = [0u8; 4096];
        while let Some(fd) = &self.read {
            match rustix::io::read(fd, &mut buf) {
                Ok(0) => self.read = None,
                Ok(n) => self.partial.extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => self.read = None,
            }
            // A flood of warnings is not something init sends; bound it.
            if self.partial.len() > 1 << 16 {
                break;
            }
        }
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..nl]).into_owned();
            if let Some(ev) = events.as_mut() {
                ev(super::RunEvent::Warning { message: &text });
            }
            self.lines.push(text);
        }
    }
}

/// How the helper process starts.
enum Launch {
    /// exec `kiln __sandbox-init` with the configuration in the environment;
    /// it reports init's pid on `report` (after init's ack) and init waits
    /// on `go`.
    Exec {
        cmd: Command,
        report: std::os::fd::OwnedFd,
        go: std::os::fd::OwnedFd,
    },
    /// clone this (single-threaded) process into init directly; the
    /// descriptor, if any, becomes the command's stdin.
    Fork(Box<InitConfig>, Option<std::os::fd::OwnedFd>),
}

/// The command's stdin when there is no pty.
enum Stdin {
    Null,
    Inherit,
    /// The read end of kiln's input pipe.
    Pipe(std::os::fd::OwnedFd),
}

/// What `clone_init` started: the sandbox's PID 1, its output pipes, the
/// read end of its ack and the write end of the pipe it waits on until
/// its id maps are written.
struct Cloned {
    pid: i32,
    outs: Vec<(std::os::fd::OwnedFd, super::Stream)>,
    ack: std::os::fd::OwnedFd,
    go: std::os::fd::OwnedFd,
}

/// Clones this (single-threaded) process straight into the sandbox's
/// namespaces; the child sets up stdio and becomes the sandbox's init.
fn clone_init(
    cfg: &InitConfig,
    stdin: Stdin,
    pty: Option<&super::pty::Pty>,
    piped: bool,
) -> Result<Cloned, RunError> {
    use std::os::fd::AsFd;
    let slave = pty.map(|p| p.slave_fd()).transpose()?;
    let devnull = match stdin {
        _ if slave.is_some() => None,
        Stdin::Null => Some(
            rustix::fs::open(
                "/dev/null",
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .map_err(|e| RunError::host("open /dev/null", e.into()))?,
        ),
        Stdin::Pipe(r) => Some(r),
        Stdin::Inherit => None,
    };
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| RunError::host("pipe", e.into()))
    };
    let pipes = if piped && slave.is_none() {
        Some((pipe()?, pipe()?))
    } else {
        None
    };
    let (go_r, go_w) = pipe()?;
    let (ack_r, ack_w) = pipe()?;
    let pid = match crate::sys::clone_fork(init::namespaces()) {
        Ok(pid) => pid,
        Err(e) => {
            return Err(RunError::Unsupported(format!(
                "cannot create the sandbox's namespaces: {e}: {}",
                userns_hint()
            )))
        }
    };
    if pid == 0 {
        // The child: nothing here may return (or unwind) into kiln's code.
        let child = std::panic::AssertUnwindSafe(move || {
            drop(go_w);
            drop(ack_r);
            let dup = |fd: std::os::fd::BorrowedFd<'_>, to: &[i32]| {
                to.iter().all(|t| crate::sys::dup_onto(fd, *t).is_ok())
            };
            let stdio_ok = match (&slave, &pipes) {
                (Some(s), _) => dup(s.as_fd(), &[0, 1, 2]),
                (None, p) => {
                    devnull.as_ref().is_none_or(|n| dup(n.as_fd(), &[0]))
                        && p.as_ref()
                            .is_none_or(|(o, e)| dup(o.1.as_fd(), &[1]) && dup(e.1.as_fd(), &[2]))
                }
            };
            if !stdio_ok {
                crate::sys::exit_now(125);
            }
            init::cloned_init(cfg, ack_w, go_r)
        });
        let _ = std::panic::catch_unwind(child);
        crate::sys::exit_now(125);
    }
    let outs = pipes
        .map(|(o, e)| vec![(o.0, super::Stream::Stdout), (e.0, super::Stream::Stderr)])
        .unwrap_or_default();
    Ok(Cloned {
        pid,
        outs,
        ack: ack_r,
        go: go_w,
    })
}

fn supervise(
    launch: Launch,
    spec: &crate::spec::RunSpec,
    map: &IdMap,
    relay: Relay<'_>,
    start: Instant,
    img: &crate::store::Image,
    mut events: Option<&mut dyn FnMut(super::RunEvent<'_>)>,
) -> Result<RunResult, RunError> {
    let Relay {
        sigfd,
        pty,
        cgroup,
        input,
        mut warnings,
    } = relay;
    // Output pipes (only when the caller takes events and there is no pty).
    let mut outs: Vec<(std::os::fd::OwnedFd, super::Stream)> = Vec::new();
    // What tells that init is ready to be mapped: its ack (cloned here),
    // or its pid from the exec'd helper (sent after init's ack).
    enum Ready {
        Ack(std::os::fd::OwnedFd),
        Report(std::os::fd::OwnedFd),
    }
    let (raw, ready, go) = match launch {
        Launch::Exec {
            mut cmd,
            report,
            go,
        } => {
            if events.is_some() && pty.is_none() {
                cmd.stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
            }
            let mut child = cmd.spawn().map_err(|e| {
                RunError::host(format!("start sandbox helper {:?}", cmd.get_program()), e)
            })?;
            // The pty slave copies and the helper's ends of the pipes in
            // `cmd` must close, or the master never sees EOF and a dead
            // helper would look alive.
            drop(cmd);
            if let Some(o) = child.stdout.take() {
                outs.push((std::os::fd::OwnedFd::from(o), super::Stream::Stdout));
            }
            if let Some(e) = child.stderr.take() {
                outs.push((std::os::fd::OwnedFd::from(e), super::Stream::Stderr));
            }
            (child.id() as i32, Ready::Report(report), go)
        }
        Launch::Fork(cfg, stdin_pipe) => {
            let stdin = match stdin_pipe {
                Some(r) => Stdin::Pipe(r),
                None if spec.stdin => Stdin::Inherit,
                None => Stdin::Null,
            };
            let c = clone_init(&cfg, stdin, pty.as_ref(), events.is_some())?;
            outs = c.outs;
            (c.pid, Ready::Ack(c.ack), c.go)
        }
    };
    let pid =
        Pid::from_raw(raw).ok_or_else(|| RunError::host("spawn", io::Error::other("bad pid")))?;
    // Until the helper is reaped below, any early return kills and reaps it.
    let mut guard = ReapGuard { pid, armed: true };
    for (fd, _) in &outs {
        let fl = rustix::fs::fcntl_getfl(fd).map_err(|e| RunError::host("fcntl", e.into()))?;
        rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| RunError::host("fcntl", e.into()))?;
    }
    // The helper has its copy of the warnings pipe: kiln keeps only the
    // read end.
    warnings.write = None;
    if let Some(r) = &warnings.read {
        let fl = rustix::fs::fcntl_getfl(r).map_err(|e| RunError::host("fcntl", e.into()))?;
        rustix::fs::fcntl_setfl(r, fl | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| RunError::host("fcntl", e.into()))?;
    }
    if let Some(ev) = events.as_mut() {
        ev(super::RunEvent::Started { pid: raw as u32 });
    }
    // Wait for init's ack (PDEATHSIG armed): only then are its maps written.
    let early_exit = |guard: &mut ReapGuard| {
        // It is gone (end of file): say how it ended.
        let st = loop {
            match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
                Err(rustix::io::Errno::INTR) => continue,
                r => break r,
            }
        };
        guard.armed = false;
        let status = match st {
            Ok(Some((_, st))) => format!("{:?}", st.exit_status()),
            _ => "unknown".into(),
        };
        RunError::Unsupported(format!(
            "the sandbox's init exited before it started (status {status}): {}",
            userns_hint()
        ))
    };
    let init_pid = match ready {
        Ready::Ack(ack) => match init::read_byte(&ack) {
            Ok(Some(_)) => raw,
            Ok(None) => return Err(early_exit(&mut guard)),
            Err(e) => return Err(RunError::host("wait for the sandbox's init", e)),
        },
        Ready::Report(report) => {
            let mut b = [0u8; 4];
            let mut got = 0;
            while got < 4 {
                match rustix::io::read(&report, &mut b[got..]) {
                    Ok(0) => return Err(early_exit(&mut guard)),
                    Ok(n) => got += n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(RunError::host("wait for the sandbox helper", e.into())),
                }
            }
            i32::from_le_bytes(b)
        }
    };
    // Into the run's cgroup before it forks anything: every sandbox
    // process inherits it.
    if let Some(cg) = cgroup {
        if let Err(e) = cg.add(init_pid) {
            return Err(RunError::host(
                format!("move the sandbox into {}", cg.path().display()),
                e,
            ));
        }
    }
    if let Err(e) = map.apply(init_pid) {
        return Err(RunError::host("write uid_map/gid_map", e));
    }
    rustix::io::write(&go, &[1])
        .map_err(|e| RunError::host("resume the sandbox's init", e.into()))?;
    drop(go);
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| RunError::host("pidfd_open", e.into()))?;
    // The pty: master non-blocking; the caller's input relayed with -i (a
    // caller terminal in raw mode meanwhile).
    let mut pty_open = pty.is_some();
    let mut input = input;
    let mut stdin_open = (pty.is_some() || input.is_some()) && spec.stdin;
    let _raw = (pty.is_some() && stdin_open).then(super::pty::RawMode::enter);
    if let Some(w) = &input {
        let fl = rustix::fs::fcntl_getfl(w).map_err(|e| RunError::host("fcntl", e.into()))?;
        rustix::fs::fcntl_setfl(w, fl | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| RunError::host("fcntl", e.into()))?;
    }
    if let Some(p) = &pty {
        let fl =
            rustix::fs::fcntl_getfl(&p.master).map_err(|e| RunError::host("fcntl", e.into()))?;
        rustix::fs::fcntl_setfl(&p.master, fl | rustix::fs::OFlags::NONBLOCK)
            .map_err(|e| RunError::host("fcntl", e.into()))?;
    }
    let tty_out =
        |data: &[u8], events: &mut Option<&mut dyn FnMut(super::RunEvent<'_>)>| match events
            .as_mut()
        {
            Some(ev) => ev(super::RunEvent::Output {
                stream: super::Stream::Stdout,
                data,
            }),
            None => {
                let mut out = io::stdout().lock();
                let _ = io::Write::write_all(&mut out, data);
                let _ = io::Write::flush(&mut out);
            }
        };
    let mut buf = vec![0u8; 16384];
    let mut pending: Vec<u8> = Vec::new();
    // --timeout bounds the sandbox, not a first-time unpack before it.
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    // After the timeout: SIGTERM (init passes it to the command), then
    // SIGKILL of the whole sandbox when the grace period is over.
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    loop {
        let now = Instant::now();
        if !timed_out && deadline.is_some_and(|d| now >= d) {
            timed_out = true;
            if spec.timeout_grace.is_zero() {
                kill_at = Some(now);
            } else {
                let _ = rustix::process::kill_process(pid, Signal::TERM);
                kill_at = Some(now + spec.timeout_grace);
            }
        }
        if kill_at.is_some_and(|k| now >= k) {
            killed = true;
            kill_at = None;
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
        let wake = if timed_out { kill_at } else { deadline };
        let timeout = wake.map(|d| d.saturating_duration_since(now));
        let mut fds = vec![rustix::event::PollFd::new(
            &pidfd,
            rustix::event::PollFlags::IN,
        )];
        if let Some(s) = sigfd {
            fds.push(rustix::event::PollFd::new(s, rustix::event::PollFlags::IN));
        }
        for (fd, _) in &outs {
            fds.push(rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN));
        }
        let warn_slot = fds.len();
        if let Some(r) = &warnings.read {
            fds.push(rustix::event::PollFd::new(r, rustix::event::PollFlags::IN));
        }
        let stdin = io::stdin();
        // Input waits in `pending` until the pty takes it, so a command
        // that does not read never blocks kiln (or its --timeout).
        let take_input = stdin_open && pending.len() < MAX_PENDING;
        let (pty_slot, stdin_slot) = (fds.len(), fds.len() + usize::from(pty_open));
        if let (Some(p), true) = (&pty, pty_open) {
            let mut flags = rustix::event::PollFlags::IN;
            if !pending.is_empty() {
                flags |= rustix::event::PollFlags::OUT;
            }
            fds.push(rustix::event::PollFd::new(&p.master, flags));
        }
        if take_input {
            fds.push(rustix::event::PollFd::new(
                &stdin,
                rustix::event::PollFlags::IN,
            ));
        }
        let input_slot = fds.len();
        if let (Some(w), false) = (&input, pending.is_empty()) {
            fds.push(rustix::event::PollFd::new(w, rustix::event::PollFlags::OUT));
        }
        let ts = timeout.map(|t| rustix::event::Timespec {
            tv_sec: t.as_secs() as i64,
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(RunError::host("poll", e.into())),
        }
        let exited = fds[0].revents().contains(rustix::event::PollFlags::IN);
        let ready = |i: usize| fds.get(i).is_some_and(|f| !f.revents().is_empty());
        let (pty_ready, stdin_ready) =
            (pty_open && ready(pty_slot), take_input && ready(stdin_slot));
        let pty_writable = pty_open
            && fds
                .get(pty_slot)
                .is_some_and(|f| f.revents().contains(rustix::event::PollFlags::OUT));
        let input_ready = input.is_some() && !pending.is_empty() && ready(input_slot);
        let warn_ready = warnings.read.is_some() && ready(warn_slot);
        drop(fds);
        if warn_ready {
            warnings.drain(&mut events);
        }
        if input_ready {
            if let Some(w) = &input {
                match rustix::io::write(w, &pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    // The command closed its stdin: nothing more to pass.
                    Err(_) => {
                        pending.clear();
                        input = None;
                        stdin_open = false;
                    }
                }
            }
        }
        if let (Some(p), true) = (&pty, pty_writable) {
            let n = p.write_some(&pending);
            pending.drain(..n);
        }
        if let (Some(p), true) = (&pty, pty_ready) {
            match p.read(&mut buf) {
                Some(0) => {}
                Some(n) => tty_out(&buf[..n], &mut events),
                None => pty_open = false,
            }
        }
        if stdin_ready {
            match rustix::io::read(&stdin, &mut buf) {
                Ok(0) | Err(_) => {
                    // End of input: ^D, as a terminal would send (a pipe
                    // closes once what is pending is passed on).
                    if pty.is_some() {
                        pending.push(4);
                    }
                    stdin_open = false;
                }
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        if !stdin_open && pending.is_empty() {
            input = None;
        }
        if let Some(ev) = events.as_mut() {
            outs.retain(|(fd, stream)| pump(fd, *stream, &mut **ev));
        }
        if let Some(s) = sigfd {
            while let Some(sig) = crate::sys::read_signalfd(s) {
                if sig == libc::SIGWINCH {
                    if let Some(p) = &pty {
                        p.resize();
                    }
                } else if let Some(sig) = Signal::from_named_raw(sig) {
                    let _ = rustix::process::kill_process(pid, sig);
                }
            }
        }
        if exited {
            break;
        }
    }
    // Drain what the sandbox wrote before it ended (its pid namespace is gone,
    // so every writer is closed and the pipes reach EOF; the pty says EIO).
    if let (Some(p), true) = (&pty, pty_open) {
        while let Some(n) = p.read(&mut buf) {
            if n == 0 {
                break;
            }
            tty_out(&buf[..n], &mut events);
        }
    }
    if let Some(ev) = events.as_mut() {
        for (fd, stream) in &outs {
            let fl = rustix::fs::fcntl_getfl(fd).unwrap_or(rustix::fs::OFlags::empty());
            let _ = rustix::fs::fcntl_setfl(fd, fl - rustix::fs::OFlags::NONBLOCK);
            while pump(fd, *stream, &mut **ev) {}
        }
    }
    warnings.drain(&mut events);
    let status = loop {
        match rustix::process::waitpid(Some(pid), WaitOptions::empty()) {
            Ok(Some((_, st))) if st.exited() || st.signaled() => break st,
            Ok(_) => continue,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(RunError::host("wait for sandbox", e.into())),
        }
    };
    guard.armed = false;
    let code = match (status.exit_status(), status.terminating_signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 125,
    };
    let (exit_code, signal) = super::outcome::settle(code, timed_out, killed);
    Ok(RunResult {
        exit_code,
        signal,
        timed_out,
        duration: start.elapsed(),
        image_digest: img.descriptor.digest().to_string(),
        committed: None,
        warnings: warnings.lines,
        timings: Vec::new(),
    })
}
