//! The block layer's half of the checkpoint on the secondary: the first
//! [`SecondaryParticipant`].
//!
//! Its share of epoch `n` arrives through the replication export ([`super::apply`]): the
//! forwarded writes, with the originals they overwrote kept in the disk buffer. Preparing
//! flushes the disk and checks that every write the primary counted arrived and none failed;
//! committing drops the epoch's originals; failing over to the checkpoint writes the
//! originals of the uncommitted epochs back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::Secondary;
use crate::epoch::EpochSummary;
use crate::epoch::SecondaryParticipant;
use crate::replica::{FailoverTarget, PARTICIPANT_BLOCK};
use crate::sync::BoxFuture;

/// The block layer's half, for one checkpoint or failover of `sec`.
pub(super) struct BlockShare<'a> {
    sec: &'a Secondary,
    /// Blocks a failover rewrote from the buffer.
    pub(super) restored: AtomicU64,
    /// Whether the failed-over disk can be compared with the checkpoint's digest (checkpoint
    /// target, and no local writes since the checkpoint were dropped).
    pub(super) comparable: AtomicBool,
    /// The primary's digest of the prepared epoch, kept when it commits.
    digest: AtomicU64,
}

impl<'a> BlockShare<'a> {
    pub(super) fn new(sec: &'a Secondary) -> Self {
        Self {
            sec,
            restored: AtomicU64::new(0),
            comparable: AtomicBool::new(false),
            digest: AtomicU64::new(0),
        }
    }

    /// Whether everything the primary sent for `epoch` is here.
    fn check(&self, epoch: u64, summary: &EpochSummary) -> Result<(), String> {
        let i = self.sec.inner();
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
        if summary.items != mine.items || summary.bytes != mine.bytes {
            return Err(format!(
                "epoch {epoch}: the primary sent {} writes / {} bytes, {} writes / {} bytes arrived",
                summary.items, summary.bytes, mine.items, mine.bytes
            ));
        }
        Ok(())
    }
}

impl SecondaryParticipant for BlockShare<'_> {
    fn id(&self) -> u16 {
        PARTICIPANT_BLOCK
    }

    fn name(&self) -> &str {
        "block"
    }

    fn resume(&self, _epoch: u64) {
        // Secondary::resume resets the block layer's counters itself: they share its lock.
    }

    fn prepare<'b>(
        &'b self,
        epoch: u64,
        summary: &'b EpochSummary,
    ) -> BoxFuture<'b, Result<(), String>> {
        Box::pin(async move {
            // COMMITTED (and the metadata a first commit after a sync stores) says the epoch
            // is on this disk: flush it first. Every write of the epoch was answered before
            // its mark was; those answered on receipt (ack mode `received`) are applied
            // first, so one flush covers them all.
            self.sec.applied_early().await;
            self.sec
                .flush_disk()
                .await
                .map_err(|e| format!("flushing the secondary disk: {e}"))?;
            self.check(epoch, summary)?;
            self.digest.store(summary.digest, Ordering::Relaxed);
            Ok(())
        })
    }

    fn commit(&self, epoch: u64) {
        let mut i = self.sec.inner();
        i.buffer.commit(epoch);
        i.counts.remove(&epoch);
        i.local_writes = 0;
        i.committed_digest = Some(self.digest.load(Ordering::Relaxed));
    }

    fn abort(&self, _epoch: u64, _reason: &str) {
        // The originals stay: the next session rolls the open epochs back, and a failover
        // to the checkpoint writes them back.
    }

    fn failover(
        &self,
        target: FailoverTarget,
        _committed: u64,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let sec = self.sec;
            let blocks = match target {
                FailoverTarget::Checkpoint => sec.inner().buffer.blocks(),
                FailoverTarget::Latest => Vec::new(),
            };
            let r = async {
                sec.write_back(&blocks, |buf, b| buf.view(b)).await?;
                sec.disk.flush().await
            }
            .await;
            r.map_err(|e| e.to_string())?;
            let mut i = sec.inner();
            self.comparable.store(
                target == FailoverTarget::Checkpoint && i.buffer.stats().local_blocks == 0,
                Ordering::Relaxed,
            );
            self.restored.store(blocks.len() as u64, Ordering::Relaxed);
            i.buffer.clear();
            Ok(())
        })
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "buffer": self.sec.inner().buffer.stats() })
    }
}
