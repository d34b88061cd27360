//! A region's primary half: the epoch participant that brings a shared-memory region to the
//! secondary at every checkpoint.
//!
//! ```text
//!  connected(channel, e) ─▶ HELLO (sizes) ─▶ DIGESTS: pages that differ from the secondary's
//!                           committed region, plus pages of uncommitted epochs ─▶ unsent
//!  pre-send (between checkpoints, guest running):
//!      collect dirty pages ─▶ unsent; read a batch of unsent pages (they are write-protected
//!      again first, so a later write shows up at the next collect) ─▶ PAGES(current epoch)
//!  ready()   ─▶ refuse a checkpoint while more than `ready_pages` are unsent (a resync)
//!  cut(n)    ─▶ guest paused: collect, copy every unsent page ─▶ the batch of epoch n
//!  prepare(n)─▶ wait for pre-sends of n, send the batch; summary: pages, bytes, region digest
//!  commit(n) ─▶ forget the pages sent for n;  abort(n) ─▶ they are unsent again
//! ```
//!
//! Invariant: every page either holds on the secondary (committed or staged) what the region
//! holds now, or is in `unsent`, or was written since the last collect (the tracker reports it
//! next). The digest table holds, for every page, the hash of the content last read for
//! sending, so the region's digest at a cut is the table's fold, at no extra cost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use blkrep::epoch::{
    BoxFuture, CheckpointTrigger, Epoch, EpochError, EpochSummary, Latencies, Participant,
    PeerChannel,
};
use roaring::RoaringTreemap;
use serde_json::json;

use crate::digest::{default_threads, is_zero, page_hash, zero_hash, PageTable};
use crate::region::Region;
use crate::track::scan::ScanTracker;
use crate::track::{TrackError, Tracker, TrackerKind};
use crate::wire::{self, PagesBuilder, MAX_BATCH_PAGES, MAX_DIGESTS};
use crate::PAGE_SIZE;

/// Pages one pre-send step reads (while it holds the state a cut needs): 1 MiB.
const PRESEND_BATCH: u64 = 256;
/// How long prepare waits for the pre-sends of its epoch to be answered.
const PREPARE_PATIENCE: Duration = Duration::from_secs(30);
/// Pre-send messages in flight at once, and the pause copy's messages in flight in prepare.
const PRESEND_WINDOW: usize = 4;

/// Settings of a region's primary half.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// Participant id, shared with the secondary half (see [`participant_id`]).
    pub id: u16,
    /// Name in logs and status.
    pub name: String,
    /// How often the pre-send collects dirty pages between checkpoints (None: never; every
    /// dirty page then waits for the pause).
    pub presend: Option<Duration>,
    /// A checkpoint is refused while more pages than this, found lacking on the secondary
    /// when a session started, wait to be sent (a resync): the pause would copy them all.
    pub ready_pages: u64,
}

/// The participant id of memory region `index` (0-based) of a node.
pub fn participant_id(index: usize) -> u16 {
    16 + index as u16
}

