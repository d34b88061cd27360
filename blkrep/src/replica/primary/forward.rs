//! The forwarder: the task that sends everything in the forward queue ([`super::queue`]) to
//! the secondary over the session's NBD "replica" connection, pipelined, in queue order per
//! block. Its connection is opened, and it is started, run and stopped here; the
//! [`Replicator`] calls these.
//!
//! ```text
//!  open_replica_connection (after RESUME_ACK) ─▶ start_forwarder ─▶ run:
//!    loop { submit_ready: take ops while order and the in-flight limit allow, send batch
//!           next_event:   a reply (complete the op) | a new op | stop | link lost }
//!    queue closed / stop ─▶ finish_in_flight, hand the queue back
//!    failure             ─▶ link_lost, release every waiter, empty the queue, hand it back
//!  stop_forwarder ─▶ join_forwarder (the replicator, when the session ends)
//! ```
//!
//! [`Replicator`]: crate::replica::session::Replicator

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};

use super::queue::{FwdKind, FwdOp};
use super::Primary;
use crate::auth::SessionKey;
use crate::nbd::client::{ClientOptions, NbdClient, Ticket};
use crate::replica::error::ReplicaError;
use crate::replica::wire::AckMode;
use crate::replica::REPLICA_EXPORT;
use crate::sync::Locked;
use crate::tls::ClientTls;
use crate::transport::Endpoint;

impl Primary {
    /// Start forwarding to the secondary over `client` (the session's replication
    /// connection), as a task; call after [`Primary::resumed`].
    pub fn start_forwarder(self: &Arc<Self>, client: NbdClient) {
        let task = tokio::spawn(self.clone().run_forwarder(client));
        // The previous session's forwarder has ended (the replicator waits for it); it hands
        // the queue back when it ends, so it must never be aborted.
        let previous = self.forwarder.locked().replace(task);
        debug_assert!(previous.is_none());
    }

    /// Stop the forwarder once what it has in flight is answered (at shutdown, after the
    /// last checkpoint).
    pub fn stop_forwarder(&self) {
        self.stop.send_replace(true);
    }

    /// Wait (at most `patience`) for the running forwarder to end: it ends by itself once
    /// the link is lost, or after [`Primary::stop_forwarder`].
    pub async fn join_forwarder(&self, patience: Option<Duration>) {
        let task = self.forwarder.locked().take();
        if let Some(f) = task {
            match patience {
                Some(d) => {
                    let _ = tokio::time::timeout(d, f).await;
                }
                None => {
                    let _ = f.await;
                }
            }
        }
    }

    /// Forward queued operations to the secondary over `client` until the queue closes or
    /// the secondary fails (then the primary goes unprotected). Run once, as a task.
    async fn run_forwarder(self: Arc<Self>, client: NbdClient) {
        let Some(rx) = self.queue_rx.locked().take() else {
            return;
        };
        let mut run = Forwarder {
            lost: self.lost(),
            stop: self.stop.subscribe(),
            sync: self.opts.ack == AckMode::Sync,
            max_inflight: self.opts.max_inflight,
            p: self,
            client,
            rx,
            inflight: HashMap::new(),
            answers: FuturesUnordered::new(),
            next_id: 0,
            held: None,
        };
        let end = run.run().await;
        match end {
            End::Closed => run.finish_in_flight().await,
            End::Failed(reason) => run.abandon(&reason).await,
        }
    }
}

/// Open the replication connection of a session to `secondary`: after RESUME_ACK, since the
/// secondary binds it to the resumed session, whose key (the control link's, when the port
/// authenticates peers) the connection proves.
pub async fn open_replica_connection(
    secondary: &Endpoint,
    session: Option<SessionKey>,
    connect_timeout: Duration,
    tls: Option<ClientTls>,
) -> std::result::Result<NbdClient, ReplicaError> {
    NbdClient::connect(
        secondary,
        &ClientOptions {
            export: REPLICA_EXPORT.into(),
            structured: true,
            connect_timeout,
            request_timeout: Some(Duration::from_secs(30)),
            session,
            tls,
        },
    )
    .await
    .map_err(|e| ReplicaError::Unreachable(format!("opening the replication connection: {e}")))
}

