//! The secondary: applies the primary's forwarded writes with copy-before-write, commits
//! checkpoints all-or-nothing, serves its own (COLO running-secondary) view, fails over.
//!
//! ```text
//!  primary ──NBD "replica" export──▶ ReplicaSink ──CoW originals──▶ DiskBuffer
//!          (writes + epoch marks)         └──────write-through────▶ secondary disk
//!  primary ──control frames────────▶ SecondaryControl: HELLO, CHECKPOINT→COMMITTED, heartbeats
//!  local clients ──NBD --export────▶ SecondaryView: reads via the buffer, writes into it
//!  operator ──failover──────────────▶ Secondary::failover(checkpoint | latest)
//! ```

use crate::sync::{BlockRangeLock, GroupSync, Locked};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use tokio::io::{BufReader, BufWriter};

use super::buffer::{BufferStats, DiskBuffer, BUFFER_BLOCK};
use super::frame::{read_message, send, SharedWriter};
use super::meta::{MetaStore, NodeMeta};
use super::wire::{self, Message, SyncKind};
use super::{FailoverTarget, PARTICIPANT_BLOCK};
use crate::auth::{SessionKey, SessionKeys};
use crate::digest;
use crate::epoch::{EpochSummary, Latencies};
use crate::nbd::server::{ControlHandler, EpochSink};
use crate::nbd::transport::{ReadHalf, WriteHalf};
use crate::storage::{check_range, Backend, Extent, IoBuf, IoFuture, Op, Result, StorageError};

/// What the secondary does when the primary stops sending heartbeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerLossPolicy {
    /// Fail over to the last checkpoint and serve as primary.
    Failover,
    /// Wait for an operator's `failover`.
    Wait,
}

impl std::str::FromStr for PeerLossPolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "failover" => Ok(Self::Failover),
            "wait" => Ok(Self::Wait),
            _ => Err(format!("unknown policy {s:?} (failover or wait)")),
        }
    }
}

/// Secondary settings.
#[derive(Debug, Clone)]
pub struct SecondaryOptions {
    /// Buffer bytes kept in memory before spilling to `spill_path`.
    pub buffer_memory: u64,
    /// The spill file.
    pub spill_path: PathBuf,
    /// What to do after `heartbeat_misses` missed heartbeats.
    pub on_peer_loss: PeerLossPolicy,
    /// Missed heartbeat periods before the primary counts as lost.
    pub heartbeat_misses: u32,
    /// Time the primary has to send HELLO after switching to the control protocol.
    pub hello_timeout: Duration,
    /// Accept a sync that overwrites data this disk has and the primary does not know of
    /// (split-brain victim, or a disk that was written as a primary later): DRBD's
    /// `--discard-my-data`.
    pub discard_my_data: bool,
}

/// The secondary's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No primary yet.
    Waiting,
    /// A primary connected and compares the disks; forwarded writes are refused.
    Syncing,
    /// Applying a primary's writes.
    Replicating,
    /// The link to the primary broke: waiting for it to reconnect (or for `failover`).
    Paused,
    /// Failover in progress.
    FailingOver,
    /// Failed over: serving the disk as an unprotected primary.
    Primary,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Waiting => "waiting",
            Mode::Syncing => "syncing",
            Mode::Replicating => "replicating",
            Mode::Paused => "paused",
            Mode::FailingOver => "failing-over",
            Mode::Primary => "primary",
        }
    }
}

/// What a failover did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    /// checkpoint or latest.
    pub target: &'static str,
    /// The last committed epoch.
    pub committed_epoch: u64,
    /// Blocks rewritten from the buffer.
    pub restored_blocks: u64,
    /// Time the failover took, in microseconds.
    pub duration_us: u64,
    /// The primary's digest of the committed checkpoint, if known.
    pub checkpoint_digest: Option<String>,
    /// Whether the image can be compared with that digest (checkpoint target, no local
    /// writes since the checkpoint).
    pub comparable: bool,
    /// The generation this node starts as a primary.
    pub generation: String,
}

#[derive(Debug, Default, Clone, Copy)]
struct EpochCount {
    items: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    buffer: DiskBuffer,
    /// Epoch that forwarded writes belong to now.
    current: u64,
    committed: u64,
    /// The epoch the next CHECKPOINT must name (after a RESUME, the resumed epoch).
    next_commit: u64,
    /// Data connections opened under another token are fenced off (a RESUME or a lost
    /// link changes it): nothing from an interrupted session is applied later.
    token: u64,
    /// The key that data connections of the running session prove, on a port that
    /// authenticates peers; set at RESUME with the new token, gone when the session ends.
    session_key: Option<SessionKey>,
    /// The disk (with the buffer) holds a checkpoint it can fail over to.
    consistent: bool,
    /// This disk has never been in sync with a primary (no metadata when it started).
    fresh: bool,
    /// The session's sync, until its first commit; then the primary's lineage is adopted.
    sync: Option<(SyncKind, u64, Vec<u64>)>,
    /// The kind of the last sync that completed.
    last_sync: Option<&'static str>,
    counts: BTreeMap<u64, EpochCount>,
    poisoned: BTreeMap<u64, String>,
    committed_digest: Option<u64>,
    local_writes: u64,
    session: Option<u64>,
    peer: Option<String>,
    last_error: Option<String>,
    failover: Option<FailoverReport>,
    forwarded_writes: u64,
    forwarded_bytes: u64,
    checkpoints: u64,
    aborted: u64,
    heartbeats: u64,
    /// How long each epoch mark held the replication connection (the forwarding stall).
    mark_drain: Latencies,
}

