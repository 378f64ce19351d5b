//! The pseudo-terminal of `kiln run -t`: kiln owns the master end and relays
//! it; the slave end becomes the command's stdin, stdout, stderr and
//! controlling terminal.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::process::Stdio;

use rustix::fs::{Mode, OFlags};
use rustix::pty::OpenptFlags;
use rustix::termios::{self, OptionalActions, Termios};

use super::RunError;

/// A pty pair; the slave is opened once per use ([`Pty::slave`]).
pub(crate) struct Pty {
    pub master: OwnedFd,
    name: CString,
}

impl Pty {
    /// A new pty with the caller's window size (when stdout is a terminal).
    pub fn open() -> io::Result<Pty> {
        let master =
            rustix::pty::openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)?;
        rustix::pty::grantpt(&master)?;
        rustix::pty::unlockpt(&master)?;
        let name = rustix::pty::ptsname(&master, Vec::new())?;
        let pty = Pty { master, name };
        pty.resize();
        Ok(pty)
    }

    /// The slave's path (`/dev/pts/N` of the caller's devpts).
    pub fn path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(std::ffi::OsStr::from_bytes(self.name.as_bytes()))
    }

    /// The slave end, as a child's stdio.
    pub fn slave(&self) -> Result<Stdio, RunError> {
        Ok(Stdio::from(self.slave_fd()?))
    }

    /// The slave end (close-on-exec).
    pub fn slave_fd(&self) -> Result<OwnedFd, RunError> {
        rustix::fs::open(
            self.name.as_c_str(),
            OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| RunError::host("open the pty slave", e.into()))
    }

    /// Copies the caller's terminal size to the pty (on start and SIGWINCH).
    pub fn resize(&self) {
        for fd in [io::stdout().as_fd(), io::stdin().as_fd()] {
            if let Ok(ws) = termios::tcgetwinsize(fd) {
                let _ = termios::tcsetwinsize(&self.master, ws);
                return;
            }
        }
    }

    /// Reads what the command wrote; `None` once the slave is closed.
    pub fn read(&self, buf: &mut [u8]) -> Option<usize> {
        loop {
            match rustix::io::read(&self.master, &mut *buf) {
                Ok(0) => return None,
                Ok(n) => return Some(n),
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => return Some(0),
                // EIO: every slave fd is closed (the sandbox is gone).
                Err(_) => return None,
            }
        }
    }

    /// Writes what the pty takes now (the master is non-blocking); returns
    /// how many bytes were taken. A closed pty takes (drops) everything.
    pub fn write_some(&self, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            match rustix::io::write(&self.master, &data[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => return data.len(),
            }
        }
        done
    }
}

/// The caller's terminal in raw mode (so keys like ^C reach the command's
/// terminal), restored on drop.
pub(crate) struct RawMode(Option<Termios>);

impl RawMode {
    /// Raw mode for stdin, if it is a terminal.
    pub fn enter() -> RawMode {
        let stdin = io::stdin();
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return RawMode(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if termios::tcsetattr(&stdin, OptionalActions::Now, &raw).is_err() {
            return RawMode(None);
        }
        RawMode(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            let _ = termios::tcsetattr(io::stdin(), OptionalActions::Now, t);
            let _ = io::stdout().flush();
        }
    }
}
