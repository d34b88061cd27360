//! The primary: local I/O, every modification forwarded to the secondary in order, the
//! block participant of checkpoint epochs, unprotected mode with a dirty bitmap.
//!
//! ```text
//!  client write ─▶ range lock ─▶ local disk ─▶ gate(read): digest, epoch accounting,
//!                                               enqueue ─▶ ForwardQueue ─▶ forwarder task
//!                                                                              │ NBD, pipelined
//!  ack: local = after enqueue; received / durable = after the secondary's reply ◀┘
//!  checkpoint cut(n) = gate(write): epoch n+1 begins, epoch mark n+1 enqueued, digest taken
//! ```
//!
//! Two modifications touching the same 4 KiB block are never in flight to the secondary at
//! once (the forwarder holds the later one back), and their queue order is their order on
//! the local disk (the range lock covers both), so both disks apply them in the same order.

use crate::sync::{BlockRangeLock, Locked};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::meta::MetaStore;
use super::wire::AckMode;
use super::PARTICIPANT_BLOCK;
use crate::digest::{self, DigestTable, DIGEST_BLOCK};
use crate::epoch::{BoxFuture, CheckpointTrigger, Epoch, EpochError, EpochSummary, Participant};
use crate::nbd::client::NbdClient;
use crate::storage::{check_range, Backend, Extent, IoBuf, IoFuture, Op, Result};

/// Primary settings.
#[derive(Debug, Clone)]
pub struct PrimaryOptions {
    /// What a client's write waits for.
    pub ack: AckMode,
    /// Bytes the forward queue may hold (queued and in flight) before writers wait.
    pub queue_bytes: u64,
    /// Requests in flight to the secondary at most.
    pub max_inflight: usize,
}

impl Default for PrimaryOptions {
    fn default() -> Self {
        Self {
            ack: AckMode::Received,
            queue_bytes: 64 << 20,
            max_inflight: 256,
        }
    }
}

/// Replicating or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryMode {
    /// Forwarding every write.
    Replicating,
    /// The link to the secondary is down (or not up yet): writing locally, recording dirty
    /// blocks, trying to reconnect.
    Paused,
    /// Paused for longer than the reconnect timeout, or the secondary refused us: still
    /// recording dirty blocks (and still trying), but no longer expecting the secondary back.
    Unprotected,
}

impl PrimaryMode {
    /// The name in status.
    pub fn name(self) -> &'static str {
        match self {
            PrimaryMode::Replicating => "replicating",
            PrimaryMode::Paused => "paused",
            PrimaryMode::Unprotected => "unprotected",
        }
    }
}

/// Progress of the current (or last) resync, for status.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ResyncStats {
    /// incremental, checksum or full.
    pub kind: Option<&'static str>,
    /// comparing, sending, checkpointing, done, interrupted.
    pub state: &'static str,
    /// Units compared by digest, and how many of them were equal (not sent).
    pub compared_units: u64,
    /// Of those, equal on both sides.
    pub equal_units: u64,
    /// Blocks per compared unit.
    pub unit_blocks: u64,
    /// Dirty blocks when the sync began (written since the last commit, plus every block
    /// for a checksum sync, every allocated one for a full sync).
    pub dirty_at_start: u64,
    /// Blocks to send after the comparison.
    pub to_send_blocks: u64,
    /// Blocks sent so far.
    pub sent_blocks: u64,
    /// Bytes sent so far.
    pub sent_bytes: u64,
    /// Seconds since the resync started.
    pub elapsed_s: f64,
    /// Seconds the comparison took.
    pub compare_s: f64,
    /// Seconds from the start until the resync's checkpoint committed.
    pub total_s: Option<f64>,
    /// Sent bytes per second, while sending.
    pub throughput_mb_s: f64,
    /// Resyncs completed since start.
    pub completed: u64,
}

#[derive(Debug)]
enum FwdKind {
    Write {
        data: IoBuf,
        fua: bool,
    },
    Trim,
    Zeroes {
        may_unmap: bool,
    },
    Flush,
    Mark {
        epoch: u64,
    },
    /// Completes once everything queued before it has been answered by the secondary; not
    /// sent (online verify uses it).
    Barrier,
}

