//! The primary's end of the control channel: HELLO, checkpoints, heartbeats, peer loss.

use crate::sync::Locked;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{BufReader, BufWriter};
use tokio::sync::{oneshot, watch};

use super::error::ReplicaError;
use super::frame::{read_message, write_message};
use super::primary::Primary;
use super::wire::{AckMode, Message, SyncKind};
use crate::auth::{AuthError, PeerKey, SessionKey};
use crate::epoch::{BoxFuture, CheckpointLink, Epoch, EpochError, EpochSummary};
use crate::nbd::client::connect_control;
use crate::nbd::NbdError;
use crate::tls::ClientTls;
use crate::transport::{Endpoint, ReadHalf, WriteHalf};

/// What the primary says about itself in HELLO.
#[derive(Debug, Clone)]
pub struct Hello {
    /// Disk size.
    pub size: u64,
    /// Data generation.
    pub generation: u64,
    /// Generations the data descends from, newest first.
    pub history: Vec<u64>,
    /// The secondary generation the dirty bitmap is relative to (0: none).
    pub tracked: u64,
    /// Last committed epoch.
    pub committed: u64,
    /// Ack mode.
    pub ack: AckMode,
    /// Heartbeat period.
    pub heartbeat: Duration,
}

/// Heartbeat and checkpoint timing.
#[derive(Debug, Clone, Copy)]
pub struct LinkOptions {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Missed periods before the secondary counts as lost.
    pub misses: u32,
    /// Longest wait for COMMITTED.
    pub commit_timeout: Duration,
}

type Waiter = oneshot::Sender<Result<(), ReplicaError>>;
type SumsWaiter = oneshot::Sender<Result<Vec<u64>, ReplicaError>>;

/// What the secondary said in WELCOME.
#[derive(Debug, Clone, Copy)]
pub struct Welcome {
    /// How to bring it up to date.
    pub sync: SyncKind,
    /// Its data generation: always 0 from this version's secondaries, which do not reveal
    /// their lineage.
    pub generation: u64,
    /// Its last committed epoch.
    pub committed: u64,
    /// Whether it holds a checkpoint it could fail over to.
    pub consistent: bool,
}

/// The control channel to the secondary.
pub struct PeerLink {
    peer: String,
    wr: tokio::sync::Mutex<BufWriter<WriteHalf>>,
    waiters: Mutex<HashMap<u64, Waiter>>,
    sums: Mutex<HashMap<u64, SumsWaiter>>,
    resume: Mutex<Option<(u64, Waiter)>>,
    next_id: std::sync::atomic::AtomicU64,
    dead: watch::Sender<Option<String>>,
    closing: watch::Sender<bool>,
    opts: LinkOptions,
    last_ack: Mutex<Instant>,
    session_key: Option<SessionKey>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("peer", &self.peer)
            .field("dead", &self.dead_reason())
            .finish_non_exhaustive()
    }
}

impl PeerLink {
    /// Connect, say HELLO and wait for WELCOME. Errors are the secondary's refusal or why it
    /// could not be reached.
    pub async fn connect(
        ep: &Endpoint,
        hello: Hello,
        opts: LinkOptions,
        timeout: Duration,
        key: Option<&PeerKey>,
        tls: Option<&ClientTls>,
    ) -> Result<(Arc<Self>, BufReader<ReadHalf>, Welcome), ReplicaError> {
        let (mut rd, mut wr, session_key) =
            connect_control(ep, timeout, key, tls)
                .await
                .map_err(|e| match e {
                    // A key the secondary refuses will not work on the next try either;
                    // a connection that broke during the exchange might.
                    NbdError::Auth {
                        source: AuthError::Io(_),
                        ..
                    } => ReplicaError::Unreachable(e.to_string()),
                    NbdError::Auth { .. } | NbdError::Negotiation { .. } => ReplicaError::Refused {
                        code: None,
                        reason: e.to_string(),
                    },
                    _ => ReplicaError::Unreachable(e.to_string()),
                })?;
        let unreachable = |e: ReplicaError| ReplicaError::Unreachable(format!("{ep}: {e}"));
        let refused = |reason: String| ReplicaError::Refused { code: None, reason };
        let session = {
            let mut b = [0u8; 8];
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            b.copy_from_slice(
                &(t.as_nanos() as u64 ^ u64::from(std::process::id()) << 40).to_be_bytes(),
            );
            u64::from_be_bytes(b)
        };
        write_message(
            &mut wr,
            &Message::Hello {
                size: hello.size,
                generation: hello.generation,
                history: hello.history.clone(),
                tracked: hello.tracked,
                committed: hello.committed,
                session,
                ack: hello.ack,
                heartbeat_ms: u32::try_from(hello.heartbeat.as_millis()).unwrap_or(u32::MAX),
            },
        )
        .await
        .map_err(unreachable)?;
        // The secondary may look at its disk before it answers: allow for that.
        let reply =
            tokio::time::timeout(timeout.max(Duration::from_secs(60)), read_message(&mut rd))
                .await
                .map_err(|_| ReplicaError::Unreachable(format!("{ep}: no answer to HELLO")))?
                .map_err(unreachable)?;
        let welcome = match reply {
            Message::Welcome {
                size,
                generation,
                committed,
                sync,
                consistent,
            } if size == hello.size => Welcome {
                sync,
                generation,
                committed,
                consistent,
            },
            Message::Welcome { size, .. } => {
                return Err(refused(format!(
                    "{ep} answered with a disk of {}, expected {}",
                    crate::units::size(size),
                    crate::units::size(hello.size)
                )))
            }
            Message::Refused { code, reason } => {
                return Err(ReplicaError::Refused {
                    code: Some(code),
                    reason: format!("{ep} refused: {reason}"),
                })
            }
            other => {
                return Err(refused(format!(
                    "{ep} answered HELLO with {}",
                    other.name()
                )))
            }
        };
        let link = Arc::new(Self {
            peer: ep.to_string(),
            wr: tokio::sync::Mutex::new(wr),
            waiters: Mutex::new(HashMap::new()),
            sums: Mutex::new(HashMap::new()),
            resume: Mutex::new(None),
            next_id: std::sync::atomic::AtomicU64::new(1),
            dead: watch::Sender::new(None),
            closing: watch::Sender::new(false),
            opts,
            last_ack: Mutex::new(Instant::now()),
            session_key,
        });
        Ok((link, rd, welcome))
    }

