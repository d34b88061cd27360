//! What a node reports to `lockstep status`: typed, serialised by the daemon as JSON on the
//! control socket and deserialised by the CLI and the tests.
//!
//! Numbers are plain counts, bytes or microseconds (`_us`); identifiers (generations,
//! sessions, digests) are 16 hex digits.

use serde::{Deserialize, Serialize};

use super::buffer::BufferStats;

/// Latency percentiles over a sliding window, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample ever.
    pub max: u64,
    /// Samples ever recorded.
    pub samples: u64,
}

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
    /// The differing ranges (adjacent chunks merged); when done.
    #[serde(default)]
    pub differing: Vec<ByteRange>,
    /// Bytes compared; when done.
    #[serde(default)]
    pub bytes_compared: u64,
    /// How long it took; when done.
    #[serde(default)]
    pub duration_s: f64,
    /// Compare rate; when done.
    #[serde(default)]
    pub mb_per_s: f64,
}
