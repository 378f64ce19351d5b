//! The run job (`kiln run --vm`): reads the [`Job`] from the channel,
//! builds the command's root (the image's tree over 9p, read-only, under an
//! overlay whose upper layer is guest memory), runs the command chrooted
//! there with the job's environment, directory and user, relays its stdin,
//! stdout and stderr as frames, forwards signals, and sends the exit
//! status last.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::mount::{self as m, MountFlags};

use super::{base_mounts, load_modules, say};
use crate::vm::channel::{
    read_frame, write_frame, Frames, Job, Kind, GUEST_ADDR, GUEST_DNS, GUEST_GATEWAY, PORT,
};

/// Runs the job; returns when the exit status is sent (or could not be).
pub(super) fn main() {
    let result = std::panic::catch_unwind(run).unwrap_or_else(|_| Err("the agent panicked".into()));
    if let Err(e) = result {
        say(&format!("kiln-agent: error: {e}"));
    }
    crate::sys::sync_all();
}

/// The device of the virtio-serial port called `name`.
fn find_port(name: &str) -> Result<PathBuf, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in fs::read_dir("/sys/class/virtio-ports")
            .into_iter()
            .flatten()
            .flatten()
        {
            if fs::read_to_string(e.path().join("name")).is_ok_and(|n| n.trim() == name) {
                let dev = Path::new("/dev").join(e.file_name());
                if dev.exists() {
                    return Ok(dev);
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("find the virtio-serial port {name}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run() -> Result<(), String> {
    base_mounts()?;
    load_modules();
    let port = find_port(PORT)?;
    let mut ctl = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&port)
        .map_err(|e| format!("open {}: {e}", port.display()))?;
    let mut frames = Frames::default();
    let (kind, data) =
        read_frame(&mut ctl, &mut frames).map_err(|e| format!("read the job: {e}"))?;
    if kind != Kind::Job {
        return Err(format!("read the job: got a {kind:?} frame first"));
    }
    let job: Job = serde_json::from_slice(&data).map_err(|e| format!("read the job: {e}"))?;
    let sent = match supervise(&job, &mut ctl, &mut frames) {
        Ok(code) => write_frame(&mut ctl, Kind::Exit, &code.to_le_bytes()),
        Err(e) => write_frame(&mut ctl, Kind::Error, e.as_bytes()),
    };
    sent.and_then(|()| ctl.flush())
        .map_err(|e| format!("send the result: {e}"))
}

/// The virtio disk whose serial is `serial`, once the kernel has it.
fn disk(serial: &str) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
            if fs::read_to_string(e.path().join("serial")).is_ok_and(|s| s.trim() == serial) {
                let dev = Path::new("/dev").join(e.file_name());
                if dev.exists() {
                    return Ok(dev.display().to_string());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("find the virtio disk {serial}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Directories the agent made in the command's root (mount points the
/// image lacks), as paths under /root, deepest last.
#[derive(Default)]
struct Made(Vec<PathBuf>);

impl Made {
    /// `/root/REL`, made if missing (and where it can be: on a read-only
    /// root it may not); `None` if it is not a directory.
    fn dir(&mut self, rel: &str) -> Option<String> {
        let p = Path::new("/root").join(rel.trim_start_matches('/'));
        let missing: Vec<PathBuf> = p
            .ancestors()
            .take_while(|a| *a != Path::new("/root") && fs::symlink_metadata(a).is_err())
            .map(Path::to_path_buf)
            .collect();
        let _ = fs::create_dir_all(&p);
        self.0
            .extend(missing.into_iter().rev().filter(|d| d.is_dir()));
        p.is_dir().then(|| p.display().to_string())
    }
}

fn mnt(
    src: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&str>,
) -> Result<(), String> {
    let data = data
        .map(CString::new)
        .transpose()
        .map_err(|e| e.to_string())?;
    m::mount(src, target, fstype, flags, data.as_deref())
        .map_err(|e| format!("mount {fstype} on {target}: {e}"))
}

/// Mounts the command's root on /root; the directories it made there.
fn build_root(job: &Job) -> Result<Made, String> {
    for d in ["/lower", "/rw", "/root"] {
        let _ = fs::create_dir_all(d);
    }
    // No lazy inode-table zeroing behind the command's back (under TCG it
    // competes for the one emulated CPU); no atime writes.
    if job.root_disk && !job.upper_disk {
        // The image's ext4 image behind a copy-on-write disk of the run:
        // mounted as it is, no overlay (which costs every lookup a second
        // file system under TCG).
        let dev = disk("kiln-root")?;
        let flags = if job.read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        mnt(
            &dev,
            "/root",
            "ext4",
            flags | MountFlags::NOATIME,
            Some("noinit_itable"),
        )?;
    } else {
        if job.root_disk {
            let dev = disk("kiln-root")?;
            mnt(
                &dev,
                "/lower",
                "ext4",
                MountFlags::RDONLY | MountFlags::NOATIME,
                None,
            )?;
        } else if job.root_virtiofs {
            mnt("kiln.root", "/lower", "virtiofs", MountFlags::RDONLY, None)?;
        } else {
            mnt(
                "kiln.root",
                "/lower",
                "9p",
                MountFlags::RDONLY,
                Some("trans=virtio,version=9p2000.L,msize=524288,cache=loose,access=client"),
            )?;
        }
        if job.read_only && !job.upper_disk {
            m::mount_bind_recursive("/lower", "/root")
                .map_err(|e| format!("bind the image on /root: {e}"))?;
        } else {
            if job.upper_disk {
                // The layer of a commit: an empty ext4 disk of the run.
                let dev = disk("kiln-upper")?;
                mnt(
                    &dev,
                    "/rw",
                    "ext4",
                    MountFlags::NOATIME,
                    Some("noinit_itable"),
                )?;
            } else {
                mnt(
                    "tmpfs",
                    "/rw",
                    "tmpfs",
                    MountFlags::empty(),
                    Some(&format!("size={},mode=0755", job.upper_size.max(1 << 20))),
                )?;
            }
            for d in ["/rw/upper", "/rw/work"] {
                fs::create_dir(d).map_err(|e| format!("create {d}: {e}"))?;
            }
            // The root directory keeps the image's owner and mode.
            if let Ok(st) = rustix::fs::stat("/lower") {
                let _ = rustix::fs::chown(
                    "/rw/upper",
                    Some(rustix::fs::Uid::from_raw(st.st_uid)),
                    Some(rustix::fs::Gid::from_raw(st.st_gid)),
                );
                let _ = rustix::fs::chmod(
                    "/rw/upper",
                    rustix::fs::Mode::from_raw_mode(st.st_mode & 0o7777),
                );
            }
            // Overlay's on-disk format as the namespace backend's: a
            // renamed directory is copied up whole, not redirected.
            mnt(
                "overlay",
                "/root",
                "overlay",
                MountFlags::empty(),
                Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work,redirect_dir=off,index=off,metacopy=off"),
            )?;
        }
    }
    let mut made = Made::default();
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV;
    if let Some(p) = made.dir("proc") {
        mnt("proc", &p, "proc", nosuid | MountFlags::NOEXEC, None)?;
    }
    if let Some(p) = made.dir("sys") {
        mnt("sysfs", &p, "sysfs", nosuid | MountFlags::NOEXEC, None)?;
    }
    if let Some(p) = made.dir("dev") {
        // The guest's own devices, loop and block devices included: they
        // are the VM's, not the host's.
        mnt("devtmpfs", &p, "devtmpfs", MountFlags::NOSUID, None)?;
        let pts = format!("{p}/pts");
        let _ = fs::create_dir_all(&pts);
        // Not nodev: its ptmx is a device node the command opens.
        mnt(
            "devpts",
            &pts,
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )?;
        let shm = format!("{p}/shm");
        let _ = fs::create_dir_all(&shm);
        mnt(
            "tmpfs",
            &shm,
            "tmpfs",
            nosuid,
            Some(&format!("size={},mode=1777", job.shm_size.max(1 << 20))),
        )?;
        if job.scratch_disk {
            // udev's name for it, which the guest has no udev to make.
            let dev = disk(SCRATCH)?;
            let by_id = format!("{p}/disk/by-id");
            let _ = fs::create_dir_all(&by_id);
            let _ = std::os::unix::fs::symlink(
                format!("../../{}", dev.trim_start_matches("/dev/")),
                format!("{by_id}/virtio-{SCRATCH}"),
            );
        }
    }
    if let Some(p) = made.dir("tmp") {
        mnt(
            "tmpfs",
            &p,
            "tmpfs",
            nosuid,
            Some(&format!("size={},mode=1777", job.tmp_size.max(1 << 20))),
        )?;
    }
    if let Some(target) = &job.modules {
        // The kernel's module tree (an ext4 image kiln made of it), for
        // modprobe; on a read-only root without the directory it is left out.
        if let Some(p) = made.dir(target) {
            let dev = disk("kiln-modules")?;
            mnt(
                &dev,
                &p,
                "ext4",
                MountFlags::RDONLY | nosuid | MountFlags::NOATIME,
                None,
            )?;
        }
    }
    if job.network {
        // The resolver of QEMU's user network, over the image's file (a
        // file the image lacks is not made).
        let conf = Path::new("/root/etc/resolv.conf");
        if conf.is_file() {
            // In the initramfs, outside the command's root.
            let src = "/resolv.conf";
            fs::write(src, format!("nameserver {GUEST_DNS}\n"))
                .map_err(|e| format!("write {src}: {e}"))?;
            m::mount_bind(src, conf).map_err(|e| format!("bind resolv.conf: {e}"))?;
        }
    }
    for s in &job.mounts {
        let Some(p) = made.dir(&s.target) else {
            if s.required {
                return Err(format!(
                    "create the mount point {} (the root is read-only)",
                    s.target
                ));
            }
            continue;
        };
        let mut flags = MountFlags::empty();
        if !s.dev {
            flags |= MountFlags::NODEV;
        }
        if s.read_only {
            flags |= MountFlags::RDONLY;
        }
        if !s.suid {
            flags |= MountFlags::NOSUID;
        }
        if s.virtiofs {
            mnt(&s.tag, &p, "virtiofs", flags, None)?;
        } else {
            // No cache: what the command writes is on the host when it ends.
            mnt(
                &s.tag,
                &p,
                "9p",
                flags,
                Some("trans=virtio,version=9p2000.L,msize=524288,cache=none,access=client"),
            )?;
        }
    }
    Ok(made)
}

/// The network of the guest: loopback, and with `job.network` `eth0` on
/// QEMU's user network.
fn network(job: &Job) -> Result<(), String> {
    crate::sys::loopback_up().map_err(|e| format!("bring lo up: {e}"))?;
    if job.network {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Path::new("/sys/class/net/eth0").exists() {
            if Instant::now() > deadline {
                return Err("find the network device eth0 (virtio-net)".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        crate::sys::interface_up("eth0", Some(GUEST_ADDR))
            .map_err(|e| format!("configure eth0: {e}"))?;
        crate::sys::default_route(GUEST_GATEWAY)
            .map_err(|e| format!("add the default route: {e}"))?;
    }
    Ok(())
}

/// A pty of `size` (rows, columns) from the command's devpts: the master
/// and the slave.
fn open_pty(size: [u16; 2]) -> Result<(OwnedFd, OwnedFd), String> {
    use rustix::fs::{Mode, OFlags};
    let master = rustix::fs::open(
        "/root/dev/pts/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open a pty (/dev/pts/ptmx): {e}"))?;
    rustix::pty::unlockpt(&master).map_err(|e| format!("unlock the pty: {e}"))?;
    let slave = rustix::pty::ioctl_tiocgptpeer(
        &master,
        rustix::pty::OpenptFlags::RDWR
            | rustix::pty::OpenptFlags::NOCTTY
            | rustix::pty::OpenptFlags::CLOEXEC,
    )
    .map_err(|e| format!("open the pty's slave: {e}"))?;
    if let Some(ws) = winsize(&[size[0].to_le_bytes(), size[1].to_le_bytes()].concat()) {
        let _ = rustix::termios::tcsetwinsize(&master, ws);
    }
    Ok((master, slave))
}

/// A terminal size from a `Resize` frame (rows, columns, u16 LE each).
fn winsize(data: &[u8]) -> Option<rustix::termios::Winsize> {
    let rows = u16::from_le_bytes(data.get(..2)?.try_into().ok()?);
    let cols = u16::from_le_bytes(data.get(2..4)?.try_into().ok()?);
    Some(rustix::termios::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    })
}

/// Name of the `--disk` scratch disk (its virtio serial).
const SCRATCH: &str = "kiln-disk";

/// After the command of a run whose upper layer is a disk: the guest's
/// processes gone, every mount of the root undone, the mount points the
/// agent made removed from the upper layer (as the namespace backend
/// leaves them out), and the upper disk unmounted, so the host reads a
/// complete file system.
fn close_upper(made: &Made) -> Result<(), String> {
    crate::sys::kill_all();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG) {
            Ok(Some(_)) => continue,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == "/root" || p.starts_with("/root/"))
        .collect();
    for p in points.iter().rev() {
        if m::unmount(p.as_str(), m::UnmountFlags::empty()).is_err() {
            m::unmount(p.as_str(), m::UnmountFlags::DETACH)
                .map_err(|e| format!("unmount {p}: {e}"))?;
        }
    }
    for d in made.0.iter().rev() {
        if let Ok(rel) = d.strip_prefix("/root") {
            let _ = fs::remove_dir(Path::new("/rw/upper").join(rel));
        }
    }
    crate::sys::sync_all();
    m::unmount("/rw", m::UnmountFlags::empty()).map_err(|e| format!("unmount the upper disk: {e}"))
}

/// A mount point as /proc/self/mountinfo writes it (`\040` for a space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The command, set up to start chrooted in /root.
fn command(job: &Job) -> Result<Command, String> {
    let first = job.argv.first().ok_or("run: no command")?;
    let mut cmd = Command::new(first);
    cmd.args(&job.argv[1..]).env_clear();
    for kv in &job.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    if job.scratch_disk {
        cmd.env("KILN_DISK", format!("/dev/disk/by-id/virtio-{SCRATCH}"));
    }
    let workdir = CString::new(job.workdir.as_str()).map_err(|e| e.to_string())?;
    crate::sys::pre_exec_enter_root(
        &mut cmd,
        c"/root",
        workdir,
        (job.uid, job.gid),
        job.tty.is_some(),
    );
    Ok(cmd)
}

/// Runs the command; its exit code.
fn supervise(job: &Job, ctl: &mut fs::File, frames: &mut Frames) -> Result<i32, String> {
    let mut made = build_root(job)?;
    network(job)?;
    if let Err(e) = rustix::system::sethostname(job.hostname.as_bytes()) {
        say(&format!("kiln-agent: sethostname: {e}"));
    }
    // As the namespace backend does: a working directory the image lacks
    // is made (on a writable root).
    if made.dir(&job.workdir).is_none() {
        return Err(format!(
            "chdir {}: no such directory (the root is read-only)",
            job.workdir
        ));
    }
    let code = relay(job, ctl, frames)?;
    if job.upper_disk {
        close_upper(&made)?;
    }
    Ok(code)
}

/// Runs the command, relays its input, output and signals; its exit code.
fn relay(job: &Job, ctl: &mut fs::File, frames: &mut Frames) -> Result<i32, String> {
    let mut cmd = command(job)?;
    // With a pty: its master is the command's output and takes its input.
    let pty = job.tty.map(open_pty).transpose()?;
    match &pty {
        Some((_, slave)) => {
            let stdio = || {
                slave
                    .try_clone()
                    .map(Stdio::from)
                    .map_err(|e| format!("dup the pty: {e}"))
            };
            cmd.stdin(stdio()?).stdout(stdio()?).stderr(stdio()?);
        }
        None => {
            cmd.stdin(if job.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
    }
    let spawned = cmd.spawn();
    // The slave's copies in `cmd` close, so the master sees the end.
    drop(cmd);
    let (master, input_fd) = match pty {
        Some((master, slave)) => {
            drop(slave);
            let input = if job.stdin {
                Some(
                    master
                        .try_clone()
                        .map_err(|e| format!("dup the pty: {e}"))?,
                )
            } else {
                None
            };
            (Some(master), input)
        }
        None => (None, None),
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            // As a shell says it, with the shell's codes.
            let msg = format!("kiln: {}: {e}\n", job.argv[0]);
            let _ = write_frame(ctl, Kind::Stderr, msg.as_bytes());
            return Ok(if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            });
        }
    };
    let _ = write_frame(ctl, Kind::Started, b"");
    let pid = rustix::process::Pid::from_child(&child);
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| format!("pidfd_open: {e}"))?;
    let mut outs: Vec<(OwnedFd, Kind)> = Vec::new();
    if let Some(o) = child.stdout.take() {
        outs.push((OwnedFd::from(o), Kind::Stdout));
    }
    if let Some(e) = child.stderr.take() {
        outs.push((OwnedFd::from(e), Kind::Stderr));
    }
    let resize_fd = master.as_ref().and_then(|m| m.try_clone().ok());
    if let Some(m) = master {
        outs.push((m, Kind::Stdout));
    }
    let mut input: Option<OwnedFd> = child.stdin.take().map(OwnedFd::from).or(input_fd);
    let mut pending: Vec<u8> = Vec::new();
    // Input ends (the pipe closes) once what came before the end is in.
    let mut input_ended = false;
    let mut first = true;
    let mut status = None;
    let mut buf = vec![0u8; 65536];
    loop {
        // Orphans the command left are PID 1's to reap.
        while let Ok(Some(_)) = rustix::process::waitpid(None, rustix::process::WaitOptions::NOHANG)
        {
        }
        if status.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                status = Some(st);
                // The command is done: whatever it left running goes, so
                // its pipes end.
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                // From PID 1: every other process of the guest.
                crate::sys::kill_all();
                input = None;
            }
        }
        if status.is_some() && outs.is_empty() {
            break;
        }
        let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(&pidfd, PollFlags::IN)];
        fds.push(PollFd::new(&*ctl, PollFlags::IN));
        for (fd, _) in &outs {
            fds.push(PollFd::new(fd, PollFlags::IN));
        }
        let input_slot = fds.len();
        if let (Some(w), false) = (&input, pending.is_empty()) {
            fds.push(PollFd::new(w, PollFlags::OUT));
        }
        let wait = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: if first { 0 } else { 200_000_000 },
        };
        match poll(&mut fds, (first || status.is_some()).then_some(&wait)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        // The first time round, frames that came in one read with the job
        // (stdin, its end, a signal) are taken before waiting for more.
        if ready[1] || first {
            if ready[1] {
                let n = rustix::io::read(&*ctl, &mut buf)
                    .map_err(|e| format!("read the channel: {e}"))?;
                frames.push(&buf[..n]);
            }
            first = false;
            while let Some((kind, data)) = frames
                .next()
                .map_err(|e| format!("read the channel: {e}"))?
            {
                match kind {
                    Kind::Stdin if input.is_some() => pending.extend_from_slice(&data),
                    Kind::StdinEof => input_ended = true,
                    Kind::Resize => {
                        if let (Some(m), Some(ws)) = (&resize_fd, winsize(&data)) {
                            let _ = rustix::termios::tcsetwinsize(m, ws);
                        }
                    }
                    Kind::Signal => {
                        let sig = data
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(i32::from_le_bytes);
                        if let Some(sig) = sig.and_then(rustix::process::Signal::from_named_raw) {
                            let _ = rustix::process::kill_process(pid, sig);
                        }
                    }
                    _ => {}
                }
            }
        }
        if input_slot < ready.len() && ready[input_slot] {
            if let Some(w) = &input {
                match rustix::io::write(w, &pending) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                    Err(_) => {
                        pending.clear();
                        input = None;
                    }
                }
            }
        }
        if pending.is_empty() && input_ended {
            input = None;
        }
        let mut closed = Vec::new();
        for (i, (fd, kind)) in outs.iter().enumerate() {
            if !ready[2 + i] {
                continue;
            }
            match rustix::io::read(fd, &mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    write_frame(ctl, *kind, &buf[..n]).map_err(|e| format!("send output: {e}"))?
                }
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => {}
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            outs.remove(i);
        }
    }
    let st = status.ok_or("the command's status was lost")?;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}
