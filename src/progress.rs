//! Progress and events: the library reports, the caller decides what to show.

use std::sync::Arc;

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

/// A progress callback. It is called from the importing thread only.
pub type ProgressFn = Arc<dyn Fn(&Event) + Send + Sync>;

pub(crate) fn emit(cb: &Option<ProgressFn>, e: Event) {
    // Every import step is also a debug event (kiln -vv, KILN_LOG=debug).
    if !matches!(e, Event::Progress { .. }) {
        tracing::debug!("import: {e:?}");
    }
    if let Some(cb) = cb {
        cb(&e);
    }
}
