//! Resync: the blocks the secondary may lack (the dirty bitmap), the digest comparison that
//! forgets the units both sides hold alike, and sending what is left through the forward
//! queue.
//!
//! ```text
//!  begin_sync ─▶ mark_all_dirty / mark_allocated_dirty ─▶ dirty_units ─▶ forget_equal
//!    (paused: the secondary's disk stands still)        SUMS of the secondary ┘
//!  resumed ─▶ resync: every dirty run (≤ 1 MiB) read under its block lock, enqueued
//!          ─▶ the next commit completes the sync (BlockParticipant::commit)
//! ```

use crate::replica::error::ReplicaError;
use crate::replica::status::ResyncStats;
use std::time::Instant;

use roaring::RoaringTreemap;

use super::queue::FwdKind;
use super::state::State;
use super::{Primary, PrimaryMode};
use crate::digest::{self, DIGEST_BLOCK};
use crate::storage::Result;

/// Most blocks one resync request carries (1 MiB; 4 MiB measured no faster).
const RESYNC_RUN_BLOCKS: u64 = 256;
/// How often a running resync publishes a `sync` progress event.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

impl State {
    /// The resync's progress with its running times filled in.
    pub(super) fn resync_view(&self) -> ResyncStats {
        let mut r = self.resync.clone();
        if r.total_s.is_none() {
            if let Some(t) = self.resync_started {
                r.elapsed_s = t.elapsed().as_secs_f64();
            }
        }
        if let Some(t) = self.sending_started {
            let until = self.sending_ended.unwrap_or_else(Instant::now);
            let secs = until.duration_since(t).as_secs_f64();
            if secs > 0.0 {
                r.throughput_mb_s = r.sent_bytes as f64 / secs / 1e6;
            }
        }
        r
    }

    /// The first run of consecutive dirty blocks (at most [`RESYNC_RUN_BLOCKS`]).
    pub(super) fn first_dirty_run(&self) -> Option<(u64, u64)> {
        let mut it = self.dirty.iter();
        let first = it.next()?;
        let mut last = first;
        for b in it.take(RESYNC_RUN_BLOCKS as usize - 1) {
            if b != last + 1 {
                break;
            }
            last = b;
        }
        Some((first, last))
    }
}

impl Primary {
    /// Progress of the current or last resync.
    pub fn resync_stats(&self) -> ResyncStats {
        self.st().resync_view()
    }

    /// Every block of the disk becomes dirty (a checksum sync starts; the comparison then
    /// removes the units both sides hold alike).
    pub async fn mark_all_dirty(&self) {
        let _g = self.gate.write().await;
        let n = digest::blocks(self.local.size());
        if n > 0 {
            self.st().dirty.insert_range(0..n);
        }
    }

    /// Every block that is not a hole on the local disk becomes dirty (a full sync to an
    /// empty secondary).
    pub async fn mark_allocated_dirty(&self) -> Result<()> {
        let mut set = RoaringTreemap::new();
        for (o, l) in crate::storage::data_ranges(&*self.local, 0, self.local.size()).await? {
            set.insert_range(o / DIGEST_BLOCK..(o + l).div_ceil(DIGEST_BLOCK));
        }
        let _g = self.gate.write().await;
        self.st().dirty |= set;
        Ok(())
    }

    /// A sync begins: record its kind for status.
    pub fn begin_sync(&self, kind: &'static str, unit_blocks: u64) {
        let mut st = self.st();
        st.resync = ResyncStats {
            kind: Some(kind.into()),
            state: "comparing".into(),
            unit_blocks,
            dirty_at_start: st.dirty.len(),
            completed: st.resync.completed,
            ..Default::default()
        };
        st.resync_started = Some(Instant::now());
        st.sending_started = None;
        st.sending_ended = None;
        let dirty = st.dirty.len();
        drop(st);
        self.events.emit(
            "sync",
            serde_json::json!({"state": "started", "kind": kind, "dirty_blocks": dirty}),
        );
    }

    /// Units (of `unit_blocks` blocks) that may differ from the secondary: those holding a
    /// dirty block.
    pub fn dirty_units(&self, unit_blocks: u64) -> RoaringTreemap {
        let st = self.st();
        if unit_blocks == 1 {
            return st.dirty.clone();
        }
        let mut units = RoaringTreemap::new();
        let mut last = u64::MAX;
        for b in st.dirty.iter() {
            let u = b / unit_blocks;
            if u != last {
                units.insert(u);
                last = u;
            }
        }
        units
    }

    /// The secondary's digests of `units`: forget the dirty blocks of every unit whose digest
    /// equals ours now (the secondary holds exactly our data there). Under the gate, so no
    /// write slips between the comparison and the removal. A unit holding a block whose
    /// digest entry is unknown (a local write failed part way) is never equal: our entry
    /// may still be the hash of the old data, which the secondary holds. Returns how many
    /// were equal.
    pub async fn forget_equal(
        &self,
        unit_blocks: u64,
        units: &RoaringTreemap,
        sums: &[u64],
    ) -> u64 {
        let _g = self.gate.write().await;
        let mut st = self.st();
        let n = self.digest.len();
        let mut equal = 0;
        for (u, theirs) in units.iter().zip(sums) {
            let a = (u * unit_blocks).min(n);
            let b = ((u + 1) * unit_blocks).min(n);
            let unknown = !st.unknown.is_empty() && (a..b).any(|x| st.unknown.contains(x));
            if !unknown && self.digest.unit_sum(u, unit_blocks) == *theirs {
                if b > a {
                    st.dirty.remove_range(a..b);
                }
                equal += 1;
            }
        }
        st.resync.compared_units += units.len();
        st.resync.equal_units += equal;
        equal
    }

