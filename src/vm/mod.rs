//! Throwaway QEMU VMs for work the host kernel should not do for an
//! untrusted image: today, reading a file system kiln has no userspace
//! reader for (`kiln import --via-vm`: xfs, btrfs, f2fs, ...).
//!
//! A VM boots the host distribution's kernel directly (`-kernel`, no
//! bootloader, no disk image of its own) with an initramfs that kiln builds
//! on the fly: `/init` is kiln itself (a static binary), acting as the guest
//! agent (`agent.rs`), plus the few kernel modules it needs (virtio, the
//! file system). The file system to read is a read-only virtio disk; the
//! agent mounts it inside the guest and writes a tar of it to a second
//! virtio disk, which kiln then reads as it reads any tar. Nothing is
//! mounted on the host, and no loop device is used.
//!
//! KVM is used when it really works: `/dev/kvm` opening is not enough (on
//! some hosts guests hang), so the first VM of a store runs with KVM and a
//! deadline for the agent's first words; if they do not come, the VM is
//! killed, TCG is used from then on, and the verdict is kept in the store
//! (`.kiln/vm-accel`). `KILN_VM_ACCEL=kvm|tcg` forces a choice.

pub(crate) mod agent;
mod cpio;

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::source::disk::ReadAt;

/// What went wrong starting or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// No kernel to boot.
    #[error("vm: no kernel to boot: {0} (install linux-image-amd64, or set KILN_VM_KERNEL to a vmlinuz whose modules are in /lib/modules)")]
    NoKernel(String),
    /// No QEMU.
    #[error("vm: {0} not found (install qemu-system-x86)")]
    NoQemu(String),
    /// A host-side step failed.
    #[error("vm: {step}: {path}: {source}")]
    Io {
        /// What kiln was doing.
        step: &'static str,
        /// The file involved.
        path: String,
        /// The cause.
        source: io::Error,
    },
    /// The guest agent reported an error.
    #[error("vm: the guest could not {0}")]
    Agent(String),
    /// The VM ended without a result.
    #[error("vm: the VM ({accel}) ended without a result: {why}; its console said:\n{console}")]
    Failed {
        /// kvm or tcg.
        accel: &'static str,
        /// Exit status or timeout.
        why: String,
        /// The last lines of the guest console.
        console: String,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        step,
        path: path.display().to_string(),
        source,
    }
}

/// A kernel to boot and the modules directory that belongs to it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The `vmlinuz` file.
    pub image: PathBuf,
    /// `/lib/modules/RELEASE`.
    pub modules: PathBuf,
}

impl Kernel {
    /// `KILN_VM_KERNEL`, else the newest `/boot/vmlinuz-*` that has a
    /// modules directory.
    pub fn find() -> Result<Kernel, VmError> {
        if let Some(k) = std::env::var_os("KILN_VM_KERNEL") {
            let image = PathBuf::from(k);
            let release = image
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("vmlinuz-"))
                .map(str::to_string)
                .ok_or_else(|| {
                    VmError::NoKernel(format!(
                        "KILN_VM_KERNEL={} is not named vmlinuz-RELEASE",
                        image.display()
                    ))
                })?;
            return Ok(Kernel {
                image,
                modules: Path::new("/lib/modules").join(release),
            });
        }
        let mut found: Vec<(PathBuf, PathBuf)> = fs::read_dir("/boot")
            .map_err(|e| VmError::NoKernel(format!("/boot: {e}")))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let release = name.strip_prefix("vmlinuz-")?;
                let modules = Path::new("/lib/modules").join(release);
                modules
                    .join("modules.dep")
                    .exists()
                    .then(|| (e.path(), modules))
            })
            .collect();
        // By release, numerically: 6.1.0-56 is newer than 6.1.0-9.
        found.sort_by_key(|(image, _)| release_key(image));
        let (image, modules) = found
            .pop()
            .ok_or_else(|| VmError::NoKernel("no /boot/vmlinuz-* with /lib/modules".into()))?;
        // /boot/vmlinuz-* is often mode 0600 (Ubuntu): say so clearly.
        fs::File::open(&image).map_err(io_err("read the kernel", &image))?;
        Ok(Kernel { image, modules })
    }

    /// The module files (relative to `modules`) needed for `names`, each
    /// after its dependencies.
    fn modules_for(&self, names: &[&str]) -> Result<Vec<String>, VmError> {
        let dep_path = self.modules.join("modules.dep");
        let text = fs::read_to_string(&dep_path).map_err(io_err("read", &dep_path))?;
        let deps: std::collections::HashMap<&str, Vec<&str>> = text
            .lines()
            .filter_map(|l| {
                let (m, d) = l.split_once(':')?;
                Some((m.trim(), d.split_whitespace().collect()))
            })
            .collect();
        let by_name = |n: &str| {
            deps.keys()
                .find(|k| {
                    let base = k.rsplit('/').next().unwrap_or(k);
                    let stem = base.split(".ko").next().unwrap_or(base);
                    stem.replace('-', "_") == n.replace('-', "_")
                })
                .copied()
        };
        fn visit<'a>(
            m: &'a str,
            deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
            out: &mut Vec<String>,
        ) {
            if out.iter().any(|o| o == m) {
                return;
            }
            for d in deps.get(m).into_iter().flatten() {
                visit(d, deps, out);
            }
            out.push(m.to_string());
        }
        let mut out = Vec::new();
        for n in names {
            if let Some(m) = by_name(n) {
                visit(m, &deps, &mut out);
            }
        }
        Ok(out)
    }
}

