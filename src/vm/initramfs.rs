//! The guest's initramfs: kiln's static binary as `/init` (the guest
//! agent), `/dev/console`, and the kernel modules a job needs with the
//! order to load them in. A run's initramfs is cached by what it is made
//! of, so a VM run after the first writes nothing.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::cache::{key_name, made_once, stamp};
use super::cpio;
use super::kernel::Kernel;
use super::{io_err, VmError};

/// Why `elf` cannot be the guest's /init: `None` for a statically linked
/// ELF executable (no `PT_INTERP` program header).
pub(crate) fn not_static(elf: &[u8]) -> Option<&'static str> {
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

/// The guest agent's bytes: kiln's entry-point binary (this program when it
/// is kiln or routes kiln's entry points, else the kiln it names). A program
/// that does not would run its own main() as PID 1 and stay silent until
/// the timeout; a dynamic one finds no loader in the initramfs.
fn agent() -> Result<(PathBuf, Vec<u8>), VmError> {
    let me = crate::sys::helper_exe(None);
    let agent = fs::read(&me).map_err(io_err("read the guest agent", &me))?;
    if let Some(why) = not_static(&agent) {
        return Err(VmError::Agent(format!(
            "start: the guest agent {} {why}; the initramfs has no dynamic loader: use a statically linked kiln (KILN_HELPER=PATH) or link this program with -C target-feature=+crt-static",
            me.display()
        )));
    }
    Ok((me, agent))
}

/// Writes an initramfs with the agent, `/dev/console`, and `modules` (by
/// name, with their dependencies) to `out`.
pub(crate) fn write(kernel: &Kernel, modules: &[&str], out: &Path) -> Result<(), VmError> {
    let (_, agent) = agent()?;
    let mods = kernel.modules_for(modules)?;
    let f = fs::File::create(out).map_err(io_err("create", out))?;
    let mut c = cpio::Cpio::new(io::BufWriter::new(f));
    let w = |r: io::Result<()>| r.map_err(io_err("write", out));
    for d in [
        "dev", "proc", "sys", "mnt", "modules", "lower", "rw", "root",
    ] {
        w(c.dir(d))?;
    }
    w(c.char_dev("dev/console", 5, 1))?;
    w(c.file("init", 0o755, &agent))?;
    let mut order = String::new();
    for (i, m) in mods.iter().enumerate() {
        let data = super::kernel::without_signature(kernel.read_module(m)?);
        let name = format!("modules/{i:03}.ko");
        w(c.file(&name, 0o644, &data))?;
        order.push_str(&format!("/{name} {m}\n"));
    }
    w(c.file("modules/order", 0o644, order.as_bytes()))?;
    let mut inner = c.finish().map_err(io_err("write", out))?;
    inner.flush().map_err(io_err("write", out))?;
    Ok(())
}

/// An initramfs for `kernel` and `modules` in `cache`, written once: its
/// name is the digest of what goes in (the agent binary's identity and
/// size, the kernel's module tree, the module names).
pub(crate) fn cached(kernel: &Kernel, modules: &[&str], cache: &Path) -> Result<PathBuf, VmError> {
    let me = crate::sys::helper_exe(None);
    let name = key_name(&format!(
        "v2\n{}\n{}\n{}\n{}\n{}",
        me.display(),
        stamp(&me),
        kernel.modules.display(),
        stamp(&kernel.modules.join("modules.dep")),
        modules.join(",")
    ));
    let path = cache.join(format!("initrd-{name}.cpio"));
    if path.exists() {
        return Ok(path);
    }
    made_once(&path, |tmp| write(kernel, modules, tmp))?;
    prune(cache, KEEP);
    Ok(path)
}

/// Initramfs images a cache keeps (each kiln build makes its own).
const KEEP: usize = 8;

/// Removes all but the `keep` newest `initrd-*.cpio` of `cache`.
fn prune(cache: &Path, keep: usize) {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("initrd-") && n.ends_with(".cpio")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    let extra = found.len().saturating_sub(keep);
    for (_, p) in found.into_iter().take(extra) {
        let _ = fs::remove_file(p);
    }
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
}