/// The secondary node's replication state around its disk.
#[derive(Debug)]
pub struct Secondary {
    disk: Arc<dyn Backend>,
    opts: SecondaryOptions,
    inner: Mutex<Inner>,
    locks: BlockRangeLock,
    /// Forwarded and local I/O hold it shared; failover holds it exclusively.
    barrier: tokio::sync::RwLock<()>,
    sync: GroupSync,
    dirty: Mutex<RoaringTreemap>,
    meta: MetaStore,
    /// SUMS requests computed at once, over all control sessions.
    sums_slots: tokio::sync::Semaphore,
}

/// SUMS requests computed at once on one secondary (one per session at most).
const SUMS_AT_ONCE: usize = 2;
/// SUMS requests of one session computed or waiting before the session is ended.
const MAX_QUEUED_SUMS: usize = 8;

fn blocks_of(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / BUFFER_BLOCK;
    let last = (offset + len.max(1) - 1) / BUFFER_BLOCK;
    (first, last)
}

impl Secondary {
    /// A secondary over `disk` with metadata kept in memory only (tests): a fresh disk.
    pub fn new(disk: Arc<dyn Backend>, opts: SecondaryOptions) -> Arc<Self> {
        Self::with_meta(disk, opts, MetaStore::in_memory(NodeMeta::fresh()), false)
    }

    /// A secondary over `disk` whose metadata is `meta`; `known` tells whether the metadata
    /// existed before (else the disk has never been in sync with any primary).
    pub fn with_meta(
        disk: Arc<dyn Backend>,
        opts: SecondaryOptions,
        meta: MetaStore,
        known: bool,
    ) -> Arc<Self> {
        let buffer = DiskBuffer::new(opts.buffer_memory, opts.spill_path.clone());
        let m = meta.get();
        if known && !m.clean {
            tracing::warn!(
                "the disk was replicating when this secondary stopped: it holds writes of uncommitted epochs, and only a resync from the primary makes it consistent again"
            );
        }
        Arc::new(Self {
            disk,
            opts,
            inner: Mutex::new(Inner {
                mode: Mode::Waiting,
                buffer,
                current: m.committed + 1,
                committed: m.committed,
                next_commit: m.committed + 1,
                token: 1,
                session_key: None,
                consistent: !known || m.clean,
                fresh: !known,
                sync: None,
                last_sync: None,
                counts: BTreeMap::new(),
                poisoned: BTreeMap::new(),
                committed_digest: None,
                local_writes: 0,
                session: None,
                peer: None,
                last_error: None,
                failover: None,
                forwarded_writes: 0,
                forwarded_bytes: 0,
                checkpoints: 0,
                aborted: 0,
                heartbeats: 0,
                mark_drain: Latencies::default(),
            }),
            locks: BlockRangeLock::default(),
            barrier: tokio::sync::RwLock::new(()),
            sync: GroupSync::default(),
            dirty: Mutex::new(RoaringTreemap::new()),
            meta,
            sums_slots: tokio::sync::Semaphore::new(SUMS_AT_ONCE),
        })
    }

    /// This node's persistent metadata.
    pub fn meta(&self) -> NodeMeta {
        self.meta.get()
    }