/// The secondary's answer to one in-flight request, by id.
type Answer = std::pin::Pin<
    Box<dyn std::future::Future<Output = (u64, std::result::Result<(), String>)> + Send + Sync>,
>;

/// Why the forwarder's loop ended.
enum End {
    /// The queue closed or the forwarder was told to stop: the primary is shutting down.
    Closed,
    /// The secondary failed or the link was lost: the primary pauses.
    Failed(String),
}

impl End {
    fn failed(context: &str, e: impl std::fmt::Display) -> Self {
        End::Failed(format!("{context}: {e}"))
    }
}

/// One forwarder run: the queue's receiver and what is in flight to the secondary.
struct Forwarder {
    p: Arc<Primary>,
    client: NbdClient,
    rx: mpsc::UnboundedReceiver<FwdOp>,
    lost: watch::Receiver<Option<String>>,
    stop: watch::Receiver<bool>,
    /// Sent and not answered yet, by id, with the blocks each covers.
    inflight: HashMap<u64, (Option<(u64, u64)>, FwdOp)>,
    /// One waiter per in-flight request, resolving to its id and the secondary's answer,
    /// polled by the forwarder itself (no task per request: the connection's reply reader
    /// wakes the forwarder directly).
    answers: FuturesUnordered<Answer>,
    next_id: u64,
    /// Taken from the queue but not sendable yet (order, or the in-flight limit).
    held: Option<FwdOp>,
    /// Every modification is forwarded with FUA (ack mode `sync`).
    sync: bool,
    max_inflight: usize,
}

impl Forwarder {
    /// Submit and wait for answers until the queue closes, the forwarder is told to stop,
    /// or something fails.
    async fn run(&mut self) -> End {
        loop {
            // Submit as much as order and the in-flight limit allow, then send the batch.
            let submitted = match self.submit_ready().await {
                Ok(n) => n,
                Err(end) => return end,
            };
            if submitted > 0 {
                if let Err(e) = self.client.send_submitted().await {
                    return End::failed("forwarding to the secondary", e);
                }
            }
            if let Err(end) = self.next_event().await {
                return end;
            }
        }
    }

    fn has_room(&self) -> bool {
        self.held.is_none() && self.inflight.len() < self.max_inflight
    }

    /// Submit queued operations until one must wait (for an earlier one on the same blocks,
    /// for everything before a flush or barrier, or for room in flight) or the queue is
    /// empty. Returns how many were submitted.
    async fn submit_ready(&mut self) -> Result<usize, End> {
        let mut submitted = 0usize;
        loop {
            if self.has_room() {
                match self.rx.try_recv() {
                    Ok(op) => self.held = Some(op),
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => return Err(End::Closed),
                }
            }
            let Some(mut op) = self.held.take() else {
                return Ok(submitted);
            };
            let range = op.blocks();
            if self.must_wait(&op.kind, range) {
                self.held = Some(op);
                return Ok(submitted);
            }
            if matches!(op.kind, FwdKind::Barrier) {
                // Everything queued before it has been answered.
                op.complete(Ok(()));
                continue;
            }
            let ticket = self
                .submit(&op)
                .await
                .map_err(|e| End::failed("forwarding to the secondary", e))?;
            let id = self.next_id;
            self.next_id += 1;
            self.answers.push(Box::pin(async move {
                (id, ticket.wait().await.map_err(|e| e.to_string()))
            }));
            self.inflight.insert(id, (range, op));
            submitted += 1;
        }
    }

    /// Whether an operation on `range` must wait: a flush or barrier for everything in
    /// flight, a modification for every in-flight one on the same blocks, any for room.
    fn must_wait(&self, kind: &FwdKind, range: Option<(u64, u64)>) -> bool {
        let blocked = match (kind, range) {
            (FwdKind::Flush | FwdKind::Barrier, _) => !self.inflight.is_empty(),
            (_, Some((a, b))) => self
                .inflight
                .values()
                .any(|(r, _)| r.is_some_and(|(x, y)| x <= b && a <= y)),
            _ => false,
        };
        blocked || self.inflight.len() >= self.max_inflight
    }

