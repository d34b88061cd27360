//! What a node reports to `lockstep status`: typed, serialised by the daemon as JSON on the
//! control socket and deserialised by the CLI and the tests.
//!
//! Numbers are plain counts, bytes or microseconds (`_us`); identifiers (generations,
//! sessions, digests) are 16 hex digits.

use serde::{Deserialize, Serialize};

pub use crate::epoch::CheckpointStatus;
pub use crate::latency::LatencySummary;

use super::buffer::BufferStats;

/// What a failover did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverReport {
    /// checkpoint or latest.
    pub target: String,
    /// The last committed epoch.
    pub committed_epoch: u64,
    /// Blocks rewritten from the buffer.
    pub restored_blocks: u64,
    /// Time the failover took, in microseconds.
    pub duration_us: u64,
    /// The primary's digest of the committed checkpoint, if known.
    pub checkpoint_digest: Option<String>,
    /// Whether the image can be compared with that digest (checkpoint target, no local
    /// writes since the checkpoint).
    pub comparable: bool,
    /// The generation this node starts as a primary.
    pub generation: String,
}

/// How primaries prove themselves on a secondary's listen port, and what its settings risk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAuth {
    /// A peer key is required.
    pub psk: bool,
    /// TLS with a verified certificate is required.
    pub tls: bool,
    /// Sentences for the operator: what an attacker or a cut link could do.
    pub risks: Vec<String>,
}

/// A secondary's status (also after it failed over and serves as a primary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondaryStatus {
    /// "secondary", or "primary" after a failover.
    pub role: String,
    /// waiting, syncing, replicating, paused, failing-over, primary.
    pub mode: String,
    /// The epoch forwarded writes belong to now.
    pub epoch: u64,
    /// The last committed epoch.
    pub committed_epoch: u64,
    /// The connected (or last) primary's address.
    pub peer: Option<String>,
    /// connected, lost, waiting or none.
    pub peer_state: String,
    /// The disk (with the buffer) holds a checkpoint it can fail over to.
    pub consistent: bool,
    /// The kind of sync in progress (full, checksum, incremental).
    pub resyncing: Option<String>,
    /// The kind of the last sync that completed.
    pub last_sync: Option<String>,
    /// This node's data generation.
    pub generation: String,
    /// The running session's id.
    pub session: Option<String>,
    /// The disk buffer.
    pub buffer: BufferStats,
    /// Forwarded writes applied.
    pub forwarded_writes: u64,
    /// Their bytes.
    pub forwarded_bytes: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Checkpoints aborted.
    pub checkpoints_aborted: u64,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// How long each epoch mark held the replication connection.
    pub mark_drain_us: LatencySummary,
    /// The primary's digest of the last committed checkpoint.
    pub checkpoint_digest: Option<String>,
    /// The failover, once it happened.
    pub failover: Option<FailoverReport>,
    /// Blocks written since the failover (what a returning old primary must be sent).
    pub dirty_blocks: u64,
    /// Participants besides the block layer, by name.
    pub participants: serde_json::Map<String, serde_json::Value>,
    /// The last thing that went wrong.
    pub last_error: Option<String>,
    /// Added by the daemon: who may become this node's primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_auth: Option<PeerAuth>,
}

/// A byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Progress or result of an online verify (`lockstep verify`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// running or done.
    pub state: String,
    /// Bytes per compared chunk.
    pub chunk_bytes: u64,
    /// Chunks in the disk.
    pub total_chunks: u64,
    /// Chunks compared so far.
    pub done_chunks: u64,
    /// Chunks that differ so far.
    pub differing_chunks: u64,
    /// The differing ranges (adjacent chunks merged); when done. At most
    /// [`MAX_LISTED_RANGES`]; the differing chunks beyond are counted in `unlisted_chunks`.
    #[serde(default)]
    pub differing: Vec<ByteRange>,
    /// Differing chunks not in `differing` (beyond [`MAX_LISTED_RANGES`] ranges).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unlisted_chunks: u64,
    /// Bytes compared; when done.
    #[serde(default)]
    pub bytes_compared: u64,
    /// How long it took; when done.
    #[serde(default)]
    pub duration_s: f64,
    /// Compare rate; when done.
    #[serde(default)]
    pub mb_per_s: f64,
    /// The other participants' own comparisons (memory regions), by name; when done.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub participants: serde_json::Map<String, serde_json::Value>,
    /// What `verify --repair` did about the differing chunks (None without `--repair`, or
    /// when nothing differed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairReport>,
}

/// Differing ranges a [`VerifyReport`] lists at most (the count is always exact).
pub const MAX_LISTED_RANGES: usize = 4096;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `verify --repair`: the differing chunks resent from the primary, committed by a
/// checkpoint, and compared again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Chunks resent.
    pub repaired_chunks: u64,
    /// Bytes resent.
    pub repaired_bytes: u64,
    /// Blocks whose bytes on the primary's disk no longer matched the primary's own digest
    /// (changed behind lockstep's back): sent as the disk holds them, and rehashed.
    #[serde(default)]
    pub rehashed_blocks: u64,
    /// Checkpoints requested to commit the resent chunks (one per batch).
    pub checkpoints: u64,
    /// The epoch of the last of them.
    pub committed_epoch: u64,
    /// Chunks compared again after the commit (the repaired ones).
    pub reverified_chunks: u64,
    /// Of those, chunks that still differ.
    pub still_differing_chunks: u64,
    /// Their ranges (adjacent chunks merged; at most [`MAX_LISTED_RANGES`]).
    #[serde(default)]
    pub still_differing: Vec<ByteRange>,
    /// Chunks still differing not in `still_differing`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub still_unlisted_chunks: u64,
    /// Seconds from the first resend to the end of the second comparison.
    pub duration_s: f64,
}