    fn store_meta(&self, f: impl FnOnce(&mut NodeMeta)) {
        if let Err(e) = self.meta.update(f) {
            self.set_error(format!("storing replication metadata: {e}"));
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.inner().mode
    }

    /// The disk under the buffer.
    pub fn disk(&self) -> &Arc<dyn Backend> {
        &self.disk
    }

    /// The export that takes the primary's forwarded writes.
    pub fn replica_sink(self: &Arc<Self>) -> Arc<ReplicaSink> {
        Arc::new(ReplicaSink(self.clone()))
    }

    /// The secondary's own view (COLO running secondary; after failover, the disk).
    pub fn view(self: &Arc<Self>) -> Arc<SecondaryView> {
        Arc::new(SecondaryView(self.clone()))
    }

    /// The handler for control connections from the primary.
    pub fn control(self: &Arc<Self>) -> Arc<SecondaryControl> {
        Arc::new(SecondaryControl(self.clone()))
    }

    /// Buffer sizes.
    pub fn buffer_stats(&self) -> BufferStats {
        self.inner().buffer.stats()
    }

    /// Status as JSON.
    pub fn status(&self) -> serde_json::Value {
        let i = self.inner();
        serde_json::json!({
            "role": if i.mode == Mode::Primary { "primary" } else { "secondary" },
            "mode": i.mode.name(),
            "epoch": i.current,
            "committed_epoch": i.committed,
            "peer": i.peer,
            "peer_state": match i.mode {
                Mode::Replicating | Mode::Syncing => "connected",
                Mode::Paused => "lost",
                Mode::Waiting => "waiting",
                _ => "none",
            },
            "consistent": i.consistent,
            "resyncing": i.sync.as_ref().map(|(k, _, _)| k.name()),
            "last_sync": i.last_sync,
            "generation": format!("{:016x}", self.meta.get().generation),
            "session": i.session.map(|s| format!("{s:016x}")),
            "buffer": i.buffer.stats(),
            "forwarded_writes": i.forwarded_writes,
            "forwarded_bytes": i.forwarded_bytes,
            "checkpoints": i.checkpoints,
            "checkpoints_aborted": i.aborted,
            "heartbeats": i.heartbeats,
            "mark_drain_us": i.mark_drain.to_json(),
            "checkpoint_digest": i.committed_digest.map(|d| format!("{d:016x}")),
            "failover": i.failover,
            "dirty_blocks": self.dirty.locked().len(),
            "last_error": i.last_error,
        })
    }

    fn set_error(&self, e: impl Into<String>) {
        let e = e.into();
        tracing::warn!("{e}");
        self.inner().last_error = Some(e);
    }

    /// Copy the originals of blocks `first..=last` into `epoch` where not yet kept. The
    /// caller holds the range lock.
    async fn preserve(&self, epoch: u64, first: u64, last: u64, probe_holes: bool) -> Result<()> {
        let size = self.disk.size();
        let mut b = first;
        while b <= last {
            // A run of blocks whose original is missing, at most 1 MiB.
            let start = {
                let i = self.inner();
                while b <= last && i.buffer.has_original(epoch, b) {
                    b += 1;
                }
                if b > last {
                    break;
                }
                let start = b;
                while b <= last && b - start < 256 && !i.buffer.has_original(epoch, b) {
                    b += 1;
                }
                start
            };
            let off = start * BUFFER_BLOCK;
            let end = (b * BUFFER_BLOCK).min(size);
            let len = end - off;
            // Large ranges (trims and zeroing above all) often cover unallocated space: keep
            // "zero" markers for those instead of reading zeroes. Small runs are just read,
            // which is cheaper than asking.
            let all_zero = (probe_holes || b - start >= 16) && {
                let ext = self.disk.block_status(off, len).await?;
                ext.first().is_some_and(|e: &Extent| e.zero && e.len >= len)
            };
            if all_zero {
                let mut i = self.inner();
                for k in start..b {
                    i.buffer
                        .put_original(epoch, k, None)
                        .map_err(|e| spill_error(off, len, e))?;
                }
                continue;
            }
            let data = self.disk.read_at(off, len as usize).await?;
            let mut i = self.inner();
            for (k, chunk) in data.chunks(BUFFER_BLOCK as usize).enumerate() {
                let mut full;
                let block: &[u8] = if chunk.len() as u64 == BUFFER_BLOCK {
                    chunk
                } else {
                    full = vec![0u8; BUFFER_BLOCK as usize];
                    full[..chunk.len()].copy_from_slice(chunk);
                    &full
                };
                i.buffer
                    .put_original(epoch, start + k as u64, Some(block))
                    .map_err(|e| spill_error(off, len, e))?;
            }
        }
        Ok(())
    }

    /// One forwarded modification: preserve originals, apply, account.
    async fn forwarded(
        &self,
        token: u64,
        op: Op,
        offset: u64,
        len: u64,
        apply: IoFuture<'_, ()>,
    ) -> Result<()> {
        check_range(op, offset, len, self.disk.size(), 1)?;
        let _b = self.barrier.read().await;
        let epoch = {
            let i = self.inner();
            if i.token != token {
                return Err(StorageError::Unavailable(FENCED.into()));
            }
            if i.mode != Mode::Replicating {
                return Err(StorageError::Unavailable(format!(
                    "this secondary is {}: forwarded writes are refused",
                    i.mode.name()
                )));
            }
            i.current
        };
        let (first, last) = blocks_of(offset, len);
        let _g = self.locks.lock(first, last).await;
        let r = async {
            if len > 0 {
                self.preserve(epoch, first, last, op != Op::Write).await?;
            }
            apply.await
        }
        .await;
        let mut i = self.inner();
        match &r {
            Ok(()) => {
                let c = i.counts.entry(epoch).or_default();
                c.items += 1;
                c.bytes += len;
                i.forwarded_writes += 1;
                i.forwarded_bytes += len;
            }
            Err(e) => {
                // The epoch can no longer be committed: its data is incomplete.
                i.poisoned.entry(epoch).or_insert_with(|| e.to_string());
            }
        }
        r
    }

    fn begin_epoch(&self, token: u64, epoch: u64) -> std::result::Result<(), String> {
        let mut i = self.inner();
        if i.token != token {
            return Err(FENCED.into());
        }
        if i.mode != Mode::Replicating {
            return Err(format!("epoch mark while {}", i.mode.name()));
        }
        if epoch != i.current + 1 {
            return Err(format!(
                "epoch mark for {epoch} while receiving epoch {}",
                i.current
            ));
        }
        i.current = epoch;
        Ok(())
    }

    /// Commit `epoch` if everything the primary sent for it is here; all or nothing. The
    /// caller has flushed the disk (the metadata stored here describes it) in the session of
    /// `token`.
    fn commit(
        &self,
        token: u64,
        epoch: u64,
        summaries: &[EpochSummary],
    ) -> std::result::Result<(), String> {
        let mut i = self.inner();
        if i.mode != Mode::Replicating {
            return Err(format!("not replicating ({})", i.mode.name()));
        }
        if i.token != token {
            return Err("the session ended before the commit".into());
        }
        if epoch != i.next_commit {
            return Err(format!(
                "expected a checkpoint of epoch {}, got {epoch}",
                i.next_commit
            ));
        }
        if i.current <= epoch {
            return Err(format!(
                "epoch {epoch} is still open (no epoch mark received)"
            ));
        }
        if let Some(e) = i.poisoned.get(&epoch) {
            return Err(format!("a write of epoch {epoch} failed here: {e}"));
        }
        let mine = i.counts.get(&epoch).copied().unwrap_or_default();
        let block = summaries
            .iter()
            .find(|s| s.participant == PARTICIPANT_BLOCK)
            .ok_or("no block summary in the checkpoint")?;
        if let Some(s) = summaries
            .iter()
            .find(|s| s.participant != PARTICIPANT_BLOCK)
        {
            return Err(format!(
                "unknown participant {} in the checkpoint",
                s.participant
            ));
        }
        if block.items != mine.items || block.bytes != mine.bytes {
            return Err(format!(
                "epoch {epoch}: the primary sent {} writes / {} bytes, {} writes / {} bytes arrived",
                block.items, block.bytes, mine.items, mine.bytes
            ));
        }
        i.buffer.commit(epoch);
        i.counts.remove(&epoch);
        i.committed = epoch;
        i.next_commit = epoch + 1;
        i.committed_digest = Some(block.digest);
        i.local_writes = 0;
        i.checkpoints += 1;
        i.consistent = true;
        if let Some((kind, generation, history)) = i.sync.take() {
            // The first commit after a sync: the disk now is the primary's data at the
            // checkpoint, so this node joins the primary's lineage.
            i.fresh = false;
            i.last_sync = Some(kind.name());
            drop(i);
            tracing::info!(
                sync = kind.name(),
                epoch,
                "sync complete: the secondary is consistent with the primary"
            );
            self.store_meta(|m| {
                m.adopt(generation, &history);
                m.committed = epoch;
            });
        }
        Ok(())
    }

    /// Stop replicating and serve the disk as an unprotected primary, at `target`.
    pub async fn failover(
        &self,
        target: FailoverTarget,
    ) -> std::result::Result<FailoverReport, String> {
        let start = Instant::now();
        {
            let mut i = self.inner();
            match i.mode {
                Mode::Primary | Mode::FailingOver => {
                    return Err(format!("this node is already {}", i.mode.name()))
                }
                _ if target == FailoverTarget::Checkpoint && !i.consistent => {
                    return Err("this secondary restarted while it was replicating: its disk holds writes of uncommitted epochs whose originals were lost, so it has no checkpoint to go back to. Let the primary reconnect and resync it, or fail over --to latest to take the disk as it is".into())
                }
                _ if target == FailoverTarget::Latest && i.sync.is_some() && i.mode != Mode::Waiting => {
                    return Err("a resync is in progress: the disk is a mix of old and new data; fail over --to checkpoint (the last checkpoint is intact)".into())
                }
                _ => {
                    i.mode = Mode::FailingOver;
                    // Nothing of the interrupted session may land after this.
                    i.token += 1;
                }
            }
        }
        tracing::info!(?target, "failing over");
        // Wait for every forwarded and local request in progress.
        let _x = self.barrier.write().await;
        let (blocks, committed) = {
            let i = self.inner();
            let blocks = match target {
                FailoverTarget::Checkpoint => i.buffer.blocks(),
                FailoverTarget::Latest => Vec::new(),
            };
            (blocks, i.committed)
        };
        let r = async {
            self.write_back(&blocks, |buf, b| buf.view(b)).await?;
            self.disk.flush().await
        }
        .await;
        let mut i = self.inner();
        if let Err(e) = r {
            i.mode = Mode::Paused;
            let msg = format!("failover to {target:?} failed: {e}");
            i.last_error = Some(msg.clone());
            return Err(msg);
        }
        let comparable = target == FailoverTarget::Checkpoint && i.buffer.stats().local_blocks == 0;
        i.buffer.clear();
        i.mode = Mode::Primary;
        i.sync = None;
        // Writes from now on are this node's own: a new generation, so that the old primary
        // (if it also wrote) is recognised as split-brain when it comes back.
        drop(i);
        self.store_meta(|m| {
            m.bump();
            m.clean = true;
            m.committed = committed;
        });
        let generation = self.meta.get().generation;
        let mut i = self.inner();
        let report = FailoverReport {
            target: target.name(),
            committed_epoch: committed,
            restored_blocks: blocks.len() as u64,
            duration_us: start.elapsed().as_micros() as u64,
            checkpoint_digest: i.committed_digest.map(|d| format!("{d:016x}")),
            comparable,
            generation: format!("{generation:016x}"),
        };
        i.failover = Some(report.clone());
        tracing::info!(?report, "failed over; serving as an unprotected primary");
        Ok(report)
    }

    /// Compare the disk with the committed checkpoint's digest: Ok(true) when equal.
    pub async fn verify_checkpoint(&self) -> std::result::Result<(u64, Option<u64>), String> {
        let d = digest::disk_digest(&*self.disk)
            .await
            .map_err(|e| e.to_string())?;
        Ok((d, self.inner().committed_digest))
    }

    // ---------------------------------------------------------------------------------------
    // The secondary's own view.

    async fn view_read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        check_range(Op::Read, offset, len as u64, self.disk.size(), 1)?;
        let _b = self.barrier.read().await;
        if self.mode() == Mode::Primary || len == 0 {
            return self.disk.read_at(offset, len).await;
        }
        let (first, last) = blocks_of(offset, len as u64);
        let _g = self.locks.lock(first, last).await;
        let mut buf = self.disk.read_at(offset, len).await?;
        let i = self.inner();
        for b in first..=last {
            if let Some(data) = i
                .buffer
                .view(b)
                .map_err(|e| spill_error(offset, len as u64, e))?
            {
                let bstart = b * BUFFER_BLOCK;
                let from = offset.max(bstart);
                let to = (offset + len as u64).min(bstart + BUFFER_BLOCK);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
            }
        }
        Ok(buf)
    }

