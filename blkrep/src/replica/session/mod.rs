//! The primary's replication sessions: connect, sync, resume, replicate, and after a loss
//! reconnect and resync, for as long as the daemon runs.
//!
//! ```text
//!  attempt:  HELLO(generation, history, tracked) ──▶ WELCOME(sync kind) | REFUSED(split-brain …)
//!            checksum: every block dirty; full: every allocated block dirty
//!            SUMS_REQUEST(units of the dirty set) ──▶ SUMS: equal units are forgotten
//!            RESUME(epoch) ──▶ RESUME_ACK; new data connection; forward again
//!            resync: every dirty block through the forward queue; then one checkpoint,
//!            whose commit makes the secondary consistent (and adopt our generation)
//!  loss:     the primary pauses (dirty = every uncommitted epoch + later writes); retry
//!            every --retry until it works; after --reconnect-timeout: "unprotected"
//! ```
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | [`Replicator`]: one attempt, the reconnect loop, shutdown, status |
//! | `sync.rs` | after WELCOME: mark dirty, compare digests, RESUME, forward, resync |
//! | `verify.rs` | online comparison of both disks by digest, and `--repair` |
//! | `channel.rs` | the other participants' channels to their secondary halves |

mod channel;
mod sync;
mod verify;

use crate::sync::Locked;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::error::ReplicaError;
use super::peer::{Hello, LinkOptions, PeerLink};
use super::primary::{Primary, PrimaryMode};
use super::refusal::RefusalCode;
use super::status::LinkStatus;
use super::wire::{AckMode, SyncKind};
use crate::auth::PeerKey;
use crate::epoch::{
    BoxFuture, CheckpointLink, CheckpointTrigger, Epoch, EpochError, EpochSummary, Participant,
};
use crate::tls::ClientTls;
use crate::transport::Endpoint;

/// Blocks per unit of a checksum sync and of `verify` (64 KiB chunks).
pub const CHUNK_BLOCKS: u64 = 16;

/// Settings of the primary's sessions.
#[derive(Debug, Clone)]
pub struct ReplicatorOptions {
    /// The secondary's `--listen` address.
    pub secondary: Endpoint,
    /// Heartbeats and timeouts of the control channel.
    pub link: LinkOptions,
    /// The ack mode announced in HELLO.
    pub ack: AckMode,
    /// Time one connection attempt may take.
    pub connect_timeout: Duration,
    /// After this long without the secondary the primary calls itself unprotected.
    pub reconnect_timeout: Duration,
    /// Pause between reconnection attempts.
    pub retry: Duration,
    /// The key both nodes share (`--psk-file`); None on a loopback-only pair without one.
    pub key: Option<PeerKey>,
    /// TLS to the secondary (`--tls-cert/--tls-key/--tls-ca`).
    pub tls: Option<ClientTls>,
}

#[derive(Debug, Default)]
struct SessionState {
    attempts: u64,
    sessions: u64,
    last_attempt_error: Option<String>,
    lost_at: Option<Instant>,
    last_resume_s: Option<f64>,
    last_sync: Option<&'static str>,
    verify: Option<crate::replica::status::VerifyReport>,
    /// A split-brain refusal was published since the last session (once is enough).
    split_brain_told: bool,
}

/// Keeps a [`Primary`] replicating to its secondary.
pub struct Replicator {
    primary: Arc<Primary>,
    opts: ReplicatorOptions,
    link: Mutex<Option<Arc<PeerLink>>>,
    trigger: OnceLock<CheckpointTrigger>,
    participants: OnceLock<Vec<Arc<dyn Participant>>>,
    state: Mutex<SessionState>,
    /// Held by the running verify (one at a time).
    verifying: tokio::sync::Mutex<()>,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator")
            .field("secondary", &self.opts.secondary.to_string())
            .finish_non_exhaustive()
    }
}

