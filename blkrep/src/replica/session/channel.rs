//! The channel between a participant's two halves in one session
//! ([`crate::epoch::PeerChannel`]): lockstep's participant messages on a replication
//! connection of its own, opened after RESUME_ACK so that the secondary binds it to the
//! resumed session, like the block layer's.
//!
//! ```text
//!  RESUME ⇄ RESUME_ACK ─▶ one connection for every participant with a peer id
//!                      ─▶ connected(channel, epoch) on each, in order ─▶ the forwarder starts
//! ```

use std::sync::Arc;

use super::Replicator;
use crate::epoch::{BoxFuture, Epoch, EpochError, Participant, PeerChannel};
use crate::nbd::client::NbdClient;
use crate::replica::error::ReplicaError;
use crate::replica::peer::PeerLink;
use crate::replica::primary::open_replica_connection;
use crate::replica::refusal::RefusalCode;

/// Participant `id`'s messages on a session's participant connection.
#[derive(Debug)]
struct NbdPeerChannel {
    client: Arc<NbdClient>,
    id: u16,
}

impl PeerChannel for NbdPeerChannel {
    fn call<'a>(&'a self, message: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            self.client
                .call_participant(self.id, &message)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

impl Replicator {
    /// The participants that talk to a secondary half of their own.
    fn channel_participants(&self) -> Vec<Arc<dyn Participant>> {
        self.participants
            .get()
            .into_iter()
            .flatten()
            .filter(|p| p.peer_id().is_some())
            .cloned()
            .collect()
    }

    /// The session resumed at `epoch`: give every participant with a secondary half its
    /// channel. A permanent refusal (the halves cannot work together) ends the attempt as
    /// the secondary's refusal would.
    pub(super) async fn connect_participants(
        &self,
        link: &Arc<PeerLink>,
        epoch: u64,
    ) -> Result<(), ReplicaError> {
        let all = self.channel_participants();
        if all.is_empty() {
            return Ok(());
        }
        let client = Arc::new(
            open_replica_connection(
                &self.opts.secondary,
                link.session_key(),
                self.opts.connect_timeout,
                self.opts.tls.clone(),
            )
            .await?,
        );
        for p in all {
            let id = p.peer_id().expect("filtered");
            let channel = Arc::new(NbdPeerChannel {
                client: client.clone(),
                id,
            });
            match p.connected(channel, Epoch(epoch)).await {
                Ok(()) => {}
                Err(EpochError::Refused { reason, .. }) => {
                    return Err(ReplicaError::Refused {
                        code: Some(RefusalCode::SizeMismatch),
                        reason: format!("{}: {reason}", p.name()),
                    })
                }
                Err(e) => {
                    return Err(ReplicaError::LinkLost(format!(
                        "connecting {}: {e}",
                        p.name()
                    )))
                }
            }
        }
        Ok(())
    }
}