    /// A write on the secondary itself: into the buffer while replicating, to the disk (and
    /// the dirty bitmap) after failover. `data` None writes zeroes.
    async fn view_write(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        data: Option<IoBuf>,
        fua: bool,
    ) -> Result<()> {
        check_range(op, offset, len, self.disk.size(), 1)?;
        let _b = self.barrier.read().await;
        let (first, last) = blocks_of(offset, len);
        if self.mode() == Mode::Primary {
            let r = match (op, data) {
                (Op::Write, Some(d)) => self.disk.write_at(offset, d, fua).await,
                (Op::Discard, _) => self.disk.discard(offset, len).await,
                _ => self.disk.write_zeroes(offset, len, true).await,
            };
            if r.is_ok() && len > 0 {
                self.dirty.locked().insert_range(first..=last);
            }
            return r;
        }
        if len == 0 {
            return Ok(());
        }
        let _g = self.locks.lock(first, last).await;
        let size = self.disk.size();
        for b in first..=last {
            let bstart = b * BUFFER_BLOCK;
            let blen = BUFFER_BLOCK.min(size - bstart);
            let view = self
                .inner()
                .buffer
                .view(b)
                .map_err(|e| spill_error(bstart, blen, e))?;
            let mut block = match view {
                Some(v) => v,
                None => {
                    let mut v = self.disk.read_at(bstart, blen as usize).await?.to_vec();
                    v.resize(BUFFER_BLOCK as usize, 0);
                    v
                }
            };
            let from = offset.max(bstart);
            let to = (offset + len).min(bstart + BUFFER_BLOCK);
            let dst = &mut block[(from - bstart) as usize..(to - bstart) as usize];
            match &data {
                Some(d) => {
                    dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                }
                None => dst.fill(0),
            }
            let mut i = self.inner();
            i.buffer
                .put_local(b, &block)
                .map_err(|e| spill_error(bstart, blen, e))?;
            i.local_writes += 1;
        }
        Ok(())
    }
}