    /// The key this session's data connections prove (with a peer key).
    pub fn session_key(&self) -> Option<SessionKey> {
        self.session_key
    }

    /// The digests of `units` (of `unit_blocks` blocks each) on the secondary's disk.
    pub async fn sums(
        &self,
        unit_blocks: u32,
        units: roaring::RoaringTreemap,
    ) -> Result<Vec<u64>, ReplicaError> {
        let n = units.len() as usize;
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.sums.locked().insert(id, tx);
        if let Some(r) = self.dead_reason() {
            self.sums.locked().remove(&id);
            return Err(ReplicaError::LinkLost(r));
        }
        self.send(&Message::SumsRequest {
            id,
            unit_blocks,
            units,
        })
        .await?;
        let sums = self.answer_of("SUMS", rx).await?;
        if sums.len() != n {
            return Err(ReplicaError::Protocol(format!(
                "the secondary sent {} digests for {n} units",
                sums.len()
            )));
        }
        Ok(sums)
    }

    /// RESUME(epoch) and wait for RESUME_ACK.
    pub async fn resume(&self, epoch: u64) -> Result<(), ReplicaError> {
        let (tx, rx) = oneshot::channel();
        *self.resume.locked() = Some((epoch, tx));
        if let Some(r) = self.dead_reason() {
            return Err(ReplicaError::LinkLost(r));
        }
        self.send(&Message::Resume { epoch }).await?;
        self.answer_of("RESUME_ACK", rx).await
    }

    /// The answer `rx` brings, within the commit timeout.
    async fn answer_of<T>(
        &self,
        what: &'static str,
        rx: oneshot::Receiver<Result<T, ReplicaError>>,
    ) -> Result<T, ReplicaError> {
        let after = self.opts.commit_timeout;
        tokio::time::timeout(after, rx)
            .await
            .map_err(|_| ReplicaError::Timeout { what, after })?
            .map_err(|_| ReplicaError::LinkLost("link closed".into()))?
    }

    /// End the link (the reader and heartbeat loops stop; the connection closes).
    pub fn close(&self, reason: &str) {
        self.kill(reason);
        self.closing.send_replace(true);
    }

