//! The primary half's state: what is unsent, what was sent in which epoch, the digest table,
//! and reading pages into PAGES messages.

use super::*;

#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) cuts: u64,
    pub(super) zero_pages_sent: u64,
    pub(super) bytes_sent: u64,
    pub(super) presend_pages: u64,
    pub(super) cut_pages: u64,
    /// Pages resent at the start of a session because the secondary lacked them.
    pub(super) resync_pages: u64,
    pub(super) sessions: u64,
    pub(super) collect_us: u64,
    pub(super) last_error: Option<String>,
}

pub(super) struct State {
    pub(super) tracker: Box<dyn Tracker>,
    /// Why this tracker runs.
    pub(super) tracker_note: String,
    pub(super) table: PageTable,
    pub(super) unsent: RoaringTreemap,
    /// The part of `unsent` that was collected as written and not read since: the table
    /// does not describe it.
    pub(super) stale: RoaringTreemap,
    /// The part of `unsent` that a session start found the secondary lacking (a resync):
    /// checkpoints wait while it is large. Pages written between checkpoints never hold a
    /// checkpoint back; the pause copies them, however many.
    pub(super) resync: RoaringTreemap,
    /// The epoch pages read now belong to.
    pub(super) epoch: u64,
    pub(super) committed: u64,
    pub(super) seq: u64,
    /// Pages sent per uncommitted epoch.
    pub(super) sent_in: BTreeMap<u64, RoaringTreemap>,
    /// Pages and data bytes sent per uncommitted epoch.
    pub(super) items: BTreeMap<u64, (u64, u64)>,
    /// The pause's copy of epoch n and the region's digest at the cut, waiting for
    /// prepare(n).
    pub(super) batches: BTreeMap<u64, (Vec<Batch>, u64)>,
    /// Pre-send messages in flight per epoch.
    pub(super) inflight: BTreeMap<u64, u64>,
    pub(super) channel: Option<Arc<dyn PeerChannel>>,
    /// Bumped at every session start and abort: a pre-send of an older one stops.
    pub(super) session: u64,
    pub(super) pause: Latencies,
    pub(super) counters: Counters,
}

/// What one read of pages produced.
pub(super) struct Batch {
    pub(super) message: Vec<u8>,
    pub(super) pages: u64,
    pub(super) data_pages: u64,
}

impl State {
    /// Collect dirty pages into `unsent` (`paused`: in the cut, every writer stopped); a
    /// writer that is gone ends uffd or soft-dirty tracking for scan.
    pub(super) fn collect(&mut self, region: &Region, paused: bool) -> Result<u64, TrackError> {
        let mut out = RoaringTreemap::new();
        let r = if paused {
            self.tracker.collect_paused(region, &self.table, &mut out)
        } else {
            self.tracker.collect(region, &self.table, &mut out)
        };
        let stats = match r {
            Ok(s) => s,
            Err(TrackError::WriterGone { pid }) => {
                self.tracker = Box::new(ScanTracker::new(default_threads()));
                self.tracker_note = format!("scan: the writer (pid {pid}) is gone");
                tracing::warn!(region = %region.path().display(), "{}", self.tracker_note);
                self.tracker.collect(region, &self.table, &mut out)?
            }
            Err(e) => return Err(e),
        };
        self.counters.collect_us = stats.elapsed.as_micros() as u64;
        let n = out.len();
        self.stale |= &out;
        self.unsent |= out;
        Ok(n)
    }

    /// Read up to `max` unsent pages (all of them with None) into PAGES messages of the
    /// current epoch, updating the digest table.
    pub(super) fn read_unsent(&mut self, region: &Region, max: Option<u64>) -> Vec<Batch> {
        let take: Vec<u64> = match max {
            Some(m) => self.unsent.iter().take(m as usize).collect(),
            None => self.unsent.iter().collect(),
        };
        let epoch = self.epoch;
        let mut out = Vec::new();
        let mut b = PagesBuilder::new(epoch);
        let mut page = Box::new([0u8; PAGE_SIZE]);
        let sent = self.sent_in.entry(epoch).or_default();
        for &p in &take {
            region.load_page(p, &mut page);
            self.seq += 1;
            let d = if is_zero(&page[..]) {
                b.push(p, self.seq, None);
                zero_hash()
            } else {
                b.push(p, self.seq, Some(&page));
                page_hash(&page[..])
            };
            self.table.set(p, d);
            sent.insert(p);
            self.unsent.remove(p);
            self.stale.remove(p);
            self.resync.remove(p);
            if b.len() == MAX_BATCH_PAGES {
                let full = std::mem::replace(&mut b, PagesBuilder::new(epoch));
                out.push(finish(full));
            }
        }
        if !b.is_empty() {
            out.push(finish(b));
        }
        let it = self.items.entry(epoch).or_default();
        for m in &out {
            it.0 += m.pages;
            it.1 += m.data_pages * PAGE_SIZE as u64;
        }
        out
    }

    /// Everything sent in uncommitted epochs must be sent again (a new session, an abort).
    pub(super) fn requeue_uncommitted(&mut self) {
        for (_, pages) in std::mem::take(&mut self.sent_in) {
            self.unsent |= pages;
        }
        self.items.clear();
        self.batches.clear();
        self.inflight.clear();
    }
}

pub(super) fn finish(b: PagesBuilder) -> Batch {
    let pages = b.len() as u64;
    let data_pages = b.data_pages();
    Batch {
        message: b.finish(),
        pages,
        data_pages,
    }
}