fn spill_error(offset: u64, len: u64, e: std::io::Error) -> StorageError {
    StorageError::Io {
        op: Op::Write,
        path: "disk buffer spill file".into(),
        offset,
        len,
        source: e,
    }
}

/// The export the primary forwards to: copy-before-write, then write-through. Each NBD
/// connection gets its own [`ReplicaConn`], bound to the session it was opened in.
#[derive(Debug)]
pub struct ReplicaSink(Arc<Secondary>);

impl ReplicaSink {
    fn conn(&self) -> ReplicaConn {
        ReplicaConn {
            sec: self.0.clone(),
            token: self.0.inner().token,
        }
    }
}

impl EpochSink for ReplicaSink {
    fn begin_epoch(&self, _epoch: u64, _drain: Duration) -> std::result::Result<(), String> {
        Err(no_session().to_string())
    }
    fn connect(&self, session: Option<u64>) -> Option<(Arc<dyn Backend>, Arc<dyn EpochSink>)> {
        let mut c = self.conn();
        if let Some(token) = session {
            c.token = token;
        }
        let c = Arc::new(c);
        Some((c.clone(), c))
    }
}

/// One replication connection: requests count only while the session it was opened in
/// lasts.
#[derive(Debug)]
pub struct ReplicaConn {
    sec: Arc<Secondary>,
    token: u64,
}

impl EpochSink for ReplicaConn {
    fn begin_epoch(&self, epoch: u64, drain: Duration) -> std::result::Result<(), String> {
        self.sec.inner().mark_drain.record(drain);
        self.sec.begin_epoch(self.token, epoch)
    }
}

/// The export's own backend only describes the disk: replication requests go through the
/// [`ReplicaConn`] the server opens for each connection ([`EpochSink::connect`]), so a write
/// without one is refused rather than applied outside any session.
impl Backend for ReplicaSink {
    fn size(&self) -> u64 {
        self.0.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.0.disk.read_at(offset, len)
    }
    fn write_at(&self, _offset: u64, _data: IoBuf, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async { Err(no_session()) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.0.sync.sync(&*self.0.disk))
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(no_session()) })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async { Err(no_session()) })
    }
}

/// Why a request of a fenced-off replication connection is refused.
const FENCED: &str = "this replication connection belongs to an interrupted session";

fn no_session() -> StorageError {
    StorageError::Unavailable("a replication write outside any connection's session".into())
}

impl Backend for ReplicaConn {
    fn size(&self) -> u64 {
        self.sec.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.sec.disk.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        let s = &self.sec;
        let token = self.token;
        let len = data.len() as u64;
        Box::pin(async move {
            let apply = Box::pin(async move {
                s.disk.write_at(offset, data, false).await?;
                if fua {
                    s.sync.sync(&*s.disk).await?;
                }
                Ok(())
            });
            s.forwarded(token, Op::Write, offset, len, apply).await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.sec.sync.sync(&*self.sec.disk))
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let s = &self.sec;
        Box::pin(s.forwarded(
            self.token,
            Op::Discard,
            offset,
            len,
            s.disk.discard(offset, len),
        ))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        let s = &self.sec;
        Box::pin(s.forwarded(
            self.token,
            Op::WriteZeroes,
            offset,
            len,
            s.disk.write_zeroes(offset, len, may_unmap),
        ))
    }
}

/// What clients of the secondary's `--export` see.
#[derive(Debug)]
pub struct SecondaryView(Arc<Secondary>);

impl Backend for SecondaryView {
    fn size(&self) -> u64 {
        self.0.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(self.0.view_read(offset, len))
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        let len = data.len() as u64;
        Box::pin(self.0.view_write(Op::Write, offset, len, Some(data), fua))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.0.disk.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.0.view_write(Op::Discard, offset, len, None, false))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.0.view_write(Op::WriteZeroes, offset, len, None, false))
    }
}

/// Data connections on an authenticating port join the session that RESUME started.
impl SessionKeys for Secondary {
    fn current(&self) -> Option<(u64, SessionKey)> {
        let i = self.inner();
        match (i.mode, i.session_key) {
            (Mode::Replicating, Some(k)) => Some((i.token, k)),
            _ => None,
        }
    }
}