/// A sort key for `vmlinuz-RELEASE`: the release's numbers in order.
fn release_key(image: &Path) -> Vec<u64> {
    image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse().unwrap_or(0))
        .collect()
}

/// Modules every VM needs: virtio disks, and crc32c, which the file
/// systems' checksum code asks for at mount time (there is no modprobe in
/// the guest to load it on demand).
const BASE_MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk"];

/// The file systems the guest can mount, by the name `mount` uses.
pub const FILE_SYSTEMS: &[&str] = &[
    "ext4", "xfs", "btrfs", "f2fs", "squashfs", "erofs", "jfs", "reiserfs", "ntfs3", "exfat",
    "vfat",
];

/// Why `elf` cannot be the guest's /init: `None` for a statically linked
/// ELF executable (no `PT_INTERP` program header).
fn not_static(elf: &[u8]) -> Option<&'static str> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return Some("is not a 64-bit ELF executable");
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap_or_default()) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    for i in 0..count {
        let at = phoff.saturating_add(i.saturating_mul(size));
        let Some(ty) = elf.get(at..at + 4) else {
            return Some("has program headers past its end");
        };
        if ty == 3u32.to_le_bytes() {
            return Some("is dynamically linked");
        }
    }
    None
}

/// Writes the initramfs: kiln as /init, /dev/console, the modules for
/// `fstype` and their order.
fn write_initramfs(kernel: &Kernel, fstype: &str, out: &Path) -> Result<(), VmError> {
    // The guest agent is kiln's entry-point binary (this program when it
    // is kiln or routes kiln's entry points, else the kiln it names): a
    // program that does not would run its own main() as PID 1 and stay
    // silent until the timeout.
    let me = crate::sys::helper_exe(None);
    let agent = fs::read(&me).map_err(io_err("read the guest agent", &me))?;
    if let Some(why) = not_static(&agent) {
        return Err(VmError::Agent(format!(
            "start: the guest agent {} {why}; the initramfs has no dynamic loader: use a statically linked kiln (KILN_HELPER=PATH) or link this program with -C target-feature=+crt-static",
            me.display()
        )));
    }
    let mut wanted: Vec<&str> = BASE_MODULES.to_vec();
    wanted.push(fstype);
    if matches!(fstype, "vfat" | "exfat" | "ntfs3") {
        // Their mount loads a code page; there is no modprobe in the guest.
        wanted.extend(["nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1"]);
    }
    let mods = kernel.modules_for(&wanted)?;
    let f = fs::File::create(out).map_err(io_err("create", out))?;
    let mut c = cpio::Cpio::new(io::BufWriter::new(f));
    let w = |r: io::Result<()>| r.map_err(io_err("write", out));
    for d in ["dev", "proc", "sys", "mnt", "modules"] {
        w(c.dir(d))?;
    }
    w(c.char_dev("dev/console", 5, 1))?;
    w(c.file("init", 0o755, &agent))?;
    let mut order = String::new();
    for (i, m) in mods.iter().enumerate() {
        let src = kernel.modules.join(m);
        let data = read_module(&src)?;
        let name = format!("modules/{i:03}.ko");
        w(c.file(&name, 0o644, &data))?;
        order.push_str(&format!("/{name} {m}\n"));
    }
    w(c.file("modules/order", 0o644, order.as_bytes()))?;
    let mut inner = c.finish().map_err(io_err("write", out))?;
    inner.flush().map_err(io_err("write", out))?;
    Ok(())
}