#[derive(Debug)]
struct FwdOp {
    kind: FwdKind,
    offset: u64,
    len: u64,
    done: Option<oneshot::Sender<std::result::Result<(), String>>>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl FwdOp {
    fn blocks(&self) -> Option<(u64, u64)> {
        match self.kind {
            FwdKind::Write { .. } | FwdKind::Trim | FwdKind::Zeroes { .. } if self.len > 0 => {
                Some((
                    self.offset / DIGEST_BLOCK,
                    (self.offset + self.len - 1) / DIGEST_BLOCK,
                ))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Count {
    items: u64,
    bytes: u64,
}

#[derive(Debug)]
struct State {
    mode: PrimaryMode,
    epoch: u64,
    committed: u64,
    counts: BTreeMap<u64, Count>,
    /// Blocks written per open epoch: what the secondary may lack if it is lost.
    written: BTreeMap<u64, RoaringTreemap>,
    dirty: RoaringTreemap,
    marks: HashMap<
        u64,
        (
            EpochSummary,
            oneshot::Receiver<std::result::Result<(), String>>,
        ),
    >,
    unprotected_reason: Option<String>,
    unprotected_since: Option<Instant>,
    /// A resync is under way: no checkpoint may commit before every dirty block is sent.
    resyncing: bool,
    /// The next commit completes a sync: the secondary then holds our generation.
    sync_commit_pending: bool,
    /// Whether a write since the link was lost started a new generation.
    bumped: bool,
    resync: ResyncStats,
    resync_started: Option<Instant>,
    sending_started: Option<Instant>,
    sending_ended: Option<Instant>,
}

impl State {
    /// A modification of blocks `first..=last` (`len` bytes) is forwarded in the current
    /// epoch: count it for the checkpoint summary and remember its blocks until the commit.
    fn account(&mut self, first: u64, last: u64, len: u64) {
        let epoch = self.epoch;
        let c = self.counts.entry(epoch).or_default();
        c.items += 1;
        c.bytes += len;
        self.written
            .entry(epoch)
            .or_default()
            .insert_range(first..=last);
    }

    /// The resync's progress with its running times filled in.
    fn resync_view(&self) -> ResyncStats {
        let mut r = self.resync.clone();
        if r.total_s.is_none() {
            if let Some(t) = self.resync_started {
                r.elapsed_s = t.elapsed().as_secs_f64();
            }
        }
        if let Some(t) = self.sending_started {
            let until = self.sending_ended.unwrap_or_else(Instant::now);
            let secs = until.duration_since(t).as_secs_f64();
            if secs > 0.0 {
                r.throughput_mb_s = r.sent_bytes as f64 / secs / 1e6;
            }
        }
        r
    }
}

/// The primary's replicated disk; implements [`Backend`] for the NBD export (and ublk).
#[derive(Debug)]
pub struct Primary {
    local: Arc<dyn Backend>,
    opts: PrimaryOptions,
    digest: DigestTable,
    locks: BlockRangeLock,
    gate: tokio::sync::RwLock<()>,
    st: Mutex<State>,
    queue: mpsc::UnboundedSender<FwdOp>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<FwdOp>>>,
    space: Arc<Semaphore>,
    queued_ops: AtomicU64,
    queued_bytes: AtomicU64,
    forwarded_ops: AtomicU64,
    forwarded_bytes: AtomicU64,
    trigger: OnceLock<CheckpointTrigger>,
    lost: watch::Sender<Option<String>>,
    stop: watch::Sender<bool>,
    meta: Arc<MetaStore>,
    /// The secondary generation our dirty bitmap is relative to (0: none).
    tracked: AtomicU64,
}

/// Most blocks one resync request carries (1 MiB; 4 MiB measured no faster).
const RESYNC_RUN_BLOCKS: u64 = 256;

/// Budget units are KiB so that u32 permits cover large queues.
fn cost(len: u64) -> u32 {
    u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl Primary {
    /// A primary over `local`, whose digest table is `digest`, starting in epoch
    /// `committed + 1`, paused until a secondary is synced ([`Primary::resumed`]).
    pub fn new(
        local: Arc<dyn Backend>,
        digest: DigestTable,
        committed: u64,
        opts: PrimaryOptions,
        meta: Arc<MetaStore>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let units = cost(opts.queue_bytes).min(Semaphore::MAX_PERMITS as u32) as usize;
        Arc::new(Self {
            local,
            digest,
            locks: BlockRangeLock::default(),
            gate: tokio::sync::RwLock::new(()),
            st: Mutex::new(State {
                mode: PrimaryMode::Paused,
                epoch: committed + 1,
                committed,
                counts: BTreeMap::new(),
                written: BTreeMap::new(),
                dirty: RoaringTreemap::new(),
                marks: HashMap::new(),
                unprotected_reason: Some("no secondary connected yet".into()),
                unprotected_since: Some(Instant::now()),
                resyncing: false,
                sync_commit_pending: false,
                bumped: false,
                resync: ResyncStats::default(),
                resync_started: None,
                sending_started: None,
                sending_ended: None,
            }),
            queue: tx,
            queue_rx: Mutex::new(Some(rx)),
            space: Arc::new(Semaphore::new(units)),
            queued_ops: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            forwarded_ops: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            trigger: OnceLock::new(),
            lost: watch::Sender::new(Some("no secondary connected yet".into())),
            stop: watch::Sender::new(false),
            meta,
            tracked: AtomicU64::new(0),
            opts,
        })
    }

    /// The disk's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.local.size()
    }

    /// The node's metadata (generation, history).
    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }

    /// The secondary generation since which every written block is in the dirty bitmap.
    pub fn tracked(&self) -> u64 {
        self.tracked.load(Ordering::Acquire)
    }

    /// The per-block digests of the local disk.
    pub fn digest_table(&self) -> &DigestTable {
        &self.digest
    }

    /// The last committed epoch.
    pub fn committed(&self) -> u64 {
        self.st().committed
    }

    /// Progress of the current or last resync.
    pub fn resync_stats(&self) -> ResyncStats {
        self.st().resync_view()
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.locked()
    }

    /// Where byte-threshold checkpoints are requested.
    pub fn set_trigger(&self, t: CheckpointTrigger) {
        let _ = self.trigger.set(t);
    }

    /// The current mode.
    pub fn mode(&self) -> PrimaryMode {
        self.st().mode
    }

    /// Resolves with the reason once the primary goes unprotected.
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.subscribe()
    }

    /// The digest of the local disk now.
    pub fn digest(&self) -> u64 {
        self.digest.sum()
    }

    /// Blocks (4 KiB) written while unprotected or possibly missing on the secondary.
    pub fn dirty_blocks(&self) -> RoaringTreemap {
        self.st().dirty.clone()
    }

    /// Status as JSON.
    pub fn status(&self) -> serde_json::Value {
        let st = self.st();
        let m = self.meta.get();
        serde_json::json!({
            "mode": st.mode.name(),
            "resyncing": st.resyncing,
            "resync": st.resync_view(),
            "generation": format!("{:016x}", m.generation),
            "tracked_generation": format!("{:016x}", self.tracked()),
            "ack": self.opts.ack.name(),
            "forward_queue": {
                "depth": self.queued_ops.load(Ordering::Relaxed),
                "bytes": self.queued_bytes.load(Ordering::Relaxed),
                "limit_bytes": self.opts.queue_bytes,
            },
            "forwarded_writes": self.forwarded_ops.load(Ordering::Relaxed),
            "forwarded_bytes": self.forwarded_bytes.load(Ordering::Relaxed),
            "dirty_blocks": st.dirty.len(),
            "unprotected_reason": st.unprotected_reason,
            "unprotected_for_s": st.unprotected_since.map(|t| t.elapsed().as_secs_f64()),
            "digest": format!("{:016x}", self.digest.sum()),
        })
    }

    /// Stop replicating (the link broke, a checkpoint failed): from now on writes stay
    /// local and are recorded as dirty, together with everything written in epochs the
    /// secondary has not committed; the primary is `paused` until a resync. Idempotent.
    pub async fn link_lost(&self, reason: &str) {
        let _g = self.gate.write().await;
        let mut st = self.st();
        if st.mode != PrimaryMode::Replicating {
            return;
        }
        st.mode = PrimaryMode::Paused;
        st.unprotected_reason = Some(reason.to_string());
        st.unprotected_since = Some(Instant::now());
        let written = std::mem::take(&mut st.written);
        for (_, w) in written {
            st.dirty |= w;
        }
        st.marks.clear();
        st.counts.clear();
        if st.resyncing {
            st.resync.state = "interrupted";
        }
        st.resyncing = false;
        st.sync_commit_pending = false;
        st.bumped = false;
        let dirty = st.dirty.len();
        drop(st);
        tracing::warn!(%reason, dirty_blocks = dirty, "the link to the secondary is lost: paused, recording dirty blocks");
        self.lost.send_replace(Some(reason.to_string()));
    }

    /// The secondary is not coming back soon (reconnect timeout, or it refused us): say so
    /// in status. Writes go on being recorded for a later resync.
    pub fn give_up(&self, reason: &str) {
        let mut st = self.st();
        if st.mode == PrimaryMode::Paused {
            st.mode = PrimaryMode::Unprotected;
            st.unprotected_reason = Some(reason.to_string());
            tracing::warn!(%reason, "running unprotected");
        }
    }

    /// A write while disconnected makes this disk's data differ from every secondary's:
    /// start a new generation (once per disconnection), so that a secondary that went its
    /// own way meanwhile is recognised as split-brain.
    async fn note_disconnected_write(&self) {
        let need = {
            let mut st = self.st();
            !std::mem::replace(&mut st.bumped, true)
        };
        if need {
            // An fsync'd file replacement: off the async workers.
            let meta = self.meta.clone();
            let r = tokio::task::spawn_blocking(move || {
                meta.update(|m| {
                    m.bump();
                    m.clean = false;
                })
            })
            .await;
            match r {
                Ok(Ok(m)) => tracing::info!(
                    generation = format!("{:016x}", m.generation),
                    "writing without the secondary: new data generation"
                ),
                Ok(Err(e)) => tracing::warn!("storing the new data generation: {e}"),
                Err(e) => tracing::warn!("storing the new data generation: {e}"),
            }
        }
    }

    /// Every block of the disk becomes dirty (a checksum sync starts; the comparison then
    /// removes the units both sides hold alike).
    pub async fn mark_all_dirty(&self) {
        let _g = self.gate.write().await;
        let n = digest::blocks(self.local.size());
        if n > 0 {
            self.st().dirty.insert_range(0..n);
        }
    }

    /// Every block that is not a hole on the local disk becomes dirty (a full sync to an
    /// empty secondary).
    pub async fn mark_allocated_dirty(&self) -> Result<()> {
        let mut set = RoaringTreemap::new();
        for (o, l) in crate::storage::data_ranges(&*self.local, 0, self.local.size()).await? {
            set.insert_range(o / DIGEST_BLOCK..(o + l).div_ceil(DIGEST_BLOCK));
        }
        let _g = self.gate.write().await;
        self.st().dirty |= set;
        Ok(())
    }

    /// A sync begins: record its kind for status.
    pub fn begin_sync(&self, kind: &'static str, unit_blocks: u64) {
        let mut st = self.st();
        st.resync = ResyncStats {
            kind: Some(kind),
            state: "comparing",
            unit_blocks,
            dirty_at_start: st.dirty.len(),
            completed: st.resync.completed,
            ..Default::default()
        };
        st.resync_started = Some(Instant::now());
        st.sending_started = None;
        st.sending_ended = None;
    }

    /// Units (of `unit_blocks` blocks) that may differ from the secondary: those holding a
    /// dirty block.
    pub fn dirty_units(&self, unit_blocks: u64) -> RoaringTreemap {
        let st = self.st();
        if unit_blocks == 1 {
            return st.dirty.clone();
        }
        let mut units = RoaringTreemap::new();
        let mut last = u64::MAX;
        for b in st.dirty.iter() {
            let u = b / unit_blocks;
            if u != last {
                units.insert(u);
                last = u;
            }
        }
        units
    }

    /// The secondary's digests of `units`: forget the dirty blocks of every unit whose digest
    /// equals ours now (the secondary holds exactly our data there). Under the gate, so no
    /// write slips between the comparison and the removal. Returns how many were equal.
    pub async fn forget_equal(
        &self,
        unit_blocks: u64,
        units: &RoaringTreemap,
        sums: &[u64],
    ) -> u64 {
        let _g = self.gate.write().await;
        let mut st = self.st();
        let n = self.digest.len();
        let mut equal = 0;
        for (u, theirs) in units.iter().zip(sums) {
            if self.digest.unit_sum(u, unit_blocks) == *theirs {
                let a = (u * unit_blocks).min(n);
                let b = ((u + 1) * unit_blocks).min(n);
                if b > a {
                    st.dirty.remove_range(a..b);
                }
                equal += 1;
            }
        }
        st.resync.compared_units += units.len();
        st.resync.equal_units += equal;
        equal
    }

    /// The epoch replication resumes in.
    pub fn resume_epoch(&self) -> u64 {
        self.st().epoch
    }

    /// The secondary acknowledged RESUME: forward again, and send every dirty block
    /// ([`Primary::resync`]) before the next checkpoint may commit.
    pub async fn resumed(&self) {
        let _g = self.gate.write().await;
        let mut st = self.st();
        st.mode = PrimaryMode::Replicating;
        st.unprotected_reason = None;
        st.unprotected_since = None;
        st.counts.clear();
        st.written.clear();
        st.marks.clear();
        st.resyncing = true;
        st.sync_commit_pending = true;
        st.bumped = false;
        st.resync.state = "sending";
        st.resync.to_send_blocks = st.dirty.len();
        if let Some(t) = st.resync_started {
            st.resync.compare_s = t.elapsed().as_secs_f64();
        }
        st.sending_started = Some(Instant::now());
        drop(st);
        self.lost.send_replace(None);
    }

    /// Send every dirty block to the secondary through the forward queue (in the current
    /// epoch, ordered with client writes by the block locks). Returns the bytes sent; an
    /// error when replication stopped meanwhile.
    pub async fn resync(&self) -> std::result::Result<u64, String> {
        let size = self.local.size();
        let mut sent = 0u64;
        loop {
            let run = {
                let st = self.st();
                if st.mode != PrimaryMode::Replicating {
                    return Err("replication stopped during the resync".into());
                }
                let mut it = st.dirty.iter();
                match it.next() {
                    None => None,
                    Some(first) => {
                        let mut last = first;
                        for b in it.take(RESYNC_RUN_BLOCKS as usize - 1) {
                            if b != last + 1 {
                                break;
                            }
                            last = b;
                        }
                        Some((first, last))
                    }
                }
            };
            let Some((first, last)) = run else { break };
            let off = first * DIGEST_BLOCK;
            let end = ((last + 1) * DIGEST_BLOCK).min(size);
            if end <= off {
                self.st().dirty.remove_range(first..=last);
                continue;
            }
            let len = end - off;
            let _l = self.locks.lock(first, last).await;
            let data = self
                .local
                .read_at(off, len as usize)
                .await
                .map_err(|e| format!("reading the local disk for the resync: {e}"))?;
            let permit = self.space.clone().acquire_many_owned(cost(len)).await.ok();
            let _gate = self.gate.read().await;
            let mut st = self.st();
            if st.mode != PrimaryMode::Replicating {
                return Err("replication stopped during the resync".into());
            }
            st.dirty.remove_range(first..=last);
            st.account(first, last, len);
            st.resync.sent_blocks += last - first + 1;
            st.resync.sent_bytes += len;
            drop(st);
            let kind = if data.iter().all(|&b| b == 0) {
                FwdKind::Zeroes { may_unmap: true }
            } else {
                FwdKind::Write { data, fua: false }
            };
            self.enqueue(kind, off, len, None, permit);
            sent += len;
        }
        let mut st = self.st();
        if st.mode == PrimaryMode::Replicating {
            st.resyncing = false;
            st.resync.state = "checkpointing";
            st.sending_ended = Some(Instant::now());
        }
        Ok(sent)
    }

    /// Queue a modification for the forwarder (the caller accounted it in the epoch).
    fn enqueue(
        &self,
        kind: FwdKind,
        offset: u64,
        len: u64,
        done: Option<oneshot::Sender<std::result::Result<(), String>>>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        self.queued_ops.fetch_add(1, Ordering::Relaxed);
        self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        let _ = self.queue.send(FwdOp {
            kind,
            offset,
            len,
            done,
            _permit: permit,
        });
    }

    /// Whether a resync is sending dirty blocks (checkpoints wait for it).
    pub fn is_resyncing(&self) -> bool {
        self.st().resyncing
    }

    /// Wait until everything queued for the secondary so far has been answered by it.
    pub async fn barrier(&self) -> std::result::Result<(), String> {
        let (tx, rx) = oneshot::channel();
        {
            let _gate = self.gate.read().await;
            if self.mode() != PrimaryMode::Replicating {
                return Err("not replicating".into());
            }
            let _ = self.queue.send(FwdOp {
                kind: FwdKind::Barrier,
                offset: 0,
                len: 0,
                done: Some(tx),
                _permit: None,
            });
        }
        match rx.await {
            Ok(r) => r,
            Err(_) => Err("replication stopped".into()),
        }
    }

    /// Lock blocks `first..=last` against client writes (online verify).
    pub async fn lock_blocks(&self, first: u64, last: u64) -> BlockLock<'_> {
        BlockLock(self.locks.lock(first, last).await)
    }

    /// Local modification + hashing + forwarding; the shared path of write/trim/zeroes.
    async fn modify(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        kind: FwdKind,
        local: IoFuture<'_, ()>,
    ) -> Result<()> {
        check_range(op, offset, len, self.local.size(), 1)?;
        if len == 0 {
            return local.await;
        }
        if len > u64::from(u32::MAX) {
            // NBD carries at most 4 GiB - 1 per request; our frontends never send more.
            return Err(crate::storage::StorageError::Config(format!(
                "{op} of {len} bytes is larger than one replicated request may be"
            )));
        }
        let first = offset / DIGEST_BLOCK;
        let last = (offset + len - 1) / DIGEST_BLOCK;
        let _g = self.locks.lock(first, last).await;
        // Hashes of blocks the request covers completely; edges are read back afterwards.
        let size = self.local.size();
        let mut hashes = Vec::with_capacity((last - first + 1) as usize);
        let mut edges = Vec::new();
        for b in first..=last {
            let bstart = b * DIGEST_BLOCK;
            let bend = (bstart + DIGEST_BLOCK).min(size);
            if offset <= bstart && offset + len >= bend {
                let h = match &kind {
                    FwdKind::Write { data, .. } => digest::block_hash(
                        b,
                        &data[(bstart - offset) as usize..(bend - offset) as usize],
                    ),
                    _ => digest::zero_block_hash(b),
                };
                hashes.push((b, h));
            } else {
                edges.push(b);
            }
        }
        local.await?;
        for b in edges {
            let bstart = b * DIGEST_BLOCK;
            let bend = (bstart + DIGEST_BLOCK).min(size);
            let data = self.local.read_at(bstart, (bend - bstart) as usize).await?;
            hashes.push((b, digest::block_hash(b, &data)));
        }
        let permit = if self.mode() == PrimaryMode::Replicating {
            self.space.clone().acquire_many_owned(cost(len)).await.ok()
        } else {
            None
        };
        let (tx, rx) = oneshot::channel();
        let mut disconnected = false;
        let waits = {
            let _gate = self.gate.read().await;
            for (b, h) in hashes {
                self.digest.set(b, h);
            }
            let mut st = self.st();
            match st.mode {
                PrimaryMode::Paused | PrimaryMode::Unprotected => {
                    st.dirty.insert_range(first..=last);
                    disconnected = !st.bumped;
                    false
                }
                PrimaryMode::Replicating => {
                    st.account(first, last, len);
                    drop(st);
                    self.enqueue(kind, offset, len, Some(tx), permit);
                    if let Some(t) = self.trigger.get() {
                        t.add_bytes(len);
                    }
                    self.opts.ack != AckMode::Local
                }
            }
        };
        drop(_g);
        if disconnected {
            self.note_disconnected_write().await;
        }
        if waits {
            // The local write is done; if the secondary is lost meanwhile, the block is
            // recorded as dirty and the client still succeeds.
            if let Ok(Err(e)) = rx.await {
                tracing::debug!("forwarded write at {offset} failed: {e}");
            }
        }
        Ok(())
    }

    fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<FwdOp>> {
        self.queue_rx.locked().take()
    }

    fn put_receiver(&self, rx: mpsc::UnboundedReceiver<FwdOp>) {
        *self.queue_rx.locked() = Some(rx);
    }

    /// Forward queued operations to the secondary over `client` until the queue closes or
    /// the secondary fails (then the primary goes unprotected). Run once, as a task.
    pub async fn run_forwarder(self: Arc<Self>, client: NbdClient) {
        let Some(mut rx) = self.take_receiver() else {
            return;
        };
        let mut lost = self.lost();
        let mut stop = self.stop.subscribe();
        let mut inflight: HashMap<u64, (Option<(u64, u64)>, FwdOp)> = HashMap::new();
        let mut tasks: JoinSet<(u64, std::result::Result<(), String>)> = JoinSet::new();
        let mut next_id = 0u64;
        let mut held: Option<FwdOp> = None;
        let fwd_durable = self.opts.ack == AckMode::Durable;
        let failure: String = 'run: loop {
            // Submit as much as order and the in-flight limit allow, then send the batch.
            let mut submitted = 0usize;
            loop {
                if held.is_none() && inflight.len() < self.opts.max_inflight {
                    match rx.try_recv() {
                        Ok(op) => held = Some(op),
                        Err(mpsc::error::TryRecvError::Empty) => {}
                        Err(mpsc::error::TryRecvError::Disconnected) => break 'run String::new(),
                    }
                }
                let Some(op) = held.take() else { break };
                let range = op.blocks();
                let blocked = match (&op.kind, range) {
                    (FwdKind::Flush | FwdKind::Barrier, _) => !inflight.is_empty(),
                    (_, Some((a, b))) => inflight
                        .values()
                        .any(|(r, _)| r.is_some_and(|(x, y)| x <= b && a <= y)),
                    _ => false,
                };
                if blocked || inflight.len() >= self.opts.max_inflight {
                    held = Some(op);
                    break;
                }
                if matches!(op.kind, FwdKind::Barrier) {
                    // Everything queued before it has been answered.
                    let mut op = op;
                    if let Some(d) = op.done.take() {
                        let _ = d.send(Ok(()));
                    }
                    continue;
                }
                let ticket = match &op.kind {
                    FwdKind::Write { data, fua } => {
                        client
                            .submit_write(op.offset, data, *fua || fwd_durable)
                            .await
                    }
                    FwdKind::Trim => {
                        client
                            .submit_trim(op.offset, op.len as u32, fwd_durable)
                            .await
                    }
                    FwdKind::Zeroes { may_unmap } => {
                        client
                            .submit_write_zeroes(op.offset, op.len as u32, *may_unmap, fwd_durable)
                            .await
                    }
                    FwdKind::Flush => client.submit_flush().await,
                    FwdKind::Mark { epoch } => client.submit_epoch_mark(*epoch).await,
                    FwdKind::Barrier => unreachable!("barriers complete before submission"),
                };
                let ticket = match ticket {
                    Ok(t) => t,
                    Err(e) => break 'run format!("forwarding to the secondary: {e}"),
                };
                let id = next_id;
                next_id += 1;
                tasks.spawn(async move { (id, ticket.wait().await.map_err(|e| e.to_string())) });
                inflight.insert(id, (range, op));
                submitted += 1;
            }
            if submitted > 0 {
                if let Err(e) = client.send_submitted().await {
                    break 'run format!("forwarding to the secondary: {e}");
                }
            }
            tokio::select! {
                Some(r) = tasks.join_next(), if !tasks.is_empty() => {
                    let (id, result) = match r {
                        Ok(v) => v,
                        Err(e) => break 'run format!("forwarder task failed: {e}"),
                    };
                    let Some((_, mut op)) = inflight.remove(&id) else { continue };
                    if let Err(e) = &result {
                        if let Some(d) = op.done.take() {
                            let _ = d.send(Err(e.clone()));
                        }
                        break 'run format!("the secondary failed a request: {e}");
                    }
                    if matches!(op.kind, FwdKind::Write { .. } | FwdKind::Trim | FwdKind::Zeroes { .. }) {
                        self.queued_ops.fetch_sub(1, Ordering::Relaxed);
                        self.queued_bytes.fetch_sub(op.len, Ordering::Relaxed);
                        self.forwarded_ops.fetch_add(1, Ordering::Relaxed);
                        self.forwarded_bytes.fetch_add(op.len, Ordering::Relaxed);
                    }
                    if let Some(d) = op.done.take() {
                        let _ = d.send(Ok(()));
                    }
                }
                op = rx.recv(), if held.is_none() && inflight.len() < self.opts.max_inflight => match op {
                    Some(op) => held = Some(op),
                    None => break 'run String::new(),
                },
                _ = crate::epoch::until_true(&mut stop) => break 'run String::new(),
                _ = lost_changed(&mut lost) => {
                    break 'run self.lost.borrow().clone().unwrap_or_default();
                }
            }
        };
        if failure.is_empty() {
            // The queue closed: the primary is shutting down. Finish what is in flight.
            while let Some(r) = tasks.join_next().await {
                if let Ok((id, res)) = r {
                    if let Some((_, mut op)) = inflight.remove(&id) {
                        if let Some(d) = op.done.take() {
                            let _ = d.send(res);
                        }
                    }
                }
            }
            self.put_receiver(rx);
            return;
        }
        self.link_lost(&failure).await;
        // Release every waiter: their data is local and their blocks are dirty. Nothing is
        // queued any more once the primary is paused (sends happen under the gate while
        // replicating), so emptying the queue now leaves it empty for the next session.
        tasks.abort_all();
        inflight.clear();
        drop(held);
        while let Ok(op) = rx.try_recv() {
            drop(op);
        }
        self.queued_ops.store(0, Ordering::Relaxed);
        self.queued_bytes.store(0, Ordering::Relaxed);
        self.put_receiver(rx);
    }

    /// Stop the forwarder once what it has in flight is answered (at shutdown, after the
    /// last checkpoint).
    pub fn stop_forwarder(&self) {
        self.stop.send_replace(true);
    }

    async fn do_cut(&self, epoch: Epoch) -> std::result::Result<(), EpochError> {
        let _g = self.gate.write().await;
        let mut st = self.st();
        if st.mode != PrimaryMode::Replicating {
            return Err(EpochError::NotReplicating(format!(
                "the primary is {}: {}",
                st.mode.name(),
                st.unprotected_reason.clone().unwrap_or_default()
            )));
        }
        if st.resyncing {
            return Err(EpochError::NotReplicating(format!(
                "a resync is in progress ({} blocks left to send); the secondary keeps the last checkpoint until it is done",
                st.dirty.len()
            )));
        }
        if st.epoch != epoch.0 {
            return Err(EpochError::Participant {
                epoch,
                participant: "block".into(),
                reason: format!("the block layer is in epoch {}", st.epoch),
            });
        }
        st.epoch = epoch.0 + 1;
        let c = st.counts.remove(&epoch.0).unwrap_or_default();
        let summary = EpochSummary {
            participant: PARTICIPANT_BLOCK,
            items: c.items,
            bytes: c.bytes,
            digest: self.digest.sum(),
        };
        let (tx, rx) = oneshot::channel();
        st.marks.insert(epoch.0, (summary, rx));
        drop(st);
        let _ = self.queue.send(FwdOp {
            kind: FwdKind::Mark { epoch: epoch.0 + 1 },
            offset: 0,
            len: 0,
            done: Some(tx),
            _permit: None,
        });
        Ok(())
    }
}

/// Client writes to a range of blocks wait while this is held.
#[derive(Debug)]
pub struct BlockLock<'a>(#[allow(dead_code)] crate::sync::RangeGuard<'a>);

