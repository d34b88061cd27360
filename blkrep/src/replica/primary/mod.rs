//! The primary: local I/O, every modification forwarded to the secondary in order, the
//! block participant of checkpoint epochs, unprotected mode with a dirty bitmap.
//!
//! ```text
//!  client write ─▶ range lock ─▶ local disk ─▶ gate(read): digest, epoch accounting,
//!                                               enqueue ─▶ ForwardQueue ─▶ forwarder task
//!                                                                              │ NBD, pipelined
//!  ack: local = after enqueue; received / durable / sync = after the secondary's reply ◀┘
//!  checkpoint cut(n) = gate(write): epoch n+1 begins, epoch mark n+1 enqueued, digest taken
//! ```
//!
//! Two modifications touching the same 4 KiB block are never in flight to the secondary at
//! once (the forwarder holds the later one back), and their queue order is their order on
//! the local disk (the range lock covers both), so both disks apply them in the same order.
//!
//! One concept per file:
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | [`Primary`], its options, construction, accessors, status |
//! | `state.rs` | [`PrimaryMode`], the mutable state, link lost / paused / unprotected / resumed |
//! | `write.rs` | the client write path ([`Backend`] impl: write, trim, zeroes, flush) |
//! | `queue.rs` | the forward queue: what the secondary must see, in order; barrier |
//! | `forward.rs` | the forwarder task draining it: connection, start, run loop, stop |
//! | `resync.rs` | dirty units, the digest comparison, sending dirty blocks, progress for status |
//! | `repair.rs` | `verify --repair`: differing chunks made dirty and resent while replicating |
//! | `participant.rs` | [`BlockParticipant`]: cutting, preparing and committing epochs |

mod forward;
mod participant;
mod queue;
mod repair;
mod resync;
mod state;
mod write;

pub use crate::replica::status::ResyncStats;
use crate::replica::status::{BlockStatus, ForwardQueue};
pub use forward::open_replica_connection;
pub use participant::BlockParticipant;
pub use queue::wait_idle;
pub use resync::Sent;
pub use state::PrimaryMode;
pub use write::BlockLock;

use crate::sync::{BlockRangeLock, Locked};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use roaring::{RoaringBitmap, RoaringTreemap};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use super::bitmap::{self, DiskBitmap};
use super::events::NodeEvents;
use super::meta::MetaStore;
use super::wire::AckMode;
use crate::digest::DigestTable;
use crate::epoch::CheckpointTrigger;
use crate::storage::Backend;
use queue::FwdOp;
use state::State;

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
            ack: AckMode::Durable,
            queue_bytes: 16 << 20,
            max_inflight: 256,
        }
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
    /// The running session's forwarder task (see [`forward`]).
    forwarder: Mutex<Option<JoinHandle<()>>>,
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
    /// The dirty bitmap on disk, which a restarted primary starts from.
    bitmap: OnceLock<Arc<DiskBitmap>>,
    /// State changes, for `lockstep events`.
    events: NodeEvents,
}

