//! Starting QEMU: the machine every kiln VM is (q35, direct kernel boot,
//! an initramfs, the serial console on stdout, QEMU's own seccomp
//! sandbox), and reading its console.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::accel::Accel;
use super::VmError;

/// `qemu-system-x86_64` on `PATH`.
pub(crate) fn find_qemu() -> Result<PathBuf, VmError> {
    crate::sys::find_tool("qemu-system-x86_64")
        .ok_or_else(|| VmError::NoQemu("qemu-system-x86_64".into()))
}

/// qboot, a firmware that does only what direct kernel boot needs (about
/// half a second less than SeaBIOS under TCG), when it is installed.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

/// What every kiln VM is.
pub(crate) struct Machine<'a> {
    /// The kernel file QEMU loads (a PVH `vmlinux` or a bzImage).
    pub kernel: &'a Path,
    /// The initramfs.
    pub initrd: &'a Path,
    /// The kernel command line after kiln's own words.
    pub append: &'a str,
    /// How the guest runs.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
}

impl Machine<'_> {
    /// The QEMU command for this machine; the caller adds its devices.
    /// The guest's serial console is QEMU's stdout; stdin is null.
    pub(crate) fn command(&self, qemu: &Path) -> Command {
        let mut cmd = Command::new(qemu);
        cmd.args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-machine", "q35", "-accel", self.accel.name()])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.max(1).to_string()]);
        if Path::new(QBOOT).exists() {
            cmd.args(["-bios", QBOOT]);
        }
        cmd.arg("-kernel")
            .arg(self.kernel)
            .arg("-initrd")
            .arg(self.initrd)
            .arg("-append")
            // The guest's crypto self-tests take a second under TCG and
            // test nothing kiln depends on.
            .arg(format!(
                "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init cryptomgr.notests kiln_agent=1 {}",
                self.append
            ))
            // QEMU's own seccomp filter: should a hostile guest take its
            // kernel over, an escape into QEMU still cannot spawn, gain
            // privileges or use obsolete system calls.
            .args([
                "-sandbox",
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            ])
            .args(["-serial", "stdio"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

/// A path as a QEMU option value (a comma is written twice).
pub(crate) fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// Text from the guest with control characters (terminal escapes) shown
/// as `\xNN`.
pub(crate) fn printable(s: &str) -> String {
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
pub(crate) const MAX_LINE: usize = 4096;

/// Console lines kept for an error.
const TAIL: usize = 30;

/// The guest console as it arrives: its last lines (each cut to
/// [`MAX_LINE`], `\r` dropped), whether the agent spoke
/// ([`super::agent::READY`]) and finished ([`super::agent::DONE`]), and
/// the kernel's panic line, kept whatever follows it.
#[derive(Default)]
pub(crate) struct Console {
    partial: Vec<u8>,
    lines: VecDeque<String>,
    /// The agent's first words came.
    pub heard: bool,
    /// The agent's last words came.
    pub done: bool,
    /// The kernel's `Kernel panic` line.
    pub panic_line: Option<String>,
}

impl Console {
    /// Adds bytes read from the console.
    pub(crate) fn push(&mut self, data: &[u8]) {
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let (body, ends) = match piece.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (piece, false),
            };
            let room = MAX_LINE.saturating_sub(self.partial.len());
            self.partial
                .extend_from_slice(&body[..body.len().min(room)]);
            if ends {
                let text = String::from_utf8_lossy(&self.partial)
                    .trim_end_matches('\r')
                    .to_string();
                self.partial.clear();
                self.line(text);
            }
        }
    }

    fn line(&mut self, text: String) {
        self.heard |= text.contains(super::agent::READY);
        self.done |= text.contains(super::agent::DONE);
        if self.panic_line.is_none() && text.contains("Kernel panic") {
            self.panic_line = Some(text.clone());
        }
        self.lines.push_back(text);
        if self.lines.len() > TAIL {
            self.lines.pop_front();
        }
    }

    /// The last lines (the panic line first if it scrolled out) and what
    /// QEMU said on stderr, control characters shown as `\xNN`.
    pub(crate) fn tail(&self, qemu_err: &[u8]) -> String {
        let mut t = self.lines.iter().cloned().collect::<Vec<_>>().join("\n");
        if let Some(p) = &self.panic_line {
            if !self.lines.contains(p) {
                t = format!("{p}\n...\n{t}");
            }
        }
        let err = String::from_utf8_lossy(qemu_err);
        if !err.trim().is_empty() {
            t.push_str("\nqemu: ");
            t.push_str(err.trim());
        }
        printable(&t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_cut_and_split() {
        let mut input = b"one\r\ntwo\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
        input.extend_from_slice(b"\nlast\n");
        let mut c = Console::default();
        // In pieces, as reads return them.
        for piece in input.chunks(1000) {
            c.push(piece);
        }
        let lines: Vec<String> = c.lines.iter().cloned().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "one");
        assert_eq!(lines[1], "two");
        assert_eq!(lines[2].len(), MAX_LINE);
        assert_eq!(lines[3], "last");
    }
}
