//! The guest agent: kiln running as `/init` (PID 1) of a VM's initramfs.
//!
//! It mounts /dev, /proc and /sys, loads the modules listed in
//! `/modules/order`, and does the job the kernel command line names
//! (`kiln_job=`): `export` (`export.rs`, for `kiln import --via-vm`) or
//! `run` (`run.rs`, for `kiln run --vm`). Then it syncs and powers the VM
//! off. Progress and errors of the export go to the console; a run speaks
//! on its own channel (`super::channel`).

mod export;
mod run;

use std::fs;
use std::io::{self, Write};
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
    // The kernel passes unknown `key=value` words of its command line to
    // init as environment variables.
    match std::env::var("kiln_job").as_deref() {
        Ok("run") => run::main(),
        _ => export::main(),
    }
    power_off()
}

/// /dev, /proc and /sys of the initramfs.
fn base_mounts() -> Result<(), String> {
    let mnt = |src: &str, target: &str, fstype: &str| {
        m::mount(src, target, fstype, MountFlags::empty(), None)
            .map_err(|e| format!("mount {fstype} on {target}: {e}"))
    };
    mnt("devtmpfs", "/dev", "devtmpfs")?;
    mnt("proc", "/proc", "proc")?;
    mnt("sysfs", "/sys", "sysfs")
}

/// Loads the modules of `/modules/order`, in order. A module for hardware
/// the guest lacks refuses to load; what needs it says so later.
fn load_modules() {
    let order = fs::read_to_string("/modules/order").unwrap_or_default();
    for line in order.lines() {
        let (file, name) = line.split_once(' ').unwrap_or((line, line));
        let f = match fs::File::open(file) {
            Ok(f) => f,
            Err(e) => {
                say(&format!("kiln-agent: module {name}: {e}"));
                continue;
            }
        };
        match rustix::system::finit_module(&f, c"", 0) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => say(&format!("kiln-agent: module {name}: {e}")),
        }
    }
}

/// The value of `key=` on the kernel command line.
fn cmdline_value(key: &str) -> Result<String, String> {
    let cmdline =
        fs::read_to_string("/proc/cmdline").map_err(|e| format!("read /proc/cmdline: {e}"))?;
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .ok_or_else(|| format!("find {key}= on the kernel command line"))
}

/// Waits for a device the kernel is still probing.
fn wait_for(path: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(format!(
                "find {} (no virtio device appeared)",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
