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
use crate::vm::channel::{read_frame, write_frame, Frames, Job, Kind, PORT};

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

/// Mounts the command's root on /root.
fn build_root(job: &Job) -> Result<(), String> {
    let mnt = |src: &str, target: &str, fstype: &str, flags: MountFlags, data: Option<&str>| {
        let data = data
            .map(CString::new)
            .transpose()
            .map_err(|e| e.to_string())?;
        m::mount(src, target, fstype, flags, data.as_deref())
            .map_err(|e| format!("mount {fstype} on {target}: {e}"))
    };
    if job.root_disk {
        // The image's ext4 image behind a copy-on-write disk of the run:
        // mounted as it is, no overlay (which costs every lookup a second
        // file system under TCG).
        let dev = disk("kiln-root")?;
        let flags = if job.read_only {
            MountFlags::RDONLY
        } else {
            MountFlags::empty()
        };
        // No lazy inode-table zeroing behind the command's back (under TCG
        // it competes for the one emulated CPU); no atime writes.
        mnt(
            &dev,
            "/root",
            "ext4",
            flags | MountFlags::NOATIME,
            Some("noinit_itable"),
        )?;
    } else {
        mnt(
            "kiln.root",
            "/lower",
            "9p",
            MountFlags::RDONLY,
            Some("trans=virtio,version=9p2000.L,msize=524288,cache=loose,access=client"),
        )?;
    }
    if job.root_disk {
    } else if job.read_only {
        m::mount_bind_recursive("/lower", "/root")
            .map_err(|e| format!("bind the image on /root: {e}"))?;
    } else {
        mnt(
            "tmpfs",
            "/rw",
            "tmpfs",
            MountFlags::empty(),
            Some(&format!("size={},mode=0755", job.upper_size.max(1 << 20))),
        )?;
        for d in ["/rw/upper", "/rw/work"] {
            fs::create_dir(d).map_err(|e| format!("create {d}: {e}"))?;
        }
        mnt(
            "overlay",
            "/root",
            "overlay",
            MountFlags::empty(),
            Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"),
        )?;
    }
    // What the image lacks is made where it can be (the overlay); on a
    // read-only root a missing mount point is skipped.
    let inside = |d: &str| {
        let p = Path::new("/root").join(d);
        let _ = fs::create_dir_all(&p);
        p.is_dir().then(|| p.display().to_string())
    };
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV;
    if let Some(p) = inside("proc") {
        mnt("proc", &p, "proc", nosuid | MountFlags::NOEXEC, None)?;
    }
    if let Some(p) = inside("sys") {
        mnt("sysfs", &p, "sysfs", nosuid | MountFlags::NOEXEC, None)?;
    }
    if let Some(p) = inside("dev") {
        // The guest's own devices, loop and block devices included: they
        // are the VM's, not the host's.
        mnt("devtmpfs", &p, "devtmpfs", MountFlags::NOSUID, None)?;
        let pts = format!("{p}/pts");
        let _ = fs::create_dir_all(&pts);
        mnt(
            "devpts",
            &pts,
            "devpts",
            nosuid | MountFlags::NOEXEC,
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
    }
    if let Some(p) = inside("tmp") {
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
        if let Some(p) = inside(target.trim_start_matches('/')) {
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
    for s in &job.mounts {
        let Some(p) = inside(s.target.trim_start_matches('/')) else {
            if s.required {
                return Err(format!(
                    "create the mount point {} (the root is read-only)",
                    s.target
                ));
            }
            continue;
        };
        let mut flags = MountFlags::empty();
        if s.read_only {
            flags |= MountFlags::RDONLY;
        }
        if !s.dev {
            flags |= MountFlags::NODEV;
        }
        if !s.suid {
            flags |= MountFlags::NOSUID;
        }
        // No cache: what the command writes is on the host when it ends.
        mnt(
            &s.tag,
            &p,
            "9p",
            flags,
            Some("trans=virtio,version=9p2000.L,msize=524288,cache=none,access=client"),
        )?;
    }
    Ok(())
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
    let workdir = CString::new(job.workdir.as_str()).map_err(|e| e.to_string())?;
    crate::sys::pre_exec_enter_root(&mut cmd, c"/root", workdir, (job.uid, job.gid));
    Ok(cmd)
}

/// Runs the command; its exit code.
fn supervise(job: &Job, ctl: &mut fs::File, frames: &mut Frames) -> Result<i32, String> {
    build_root(job)?;
    if let Err(e) = rustix::system::sethostname(job.hostname.as_bytes()) {
        say(&format!("kiln-agent: sethostname: {e}"));
    }
    // As the namespace backend does: a working directory the image lacks
    // is made (on a writable root).
    let wd = Path::new("/root").join(job.workdir.trim_start_matches('/'));
    let _ = fs::create_dir_all(&wd);
    if !wd.is_dir() {
        return Err(format!(
            "chdir {}: no such directory (the root is read-only)",
            job.workdir
        ));
    }
    let mut cmd = command(job)?;
    cmd.stdin(if job.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
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
    let mut input: Option<OwnedFd> = child.stdin.take().map(OwnedFd::from);
    let mut pending: Vec<u8> = Vec::new();
    // Input ends (the pipe closes) once what came before the end is in.
    let mut input_ended = false;
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
            tv_nsec: 200_000_000,
        };
        match poll(&mut fds, if status.is_some() { Some(&wait) } else { None }) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(format!("poll: {e}")),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        if ready[1] {
            let n =
                rustix::io::read(&*ctl, &mut buf).map_err(|e| format!("read the channel: {e}"))?;
            frames.push(&buf[..n]);
            while let Some((kind, data)) = frames
                .next()
                .map_err(|e| format!("read the channel: {e}"))?
            {
                match kind {
                    Kind::Stdin if input.is_some() => pending.extend_from_slice(&data),
                    Kind::StdinEof => input_ended = true,
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
