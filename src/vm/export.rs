//! The export job (`kiln import --via-vm`): the guest mounts a file system
//! kiln has no userspace reader for read-only from a virtio disk and
//! writes a tar of its tree to a second disk, which kiln then reads as it
//! reads any tar.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::accel::{choose_accel, keep_verdict, Accel};
use super::kernel::Kernel;
use super::qemu::{find_qemu, printable, qemu_path, Console, Machine};
use super::{io_err, TarOut, VmError, VmOptions, OUT_DATA, OUT_MAGIC};
use crate::source::disk::ReadAt;

/// Modules every export needs: virtio disks, and crc32c, which the file
/// systems' checksum code asks for at mount time (there is no modprobe in
/// the guest to load it on demand).
const BASE_MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk"];

/// The file systems the guest can mount, by the name `mount` uses.
pub const FILE_SYSTEMS: &[&str] = &[
    "ext4", "xfs", "btrfs", "f2fs", "squashfs", "erofs", "jfs", "reiserfs", "ntfs3", "exfat",
    "vfat",
];

/// Copies `src` into a sparse file (all-zero blocks become holes).
fn write_sparse(src: &dyn ReadAt, path: &Path, deadline: Instant) -> Result<(), VmError> {
    let mut f = fs::File::create(path).map_err(io_err("create", path))?;
    let size = src.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        if Instant::now() > deadline {
            return Err(VmError::Failed {
                accel: "none",
                why: "copying the file system for the VM took past the deadline".into(),
                console: String::new(),
            });
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)
            .map_err(io_err("read the file system", path))?;
        for chunk in buf[..n].chunks(64 << 10) {
            if chunk.iter().all(|&b| b == 0) {
                f.seek(SeekFrom::Current(chunk.len() as i64))
                    .map_err(io_err("write", path))?;
            } else {
                f.write_all(chunk).map_err(io_err("write", path))?;
            }
        }
        off += n as u64;
    }
    f.set_len(size).map_err(io_err("write", path))?;
    Ok(())
}

/// Boots a VM that mounts the file system in `fs` (of type `fstype`, a
/// name from [`FILE_SYSTEMS`]) read-only and writes a tar of its tree;
/// returns that tar.
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use kiln::disk::FileSource;
/// use kiln::vm::{export_tree, Kernel, VmOptions};
/// let fs = Arc::new(FileSource::open("root.xfs".as_ref())?);
/// let opts = VmOptions::new("/tmp/vm-work".into(), "/tmp/vm-accel".into());
/// let mut out = export_tree(&Kernel::find()?, &*fs, "xfs", &opts, &mut |line| eprintln!("{line}"))?;
/// std::io::copy(&mut out.reader()?, &mut std::io::sink())?;
/// # Ok(()) }
/// ```
pub fn export_tree(
    kernel: &Kernel,
    fs: &dyn ReadAt,
    fstype: &str,
    opts: &VmOptions,
    note: &mut dyn FnMut(&str),
) -> Result<TarOut, VmError> {
    if !FILE_SYSTEMS.contains(&fstype) {
        return Err(VmError::Agent(format!(
            "mount a {fstype} file system: not supported"
        )));
    }
    let qemu = find_qemu()?;
    if fs.size() > opts.max_bytes {
        return Err(VmError::Agent(format!(
            "be given the file system: it is {} bytes, over the limit of {} ({})",
            fs.size(),
            opts.max_bytes,
            crate::words::Opt::MaxSize
        )));
    }
    fs::create_dir_all(&opts.work).map_err(io_err("create", &opts.work))?;
    let disk = opts.work.join("in.raw");
    let out = opts.work.join("out.raw");
    note("copying the file system out of its container for the VM");
    write_sparse(fs, &disk, Instant::now() + opts.timeout)?;
    // Sparse: only what the agent writes takes space. A compressed file
    // system (squashfs, btrfs with compress=) may hold far more than its
    // size, so the room is the import's limit, not a multiple of the size.
    let out_size = opts.max_bytes.saturating_add(OUT_DATA);
    fs::File::create(&out)
        .and_then(|f| f.set_len(out_size))
        .map_err(io_err("create", &out))?;
    let cache = if opts.cache.as_os_str().is_empty() {
        &opts.work
    } else {
        &opts.cache
    };
    let mut wanted: Vec<&str> = BASE_MODULES.to_vec();
    wanted.push(fstype);
    if matches!(fstype, "vfat" | "exfat" | "ntfs3") {
        // Their mount loads a code page; there is no modprobe in the guest.
        wanted.extend(["nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1"]);
    }
    let initrd = super::initramfs::cached(kernel, &wanted, cache)?;
    let boot_file = kernel.boot_file(cache)?;
    let (first, decided) = choose_accel(&opts.accel_state);
    let mut accel = first;
    loop {
        note(&format!(
            "booting a {} VM to read the {fstype} file system",
            accel.name()
        ));
        let probe = (accel == Accel::Kvm && !decided).then_some(opts.kvm_probe);
        match boot(
            &qemu, &boot_file, &initrd, &disk, &out, fstype, accel, opts, probe,
        ) {
            Ok(()) => break,
            Err(Boot::Silent(why)) if accel == Accel::Kvm => {
                note(&format!(
                    "kvm does not really work here ({why}); using tcg from now on"
                ));
                keep_verdict(&opts.accel_state, Accel::Tcg);
                accel = Accel::Tcg;
            }
            Err(Boot::Silent(why)) => {
                return Err(VmError::Failed {
                    accel: accel.name(),
                    why,
                    console: String::new(),
                })
            }
            Err(Boot::Failed(e)) => return Err(e),
        }
    }
    if accel == Accel::Kvm && !decided {
        keep_verdict(&opts.accel_state, Accel::Kvm);
    }
    let mut file = fs::File::open(&out).map_err(io_err("open", &out))?;
    let mut head = [0u8; 512];
    file.read_exact(&mut head).map_err(io_err("read", &out))?;
    if &head[..8] != OUT_MAGIC {
        return Err(VmError::Agent(
            "write its result (the output disk has no header)".into(),
        ));
    }
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    let status = head[16];
    if status != 0 {
        let msg_len = usize::from(head[17]).min(head.len() - 18);
        return Err(VmError::Agent(printable(&String::from_utf8_lossy(
            &head[18..18 + msg_len],
        ))));
    }
    if len > out_size - OUT_DATA {
        return Err(VmError::Agent(format!(
            "write its result (length {len} is past the output disk)"
        )));
    }
    Ok(TarOut {
        file,
        offset: OUT_DATA,
        len,
        accel,
    })
}

