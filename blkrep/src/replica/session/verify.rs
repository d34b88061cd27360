//! Online verify: compare the primary's and the secondary's disks by digest while both
//! keep serving.
//!
//! ```text
//!  per batch of 256 chunks (64 KiB): lock the blocks against client writes ─▶ barrier
//!  (everything forwarded before is applied on the secondary) ─▶ SUMS ─▶ compare
//! ```

use std::time::{Duration, Instant};

use crate::replica::error::ReplicaError;
use crate::replica::status::{ByteRange, VerifyReport};
use roaring::RoaringTreemap;

use super::{Replicator, CHUNK_BLOCKS};
use crate::digest::{self, DIGEST_BLOCK};
use crate::replica::primary::PrimaryMode;

impl Replicator {
    /// Compare the primary's and the secondary's disks chunk by chunk (64 KiB) by digest,
    /// without moving the data, while both keep serving. Each batch of chunks is locked
    /// against client writes and waits until everything forwarded before it is applied on
    /// the secondary, so only real differences are reported.
    pub async fn verify(&self) -> Result<VerifyReport, ReplicaError> {
        let p = &self.primary;
        let link = self
            .current_link()
            .filter(|_| p.mode() == PrimaryMode::Replicating)
            .ok_or_else(|| {
                ReplicaError::State("not replicating: nothing to verify against".into())
            })?;
        if p.is_resyncing() {
            return Err(ReplicaError::State(
                "a resync is in progress: verify after it completes".into(),
            ));
        }
        let start = Instant::now();
        let size = p.size_bytes();
        let nblocks = digest::blocks(size);
        let nunits = nblocks.div_ceil(CHUNK_BLOCKS);
        const BATCH: u64 = 256;
        let mut report = VerifyReport {
            state: "running".into(),
            chunk_bytes: CHUNK_BLOCKS * DIGEST_BLOCK,
            total_chunks: nunits,
            done_chunks: 0,
            differing_chunks: 0,
            differing: Vec::new(),
            bytes_compared: 0,
            duration_s: 0.0,
            mb_per_s: 0.0,
            participants: serde_json::Map::new(),
        };
        let mut last_log = Instant::now();
        let mut u0 = 0;
        while u0 < nunits {
            let u1 = (u0 + BATCH).min(nunits);
            let first = u0 * CHUNK_BLOCKS;
            let last = (u1 * CHUNK_BLOCKS).min(nblocks) - 1;
            let units: RoaringTreemap = (u0..u1).collect();
            let sums = {
                let _l = p.lock_blocks(first, last).await;
                p.barrier().await?;
                link.sums(CHUNK_BLOCKS as u32, units.clone()).await?
            };
            for (u, theirs) in units.iter().zip(&sums) {
                if p.digest_table().unit_sum(u, CHUNK_BLOCKS) != *theirs {
                    report.differing_chunks += 1;
                    let offset = u * CHUNK_BLOCKS * DIGEST_BLOCK;
                    let len = (CHUNK_BLOCKS * DIGEST_BLOCK).min(size - offset);
                    match report.differing.last_mut() {
                        Some(r) if r.offset + r.len == offset => r.len += len,
                        _ => report.differing.push(ByteRange { offset, len }),
                    }
                }
            }
            u0 = u1;
            report.done_chunks = u0;
            self.st().verify = Some(report.clone());
            if last_log.elapsed() > Duration::from_secs(1) {
                last_log = Instant::now();
                tracing::info!(
                    done = u0,
                    total = nunits,
                    differing = report.differing_chunks,
                    "verify: {:.0}%",
                    100.0 * u0 as f64 / nunits as f64
                );
            }
        }
        let secs = start.elapsed().as_secs_f64();
        report.state = "done".into();
        report.bytes_compared = size;
        report.duration_s = secs;
        report.mb_per_s = size as f64 / secs.max(1e-9) / 1e6;
        tracing::info!(differing = report.differing_chunks, secs, "verify done");
        self.st().verify = Some(report.clone());
        Ok(report)
    }
}
