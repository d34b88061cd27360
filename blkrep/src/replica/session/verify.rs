//! Online verify: compare the primary's and the secondary's disks by digest while both
//! keep serving; with `repair`, resend the chunks that differ and compare them again.
//!
//! ```text
//!  per batch of ≤ 256 chunks (64 KiB): lock the blocks against client writes ─▶ barrier
//!  (everything forwarded before is applied on the secondary) ─▶ SUMS ─▶ compare
//!  repair, per 1 GiB of differing chunks: their blocks dirty (Primary::mark_for_repair)
//!  ─▶ resent through the forward queue in the current epoch (Primary::send_repair)
//!  ─▶ a checkpoint, whose commit makes the secondary hold them ─▶ then compare those chunks again
//! ```
//!
//! A repair write is an ordinary forwarded write: the secondary keeps the original until the
//! commit, so a failover before it goes back to the last checkpoint as usual. If the session
//! ends during a repair, the blocks not yet committed are dirty and the next resync sends
//! them (the dirty bitmap on disk has them too).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::replica::error::ReplicaError;
use crate::replica::peer::PeerLink;
use crate::replica::status::{ByteRange, RepairReport, VerifyReport, MAX_LISTED_RANGES};
use roaring::RoaringTreemap;

use super::{Replicator, CHUNK_BLOCKS};
use crate::digest::{self, DIGEST_BLOCK};
use crate::replica::primary::PrimaryMode;

/// Chunks compared per SUMS request (and locked at once on the primary): 16 MiB.
const BATCH: u64 = 256;
/// Differing chunks resent per checkpoint (1 GiB): what the secondary holds as originals
/// of one epoch, and how much is sent before the first part of a large repair commits.
/// (2 in unit tests, whose disks are small, so that a repair takes several batches.)
const REPAIR_BATCH_CHUNKS: u64 = if cfg!(test) {
    2
} else {
    (1 << 30) / (CHUNK_BLOCKS * DIGEST_BLOCK)
};

/// What one comparison pass found.
#[derive(Debug, Default)]
struct Pass {
    /// The differing chunks.
    units: RoaringTreemap,
    /// Their byte ranges, adjacent chunks merged, at most [`MAX_LISTED_RANGES`].
    ranges: Vec<ByteRange>,
    /// Differing chunks not in `ranges`.
    omitted: u64,
}

impl Pass {
    /// Chunk `u` of a disk of `size` bytes differs.
    fn add(&mut self, u: u64, size: u64) {
        self.units.insert(u);
        let offset = u * CHUNK_BLOCKS * DIGEST_BLOCK;
        let len = (CHUNK_BLOCKS * DIGEST_BLOCK).min(size - offset);
        let listed = self.ranges.len();
        match self.ranges.last_mut() {
            Some(r) if r.offset + r.len == offset && self.omitted == 0 => r.len += len,
            _ if listed < MAX_LISTED_RANGES => self.ranges.push(ByteRange { offset, len }),
            _ => self.omitted += 1,
        }
    }
}

impl Replicator {
    /// Compare the primary's and the secondary's disks chunk by chunk (64 KiB) by digest,
    /// without moving the data, while both keep serving. Each batch of chunks is locked
    /// against client writes and waits until everything forwarded before it is applied on
    /// the secondary, so only real differences are reported.
    pub async fn verify(&self) -> Result<VerifyReport, ReplicaError> {
        self.verify_with(false).await
    }

