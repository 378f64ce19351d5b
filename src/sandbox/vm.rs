//! The VM backend (`kiln run --vm`): the command runs in a throwaway QEMU
//! VM with a kernel of its own, so loop devices, partitions, mounts and
//! kernel modules are the guest's, never the host's.
//!
//! QEMU boots the kernel directly (PVH when the kernel has the entry note,
//! see `vm::kernel`) with kiln's initramfs, whose `/init` is kiln's guest
//! agent (`vm::agent::run`). The image's cached tree reaches the guest as
//! an ext4 image made once beside it, behind a qcow2 copy-on-write disk of
//! the run (or read-only with `--read-only`); the kernel's module tree is
//! a second ext4 disk; binds go over 9p. QEMU runs inside the caller's
//! user namespace mapping (as the sandbox's root there), so the image's
//! files, owned by the caller's subordinate ids on the host, are read with
//! the image's owners, and a guest that takes QEMU over holds only what
//! the caller holds, behind QEMU's own seccomp filter. Everything goes through one channel
//! (`vm::channel`), a virtio-serial port on a socket in the run directory:
//! the job, stdin, signals one way; stdout, stderr and the exit status the
//! other, in order. QEMU dies with kiln (PDEATHSIG); the run directory goes
//! with the run, or with the next run or `kiln gc` after a SIGKILL.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use rustix::process::Pid;

use super::prepare::Prepared;
use super::{RunError, RunEvent, RunResult, Stream};
use crate::spec::{ValidSpec, VmRunOptions};
use crate::userns::MapKind;
use crate::vm::cache::{ext4_of_tree, key_name, made_once, stamp, Reader};
use crate::vm::channel::{write_frame, Frames, Job, Kind, Share, PORT};
use crate::vm::qemu::{printable, qemu_path, Console, Machine};
use crate::vm::{accel, Accel, Kernel, VmError};

/// The modules every run's guest loads: virtio, the console port, and
/// crc32c, which ext4 and others ask the crypto API for when they mount
/// (the kernel's on-demand modprobe has no module tree to look in: only
/// the command's root has one). The others only when the run needs them:
/// under TCG each costs the boot milliseconds.
const RUN_MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_console"];

/// What a guest with 9p shares (binds, or the tree as its root) loads.
const NINEP_MODULES: &[&str] = &["9pnet_virtio", "9p"];

/// What a guest with virtiofs binds loads.
const VIRTIOFS_MODULES: &[&str] = &["virtiofs"];

/// How the tree reaches the guest when not as an ext4 image:
/// `KILN_VM_ROOTFS=9p` or `virtiofs` (`Some(true)`).
fn root_share() -> Option<bool> {
    match std::env::var("KILN_VM_ROOTFS").as_deref() {
        Ok("9p") => Some(false),
        Ok("virtiofs") => Some(true),
        _ => None,
    }
}

/// QEMU's virtiofsd, where Debian and Fedora put it, else on `PATH`.
fn find_virtiofsd() -> Option<PathBuf> {
    ["/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| crate::sys::find_tool("virtiofsd"))
}

/// The virtiofsd binds go through, when they go over virtiofs: by
/// default when virtiofsd is installed and can run in the caller's
/// mapping (under TCG `ls -lR` of a bind is about 7x faster than over 9p,
/// reading its files 2.5-5x), else 9p; `KILN_VM_BINDS=9p` or `virtiofs`
/// (an error when virtiofsd cannot serve) chooses.
fn virtiofs_binds(any: bool, map: MapKind) -> Result<Option<PathBuf>, RunError> {
    if !any {
        return Ok(None);
    }
    match std::env::var("KILN_VM_BINDS").as_deref() {
        Ok("9p") => Ok(None),
        Ok("virtiofs") => virtiofsd_for(map, "KILN_VM_BINDS=virtiofs").map(Some),
        _ => Ok(virtiofsd_for(map, "").ok()),
    }
}

/// virtiofsd, if it can serve in a `map` mapping: it calls setgroups(2),
/// which a mapping of the caller's one id denies (no newgidmap), so there
/// the shares go over 9p. `why` names the setting that asked for it.
fn virtiofsd_for(map: MapKind, why: &str) -> Result<PathBuf, RunError> {
    if map == MapKind::Caller {
        return Err(RunError::Unsupported(format!(
            "{why}: virtiofsd needs setgroups, which a user namespace mapping only the caller's own ids denies (add /etc/subuid and /etc/subgid ranges, or use 9p)"
        )));
    }
    find_virtiofsd().ok_or_else(|| {
        RunError::Unsupported(format!(
            "{why}: virtiofsd not found (install qemu-system-common, or virtiofsd)"
        ))
    })
}

/// What a guest whose root is an overlay (the tree over 9p, or a commit's
/// upper disk) loads.
const OVERLAY_MODULES: &[&str] = &["overlay"];

/// What else a guest with its root on a block device loads.
const BLOCK_ROOT_MODULES: &[&str] = &["virtio_blk", "ext4"];

/// What a guest on QEMU's user network loads.
const NET_MODULES: &[&str] = &["virtio_net"];

/// The upper disk of a run that commits, in its run directory: an empty
/// ext4 file system the guest's overlay writes its upper layer to, read by
/// the host's ext4 reader for the commit.
pub(crate) const UPPER_DISK: &str = "upper.ext4";

/// Free room in a root image for a run's writes, in KiB: the file is
/// sparse, so room costs nothing until a run writes (into its own
/// copy-on-write disk, never the cached image).
const ROOM_KIB: u64 = 8 << 20;

/// The image's tree as an ext4 image for a guest's root (a virtio disk:
/// under TCG far faster to walk than 9p), made once per cached tree beside
/// it (`root.vm1.ext4`, gone with the tree) by a helper inside the
/// caller's id mapping, so every file is readable and keeps the image's
/// owners; `None` when `KILN_VM_ROOTFS=9p` or `virtiofs` asks for the
/// tree over that (read-only, under an overlay in guest memory), the
/// other root file systems measured.
fn root_image(p: &Prepared, helper: Option<&Path>) -> Result<Option<PathBuf>, RunError> {
    if root_share().is_some() {
        return Ok(None);
    }
    let tree = &p.rootfs.path;
    made_once(&tree.with_file_name("root.vm1.ext4"), |tmp| {
        ext4_of_tree(tree, tmp, ROOM_KIB, Reader::Mapped(helper, &p.map))
    })
    .map(Some)
    .map_err(RunError::Vm)
}

/// A read-only ext4 image of the kernel's module tree in `cache`, made
/// once per tree; `None` when the kernel has no module tree or the image
/// cannot be made (the guest then has no modprobe, which the run does not
/// need).
fn modules_image(kernel: &Kernel, cache: &Path) -> Option<PathBuf> {
    let dep = kernel.modules.join("modules.dep");
    if !dep.exists() {
        return None;
    }
    let name = key_name(&format!("{}\n{}", kernel.modules.display(), stamp(&dep)));
    made_once(&cache.join(format!("modules-{name}.ext4")), |tmp| {
        ext4_of_tree(&kernel.modules, tmp, 16 << 10, Reader::Caller)
    })
    .map_err(|e| tracing::debug!("vm run: no module tree in the guest: {e}"))
    .ok()
}

/// A qcow2 disk in `dir` whose backing file is the raw `image`.
fn cow_disk(image: &Path, dir: &Path) -> Result<PathBuf, RunError> {
    let qemu_img = crate::sys::find_tool("qemu-img").ok_or_else(|| {
        RunError::Unsupported("qemu-img not found (install qemu-utils): a VM run writes to its root through a copy-on-write disk".into())
    })?;
    let cow = dir.join("root.qcow2");
    let out = std::process::Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(image)
        .arg(&cow)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| RunError::host(format!("run {}", qemu_img.display()), e))?;
    if !out.status.success() {
        return Err(RunError::host(
            format!("create {}", cow.display()),
            io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        ));
    }
    Ok(cow)
}