enum Boot {
    /// While probing KVM: the guest never spoke (it hung, or QEMU failed
    /// before it could); why.
    Silent(String),
    Failed(VmError),
}

#[allow(clippy::too_many_arguments)]
fn boot(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    disk: &Path,
    out: &Path,
    fstype: &str,
    accel: Accel,
    opts: &VmOptions,
    probe: Option<Duration>,
) -> Result<(), Boot> {
    let append = format!("kiln_job=export kiln.fstype={fstype}");
    let mut cmd = Machine {
        kernel,
        initrd,
        append: &append,
        accel,
        memory_mib: opts.memory_mib,
        cpus: 1,
    }
    .command(qemu);
    cmd.arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on,werror=report,rerror=report",
            qemu_path(disk)
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,werror=report,rerror=report",
            qemu_path(out)
        ));
    crate::sys::pre_exec_pdeathsig(&mut cmd);
    tracing::debug!(
        "vm: {:?} {:?}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>()
    );
    let mut child = cmd.spawn().map_err(|e| {
        Boot::Failed(VmError::Io {
            step: "start",
            path: qemu.display().to_string(),
            source: e,
        })
    })?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let Some(mut s) = stdout else { return };
        let mut buf = vec![0u8; 16384];
        while let Ok(n @ 1..) = s.read(&mut buf) {
            if tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let start = Instant::now();
    let mut console = Console::default();
    let mut outcome: Option<Result<(), Boot>> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(data) => console.push(&data),
            // The console closed: QEMU is ending; poll it calmly.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        let elapsed = start.elapsed();
        if !console.heard && probe.is_some_and(|p| elapsed > p) {
            outcome = Some(Err(Boot::Silent(format!(
                "the guest said nothing for {:?}",
                probe.unwrap_or_default()
            ))));
            break;
        }
        if elapsed > opts.timeout {
            outcome = Some(Err(Boot::Failed(VmError::Failed {
                accel: accel.name(),
                why: format!("no result after {:?}", opts.timeout),
                console: String::new(),
            })));
            break;
        }
    }
    let _ = child.kill();
    let status = child.wait();
    let _ = reader.join();
    let qemu_err = err_reader.join().unwrap_or_default();
    // What arrived after the loop stopped.
    for data in rx.try_iter() {
        console.push(&data);
    }
    if let Some(o) = outcome {
        return match o {
            Err(Boot::Failed(VmError::Failed { accel, why, .. })) => {
                Err(Boot::Failed(VmError::Failed {
                    accel,
                    why,
                    console: console.tail(qemu_err.as_bytes()),
                }))
            }
            other => other,
        };
    }
    if console.done {
        return Ok(());
    }
    if probe.is_some() && !console.heard && qemu_err.to_ascii_lowercase().contains("kvm") {
        // QEMU could not run the guest with KVM (it names KVM in its
        // error): as good as silent. Any other early failure is not KVM's
        // and is reported as it is.
        let last = qemu_err.lines().last().unwrap_or("").trim().to_string();
        return Err(Boot::Silent(match status {
            Ok(s) => format!(
                "qemu exited ({s}) before the guest spoke: {}",
                printable(&last)
            ),
            Err(e) => format!("wait for qemu: {e}"),
        }));
    }
    Err(Boot::Failed(VmError::Failed {
        accel: accel.name(),
        why: match status {
            Ok(s) => format!("qemu exited ({s})"),
            Err(e) => format!("wait for qemu: {e}"),
        },
        console: console.tail(qemu_err.as_bytes()),
    }))
}