    /// [`Replicator::verify`], and with `repair` the differing chunks are resent from the
    /// primary, committed by a checkpoint and compared again ([`VerifyReport::repair`]).
    /// One verify at a time; refused unless replicating with no resync running.
    pub async fn verify_with(&self, repair: bool) -> Result<VerifyReport, ReplicaError> {
        let _one = self.verifying.try_lock().map_err(|_| {
            ReplicaError::State("a verify is already running (its progress is in status)".into())
        })?;
        self.replicating_link()?;
        if repair && self.trigger.get().is_none() {
            return Err(ReplicaError::State(
                "no checkpoints here to commit a repair".into(),
            ));
        }
        let start = Instant::now();
        let size = self.primary.size_bytes();
        let mut report = VerifyReport {
            state: "running".into(),
            chunk_bytes: CHUNK_BLOCKS * DIGEST_BLOCK,
            total_chunks: digest::blocks(size).div_ceil(CHUNK_BLOCKS),
            done_chunks: 0,
            differing_chunks: 0,
            differing: Vec::new(),
            unlisted_chunks: 0,
            bytes_compared: 0,
            duration_s: 0.0,
            mb_per_s: 0.0,
            participants: serde_json::Map::new(),
            repair: None,
        };
        self.st().verify = Some(report.clone());
        let found = match self.compare(None, Some(&mut report)).await {
            Ok(f) => f,
            Err(e) => return Err(self.verify_failed(report, e)),
        };
        let secs = start.elapsed().as_secs_f64();
        report.differing_chunks = found.units.len();
        report.differing = found.ranges;
        report.unlisted_chunks = found.omitted;
        report.bytes_compared = size;
        report.duration_s = secs;
        report.mb_per_s = size as f64 / secs.max(1e-9) / 1e6;
        tracing::info!(differing = report.differing_chunks, secs, "verify done");
        if repair && !found.units.is_empty() {
            report.state = "repairing".into();
            self.st().verify = Some(report.clone());
            if let Err(e) = self.repair(&found.units, &mut report).await {
                return Err(self.verify_failed(report, e));
            }
        }
        report.state = "done".into();
        self.st().verify = Some(report.clone());
        let r = report.repair.as_ref();
        self.primary.events().emit(
            "verify",
            serde_json::json!({
                "state": "done",
                "differing_chunks": report.differing_chunks,
                "repaired_chunks": r.map(|r| r.repaired_chunks),
                "still_differing_chunks": r.map(|r| r.still_differing_chunks),
            }),
        );
        Ok(report)
    }

    /// A verify (or its repair) failed with `e`: say so in status and as an event; returns `e`.
    fn verify_failed(&self, mut report: VerifyReport, e: ReplicaError) -> ReplicaError {
        report.state = format!("failed: {e}");
        self.st().verify = Some(report);
        self.primary.events().emit(
            "verify",
            serde_json::json!({"state": "failed", "error": e.to_string()}),
        );
        e
    }

    /// The running session's link, if the primary replicates with no resync running.
    fn replicating_link(&self) -> Result<Arc<PeerLink>, ReplicaError> {
        let p = &self.primary;
        let link = self
            .current_link()
            .filter(|_| p.mode() == PrimaryMode::Replicating)
            .ok_or_else(|| {
                ReplicaError::State(format!(
                    "the primary is {}, not replicating: nothing to verify against",
                    p.mode().name()
                ))
            })?;
        if p.is_resyncing() {
            return Err(ReplicaError::State(
                "a resync is in progress: verify after it completes".into(),
            ));
        }
        Ok(link)
    }