/// The block layer's part in checkpoints.
#[derive(Debug)]
pub struct BlockParticipant(pub Arc<Primary>);

impl Participant for BlockParticipant {
    fn name(&self) -> &str {
        "block"
    }

    fn cut(&self, epoch: Epoch) -> BoxFuture<'_, std::result::Result<(), EpochError>> {
        Box::pin(self.0.do_cut(epoch))
    }

    fn prepare(
        &self,
        epoch: Epoch,
    ) -> BoxFuture<'_, std::result::Result<EpochSummary, EpochError>> {
        Box::pin(async move {
            let entry = self.0.st().marks.remove(&epoch.0);
            let Some((summary, rx)) = entry else {
                return Err(EpochError::PeerLost {
                    epoch,
                    reason: "the epoch was not cut (replication stopped)".into(),
                });
            };
            match rx.await {
                Ok(Ok(())) => Ok(summary),
                Ok(Err(e)) => Err(EpochError::PeerLost { epoch, reason: e }),
                Err(_) => Err(EpochError::PeerLost {
                    epoch,
                    reason: self
                        .0
                        .st()
                        .unprotected_reason
                        .clone()
                        .unwrap_or_else(|| "the forwarder stopped".into()),
                }),
            }
        })
    }

    fn commit(&self, epoch: Epoch) {
        let mut st = self.0.st();
        st.committed = epoch.0;
        st.written = st.written.split_off(&(epoch.0 + 1));
        if std::mem::take(&mut st.sync_commit_pending) {
            // The secondary took our generation with this commit: from now on our dirty
            // bitmap is exact relative to it.
            self.0
                .tracked
                .store(self.0.meta.get().generation, Ordering::Release);
            st.resync.state = "done";
            st.resync.completed += 1;
            if let Some(t) = st.resync_started {
                st.resync.total_s = Some(t.elapsed().as_secs_f64());
                st.resync.elapsed_s = t.elapsed().as_secs_f64();
            }
            let r = st.resync.clone();
            drop(st);
            tracing::info!(
                kind = r.kind,
                sent_bytes = r.sent_bytes,
                equal_units = r.equal_units,
                compared_units = r.compared_units,
                total_s = r.total_s,
                "resync complete: the secondary is consistent"
            );
        }
    }

    fn abort(&self, epoch: Epoch, reason: &EpochError) {
        // A checkpoint that cannot commit leaves the secondary behind: pause (the blocks of
        // every open epoch become dirty); the link supervisor reconnects and resyncs.
        let p = self.0.clone();
        let reason = format!("checkpoint of {epoch} failed: {reason}");
        tokio::spawn(async move { p.link_lost(&reason).await });
    }

    fn status(&self) -> serde_json::Value {
        let st = self.0.st();
        serde_json::json!({
            "epoch": st.epoch,
            "committed_epoch": st.committed,
            "open_epochs": st.written.len(),
        })
    }
}

