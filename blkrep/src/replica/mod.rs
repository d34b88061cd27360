//! Replication: primary forwarding, the secondary's disk buffer, checkpoints, failover.
//!
//! ```text
//!            primary host                                   secondary host
//!  clients ─▶ NBD export ─▶ Primary ─▶ local disk
//!                             │ forward queue (ordered per block, pipelined)
//!                             └──NBD "replica" + epoch marks──▶ ReplicaSink ─▶ DiskBuffer
//!  EpochCoordinator ─▶ BlockParticipant                              └──────▶ secondary disk
//!         └──── PeerLink: HELLO, CHECKPOINT(n) ⇄ COMMITTED(n), heartbeats ──▶ SecondaryControl
//!  operator ─▶ control socket (JSON lines) on either node: status, checkpoint, failover
//! ```
//!
//! Start reading at [`node`] (how a daemon is put together), then [`primary`] and
//! [`secondary`]; [`wire`] is the control protocol's codec, [`buffer`] the disk buffer.

pub mod admin;
pub mod admission;
pub mod bitmap;
pub mod buffer;
pub mod error;
pub mod events;
pub mod frame;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod primary;
pub mod refusal;
pub mod secondary;
pub mod session;
pub mod status;
pub mod wire;

/// Export name of the secondary's replication target on its `--listen` port.
pub const REPLICA_EXPORT: &str = "lockstep-replica";

/// Participant id of the block layer in checkpoint summaries.
pub const PARTICIPANT_BLOCK: u16 = 1;

pub use crate::epoch::FailoverTarget;

#[cfg(test)]
mod tests;