    /// Whether a resync is sending dirty blocks (checkpoints wait for it).
    pub fn is_resyncing(&self) -> bool {
        self.st().resyncing
    }

    /// Send every dirty block to the secondary through the forward queue (in the current
    /// epoch, ordered with client writes by the block locks). Returns the bytes sent; an
    /// error when replication stopped meanwhile.
    pub async fn resync(&self) -> std::result::Result<u64, ReplicaError> {
        let mut sent = 0u64;
        let mut reported = Instant::now();
        loop {
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                let r = self.st().resync.clone();
                self.events.emit(
                    "sync",
                    serde_json::json!({
                        "state": "progress",
                        "kind": r.kind,
                        "sent_blocks": r.sent_blocks,
                        "to_send_blocks": r.to_send_blocks,
                        "sent_bytes": r.sent_bytes,
                    }),
                );
            }
            let run = {
                let st = self.st();
                if st.mode != PrimaryMode::Replicating {
                    return Err(ReplicaError::State(
                        "replication stopped during the resync".into(),
                    ));
                }
                st.first_dirty_run()
            };
            let Some((first, last)) = run else { break };
            sent += self.send_run(first, last, Purpose::Resync).await?.bytes;
        }
        let mut st = self.st();
        if st.mode == PrimaryMode::Replicating {
            st.resyncing = false;
            st.resync.state = "checkpointing".into();
            st.sending_ended = Some(Instant::now());
        }
        Ok(sent)
    }

    /// Send the dirty blocks `first..=last` (read under their block lock, so ordered with
    /// client writes) and forget them; the unknown digest entries among them become the
    /// hashes of the bytes sent. For a repair, so does every entry that no longer matches
    /// the bytes read (the disk was changed behind our back: the secondary is to hold what
    /// the disk holds, and the digest is to say so). Returns the bytes sent.
    pub(super) async fn send_run(
        &self,
        first: u64,
        last: u64,
        purpose: Purpose,
    ) -> std::result::Result<Sent, ReplicaError> {
        let what = match purpose {
            Purpose::Resync => "resync",
            Purpose::Repair => "repair",
        };
        let off = first * DIGEST_BLOCK;
        let end = ((last + 1) * DIGEST_BLOCK).min(self.local.size());
        if end <= off {
            self.st().dirty.remove_range(first..=last);
            return Ok(Sent::default());
        }
        let len = end - off;
        let _l = self.locks.lock(first, last).await;
        let data = self.local.read_at(off, len as usize).await.map_err(|e| {
            ReplicaError::Disk(format!("reading the local disk for the {what}: {e}"))
        })?;
        let hash_of = |b: u64| {
            let s = ((b - first) * DIGEST_BLOCK) as usize;
            let e = (s + DIGEST_BLOCK as usize).min(data.len());
            digest::block_hash(b, &data[s..e])
        };
        // Under the block lock, which every writer of these digest entries holds too.
        let stale: Vec<(u64, u64)> = match purpose {
            Purpose::Resync => Vec::new(),
            Purpose::Repair => (first..=last)
                .map(|b| (b, hash_of(b)))
                .filter(|&(b, h)| self.digest.get(b) != h)
                .collect(),
        };
        let permit = self
            .space
            .clone()
            .acquire_many_owned(self.budget(len))
            .await
            .ok();
        let _gate = self.gate.read().await;
        let mut st = self.st();
        if st.mode != PrimaryMode::Replicating {
            return Err(ReplicaError::State(format!(
                "replication stopped during the {what}"
            )));
        }
        st.dirty.remove_range(first..=last);
        if !st.unknown.is_empty() {
            // The block lock has kept client writes out since the read: these are the
            // bytes the disk holds, and the secondary is about to hold.
            for b in first..=last {
                if st.unknown.remove(b) {
                    self.digest.set(b, hash_of(b));
                }
            }
        }
        for &(b, h) in &stale {
            self.digest.set(b, h);
        }
        st.account(first, last, len);
        if purpose == Purpose::Resync {
            st.resync.sent_blocks += last - first + 1;
            st.resync.sent_bytes += len;
        }
        drop(st);
        if !stale.is_empty() {
            tracing::warn!(
                first,
                last,
                blocks = stale.len(),
                "repair: the primary's disk no longer matches its digest here (changed behind lockstep's back): sending what it holds"
            );
        }
        let kind = if digest::is_zero(&data) {
            FwdKind::Zeroes { may_unmap: true }
        } else {
            FwdKind::Write { data, fua: false }
        };
        self.enqueue(kind, off, len, None, permit);
        Ok(Sent {
            bytes: len,
            rehashed: stale.len() as u64,
        })
    }
}

/// Why dirty blocks are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// A session's resync: counted in its progress.
    Resync,
    /// `verify --repair`: checked against the digest first.
    Repair,
}

/// What sending dirty blocks did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// Bytes sent.
    pub bytes: u64,
    /// Blocks whose digest entry no longer matched the disk, rehashed.
    pub rehashed: u64,
}
