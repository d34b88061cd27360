//! The server's side of lockstep's NBD extensions ([`crate::nbd::lockstep`]): waiting out an
//! epoch mark before handing it to the export's [`EpochSink`], and acknowledging the control
//! option so that the [`ControlHandler`](crate::nbd::ControlHandler) takes the connection over.

use std::time::Instant;

use tokio::task::JoinSet;

use super::negotiate::{ack, refuse, Answer, Negotiated, Negotiation};
use super::reply::ReplyBody;
use crate::nbd::lockstep::EpochSink;
use crate::nbd::proto::*;

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
