//! The primary's link state and its transitions.
//!
//! ```text
//!  new ─▶ Paused ──give_up(): reconnect timeout, or refused──▶ Unprotected
//!           ▲  │                                                  │
//!           │  └──────── resumed(): RESUME acknowledged ──────────┴─▶ Replicating
//!           │                                                            │
//!           └── link_lost(): a forward, flush or checkpoint failed, ─────┘
//!                            or a local write failed part way
//! ```
//!
//! While not replicating, writes stay local and their blocks are recorded as dirty; the
//! first such write starts a new data generation.

use std::collections::{BTreeMap, HashMap};
use std::sync::MutexGuard;
use std::time::Instant;

use roaring::RoaringTreemap;
use tokio::sync::oneshot;

use super::Primary;
use crate::epoch::EpochSummary;
use crate::replica::status::ResyncStats;

/// The reason given while no secondary has been synced since start.
pub(super) const NOT_CONNECTED_YET: &str = "no secondary connected yet";

/// Replicating or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrimaryMode {
    /// Forwarding every write.
    Replicating,
    /// The link to the secondary is down (or not up yet): writing locally, recording dirty
    /// blocks, trying to reconnect.
    Paused,
    /// Paused for longer than the reconnect timeout, or the secondary refused us: still
    /// recording dirty blocks (and still trying), but no longer expecting the secondary back.
    Unprotected,
}

impl PrimaryMode {
    /// The name in status.
    pub fn name(self) -> &'static str {
        match self {
            PrimaryMode::Replicating => "replicating",
            PrimaryMode::Paused => "paused",
            PrimaryMode::Unprotected => "unprotected",
        }
    }
}

/// Modifications forwarded in one epoch (its checkpoint summary).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Count {
    pub(super) items: u64,
    pub(super) bytes: u64,
}

/// Everything behind the primary's state mutex.
#[derive(Debug)]
pub(super) struct State {
    pub(super) mode: PrimaryMode,
    pub(super) epoch: u64,
    pub(super) committed: u64,
    pub(super) counts: BTreeMap<u64, Count>,
    /// Blocks written per open epoch: what the secondary may lack if it is lost.
    pub(super) written: BTreeMap<u64, RoaringTreemap>,
    pub(super) dirty: RoaringTreemap,
    /// Dirty blocks whose digest entry may not match the disk: a local modification of them
    /// failed after it was started (a torn write, or a failed read-back of an edge block).
    /// A digest comparison never forgets them (the secondary may hold the very hash our
    /// stale entry has); the resync rehashes them from the bytes it reads and sends.
    /// Always a subset of `dirty`.
    pub(super) unknown: RoaringTreemap,
    pub(super) marks: HashMap<
        u64,
        (
            EpochSummary,
            oneshot::Receiver<std::result::Result<(), String>>,
        ),
    >,
    pub(super) unprotected_reason: Option<String>,
    pub(super) unprotected_since: Option<Instant>,
    /// A resync is under way: no checkpoint may commit before every dirty block is sent.
    pub(super) resyncing: bool,
    /// The next commit completes a sync: the secondary then holds our generation.
    pub(super) sync_commit_pending: bool,
    /// Whether a write since the link was lost started a new generation.
    pub(super) bumped: bool,
    pub(super) resync: ResyncStats,
    pub(super) resync_started: Option<Instant>,
    pub(super) sending_started: Option<Instant>,
    pub(super) sending_ended: Option<Instant>,
}

impl State {
    /// Paused in epoch `committed + 1`, no secondary yet.
    pub(super) fn new(committed: u64) -> Self {
        State {
            mode: PrimaryMode::Paused,
            epoch: committed + 1,
            committed,
            counts: BTreeMap::new(),
            written: BTreeMap::new(),
            dirty: RoaringTreemap::new(),
            unknown: RoaringTreemap::new(),
            marks: HashMap::new(),
            unprotected_reason: Some(NOT_CONNECTED_YET.into()),
            unprotected_since: Some(Instant::now()),
            resyncing: false,
            sync_commit_pending: false,
            bumped: false,
            resync: ResyncStats::default(),
            resync_started: None,
            sending_started: None,
            sending_ended: None,
        }
    }

    /// A modification of blocks `first..=last` (`len` bytes) is forwarded in the current
    /// epoch: count it for the checkpoint summary and remember its blocks until the commit.
    pub(super) fn account(&mut self, first: u64, last: u64, len: u64) {
        let epoch = self.epoch;
        let c = self.counts.entry(epoch).or_default();
        c.items += 1;
        c.bytes += len;
        self.written
            .entry(epoch)
            .or_default()
            .insert_range(first..=last);
    }
}