/// Why a primary is refused. Only `reason` goes to the peer; the generation numbers stay in
/// this node's log and status, because a peer that learns them could pose as a primary of
/// this node's lineage in its next HELLO.
#[derive(Debug)]
struct Refusal {
    reason: String,
    lineage: Option<String>,
}

impl Refusal {
    fn plain(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            lineage: None,
        }
    }

    fn with_lineage(reason: impl Into<String>, lineage: String) -> Self {
        Self {
            reason: reason.into(),
            lineage: Some(lineage),
        }
    }

    /// The whole story, for this node's operator.
    fn local(&self) -> String {
        match &self.lineage {
            Some(l) => format!("{} ({l})", self.reason),
            None => self.reason.clone(),
        }
    }
}

/// Serves control connections from the primary (one session at a time).
#[derive(Debug)]
pub struct SecondaryControl(Arc<Secondary>);

impl ControlHandler for SecondaryControl {
    fn take_over(
        &self,
        rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        peer: String,
        session: Option<SessionKey>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let s = self.0.clone();
        Box::pin(async move { run_control(s, rd, wr, peer, session).await })
    }
}

impl Secondary {
    /// Whether the disk holds no data at all (every byte in a hole).
    async fn disk_is_empty(&self) -> Result<bool> {
        let data = crate::storage::data_ranges(&*self.disk, 0, self.disk.size()).await?;
        Ok(data.is_empty())
    }

    /// How a primary that says HELLO with these fields must bring this disk up to date, or
    /// why it may not replicate here (split-brain, a newer disk, a busy node).
    async fn admit(
        &self,
        size: u64,
        generation: u64,
        history: &[u64],
        tracked: u64,
    ) -> std::result::Result<SyncKind, Refusal> {
        let m = self.meta.get();
        let (mode, fresh) = {
            let i = self.inner();
            (i.mode, i.fresh)
        };
        let lineage = format!(
            "this node's generation {:016x}, the primary's {generation:016x}",
            m.generation
        );
        match mode {
            Mode::Waiting | Mode::Paused => {}
            Mode::Primary => {
                let reason = if m.history.contains(&generation) {
                    "this node failed over and serves as the primary now, with data that descends from the connecting primary's; to re-protect it, restart the old primary's node as a secondary of this one"
                } else {
                    "split-brain: this node failed over and the connecting primary has written data of its own since; neither disk is a copy of the other. Choose the survivor and restart the other node as its secondary with --discard-my-data"
                };
                return Err(Refusal::with_lineage(reason, lineage));
            }
            other => {
                return Err(Refusal::plain(format!(
                    "this secondary is {} and takes no new primary",
                    other.name()
                )))
            }
        }
        if size != self.disk.size() {
            return Err(Refusal::plain(format!(
                "disk sizes differ: primary {size} bytes, secondary {} bytes",
                self.disk.size()
            )));
        }
        if fresh {
            let empty = self
                .disk_is_empty()
                .await
                .map_err(|e| Refusal::plain(format!("reading the secondary disk: {e}")))?;
            return Ok(if empty {
                SyncKind::Full
            } else {
                SyncKind::Checksum
            });
        }
        if m.generation == generation || history.contains(&m.generation) {
            // Same lineage, or this disk is behind the primary's: nothing of ours is lost.
            return Ok(if tracked != 0 && tracked == m.generation {
                SyncKind::Incremental
            } else {
                SyncKind::Checksum
            });
        }
        let why = if m.history.contains(&generation) {
            "this disk holds newer data than the primary's: it was written as a primary after the primary's data"
        } else {
            "split-brain: the primary's data and this disk's have both been written since they were last in sync"
        };
        if self.opts.discard_my_data {
            tracing::warn!(
                "{why} ({lineage}); discarding this disk's data as asked (--discard-my-data)"
            );
            return Ok(SyncKind::Checksum);
        }
        Err(Refusal::with_lineage(
            format!("{why}. Refusing to replicate: restart this secondary with --discard-my-data to take the primary's data, or make this node the primary"),
            lineage,
        ))
    }

    /// After a clean end of the session of `token`: record that the disk is the checkpoint of
    /// epoch `committed` at rest, once the disk holds it durably.
    async fn store_clean(&self, token: u64, committed: u64) {
        // No forwarded request is in progress after this, and no RESUME (which marks the
        // disk unclean) runs until the metadata is stored.
        let _x = self.barrier.write().await;
        if let Err(e) = self.sync.sync(&*self.disk).await {
            self.set_error(format!(
                "flushing the disk after the primary's GOODBYE: {e}; it stays marked unclean"
            ));
            return;
        }
        {
            let i = self.inner();
            if i.token != token || i.mode != Mode::Waiting {
                // Another primary connected meanwhile: its session decides.
                return;
            }
        }
        self.store_meta(|m| {
            m.clean = true;
            m.committed = committed;
        });
    }

    /// Write to the disk what `pick` takes from the buffer for each of `blocks` (the last
    /// block clipped to the disk's size); blocks `pick` has nothing for are left alone.
    async fn write_back(
        &self,
        blocks: &[u64],
        pick: impl Fn(&DiskBuffer, u64) -> std::io::Result<Option<Vec<u8>>>,
    ) -> Result<()> {
        let size = self.disk.size();
        for &b in blocks {
            let data = pick(&self.inner().buffer, b)
                .map_err(|e| spill_error(b * BUFFER_BLOCK, BUFFER_BLOCK, e))?;
            let Some(mut data) = data else { continue };
            let off = b * BUFFER_BLOCK;
            data.truncate(BUFFER_BLOCK.min(size - off) as usize);
            self.disk
                .write_at(off, IoBuf::from_slice(&data), false)
                .await?;
        }
        Ok(())
    }

