//! Garbage collection, composed above the store: the store's own blobs and
//! temp files, the unpacked-image cache, and the run directories of dead
//! sandboxes, under one exclusive lock.

use crate::store::{GcReport, Store, StoreError};

impl Store {
    /// Deletes blobs no tag (and no running sandbox) reaches, stale temp
    /// files, cached root file systems of removed images and incomplete
    /// cache entries, and the run directories of dead runs (with the
    /// changes kept after a failed commit).
    ///
    /// Takes the writer lock exclusively, so it waits for running imports and
    /// commits (which hold it shared) and they wait for it.
    ///
    /// ```no_run
    /// let store = kiln::Store::open(kiln::Store::default_path()?)?;
    /// let report = store.gc()?;
    /// println!("freed {} bytes", report.bytes_freed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _x = self.gc_lock()?;
        let mut report = self.gc_blobs()?;
        report.rootfs_removed = self.gc_rootfs()?;
        report.runs_removed =
            crate::sandbox::reap_dead_runs(&self.root().join(".kiln/runs"), None, true);
        Ok(report)
    }
}
