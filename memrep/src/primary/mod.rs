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
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | options, the participant (cut, prepare, commit, abort, status) |
//! | `state.rs` | unsent and sent pages, the digest table, reading pages into messages |
//! | `session.rs` | a session's start (HELLO, resync by digest) and `lockstep verify` |
//! | `presend.rs` | sending dirty pages between checkpoints |

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

mod presend;
mod session;
mod state;

use state::{Batch, Counters, State};

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
            st.collect(&self.0.region, true)
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