/// A module file's ELF bytes: distributions ship them plain or
/// compressed (`.ko.xz`, `.ko.zst`, `.ko.gz`); the guest gets them plain.
fn read_module(path: &Path) -> Result<Vec<u8>, VmError> {
    let raw = fs::read(path).map_err(io_err("read module", path))?;
    let name = path.to_string_lossy();
    let plain = if name.ends_with(".ko.xz") {
        let mut out = Vec::new();
        xz2::read::XzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map(|_| out)
    } else if name.ends_with(".ko.zst") {
        zstd::decode_all(&raw[..])
    } else if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map(|_| out)
    } else {
        Ok(raw)
    };
    plain.map_err(io_err("decompress module", path))
}

/// How guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// What a verdict is kept for: the host's kernel and its /dev/kvm (the
/// device number: another module, another verdict).
fn host_release() -> String {
    use std::os::unix::fs::MetadataExt;
    let kvm = fs::metadata("/dev/kvm").map(|m| m.rdev()).unwrap_or(0);
    format!(
        "{} kvm-dev={kvm:x}",
        rustix::system::uname().release().to_string_lossy()
    )
}

/// Where the KVM verdict is kept when [`VmOptions::accel_state`] is empty:
/// per host and user, `$XDG_CACHE_HOME/kiln/vm-accel` (else
/// `~/.cache/kiln/vm-accel`), so a CI job with a fresh store does not
/// probe again.
pub fn default_accel_state() -> Option<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let base = nonempty("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kiln/vm-accel"))
}

/// The accelerator to try and whether that is settled (no probe needed):
/// forced by `KILN_VM_ACCEL`, else the verdict kept in `state` for this
/// host kernel, else KVM (to be probed) when /dev/kvm opens read-write.
fn choose_accel(state: &Path) -> (Accel, bool) {
    match std::env::var("KILN_VM_ACCEL").as_deref() {
        Ok("kvm") => return (Accel::Kvm, true),
        Ok("tcg") => return (Accel::Tcg, true),
        _ => {}
    }
    if !kvm_usable() {
        return (Accel::Tcg, true);
    }
    let kept = fs::read_to_string(state).unwrap_or_default();
    let (verdict, host) = kept.trim_end().split_once(' ').unwrap_or(("", ""));
    match verdict {
        "kvm" if host == host_release() => (Accel::Kvm, true),
        "tcg" if host == host_release() => (Accel::Tcg, true),
        _ => (Accel::Kvm, false),
    }
}

fn keep_verdict(state: &Path, accel: Accel) {
    if let Some(dir) = state.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let _ = fs::write(state, format!("{} {}\n", accel.name(), host_release()));
}

/// Where a VM's work files go and how long it may take.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// A private directory for the VM's files (removed by the caller).
    /// Empty: a store import puts it in the store's temp directory.
    pub work: PathBuf,
    /// The file that keeps the KVM verdict. Empty: a store import uses
    /// [`default_accel_state`], else the store's `.kiln/vm-accel`.
    pub accel_state: PathBuf,
    /// Memory of the guest in MiB.
    pub memory_mib: u32,
    /// The whole VM's deadline.
    pub timeout: Duration,
    /// How long a KVM guest has to say its first words before KVM is
    /// judged broken.
    pub kvm_probe: Duration,
    /// Largest file system to copy for the VM, and largest tar it may
    /// write back (a store import uses its `--max-size`).
    pub max_bytes: u64,
}