/// Budget units are KiB so that u32 permits cover large queues.
fn cost(len: u64) -> u32 {
    u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl Primary {
    /// The forward queue budget a request of `len` bytes takes: one larger than the whole
    /// queue (`--forward-queue`) takes all of it, so it waits until the queue is empty
    /// instead of forever.
    fn budget(&self, len: u64) -> u32 {
        let all = cost(self.opts.queue_bytes).min(Semaphore::MAX_PERMITS as u32);
        cost(len).min(all)
    }

    /// A primary over `local`, whose digest table is `digest`, starting in epoch
    /// `committed + 1`, paused until a secondary is synced ([`Primary::resumed`]).
    pub fn new(
        local: Arc<dyn Backend>,
        digest: DigestTable,
        committed: u64,
        opts: PrimaryOptions,
        meta: Arc<MetaStore>,
    ) -> Arc<Self> {
        // Ack mode `sync`: the primary's own writes are durable when they complete too.
        let local: Arc<dyn Backend> = match opts.ack {
            AckMode::Sync => Arc::new(crate::storage::WriteThrough(local)),
            _ => local,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let units = cost(opts.queue_bytes).min(Semaphore::MAX_PERMITS as u32) as usize;
        Arc::new(Self {
            local,
            digest,
            locks: BlockRangeLock::default(),
            gate: tokio::sync::RwLock::new(()),
            st: Mutex::new(State::new(committed)),
            queue: tx,
            queue_rx: Mutex::new(Some(rx)),
            forwarder: Mutex::new(None),
            space: Arc::new(Semaphore::new(units)),
            queued_ops: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            forwarded_ops: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            trigger: OnceLock::new(),
            lost: watch::Sender::new(Some(state::NOT_CONNECTED_YET.into())),
            stop: watch::Sender::new(false),
            meta,
            tracked: AtomicU64::new(0),
            bitmap: OnceLock::new(),
            events: NodeEvents::default(),
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

    /// Keep the dirty bitmap on disk in `bitmap` from now on, starting from what it held:
    /// its `marked` extents become dirty, relative to secondary generation `tracked`. Call
    /// before the first session and the first client.
    pub fn attach_bitmap(&self, bitmap: Arc<DiskBitmap>, tracked: u64, marked: &RoaringBitmap) {
        let blocks = bitmap.blocks_of(marked);
        {
            let mut st = self.st();
            st.dirty |= blocks;
        }
        self.tracked.store(tracked, Ordering::Release);
        let _ = self.bitmap.set(bitmap);
    }

    /// Where this node's state changes are published.
    pub fn events(&self) -> &NodeEvents {
        &self.events
    }

    /// The dirty bitmap on disk, if one is kept.
    pub(super) fn disk_bitmap(&self) -> Option<&Arc<DiskBitmap>> {
        self.bitmap.get()
    }

    /// After a commit: clear the extents of the bitmap on disk that no longer hold anything
    /// the secondary may lack (at most once per [`bitmap::CLEAR_PERIOD`], in the background).
    pub(super) fn maintain_bitmap(self: &Arc<Self>) {
        let Some(bm) = self.bitmap.get().cloned() else {
            return;
        };
        if !bm.clear_due() {
            return;
        }
        let needed = {
            let st = self.st();
            let mut blocks = st.dirty.clone();
            for w in st.written.values() {
                blocks |= w;
            }
            bitmap::extents_of_blocks(&blocks)
        };
        let me = self.clone();
        tokio::spawn(async move {
            match bm.clear_unneeded(needed, me.local.flush()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(extents = n, "dirty bitmap: extents cleared"),
                Err(e) => tracing::warn!("dirty bitmap: clearing: {e}"),
            }
        });
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
    pub fn status(&self) -> BlockStatus {
        let st = self.st();
        let m = self.meta.get();
        BlockStatus {
            mode: st.mode.name().into(),
            resyncing: st.resyncing,
            resync: st.resync_view(),
            generation: format!("{:016x}", m.generation),
            tracked_generation: format!("{:016x}", self.tracked()),
            ack: self.opts.ack.name().into(),
            forward_queue: ForwardQueue {
                depth: self.queued_ops.load(Ordering::Relaxed),
                bytes: self.queued_bytes.load(Ordering::Relaxed),
                limit_bytes: self.opts.queue_bytes,
            },
            forwarded_writes: self.forwarded_ops.load(Ordering::Relaxed),
            forwarded_bytes: self.forwarded_bytes.load(Ordering::Relaxed),
            dirty_blocks: st.dirty.len(),
            unprotected_reason: st.unprotected_reason.clone(),
            unprotected_for_s: st.unprotected_since.map(|t| t.elapsed().as_secs_f64()),
            digest: format!("{:016x}", self.digest.sum()),
            bitmap: self.bitmap.get().map(|b| b.stats()),
        }
    }
}