/// Progress of the current (or last) resync, for status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncStats {
    /// incremental, checksum or full.
    pub kind: Option<String>,
    /// comparing, sending, checkpointing, done, interrupted.
    pub state: String,
    /// Units compared by digest, and how many of them were equal (not sent).
    pub compared_units: u64,
    /// Of those, equal on both sides.
    pub equal_units: u64,
    /// Blocks per compared unit.
    pub unit_blocks: u64,
    /// Dirty blocks when the sync began (written since the last commit, plus every block
    /// for a checksum sync, every allocated one for a full sync).
    pub dirty_at_start: u64,
    /// Blocks to send after the comparison.
    pub to_send_blocks: u64,
    /// Blocks sent so far.
    pub sent_blocks: u64,
    /// Bytes sent so far.
    pub sent_bytes: u64,
    /// Seconds since the resync started.
    pub elapsed_s: f64,
    /// Seconds the comparison took.
    pub compare_s: f64,
    /// Seconds from the start until the resync's checkpoint committed.
    pub total_s: Option<f64>,
    /// Sent bytes per second, while sending.
    pub throughput_mb_s: f64,
    /// Resyncs completed since start.
    pub completed: u64,
}

/// The forward queue to the secondary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardQueue {
    /// Requests queued or in flight.
    pub depth: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The queue's limit in bytes (`--forward-queue`).
    pub limit_bytes: u64,
}

/// The primary's block layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockStatus {
    /// replicating, paused, unprotected, stopped.
    pub mode: String,
    /// A resync is sending dirty blocks.
    pub resyncing: bool,
    /// The current (or last) resync.
    pub resync: ResyncStats,
    /// This node's data generation.
    pub generation: String,
    /// The secondary generation the dirty bitmap is relative to.
    pub tracked_generation: String,
    /// local, received or durable.
    pub ack: String,
    /// The forward queue.
    pub forward_queue: ForwardQueue,
    /// Writes forwarded to the secondary.
    pub forwarded_writes: u64,
    /// Their bytes.
    pub forwarded_bytes: u64,
    /// Blocks the secondary lacks (or may lack).
    pub dirty_blocks: u64,
    /// Why the disk is not protected, when it is not.
    pub unprotected_reason: Option<String>,
    /// For how long.
    pub unprotected_for_s: Option<f64>,
    /// The digest of the whole disk.
    pub digest: String,
    /// The persistent dirty bitmap (`DISK.lockstep-bitmap`), when the primary keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bitmap: Option<crate::replica::bitmap::BitmapStats>,
}

/// The primary's link to its secondary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// connected, or why not.
    pub peer_state: String,
    /// Sessions started.
    pub sessions: u64,
    /// Connection attempts.
    pub connect_attempts: u64,
    /// Why the last attempt failed.
    pub last_attempt_error: Option<String>,
    /// Seconds from the last loss to the resumed session.
    pub last_resume_s: Option<f64>,
    /// The kind of the last sync.
    pub last_sync: Option<String>,
    /// Seconds since replication paused, while paused.
    pub paused_for_s: Option<f64>,
    /// The running or last online verify.
    pub verify: Option<VerifyReport>,
}

/// A primary's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrimaryStatus {
    /// Always "primary".
    pub role: String,
    /// The secondary's address.
    pub peer: String,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
    /// Why the disk is unprotected, else the last checkpoint error.
    pub last_error: Option<String>,
    /// The link.
    #[serde(flatten)]
    pub link: LinkStatus,
    /// The block layer.
    #[serde(flatten)]
    pub block: BlockStatus,
    /// Checkpoints.
    #[serde(flatten)]
    pub checkpoints: CheckpointStatus,
}

/// Either node's status, as `lockstep status` reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeStatus {
    /// A secondary (also after it failed over).
    Secondary(Box<SecondaryStatus>),
    /// A primary.
    Primary(Box<PrimaryStatus>),
}

/// A failed-over disk compared with its checkpoint (`lockstep verify` on a secondary).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestCheck {
    /// The disk's digest now.
    pub image_digest: String,
    /// The primary's digest of the committed checkpoint, if known.
    pub checkpoint_digest: Option<String>,
    /// The checkpoint failed over to.
    #[serde(default)]
    pub committed_epoch: u64,
    /// Whether the disk can equal that digest: failed over to the checkpoint, and nothing
    /// written since (else a difference is expected, not a fault).
    #[serde(default)]
    pub comparable: bool,
    /// Blocks written since the failover.
    #[serde(default)]
    pub written_blocks: u64,
}

impl DigestCheck {
    /// Whether the disk is the checkpoint.
    pub fn equal(&self) -> bool {
        self.checkpoint_digest.as_deref() == Some(self.image_digest.as_str())
    }
}