impl MemoryOptions {
    /// Defaults for region `index`: pre-send every 10 ms, checkpoints wait while more than
    /// 64 MiB are unsent.
    pub fn for_region(index: usize) -> MemoryOptions {
        MemoryOptions {
            id: participant_id(index),
            name: format!("memory{index}"),
            presend: Some(Duration::from_millis(10)),
            ready_pages: (64 << 20) / PAGE_SIZE as u64,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    cuts: u64,
    zero_pages_sent: u64,
    bytes_sent: u64,
    presend_pages: u64,
    cut_pages: u64,
    /// Pages resent at the start of a session because the secondary lacked them.
    resync_pages: u64,
    sessions: u64,
    collect_us: u64,
    last_error: Option<String>,
}

struct State {
    tracker: Box<dyn Tracker>,
    /// Why this tracker runs.
    tracker_note: String,
    table: PageTable,
    unsent: RoaringTreemap,
    /// The part of `unsent` that was collected as written and not read since: the table
    /// does not describe it.
    stale: RoaringTreemap,
    /// The part of `unsent` that a session start found the secondary lacking (a resync):
    /// checkpoints wait while it is large. Pages written between checkpoints never hold a
    /// checkpoint back; the pause copies them, however many.
    resync: RoaringTreemap,
    /// The epoch pages read now belong to.
    epoch: u64,
    committed: u64,
    seq: u64,
    /// Pages sent per uncommitted epoch.
    sent_in: BTreeMap<u64, RoaringTreemap>,
    /// Pages and data bytes sent per uncommitted epoch.
    items: BTreeMap<u64, (u64, u64)>,
    /// The pause's copy of epoch n and the region's digest at the cut, waiting for
    /// prepare(n).
    batches: BTreeMap<u64, (Vec<Batch>, u64)>,
    /// Pre-send messages in flight per epoch.
    inflight: BTreeMap<u64, u64>,
    channel: Option<Arc<dyn PeerChannel>>,
    /// Bumped at every session start and abort: a pre-send of an older one stops.
    session: u64,
    pause: Latencies,
    counters: Counters,
}

struct Shared {
    opts: MemoryOptions,
    region: Arc<Region>,
    st: Mutex<State>,
    changed: tokio::sync::Notify,
    trigger: OnceLock<CheckpointTrigger>,
    /// A cut wants the state: the pre-send stands back, so the pause never waits for it.
    cutting: AtomicBool,
    /// A pre-send collect holds the state (a scan can take long).
    long_hold: AtomicBool,
    /// The last status report, for requests that come during a cut or a long collect.
    last_status: Mutex<(Instant, serde_json::Value)>,
}

/// The oldest report status gives instead of waiting for a cut or a long collect.
const STATUS_STALE: Duration = Duration::from_millis(500);

/// Raises a flag for as long as it lives.
struct Raised<'a>(&'a AtomicBool);

impl<'a> Raised<'a> {
    fn new(flag: &'a AtomicBool) -> Raised<'a> {
        flag.store(true, Ordering::Release);
        Raised(flag)
    }
}

impl Drop for Raised<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A region's primary half: give it to the primary's epoch coordinator
/// (`blkrep::replica::node::run_primary_with`).
#[derive(Clone)]
pub struct MemoryParticipant(Arc<Shared>);

impl std::fmt::Debug for MemoryParticipant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryParticipant")
            .field("name", &self.0.opts.name)
            .field("region", &self.0.region.path())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Take `m` from async code without blocking the runtime's thread while a cut holds it (a
/// large pause copy can take hundreds of milliseconds; heartbeats share the threads).
async fn lock_async<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    loop {
        if let Some(g) = try_lock(m) {
            return g;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// `m` if nobody holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// What one read of pages produced.
struct Batch {
    message: Vec<u8>,
    pages: u64,
    data_pages: u64,
}

impl State {
    /// Collect dirty pages into `unsent`; a writer that is gone ends uffd tracking for scan.
    fn collect(&mut self, region: &Region) -> Result<u64, TrackError> {
        let mut out = RoaringTreemap::new();
        let r = self.tracker.collect(region, &self.table, &mut out);
        let stats = match r {
            Ok(s) => s,
            Err(TrackError::WriterGone { pid }) => {
                self.tracker = Box::new(ScanTracker::new(default_threads()));
                self.tracker_note = format!(
                    "scan: the writer (pid {pid}) that handed over its userfaultfd is gone"
                );
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
    fn read_unsent(&mut self, region: &Region, max: Option<u64>) -> Vec<Batch> {
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
    fn requeue_uncommitted(&mut self) {
        for (_, pages) in std::mem::take(&mut self.sent_in) {
            self.unsent |= pages;
        }
        self.items.clear();
        self.batches.clear();
        self.inflight.clear();
    }
}

/// Run `f`, which may take long, without starving the other tasks of a multi-threaded
/// runtime's worker (they move to another worker meanwhile).
pub(crate) fn heavy<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Wait for one of prepare's sends.
async fn join_send(
    flying: &mut tokio::task::JoinSet<Result<Vec<u8>, String>>,
    epoch: Epoch,
) -> Result<(), EpochError> {
    match flying.join_next().await {
        Some(Ok(Ok(_))) | None => Ok(()),
        Some(Ok(Err(reason))) => Err(EpochError::PeerLost { epoch, reason }),
        Some(Err(e)) => Err(EpochError::PeerLost {
            epoch,
            reason: format!("a send task failed: {e}"),
        }),
    }
}

fn finish(b: PagesBuilder) -> Batch {
    let pages = b.len() as u64;
    let data_pages = b.data_pages();
    Batch {
        message: b.finish(),
        pages,
        data_pages,
    }
}

impl MemoryParticipant {
    /// The primary half of a region, tracked by `tracker` (`note` says why that one). The
    /// region is hashed once here; until the first session every page counts as unsent.
    pub fn new(
        region: Arc<Region>,
        tracker: Box<dyn Tracker>,
        note: impl Into<String>,
        opts: MemoryOptions,
    ) -> MemoryParticipant {
        let table = PageTable::hash_region(&region, default_threads());
        let mut unsent = RoaringTreemap::new();
        unsent.insert_range(0..region.pages());
        MemoryParticipant(Arc::new(Shared {
            st: Mutex::new(State {
                tracker,
                tracker_note: note.into(),
                table,
                unsent,
                stale: RoaringTreemap::new(),
                resync: RoaringTreemap::new(),
                epoch: 0,
                committed: 0,
                seq: 0,
                sent_in: BTreeMap::new(),
                items: BTreeMap::new(),
                batches: BTreeMap::new(),
                inflight: BTreeMap::new(),
                channel: None,
                session: 0,
                pause: Latencies::default(),
                counters: Counters::default(),
            }),
            opts,
            region,
            changed: tokio::sync::Notify::new(),
            trigger: OnceLock::new(),
            cutting: AtomicBool::new(false),
            long_hold: AtomicBool::new(false),
            last_status: Mutex::new((Instant::now(), serde_json::Value::Null)),
        }))
    }

    /// The region.
    pub fn region(&self) -> &Arc<Region> {
        &self.0.region
    }

    /// Which tracker runs.
    pub fn tracker(&self) -> TrackerKind {
        lock(&self.0.st).tracker.kind()
    }

    /// Replace the tracker (a writer handed over its userfaultfd). The old tracker collects
    /// once more after the new one is in place, so no write between the two is missed.
    pub fn set_tracker(&self, tracker: Box<dyn Tracker>, note: impl Into<String>) {
        let mut st = lock(&self.0.st);
        let mut old = std::mem::replace(&mut st.tracker, tracker);
        st.tracker_note = note.into();
        let mut out = RoaringTreemap::new();
        match old.collect(&self.0.region, &st.table, &mut out) {
            Ok(_) => {
                st.stale |= &out;
                st.unsent |= out;
            }
            Err(e) => {
                // Nothing is known about the pages since: compare them all at the next scan.
                tracing::warn!("the previous tracker failed its last collect: {e}");
                st.unsent.insert_range(0..self.0.region.pages());
                st.stale.insert_range(0..self.0.region.pages());
            }
        }
        tracing::info!(region = %self.0.region.path().display(), note = %st.tracker_note, "memory tracker");
    }

    /// Say why the scan tracker still runs (a refused hand-over, say); ignored once another
    /// tracker runs.
    pub fn note(&self, why: impl Into<String>) {
        let mut st = lock(&self.0.st);
        if st.tracker.kind() == TrackerKind::Scan {
            st.tracker_note = why.into();
        }
    }

    /// The region's digest as last read (equal to the secondary's after a commit).
    pub fn fold(&self) -> u64 {
        lock(&self.0.st).table.fold()
    }

    fn err(&self, epoch: Epoch, reason: String) -> EpochError {
        EpochError::Participant {
            epoch,
            participant: self.0.opts.name.clone(),
            reason,
        }
    }

    async fn handshake(
        &self,
        channel: Arc<dyn PeerChannel>,
        epoch: Epoch,
    ) -> Result<(), EpochError> {
        let pages = self.0.region.pages();
        let lost = |reason: String| EpochError::PeerLost { epoch, reason };
        let a = channel.call(wire::hello(pages)).await.map_err(lost)?;
        let (theirs, _) = wire::decode_hello_answer(&a).map_err(lost)?;
        if theirs != pages {
            return Err(EpochError::Refused {
                epoch,
                reason: format!(
                    "the secondary's memory region has {} bytes, this one ({}) {}",
                    theirs * PAGE_SIZE as u64,
                    self.0.region.path().display(),
                    self.0.region.len()
                ),
            });
        }
        // What the secondary lacks: pages whose committed digest differs from ours.
        let mut differ = RoaringTreemap::new();
        let mut first = 0u64;
        while first < pages {
            let count = (pages - first).min(u64::from(MAX_DIGESTS)) as u32;
            let a = channel
                .call(wire::digests(first, count))
                .await
                .map_err(lost)?;
            let theirs = wire::decode_digests_answer(&a, count).map_err(lost)?;
            let st = lock(&self.0.st);
            for (k, d) in theirs.into_iter().enumerate() {
                let p = first + k as u64;
                if st.table.get(p) != d {
                    differ.insert(p);
                }
            }
            first += u64::from(count);
        }
        let mut st = lock(&self.0.st);
        st.requeue_uncommitted();
        // Pages the secondary holds alike need not be sent, unless written since they were
        // last read (the table does not describe those).
        let keep = &st.stale | &differ;
        st.unsent &= keep;
        st.unsent |= &differ;
        st.resync = differ;
        st.counters.resync_pages += st.unsent.len();
        st.counters.sessions += 1;
        st.epoch = epoch.0;
        st.committed = epoch.0.saturating_sub(1);
        st.session += 1;
        st.channel = Some(channel);
        tracing::info!(
            region = %self.0.region.path().display(),
            to_send = st.unsent.len(),
            "memory session started"
        );
        Ok(())
    }

    /// `lockstep verify`: compare every page's digest with the secondary's committed one.
    /// Pages that differ because they changed since the last commit are expected; any other
    /// difference is a divergence, and such pages are sent again before the next commit.
    async fn compare(&self) -> Result<serde_json::Value, String> {
        let t = Instant::now();
        let channel = lock(&self.0.st)
            .channel
            .clone()
            .ok_or("no session with the secondary")?;
        {
            let mut st = lock(&self.0.st);
            st.collect(&self.0.region).map_err(|e| e.to_string())?;
        }
        let pages = self.0.region.pages();
        let (mut differ, mut diverged) = (0u64, Vec::new());
        let mut first = 0u64;
        while first < pages {
            let count = (pages - first).min(u64::from(MAX_DIGESTS)) as u32;
            let a = channel.call(wire::verify(first, count)).await?;
            let theirs = wire::decode_digests_answer(&a, count)?;
            let mut st = lock(&self.0.st);
            for (k, d) in theirs.into_iter().enumerate() {
                let p = first + k as u64;
                if st.table.get(p) == d {
                    continue;
                }
                differ += 1;
                let pending = st.unsent.contains(p) || st.sent_in.values().any(|s| s.contains(p));
                if !pending {
                    diverged.push(p);
                    st.unsent.insert(p);
                }
            }
            first += u64::from(count);
        }
        if !diverged.is_empty() {
            tracing::error!(region = %self.0.region.path().display(), pages = diverged.len(), "memory verify: the secondary's region diverged; those pages are sent again");
        }
        Ok(json!({
            "region": self.0.region.path(),
            "pages": pages,
            "differing_pages": differ,
            "pending_pages": differ - diverged.len() as u64,
            "diverged_pages": diverged.len(),
            "diverged_first": diverged.iter().take(16).collect::<Vec<_>>(),
            "duration_s": t.elapsed().as_secs_f64(),
        }))
    }

    /// Between checkpoints: collect and send dirty and unsent pages while the guest runs.
    async fn presend(self, session: u64, every: Duration) {
        let mut last_collect = Instant::now() - every;
        // Sends in flight: reading the next batch overlaps sending the last ones.
        let mut flying = tokio::task::JoinSet::new();
        loop {
            // Reap finished sends; a failed one ends this session's pre-send (the sends
            // still in flight finish their own bookkeeping: they are never cancelled).
            while let Some(r) = flying.try_join_next() {
                if !matches!(r, Ok(true)) {
                    flying.detach_all();
                    return;
                }
            }
            if flying.len() >= PRESEND_WINDOW {
                if !matches!(flying.join_next().await, Some(Ok(true))) {
                    flying.detach_all();
                    return;
                }
                continue;
            }
            // Let others (a cut above all) have the state between batches.
            tokio::task::yield_now().await;
            if self.0.cutting.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            let next = {
                let mut st = lock_async(&self.0.st).await;
                if st.session != session {
                    drop(st);
                    flying.detach_all();
                    return;
                }
                // Collect every `every`, but while a backlog is being sent no more often
                // than ten times what a collect costs (a scan hashes the whole region).
                let since = last_collect.elapsed();
                let cost = Duration::from_micros(st.counters.collect_us);
                if since >= every && (st.unsent.len() < PRESEND_BATCH * 4 || since >= cost * 10) {
                    last_collect = Instant::now();
                    // A scan of a large region takes long: status does not wait for it.
                    let _long = Raised::new(&self.0.long_hold);
                    match st.collect(&self.0.region) {
                        Ok(n) => {
                            if let Some(t) = self.0.trigger.get() {
                                t.add_bytes(n * PAGE_SIZE as u64);
                            }
                        }
                        Err(e) => {
                            st.counters.last_error = Some(format!("collect: {e}"));
                        }
                    }
                }
                if st.unsent.is_empty() || st.channel.is_none() {
                    None
                } else {
                    let b = st.read_unsent(&self.0.region, Some(PRESEND_BATCH));
                    let epoch = st.epoch;
                    *st.inflight.entry(epoch).or_default() += 1;
                    Some((epoch, b, st.channel.clone().expect("checked")))
                }
            };
            let Some((epoch, batches, channel)) = next else {
                if flying.is_empty() {
                    tokio::time::sleep(every.min(Duration::from_millis(5))).await;
                } else if !matches!(flying.join_next().await, Some(Ok(true))) {
                    flying.detach_all();
                    return;
                }
                continue;
            };
            flying.spawn(self.clone().send_batches(session, epoch, batches, channel));
        }
    }

    /// Send pre-send batches of `epoch`; false if the session ended or the send failed.
    async fn send_batches(
        self,
        session: u64,
        epoch: u64,
        batches: Vec<Batch>,
        channel: Arc<dyn PeerChannel>,
    ) -> bool {
        let mut r = Ok(());
        let mut sent = (0, 0, 0);
        for b in batches {
            let bytes = b.message.len() as u64;
            r = channel.call(b.message).await.map(drop);
            if r.is_err() {
                break;
            }
            sent.0 += b.pages;
            sent.1 += b.pages - b.data_pages;
            sent.2 += bytes;
        }
        {
            let mut st = lock_async(&self.0.st).await;
            if st.session != session {
                // A new session began meanwhile and counts afresh.
                return false;
            }
            if let Some(n) = st.inflight.get_mut(&epoch) {
                *n = n.saturating_sub(1);
            }
            st.counters.presend_pages += sent.0;
            st.counters.zero_pages_sent += sent.1;
            st.counters.bytes_sent += sent.2;
            if let Err(e) = &r {
                st.counters.last_error = Some(format!("pre-send: {e}"));
            }
        }
        self.0.changed.notify_waiters();
        // On failure the session is gone: the next one resends what this one did not commit.
        r.is_ok()
    }
}

impl Participant for MemoryParticipant {
    fn name(&self) -> &str {
        &self.0.opts.name
    }

    fn peer_id(&self) -> Option<u16> {
        Some(self.0.opts.id)
    }

    fn set_trigger(&self, trigger: CheckpointTrigger) {
        let _ = self.0.trigger.set(trigger);
    }

    fn verify(&self) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        Box::pin(self.compare())
    }

    fn ready(&self) -> Result<(), String> {
        // A region whose file is gone or cut short cannot be checkpointed: no checkpoint,
        // for the disk either, rather than a disk without its memory.
        self.0.region.check().map_err(|e| e.to_string())?;
        let st = lock(&self.0.st);
        if st.channel.is_none() {
            return Err("no session with the secondary".into());
        }
        let n = st.resync.len();
        if n > self.0.opts.ready_pages {
            return Err(format!(
                "a memory resync is in progress ({n} pages left to send)"
            ));
        }
        Ok(())
    }

    fn connected(
        &self,
        channel: Arc<dyn PeerChannel>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async move {
            self.handshake(channel, epoch).await?;
            if let Some(every) = self.0.opts.presend {
                let session = lock(&self.0.st).session;
                tokio::spawn(self.clone().presend(session, every));
            }
            Ok(())
        })
    }

    fn cut(&self, epoch: Epoch) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async move {
            let t = Instant::now();
            // Raised for the whole cut: the pre-send stands back, status does not wait.
            let _cutting = Raised::new(&self.0.cutting);
            let mut st = lock(&self.0.st);
            if st.epoch != epoch.0 {
                return Err(self.err(
                    epoch,
                    format!("the memory participant is in epoch {}", st.epoch),
                ));
            }
            self.0
                .region
                .check()
                .map_err(|e| self.err(epoch, e.to_string()))?;
            st.collect(&self.0.region)
                .map_err(|e| self.err(epoch, format!("collecting dirty pages: {e}")))?;
            // A large copy must not hold up the runtime's other tasks (heartbeats).
            let region = &self.0.region;
            let batches = heavy(|| st.read_unsent(region, None));
            st.counters.cuts += 1;
            let fold = st.table.fold();
            st.batches.insert(epoch.0, (batches, fold));
            st.epoch = epoch.0 + 1;
            st.pause.record(t.elapsed());
            Ok(())
        })
    }

    fn prepare(&self, epoch: Epoch) -> BoxFuture<'_, Result<EpochSummary, EpochError>> {
        Box::pin(async move {
            // Pre-sends of this epoch first: the secondary counts every page. A pre-send
            // always finishes (it is never cancelled) unless the session ends, which this
            // checkpoint then cannot survive anyway.
            let deadline = Instant::now() + PREPARE_PATIENCE;
            loop {
                let notified = self.0.changed.notified();
                {
                    let st = lock_async(&self.0.st).await;
                    if st.channel.is_none() {
                        return Err(EpochError::PeerLost {
                            epoch,
                            reason: "the session with the secondary ended".into(),
                        });
                    }
                    if st.inflight.get(&epoch.0).copied().unwrap_or(0) == 0 {
                        break;
                    }
                }
                if Instant::now() >= deadline {
                    return Err(self.err(
                        epoch,
                        format!("pre-sent pages were not answered within {PREPARE_PATIENCE:?}"),
                    ));
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            }
            let (batches, channel) = {
                let mut st = lock(&self.0.st);
                (st.batches.remove(&epoch.0), st.channel.clone())
            };
            let Some((batches, digest)) = batches else {
                return Err(self.err(epoch, "the epoch was not cut".into()));
            };
            let channel = channel.ok_or_else(|| EpochError::PeerLost {
                epoch,
                reason: "no session with the secondary".into(),
            })?;
            let mut sent = (0, 0, 0);
            let mut flying = tokio::task::JoinSet::new();
            for b in batches {
                sent.0 += b.pages;
                sent.1 += b.pages - b.data_pages;
                sent.2 += b.message.len() as u64;
                if flying.len() >= PRESEND_WINDOW {
                    join_send(&mut flying, epoch).await?;
                }
                let channel = channel.clone();
                flying.spawn(async move { channel.call(b.message).await });
            }
            while !flying.is_empty() {
                join_send(&mut flying, epoch).await?;
            }
            let mut st = lock(&self.0.st);
            st.counters.cut_pages += sent.0;
            st.counters.zero_pages_sent += sent.1;
            st.counters.bytes_sent += sent.2;
            let (items, data) = st.items.get(&epoch.0).copied().unwrap_or((0, 0));
            Ok(EpochSummary {
                participant: self.0.opts.id,
                items,
                bytes: data,
                digest,
            })
        })
    }

    fn commit(&self, epoch: Epoch) {
        let mut st = lock(&self.0.st);
        st.committed = epoch.0;
        let later = st.sent_in.split_off(&(epoch.0 + 1));
        st.sent_in = later;
        let later = st.items.split_off(&(epoch.0 + 1));
        st.items = later;
    }

    fn abort(&self, epoch: Epoch, reason: &EpochError) {
        let mut st = lock(&self.0.st);
        st.requeue_uncommitted();
        st.session += 1;
        st.channel = None;
        st.epoch = st.epoch.max(epoch.0 + 1);
        st.counters.last_error = Some(reason.to_string());
    }

    fn status(&self) -> serde_json::Value {
        // A status request must not wait for a long cut: the last report stands in for it.
        let long =
            self.0.cutting.load(Ordering::Acquire) || self.0.long_hold.load(Ordering::Acquire);
        let st = match try_lock(&self.0.st) {
            Some(st) => st,
            // A pre-send step holds it briefly: wait.
            None if !long => lock(&self.0.st),
            None => {
                let (at, mut last) = lock(&self.0.last_status).clone();
                if last.is_null() || at.elapsed() > STATUS_STALE {
                    // No recent report: wait for a fresh one.
                    lock(&self.0.st)
                } else {
                    last["busy"] = json!(true);
                    return last;
                }
            }
        };
        let c = &st.counters;
        let report = json!({
            "region": self.0.region.path(),
            "bytes": self.0.region.len(),
            "tracker": st.tracker.kind().to_string(),
            "tracker_note": st.tracker_note,
            "connected": st.channel.is_some(),
            "epoch": st.epoch,
            "committed_epoch": st.committed,
            "unsent_pages": st.unsent.len(),
            "cut_pause_us": st.pause.summary(),
            "cuts": c.cuts,
            "pages_sent": c.presend_pages + c.cut_pages,
            "presend_pages": c.presend_pages,
            "cut_pages": c.cut_pages,
            "zero_pages_sent": c.zero_pages_sent,
            "bytes_sent": c.bytes_sent,
            "resync_pages": c.resync_pages,
            "sessions": c.sessions,
            "last_collect_us": c.collect_us,
            "digest": format!("{:016x}", st.table.fold()),
            "last_error": c.last_error,
        });
        drop(st);
        *lock(&self.0.last_status) = (Instant::now(), report.clone());
        report
    }
}
