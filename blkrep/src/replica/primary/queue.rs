//! The forward queue: every modification, flush, epoch mark and barrier the secondary must
//! see, in the order the primary made them (client writes enqueue under the gate, their
//! block range lock held). The forwarder ([`super::forward`]) drains it.
//!
//! Modifications count in the queue depth and hold a share of the byte budget
//! (`--queue-bytes`) until the secondary answers them; markers (flush, mark, barrier) do not.

use crate::replica::error::ReplicaError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::{Primary, PrimaryMode};
use crate::digest::DIGEST_BLOCK;

/// How a forwarded operation completes: the secondary's answer (or the forwarder's).
pub(super) type Done = oneshot::Sender<std::result::Result<(), String>>;

#[derive(Debug)]
pub(super) enum FwdKind {
    Write {
        data: crate::storage::IoBuf,
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
pub(super) struct FwdOp {
    pub(super) kind: FwdKind,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) done: Option<Done>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl FwdOp {
    pub(super) fn blocks(&self) -> Option<(u64, u64)> {
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

    /// Whether it modifies the disk (and counts in the queue depth).
    pub(super) fn is_modification(&self) -> bool {
        matches!(
            self.kind,
            FwdKind::Write { .. } | FwdKind::Trim | FwdKind::Zeroes { .. }
        )
    }

    /// Tell its waiter (if still waiting) how it ended.
    pub(super) fn complete(&mut self, result: std::result::Result<(), String>) {
        if let Some(d) = self.done.take() {
            let _ = d.send(result);
        }
    }
}

impl Primary {
    /// Queue a modification for the forwarder (the caller accounted it in the epoch).
    pub(super) fn enqueue(
        &self,
        kind: FwdKind,
        offset: u64,
        len: u64,
        done: Option<Done>,
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

    /// Queue a flush, an epoch mark or a barrier (no data, not counted in the queue depth).
    pub(super) fn enqueue_marker(&self, kind: FwdKind, done: Done) {
        let _ = self.queue.send(FwdOp {
            kind,
            offset: 0,
            len: 0,
            done: Some(done),
            _permit: None,
        });
    }

    /// Wait until everything queued for the secondary so far has been answered by it.
    pub async fn barrier(&self) -> std::result::Result<(), ReplicaError> {
        let (tx, rx) = oneshot::channel();
        {
            let _gate = self.gate.read().await;
            if self.mode() != PrimaryMode::Replicating {
                return Err(ReplicaError::State("not replicating".into()));
            }
            self.enqueue_marker(FwdKind::Barrier, tx);
        }
        match rx.await {
            Ok(r) => r.map_err(ReplicaError::LinkLost),
            Err(_) => Err(ReplicaError::State("replication stopped".into())),
        }
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
