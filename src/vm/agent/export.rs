//! The export job: mounts the first virtio disk read-only with the file
//! system type given on the kernel command line (`kiln.fstype=`), writes a
//! tar of the tree to the second disk (a header block, then the stream at
//! [`super::super::OUT_DATA`]), and powers the VM off.

use std::fs;
use std::io::{self, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::mount::{self as m, MountFlags};

use super::{base_mounts, cmdline_value, load_modules, say, wait_for, DONE};
use crate::vm::{OUT_DATA, OUT_MAGIC};

/// Runs the export job; returns when the result is written (or could not
/// be).
pub(super) fn main() {
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
}

fn write_status(out: &Path, error: Option<&str>) -> io::Result<()> {
    let f = fs::OpenOptions::new().write(true).open(out)?;
    let mut h = [0u8; 512];
    if let Some(e) = error {
        h[..8].copy_from_slice(OUT_MAGIC);
        h[16] = 1;
        let msg = e.as_bytes();
        let n = msg.len().min(255).min(h.len() - 18);
        h[17] = n as u8;
        h[18..18 + n].copy_from_slice(&msg[..n]);
        f.write_all_at(&h, 0)?;
    }
    f.sync_all()
}

fn run() -> Result<u64, String> {
    base_mounts()?;
    load_modules();
    let fstype = cmdline_value("kiln.fstype")?;
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
    disk.seek(SeekFrom::Start(OUT_DATA))
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
    h[..8].copy_from_slice(OUT_MAGIC);
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
