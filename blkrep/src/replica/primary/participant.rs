//! The block layer's part in checkpoint epochs.
//!
//! ```text
//!  cut(n)      gate(write): epoch n+1 begins; epoch mark n+1 enqueued behind every write
//!              of epoch n; the summary (writes, bytes, digest) of epoch n is taken
//!  prepare(n)  waits until the secondary answered the mark: it has all of epoch n
//!  commit(n)   forgets the blocks written up to n; completes a pending sync
//!  abort(n)    the secondary is behind: link_lost (every open epoch becomes dirty)
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::queue::FwdKind;
use super::{Primary, PrimaryMode};
use crate::epoch::{BoxFuture, Epoch, EpochError, EpochSummary, Participant};
use crate::replica::PARTICIPANT_BLOCK;

/// The block layer's part in checkpoints.
#[derive(Debug)]
pub struct BlockParticipant(pub Arc<Primary>);

impl Primary {
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
        self.enqueue_marker(FwdKind::Mark { epoch: epoch.0 + 1 }, tx);
        Ok(())
    }
}

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
        self.committed(epoch);
        self.0.maintain_bitmap();
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

impl BlockParticipant {
    /// The primary's state after the secondary committed `epoch`.
    fn committed(&self, epoch: Epoch) {
        let mut st = self.0.st();
        st.committed = epoch.0;
        st.written = st.written.split_off(&(epoch.0 + 1));
        if std::mem::take(&mut st.sync_commit_pending) {
            // The secondary took our generation with this commit: from now on our dirty
            // bitmap is exact relative to it.
            let generation = self.0.meta.get().generation;
            self.0.tracked.store(generation, Ordering::Release);
            if let Some(bm) = self.0.disk_bitmap().cloned() {
                tokio::spawn(async move {
                    if let Err(e) = bm.set_tracked(generation).await {
                        tracing::warn!("dirty bitmap: recording the synced generation: {e}");
                    }
                });
            }
            st.resync.state = "done".into();
            st.resync.completed += 1;
            if let Some(t) = st.resync_started {
                st.resync.total_s = Some(t.elapsed().as_secs_f64());
                st.resync.elapsed_s = t.elapsed().as_secs_f64();
            }
            let r = st.resync.clone();
            drop(st);
            self.0.events.emit(
                "sync",
                serde_json::json!({
                    "state": "done",
                    "kind": r.kind,
                    "epoch": epoch.0,
                    "sent_bytes": r.sent_bytes,
                    "compared_units": r.compared_units,
                    "equal_units": r.equal_units,
                    "total_s": r.total_s,
                }),
            );
            tracing::info!(
                kind = %r.kind.as_deref().unwrap_or("none"),
                sent_bytes = r.sent_bytes,
                equal_units = r.equal_units,
                compared_units = r.compared_units,
                total_s = r.total_s,
                "resync complete: the secondary is consistent"
            );
        }
    }
}
