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
//!
//! Where each part lives:
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the [`Secondary`]: modes, state, status |
//! | [`apply`] | forwarded writes: copy-before-write, epoch marks, the replication export |
//! | [`commit`] | committing an epoch, all participants or none |
//! | [`crate::epoch::SecondaryParticipant`] | the seam other participants (memory, network) implement |
//! | [`block`] | the block layer's half of the checkpoint |
//! | [`view`] | the secondary's own view (local clients) |
//! | [`failover`] | failover and roll-back to the last checkpoint |
//! | [`control`] | the control session with the primary (HELLO … GOODBYE) |
//!
//! The admission rule (who may replicate here, and how it syncs) is the pure
//! [`crate::replica::admission::decide`].

mod apply;
mod block;
mod commit;
mod control;
mod failover;
mod view;

pub use crate::epoch::SecondaryParticipant;
pub use apply::{ReplicaConn, ReplicaSink};
pub use control::SecondaryControl;
pub use view::SecondaryView;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roaring::RoaringTreemap;

use super::buffer::{BufferStats, DiskBuffer, BUFFER_BLOCK};
use super::events::NodeEvents;
use super::meta::{MetaStore, NodeMeta};
pub use super::status::FailoverReport;
use super::status::SecondaryStatus;
use super::wire::{AckMode, SyncKind};
use crate::auth::{SessionKey, SessionKeys};
use crate::epoch::Latencies;
use crate::storage::{Backend, Op, StorageError};
use crate::sync::{BlockRangeLock, GroupSync, Locked, Unfinished};

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
    /// The running (or last) session's ack mode: `received` answers forwarded writes on
    /// receipt and applies them afterwards.
    ack: AckMode,
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
    /// When the running session's primary was last heard from (any message), and how long
    /// its silence may last before it counts as lost (heartbeat period × misses).
    heard: Option<(std::time::Instant, std::time::Duration)>,
    /// Checkpoints committed in the running (or last) session: a primary that is lost
    /// before its first one may never have finished starting.
    session_commits: u64,
    /// How long each epoch mark held the replication connection (the forwarding stall).
    mark_drain: Latencies,
}

/// The secondary node's replication state around its disk.
pub struct Secondary {
    disk: Arc<dyn Backend>,
    opts: SecondaryOptions,
    inner: Mutex<Inner>,
    locks: Arc<BlockRangeLock>,
    /// Forwarded and local I/O hold it shared (a write acknowledged on receipt until it is
    /// applied); failover, RESUME and GOODBYE hold it exclusively.
    barrier: Arc<tokio::sync::RwLock<()>>,
    /// Forwarded writes acknowledged on receipt (ack mode `received`) and not applied yet:
    /// a FLUSH and a checkpoint wait for them.
    early: Arc<Unfinished>,
    sync: GroupSync,
    dirty: Mutex<RoaringTreemap>,
    meta: MetaStore,
    /// SUMS requests computed at once, over all control sessions.
    sums_slots: tokio::sync::Semaphore,
    /// Checkpoint participants besides the block layer.
    participants: Mutex<Vec<Arc<dyn SecondaryParticipant>>>,
    /// State changes, for `lockstep events`.
    events: NodeEvents,
}

impl std::fmt::Debug for Secondary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secondary")
            .field("mode", &self.mode())
            .field("participants", &self.others().len())
            .finish_non_exhaustive()
    }
}

/// SUMS requests computed at once on one secondary, over all sessions.
const SUMS_AT_ONCE: usize = 2;
/// SUMS requests of one session computed at once (a syncing primary keeps two in flight).
const SUMS_PER_SESSION: usize = 2;
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
                ack: AckMode::Durable,
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
                heard: None,
                session_commits: 0,
                mark_drain: Latencies::default(),
            }),
            locks: Arc::default(),
            barrier: Arc::default(),
            early: Arc::default(),
            sync: GroupSync::default(),
            dirty: Mutex::new(RoaringTreemap::new()),
            meta,
            sums_slots: tokio::sync::Semaphore::new(SUMS_AT_ONCE),
            participants: Mutex::new(Vec::new()),
            events: NodeEvents::default(),
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

    /// Return once a flush of the disk that started after this call has completed; flushes
    /// requested meanwhile share one.
    async fn flush_disk(&self) -> crate::storage::Result<()> {
        self.sync.run(|| self.disk.flush()).await
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.locked()
    }

    /// Where this node's state changes are published.
    pub fn events(&self) -> &NodeEvents {
        &self.events
    }

    /// Switch `i` (this node's state, locked) to `mode`, publishing the change.
    fn switch(&self, i: &mut Inner, mode: Mode, reason: Option<&str>) {
        let role = if mode == Mode::Primary {
            "primary"
        } else {
            "secondary"
        };
        self.events.mode(role, i.mode.name(), mode.name(), reason);
        i.mode = mode;
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

    /// The status report.
    pub fn status(&self) -> SecondaryStatus {
        let participants = self
            .others()
            .iter()
            .map(|p| (p.name().to_string(), p.status()))
            .collect();
        let dirty_blocks = self.dirty.locked().len();
        let generation = format!("{:016x}", self.meta.get().generation);
        let i = self.inner();
        SecondaryStatus {
            role: if i.mode == Mode::Primary {
                "primary"
            } else {
                "secondary"
            }
            .into(),
            mode: i.mode.name().into(),
            epoch: i.current,
            committed_epoch: i.committed,
            peer: i.peer.clone(),
            peer_state: match i.mode {
                Mode::Replicating | Mode::Syncing => "connected",
                Mode::Paused => "lost",
                Mode::Waiting => "waiting",
                _ => "none",
            }
            .into(),
            consistent: i.consistent,
            resyncing: i.sync.as_ref().map(|(k, _, _)| k.name().into()),
            last_sync: i.last_sync.map(Into::into),
            generation,
            session: i.session.map(|s| format!("{s:016x}")),
            buffer: i.buffer.stats(),
            forwarded_writes: i.forwarded_writes,
            forwarded_bytes: i.forwarded_bytes,
            checkpoints: i.checkpoints,
            checkpoints_aborted: i.aborted,
            heartbeats: i.heartbeats,
            mark_drain_us: i.mark_drain.summary(),
            checkpoint_digest: i.committed_digest.map(|d| format!("{d:016x}")),
            failover: i.failover.clone(),
            dirty_blocks,
            participants,
            last_error: i.last_error.clone(),
            peer_auth: None,
        }
    }

    fn set_error(&self, e: impl Into<String>) {
        let e = e.into();
        tracing::warn!("{e}");
        self.inner().last_error = Some(e);
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
