//! Online repair (`verify --repair`): chunks the secondary holds differently become dirty
//! and are resent through the forward queue in the current epoch, like a resync's blocks,
//! while replication goes on.
//!
//! ```text
//!  mark_for_repair: dirty bitmap on disk marked ─▶ gate(write): replicating, no resync?
//!                   ─▶ the blocks become dirty (a loss from here on: the next resync sends them)
//!  send_repair:     every dirty run (≤ 1 MiB) read under its block lock, checked against the
//!                   digest, enqueued (the queue's byte budget bounds what is held) ─▶ dirty empty
//!  then the session requests a checkpoint: its commit makes the secondary equal again
//! ```

use roaring::RoaringTreemap;

use super::resync::{Purpose, Sent};
use super::{Primary, PrimaryMode};
use crate::replica::bitmap::EXTENT_BLOCKS;
use crate::replica::error::ReplicaError;

impl Primary {
    /// `blocks` differ on the secondary: make them dirty, so that [`Primary::send_repair`]
    /// resends them, or, if the session ends first, the next session's resync does. Marked in
    /// the dirty bitmap on disk first, so a restarted primary resyncs them too. Refused unless
    /// replicating with no resync running (the primary's copy is then the one to keep).
    pub async fn mark_for_repair(&self, blocks: &RoaringTreemap) -> Result<(), ReplicaError> {
        let mut marks = Vec::new();
        if let Some(bm) = self.disk_bitmap() {
            let extents = crate::replica::bitmap::extents_of_blocks(blocks);
            let mut it = extents.iter().peekable();
            while let Some(a) = it.next() {
                let mut b = a;
                while it.peek() == Some(&(b + 1)) {
                    b = it.next().unwrap_or(b);
                }
                let first = u64::from(a) * EXTENT_BLOCKS;
                let last = u64::from(b) * EXTENT_BLOCKS;
                let m = bm.mark(first, last).await.map_err(|e| {
                    ReplicaError::Disk(format!("marking the blocks to repair: {e}"))
                })?;
                marks.push(m);
            }
        }
        let _g = self.gate.write().await;
        let mut st = self.st();
        if st.mode != PrimaryMode::Replicating {
            return Err(ReplicaError::State(format!(
                "the primary is {}: nothing to repair against",
                st.mode.name()
            )));
        }
        if st.resyncing {
            return Err(ReplicaError::State(
                "a resync is in progress: repair after it completes".into(),
            ));
        }
        st.dirty |= blocks;
        // The marks stay on disk: the blocks are dirty now, then written in an open epoch,
        // until a commit (see replica::bitmap).
        drop(marks);
        Ok(())
    }

    /// Send every dirty block through the forward queue in the current epoch (after
    /// [`Primary::mark_for_repair`]). An error when replication stops meanwhile, or a new
    /// session's resync takes over: what is left stays dirty and is sent by that resync.
    pub async fn send_repair(&self) -> Result<Sent, ReplicaError> {
        let mut total = Sent::default();
        loop {
            let run = {
                let st = self.st();
                if st.mode != PrimaryMode::Replicating {
                    return Err(ReplicaError::State(format!(
                        "replication stopped during the repair ({} blocks left): the next session's resync sends them",
                        st.dirty.len()
                    )));
                }
                if st.resyncing {
                    return Err(ReplicaError::State(
                        "the session was resumed during the repair: its resync sends the blocks left"
                            .into(),
                    ));
                }
                st.first_dirty_run()
            };
            let Some((first, last)) = run else { break };
            let s = self.send_run(first, last, Purpose::Repair).await?;
            total.bytes += s.bytes;
            total.rehashed += s.rehashed;
        }
        Ok(total)
    }
}