    /// Run the reader and heartbeat loops until the link dies or `stop`; on death the
    /// primary goes unprotected.
    pub async fn run(
        self: Arc<Self>,
        mut rd: BufReader<ReadHalf>,
        primary: Arc<Primary>,
        mut stop: watch::Receiver<bool>,
    ) {
        let me = self.clone();
        let reader = async move {
            loop {
                match read_message(&mut rd).await {
                    Ok(Message::HeartbeatAck { .. }) => {
                        *me.last_ack.locked() = Instant::now();
                    }
                    Ok(Message::Committed { epoch }) => me.answer(epoch, Ok(())),
                    Ok(Message::Aborted { epoch, reason }) => {
                        me.answer(epoch, Err(ReplicaError::Refused { code: None, reason }))
                    }
                    Ok(Message::Sums { id, sums }) => {
                        let w = me.sums.locked().remove(&id);
                        match w {
                            Some(w) => {
                                let _ = w.send(Ok(sums));
                            }
                            None => {
                                return ReplicaError::Protocol(format!(
                                    "SUMS {id} that nobody asked for"
                                ))
                            }
                        }
                    }
                    Ok(Message::ResumeAck { epoch }) => {
                        let w = me.resume.locked().take();
                        match w {
                            Some((e, w)) if e == epoch => {
                                let _ = w.send(Ok(()));
                            }
                            _ => {
                                return ReplicaError::Protocol(format!(
                                    "RESUME_ACK {epoch} that nobody asked for"
                                ))
                            }
                        }
                    }
                    Ok(Message::Refused { code, reason }) => {
                        return ReplicaError::Refused {
                            code: Some(code),
                            reason: format!("the secondary refused: {reason}"),
                        }
                    }
                    Ok(other) => {
                        return ReplicaError::Protocol(format!(
                            "unexpected {} from the secondary",
                            other.name()
                        ))
                    }
                    Err(e) => return e,
                }
                *me.last_ack.locked() = Instant::now();
            }
        };
        let me = self.clone();
        let beats = async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(me.opts.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let silent = me.last_ack.locked().elapsed();
                let patience = me.opts.heartbeat * me.opts.misses.max(1);
                if silent > patience {
                    return ReplicaError::Timeout {
                        what: "heartbeat answer",
                        after: silent,
                    };
                }
                seq += 1;
                if let Err(e) = me.send(&Message::Heartbeat { seq }).await {
                    return e;
                }
            }
        };
        let mut closing = self.closing.subscribe();
        let reason = tokio::select! {
            r = reader => r,
            r = beats => r,
            _ = crate::epoch::until_true(&mut stop) => return,
            _ = crate::epoch::until_true(&mut closing) => {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut *self.wr.lock().await).await;
                return;
            }
        };
        let reason = reason.to_string();
        self.kill(&reason);
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            tokio::io::AsyncWriteExt::shutdown(&mut *self.wr.lock().await),
        )
        .await;
        primary
            .link_lost(&format!("control link to {}: {reason}", self.peer))
            .await;
    }

    fn answer(&self, epoch: u64, r: Result<(), ReplicaError>) {
        if let Some(w) = self.waiters.locked().remove(&epoch) {
            let _ = w.send(r);
        }
    }

    fn kill(&self, reason: &str) {
        if self.dead.borrow().is_none() {
            self.dead.send_replace(Some(reason.to_string()));
        }
        let err = ReplicaError::LinkLost(reason.to_string());
        for (_, w) in self.waiters.locked().drain() {
            let _ = w.send(Err(err.clone()));
        }
        for (_, w) in self.sums.locked().drain() {
            let _ = w.send(Err(err.clone()));
        }
        if let Some((_, w)) = self.resume.locked().take() {
            let _ = w.send(Err(err));
        }
    }

    /// Resolves when the link dies (or is closed).
    pub async fn died(&self) -> String {
        let mut rx = self.dead.subscribe();
        let _ = rx.wait_for(|d| d.is_some()).await;
        let r = rx.borrow().clone();
        r.unwrap_or_default()
    }

    async fn send(&self, m: &Message) -> Result<(), ReplicaError> {
        let mut w = self.wr.lock().await;
        let after = self.opts.commit_timeout;
        tokio::time::timeout(after, write_message(&mut *w, m))
            .await
            .map_err(|_| ReplicaError::Timeout {
                what: "send",
                after,
            })?
    }

    /// End replication cleanly.
    pub async fn goodbye(&self, reason: &str) {
        let _ = self
            .send(&Message::Goodbye {
                reason: reason.into(),
            })
            .await;
    }

    /// Whether the link is dead, and why.
    pub fn dead_reason(&self) -> Option<String> {
        self.dead.borrow().clone()
    }
}

impl CheckpointLink for PeerLink {
    fn checkpoint(
        &self,
        epoch: Epoch,
        summaries: Vec<EpochSummary>,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        Box::pin(async move {
            let lost = |reason: String| EpochError::PeerLost { epoch, reason };
            if let Some(r) = self.dead_reason() {
                return Err(lost(r));
            }
            let (tx, rx) = oneshot::channel();
            self.waiters.locked().insert(epoch.0, tx);
            self.send(&Message::Checkpoint {
                epoch: epoch.0,
                summaries,
            })
            .await
            .map_err(|e| lost(e.to_string()))?;
            match self.answer_of("COMMITTED", rx).await {
                Ok(()) => Ok(()),
                // ABORTED: the secondary refused to commit this epoch.
                Err(ReplicaError::Refused { reason, .. }) => {
                    Err(EpochError::Refused { epoch, reason })
                }
                Err(e) => Err(lost(e.to_string())),
            }
        })
    }
}