impl Replicator {
    /// A replicator for `primary`; its tasks end when `stop` turns true.
    pub fn new(
        primary: Arc<Primary>,
        opts: ReplicatorOptions,
        stop: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            primary,
            opts,
            link: Mutex::new(None),
            trigger: OnceLock::new(),
            participants: OnceLock::new(),
            state: Mutex::new(SessionState::default()),
            verifying: tokio::sync::Mutex::new(()),
            stop,
        })
    }

    /// Where the checkpoint that completes a resync is requested.
    pub fn set_trigger(&self, t: CheckpointTrigger) {
        let _ = self.trigger.set(t);
    }

    /// The checkpoint participants; those with a secondary half of their own
    /// ([`Participant::peer_id`]) get a channel to it in every session.
    pub fn set_participants(&self, all: Vec<Arc<dyn Participant>>) {
        let _ = self.participants.set(all);
    }

    fn st(&self) -> std::sync::MutexGuard<'_, SessionState> {
        self.state.locked()
    }

    /// The control link of the running session.
    pub fn current_link(&self) -> Option<Arc<PeerLink>> {
        self.link.locked().clone()
    }

    /// The primary this replicator serves.
    pub fn primary(&self) -> &Arc<Primary> {
        &self.primary
    }

    /// One attempt: connect, sync, resume. On success replication runs and the resync of
    /// the dirty blocks goes on in the background.
    pub async fn attempt(self: &Arc<Self>) -> Result<SyncKind, ReplicaError> {
        self.st().attempts += 1;
        let m = self.primary.meta().get();
        let hello = Hello {
            size: self.primary.size_bytes(),
            generation: m.generation,
            history: m.history.clone(),
            tracked: self.primary.tracked(),
            committed: self.primary.committed(),
            ack: self.opts.ack,
            heartbeat: self.opts.link.heartbeat,
        };
        let ep = &self.opts.secondary;
        let (link, rd, welcome) = match PeerLink::connect(
            ep,
            hello,
            self.opts.link,
            self.opts.connect_timeout,
            self.opts.key.as_ref(),
            self.opts.tls.as_ref(),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                self.attempt_failed(&e);
                return Err(e);
            }
        };
        tokio::spawn(
            link.clone()
                .run(rd, self.primary.clone(), self.stop.clone()),
        );
        match self.sync_and_resume(&link, welcome).await {
            Ok(()) => {
                let mut st = self.st();
                st.split_brain_told = false;
                st.sessions += 1;
                st.last_sync = Some(welcome.sync.name());
                st.last_attempt_error = None;
                Ok(welcome.sync)
            }
            Err(e) => {
                link.close(&e.to_string());
                let e = match e {
                    ReplicaError::Refused { code, reason } => ReplicaError::Refused {
                        code,
                        reason: format!("{ep}: {reason}"),
                    },
                    other => ReplicaError::Unreachable(format!("{ep}: {other}")),
                };
                self.attempt_failed(&e);
                Err(e)
            }
        }
    }

    /// Remember why an attempt failed; publish a split-brain (once until a session works).
    fn attempt_failed(&self, e: &ReplicaError) {
        let split = matches!(
            e,
            ReplicaError::Refused {
                code: Some(RefusalCode::SplitBrain | RefusalCode::FailedOverSplitBrain),
                ..
            }
        );
        let mut st = self.st();
        st.last_attempt_error = Some(e.to_string());
        if split && !std::mem::replace(&mut st.split_brain_told, true) {
            self.primary.events().emit(
                "split-brain",
                serde_json::json!({"peer": self.opts.secondary.to_string(), "reason": e.to_string()}),
            );
        }
    }

    /// Keep replicating until `stop`: after every loss, tear the session down, reconnect
    /// (every `retry`), resync. Run as a task after the first successful [`attempt`].
    ///
    /// [`attempt`]: Replicator::attempt
    pub async fn run(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut lost = self.primary.lost();
        loop {
            tokio::select! {
                _ = crate::epoch::until_true(&mut stop) => return,
                _ = lost.wait_for(|l| l.is_some()) => {}
            }
            let reason = lost.borrow().clone().unwrap_or_default();
            let since = Instant::now();
            self.st().lost_at = Some(since);
            self.end_session(&reason, None).await;
            let mut gave_up = false;
            loop {
                if *stop.borrow() {
                    return;
                }
                let r = self.attempt().await;
                match r {
                    Ok(kind) => {
                        let s = since.elapsed().as_secs_f64();
                        tracing::info!(
                            sync = %kind.name(),
                            after_s = s,
                            "reconnected to the secondary"
                        );
                        self.st().last_resume_s = Some(s);
                        break;
                    }
                    Err(e) => {
                        // A busy secondary may take us later: only a permanent refusal
                        // (split-brain, sizes, a wrong key) gives up at once.
                        let refused = e.is_permanent_refusal();
                        if e.is_refusal() {
                            tracing::warn!("reconnecting: {e}");
                        } else {
                            tracing::debug!("reconnecting: {e}");
                        }
                        if !gave_up && (refused || since.elapsed() >= self.opts.reconnect_timeout) {
                            self.primary.give_up(&if refused {
                                format!("the secondary refused to resume: {e}")
                            } else {
                                format!(
                                    "the secondary has been unreachable for {:?} (--reconnect-timeout): {e}",
                                    since.elapsed()
                                )
                            });
                            gave_up = true;
                        }
                        let delay = if refused {
                            self.opts.retry.max(Duration::from_secs(2))
                        } else {
                            self.opts.retry
                        };
                        tokio::select! {
                            _ = crate::epoch::until_true(&mut stop) => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
            lost = self.primary.lost();
        }
    }

    /// End the session cleanly (after the final checkpoint).
    pub async fn goodbye(&self, reason: &str) {
        if let Some(l) = self.current_link() {
            l.goodbye(reason).await;
        }
    }

    /// Stop forwarding (after what is in flight is answered) and close the link.
    pub async fn shutdown(&self) {
        self.primary.stop_forwarder();
        self.end_session("primary shutting down", Some(Duration::from_secs(30)))
            .await;
    }

    /// Close the session's link and wait (at most `patience`) for its forwarder to end.
    async fn end_session(&self, reason: &str, patience: Option<Duration>) {
        if let Some(l) = self.link.locked().take() {
            l.close(reason);
        }
        self.primary.join_forwarder(patience).await;
    }

    /// Status of the sessions.
    pub fn status(&self) -> LinkStatus {
        let st = self.st();
        let link = self.current_link();
        let mode = self.primary.mode();
        LinkStatus {
            peer_state: match (mode, link.as_ref().and_then(|l| l.dead_reason())) {
                (PrimaryMode::Replicating, None) if link.is_some() => "connected".to_string(),
                (PrimaryMode::Replicating, Some(r)) => format!("lost: {r}"),
                (mode, _) => format!(
                    "{}: {}",
                    mode.name(),
                    st.last_attempt_error
                        .clone()
                        .unwrap_or_else(|| "reconnecting".into())
                ),
            },
            sessions: st.sessions,
            connect_attempts: st.attempts,
            last_attempt_error: st.last_attempt_error.clone(),
            last_resume_s: st.last_resume_s,
            last_sync: st.last_sync.map(Into::into),
            paused_for_s: (mode != PrimaryMode::Replicating)
                .then(|| st.lost_at.map(|t| t.elapsed().as_secs_f64()))
                .flatten(),
            verify: st.verify.clone(),
        }
    }
}

impl CheckpointLink for Replicator {
    fn checkpoint(
        &self,
        epoch: Epoch,
        summaries: Vec<EpochSummary>,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        let link = self.current_link();
        Box::pin(async move {
            match link {
                Some(l) => l.checkpoint(epoch, summaries).await,
                None => Err(EpochError::PeerLost {
                    epoch,
                    reason: "no link to the secondary".into(),
                }),
            }
        })
    }
}