impl Primary {
    /// Stop replicating (the link broke, a checkpoint failed): from now on writes stay
    /// local and are recorded as dirty, together with everything written in epochs the
    /// secondary has not committed; the primary is `paused` until a resync. Idempotent.
    pub async fn link_lost(&self, reason: &str) {
        let _g = self.gate.write().await;
        self.stop_replicating(self.st(), reason);
    }

    /// [`Primary::link_lost`]'s transition, for a caller that holds the gate for writing
    /// (and so can record more in the same step).
    pub(super) fn stop_replicating(&self, mut st: MutexGuard<'_, State>, reason: &str) {
        if st.mode != PrimaryMode::Replicating {
            return;
        }
        self.events.mode(
            "primary",
            st.mode.name(),
            PrimaryMode::Paused.name(),
            Some(reason),
        );
        self.events.emit(
            "peer",
            serde_json::json!({"state": "lost", "reason": reason}),
        );
        st.mode = PrimaryMode::Paused;
        st.unprotected_reason = Some(reason.to_string());
        st.unprotected_since = Some(Instant::now());
        let written = std::mem::take(&mut st.written);
        for (_, w) in written {
            st.dirty |= w;
        }
        st.marks.clear();
        st.counts.clear();
        if st.resyncing {
            st.resync.state = "interrupted".into();
        }
        st.resyncing = false;
        st.sync_commit_pending = false;
        st.bumped = false;
        let dirty = st.dirty.len();
        drop(st);
        tracing::warn!(%reason, dirty_blocks = dirty, "the link to the secondary is lost: paused, recording dirty blocks");
        self.lost.send_replace(Some(reason.to_string()));
    }

    /// The secondary is not coming back soon (reconnect timeout, or it refused us): say so
    /// in status. Writes go on being recorded for a later resync.
    pub fn give_up(&self, reason: &str) {
        let mut st = self.st();
        if st.mode == PrimaryMode::Paused {
            self.events
                .mode("primary", "paused", "unprotected", Some(reason));
            st.mode = PrimaryMode::Unprotected;
            st.unprotected_reason = Some(reason.to_string());
            tracing::warn!(%reason, "running unprotected");
        }
    }

    /// A write while disconnected makes this disk's data differ from every secondary's:
    /// start a new generation (once per disconnection), so that a secondary that went its
    /// own way meanwhile is recognised as split-brain.
    pub(super) async fn note_disconnected_write(&self) {
        let need = {
            let mut st = self.st();
            !std::mem::replace(&mut st.bumped, true)
        };
        if need {
            // An fsync'd file replacement: off the async workers.
            let meta = self.meta.clone();
            let r = tokio::task::spawn_blocking(move || {
                meta.update(|m| {
                    m.bump();
                    m.clean = false;
                })
            })
            .await;
            match r {
                Ok(Ok(m)) => tracing::info!(
                    generation = %format!("{:016x}", m.generation),
                    "writing without the secondary: new data generation"
                ),
                Ok(Err(e)) => tracing::warn!("storing the new data generation: {e}"),
                Err(e) => tracing::warn!("storing the new data generation: {e}"),
            }
        }
    }

    /// The epoch replication resumes in.
    pub fn resume_epoch(&self) -> u64 {
        self.st().epoch
    }

    /// The secondary acknowledged RESUME: forward again, and send every dirty block
    /// ([`Primary::resync`]) before the next checkpoint may commit.
    pub async fn resumed(&self) {
        let _g = self.gate.write().await;
        let mut st = self.st();
        self.events.mode(
            "primary",
            st.mode.name(),
            PrimaryMode::Replicating.name(),
            None,
        );
        self.events
            .emit("peer", serde_json::json!({"state": "connected"}));
        st.mode = PrimaryMode::Replicating;
        st.unprotected_reason = None;
        st.unprotected_since = None;
        st.counts.clear();
        st.written.clear();
        st.marks.clear();
        st.resyncing = true;
        st.sync_commit_pending = true;
        st.bumped = false;
        st.resync.state = "sending".into();
        st.resync.to_send_blocks = st.dirty.len();
        if let Some(t) = st.resync_started {
            st.resync.compare_s = t.elapsed().as_secs_f64();
        }
        st.sending_started = Some(Instant::now());
        drop(st);
        self.lost.send_replace(None);
    }
}
