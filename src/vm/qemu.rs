//! Starting QEMU: the machine every kiln VM is (q35, direct kernel boot,
//! an initramfs, the serial console on stdout, QEMU's own seccomp
//! sandbox), and reading its console.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

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

/// Sends the console's lines, each cut to [`MAX_LINE`] bytes, until end
/// of file or until nobody listens.
pub(crate) fn console_lines(r: impl Read, tx: &mpsc::Sender<String>) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