    /// Compare the chunks in `only` (every chunk when None) with the secondary's, a batch
    /// at a time; `progress` is updated and shown in status after every batch.
    async fn compare(
        &self,
        only: Option<&RoaringTreemap>,
        mut progress: Option<&mut VerifyReport>,
    ) -> Result<Pass, ReplicaError> {
        let p = &self.primary;
        let link = self.replicating_link()?;
        let size = p.size_bytes();
        let nblocks = digest::blocks(size);
        let nunits = nblocks.div_ceil(CHUNK_BLOCKS);
        // The first unit to compare at or after `u`, rounded down to its batch.
        let next = |u: u64| -> u64 {
            let n = match only {
                None => u,
                Some(s) if u == 0 => s.min().unwrap_or(nunits),
                Some(s) => s.select(s.rank(u - 1)).unwrap_or(nunits),
            };
            if n >= nunits {
                nunits
            } else {
                n / BATCH * BATCH
            }
        };
        let mut pass = Pass::default();
        let mut last_log = Instant::now();
        let mut u0 = next(0);
        while u0 < nunits {
            let u1 = (u0 + BATCH).min(nunits);
            let mut units = RoaringTreemap::new();
            units.insert_range(u0..u1);
            if let Some(s) = only {
                units &= s;
            }
            let (Some(a), Some(b)) = (units.min(), units.max()) else {
                u0 = next(u1);
                continue;
            };
            let first = a * CHUNK_BLOCKS;
            let last = ((b + 1) * CHUNK_BLOCKS).min(nblocks) - 1;
            // Both sides' sums under the block lock: a client write after it is released
            // changes our digest table, and would look like a difference.
            let (ours, sums) = {
                let _l = p.lock_blocks(first, last).await;
                p.barrier().await?;
                let ours: Vec<u64> = units
                    .iter()
                    .map(|u| p.digest_table().unit_sum(u, CHUNK_BLOCKS))
                    .collect();
                (ours, link.sums(CHUNK_BLOCKS as u32, units.clone()).await?)
            };
            for ((u, mine), theirs) in units.iter().zip(&ours).zip(&sums) {
                if mine != theirs {
                    pass.add(u, size);
                }
            }
            if let Some(r) = progress.as_deref_mut() {
                r.done_chunks = u1;
                r.differing_chunks = pass.units.len();
                self.st().verify = Some(r.clone());
                if last_log.elapsed() > Duration::from_secs(1) {
                    last_log = Instant::now();
                    tracing::info!(
                        done = u1,
                        total = nunits,
                        differing = r.differing_chunks,
                        "verify: {:.0}%",
                        100.0 * u1 as f64 / nunits as f64
                    );
                }
            }
            u0 = next(u1);
        }
        Ok(pass)
    }

    /// Resend the chunks in `units` from the primary, a checkpoint per
    /// [`REPAIR_BATCH_CHUNKS`], and compare them again; the result goes to `report.repair`.
    async fn repair(
        &self,
        units: &RoaringTreemap,
        report: &mut VerifyReport,
    ) -> Result<(), ReplicaError> {
        let p = &self.primary;
        let trigger = self
            .trigger
            .get()
            .ok_or_else(|| ReplicaError::State("no checkpoints here to commit a repair".into()))?;
        let nblocks = digest::blocks(p.size_bytes());
        let start = Instant::now();
        let mut it = units.iter().peekable();
        while it.peek().is_some() {
            let mut blocks = RoaringTreemap::new();
            let mut chunks = 0;
            for u in it.by_ref().take(REPAIR_BATCH_CHUNKS as usize) {
                blocks.insert_range(u * CHUNK_BLOCKS..((u + 1) * CHUNK_BLOCKS).min(nblocks));
                chunks += 1;
            }
            p.mark_for_repair(&blocks).await?;
            let sent = p.send_repair().await?;
            let c = trigger.request().await.map_err(|e| {
                ReplicaError::State(format!(
                    "the resent chunks were not committed: {e} (a later checkpoint commits them, or the next session's resync sends them again)"
                ))
            })?;
            let r = report.repair.get_or_insert_with(RepairReport::default);
            r.repaired_chunks += chunks;
            r.repaired_bytes += sent.bytes;
            r.rehashed_blocks += sent.rehashed;
            r.checkpoints += 1;
            r.committed_epoch = c.epoch.0;
            r.duration_s = start.elapsed().as_secs_f64();
            tracing::info!(
                chunks = r.repaired_chunks,
                bytes = r.repaired_bytes,
                epoch = c.epoch.0,
                "verify: differing chunks resent and committed"
            );
            self.st().verify = Some(report.clone());
        }
        report.state = "re-verifying".into();
        self.st().verify = Some(report.clone());
        let again = self.compare(Some(units), None).await?;
        let r = report.repair.get_or_insert_with(RepairReport::default);
        r.reverified_chunks = units.len();
        r.still_differing_chunks = again.units.len();
        r.still_differing = again.ranges;
        r.still_unlisted_chunks = again.omitted;
        r.duration_s = start.elapsed().as_secs_f64();
        if r.still_differing_chunks == 0 {
            tracing::info!(
                chunks = r.repaired_chunks,
                "verify: repaired; the disks are equal again"
            );
        } else {
            tracing::warn!(
                still = r.still_differing_chunks,
                of = r.repaired_chunks,
                "verify: chunks still differ after their repair"
            );
        }
        Ok(())
    }
}