impl Backend for Primary {
    fn size(&self) -> u64 {
        self.local.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.local.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            let copy = IoBuf::from_slice(&data);
            self.modify(
                Op::Write,
                offset,
                len,
                FwdKind::Write { data: copy, fua },
                self.local.write_at(offset, data, fua),
            )
            .await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.local.flush().await?;
            let (tx, rx) = oneshot::channel();
            let wait = {
                let _gate = self.gate.read().await;
                if self.mode() == PrimaryMode::Replicating {
                    let _ = self.queue.send(FwdOp {
                        kind: FwdKind::Flush,
                        offset: 0,
                        len: 0,
                        done: Some(tx),
                        _permit: None,
                    });
                    self.opts.ack != AckMode::Local
                } else {
                    false
                }
            };
            if wait {
                // The client's flush promises what its ack mode promises for writes: with
                // `received` and `durable` that the secondary has the data on stable storage
                // too, so it completes when the secondary's flush did. If the secondary fails
                // it (or the forwarder stops first), the primary leaves `replicating` before
                // the flush completes: every block of the uncommitted epochs is then in the
                // dirty bitmap for the resync, and the local flush is all the client gets, as
                // for a write made while the link is down. (link_lost does nothing if the
                // forwarder got there first.)
                match rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        self.link_lost(&format!("the secondary failed a flush: {e}"))
                            .await
                    }
                    Err(_) => {
                        self.link_lost("forwarding stopped before the secondary's flush completed")
                            .await
                    }
                }
            }
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.modify(
            Op::Discard,
            offset,
            len,
            FwdKind::Trim,
            self.local.discard(offset, len),
        ))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.modify(
            Op::WriteZeroes,
            offset,
            len,
            FwdKind::Zeroes { may_unmap },
            self.local.write_zeroes(offset, len, may_unmap),
        ))
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.local.block_status(offset, len)
    }
}

/// Wait until `primary`'s forward queue is empty (or `timeout`).
pub async fn wait_idle(primary: &Primary, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while primary.queued_ops.load(Ordering::Relaxed) > 0 {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    true
}

async fn lost_changed(rx: &mut watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(|l| l.is_some()).await;
}
