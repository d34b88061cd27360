//! [`ReplicaError`]: what can go wrong in the replication control plane, told apart by kind
//! rather than by the words of a message.
//!
//! The daemon's control socket and the logs show the `Display` text; code decides by
//! variant: a [`ReplicaError::Refused`] with a permanent [`RefusalCode`] makes the primary
//! stop retrying, a [`ReplicaError::LinkLost`] while waiting for COMMITTED makes the
//! checkpoint a lost-peer failure rather than a refusal, and so on.

use std::time::Duration;

use super::refusal::RefusalCode;

/// A replication failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// Reading or writing the connection failed, or a frame was malformed.
    #[error("{0}")]
    Io(String),
    /// The peer could not be reached (connect, TLS or authentication failed in a way that
    /// may pass).
    #[error("{0}")]
    Unreachable(String),
    /// The link to the peer died; waiting requests fail with this.
    #[error("link lost: {0}")]
    LinkLost(String),
    /// No answer in time.
    #[error("no {what} within {}", crate::units::duration(.after))]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// For how long.
        after: Duration,
    },
    /// The peer refused; `code` is None when the refusal came before the control protocol
    /// (a wrong key, an NBD server that is no secondary).
    #[error("{reason}")]
    Refused {
        /// Why, for programs.
        code: Option<RefusalCode>,
        /// Why, for the operator.
        reason: String,
    },
    /// The peer broke the protocol (an answer nobody asked for, a wrong count).
    #[error("{0}")]
    Protocol(String),
    /// The request does not fit this node's state (not replicating, already failed over).
    #[error("{0}")]
    State(String),
    /// A disk failed.
    #[error("{0}")]
    Disk(String),
}

impl ReplicaError {
    /// Whether the peer refused us in a way that retrying will not change.
    pub fn is_permanent_refusal(&self) -> bool {
        match self {
            Self::Refused { code: Some(c), .. } => !c.is_transient(),
            Self::Refused { code: None, .. } => true,
            _ => false,
        }
    }

    /// Whether the peer refused us at all.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }
}

impl From<ReplicaError> for String {
    fn from(e: ReplicaError) -> String {
        e.to_string()
    }
}
