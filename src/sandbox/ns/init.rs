//! The namespace backend, inside: `kiln __sandbox-init` (the exec'd
//! helper), the sandbox's init (PID 1) and the command's process. Runs in
//! kiln's own single-threaded processes.
//!
//! ```text
//! init     user ns U1 (ids mapped by kiln), mount, pid and cgroup ns;
//!          builds the root, then holds no descriptor, environment or
//!          command line of kiln's, and is not dumpable
//!  └─ cmd  user ns U2 inside U1 (the same ids), its own net, uts and ipc ns;
//!          caps dropped, no_new_privs, seccomp
//! ```
//!
//! The command's user namespace is a child of the one that owns the mount
//! namespace, so no capability it is given (`--cap-add CAP_SYS_ADMIN`)
//! reaches the sandbox's mounts: read-only binds stay read-only, masked
//! paths stay masked, and a mount namespace it makes for itself copies
//! them locked. Nor does any capability reach init or a fuse-overlayfs
//! daemon, which live in U1 (`CAP_SYS_PTRACE` cannot open their
//! descriptors). Its net, uts and ipc namespaces belong to U2, so
//! `--cap-add CAP_NET_ADMIN` and friends act on them.
//!
//! Start-up handshake (kiln -> init): init sets PDEATHSIG, then writes one
//! byte (the ack); only then does kiln write the id maps and one byte back
//! (go). End of file instead of go means kiln died before the maps, and
//! kiln's death after the ack kills init through PDEATHSIG: an init never
//! runs on without kiln.
//!
//! Any failure here prints `kiln: sandbox: STEP: ERROR` and exits 125.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::{self as m, MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Pid, Signal, WaitOptions};
use rustix::thread::UnshareFlags;

use super::{InitConfig, CONFIG_ENV, COPY_MARKER};
use crate::spec::Network;
use crate::sys;

/// What stage 1 and init wait for: the forwarded signals and their child's exit.
const WAITED: [i32; 5] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGCHLD,
];

/// Descriptors kiln hands its exec'd helper: where the helper reports
/// init's pid (once init has acknowledged), and where init reads go.
pub(crate) const HELPER_REPORT_FD: i32 = 3;
pub(crate) const HELPER_GO_FD: i32 = 4;
/// Where the exec'd helper finds the warnings pipe's write end.
pub(crate) const HELPER_WARN_FD: i32 = 5;

fn die(step: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("kiln: sandbox: {step}: {e}");
    sys::exit_now(125)
}

trait OrDie<T> {
    fn or_die(self, step: &str) -> T;
}

impl<T, E: std::fmt::Display> OrDie<T> for Result<T, E> {
    fn or_die(self, step: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => die(step, e),
        }
    }
}