    /// A new session begins after an interrupted one: write the originals of every open
    /// epoch back, so that the disk is exactly the last checkpoint again before the primary
    /// compares and resends. Whatever the interrupted epochs wrote here — forwarded writes,
    /// or anything else that reached the disk through a data connection of that session —
    /// is gone, and the primary's dirty bitmap (every block of every uncommitted epoch, and
    /// every write since) decides alone what comes back. Returns the blocks rewritten.
    async fn roll_back_open(&self) -> Result<u64> {
        // No forwarded request is in progress after this.
        let _x = self.barrier.write().await;
        let blocks = self.inner().buffer.original_blocks();
        self.write_back(&blocks, |buf, b| buf.oldest_original(b))
            .await?;
        if !blocks.is_empty() {
            self.sync.sync(&*self.disk).await?;
            self.inner().buffer.drop_originals();
        }
        Ok(blocks.len() as u64)
    }

    /// RESUME: the sync's comparison is done; take forwarded writes again from `epoch` on,
    /// on data connections that prove `key` when the port authenticates peers.
    async fn resume(&self, epoch: u64, key: Option<SessionKey>) -> std::result::Result<(), String> {
        // No forwarded request of an earlier connection is in progress after this.
        let _x = self.barrier.write().await;
        {
            let mut i = self.inner();
            if i.mode != Mode::Syncing {
                return Err(format!("RESUME while {}", i.mode.name()));
            }
            if epoch == 0 {
                return Err("RESUME to epoch 0".into());
            }
            // The interrupted epochs were rolled back at HELLO: no originals are left.
            debug_assert_eq!(i.buffer.stats().epochs, 0);
            i.token += 1;
            i.session_key = key;
            i.current = epoch;
            i.next_commit = epoch;
            i.counts.clear();
            i.poisoned.clear();
            i.mode = Mode::Replicating;
        }
        // From the first forwarded write on, the disk is no checkpoint at rest.
        self.store_meta(|m| m.clean = false);
        Ok(())
    }
}

