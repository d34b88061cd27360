//! After WELCOME: bring the secondary level with the primary and replicate again.
//!
//! ```text
//!  begin_sync ─▶ mark dirty (checksum: every block; full: every allocated block)
//!             ─▶ compare_units: SUMS_REQUEST per batch of dirty units (two in flight); equal
//!               ones forgotten
//!             ─▶ RESUME(epoch) ⇄ RESUME_ACK ─▶ connect_participants (channel.rs)
//!             ─▶ resume_forwarding: data connection, forwarder
//!             ─▶ spawn_resync: every dirty block, then the checkpoint that completes the sync
//! ```
//!
//! The comparison runs while the primary is paused, so the secondary's disk stands still;
//! each unit is compared with the primary's digest table under the write gate, so no client
//! write can slip between the comparison and forgetting the unit.

use crate::sync::Locked;
use std::sync::Arc;

use roaring::RoaringTreemap;

use super::{Replicator, CHUNK_BLOCKS};
use crate::replica::error::ReplicaError;
use crate::replica::peer::{PeerLink, Welcome};
use crate::replica::primary::open_replica_connection;
use crate::replica::wire::{SyncKind, MAX_SUM_UNITS};

/// SUMS requests a sync keeps in flight: the secondary answers two of a session at once
/// (one per core of a small host), and a second request hides the round trip.
const SUMS_IN_FLIGHT: usize = 2;

impl Replicator {
    /// Sync the secondary that sent `welcome` and resume replication to it; the resync of
    /// the dirty blocks goes on in the background.
    pub(super) async fn sync_and_resume(
        self: &Arc<Self>,
        link: &Arc<PeerLink>,
        welcome: Welcome,
    ) -> Result<(), ReplicaError> {
        let p = &self.primary;
        let kind = welcome.sync;
        let unit = match kind {
            SyncKind::Incremental => 1,
            SyncKind::Checksum => CHUNK_BLOCKS,
            SyncKind::Full => 0,
        };
        tracing::info!(sync = %kind.name(), secondary = %self.opts.secondary, consistent = welcome.consistent, "secondary connected: syncing");
        p.begin_sync(kind.name(), unit);
        match kind {
            SyncKind::Checksum => p.mark_all_dirty().await,
            SyncKind::Full => p
                .mark_allocated_dirty()
                .await
                .map_err(|e| ReplicaError::Disk(format!("reading the local disk: {e}")))?,
            SyncKind::Incremental => {}
        }
        if unit > 0 {
            self.compare_units(link, unit).await?;
        }
        let epoch = p.resume_epoch();
        link.resume(epoch).await?;
        self.connect_participants(link, epoch).await?;
        self.resume_forwarding(link).await?;
        let stats = p.resync_stats();
        tracing::info!(
            epoch,
            compared_units = stats.compared_units,
            equal_units = stats.equal_units,
            to_send_blocks = stats.to_send_blocks,
            "replication resumed; resyncing"
        );
        self.spawn_resync();
        Ok(())
    }

    /// Ask the secondary for the digests of every dirty unit (of `unit` blocks), in
    /// batches, [`SUMS_IN_FLIGHT`] at a time (the secondary hashes them in parallel), and
    /// forget the units it holds alike.
    async fn compare_units(&self, link: &Arc<PeerLink>, unit: u64) -> Result<(), ReplicaError> {
        let p = &self.primary;
        let mut batches = Vec::new();
        let mut batch = RoaringTreemap::new();
        for u in p.dirty_units(unit).iter() {
            batch.insert(u);
            if batch.len() == MAX_SUM_UNITS {
                batches.push(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        // Dropped on an error: the requests still in flight are abandoned with the session.
        let mut asked = tokio::task::JoinSet::new();
        let mut next = 0;
        loop {
            while next < batches.len() && asked.len() < SUMS_IN_FLIGHT {
                let (l, b, i) = (link.clone(), batches[next].clone(), next);
                asked.spawn(async move { (i, l.sums(unit as u32, b).await) });
                next += 1;
            }
            let Some(done) = asked.join_next().await else {
                return Ok(());
            };
            let (i, sums) =
                done.map_err(|e| ReplicaError::Protocol(format!("a SUMS request failed: {e}")))?;
            p.forget_equal(unit, &batches[i], &sums?).await;
        }
    }

    /// RESUME was acknowledged: open the replication connection, replicate again, start
    /// the forwarder.
    async fn resume_forwarding(&self, link: &Arc<PeerLink>) -> Result<(), ReplicaError> {
        let p = &self.primary;
        // Opened after RESUME_ACK: the secondary binds it to the resumed session.
        let client = open_replica_connection(
            &self.opts.secondary,
            link.session_key(),
            self.opts.connect_timeout,
            self.opts.tls.clone(),
        )
        .await?;
        p.resumed().await;
        *self.link.locked() = Some(link.clone());
        // The previous session's forwarder has ended: run() waits for it (end_session).
        p.start_forwarder(client);
        if let Some(r) = link.dead_reason() {
            p.link_lost(&r).await;
        }
        Ok(())
    }

    /// Send every dirty block in the background, then request the checkpoint whose commit
    /// completes the sync.
    fn spawn_resync(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            match me.primary.resync().await {
                Ok(bytes) => {
                    tracing::info!(bytes, "resync data sent; checkpointing");
                    if let Some(t) = me.trigger.get() {
                        if let Err(e) = t.request().await {
                            tracing::warn!("the checkpoint after the resync failed: {e}");
                        }
                    }
                }
                // Replication stopped meanwhile: the next session resyncs.
                Err(e @ ReplicaError::State(_)) => tracing::info!("resync interrupted: {e}"),
                // The local disk failed a read: the blocks stay dirty, and without a new
                // session no checkpoint could complete. End this one; the next retries.
                Err(e) => me.primary.link_lost(&format!("resync failed: {e}")).await,
            }
        });
    }
}
