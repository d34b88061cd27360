//! Dirty tracking: which pages of a region may have changed since the previous collect.
//!
//! Two backends implement [`Tracker`]:
//!
//! - [`uffd::UffdTracker`]: the region is registered with a userfaultfd in asynchronous
//!   write-protect mode (`UFFD_FEATURE_WP_ASYNC`): the kernel resolves write faults itself and
//!   marks the page table entry written. `PAGEMAP_SCAN` with `PM_SCAN_WP_MATCHING` reports the
//!   written pages and write-protects them again in the same walk (under the page table lock), so
//!   a write after the scan is caught by the next one. Cost follows the pages written.
//! - [`scan::ScanTracker`]: hashes every page and compares with the table. No kernel support
//!   needed; cost follows the region size (holes of sparse files are skipped).
//! - [`softdirty::SoftDirtyTracker`]: the soft-dirty bits of another process's mapping of the
//!   region (QEMU's guest RAM), read from its pagemap and cleared only while it is stopped.
//!   Cost follows the pages written.
//!
//! The loop a caller runs (pre-send while the writer runs, then a final pass in the pause):
//!
//! ```text
//! loop { out.clear(); tracker.collect(&region, &table, &mut out)?;
//!        for i in out { region.read_page(i, &mut buf); table.set(i, page_hash(&buf)); send(i, buf) } }
//! ```

use std::fmt;
use std::time::Duration;

use roaring::RoaringTreemap;

use crate::digest::PageTable;
use crate::region::Region;

pub mod scan;
pub mod softdirty;
pub mod uffd;

#[cfg(test)]
mod tests;

/// Which tracking backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerKind {
    Uffd,
    Scan,
    SoftDirty,
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrackerKind::Uffd => "uffd",
            TrackerKind::Scan => "scan",
            TrackerKind::SoftDirty => "soft-dirty",
        })
    }
}

/// What one collect did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CollectStats {
    /// Pages added to the output set.
    pub pages: u64,
    /// Wall time of the collect.
    pub elapsed: Duration,
}

/// Why tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    /// The kernel lacks something the backend needs (the text says what).
    #[error("tracking unsupported: {0}")]
    Unsupported(String),
    /// The writer process whose memory is tracked has exited.
    #[error("the writer process is gone (pid {pid})")]
    WriterGone { pid: u32 },
    /// A syscall failed.
    #[error("{what}: {source}")]
    Sys {
        what: &'static str,
        source: std::io::Error,
    },
    /// The region and the table (or the tracked range) do not agree.
    #[error("mismatch: {0}")]
    Mismatch(String),
    /// The backing file changed under the region.
    #[error(transparent)]
    Region(#[from] crate::region::RegionError),
}

/// A dirty-page tracker.
pub trait Tracker: Send + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> TrackerKind;

    /// Add to `out` every page that may differ from `table` because it was written since the
    /// previous collect (uffd: pages reported written by `PAGEMAP_SCAN`, which write-protects
    /// them again in the same call; scan: pages whose current hash differs from `table`).
    ///
    /// Contract: after collect returns, the caller reads the content of the reported pages and
    /// stores their hashes into `table`; any write that lands after a page's content was read is
    /// reported by a later collect. No write is ever missed.
    fn collect(
        &mut self,
        region: &Region,
        table: &PageTable,
        out: &mut RoaringTreemap,
    ) -> Result<CollectStats, TrackError>;

    /// [`Tracker::collect`] while every writer is stopped (the checkpoint's cut): a tracker
    /// that can only reset its state safely when nothing writes does it here.
    fn collect_paused(
        &mut self,
        region: &Region,
        table: &PageTable,
        out: &mut RoaringTreemap,
    ) -> Result<CollectStats, TrackError> {
        self.collect(region, table, out)
    }
}

/// Is uffd asynchronous write-protect + `PAGEMAP_SCAN` usable here? `Ok` or the reason why not
/// (e.g. "kernel lacks UFFD_FEATURE_WP_ASYNC"). Runs a real registration over a small private
/// shared-memory file, a write, and a scan.
pub fn probe_uffd() -> Result<(), String> {
    uffd::probe().map_err(|e| e.to_string())
}
