//! The client's side of lockstep's NBD extensions ([`crate::nbd::lockstep`]): submitting an
//! epoch mark on a replication connection, and opening a control connection to a secondary
//! ([`connect_control`]).

use std::time::Duration;

use tokio::io::{BufReader, BufWriter};

use super::negotiate::{greet, negotiation_refused, read_option_reply, send_option};
use super::{authenticate, secure_connect, NbdClient, Ticket};
use crate::auth::{Credential, PeerKey};
use crate::epoch::MAX_PEER_MESSAGE;
use crate::nbd::lockstep::ControlConnection;
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::tls::ClientTls;
use crate::transport::Endpoint;

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

    /// Send a message to participant `id`'s secondary half (a lockstep extension, see
    /// `docs/protocol.md`) and wait for its answer. Needs structured replies.
    pub async fn call_participant(&self, id: u16, message: &[u8]) -> Result<Vec<u8>, NbdError> {
        if message.len() > MAX_PEER_MESSAGE {
            return Err(NbdError::Invalid(format!(
                "a participant message of {} bytes (at most {MAX_PEER_MESSAGE})",
                message.len()
            )));
        }
        let req = Self::req(
            CMD_LOCKSTEP_PARTICIPANT,
            0,
            u64::from(id),
            message.len() as u32,
        );
        let out = self.request(req, Some(message), None).await?;
        Ok(out.data.map(|d| d.to_vec()).unwrap_or_default())
    }
}

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