async fn run_control(
    s: Arc<Secondary>,
    mut rd: BufReader<ReadHalf>,
    wr: BufWriter<WriteHalf>,
    peer: String,
    key: Option<SessionKey>,
) {
    let wr: SharedWriter = Arc::new(tokio::sync::Mutex::new(wr));
    let hello = match tokio::time::timeout(s.opts.hello_timeout, read_message(&mut rd)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => {
            s.set_error(format!("control connection from {peer}: {e}"));
            return;
        }
        Err(_) => {
            s.set_error(format!(
                "control connection from {peer}: no HELLO within {:?}",
                s.opts.hello_timeout
            ));
            return;
        }
    };
    let Message::Hello {
        size,
        generation,
        history,
        tracked,
        committed: _,
        session,
        ack,
        heartbeat_ms,
    } = hello
    else {
        let _ = send(
            &wr,
            &Message::Refused {
                reason: format!("expected HELLO, got {}", hello.name()),
            },
        )
        .await;
        s.set_error(format!(
            "control connection from {peer}: expected HELLO, got {}",
            hello.name()
        ));
        return;
    };
    let refuse = |reason: String| Message::Refused { reason };
    if let Err(reason) = wire::check_heartbeat_ms(heartbeat_ms) {
        s.set_error(format!("refusing primary {peer}: {reason}"));
        let _ = send(&wr, &refuse(reason)).await;
        return;
    }
    let kind = match s.admit(size, generation, &history, tracked).await {
        Ok(k) => k,
        Err(r) => {
            s.set_error(format!("refusing primary {peer}: {}", r.local()));
            let _ = send(&wr, &refuse(r.reason)).await;
            return;
        }
    };
    let taken = {
        let mut i = s.inner();
        let free = matches!(i.mode, Mode::Waiting | Mode::Paused);
        if free {
            i.mode = Mode::Syncing;
            i.token += 1;
            i.session = Some(session);
            i.peer = Some(peer.clone());
            i.sync = Some((kind, generation, history.clone()));
        }
        (!free).then(|| i.mode.name())
    };
    if let Some(mode) = taken {
        let _ = send(
            &wr,
            &refuse(format!(
                "this secondary is {mode}: another primary came first"
            )),
        )
        .await;
        return;
    }
    match s.roll_back_open().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            %peer,
            blocks = n,
            "rolled the interrupted epochs back to the last checkpoint"
        ),
        Err(e) => {
            let reason = format!("rolling the interrupted epochs back: {e}");
            s.set_error(format!("primary {peer}: {reason}"));
            let _ = send(&wr, &refuse(reason)).await;
            let mut i = s.inner();
            if i.mode == Mode::Syncing {
                i.mode = Mode::Paused;
                i.token += 1;
            }
            return;
        }
    }
    let (committed, consistent) = {
        let i = s.inner();
        (i.committed, i.consistent)
    };
    let welcome = Message::Welcome {
        size,
        // The primary has no use for it, and a peer must not learn this node's lineage.
        generation: 0,
        committed,
        sync: kind,
        consistent,
    };
    if let Err(e) = send(&wr, &welcome).await {
        s.set_error(format!("primary {peer}: {e}"));
        let mut i = s.inner();
        if i.mode == Mode::Syncing {
            i.mode = Mode::Paused;
            i.token += 1;
        }
        return;
    }
    tracing::info!(%peer, ack = ack.name(), sync = kind.name(), session = format!("{session:016x}"), "a primary connected");
    let patience =
        Duration::from_millis(u64::from(heartbeat_ms) * u64::from(s.opts.heartbeat_misses.max(1)));
    // SUMS answers being computed or waiting; dropped (aborted) with the session.
    let mut sums_tasks = tokio::task::JoinSet::new();
    let session_sums = Arc::new(tokio::sync::Semaphore::new(1));
    let end = loop {
        let m = match tokio::time::timeout(patience, read_message(&mut rd)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => break Err(e),
            Err(_) => {
                break Err(format!(
                    "no message for {patience:?} ({} missed heartbeats)",
                    s.opts.heartbeat_misses
                ))
            }
        };
        let reply = match m {
            Message::Heartbeat { seq } => {
                s.inner().heartbeats += 1;
                Message::HeartbeatAck { seq }
            }
            Message::Checkpoint { epoch, summaries } => {
                // COMMITTED (and the metadata a first commit after a sync stores) says epoch
                // `epoch` is on this disk: flush it first. Every write of the epoch finished
                // before its mark was answered, so one flush covers it. The flush may take a
                // while: heartbeats go on meanwhile (checkpoints never overlap), and a commit
                // that finds its session ended (the token moved on) commits nothing.
                let token = s.inner().token;
                let (s2, wr2) = (s.clone(), wr.clone());
                tokio::spawn(async move {
                    let r = match s2.sync.sync(&*s2.disk).await {
                        Ok(()) => s2.commit(token, epoch, &summaries),
                        Err(e) => Err(format!("flushing the secondary disk: {e}")),
                    };
                    let m = match r {
                        Ok(()) => Message::Committed { epoch },
                        Err(reason) => {
                            s2.inner().aborted += 1;
                            s2.set_error(format!("checkpoint of epoch {epoch} aborted: {reason}"));
                            Message::Aborted { epoch, reason }
                        }
                    };
                    let _ = send(&wr2, &m).await;
                });
                continue;
            }
            Message::SumsRequest {
                id,
                unit_blocks,
                units,
            } => {
                // Units come from the peer: one past the end of the disk is a broken or
                // hostile primary, refused before any work.
                let nblocks = digest::blocks(s.disk.size());
                if let Err(e) = digest::check_units(&units, u64::from(unit_blocks), nblocks) {
                    let reason = format!("SUMS_REQUEST {id}: {e}");
                    let _ = send(&wr, &refuse(reason.clone())).await;
                    break Err(reason);
                }
                // Reading may take a while: answer in the background, heartbeats go on. An
                // honest primary asks one batch at a time (verify may overlap a little), so a
                // longer queue is a flood: end the session rather than queue it.
                while sums_tasks.try_join_next().is_some() {}
                if sums_tasks.len() >= MAX_QUEUED_SUMS {
                    let reason = format!(
                        "more than {MAX_QUEUED_SUMS} SUMS requests at once from the primary"
                    );
                    let _ = send(&wr, &refuse(reason.clone())).await;
                    break Err(reason);
                }
                let (s2, wr2, one) = (s.clone(), wr.clone(), session_sums.clone());
                sums_tasks.spawn(async move {
                    // One request of this session at a time, and few across sessions: the
                    // disk also serves forwarded writes.
                    let Ok(_mine) = one.acquire_owned().await else {
                        return;
                    };
                    let Ok(_any) = s2.sums_slots.acquire().await else {
                        return;
                    };
                    let m = match digest::unit_sums(&*s2.disk, &units, u64::from(unit_blocks)).await
                    {
                        Ok(sums) => Message::Sums { id, sums },
                        Err(e) => Message::Refused {
                            reason: format!("reading the secondary disk for digests: {e}"),
                        },
                    };
                    let _ = send(&wr2, &m).await;
                });
                continue;
            }
            Message::Resume { epoch } => match s.resume(epoch, key).await {
                Ok(()) => {
                    tracing::info!(%peer, epoch, "replication resumed");
                    Message::ResumeAck { epoch }
                }
                Err(reason) => {
                    let _ = send(&wr, &refuse(reason.clone())).await;
                    break Err(reason);
                }
            },
            Message::Goodbye { reason } => break Ok(reason),
            other => {
                let reason = format!("unexpected {} from the primary", other.name());
                let _ = send(&wr, &refuse(reason.clone())).await;
                break Err(reason);
            }
        };
        if let Err(e) = send(&wr, &reply).await {
            break Err(e);
        }
    };
    // Nobody reads the answers any more.
    drop(sums_tasks);
    match end {
        Ok(reason) => {
            tracing::info!(%peer, %reason, "the primary ended replication");
            let (clean, token) = {
                let mut i = s.inner();
                if !matches!(i.mode, Mode::Replicating | Mode::Syncing) {
                    return;
                }
                // A clean end comes right after a final checkpoint: nothing is open.
                i.mode = Mode::Waiting;
                i.peer = None;
                i.token += 1;
                i.session_key = None;
                let clean = i.buffer.stats().blocks == 0 && i.sync.is_none();
                (clean.then_some(i.committed), i.token)
            };
            if let Some(c) = clean {
                s.store_clean(token, c).await;
            }
        }
        Err(e) => {
            s.set_error(format!("lost the primary {peer}: {e}"));
            let policy = {
                let mut i = s.inner();
                if !matches!(i.mode, Mode::Replicating | Mode::Syncing) {
                    return;
                }
                i.mode = Mode::Paused;
                i.token += 1;
                i.session_key = None;
                s.opts.on_peer_loss
            };
            if policy == PeerLossPolicy::Failover {
                match s.failover(FailoverTarget::Checkpoint).await {
                    Ok(r) => tracing::info!(?r, "automatic failover done"),
                    Err(e) => s.set_error(format!("automatic failover failed: {e}")),
                }
            } else {
                tracing::info!(
                    "paused: waiting for the primary to reconnect (or for `lockstep failover`)"
                );
            }
        }
    }
}
