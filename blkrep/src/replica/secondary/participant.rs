//! The secondary's half of a checkpoint participant.
//!
//! On the primary a participant ([`crate::epoch::Participant`]) cuts, drains and summarises
//! its share of epoch `n`. On the secondary its other half receives that share by its own
//! transport (the block layer through the NBD replication export, memory through memrep's),
//! stages it, and takes part in the all-or-nothing commit:
//!
//! ```text
//!  CHECKPOINT(n, summaries) ─▶ every participant: prepare(n, its summary)   (check + make durable)
//!        all Ok ─▶ every participant: commit(n)    ─▶ COMMITTED(n)
//!        any Err ─▶ every participant: abort(n)    ─▶ ABORTED(n, reason)
//!  failover ─▶ every participant: failover(target, last committed epoch)
//! ```
//!
//! The block layer is the first implementation (in [`super::commit`]); others register with
//! [`super::Secondary::add_participant`] before the first session. Every participant has one
//! summary in every checkpoint, and a checkpoint naming a participant this node does not have
//! is aborted.

use crate::epoch::EpochSummary;
use crate::replica::FailoverTarget;
use crate::sync::BoxFuture;

/// The secondary's half of a checkpoint participant.
pub trait SecondaryParticipant: Send + Sync {
    /// The participant id its primary half puts in [`EpochSummary::participant`].
    fn id(&self) -> u16;
    /// Short name for logs and status.
    fn name(&self) -> &str;
    /// A session (re)starts at `epoch` (RESUME): whatever an interrupted session staged for
    /// uncommitted epochs is dropped, and shares of `epoch` and later arrive next.
    fn resume(&self, epoch: u64);
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
