//! The two halves of a participant that has state on the secondary, and the channel between
//! them.
//!
//! On the primary a participant ([`super::Participant`]) cuts, drains and summarises its share
//! of epoch `n`. Its secondary half ([`SecondaryParticipant`]) receives that share through a
//! [`PeerChannel`] (the block layer uses its own NBD stream instead), stages it, and takes
//! part in the all-or-nothing commit:
//!
//! ```text
//!  primary half                                      secondary half
//!  connected(channel, epoch) ── session begins ──▶   resume(epoch)  (drop what is staged)
//!  channel.call(message)      ───────────────────▶   receive(message) ─▶ answer
//!  CHECKPOINT(n, summaries)   ───────────────────▶   every participant: prepare(n, summary)
//!        all Ok  ─▶ every participant: commit(n) ─▶ COMMITTED(n)
//!        any Err ─▶ every participant: abort(n)  ─▶ ABORTED(n, reason)
//!  failover                                       ─▶ every participant: failover(target, n)
//! ```
//!
//! The channel is one connection of the replication session, authenticated and bound to it
//! like the block layer's: messages of an interrupted session are refused, never applied
//! late. Messages are handled one at a time, in the order they were sent.

use super::{BoxFuture, EpochSummary};

/// Which state a failover leaves on the secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverTarget {
    /// The last committed checkpoint (plus the secondary's own writes): COLO's semantic.
    Checkpoint,
    /// Every primary write the secondary acknowledged: DRBD's semantic.
    Latest,
}

impl FailoverTarget {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FailoverTarget::Checkpoint => "checkpoint",
            FailoverTarget::Latest => "latest",
        }
    }
}

impl std::str::FromStr for FailoverTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "checkpoint" => Ok(Self::Checkpoint),
            "latest" => Ok(Self::Latest),
            _ => Err(format!(
                "unknown failover target {s:?} (checkpoint or latest)"
            )),
        }
    }
}

/// The largest message, either way, on a [`PeerChannel`]: the secondary refuses a larger
/// request before reading it, the primary a larger answer.
pub const MAX_PEER_MESSAGE: usize = 16 << 20;

/// How a participant's primary half talks to its secondary half during one replication
/// session: a message, and the secondary half's answer. Calls made one after another reach
/// the secondary in that order.
pub trait PeerChannel: Send + Sync + std::fmt::Debug {
    /// Send `message` (at most [`MAX_PEER_MESSAGE`] bytes) and wait for the answer. An error
    /// is the secondary half's refusal or the connection's loss.
    fn call<'a>(&'a self, message: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// The secondary's half of a checkpoint participant.
pub trait SecondaryParticipant: Send + Sync {
    /// The participant id its primary half puts in [`EpochSummary::participant`].
    fn id(&self) -> u16;
    /// Short name for logs and status.
    fn name(&self) -> &str;
    /// A session (re)starts at `epoch` (RESUME): whatever an interrupted session staged for
    /// uncommitted epochs is dropped, and shares of `epoch` and later arrive next.
    fn resume(&self, epoch: u64);
    /// A message from the primary half over its [`PeerChannel`], in the session current
    /// now. The answer (at most [`MAX_PEER_MESSAGE`] bytes) goes back to the caller; an
    /// error is sent back as a refusal. Every number in `message` comes from the network:
    /// bound it before use.
    fn receive(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let _ = message;
        Err(format!("{} takes no messages", self.name()))
    }
    /// Check that this participant's share of `epoch` is complete and matches `summary`, and
    /// make it durable, without making it the committed state yet. An error aborts the
    /// checkpoint for every participant.
    fn prepare<'a>(
        &'a self,
        epoch: u64,
        summary: &'a EpochSummary,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// Every participant prepared `epoch`: it is now the committed state. Cannot fail: all
    /// the work that can fail belongs in `prepare`.
    fn commit(&self, epoch: u64);
    /// `epoch` will not be committed (`reason` says why); staged shares of it may be kept
    /// until the next `resume` or dropped.
    fn abort(&self, epoch: u64, reason: &str);
    /// The node fails over: make the state at `target` this participant's live state. With
    /// [`FailoverTarget::Checkpoint`] that is the state of epoch `committed`.
    fn failover(&self, target: FailoverTarget, committed: u64)
        -> BoxFuture<'_, Result<(), String>>;
    /// This participant's share of the status report.
    fn status(&self) -> serde_json::Value;
}