/// The caller's terminal size (rows, columns), from stdout or stdin; 24x80
/// when neither is a terminal.
fn caller_winsize() -> [u16; 2] {
    use std::os::fd::AsFd;
    [io::stdout().as_fd(), io::stdin().as_fd()]
        .into_iter()
        .find_map(|fd| rustix::termios::tcgetwinsize(fd).ok())
        .filter(|ws| ws.ws_row > 0 && ws.ws_col > 0)
        .map_or([24, 80], |ws| [ws.ws_row, ws.ws_col])
}

/// A sparse raw scratch disk of `size` bytes in `dir`.
fn scratch_disk(dir: &Path, size: u64) -> Result<PathBuf, RunError> {
    let path = dir.join("disk.raw");
    fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .map_err(|e| RunError::host(format!("create the scratch disk {}", path.display()), e))?;
    Ok(path)
}

/// The user's initramfs followed by kiln's, in the run directory: the
/// kernel unpacks both in turn, so kiln's `/init` is the one that runs.
fn with_initrd(extra: &Path, kiln: &Path, dir: &Path) -> Result<PathBuf, RunError> {
    let path = dir.join("initrd.img");
    let mut first = fs::File::open(extra).map_err(|e| {
        RunError::host(
            format!(
                "{} {}: open",
                crate::words::field("vm.initrd"),
                extra.display()
            ),
            e,
        )
    })?;
    let mut copy = || -> io::Result<()> {
        let mut out = fs::File::create(&path)?;
        let n = io::copy(&mut first, &mut out)?;
        // Each archive of a concatenation starts 4-byte aligned.
        out.write_all(&[0u8; 3][..((4 - n % 4) % 4) as usize])?;
        io::copy(&mut fs::File::open(kiln)?, &mut out)?;
        Ok(())
    };
    copy().map_err(|e| RunError::host(format!("add {} to the initramfs", extra.display()), e))?;
    Ok(path)
}

/// How long a KVM guest has to speak before KVM is judged broken.
const KVM_PROBE: Duration = Duration::from_secs(5);