    /// Put `op` on the wire (it goes out with the batch).
    async fn submit(&self, op: &FwdOp) -> Result<Ticket, crate::nbd::NbdError> {
        let (c, sync) = (&self.client, self.sync);
        match &op.kind {
            FwdKind::Write { data, fua } => c.submit_write(op.offset, data, *fua || sync).await,
            FwdKind::Trim => c.submit_trim(op.offset, op.len as u32, sync).await,
            FwdKind::Zeroes { may_unmap } => {
                c.submit_write_zeroes(op.offset, op.len as u32, *may_unmap, sync)
                    .await
            }
            FwdKind::Flush => c.submit_flush().await,
            FwdKind::Mark { epoch } => c.submit_epoch_mark(*epoch).await,
            FwdKind::Barrier => unreachable!("barriers complete before submission"),
        }
    }

    /// Wait for the next answer, queued operation, stop or loss.
    async fn next_event(&mut self) -> Result<(), End> {
        let room = self.has_room();
        tokio::select! {
            Some((id, result)) = self.answers.next(), if !self.answers.is_empty() => {
                self.answered(id, result)
            }
            op = self.rx.recv(), if room => match op {
                Some(op) => {
                    self.held = Some(op);
                    Ok(())
                }
                None => Err(End::Closed),
            },
            _ = crate::epoch::until_true(&mut self.stop) => Err(End::Closed),
            _ = lost_changed(&mut self.lost) => {
                match self.p.lost.borrow().clone().unwrap_or_default() {
                    r if r.is_empty() => Err(End::Closed),
                    r => Err(End::Failed(r)),
                }
            }
        }
    }

    /// The secondary answered request `id`: complete it, or fail the run.
    fn answered(&mut self, id: u64, result: std::result::Result<(), String>) -> Result<(), End> {
        let Some((_, mut op)) = self.inflight.remove(&id) else {
            return Ok(());
        };
        if let Err(e) = &result {
            op.complete(Err(e.clone()));
            return Err(End::failed("the secondary failed a request", e));
        }
        if op.is_modification() {
            let p = &self.p;
            p.queued_ops.fetch_sub(1, Ordering::Relaxed);
            p.queued_bytes.fetch_sub(op.len, Ordering::Relaxed);
            p.forwarded_ops.fetch_add(1, Ordering::Relaxed);
            p.forwarded_bytes.fetch_add(op.len, Ordering::Relaxed);
        }
        op.complete(Ok(()));
        Ok(())
    }

    /// The queue closed: the primary is shutting down. Finish what is in flight.
    async fn finish_in_flight(mut self) {
        while let Some((id, res)) = self.answers.next().await {
            if let Some((_, mut op)) = self.inflight.remove(&id) {
                op.complete(res);
            }
        }
        *self.p.queue_rx.locked() = Some(self.rx);
    }

    /// The run failed: pause the primary and give up on everything queued.
    async fn abandon(mut self, failure: &str) {
        let p = self.p.clone();
        p.link_lost(failure).await;
        // Release every waiter: their data is local and their blocks are dirty. Nothing is
        // queued any more once the primary is paused (sends happen under the gate while
        // replicating), so emptying the queue now leaves it empty for the next session.
        self.answers.clear();
        self.inflight.clear();
        drop(self.held.take());
        while let Ok(op) = self.rx.try_recv() {
            drop(op);
        }
        p.queued_ops.store(0, Ordering::Relaxed);
        p.queued_bytes.store(0, Ordering::Relaxed);
        *p.queue_rx.locked() = Some(self.rx);
    }
}

async fn lost_changed(rx: &mut watch::Receiver<Option<String>>) {
    let _ = rx.wait_for(|l| l.is_some()).await;
}
