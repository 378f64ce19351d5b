//! Signals kiln forwards to a run's command (SIGINT, SIGTERM, SIGHUP,
//! SIGQUIT, and SIGWINCH with a pty): blocked in the calling thread for
//! the run and read from a signalfd, the caller's mask restored when the
//! run ends, however it ends. Shared by every backend.

use std::os::fd::OwnedFd;

use super::RunError;

/// The signals every backend forwards.
pub(crate) const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Forwarded signals, blocked while this lives.
pub(crate) struct Forwarding {
    /// Where they arrive (`None`: the spec does not forward signals).
    pub fd: Option<OwnedFd>,
    /// What this blocked (what the caller had blocked already stays).
    ours: Vec<i32>,
}

impl Forwarding {
    /// Blocks `sigs` and opens a signalfd for them when `enabled`.
    pub(crate) fn start(sigs: &[i32], enabled: bool) -> Result<Forwarding, RunError> {
        if !enabled {
            return Ok(Forwarding {
                fd: None,
                ours: Vec::new(),
            });
        }
        // Restored afterwards to what the caller (an embedder) had.
        let already = crate::sys::blocked_of(sigs).unwrap_or_default();
        crate::sys::sigmask(sigs, true).map_err(|e| RunError::host("block signals", e))?;
        let ours = sigs
            .iter()
            .copied()
            .filter(|s| !already.contains(s))
            .collect();
        // From here the guard unblocks them again should signalfd fail.
        let mut guard = Forwarding { fd: None, ours };
        guard.fd = Some(crate::sys::signalfd(sigs).map_err(|e| RunError::host("signalfd", e))?);
        Ok(guard)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        if !self.ours.is_empty() {
            let _ = crate::sys::sigmask(&self.ours, false);
        }
    }
}
