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

pub(crate) mod accel;
pub(crate) mod agent;
pub(crate) mod cache;
pub(crate) mod channel;
mod cpio;
mod export;
pub(crate) mod initramfs;
mod kernel;
pub(crate) mod qemu;

pub use accel::{default_accel_state, Accel};
pub use export::{export_tree, FILE_SYSTEMS};
pub use kernel::Kernel;

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// The guest's kernel panicked (kiln run: exit code
    /// [`GUEST_PANIC_EXIT`]).
    #[error("vm: the guest kernel panicked ({accel}); its console said:\n{console}")]
    GuestPanic {
        /// kvm or tcg.
        accel: &'static str,
        /// The last lines of the guest console.
        console: String,
    },
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

/// The exit code of a run whose guest kernel panicked: neither a code of
/// the command nor kiln's own 125.
pub const GUEST_PANIC_EXIT: i32 = 123;

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        step,
        path: path.display().to_string(),
        source,
    }
}

/// Where a VM's work files go and how long it may take.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// A private directory for the VM's files (removed by the caller).
    /// Empty: a store import puts it in the store's temp directory.
    pub work: PathBuf,
    /// Where kernels unpacked for PVH boot and initramfs images are kept
    /// between VMs (a store import uses the store's `.kiln/vm`). Empty:
    /// `work`, for this VM only.
    pub cache: PathBuf,
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
            cache: PathBuf::new(),
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
