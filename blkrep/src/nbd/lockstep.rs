//! lockstep's extensions to standard NBD, both sides of each (`docs/protocol.md`):
//!
//! ```text
//!   NBD_CMD_LOCKSTEP_EPOCH    an epoch mark: a barrier in a replication connection's request
//!                             stream; the server hands it to the export's EpochSink
//!   NBD_OPT_LOCKSTEP_CONTROL  during negotiation: leave NBD for lockstep's control protocol,
//!                             which the server hands to its ControlHandler
//! ```
//!
//! Everything else in `nbd/` is standard NBD; the server and client call in here at the one
//! place each extension begins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{BufReader, BufWriter};
use tokio::task::JoinSet;

use super::client::negotiate::{greet, negotiation_refused, read_option_reply, send_option};
use super::client::{authenticate, secure_connect, NbdClient, Ticket};
use super::proto::*;
use super::server::negotiate::{ack, refuse, Answer, Negotiated, Negotiation};
use super::server::reply::ReplyBody;
use super::NbdError;
use crate::auth::{Credential, PeerKey, SessionKey};
use crate::storage::Backend;
use crate::tls::ClientTls;
use crate::transport::{Endpoint, ReadHalf, WriteHalf};

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
}

/// The server's side of an epoch mark on a connection whose export takes them: wait until
/// every request read before the mark has finished (`inflight`), then begin `epoch`.
pub(super) async fn mark_epoch(
    sink: &dyn EpochSink,
    epoch: u64,
    inflight: &mut JoinSet<()>,
) -> ReplyBody {
    // A barrier: everything read before the mark finishes first.
    let t = Instant::now();
    while inflight.join_next().await.is_some() {}
    match sink.begin_epoch(epoch, t.elapsed()) {
        Ok(()) => ReplyBody::Ok,
        Err(message) => ReplyBody::Error {
            errno: EINVAL,
            message,
        },
    }
}

impl NbdClient {
    /// Submit lockstep's epoch mark (a lockstep extension, see `docs/protocol.md`): every
    /// request sent before it belongs to the epoch before `epoch`. Its reply arrives once
    /// the server has finished every earlier request of this connection.
    pub async fn submit_epoch_mark(&self, epoch: u64) -> Result<Ticket, NbdError> {
        self.submit(
            Self::req(CMD_LOCKSTEP_EPOCH, 0, epoch, 0),
            None,
            None,
            false,
        )
        .await
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

impl Negotiation<'_> {
    /// `NBD_OPT_LOCKSTEP_CONTROL` (offered only with a [`ControlHandler`]): acknowledge;
    /// negotiation ends and the handler takes the connection over.
    pub(super) fn lockstep_control(&self, data: &[u8]) -> Answer {
        if !data.is_empty() {
            let why = "the control option takes no data";
            return refuse(OPT_LOCKSTEP_CONTROL, REP_ERR_INVALID, why);
        }
        Answer::End(ack(OPT_LOCKSTEP_CONTROL), Some(Negotiated::Control))
    }
}

/// The connection halves of a control channel, and the session key its data connections
/// prove (with a peer key).
pub type ControlConnection = (
    BufReader<ReadHalf>,
    BufWriter<WriteHalf>,
    Option<SessionKey>,
);

/// Open a connection to a lockstep secondary and switch it to the replication control
/// protocol (`NBD_OPT_LOCKSTEP_CONTROL`), with TLS and then the peer key first when given.
/// Returns the two halves, ready for control frames, and the session key.
pub async fn connect_control(
    ep: &Endpoint,
    timeout: Duration,
    key: Option<&PeerKey>,
    tls: Option<&ClientTls>,
) -> Result<ControlConnection, NbdError> {
    let peer = ep.to_string();
    let fut = async {
        let (rd, wr) = secure_connect(ep, tls, &peer).await?;
        let mut rd = BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let session = match key {
            Some(k) => authenticate(&mut rd, &mut wr, Credential::Control(k), &peer).await?,
            None => None,
        };
        greet(&mut rd, &mut wr, &peer).await?;
        send_option(&mut wr, OPT_LOCKSTEP_CONTROL, &[]).await?;
        let (kind, data) = read_option_reply(&mut rd, OPT_LOCKSTEP_CONTROL, &peer).await?;
        if kind != REP_ACK {
            let mut e = negotiation_refused(&peer, "lockstep control", kind, &data);
            if kind == REP_ERR_UNSUP {
                e = NbdError::Negotiation {
                    peer: peer.clone(),
                    reason: "not a lockstep secondary (the control option is unsupported)".into(),
                };
            }
            return Err(e);
        }
        Ok((rd, wr, session))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| NbdError::Timeout(format!("connecting to {peer}")))?
}