/// How long a guest may take from QEMU's start to the command's.
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// Runs the prepared command in a VM.
pub(crate) fn run(
    p: &Prepared,
    o: &VmRunOptions,
    helper: Option<&Path>,
    spec: &ValidSpec<'_>,
    start: Instant,
    mut events: Option<&mut dyn FnMut(RunEvent<'_>)>,
) -> Result<RunResult, RunError> {
    let rundir = p
        .rundir
        .as_ref()
        .map(|d| d.path.clone())
        .ok_or_else(|| RunError::Unsupported("a VM run needs a run directory".into()))?;
    // What is made of a kernel (its PVH vmlinux, its module tree's image,
    // the initramfs) is the user's, kept across stores: `$XDG_CACHE_HOME`
    // (or ~/.cache) `/kiln/vm`, else the store's `.kiln/vm`.
    let cache = crate::vm::default_accel_state()
        .and_then(|s| s.parent().map(|d| d.join("vm")))
        .filter(|d| fs::create_dir_all(d).is_ok())
        .unwrap_or_else(|| p.runs.parent().unwrap_or(&p.runs).join("vm"));
    let entered = Instant::now();
    // --kernel, else the image's own, else the host's.
    let kernel = match &o.kernel {
        Some(k) => Kernel::from_file(k),
        None => Kernel::of_image(&p.rootfs.path).and_then(|own| own.map_or_else(Kernel::find, Ok)),
    }
    .map_err(RunError::Vm)?;
    tracing::debug!(
        "vm run: kernel {} (modules {}{})",
        kernel.image.display(),
        kernel.modules.display(),
        if kernel.is_the_images() {
            ", the image's own"
        } else {
            ""
        }
    );
    let root_image = root_image(p, helper)?;
    // An image's own kernel has its module tree in the root already.
    let modules_image = if kernel.is_the_images() {
        None
    } else {
        modules_image(&kernel, &cache)
    };
    let commit = spec.commit.is_some();
    let network = spec.network == crate::spec::Network::Host;
    let binds_virtiofs = virtiofs_binds(!spec.volumes.is_empty(), p.map.kind)?;
    let binds_over_virtiofs = binds_virtiofs.is_some();
    let root_virtiofs = root_share() == Some(true);
    let root_9p = root_share() == Some(false);
    let virtiofsd = match (root_virtiofs, binds_virtiofs) {
        (_, Some(d)) => Some(d),
        (true, None) => Some(virtiofsd_for(p.map.kind, "KILN_VM_ROOTFS=virtiofs")?),
        (false, None) => None,
    };
    let mut modules = RUN_MODULES.to_vec();
    if root_9p || (!spec.volumes.is_empty() && !binds_over_virtiofs) {
        modules.extend(NINEP_MODULES);
    }
    if root_virtiofs || (!spec.volumes.is_empty() && binds_over_virtiofs) {
        modules.extend(VIRTIOFS_MODULES);
    }
    if root_image.is_none() || commit {
        modules.extend(OVERLAY_MODULES);
    }
    if root_image.is_some() || modules_image.is_some() || commit || o.disk.is_some() {
        modules.extend(BLOCK_ROOT_MODULES);
    }
    if network {
        modules.extend(NET_MODULES);
    }
    let mut initrd =
        crate::vm::initramfs::cached(&kernel, &modules, &cache).map_err(RunError::Vm)?;
    if let Some(extra) = &o.initrd {
        initrd = with_initrd(extra, &initrd, &rundir)?;
    }
    // The run's writes to its root: a qcow2 disk in the run directory over
    // the cached image, or with a commit an upper disk the guest's overlay
    // writes (gone with the run directory, or with the next run or gc
    // after a SIGKILL).
    let root_overlay = match (&root_image, spec.read_only || commit) {
        (Some(img), false) => Some(cow_disk(img, &rundir)?),
        _ => None,
    };
    let upper_disk = if commit {
        let path = rundir.join(UPPER_DISK);
        crate::vm::cache::empty_ext4(&path, ROOM_KIB).map_err(RunError::Vm)?;
        Some(path)
    } else {
        None
    };
    let scratch = match o.disk {
        Some(size) => Some(scratch_disk(&rundir, size)?),
        None => None,
    };
    let boot = kernel.boot_file(&cache).map_err(RunError::Vm)?;
    let qemu = crate::vm::qemu::find_qemu().map_err(RunError::Vm)?;
    let made = Instant::now();
    let state = crate::vm::default_accel_state().unwrap_or_else(|| cache.join("accel"));
    let mut warnings = Vec::new();
    let (mut accel, decided) = match o.accel {
        Some(Accel::Kvm) => {
            if let Some(why) = accel::kvm_denied() {
                return Err(RunError::Unsupported(format!(
                    "{} kvm: {why}",
                    crate::words::field("vm.accel")
                )));
            }
            if !Path::new("/dev/kvm").exists() {
                return Err(RunError::Unsupported(format!(
                    "{} kvm: this host has no /dev/kvm (no hardware virtualization, or the kvm module is not loaded)",
                    crate::words::field("vm.accel")
                )));
            }
            (Accel::Kvm, true)
        }
        Some(a) => (a, true),
        None => {
            if let Some(why) = accel::kvm_denied() {
                if accel::first_denial(&state) {
                    warnings.push(format!("using tcg: {why}"));
                }
            }
            accel::choose_accel(&state)
        }
    };
    // The namespace backend's defaults are shares of the host's memory; a
    // guest has its own, which bounds every tmpfs.
    let guest = u64::from(o.memory_mib) << 20;
    let (tmp_size, shm_size, upper_size) = spec.tmpfs_sizes();
    let (tmp_size, shm_size, upper_size) = (
        tmp_size.min(guest / 2),
        shm_size.min(guest / 2),
        upper_size.min(guest / 2),
    );
    let mut job = Job {
        argv: p.argv.clone(),
        env: p.env.clone(),
        workdir: p.workdir.clone(),
        uid: p.user.0,
        gid: p.user.1,
        hostname: spec.hostname.clone(),
        read_only: spec.read_only,
        root_disk: root_image.is_some(),
        root_virtiofs,
        upper_disk: commit,
        scratch_disk: scratch.is_some(),
        network,
        tty: spec.tty.then(caller_winsize),
        stdin: spec.stdin,
        upper_size,
        tmp_size,
        shm_size,
        mounts: Vec::new(),
        modules: None,
    };
    let mut shares: Vec<(String, PathBuf, bool)> = Vec::new();
    for (i, vol) in spec.volumes.iter().enumerate() {
        let source = fs::canonicalize(&vol.source).unwrap_or_else(|_| vol.source.clone());
        if !source.is_dir() {
            return Err(RunError::Unsupported(format!(
                "{} {}: a VM run binds directories only (9p shares a directory); bind its parent",
                crate::words::field("volumes"),
                vol.source.display()
            )));
        }
        let tag = format!("kiln.v{i}");
        shares.push((tag.clone(), source, vol.read_only));
        job.mounts.push(Share {
            tag,
            target: vol.target.clone(),
            read_only: vol.read_only,
            dev: vol.dev,
            suid: vol.suid,
            required: true,
            virtiofs: binds_over_virtiofs,
        });
    }
    // The shares each transport carries: the tree first when it is the
    // root, then the binds.
    let (mut over_virtiofs, mut over_9p) = (Vec::new(), Vec::new());
    if root_image.is_none() {
        let root = ("kiln.root".to_string(), p.rootfs.path.clone(), true);
        if root_virtiofs {
            over_virtiofs.push(root);
        } else {
            over_9p.push(root);
        }
    }
    if binds_over_virtiofs {
        over_virtiofs.extend(shares);
    } else {
        over_9p.extend(shares);
    }
    // The kernel's module tree, for modprobe in the guest.
    if let Some(release) = modules_image
        .as_ref()
        .and_then(|_| kernel.modules.file_name())
    {
        job.modules = Some(format!("/lib/modules/{}", release.to_string_lossy()));
    }
    if let Some(ev) = events.as_mut() {
        for message in &warnings {
            ev(RunEvent::Warning { message });
        }
    }
    let mut sigs = super::signals::FORWARDED.to_vec();
    if spec.tty {
        sigs.push(libc::SIGWINCH);
    }
    let forwarding = super::signals::Forwarding::start(&sigs, spec.forward_signals)?;
    // With -t -i from a terminal: keys (^C included) reach the guest's pty.
    let _raw = (spec.tty && spec.stdin).then(super::pty::RawMode::enter);
    let append = std::iter::once("kiln_job=run".to_string())
        .chain(o.kernel_cmdline.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut probing = Duration::ZERO;
    let result = loop {
        let tried = Instant::now();
        let probe = (accel == Accel::Kvm && !decided).then_some(KVM_PROBE);
        let vm = Vm {
            qemu: &qemu,
            machine: Machine {
                kernel: &boot,
                initrd: &initrd,
                append: &append,
                accel,
                memory_mib: o.memory_mib,
                cpus: o.cpus,
            },
            root_image: root_image.as_deref(),
            root_overlay: root_overlay.as_deref(),
            upper_disk: upper_disk.as_deref(),
            scratch: scratch.as_deref(),
            network,
            virtiofsd: virtiofsd.as_deref(),
            modules_image: modules_image.as_deref(),
            virtiofs: &over_virtiofs,
            ninep: &over_9p,
            rundir: &rundir,
        };
        match attempt(
            &vm,
            p,
            helper,
            spec,
            &job,
            probe,
            forwarding.fd.as_ref(),
            &mut events,
        ) {
            Err(Attempt::Silent(why)) if accel == Accel::Kvm => {
                let message =
                    format!("kvm does not really work here ({why}); using tcg from now on");
                if let Some(ev) = events.as_mut() {
                    ev(RunEvent::Warning { message: &message });
                }
                warnings.push(message);
                probing += tried.elapsed();
                accel::keep_verdict(&state, Accel::Tcg);
                accel = Accel::Tcg;
            }
            Err(Attempt::Silent(why)) => {
                break Err(RunError::Vm(VmError::Failed {
                    accel: accel.name(),
                    why,
                    console: String::new(),
                }))
            }
            Err(Attempt::Failed(e)) => break Err(e),
            Ok(end) => {
                if accel == Accel::Kvm && !decided {
                    accel::keep_verdict(&state, Accel::Kvm);
                }
                break Ok(end);
            }
        }
    };
    drop(forwarding);
    let end = result?;
    let (exit_code, signal) = super::outcome::settle(end.exit_code, end.timed_out, end.killed);
    Ok(RunResult {
        exit_code,
        signal,
        timed_out: end.timed_out,
        duration: start.elapsed(),
        image_digest: p.img.descriptor.digest().to_string(),
        committed: None,
        warnings,
        timings: timings(start, entered, made, probing, &end.marks),
    })
}

/// The steps of a run from the marks of its boot.
fn timings(
    start: Instant,
    entered: Instant,
    made: Instant,
    probing: Duration,
    m: &Marks,
) -> Vec<super::Timing> {
    let span = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_duration_since(a),
        _ => Duration::ZERO,
    };
    let mut t = vec![
        ("prepare", entered.saturating_duration_since(start)),
        (
            "kernel and initramfs",
            made.saturating_duration_since(entered),
        ),
    ];
    if !probing.is_zero() {
        t.push(("kvm probe", probing));
    }
    t.extend([
        ("qemu start", span(m.spawned, m.connected)),
        ("kernel boot", span(m.connected, m.ready)),
        ("guest setup", span(m.ready, m.started)),
        ("command", span(m.started, m.exited)),
        ("shutdown", span(m.exited, m.stopped)),
    ]);
    t.into_iter()
        .map(|(step, duration)| super::Timing { step, duration })
        .collect()
}

/// One VM to start.
struct Vm<'a> {
    qemu: &'a Path,
    machine: Machine<'a>,
    /// The tree as an ext4 image (else the tree goes over 9p).
    root_image: Option<&'a Path>,
    /// The run's copy-on-write disk over it (none: read-only, or the
    /// writes go to the upper disk).
    root_overlay: Option<&'a Path>,
    /// The upper disk of a run that commits.
    upper_disk: Option<&'a Path>,
    /// The `--disk` scratch disk.
    scratch: Option<&'a Path>,
    /// QEMU's user network for the guest.
    network: bool,
    /// The virtiofsd that serves [`Vm::virtiofs`].
    virtiofsd: Option<&'a Path>,
    /// The kernel's module tree as an ext4 image.
    modules_image: Option<&'a Path>,
    /// Shares over virtiofs, one virtiofsd each: tag, host directory,
    /// read-only (the tree first when it is the root this way).
    virtiofs: &'a [(String, PathBuf, bool)],
    /// Shares over 9p, the same way.
    ninep: &'a [(String, PathBuf, bool)],
    rundir: &'a Path,
}

