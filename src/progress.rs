//! Progress and events: the library reports, the caller decides what to show.

use std::cell::RefCell;

/// Something that happened during a long operation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The source was recognized.
    Detected {
        /// What it is, e.g. `tarball (gzip)`, `directory`, `docker-archive`.
        kind: String,
        /// Size of the outermost input in bytes, when known.
        total: Option<u64>,
    },
    /// Bytes of the outermost input consumed so far.
    Progress {
        /// Bytes read.
        done: u64,
        /// Total, when known.
        total: Option<u64>,
    },
    /// A disk-image source's detected chain, outermost first, e.g.
    /// `iso9660 "DDK" ▸ chunks (457 × gzip) ▸ vhd dynamic ▸ mbr p1 ▸ ext4`.
    DiskChain(String),
    /// A non-fatal oddity worth telling the user about.
    Warning(String),
    /// A slow step begins, e.g. booting a VM to read a file system.
    Step(String),
    /// A layer blob was written.
    LayerWritten {
        /// Its digest.
        digest: String,
        /// Its compressed size.
        size: u64,
    },
}

/// Where a long operation's events go: the caller's callback (the one
/// style of the library: `Store::import_with_events` and
/// `Sandbox::run_with_events` both take `&mut dyn FnMut(EVENT)`), or
/// nowhere. Called from the operation's own thread only.
pub(crate) struct Events<'a>(Option<RefCell<&'a mut dyn FnMut(Event)>>);

impl<'a> Events<'a> {
    /// Events nobody takes (they are still debug traces).
    pub(crate) fn none() -> Events<'a> {
        Events(None)
    }

    /// Events for `f`.
    pub(crate) fn to(f: &'a mut dyn FnMut(Event)) -> Events<'a> {
        Events(Some(RefCell::new(f)))
    }

    /// Hands `e` to the caller; every step but byte counts is also a debug
    /// event (kiln -vv, KILN_LOG=debug).
    pub(crate) fn emit(&self, e: Event) {
        if !matches!(e, Event::Progress { .. }) {
            tracing::debug!("import: {e:?}");
        }
        if let Some(f) = &self.0 {
            // An event handler that starts another import on this thread
            // would find the cell taken: its events are dropped, not a panic.
            if let Ok(mut f) = f.try_borrow_mut() {
                f(e);
            }
        }
    }
}

/// `bytes` with a binary unit, for messages: `512 B`, `4 KiB`, `626 MiB`,
/// `1.5 GiB` (one decimal unless the size is a whole number of the unit).
///
/// ```
/// assert_eq!(kiln::progress::human_bytes(626 << 20), "626 MiB");
/// assert_eq!(kiln::progress::human_bytes(3 << 29), "1.5 GiB");
/// ```
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 2)) > 0 {
        unit += 1;
    }
    let scale = 1u64 << (10 * (unit + 1));
    if bytes.is_multiple_of(scale) {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.1} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1024), "1 KiB");
        assert_eq!(human_bytes(626 << 20), "626 MiB");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
