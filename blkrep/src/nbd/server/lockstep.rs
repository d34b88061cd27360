//! The server's side of lockstep's NBD extensions ([`crate::nbd::lockstep`]): waiting out an
//! epoch mark before handing it to the export's [`EpochSink`], handing a participant message
//! to it, and acknowledging the control option so that the
//! [`ControlHandler`](crate::nbd::ControlHandler) takes the connection over.

use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::task::JoinSet;

use super::negotiate::{ack, refuse, Answer, Negotiated, Negotiation};
use super::reply::ReplyBody;
use crate::epoch::MAX_PEER_MESSAGE;
use crate::nbd::codec::Request;
use crate::nbd::lockstep::EpochSink;
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::storage::IoBuf;
use crate::transport::ReadHalf;

/// `NBD_CMD_LOCKSTEP_PARTICIPANT`: take the message off the wire (a message over
/// [`MAX_PEER_MESSAGE`] ends the connection before any of it is read), hand it to the export's
/// sink and answer with what it returns. Handled inline: the next request is read only after.
pub(super) async fn participant_message(
    rd: &mut BufReader<ReadHalf>,
    req: &Request,
    sink: Option<&Arc<dyn EpochSink>>,
    structured: bool,
    peer: &str,
) -> Result<ReplyBody, NbdError> {
    let len = req.length as usize;
    if len > MAX_PEER_MESSAGE {
        return Err(NbdError::Invalid(format!(
            "{peer} sent a participant message of {len} bytes (at most {MAX_PEER_MESSAGE})"
        )));
    }
    let mut message = vec![0u8; len];
    rd.read_exact(&mut message)
        .await
        .map_err(NbdError::io(format!(
            "reading a participant message from {peer}"
        )))?;
    let refuse = |message: String| {
        Ok(ReplyBody::Error {
            errno: EINVAL,
            message,
        })
    };
    let Some(sink) = sink else {
        return refuse("this export takes no participant messages".into());
    };
    if !structured {
        return refuse("participant messages need structured replies".into());
    }
    let Ok(id) = u16::try_from(req.offset) else {
        return refuse(format!("participant id {} is out of range", req.offset));
    };
    if req.flags != 0 {
        return refuse(format!(
            "flags {:#x} are not valid for a participant message",
            req.flags
        ));
    }
    match sink.participant(id, message).await {
        Ok(answer) if answer.len() <= MAX_PEER_MESSAGE => Ok(ReplyBody::Data {
            offset: 0,
            buf: IoBuf::from_slice(&answer),
        }),
        Ok(answer) => refuse(format!(
            "the answer of {} bytes exceeds the {MAX_PEER_MESSAGE}-byte maximum",
            answer.len()
        )),
        Err(message) => refuse(message),
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
