//! Online verify: compare the primary's and the secondary's disks by digest while both
//! keep serving.
//!
//! ```text
//!  per batch of 256 chunks (64 KiB): lock the blocks against client writes ─▶ barrier
//!  (everything forwarded before is applied on the secondary) ─▶ SUMS ─▶ compare
//! ```

use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use serde_json::{json, Value};

use super::{Replicator, CHUNK_BLOCKS};
use crate::digest::{self, DIGEST_BLOCK};
use crate::replica::primary::PrimaryMode;

impl Replicator {
    /// Compare the primary's and the secondary's disks chunk by chunk (64 KiB) by digest,
    /// without moving the data, while both keep serving. Each batch of chunks is locked
    /// against client writes and waits until everything forwarded before it is applied on
    /// the secondary, so only real differences are reported.
    pub async fn verify(&self) -> Result<Value, String> {
        let p = &self.primary;
        let link = self
            .current_link()
            .filter(|_| p.mode() == PrimaryMode::Replicating)
            .ok_or("not replicating: nothing to verify against")?;
        if p.is_resyncing() {
            return Err("a resync is in progress: verify after it completes".into());
        }
        let start = Instant::now();
        let size = p.size_bytes();
        let nblocks = digest::blocks(size);
        let nunits = nblocks.div_ceil(CHUNK_BLOCKS);
        const BATCH: u64 = 256;
        let mut differing: Vec<(u64, u64)> = Vec::new();
        let mut ndiff = 0u64;
        let mut last_log = Instant::now();
        let mut u0 = 0;
        while u0 < nunits {
            let u1 = (u0 + BATCH).min(nunits);
            let first = u0 * CHUNK_BLOCKS;
            let last = (u1 * CHUNK_BLOCKS).min(nblocks) - 1;
            let units: RoaringTreemap = (u0..u1).collect();
            let sums = {
                let _l = p.lock_blocks(first, last).await;
                p.barrier().await.map_err(|e| format!("verify: {e}"))?;
                link.sums(CHUNK_BLOCKS as u32, units.clone())
                    .await
                    .map_err(|e| format!("verify: {e}"))?
            };
            for (u, theirs) in units.iter().zip(&sums) {
                if p.digest_table().unit_sum(u, CHUNK_BLOCKS) != *theirs {
                    ndiff += 1;
                    let off = u * CHUNK_BLOCKS * DIGEST_BLOCK;
                    let len = (CHUNK_BLOCKS * DIGEST_BLOCK).min(size - off);
                    match differing.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += len,
                        _ => differing.push((off, len)),
                    }
                }
            }
            u0 = u1;
            let progress = json!({
                "state": "running",
                "done_chunks": u0,
                "total_chunks": nunits,
                "differing_chunks": ndiff,
            });
            self.st().verify = Some(progress);
            if last_log.elapsed() > Duration::from_secs(1) {
                last_log = Instant::now();
                tracing::info!(
                    done = u0,
                    total = nunits,
                    differing = ndiff,
                    "verify: {:.0}%",
                    100.0 * u0 as f64 / nunits as f64
                );
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let result = json!({
            "state": "done",
            "chunk_bytes": CHUNK_BLOCKS * DIGEST_BLOCK,
            "total_chunks": nunits,
            "done_chunks": nunits,
            "differing_chunks": ndiff,
            "differing": differing.iter().map(|(o, l)| json!({"offset": o, "len": l})).collect::<Vec<_>>(),
            "bytes_compared": size,
            "duration_s": secs,
            "mb_per_s": size as f64 / secs.max(1e-9) / 1e6,
        });
        tracing::info!(differing = ndiff, secs, "verify done");
        self.st().verify = Some(result.clone());
        Ok(result)
    }
}
