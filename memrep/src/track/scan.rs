//! The scan tracker: hash every page, report those whose hash differs from the table.

use std::time::Instant;

use roaring::RoaringTreemap;

use super::{CollectStats, TrackError, Tracker, TrackerKind};
use crate::digest::{default_threads, page_hash, split, zero_hash, PageTable};
use crate::region::Region;
use crate::PAGE_SIZE;

/// Hashes every page in parallel (`threads` workers) and compares with the table. Holes of a
/// sparse backing file (`SEEK_HOLE`) read as zeros and are compared with the zero-page hash
/// without touching them, so a sparse region is not populated by scanning.
#[derive(Debug)]
pub struct ScanTracker {
    threads: usize,
}

impl ScanTracker {
    /// A tracker with `threads` workers (0: the machine's available parallelism).
    pub fn new(threads: usize) -> ScanTracker {
        ScanTracker {
            threads: if threads == 0 {
                default_threads()
            } else {
                threads
            },
        }
    }
}

impl Default for ScanTracker {
    fn default() -> Self {
        ScanTracker::new(0)
    }
}

impl Tracker for ScanTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Scan
    }

    fn collect(
        &mut self,
        region: &Region,
        table: &PageTable,
        out: &mut RoaringTreemap,
    ) -> Result<CollectStats, TrackError> {
        let t0 = Instant::now();
        if table.len() != region.pages() {
            return Err(TrackError::Mismatch(format!(
                "table has {} pages, region {} has {}",
                table.len(),
                region.path().display(),
                region.pages()
            )));
        }
        region.check()?;
        // Pages known to hold data; the rest are holes (zeros). The hole list is taken before
        // hashing: a hole that fills afterwards is written after this collect began and is seen
        // by the next one.
        let data = region.data_pages();
        let zh = zero_hash();
        let mut found: Vec<u64> = Vec::new();
        let mut prev = 0u64;
        for r in &data {
            found.extend((prev..r.start).filter(|&i| table.get(i) != zh));
            prev = r.end;
        }
        found.extend((prev..region.pages()).filter(|&i| table.get(i) != zh));

        let total: u64 = data.iter().map(|r| r.end - r.start).sum();
        let parts = split(total, self.threads);
        let data = &data;
        let results: Vec<Vec<u64>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    s.spawn(move || {
                        let mut changed = Vec::new();
                        let mut buf = Box::new([0u8; PAGE_SIZE]);
                        // Walk the data ranges, skipping to the part's share of data pages.
                        let mut seen = 0u64;
                        for r in data {
                            let n = r.end - r.start;
                            let lo = part.start.max(seen);
                            let hi = part.end.min(seen + n);
                            if lo < hi {
                                for i in r.start + (lo - seen)..r.start + (hi - seen) {
                                    region.load_page(i, &mut buf);
                                    if page_hash(&buf[..]) != table.get(i) {
                                        changed.push(i);
                                    }
                                }
                            }
                            seen += n;
                            if seen >= part.end {
                                break;
                            }
                        }
                        changed
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("scan worker panicked"))
                .collect()
        });
        let mut pages = 0;
        for i in found.into_iter().chain(results.into_iter().flatten()) {
            pages += u64::from(out.insert(i));
        }
        Ok(CollectStats {
            pages,
            elapsed: t0.elapsed(),
        })
    }
}
