//! lockstep's extensions to standard NBD, both sides of each (`docs/protocol.md`):
//!
//! ```text
//!   NBD_CMD_LOCKSTEP_EPOCH    an epoch mark: a barrier in a replication connection's request
//!                             stream; the server hands it to the export's EpochSink
//!   NBD_CMD_LOCKSTEP_PARTICIPANT  a message for a participant's secondary half; the server
//!                             hands it to the export's EpochSink and sends back its answer
//!   NBD_OPT_LOCKSTEP_CONTROL  during negotiation: leave NBD for lockstep's control protocol,
//!                             which the server hands to its ControlHandler
//! ```
//!
//! Everything else in `nbd/` is standard NBD. This module holds what both sides share: the
//! traits the server hands each extension to ([`EpochSink`], [`ControlHandler`]) and the
//! control channel's type; the wire constants are in [`super::proto`]. Each side's code is a
//! child of that side, called at the one place each extension begins:
//!
//! ```text
//!   server::lockstep   waiting out an epoch mark; a participant message; the control option
//!   client::lockstep   submitting an epoch mark; call_participant; connect_control
//! ```
//!
//! Neither side is used from here, so the dependencies run one way: server and client on this
//! module, never back.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};

use crate::auth::SessionKey;
use crate::storage::Backend;
use crate::sync::BoxFuture;
use crate::transport::{ReadHalf, WriteHalf};

// ---------------------------------------------------------------------------------------------
// Epoch marks

/// Receives lockstep's epoch marks from a replication connection.
///
/// The server calls [`EpochSink::begin_epoch`] only after every earlier request of the same
/// connection has finished, and reads no later request until it returns: the mark is a
/// barrier that cuts the connection's request stream into epochs.
pub trait EpochSink: Send + Sync + std::fmt::Debug {
    /// Requests read from now on belong to `epoch`; `drain` is how long the server waited
    /// for the earlier requests to finish (the stall the mark put on this connection).
    fn begin_epoch(&self, epoch: u64, drain: Duration) -> Result<(), String>;

    /// A backend and epoch sink for one new connection in transmission (None: use the
    /// export's own). The secondary binds each replication connection to the session it
    /// was opened in this way, so that nothing from an interrupted session lands later:
    /// to `session` when the connection proved that session's key ([`crate::auth`]), else
    /// to the session current now.
    fn connect(&self, session: Option<u64>) -> Option<(Arc<dyn Backend>, Arc<dyn EpochSink>)> {
        let _ = session;
        None
    }

    /// A message for participant `id`'s secondary half (`NBD_CMD_LOCKSTEP_PARTICIPANT`);
    /// the answer goes back to the client. The server reads no later request of the
    /// connection until it returns, so messages are handled in the order they were sent.
    fn participant(&self, id: u16, message: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        let _ = (id, message);
        Box::pin(async { Err("this export takes no participant messages".to_string()) })
    }
}

// ---------------------------------------------------------------------------------------------
// The control option

/// Takes over a connection that asked for lockstep's control protocol
/// (`NBD_OPT_LOCKSTEP_CONTROL`) once the server has acknowledged the option.
pub trait ControlHandler: Send + Sync + std::fmt::Debug {
    /// Run the control protocol on this connection until it ends. `session` is the key
    /// its data connections will prove, when the port authenticates peers.
    fn take_over(
        &self,
        rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        peer: String,
        session: Option<SessionKey>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// The connection halves of a control channel, and the session key its data connections
/// prove (with a peer key).
pub type ControlConnection = (
    BufReader<ReadHalf>,
    BufWriter<WriteHalf>,
    Option<SessionKey>,
);
