//! Choosing the accelerator: KVM only when it really works. `/dev/kvm`
//! opening is not enough (on some hosts guests hang), so the first VM of a
//! host runs with KVM and a deadline for the agent's first words; if they
//! do not come, TCG is used from then on and the verdict is kept per host
//! kernel. `KILN_VM_ACCEL=kvm|tcg` forces a choice.

use std::fs;
use std::path::{Path, PathBuf};

/// How guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's emulator.
    Tcg,
}

impl Accel {
    /// The name QEMU's `-accel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

pub(crate) fn kvm_usable() -> bool {
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

/// Where the KVM verdict is kept when [`super::VmOptions::accel_state`] is empty:
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
pub(crate) fn choose_accel(state: &Path) -> (Accel, bool) {
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

/// Why /dev/kvm is there but not for this user (`None`: it opens, or the
/// host has no KVM at all).
pub(crate) fn kvm_denied() -> Option<String> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Some(format!(
            "/dev/kvm: {e} (add the user to group kvm for hardware virtualization)"
        )),
        _ => None,
    }
}

/// Says once per host kernel that /dev/kvm is not this user's: true the
/// first time (the caller warns), false after.
pub(crate) fn first_denial(state: &Path) -> bool {
    let kept = fs::read_to_string(state).unwrap_or_default();
    if kept.trim_end() == format!("denied {}", host_release()) {
        return false;
    }
    if let Some(dir) = state.parent() {
        let _ = fs::create_dir_all(dir);
    }
    // Not a verdict: once the user may open /dev/kvm, KVM is probed.
    let _ = fs::write(state, format!("denied {}\n", host_release()));
    true
}

pub(crate) fn keep_verdict(state: &Path, accel: Accel) {
    if let Some(dir) = state.parent() {
        let _ = fs::create_dir_all(dir);
    }
    let _ = fs::write(state, format!("{} {}\n", accel.name(), host_release()));
}