/// Reads one byte; `None` at end of file (the writer is gone).
pub(crate) fn read_byte(fd: &OwnedFd) -> io::Result<Option<u8>> {
    let mut b = [0u8; 1];
    loop {
        match rustix::io::read(fd, &mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Hands a warning to kiln (a line on the warnings pipe, which becomes
/// one of `RunResult::warnings`); without the pipe, says it on stderr.
fn warn(cfg: &InitConfig, msg: &str) {
    let line = format!("{}\n", msg.replace('\n', " "));
    if cfg.warn_fd < 3 || sys::write_raw_fd(cfg.warn_fd, line.as_bytes()).is_err() {
        eprintln!("kiln: warning: {msg}");
    }
}

fn write_all(fd: &OwnedFd, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).or_die("pipe")
}

/// Entry point of `kiln __sandbox-init`. Never returns.
pub(crate) fn helper_main() -> ! {
    let json = std::env::var(CONFIG_ENV).or_die("read configuration");
    let cfg: InitConfig = serde_json::from_str(&json).or_die("parse configuration");
    if cfg.cli_flags {
        crate::words::use_cli_flags();
    }
    let report = sys::take_fd(HELPER_REPORT_FD).or_die("take the report descriptor");
    let go = sys::take_fd(HELPER_GO_FD).or_die("take the go descriptor");
    helper_run(&cfg, report, go)
}

/// The exec'd helper (used where kiln cannot clone: a caller with threads):
/// clones init, reports its pid once init has acknowledged, then relays
/// signals to it and its exit status back. Never returns.
fn helper_run(cfg: &InitConfig, report: OwnedFd, go: OwnedFd) -> ! {
    sys::unblock_all_signals().or_die("unblock signals");
    // PDEATHSIG was set before exec; if kiln died before that, our parent
    // is someone else by now: stop.
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get());
    if cfg.parent_pid != 0 && parent != cfg.parent_pid {
        die("start", "kiln exited before the sandbox started");
    }
    let (ack_r, ack_w) = pipe();
    sys::sigmask(&WAITED, true).or_die("block signals");
    let init = sys::clone_fork(namespaces())
        .or_die("clone into new namespaces (user, mount, pid, cgroup)");
    if init == 0 {
        drop(ack_r);
        drop(report);
        cloned_init(cfg, ack_w, go);
    }
    drop(ack_w);
    drop(go);
    match read_byte(&ack_r) {
        Ok(Some(_)) => {}
        _ => die("start init", "init exited before it started"),
    }
    write_all(&report, &init.to_le_bytes()).or_die("report init's pid");
    drop(report);
    let init_pid = Pid::from_raw(init).unwrap_or_else(|| die("clone init", "bad pid"));
    loop {
        let sig = sys::sigwait(&WAITED).or_die("wait for signals");
        if sig == libc::SIGCHLD {
            if let Ok(Some((_, st))) = rustix::process::waitpid(Some(init_pid), WaitOptions::NOHANG)
            {
                if let Some(code) = st.exit_status() {
                    sys::exit_now(code);
                }
                if let Some(s) = st.terminating_signal() {
                    sys::exit_now(128 + s);
                }
            }
        } else if let Some(s) = Signal::from_named_raw(sig) {
            let _ = rustix::process::kill_process(init_pid, s);
        }
    }
}

/// The namespaces init is cloned into. The command's net, uts and ipc
/// namespaces are its own (made with its nested user namespace).
pub(crate) fn namespaces() -> UnshareFlags {
    UnshareFlags::NEWUSER | UnshareFlags::NEWNS | UnshareFlags::NEWPID | UnshareFlags::NEWCGROUP
}

/// The namespaces of the command's process, made by init.
fn command_namespaces(network: Network) -> UnshareFlags {
    let mut flags = UnshareFlags::NEWUSER | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    if network == Network::None {
        flags |= UnshareFlags::NEWNET;
    }
    flags
}

fn check_mapping(cfg: &InitConfig) {
    if !cfg.keep_id && !rustix::process::getuid().is_root() {
        die("id mapping", "uid 0 is not mapped in the user namespace");
    }
}

/// The child of `clone_fork` into the sandbox's namespaces, PID 1 already:
/// arms PDEATHSIG, acknowledges on `ack`, waits until the uid/gid maps are
/// written (one byte on `go`; end of file means kiln died first), then
/// runs init. Never returns.
pub(crate) fn cloned_init(cfg: &InitConfig, ack: OwnedFd, go: OwnedFd) -> ! {
    sys::unblock_all_signals().or_die("unblock signals");
    // From here on our parent's death kills us; kiln maps us only after
    // the ack, so a death before this shows as end of file on `go`.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .or_die("set parent-death signal");
    write_all(&ack, &[1]).or_die("acknowledge");
    drop(ack);
    match read_byte(&go) {
        Ok(Some(_)) => {}
        Ok(None) => sys::exit_now(125),
        Err(e) => die("wait for id mapping", e),
    }
    drop(go);
    check_mapping(cfg);
    sys::sigmask(&WAITED, true).or_die("block signals");
    init_main(cfg)
}

/// PID 1: build the root, start the command, reap, forward signals.
fn init_main(cfg: &InitConfig) -> ! {
    // A recognizable name in `ps` (init may be a clone of kiln).
    let _ = rustix::thread::set_name(c"kiln-init");
    // Nothing kiln or its caller had open stays: the root is built from
    // paths, and the cache and run-directory locks are kiln's to hold.
    sys::close_from_3_but((cfg.warn_fd >= 3).then_some(cfg.warn_fd))
        .or_die("close inherited descriptors");
    let root = &cfg.merged;
    build_root(cfg);
    // Warnings come only from building the root: kiln's end closes now.
    if cfg.warn_fd >= 3 {
        sys::close_raw_fd(cfg.warn_fd);
    }
    // kiln's command line and environment (store paths, the CI job's
    // secrets) are what /proc/1/cmdline and /proc/1/environ would show.
    sys::scrub_process_strings("kiln-init").or_die("clear init's command line and environment");
    let (go_r, go_w) = pipe();
    let cmd = sys::clone_fork(command_namespaces(cfg.network))
        .or_die("clone the command into its user, net, uts and ipc namespaces");
    if cmd == 0 {
        drop(go_w);
        command_main(cfg, go_r);
    }
    drop(go_r);
    // Not dumpable (after the clone, which would inherit it and so be out
    // of init's reach): no process of the sandbox may open init's
    // descriptors, memory or environment through /proc/1. Init's memory
    // belongs to the host's user namespace, so no capability inside
    // reaches it.
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .or_die("make init non-dumpable");
    let cmd_pid = Pid::from_raw(cmd).unwrap_or_else(|| die("clone the command", "bad pid"));
    map_nested(cfg, &root.join("proc").join(cmd.to_string()));
    mount_sys(cfg, root, cmd);
    enter_root(root);
    write_all(&go_w, &[1]).or_die("start the command");
    drop(go_w);
    let mut code: Option<i32> = None;
    loop {
        // Reap everything; the command's status decides ours.
        // wait() is any child; waitpid(None) would be only our process group,
        // missing a command that called setsid (as -t does).
        while let Ok(Some((pid, st))) = rustix::process::wait(WaitOptions::NOHANG) {
            if pid == cmd_pid {
                code = Some(match (st.exit_status(), st.terminating_signal()) {
                    (Some(c), _) => c,
                    (None, Some(s)) => 128 + s,
                    _ => 125,
                });
            }
        }
        if let Some(c) = code {
            // Kill whatever the command left behind: kill(-1) from PID 1
            // reaches every other process of the pid namespace.
            sys::kill_all();
            sys::exit_now(c);
        }
        let sig = sys::sigwait(&WAITED).or_die("wait for signals");
        if sig != libc::SIGCHLD {
            if let Some(s) = Signal::from_named_raw(sig) {
                let _ = rustix::process::kill_process(cmd_pid, s);
            }
        }
    }
}

/// Maps the command's user namespace (a child of init's) onto the same
/// ids: every range init has, each to itself.
fn map_nested(cfg: &InitConfig, proc_pid: &Path) {
    let text = |v: &[(u32, u32)]| {
        v.iter()
            .map(|(first, count)| format!("{first} {first} {count}\n"))
            .collect::<String>()
    };
    fs::write(proc_pid.join("uid_map"), text(&cfg.uid_ranges))
        .or_die("write the command's uid_map");
    fs::write(proc_pid.join("gid_map"), text(&cfg.gid_ranges))
        .or_die("write the command's gid_map");
}

/// The command's process: wait for init, name the host and bring lo up in
/// its own namespaces, then drop privileges and exec. Never returns.
fn command_main(cfg: &InitConfig, go: OwnedFd) -> ! {
    match read_byte(&go) {
        Ok(Some(_)) => {}
        _ => sys::exit_now(125),
    }
    drop(go);
    rustix::system::sethostname(cfg.hostname.as_bytes()).or_die("set host name");
    if cfg.network == Network::None {
        sys::loopback_up().or_die("bring lo up");
    }
    exec_command(cfg)
}

/// mount(2) with a string data argument.
fn mnt(
    src: &str,
    target: impl AsRef<Path>,
    fstype: &str,
    flags: MountFlags,
    data: &str,
) -> io::Result<()> {
    let data = CString::new(data).map_err(|_| io::Error::other("mount data contains NUL"))?;
    m::mount(src, target.as_ref(), fstype, flags, Some(data.as_c_str())).map_err(Into::into)
}

fn mkdirs(p: &Path) {
    fs::create_dir_all(p).or_die(&format!("create {}", p.display()));
}

/// `size=` for a tmpfs of at most `bytes` (rounded up to KiB).
fn tmpfs_size(bytes: u64) -> String {
    format!("size={}k", bytes.div_ceil(1024).max(1))
}

/// Builds the sandbox's root under `cfg.merged`, still seeing the host's
/// file system: the root itself, /proc, /dev, /tmp and the volumes. /sys
/// follows once the command's network namespace exists ([`mount_sys`]).
fn build_root(cfg: &InitConfig) {
    // Nothing we mount may propagate back to the host.
    m::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .or_die("make / private");
    if let Some(scratch) = &cfg.scratch {
        // The run's upper layer in memory: a tmpfs only this mount
        // namespace sees, gone with it, of at most --upper-size.
        mnt(
            "tmpfs",
            scratch,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            &format!("mode=0700,{}", tmpfs_size(cfg.upper_size)),
        )
        .or_die("mount the run's tmpfs");
        // overlayfs in a user namespace keeps its whiteouts and opaque
        // markers in user.* xattrs, which tmpfs has only since Linux 6.6
        // (kiln picks disk there unless told otherwise).
        if let Err(e) = rustix::fs::setxattr(
            scratch,
            "user.kiln.probe",
            b"1",
            rustix::fs::XattrFlags::empty(),
        ) {
            die(
                "use the run's tmpfs",
                format!(
                    "it takes no user.* xattrs on this kernel ({e}; Linux >= 6.6 needed): use {}",
                    crate::words::Opt::UpperDisk
                ),
            );
        }
        for d in [&cfg.upper, &cfg.work, &cfg.merged] {
            mkdirs(d);
        }
    }
    let root = &cfg.merged;
    // The image's setuid files and device nodes never act in a run: every
    // root is nosuid and nodev (no_new_privs already voids setuid for the
    // command; this holds for anything else too).
    let nosuid_nodev = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if cfg.read_only {
        m::mount_bind_recursive(&cfg.lower, root).or_die("bind the image read-only");
        sys::make_readonly_recursive(root).or_die("make the image read-only");
    } else {
        // Kernel overlayfs inside the user namespace (Linux >= 5.11): the
        // shared read-only image below, this run's writes in `upper`.
        // Given relative to the directory that holds all three, so the
        // options /proc/mounts shows inside name no host path.
        let (lower, upper, work) = relative_layers(cfg);
        let data = format!("lowerdir={lower},upperdir={upper},workdir={work},userxattr");
        use crate::spec::RootfsMode;
        let mut done = false;
        if cfg.rootfs == RootfsMode::Auto && cfg.no_kernel_overlay {
            warn(
                cfg,
                "kernel overlayfs is unavailable here (KILN_NO_KERNEL_OVERLAY is set)",
            );
        } else if matches!(cfg.rootfs, RootfsMode::Auto | RootfsMode::Overlay) {
            match mnt(
                "overlay",
                root,
                "overlay",
                MountFlags::NOSUID | MountFlags::NODEV,
                &data,
            ) {
                Ok(()) => done = true,
                Err(e) if cfg.rootfs == RootfsMode::Overlay => die("mount overlayfs", e),
                Err(e) => warn(cfg, &format!("kernel overlayfs is unavailable here ({e})")),
            }
        }
        if !done && matches!(cfg.rootfs, RootfsMode::Auto | RootfsMode::FuseOverlay) {
            match fuse_overlay(cfg, root) {
                Ok(()) => {
                    done = true;
                    if cfg.rootfs == RootfsMode::Auto {
                        warn(cfg, "using fuse-overlayfs instead (slower file access)");
                    }
                }
                Err(e) if cfg.rootfs == RootfsMode::FuseOverlay => die("mount fuse-overlayfs", e),
                Err(e) => warn(cfg, &format!("fuse-overlayfs is unavailable here ({e})")),
            }
            if done {
                sys::set_mount_attrs_recursive(root, nosuid_nodev)
                    .or_die("make the root nosuid and nodev");
            }
        }
        if !done {
            // The last resort: a private copy of the image for this run.
            // Slow for big images, so say so.
            if cfg.rootfs != RootfsMode::Copy {
                warn(
                    cfg,
                    "copying the image for this run instead (slow for large images)",
                );
            }
            // Tell kiln (for --commit): the upper dir is a full copy, not a diff.
            fs::write(cfg.work.join(COPY_MARKER), b"").or_die("mark the copy");
            copy_tree(&cfg.lower, &cfg.upper, cfg.copy_rootless);
            m::mount_bind_recursive(&cfg.upper, root).or_die("bind the copied root");
            sys::set_mount_attrs_recursive(root, nosuid_nodev)
                .or_die("make the root nosuid and nodev");
        }
    }
    let at = |p: &str| root.join(p);
    for d in ["proc", "dev", "tmp", "sys"] {
        if !at(d).is_dir() && !cfg.read_only {
            mkdirs(&at(d));
        }
    }
    mnt(
        "proc",
        at("proc"),
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        "",
    )
    .or_die("mount /proc");
    // A minimal /dev: device nodes cannot be created in a user namespace,
    // so the host's harmless ones are bind-mounted (as bubblewrap does);
    // the tmpfs itself is nodev (the binds are mounts of their own).
    mnt(
        "tmpfs",
        at("dev"),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::STRICTATIME,
        "mode=0755,size=65536k",
    )
    .or_die("mount /dev");
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = at("dev").join(d);
        fs::write(&target, b"").or_die(&format!("create /dev/{d}"));
        m::mount_bind(format!("/dev/{d}"), &target).or_die(&format!("bind /dev/{d}"));
    }
    if let Some(slave) = &cfg.tty_name {
        // The pty kiln made is the console (as runc does); its slave is
        // still reachable in the caller's /dev/pts until pivot_root.
        let target = at("dev/console");
        fs::write(&target, b"").or_die("create /dev/console");
        m::mount_bind(slave, &target).or_die("bind the pty to /dev/console");
    }
    mkdirs(&at("dev/pts"));
    mnt(
        "devpts",
        at("dev/pts"),
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    .or_die("mount /dev/pts");
    std::os::unix::fs::symlink("pts/ptmx", at("dev/ptmx")).or_die("link /dev/ptmx");
    mkdirs(&at("dev/shm"));
    mnt(
        "tmpfs",
        at("dev/shm"),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        &format!("mode=1777,{}", tmpfs_size(cfg.shm_size)),
    )
    .or_die("mount /dev/shm");
    for (l, t) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(t, at("dev").join(l)).or_die(&format!("link /dev/{l}"));
    }
    mnt(
        "tmpfs",
        at("tmp"),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        &format!("mode=1777,{}", tmpfs_size(cfg.tmp_size)),
    )
    .or_die("mount /tmp");
    for v in &cfg.volumes {
        bind_volume(root, v);
    }
}

/// /sys: a fresh sysfs showing the command's network namespace (init
/// joins it to mount one), or with the host's network (not ours to mount
/// sysfs for) the host's, read-only. Before pivot_root: a sysfs may be
/// mounted in a user namespace only where one is already fully visible.
fn mount_sys(cfg: &InitConfig, root: &Path, cmd: i32) {
    let at = root.join("sys");
    let ro = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let fresh = cfg.network == Network::None && {
        let ns = root.join(format!("proc/{cmd}/ns/net"));
        let fd = rustix::fs::open(&ns, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .or_die("open the command's network namespace");
        rustix::thread::move_into_link_name_space(
            rustix::fd::AsFd::as_fd(&fd),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .or_die("join the command's network namespace");
        mnt("sysfs", &at, "sysfs", ro, "").is_ok()
    };
    if !fresh {
        // Recursively read-only: /sys/fs/cgroup and the like come along.
        m::mount_bind_recursive("/sys", &at).or_die("bind /sys");
        sys::make_readonly_recursive(&at).or_die("make /sys read-only");
    }
    // Host firmware tables are nobody's business inside.
    mask_dirs(&[at.join("firmware")]);
}

/// pivot_root(".", ".") into `root`, then detach the old root stacked on
/// top (the bubblewrap/runc idiom: no directory for the old root is
/// needed), and mask /proc.
fn enter_root(root: &Path) {
    rustix::process::chdir(root).or_die("chdir to the new root");
    rustix::process::pivot_root(".", ".").or_die("pivot_root");
    m::unmount(".", UnmountFlags::DETACH).or_die("detach the old root");
    rustix::process::chdir("/").or_die("chdir /");
    mask_proc();
}

/// Changes into the deepest directory holding the image, the upper and
/// the work directory, and returns their paths relative to it.
fn relative_layers(cfg: &InitConfig) -> (String, String, String) {
    let mut base = cfg.lower.clone();
    while !(cfg.upper.starts_with(&base) && cfg.work.starts_with(&base)) {
        if !base.pop() {
            break;
        }
    }
    rustix::process::chdir(&base).or_die(&format!("chdir {}", base.display()));
    let rel = |p: &Path| {
        let r = p.strip_prefix(&base).unwrap_or(p);
        if r.as_os_str().is_empty() {
            ".".to_string()
        } else {
            r.display().to_string()
        }
    };
    (rel(&cfg.lower), rel(&cfg.upper), rel(&cfg.work))
}

/// Mounts fuse-overlayfs on `root`. Its daemon is started by init, so it
/// lives in the sandbox's pid namespace and dies with it.
fn fuse_overlay(cfg: &InitConfig, root: &Path) -> io::Result<()> {
    // Looked up here, not by every run: only a fallback needs it (init
    // still sees the host's file system).
    let found = cfg
        .fuse_overlayfs
        .clone()
        .or_else(|| crate::sys::find_tool("fuse-overlayfs"));
    let bin = found.as_ref().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "fuse-overlayfs is not installed (Debian package fuse-overlayfs)",
        )
    })?;
    // Relative paths: the daemon's command line is readable inside.
    let (lower, upper, work) = relative_layers(cfg);
    let opts = format!("lowerdir={lower},upperdir={upper},workdir={work}");
    let cwd = std::env::current_dir()?;
    let target = root.strip_prefix(&cwd).unwrap_or(root);
    let out = std::process::Command::new(bin)
        .arg("-o")
        .arg(opts)
        .arg(target)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{} failed ({}): {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

fn copy_tree(from: &Path, to: &Path, rootless: bool) {
    let mut u = crate::unpack::Unpacker::new(to, rootless).or_die("open the copy target");
    crate::source::dir::walk(from, &mut |e, data| {
        u.entry(e, data)
            .map_err(|err| crate::import::LayerError::Archive {
                path: from.display().to_string(),
                reason: err.to_string(),
            })
    })
    .or_die("copy the image");
    u.finish().or_die("finish the copy");
}

/// Covers each existing directory with an empty read-only tmpfs.
fn mask_dirs(dirs: &[std::path::PathBuf]) {
    for d in dirs {
        if d.is_dir() {
            mnt(
                "tmpfs",
                d,
                "tmpfs",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                "size=4k,mode=0555",
            )
            .or_die(&format!("mask {}", d.display()));
        }
    }
}

/// Hides /proc files that leak host information or allow host actions
/// (the list of the OCI runtimes' default masked and read-only paths).
fn mask_proc() {
    for p in [
        "/proc/kcore",
        "/proc/keys",
        "/proc/timer_list",
        "/proc/timer_stats",
        "/proc/sched_debug",
        "/proc/latency_stats",
    ] {
        if Path::new(p).exists() {
            m::mount_bind("/dev/null", p).or_die(&format!("mask {p}"));
        }
    }
    mask_dirs(&["/proc/acpi".into(), "/proc/scsi".into()]);
    for p in [
        "/proc/sys",
        "/proc/sysrq-trigger",
        "/proc/irq",
        "/proc/bus",
        "/proc/fs",
    ] {
        if Path::new(p).exists() {
            m::mount_bind(p, p).or_die(&format!("bind {p}"));
            m::mount_remount(
                p,
                MountFlags::BIND
                    | MountFlags::RDONLY
                    | MountFlags::NOSUID
                    | MountFlags::NODEV
                    | MountFlags::NOEXEC,
                "",
            )
            .or_die(&format!("make {p} read-only"));
        }
    }
}

/// Binds a host path at `v.target`, resolving the target inside the root
/// (a symlink in the image cannot send the bind elsewhere on the host).
fn bind_volume(root: &Path, v: &crate::spec::Volume) {
    let step = format!("volume {}", v.target);
    let rootfd = rustix::fs::open(
        root,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .or_die("open root");
    let rel = v.target.trim_matches('/');
    let (parent, leaf) = rel.rsplit_once('/').unwrap_or(("", rel));
    let pfd = crate::unpack::ensure_dir_in_root(&rootfd, parent)
        .map_err(|(s, e)| format!("{s}: {e}"))
        .or_die(&step);
    if !leaf.is_empty() && rustix::fs::statat(&pfd, leaf, rustix::fs::AtFlags::empty()).is_err() {
        if v.source.is_dir() {
            crate::unpack::ensure_dir_in_root(&pfd, leaf)
                .map_err(|(s, e)| format!("{s}: {e}"))
                .or_die(&step);
        } else {
            rustix::fs::openat(
                &pfd,
                leaf,
                OFlags::CREATE | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                Mode::from_raw_mode(0o644),
            )
            .or_die(&step);
        }
    }
    let resolve = || {
        rustix::fs::openat2(
            &rootfd,
            if rel.is_empty() { "." } else { rel },
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT,
        )
        .or_die(&format!("resolve {step}"))
    };
    let target = resolve();
    m::mount_bind_recursive(
        &v.source,
        format!("/proc/self/fd/{}", target.as_raw_fd()).as_str(),
    )
    .or_die(&format!("bind {} at {}", v.source.display(), v.target));
    // Read-only, nosuid and nodev as asked (nosuid and nodev unless the
    // volume says `suid`/`dev`), on every mount under the volume too, and
    // without touching flags the user namespace locked.
    let mut attrs = 0;
    if v.read_only {
        attrs |= libc::MOUNT_ATTR_RDONLY;
    }
    if !v.suid {
        attrs |= libc::MOUNT_ATTR_NOSUID;
    }
    if !v.dev {
        attrs |= libc::MOUNT_ATTR_NODEV;
    }
    if attrs != 0 {
        // Re-resolve: the new fd refers to the mount just made.
        let mounted = resolve();
        sys::set_mount_attrs_recursive(
            Path::new(&format!("/proc/self/fd/{}", mounted.as_raw_fd())),
            attrs,
        )
        .or_die(&format!("set the mount flags of {}", v.target));
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| die("exec", format!("{s:?} contains a NUL byte")))
}

/// In the command's process: identity, privileges, then exec. Never returns.
fn exec_command(cfg: &InitConfig) -> ! {
    sys::unblock_all_signals().or_die("unblock signals");
    sys::default_signal_dispositions();
    // Always a new session: without -t the command must not share kiln's
    // controlling terminal (TIOCSTI could type into the caller's shell, as
    // in bubblewrap's CVE-2017-5226); with -t the pty becomes its own.
    rustix::process::setsid().or_die("setsid");
    if cfg.tty {
        rustix::process::ioctl_tiocsctty(std::io::stdin())
            .or_die("make the pty the controlling terminal");
    }
    let wd = Path::new(&cfg.workdir);
    if !wd.is_dir() {
        let _ = fs::create_dir_all(wd);
    }
    rustix::process::chdir(wd).or_die(&format!("chdir {}", cfg.workdir));
    for u in &cfg.ulimits {
        let lim = rustix::process::Rlimit {
            current: (u.soft != u64::MAX).then_some(u.soft),
            maximum: (u.hard != u64::MAX).then_some(u.hard),
        };
        // RunSpec::validate refused unknown numbers; a config that skipped
        // it still gets an error, not another limit.
        let res = crate::spec::rlimit_resource(u.resource)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
            .or_die(&format!("ulimit {} (resource {})", u.name, u.resource));
        rustix::process::setrlimit(res, lim).or_die(&format!("ulimit {}", u.name));
    }
    // Capabilities: empty the bounding set (but for --cap-add) while we
    // still hold CAP_SETPCAP, switch identity, then set every other set to
    // exactly the kept ones.
    // validate() range-checked cap_add; checked_shl keeps a number >= 64
    // from wrapping around to another capability all the same.
    let keep: u64 = cfg
        .cap_add
        .iter()
        .map(|&c| 1u64.checked_shl(c).unwrap_or(0))
        .fold(0, |m, bit| m | bit);
    sys::drop_bounding_set(keep).or_die("drop the capability bounding set");
    let (uid, gid) = cfg.user;
    if !cfg.setgroups_denied {
        rustix::thread::set_thread_groups(&[]).or_die("setgroups");
    }
    if keep != 0 && uid != 0 {
        sys::set_keepcaps().or_die("keep capabilities across setuid");
    }
    let g = rustix::fs::Gid::from_raw(gid);
    let u = rustix::fs::Uid::from_raw(uid);
    let unmapped = |what: &str, id: u32| {
        format!("{what} {id} is not mapped in the sandbox's user namespace (an unprivileged run maps only root)")
    };
    match rustix::thread::set_thread_res_gid(g, g, g) {
        Err(rustix::io::Errno::INVAL) => {
            die(&crate::words::Opt::User.to_string(), unmapped("gid", gid))
        }
        r => r.or_die(&format!("setresgid {gid}")),
    }
    match rustix::thread::set_thread_res_uid(u, u, u) {
        Err(rustix::io::Errno::INVAL) => {
            die(&crate::words::Opt::User.to_string(), unmapped("uid", uid))
        }
        r => r.or_die(&format!("setresuid {uid}")),
    }
    rustix::thread::clear_ambient_capability_set().or_die("clear ambient capabilities");
    let kept = rustix::thread::CapabilitySet::from_bits_retain(keep);
    rustix::thread::set_capabilities(
        None,
        rustix::thread::CapabilitySets {
            effective: kept,
            permitted: kept,
            inheritable: kept,
        },
    )
    .or_die("set capabilities");
    if uid != 0 {
        // A non-root command keeps added capabilities across exec only as ambient ones.
        for c in &cfg.cap_add {
            sys::raise_ambient(*c).or_die("raise ambient capability");
        }
    }
    rustix::thread::set_no_new_privs(true).or_die("set no_new_privs");
    // Nothing but stdio crosses into the command: descriptors kiln, its
    // embedder or its own caller left open without close-on-exec close now.
    sys::cloexec_from_3().or_die("close inherited descriptors");
    if cfg.seccomp {
        // Compiled before the last step so a failure is still reported;
        // installed last, right before exec.
        let progs = super::seccomp::filters(cfg.allow_userns).or_die("build the seccomp filter");
        super::seccomp::apply(&progs).or_die("install the seccomp filter");
    }
    let argv: Vec<CString> = cfg.argv.iter().map(|a| cstr(a)).collect();
    let envp: Vec<CString> = cfg.env.iter().map(|a| cstr(a)).collect();
    let prog = &cfg.argv[0];
    let path = cfg
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.clone()]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{prog}"))
            .collect()
    };
    let mut last = io::Error::from_raw_os_error(libc::ENOENT);
    let mut denied = None;
    for c in &candidates {
        let err = sys::execve(&cstr(c), &argv, &envp);
        if err.raw_os_error() == Some(libc::EACCES) || err.raw_os_error() == Some(libc::ENOEXEC) {
            denied = Some(err);
        } else {
            last = err;
        }
    }
    let (code, err) = match denied {
        Some(e) => (126, e),
        None if last.raw_os_error() == Some(libc::ENOENT) => (127, last),
        None => (126, last),
    };
    if code == 127 && !prog.contains('/') {
        eprintln!("kiln: error: exec {prog}: not found in the image's PATH ({path})");
    } else {
        eprintln!("kiln: error: exec {prog}: {err}");
    }
    sys::exit_now(code)
}
