//! The guest agent: kiln running as `/init` (PID 1) of a VM's initramfs.
//!
//! It loads the modules listed in `/modules/order`, mounts the first
//! virtio disk read-only with the file system type given on the kernel
//! command line (`kiln.fstype=`), writes a tar of the tree to the second
//! disk (a header block, then the stream at [`super::OUT_DATA`]), and powers
//! the VM off. Progress and errors go to the console, which kiln reads.

use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::mount::{self as m, MountFlags};

/// The agent's first words on the console (the KVM probe waits for them).
pub const READY: &str = "kiln-agent: ready";
/// Its last words after a result was written.
pub const DONE: &str = "kiln-agent: done";

/// Whether this process is the guest agent (PID 1 started as `/init`).
pub(crate) fn is_agent() -> bool {
    // /proc is not mounted yet; the kernel hands `kiln_agent=1` from its
    // command line to init as an environment variable.
    std::process::id() == 1
        && std::env::args_os().next().is_some_and(|a| a == "/init")
        && std::env::var_os("kiln_agent").is_some_and(|v| v == "1")
}

fn say(msg: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

fn power_off() -> ! {
    crate::sys::sync_all();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    // PID 1 must not exit (the kernel would panic, which -no-reboot and
    // panic=-1 also turn into the VM's end).
    crate::sys::exit_now(1)
}

/// Entry point of the agent. Never returns: the VM powers off.
pub(crate) fn agent_main() -> ! {
    say(READY);
    let out = Path::new("/dev/vdb");
    // PID 1 must not unwind out: a panic becomes the reported error.
    let result = std::panic::catch_unwind(run)
        .unwrap_or_else(|_| Err("read the tree: the agent panicked".to_string()));
    match &result {
        Ok(n) => say(&format!("kiln-agent: wrote {n} entries")),
        Err(e) => say(&format!("kiln-agent: error: {e}")),
    }
    let header = match &result {
        Ok(_) => None,
        Err(e) => Some(e.clone()),
    };
    if let Err(e) = write_status(out, header.as_deref()) {
        say(&format!("kiln-agent: error: write the result header: {e}"));
    } else {
        say(DONE);
    }
    power_off()
}

fn write_status(out: &Path, error: Option<&str>) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(out)?;
    let mut h = [0u8; 512];
    if let Some(e) = error {
        h[..8].copy_from_slice(super::OUT_MAGIC);
        h[16] = 1;
        let msg = e.as_bytes();
        let n = msg.len().min(255).min(h.len() - 18);
        h[17] = n as u8;
        h[18..18 + n].copy_from_slice(&msg[..n]);
        f.write_all_at(&h, 0)?;
    }
    f.sync_all()
}

fn wait_for(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!("find {} (no virtio disk appeared)", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run() -> Result<u64, String> {
    let mnt = |src: &str, target: &str, fstype: &str, flags: MountFlags| {
        m::mount(src, target, fstype, flags, None)
            .map_err(|e| format!("mount {fstype} on {target}: {e}"))
    };
    mnt("devtmpfs", "/dev", "devtmpfs", MountFlags::empty())?;
    mnt("proc", "/proc", "proc", MountFlags::empty())?;
    mnt("sysfs", "/sys", "sysfs", MountFlags::empty())?;
    let order =
        fs::read_to_string("/modules/order").map_err(|e| format!("read /modules/order: {e}"))?;
    for line in order.lines() {
        let (file, name) = line.split_once(' ').unwrap_or((line, line));
        let f = fs::File::open(file).map_err(|e| format!("open {file}: {e}"))?;
        match rustix::system::finit_module(&f, c"", 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            // A module for hardware the guest lacks refuses to load; the
            // mount below tells whether anything needed is missing.
            Err(e) => say(&format!("kiln-agent: module {name}: {e}")),
        }
    }
    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    let fstype = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kiln.fstype="))
        .ok_or("find kiln.fstype= on the kernel command line")?
        .to_string();
    let (src, out) = (Path::new("/dev/vda"), Path::new("/dev/vdb"));
    wait_for(src)?;
    wait_for(out)?;
    // A file system that was not cleanly unmounted still mounts read-only
    // with log replay off.
    let ro = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let plain = m::mount(src, "/mnt", fstype.as_str(), ro, None);
    if let Err(e) = plain {
        let data = match fstype.as_str() {
            "xfs" => Some(c"norecovery"),
            "ext4" => Some(c"noload"),
            "btrfs" => Some(c"rescue=nologreplay"),
            _ => None,
        };
        match data {
            Some(d) => m::mount(src, "/mnt", fstype.as_str(), ro, Some(d)).map_err(|e2| {
                format!("mount the {fstype} file system read-only: {e} (and with {d:?}: {e2})")
            })?,
            None => return Err(format!("mount the {fstype} file system read-only: {e}")),
        }
    }
    say("kiln-agent: mounted; writing the tree");
    let mut disk = fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|e| format!("open {}: {e}", out.display()))?;
    disk.seek(SeekFrom::Start(super::OUT_DATA))
        .map_err(|e| format!("seek {}: {e}", out.display()))?;
    let counted = Counter {
        inner: io::BufWriter::with_capacity(1 << 20, &mut disk),
        n: 0,
    };
    let mut tar = crate::layer::TarWriter::new(counted);
    crate::source::dir::walk(Path::new("/mnt"), &mut |e, data| {
        tar.append(&e, data)
            .map_err(|err| crate::layer::LayerError::ReadFile {
                step: "write the tar",
                path: Path::new("/mnt").join(&e.path),
                source: err,
            })
    })
    .map_err(|e| format!("read the tree: {e}"))?;
    let entries = tar.entries();
    let mut counted = tar.finish().map_err(|e| format!("write the tar: {e}"))?;
    counted.flush().map_err(|e| format!("write the tar: {e}"))?;
    let len = counted.n;
    drop(counted);
    let mut h = [0u8; 512];
    h[..8].copy_from_slice(super::OUT_MAGIC);
    h[8..16].copy_from_slice(&len.to_le_bytes());
    disk.write_all_at(&h, 0)
        .map_err(|e| format!("write the result header: {e}"))?;
    disk.sync_all()
        .map_err(|e| format!("sync {}: {e}", out.display()))?;
    Ok(entries)
}

/// Counts the bytes written through it.
struct Counter<W: Write> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