impl Default for VmOptions {
    /// Empty paths (see the fields), 1 GiB of guest memory, an hour's
    /// deadline, 5 s for a KVM guest's first words (a working KVM has
    /// the kernel talking well within a second).
    fn default() -> VmOptions {
        VmOptions::new(PathBuf::new(), PathBuf::new())
    }
}

impl VmOptions {
    /// Defaults for `work`, keeping the KVM verdict in `accel_state`.
    pub fn new(work: PathBuf, accel_state: PathBuf) -> VmOptions {
        VmOptions {
            work,
            accel_state,
            memory_mib: 1024,
            timeout: Duration::from_secs(3600),
            kvm_probe: Duration::from_secs(5),
            max_bytes: 256 << 30,
        }
    }
}

/// What a VM export left: the tar stream, in a file.
pub struct TarOut {
    /// The file holding the stream (at `offset`).
    pub file: fs::File,
    /// Where the stream starts.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// How the guest ran.
    pub accel: Accel,
}

impl TarOut {
    /// The tar stream.
    pub fn reader(&mut self) -> io::Result<impl Read + '_> {
        self.file.seek(SeekFrom::Start(self.offset))?;
        Ok(io::Read::take(&mut self.file, self.len))
    }
}

/// The result header the agent writes at the start of the output disk.
pub(crate) const OUT_MAGIC: &[u8; 8] = b"KILNTAR1";
/// The tar stream starts here on the output disk.
pub(crate) const OUT_DATA: u64 = 4096;

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
    let qemu = crate::sys::find_tool("qemu-system-x86_64")
        .ok_or_else(|| VmError::NoQemu("qemu-system-x86_64".into()))?;
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
    let initrd = opts.work.join("initrd.cpio");
    note("copying the file system out of its container for the VM");
    write_sparse(fs, &disk, Instant::now() + opts.timeout)?;
    // Sparse: only what the agent writes takes space. A compressed file
    // system (squashfs, btrfs with compress=) may hold far more than its
    // size, so the room is the import's limit, not a multiple of the size.
    let out_size = opts.max_bytes.saturating_add(OUT_DATA);
    fs::File::create(&out)
        .and_then(|f| f.set_len(out_size))
        .map_err(io_err("create", &out))?;
    write_initramfs(kernel, fstype, &initrd)?;
    let (first, decided) = choose_accel(&opts.accel_state);
    let mut accel = first;
    loop {
        note(&format!(
            "booting a {} VM to read the {fstype} file system",
            accel.name()
        ));
        let probe = (accel == Accel::Kvm && !decided).then_some(opts.kvm_probe);
        match boot(
            &qemu, kernel, &initrd, &disk, &out, fstype, accel, opts, probe,
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

/// A path as a QEMU option value (a comma is written twice).
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Text from the guest with control characters (terminal escapes) shown
/// as `\xNN`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                format!("\\x{:02x}", u32::from(c))
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Longest console line kept (a guest gone wrong may print without end).
const MAX_LINE: usize = 4096;

/// Sends the console's lines, each cut to [`MAX_LINE`] bytes, until end
/// of file or until nobody listens.
fn console_lines(r: impl Read, tx: &mpsc::Sender<String>) {
    let mut r = BufReader::new(r);
    let mut line: Vec<u8> = Vec::new();
    loop {
        let (used, done) = match r.fill_buf() {
            Ok([]) | Err(_) => return,
            Ok(buf) => match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let room = MAX_LINE.saturating_sub(line.len());
                    line.extend_from_slice(&buf[..i.min(room)]);
                    (i + 1, true)
                }
                None => {
                    let room = MAX_LINE.saturating_sub(line.len());
                    line.extend_from_slice(&buf[..buf.len().min(room)]);
                    (buf.len(), false)
                }
            },
        };
        r.consume(used);
        if done {
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            line.clear();
            if tx.send(text).is_err() {
                return;
            }
        }
    }
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
    kernel: &Kernel,
    initrd: &Path,
    disk: &Path,
    out: &Path,
    fstype: &str,
    accel: Accel,
    opts: &VmOptions,
    probe: Option<Duration>,
) -> Result<(), Boot> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-machine", "q35", "-accel", accel.name()])
        .args(["-m", &opts.memory_mib.to_string(), "-smp", "1"])
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init kiln_agent=1 kiln.fstype={fstype}"
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on,werror=report,rerror=report",
            qemu_path(disk)
        ))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,werror=report,rerror=report",
            qemu_path(out)
        ))
        // QEMU's own seccomp filter: should a hostile file system take
        // the guest kernel over, an escape into QEMU still cannot spawn,
        // gain privileges or use obsolete system calls.
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        if let Some(s) = stdout {
            console_lines(s, &tx);
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
    let mut console: Vec<String> = Vec::new();
    let mut heard = false;
    let mut outcome: Option<Result<(), Boot>> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if line.contains(agent::READY) {
                    heard = true;
                }
                console.push(line);
                if console.len() > 40 {
                    console.remove(0);
                }
            }
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
        if !heard && probe.is_some_and(|p| elapsed > p) {
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
    // Lines that arrived after the loop stopped.
    console.extend(rx.try_iter());
    let tail = |console: &[String]| {
        let n = console.len().saturating_sub(20);
        let mut t = console[n..].join("\n");
        if !qemu_err.trim().is_empty() {
            t.push_str("\nqemu: ");
            t.push_str(qemu_err.trim());
        }
        printable(&t)
    };
    if let Some(o) = outcome {
        return match o {
            Err(Boot::Failed(VmError::Failed { accel, why, .. })) => {
                Err(Boot::Failed(VmError::Failed {
                    accel,
                    why,
                    console: tail(&console),
                }))
            }
            other => other,
        };
    }
    if console.iter().any(|l| l.contains(agent::DONE)) {
        return Ok(());
    }
    if probe.is_some() && !heard && qemu_err.to_ascii_lowercase().contains("kvm") {
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
        console: tail(&console),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a static binary can be the guest's /init: kiln's own build
    /// (static, see .cargo/config.toml) passes, a distribution's dynamic
    /// /bin/ls and garbage do not.
    #[test]
    fn the_guest_agent_must_be_static() {
        let me = fs::read("/proc/self/exe").unwrap();
        assert_eq!(not_static(&me), None);
        let ls = fs::read("/bin/ls").unwrap();
        assert_eq!(not_static(&ls), Some("is dynamically linked"));
        assert!(not_static(b"#!/bin/sh\n").is_some());
        let mut cut = me[..64].to_vec();
        cut[0x38] = 0xff; // many program headers, none present
        assert!(not_static(&cut).is_some());
    }

    #[test]
    fn console_lines_are_cut_and_split() {
        let (tx, rx) = mpsc::channel();
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        input.extend_from_slice(b"\nlast\n");
        console_lines(&input[..], &tx);
        drop(tx);
        let lines: Vec<String> = rx.iter().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "two");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3], "last");
    }

    #[test]
    fn modules_come_after_their_dependencies() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/btrfs/btrfs.ko: kernel/crypto/xor.ko kernel/lib/libcrc32c.ko\nkernel/crypto/xor.ko:\nkernel/lib/libcrc32c.ko: kernel/crypto/crc32c_generic.ko\nkernel/crypto/crc32c_generic.ko:\nkernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio.ko:\n",
        )
        .expect("write");
        let k = Kernel {
            image: PathBuf::from("/nonexistent"),
            modules: dir.path().to_path_buf(),
        };
        let order = k
            .modules_for(&["virtio_blk", "btrfs", "no_such"])
            .expect("order");
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/block/virtio_blk.ko",
                "kernel/crypto/xor.ko",
                "kernel/crypto/crc32c_generic.ko",
                "kernel/lib/libcrc32c.ko",
                "kernel/fs/btrfs/btrfs.ko",
            ]
        );
    }
}
