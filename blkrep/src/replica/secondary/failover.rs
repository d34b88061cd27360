//! Failover and roll-back: both write blocks kept in the disk buffer back to the disk.
//!
//! - failover to the checkpoint writes back the originals of every uncommitted epoch (and
//!   drops the secondary's own buffered writes); to `latest` it keeps the disk as it is;
//! - roll-back, when a new session starts after an interrupted one, writes back the
//!   originals of the open epochs so that the disk is the last checkpoint again.

use crate::replica::error::ReplicaError;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::block::BlockShare;
use super::{spill_error, FailoverReport, Mode, Secondary};
use crate::digest;
use crate::epoch::SecondaryParticipant;
use crate::replica::buffer::{DiskBuffer, BUFFER_BLOCK};
use crate::replica::FailoverTarget;
use crate::storage::{IoBuf, Result};

/// How often [`Secondary::take_over`] looks whether a silent primary was declared lost.
const LOSS_POLL: Duration = Duration::from_millis(20);

impl Secondary {
    /// The operator's failover (`lockstep failover`): [`Secondary::failover`], but refused
    /// while a primary is connected and replicating, unless `force`. A primary that has just
    /// died may look connected until its silence outlasts the heartbeat window; that long
    /// (and a little more) is waited for before refusing.
    pub async fn take_over(
        &self,
        target: FailoverTarget,
        force: bool,
    ) -> std::result::Result<FailoverReport, ReplicaError> {
        let started = Instant::now();
        loop {
            let (mode, heard, peer) = {
                let i = self.inner();
                (i.mode, i.heard, i.peer.clone().unwrap_or_default())
            };
            if !matches!(mode, Mode::Replicating | Mode::Syncing) {
                break;
            }
            let patience = heard.map_or(self.opts.hello_timeout, |(_, p)| p);
            let last = heard.map_or(started, |(at, _)| at);
            if force {
                tracing::warn!(%peer, "forced failover while the primary is connected: the session is broken off; if that primary goes on serving its clients, both nodes accept writes (split brain)");
                break;
            }
            if started.elapsed() > patience + Duration::from_millis(500) {
                return Err(ReplicaError::State(format!(
                    "the primary {peer} is connected and {mode} (heard from {} ms ago): failing over now would leave two writable nodes (split brain), and writes its clients go on making there would be lost here. Stop or fence the primary first (a dead one is noticed within {} ms), or run `lockstep failover --force` to break the session and take over anyway",
                    last.elapsed().as_millis(),
                    patience.as_millis(),
                    mode = mode.name(),
                )));
            }
            tokio::time::sleep(LOSS_POLL).await;
        }
        self.failover(target).await
    }

    /// Stop replicating and serve the disk as an unprotected primary, at `target`.
    pub async fn failover(
        &self,
        target: FailoverTarget,
    ) -> std::result::Result<FailoverReport, ReplicaError> {
        let start = Instant::now();
        {
            let mut i = self.inner();
            match i.mode {
                Mode::Primary => {
                    return Err(ReplicaError::State("this node already failed over: it is the primary (unprotected)".into()))
                }
                Mode::FailingOver => {
                    return Err(ReplicaError::State("this node is failing over already".into()))
                }
                _ if target == FailoverTarget::Checkpoint && !i.consistent => {
                    return Err(ReplicaError::State("this secondary restarted while it was replicating: its disk holds writes of uncommitted epochs whose originals were lost, so it has no checkpoint to go back to. Let the primary reconnect and resync it, or fail over --to latest to take the disk as it is".into()))
                }
                _ if target == FailoverTarget::Latest && i.sync.is_some() && i.mode != Mode::Waiting => {
                    return Err(ReplicaError::State("a resync is in progress: the disk is a mix of old and new data; fail over --to checkpoint (the last checkpoint is intact)".into()))
                }
                _ => {
                    self.switch(&mut i, Mode::FailingOver, Some(target.name()));
                    // Nothing of the interrupted session may land after this.
                    i.token += 1;
                }
            }
        }
        tracing::info!(to = %target.name(), "failing over");
        // Wait for every forwarded and local request, and any commit, in progress.
        let _x = self.barrier.write().await;
        let committed = self.inner().committed;
        let block = BlockShare::new(self);
        let others = self.others();
        let mut all: Vec<&dyn SecondaryParticipant> = vec![&block];
        all.extend(others.iter().map(|p| &**p));
        for p in &all {
            if let Err(e) = p.failover(target, committed).await {
                let msg = format!("failover to {} failed: {}: {e}", target.name(), p.name());
                let mut i = self.inner();
                self.switch(&mut i, Mode::Paused, Some(&msg));
                i.last_error = Some(msg.clone());
                return Err(ReplicaError::Disk(msg));
            }
        }
        let mut i = self.inner();
        self.switch(&mut i, Mode::Primary, Some("failed over"));
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
            target: target.name().into(),
            committed_epoch: committed,
            restored_blocks: block.restored.load(Ordering::Relaxed),
            duration_us: start.elapsed().as_micros() as u64,
            checkpoint_digest: i.committed_digest.map(|d| format!("{d:016x}")),
            comparable: block.comparable.load(Ordering::Relaxed),
            generation: format!("{generation:016x}"),
        };
        i.failover = Some(report.clone());
        // What went wrong as a secondary (the lost primary) is history now.
        i.last_error = None;
        self.events.emit(
            "failover",
            serde_json::json!({
                "to": report.target,
                "committed_epoch": report.committed_epoch,
                "restored_blocks": report.restored_blocks,
            }),
        );
        tracing::info!(
            to = %report.target,
            committed_epoch = report.committed_epoch,
            restored_blocks = report.restored_blocks,
            duration_us = report.duration_us,
            checkpoint_digest = %report.checkpoint_digest.as_deref().unwrap_or("none"),
            generation = %report.generation,
            "failed over; serving as an unprotected primary"
        );
        Ok(report)
    }

    /// Compare the disk with the committed checkpoint's digest: Ok(true) when equal.
    pub async fn verify_checkpoint(&self) -> std::result::Result<(u64, Option<u64>), ReplicaError> {
        let d = digest::disk_digest(&*self.disk)
            .await
            .map_err(|e| ReplicaError::Disk(e.to_string()))?;
        Ok((d, self.inner().committed_digest))
    }

    /// Write to the disk what `pick` takes from the buffer for each of `blocks` (the last
    /// block clipped to the disk's size); blocks `pick` has nothing for are left alone.
    pub(super) async fn write_back(
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
    pub(super) async fn roll_back_open(&self) -> Result<u64> {
        // No forwarded request is in progress after this.
        let _x = self.barrier.write().await;
        let blocks = self.inner().buffer.original_blocks();
        self.write_back(&blocks, |buf, b| buf.oldest_original(b))
            .await?;
        if !blocks.is_empty() {
            self.flush_disk().await?;
            self.inner().buffer.drop_originals();
        }
        Ok(blocks.len() as u64)
    }
}
