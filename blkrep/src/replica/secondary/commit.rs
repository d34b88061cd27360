//! Committing epoch `n` on the secondary: all participants or none.
//!
//! ```text
//!  CHECKPOINT(n, summaries)
//!     ─▶ session still the one that sent it?  every participant named exactly once?
//!     ─▶ prepare(n) on the block layer (flush, counts), then on every other participant
//!     ─▶ (failover and RESUME excluded) session still current? ─▶ commit(n) everywhere
//!     ─▶ COMMITTED(n); the first commit after a sync adopts the primary's lineage
//!  any failure ─▶ abort(n) everywhere ─▶ ABORTED(n, reason)
//! ```

use std::sync::Arc;

use super::block::BlockShare;
use super::{Mode, Secondary};
use crate::epoch::EpochSummary;
use crate::epoch::SecondaryParticipant;
use crate::replica::PARTICIPANT_BLOCK;
use crate::sync::Locked;

impl Secondary {
    /// Add a participant besides the block layer; its id must be unique. Participants are
    /// added before the first primary connects.
    pub fn add_participant(
        &self,
        p: Arc<dyn SecondaryParticipant>,
    ) -> std::result::Result<(), String> {
        let mut all = self.participants.locked();
        if p.id() == PARTICIPANT_BLOCK || all.iter().any(|q| q.id() == p.id()) {
            return Err(format!(
                "participant id {} ({}) is already taken",
                p.id(),
                p.name()
            ));
        }
        all.push(p);
        Ok(())
    }

    /// The participants besides the block layer.
    pub(super) fn others(&self) -> Vec<Arc<dyn SecondaryParticipant>> {
        self.participants.locked().clone()
    }

    /// A message for participant `id` from a replication connection of the session of
    /// `token`: handed to it while that session replicates (never across a failover or a
    /// RESUME), refused otherwise.
    pub(super) async fn participant_message(
        &self,
        token: u64,
        id: u16,
        message: Vec<u8>,
    ) -> std::result::Result<Vec<u8>, String> {
        let _b = self.barrier.read().await;
        self.session_is(token)
            .map_err(|e| format!("participant message refused: {e}"))?;
        let p = self
            .others()
            .into_iter()
            .find(|p| p.id() == id)
            .ok_or_else(|| format!("this secondary has no participant {id}"))?;
        p.receive(&message)
    }

    /// Whether the session of `token` is still the one replicating here.
    fn session_is(&self, token: u64) -> std::result::Result<(), String> {
        let i = self.inner();
        if i.mode != Mode::Replicating {
            return Err(format!("not replicating ({})", i.mode.name()));
        }
        if i.token != token {
            return Err("the session ended before the commit".into());
        }
        Ok(())
    }

    /// Commit `epoch` for the session of `token` if every participant's share is complete
    /// and matches its summary; else abort it everywhere and say why.
    pub(super) async fn checkpoint(
        &self,
        token: u64,
        epoch: u64,
        summaries: &[EpochSummary],
    ) -> std::result::Result<(), String> {
        let block = BlockShare::new(self);
        let others = self.others();
        let mut all: Vec<&dyn SecondaryParticipant> = vec![&block];
        all.extend(others.iter().map(|p| &**p));
        let r = self.prepare_all(token, epoch, summaries, &all).await;
        // Failover and RESUME wait for the commit, and it sees whether they came first.
        let _b = self.barrier.read().await;
        if let Err(reason) = r.and_then(|()| self.session_is(token)) {
            for p in &all {
                p.abort(epoch, &reason);
            }
            self.events.emit(
                "checkpoint",
                serde_json::json!({"state": "aborted", "epoch": epoch, "error": reason}),
            );
            return Err(reason);
        }
        for p in &all {
            p.commit(epoch);
        }
        let adopted = {
            let mut i = self.inner();
            i.committed = epoch;
            i.session_commits += 1;
            i.next_commit = epoch + 1;
            i.checkpoints += 1;
            i.consistent = true;
            i.sync.take().inspect(|(kind, _, _)| {
                i.fresh = false;
                i.last_sync = Some(kind.name());
            })
        };
        self.events.emit(
            "checkpoint",
            serde_json::json!({"state": "committed", "epoch": epoch}),
        );
        if let Some((kind, generation, history)) = adopted {
            self.events.emit(
                "sync",
                serde_json::json!({"state": "done", "kind": kind.name(), "epoch": epoch}),
            );
            // The first commit after a sync: the disk now is the primary's data at the
            // checkpoint (flushed by the block layer's prepare), so this node joins the
            // primary's lineage.
            tracing::info!(
                sync = %kind.name(),
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

    async fn prepare_all(
        &self,
        token: u64,
        epoch: u64,
        summaries: &[EpochSummary],
        all: &[&dyn SecondaryParticipant],
    ) -> std::result::Result<(), String> {
        self.session_is(token)?;
        if let Some(s) = summaries
            .iter()
            .find(|s| !all.iter().any(|p| p.id() == s.participant))
        {
            return Err(format!(
                "unknown participant {} in the checkpoint",
                s.participant
            ));
        }
        for p in all {
            let mut mine = summaries.iter().filter(|s| s.participant == p.id());
            let (Some(summary), None) = (mine.next(), mine.next()) else {
                return Err(format!(
                    "the checkpoint must carry exactly one summary of participant {} ({})",
                    p.id(),
                    p.name()
                ));
            };
            p.prepare(epoch, summary)
                .await
                .map_err(|e| format!("{}: {e}", p.name()))?;
        }
        Ok(())
    }
}