/// How one boot ended.
struct End {
    exit_code: i32,
    timed_out: bool,
    killed: bool,
    marks: Marks,
}

/// When each step of a boot ended.
#[derive(Default, Clone, Copy)]
struct Marks {
    spawned: Option<Instant>,
    connected: Option<Instant>,
    ready: Option<Instant>,
    started: Option<Instant>,
    exited: Option<Instant>,
    stopped: Option<Instant>,
}

enum Attempt {
    /// While probing KVM: the guest never spoke; why.
    Silent(String),
    Failed(RunError),
}

impl From<RunError> for Attempt {
    fn from(e: RunError) -> Attempt {
        Attempt::Failed(e)
    }
}

/// The socket of the virtiofsd of share `i`, relative to the run directory.
fn virtiofs_socket(i: usize) -> String {
    format!("vfs{i}.sock")
}

/// Starts a virtiofsd for each share, behind walls of its own (the shared
/// directory, read-only for a read-only bind, and the run directory for
/// its socket; its own sandbox then pivots into the directory), and waits
/// for their sockets.
fn start_virtiofsd(
    vm: &Vm<'_>,
    daemon: &Path,
    helper: Option<&Path>,
    map: &crate::userns::IdMap,
) -> Result<Helpers, RunError> {
    let mut started = Helpers(Vec::new());
    for (i, (_, dir, ro)) in vm.virtiofs.iter().enumerate() {
        let sock = vm.rundir.join(virtiofs_socket(i));
        let _ = fs::remove_file(&sock);
        let argv = vec![
            daemon.display().to_string(),
            format!("--socket-path={}", virtiofs_socket(i)),
            "-o".into(),
            format!("source={}", dir.display()),
            "-o".into(),
            "sandbox=namespace".into(),
            "-o".into(),
            "cache=auto".into(),
            "--thread-pool-size=1".into(),
        ];
        let walls = crate::userns::Walls {
            paths: vec![
                (daemon.to_path_buf(), false),
                (dir.clone(), !ro),
                (vm.rundir.to_path_buf(), true),
            ],
            network: false,
            scratch: vm.rundir.join(format!("walls-vfs{i}")),
            tmpfs: vec![PathBuf::from("/run"), PathBuf::from("/var/run")],
        };
        let child = crate::userns::spawn_confined(helper, map, argv, vm.rundir, walls)
            .map_err(|e| RunError::host(format!("start {}", daemon.display()), e))?;
        started.0.push(child);
        let until = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(c) = started.0.last_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        let _ = io::Read::read_to_string(&mut e, &mut err);
                    }
                    return Err(RunError::host(
                        format!("start {} for {}", daemon.display(), dir.display()),
                        io::Error::other(format!("it exited ({st}): {}", err.trim())),
                    ));
                }
            }
            if Instant::now() > until {
                return Err(RunError::host(
                    format!("start {}", daemon.display()),
                    io::Error::other(format!("no socket {} after 10 s", sock.display())),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(started)
}

/// Helper processes of a run (virtiofsd), killed and reaped however the
/// run ends.
struct Helpers(Vec<std::process::Child>);

impl Drop for Helpers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What QEMU sees of the host: the system directories, its run directory
/// (socket, copy-on-write and scratch disks), the kernel, initramfs and
/// disk images it opens, and the shared directories; the host's network
/// only for `--network host`.
fn walls(vm: &Vm<'_>) -> crate::userns::Walls {
    let mut paths = vec![
        (vm.rundir.to_path_buf(), true),
        (vm.machine.kernel.to_path_buf(), false),
        (vm.machine.initrd.to_path_buf(), false),
        (vm.qemu.to_path_buf(), false),
    ];
    paths.extend(vm.root_image.map(|p| (p.to_path_buf(), false)));
    paths.extend(vm.modules_image.map(|p| (p.to_path_buf(), false)));
    // What QEMU serves itself (virtiofsd serves the rest).
    paths.extend(vm.ninep.iter().map(|(_, dir, ro)| (dir.clone(), !ro)));
    crate::userns::Walls {
        paths,
        network: vm.network,
        scratch: vm.rundir.join("walls"),
        tmpfs: Vec::new(),
    }
}

/// QEMU's command line for a run.
fn qemu_argv(vm: &Vm<'_>) -> Result<Vec<String>, RunError> {
    let cmd = vm.machine.command(vm.qemu);
    let mut argv: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let utf8 = |p: &Path| {
        p.to_str().map(str::to_string).ok_or_else(|| {
            RunError::Unsupported(format!(
                "{} is not a UTF-8 path, which QEMU cannot be given",
                p.display()
            ))
        })
    };
    if let Some(img) = vm.root_image {
        argv.push("-drive".into());
        argv.push(match vm.root_overlay {
            Some(cow) => format!(
                "file={},format=qcow2,if=none,id=root,discard=unmap",
                qemu_path(Path::new(&utf8(cow)?))
            ),
            None => format!(
                "file={},format=raw,if=none,id=root,readonly=on",
                qemu_path(Path::new(&utf8(img)?))
            ),
        });
        argv.push("-device".into());
        argv.push("virtio-blk-pci,drive=root,serial=kiln-root".into());
    }
    for (disk, serial) in [(vm.upper_disk, "kiln-upper"), (vm.scratch, "kiln-disk")] {
        if let Some(disk) = disk {
            argv.push("-drive".into());
            argv.push(format!(
                "file={},format=raw,if=none,id={serial},discard=unmap",
                qemu_path(Path::new(&utf8(disk)?))
            ));
            argv.push("-device".into());
            argv.push(format!("virtio-blk-pci,drive={serial},serial={serial}"));
        }
    }
    if vm.network {
        // QEMU's user network (slirp): the guest reaches what the host
        // reaches, the host's loopback at the gateway; nothing reaches in.
        argv.extend([
            "-netdev".into(),
            "user,id=net0".into(),
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
        ]);
    }
    if let Some(img) = vm.modules_image {
        argv.push("-drive".into());
        argv.push(format!(
            "file={},format=raw,if=none,id=modules,readonly=on",
            qemu_path(Path::new(&utf8(img)?))
        ));
        argv.push("-device".into());
        argv.push("virtio-blk-pci,drive=modules,serial=kiln-modules".into());
    }
    if !vm.virtiofs.is_empty() {
        // vhost-user needs the guest's memory shared with virtiofsd.
        argv.extend([
            "-object".into(),
            format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                vm.machine.memory_mib
            ),
            "-numa".into(),
            "node,memdev=mem".into(),
        ]);
        for (i, (tag, _, _)) in vm.virtiofs.iter().enumerate() {
            argv.extend([
                "-chardev".into(),
                format!("socket,id=vfs{i},path={}", virtiofs_socket(i)),
                "-device".into(),
                format!("vhost-user-fs-pci,chardev=vfs{i},tag={tag}"),
            ]);
        }
    }
    for (i, (tag, dir, ro)) in vm.ninep.iter().enumerate() {
        // security_model=none: QEMU reads and writes as itself, the
        // sandbox's root in the caller's mapping, so the guest sees the
        // image's owners and files it creates get the caller's ids.
        argv.push("-fsdev".into());
        argv.push(format!(
            "local,id=fs{i},path={},security_model=none{}",
            qemu_path(Path::new(&utf8(dir)?)),
            if *ro { ",readonly=on" } else { "" }
        ));
        argv.push("-device".into());
        argv.push(format!("virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"));
    }
    argv.extend([
        "-device".into(),
        "virtio-serial-pci,id=ser".into(),
        // Relative to QEMU's working directory, the run directory: a
        // socket path has at most 107 bytes.
        "-chardev".into(),
        "socket,id=ctl,path=ctl.sock".into(),
        "-device".into(),
        format!("virtserialport,bus=ser.0,chardev=ctl,name={PORT}"),
    ]);
    Ok(argv)
}

fn nonblocking(fd: &impl std::os::fd::AsFd) -> Result<(), RunError> {
    let fl = rustix::fs::fcntl_getfl(fd).map_err(|e| RunError::host("fcntl", e.into()))?;
    rustix::fs::fcntl_setfl(fd, fl | rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| RunError::host("fcntl", e.into()))
}

/// Kills and reaps QEMU when an attempt ends, however it ends.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots the VM once and runs the job to its end.
#[allow(clippy::too_many_arguments)]
fn attempt(
    vm: &Vm<'_>,
    p: &Prepared,
    helper: Option<&Path>,
    spec: &ValidSpec<'_>,
    job: &Job,
    probe: Option<Duration>,
    sigfd: Option<&OwnedFd>,
    events: &mut Option<&mut dyn FnMut(RunEvent<'_>)>,
) -> Result<End, Attempt> {
    let sock = vm.rundir.join("ctl.sock");
    let _ = fs::remove_file(&sock);
    // Bound through the directory's descriptor: the run directory's full
    // path may be longer than a socket address holds.
    let dir = fs::File::open(vm.rundir)
        .map_err(|e| RunError::host(format!("open {}", vm.rundir.display()), e))?;
    let listener = UnixListener::bind(PathBuf::from(format!(
        "/proc/self/fd/{}/ctl.sock",
        dir.as_raw_fd()
    )))
    .map_err(|e| RunError::host(format!("listen on {}", sock.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| RunError::host("listen", e))?;
    let _virtiofsd = match vm.virtiofsd {
        Some(d) => Some(start_virtiofsd(vm, d, helper, &p.map)?),
        None => None,
    };
    let argv = qemu_argv(vm)?;
    tracing::debug!("vm run: {argv:?}");
    let mut child = crate::userns::spawn_confined(helper, &p.map, argv, vm.rundir, walls(vm))
        .map_err(|e| {
            RunError::Vm(VmError::Io {
                step: "start",
                path: vm.qemu.display().to_string(),
                source: e,
            })
        })?;
    let console_fd: Option<OwnedFd> = child.stdout.take().map(OwnedFd::from);
    let qemu_err_fd: Option<OwnedFd> = child.stderr.take().map(OwnedFd::from);
    let qemu = Qemu(child);
    let pid =
        Pid::from_raw(qemu.0.id() as i32).ok_or_else(|| RunError::Unsupported("bad pid".into()))?;
    if let Some(ev) = events.as_mut() {
        ev(RunEvent::Started { pid: qemu.0.id() });
    }
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
        .map_err(|e| RunError::host("pidfd_open", e.into()))?;
    let (mut console_fd, mut qemu_err_fd) = (console_fd, qemu_err_fd);
    for fd in console_fd.iter().chain(qemu_err_fd.iter()) {
        nonblocking(fd)?;
    }
    let mut console = Console::default();
    let mut qemu_err: Vec<u8> = Vec::new();
    let mut stream: Option<UnixStream> = None;
    let mut frames = Frames::default();
    let stdin = io::stdin();
    let mut stdin_open = spec.stdin;
    let booted = Instant::now();
    let mut marks = Marks {
        spawned: Some(booted),
        ..Marks::default()
    };
    // --timeout bounds the command, from its start in the guest; the boot
    // has a bound of its own.
    let mut deadline: Option<Instant> = None;
    let boot_by = booted + BOOT_LIMIT;
    let mut started = false;
    let (mut timed_out, mut killed) = (false, false);
    let mut kill_at: Option<Instant> = None;
    let mut exit_code: Option<i32> = None;
    let mut agent_error: Option<String> = None;
    let mut buf = vec![0u8; 65536];
    let send = |s: &mut Option<UnixStream>, kind: Kind, data: &[u8]| {
        if let Some(s) = s.as_mut() {
            let _ = write_frame(s, kind, data).and_then(|()| s.flush());
        }
    };
    let out = |stream: Stream, data: &[u8], events: &mut Option<&mut dyn FnMut(RunEvent<'_>)>| {
        match events.as_mut() {
            Some(ev) => ev(RunEvent::Output { stream, data }),
            None => {
                let _ = match stream {
                    Stream::Stdout => {
                        let mut o = io::stdout().lock();
                        o.write_all(data).and_then(|()| o.flush())
                    }
                    Stream::Stderr => io::stderr().lock().write_all(data),
                };
            }
        }
    };
    let mut qemu_gone = false;
    while exit_code.is_none() && agent_error.is_none() && !qemu_gone {
        let now = Instant::now();
        if let (Some(p), false) = (probe, console.heard) {
            if now.duration_since(booted) > p {
                return Err(Attempt::Silent(format!("the guest said nothing for {p:?}")));
            }
        }
        if !started && now >= boot_by {
            return Err(RunError::Vm(VmError::Failed {
                accel: vm.machine.accel.name(),
                why: format!("the command had not started after {BOOT_LIMIT:?}"),
                console: console.tail(&qemu_err),
            })
            .into());
        }
        if !timed_out && deadline.is_some_and(|d| now >= d) {
            timed_out = true;
            send(&mut stream, Kind::Signal, &libc::SIGTERM.to_le_bytes());
            kill_at = Some(now + spec.timeout_grace);
        }
        if kill_at.is_some_and(|k| now >= k) {
            killed = true;
            break;
        }
        let wake = [
            deadline.filter(|_| !timed_out),
            (!started).then_some(boot_by),
            kill_at,
            probe.map(|p| booted + p),
        ]
        .into_iter()
        .flatten()
        .min();
        let mut fds: Vec<PollFd<'_>> = vec![PollFd::new(&pidfd, PollFlags::IN)];
        let slot = |fds: &Vec<PollFd<'_>>| fds.len();
        let listen_slot = slot(&fds);
        if stream.is_none() {
            fds.push(PollFd::new(&listener, PollFlags::IN));
        }
        let stream_slot = slot(&fds);
        if let Some(s) = &stream {
            fds.push(PollFd::new(s, PollFlags::IN));
        }
        let console_slot = slot(&fds);
        if let Some(c) = &console_fd {
            fds.push(PollFd::new(c, PollFlags::IN));
        }
        let err_slot = slot(&fds);
        if let Some(e) = &qemu_err_fd {
            fds.push(PollFd::new(e, PollFlags::IN));
        }
        let sig_slot = slot(&fds);
        if let Some(s) = sigfd {
            fds.push(PollFd::new(s, PollFlags::IN));
        }
        let stdin_slot = slot(&fds);
        let take_stdin = stdin_open && stream.is_some();
        if take_stdin {
            fds.push(PollFd::new(&stdin, PollFlags::IN));
        }
        let ts = wake.map(|w| {
            let t = w.saturating_duration_since(now);
            rustix::event::Timespec {
                tv_sec: t.as_secs() as i64,
                tv_nsec: i64::from(t.subsec_nanos()),
            }
        });
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(RunError::host("poll", e.into()).into()),
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        let has = |i: usize, present: bool| present && ready.get(i).copied().unwrap_or(false);
        let (listen_r, stream_r, console_r, err_r, sig_r, stdin_r) = (
            has(listen_slot, stream.is_none()),
            has(stream_slot, stream.is_some()),
            has(console_slot, console_fd.is_some()),
            has(err_slot, qemu_err_fd.is_some()),
            has(sig_slot, sigfd.is_some()),
            has(stdin_slot, take_stdin),
        );
        let exited = ready[0];
        drop(fds);
        if listen_r {
            if let Ok((s, _)) = listener.accept() {
                let mut s = s;
                let json = serde_json::to_vec(job)
                    .map_err(|e| RunError::host("write the job", io::Error::other(e)))?;
                write_frame(&mut s, Kind::Job, &json)
                    .map_err(|e| RunError::host("send the job to the guest", e))?;
                stream = Some(s);
                marks.connected = Some(Instant::now());
            }
        }
        if console_r {
            if let Some(c) = &console_fd {
                match rustix::io::read(c, &mut buf) {
                    Ok(0) => console_fd = None,
                    Ok(n) => {
                        console.push(&buf[..n]);
                        if console.heard && marks.ready.is_none() {
                            marks.ready = Some(Instant::now());
                        }
                    }
                    Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(_) => console_fd = None,
                }
            }
        }
        if err_r {
            if let Some(e) = &qemu_err_fd {
                match rustix::io::read(e, &mut buf) {
                    Ok(0) => qemu_err_fd = None,
                    Ok(n) if qemu_err.len() < 1 << 16 => qemu_err.extend_from_slice(&buf[..n]),
                    Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(_) => qemu_err_fd = None,
                }
            }
        }
        if stream_r {
            let n = match stream.as_ref().map(|s| rustix::io::read(s, &mut buf)) {
                Some(Ok(n)) => n,
                Some(Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN)) => continue,
                _ => 0,
            };
            if n == 0 {
                // QEMU closed the socket: it is ending.
                stream = None;
                qemu_gone = true;
            }
            frames.push(&buf[..n]);
            loop {
                let frame = frames.next().map_err(|e| {
                    RunError::Vm(VmError::Agent(format!("speak kiln's protocol: {e}")))
                })?;
                let Some((kind, data)) = frame else { break };
                match kind {
                    Kind::Stdout => out(Stream::Stdout, &data, events),
                    Kind::Stderr => out(Stream::Stderr, &data, events),
                    Kind::Exit => {
                        marks.exited = Some(Instant::now());
                        exit_code = Some(
                            data.get(..4)
                                .and_then(|b| b.try_into().ok())
                                .map(i32::from_le_bytes)
                                .unwrap_or(125),
                        );
                        break;
                    }
                    Kind::Started => {
                        started = true;
                        marks.started = Some(Instant::now());
                        deadline = spec.timeout.map(|t| Instant::now() + t);
                    }
                    Kind::Error => {
                        agent_error = Some(String::from_utf8_lossy(&data).into_owned());
                        break;
                    }
                    _ => {}
                }
            }
        }
        if sig_r {
            if let Some(s) = sigfd {
                while let Some(sig) = crate::sys::read_signalfd(s) {
                    if sig == libc::SIGWINCH {
                        let [rows, cols] = caller_winsize();
                        let size = [rows.to_le_bytes(), cols.to_le_bytes()].concat();
                        send(&mut stream, Kind::Resize, &size);
                    } else if stream.is_some() {
                        send(&mut stream, Kind::Signal, &sig.to_le_bytes());
                    } else {
                        // Before the command started: nothing to pass it to.
                        return Ok(End {
                            exit_code: 128 + sig,
                            timed_out: false,
                            killed: false,
                            marks,
                        });
                    }
                }
            }
        }
        if stdin_r {
            match rustix::io::read(&stdin, &mut buf) {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    send(&mut stream, Kind::StdinEof, b"");
                }
                Ok(n) => send(&mut stream, Kind::Stdin, &buf[..n]),
            }
        }
        if exited {
            qemu_gone = true;
        }
    }
    // The guest syncs and powers off after its last frame; a guest that
    // does not is stopped.
    let stop_by = Instant::now() + Duration::from_secs(3);
    let mut qemu = qemu;
    while Instant::now() < stop_by && !killed {
        if let Ok(Some(_)) = qemu.0.try_wait() {
            marks.stopped = Some(Instant::now());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Some(code) = exit_code {
        return Ok(End {
            exit_code: code,
            timed_out,
            killed,
            marks,
        });
    }
    if timed_out {
        return Ok(End {
            exit_code: 124,
            timed_out,
            killed: true,
            marks,
        });
    }
    if let Some(e) = agent_error {
        return Err(RunError::Vm(VmError::Agent(e)).into());
    }
    // Read what is left of the console and QEMU's error.
    let _ = qemu.0.kill();
    let status = qemu.0.wait();
    for (fd, into) in [(console_fd.take(), true), (qemu_err_fd.take(), false)] {
        if let Some(fd) = fd {
            while let Ok(n) = rustix::io::read(&fd, &mut buf) {
                if n == 0 {
                    break;
                }
                if into {
                    console.push(&buf[..n]);
                } else if qemu_err.len() < 1 << 16 {
                    qemu_err.extend_from_slice(&buf[..n]);
                }
            }
        }
    }
    let err_text = String::from_utf8_lossy(&qemu_err).to_ascii_lowercase();
    if probe.is_some() && !console.heard && err_text.contains("kvm") {
        return Err(Attempt::Silent(format!(
            "qemu exited before the guest spoke: {}",
            printable(err_text.lines().last().unwrap_or("").trim())
        )));
    }
    if console.panic_line.is_some() {
        return Err(RunError::Vm(VmError::GuestPanic {
            accel: vm.machine.accel.name(),
            console: console.tail(&qemu_err),
        })
        .into());
    }
    Err(RunError::Vm(VmError::Failed {
        accel: vm.machine.accel.name(),
        why: match status {
            Ok(s) => format!("qemu exited ({s}) before the command's exit status came"),
            Err(e) => format!("wait for qemu: {e}"),
        },
        console: console.tail(&qemu_err),
    })
    .into())
}
