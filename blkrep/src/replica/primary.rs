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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::wire::AckMode;
use super::PARTICIPANT_BLOCK;
use crate::digest::{self, DigestTable, DIGEST_BLOCK};
use crate::epoch::{BoxFuture, CheckpointTrigger, Epoch, EpochError, EpochSummary, Participant};
use crate::nbd::client::NbdClient;
use crate::storage::{check_range, Backend, BlockRangeLock, Extent, IoBuf, IoFuture, Op, Result};

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
    /// The secondary is gone: writing locally, recording dirty blocks.
    Unprotected,
}

#[derive(Debug)]
enum FwdKind {
    Write { data: IoBuf, fua: bool },
    Trim,
    Zeroes { may_unmap: bool },
    Flush,
    Mark { epoch: u64 },
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
}

/// Budget units are KiB so that u32 permits cover large queues.
fn cost(len: u64) -> u32 {
    u32::try_from(len.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
}

impl Primary {
    /// A primary over `local`, whose digest table is `digest`, starting in epoch
    /// `committed + 1` and replicating.
    pub fn new(
        local: Arc<dyn Backend>,
        digest: DigestTable,
        committed: u64,
        opts: PrimaryOptions,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let units = cost(opts.queue_bytes).min(Semaphore::MAX_PERMITS as u32) as usize;
        Arc::new(Self {
            local,
            digest,
            locks: BlockRangeLock::default(),
            gate: tokio::sync::RwLock::new(()),
            st: Mutex::new(State {
                mode: PrimaryMode::Replicating,
                epoch: committed + 1,
                committed,
                counts: BTreeMap::new(),
                written: BTreeMap::new(),
                dirty: RoaringTreemap::new(),
                marks: HashMap::new(),
                unprotected_reason: None,
                unprotected_since: None,
            }),
            queue: tx,
            queue_rx: Mutex::new(Some(rx)),
            space: Arc::new(Semaphore::new(units)),
            queued_ops: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            forwarded_ops: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            trigger: OnceLock::new(),
            lost: watch::Sender::new(None),
            stop: watch::Sender::new(false),
            opts,
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
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
        serde_json::json!({
            "mode": match st.mode { PrimaryMode::Replicating => "replicating", PrimaryMode::Unprotected => "unprotected" },
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

    /// Stop replicating: from now on writes stay local and are recorded as dirty, together
    /// with everything written in epochs the secondary has not committed. Idempotent.
    pub async fn go_unprotected(&self, reason: &str) {
        let _g = self.gate.write().await;
        let mut st = self.st();
        if st.mode == PrimaryMode::Unprotected {
            return;
        }
        st.mode = PrimaryMode::Unprotected;
        st.unprotected_reason = Some(reason.to_string());
        st.unprotected_since = Some(Instant::now());
        let written = std::mem::take(&mut st.written);
        for (_, w) in written {
            st.dirty |= w;
        }
        st.marks.clear();
        drop(st);
        tracing::warn!(%reason, "the secondary is lost: running unprotected, recording dirty blocks");
        self.lost.send_replace(Some(reason.to_string()));
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
        let waits = {
            let _gate = self.gate.read().await;
            for (b, h) in hashes {
                self.digest.set(b, h);
            }
            let mut st = self.st();
            match st.mode {
                PrimaryMode::Unprotected => {
                    st.dirty.insert_range(first..=last);
                    false
                }
                PrimaryMode::Replicating => {
                    let epoch = st.epoch;
                    let c = st.counts.entry(epoch).or_default();
                    c.items += 1;
                    c.bytes += len;
                    st.written
                        .entry(epoch)
                        .or_default()
                        .insert_range(first..=last);
                    drop(st);
                    self.queued_ops.fetch_add(1, Ordering::Relaxed);
                    self.queued_bytes.fetch_add(len, Ordering::Relaxed);
                    let _ = self.queue.send(FwdOp {
                        kind,
                        offset,
                        len,
                        done: Some(tx),
                        _permit: permit,
                    });
                    if let Some(t) = self.trigger.get() {
                        t.add_bytes(len);
                    }
                    self.opts.ack != AckMode::Local
                }
            }
        };
        drop(_g);
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
        self.queue_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
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
                    (FwdKind::Flush, _) => !inflight.is_empty(),
                    (_, Some((a, b))) => inflight
                        .values()
                        .any(|(r, _)| r.is_some_and(|(x, y)| x <= b && a <= y)),
                    _ => false,
                };
                if blocked || inflight.len() >= self.opts.max_inflight {
                    held = Some(op);
                    break;
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
            return;
        }
        self.go_unprotected(&failure).await;
        // Release every waiter: their data is local and their blocks are dirty.
        tasks.abort_all();
        inflight.clear();
        drop(held);
        rx.close();
        while let Some(op) = rx.recv().await {
            drop(op);
        }
        self.queued_ops.store(0, Ordering::Relaxed);
        self.queued_bytes.store(0, Ordering::Relaxed);
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
            return Err(EpochError::PeerLost {
                epoch,
                reason: st.unprotected_reason.clone().unwrap_or_default(),
            });
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
    }

    fn abort(&self, epoch: Epoch, reason: &EpochError) {
        // A checkpoint that cannot commit leaves the secondary behind for good (no resync
        // yet): stop replicating; the blocks of every open epoch become dirty.
        let p = self.0.clone();
        let reason = format!("checkpoint of {epoch} failed: {reason}");
        tokio::spawn(async move { p.go_unprotected(&reason).await });
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
                let _ = rx.await;
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
