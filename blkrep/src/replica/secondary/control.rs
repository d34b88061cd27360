//! The control session with the primary, from HELLO to GOODBYE (or a lost link).
//!
//! ```text
//!  greet:  HELLO ─▶ heartbeat period in range? ─▶ admission::decide ─▶ take the node (Syncing)
//!          ─▶ roll the interrupted epochs back ─▶ WELCOME(sync kind)
//!  serve:  HEARTBEAT ─▶ HEARTBEAT_ACK
//!          SUMS_REQUEST ─▶ bounded, answered in the background ─▶ SUMS
//!          RESUME(n) ─▶ replicate from epoch n ─▶ RESUME_ACK
//!          CHECKPOINT(n) ─▶ commit in the background ─▶ COMMITTED(n) | ABORTED(n)
//!          GOODBYE ─▶ clean end;  silence for heartbeat_ms × misses ─▶ lost
//!  end:    clean: store "clean at checkpoint n" once flushed;  lost: pause, or fail over
//! ```
//!
//! Every refusal is a [`Refusal`]: its code and peer-safe sentence go to the primary, the
//! whole story to this node's log and status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{BufReader, BufWriter};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Mode, PeerLossPolicy, Secondary, MAX_QUEUED_SUMS, SUMS_PER_SESSION};
use crate::auth::SessionKey;
use crate::digest;
use crate::nbd::server::ControlHandler;
use crate::replica::admission::{self, Claim, Local, Standing};
use crate::replica::error::ReplicaError;
use crate::replica::frame::{read_message, send, SharedWriter};
use crate::replica::refusal::Refusal;
use crate::replica::wire::{self, Message, SyncKind};
use crate::replica::FailoverTarget;
use crate::storage::Result;
use crate::sync::BoxFuture;
use crate::transport::{ReadHalf, WriteHalf};

/// Serves control connections from the primary (one session at a time).
#[derive(Debug)]
pub struct SecondaryControl(pub(super) Arc<Secondary>);

impl ControlHandler for SecondaryControl {
    fn take_over(
        &self,
        rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        peer: String,
        session: Option<SessionKey>,
    ) -> BoxFuture<'static, ()> {
        let s = self.0.clone();
        Box::pin(async move { run_control(s, rd, wr, peer, session).await })
    }
}

/// REFUSED with `r`'s code and the sentence the peer may read.
fn refused(r: &Refusal) -> Message {
    Message::Refused {
        code: r.code(),
        reason: r.reason(),
    }
}

/// What the primary's HELLO asked for, once admitted.
struct Admitted {
    heartbeat_ms: u32,
}

/// One control session.
struct Session {
    s: Arc<Secondary>,
    wr: SharedWriter,
    peer: String,
    /// The key data connections of this session prove (on an authenticating port).
    key: Option<SessionKey>,
    /// SUMS answers being computed or waiting; dropped (aborted) with the session.
    sums_tasks: JoinSet<()>,
    /// One SUMS request of this session computed at a time.
    session_sums: Arc<Semaphore>,
}

async fn run_control(
    s: Arc<Secondary>,
    mut rd: BufReader<ReadHalf>,
    wr: BufWriter<WriteHalf>,
    peer: String,
    key: Option<SessionKey>,
) {
    let mut session = Session {
        s,
        wr: Arc::new(tokio::sync::Mutex::new(wr)),
        peer,
        key,
        sums_tasks: JoinSet::new(),
        session_sums: Arc::new(Semaphore::new(SUMS_PER_SESSION)),
    };
    let Some(admitted) = session.greet(&mut rd).await else {
        return;
    };
    let s = session.s.clone();
    let patience = Duration::from_millis(
        u64::from(admitted.heartbeat_ms) * u64::from(s.opts.heartbeat_misses.max(1)),
    );
    {
        let mut i = s.inner();
        i.heard = Some((Instant::now(), patience));
        i.session_commits = 0;
    }
    let end = session.serve(&mut rd, patience).await;
    s.inner().heard = None;
    // Nobody reads the answers any more.
    session.sums_tasks.abort_all();
    session.end(end).await;
}

impl Session {
    /// Tell the primary why it is refused, and this node's operator the whole story.
    async fn refuse(&self, r: &Refusal) {
        self.s
            .set_error(format!("refusing primary {}: {}", self.peer, r.local()));
        if matches!(r, Refusal::SplitBrain(_) | Refusal::FailedOverSplitBrain(_)) {
            self.s.events().emit(
                "split-brain",
                serde_json::json!({"peer": self.peer, "reason": r.local()}),
            );
        }
        let _ = send(&self.wr, &refused(r)).await;
    }

    /// A session that had taken the node ends before replicating: pause it again.
    fn release(&self) {
        let mut i = self.s.inner();
        if i.mode == Mode::Syncing {
            self.s.switch(
                &mut i,
                Mode::Paused,
                Some("the session ended before replicating"),
            );
            i.token += 1;
        }
    }

    /// HELLO to WELCOME. None when the primary was refused or vanished.
    async fn greet(&mut self, rd: &mut BufReader<ReadHalf>) -> Option<Admitted> {
        let s = self.s.clone();
        let hello = match tokio::time::timeout(s.opts.hello_timeout, read_message(rd)).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                s.set_error(format!("control connection from {}: {e}", self.peer));
                return None;
            }
            Err(_) => {
                s.set_error(format!(
                    "control connection from {}: no HELLO within {}",
                    self.peer,
                    crate::units::duration(s.opts.hello_timeout)
                ));
                return None;
            }
        };
        let Message::Hello {
            size,
            generation,
            history,
            tracked,
            committed: _,
            session,
            ack,
            heartbeat_ms,
        } = hello
        else {
            self.refuse(&Refusal::Hello(format!(
                "expected HELLO, got {}",
                hello.name()
            )))
            .await;
            return None;
        };
        if let Err(reason) = wire::check_heartbeat_ms(heartbeat_ms) {
            self.refuse(&Refusal::Hello(reason)).await;
            return None;
        }
        let claim = Claim {
            size,
            generation,
            history: &history,
            tracked,
        };
        let kind = match s.admit(&claim).await {
            Ok(k) => k,
            Err(r) => {
                self.refuse(&r).await;
                return None;
            }
        };
        let taken = {
            let mut i = s.inner();
            let free = matches!(i.mode, Mode::Waiting | Mode::Paused);
            if free {
                s.switch(&mut i, Mode::Syncing, None);
                i.token += 1;
                i.session = Some(session);
                i.ack = ack;
                i.peer = Some(self.peer.clone());
                i.sync = Some((kind, generation, history.clone()));
            }
            (!free).then(|| i.mode.name())
        };
        if let Some(mode) = taken {
            // Another primary came first, between the decision and now.
            self.refuse(&Refusal::Busy { mode }).await;
            return None;
        }
        match s.roll_back_open().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                peer = %self.peer,
                blocks = n,
                "rolled the interrupted epochs back to the last checkpoint"
            ),
            Err(e) => {
                self.refuse(&Refusal::Disk(format!(
                    "rolling the interrupted epochs back: {e}"
                )))
                .await;
                self.release();
                return None;
            }
        }
        let (committed, consistent) = {
            let i = s.inner();
            (i.committed, i.consistent)
        };
        let welcome = Message::Welcome {
            size,
            // The primary has no use for it, and a peer must not learn this node's lineage.
            generation: 0,
            committed,
            sync: kind,
            consistent,
        };
        if let Err(e) = send(&self.wr, &welcome).await {
            s.set_error(format!("primary {}: {e}", self.peer));
            self.release();
            return None;
        }
        tracing::info!(peer = %self.peer, ack = %ack.name(), sync = %kind.name(), session = %format!("{session:016x}"), "a primary connected");
        let ev = s.events();
        ev.emit(
            "peer",
            serde_json::json!({"state": "connected", "peer": self.peer, "ack": ack.name()}),
        );
        ev.emit(
            "sync",
            serde_json::json!({"state": "started", "kind": kind.name(), "peer": self.peer}),
        );
        Some(Admitted { heartbeat_ms })
    }

    /// Messages until GOODBYE (Ok, with its reason) or a failure (Err).
    async fn serve(
        &mut self,
        rd: &mut BufReader<ReadHalf>,
        patience: Duration,
    ) -> std::result::Result<String, ReplicaError> {
        loop {
            let m = match tokio::time::timeout(patience, read_message(rd)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(ReplicaError::Timeout {
                        what: "message from the primary (missed heartbeats)",
                        after: patience,
                    })
                }
            };
            let taken_over = {
                let mut i = self.s.inner();
                if let Some((at, _)) = &mut i.heard {
                    *at = Instant::now();
                }
                // `failover --force` took the node while this session was live: end it, so
                // that the primary learns at once that it no longer replicates.
                matches!(i.mode, Mode::FailingOver | Mode::Primary).then(|| i.mode.name())
            };
            if let Some(mode) = taken_over {
                return Err(self.fail(Refusal::Busy { mode }).await);
            }
            let reply = match m {
                Message::Heartbeat { seq } => {
                    self.s.inner().heartbeats += 1;
                    Message::HeartbeatAck { seq }
                }
                Message::Checkpoint { epoch, summaries } => {
                    self.on_checkpoint(epoch, summaries);
                    continue;
                }
                Message::SumsRequest {
                    id,
                    unit_blocks,
                    units,
                } => {
                    self.on_sums(id, unit_blocks, units).await?;
                    continue;
                }
                Message::Resume { epoch } => self.on_resume(epoch).await?,
                Message::Goodbye { reason } => return Ok(reason),
                other => {
                    return Err(self
                        .fail(Refusal::Protocol(format!(
                            "unexpected {} from the primary",
                            other.name()
                        )))
                        .await)
                }
            };
            send(&self.wr, &reply).await?;
        }
    }

    /// Refuse, and return the error that ends the session.
    async fn fail(&self, r: Refusal) -> ReplicaError {
        let _ = send(&self.wr, &refused(&r)).await;
        ReplicaError::Refused {
            code: Some(r.code()),
            reason: r.local(),
        }
    }

    /// Commit in the background: the flush may take a while and heartbeats go on meanwhile
    /// (checkpoints never overlap); a commit that finds its session ended commits nothing.
    fn on_checkpoint(&self, epoch: u64, summaries: Vec<crate::epoch::EpochSummary>) {
        let token = self.s.inner().token;
        let (s, wr) = (self.s.clone(), self.wr.clone());
        tokio::spawn(async move {
            let m = match s.checkpoint(token, epoch, &summaries).await {
                Ok(()) => Message::Committed { epoch },
                Err(reason) => {
                    s.inner().aborted += 1;
                    s.set_error(format!("checkpoint of epoch {epoch} aborted: {reason}"));
                    Message::Aborted { epoch, reason }
                }
            };
            let _ = send(&wr, &m).await;
        });
    }

    /// SUMS: digests of the units asked for, computed in the background (reading may take a
    /// while; heartbeats go on). Units come from the peer: one past the end of the disk is a
    /// broken or hostile primary, refused before any work.
    async fn on_sums(
        &mut self,
        id: u64,
        unit_blocks: u32,
        units: roaring::RoaringTreemap,
    ) -> std::result::Result<(), ReplicaError> {
        let nblocks = digest::blocks(self.s.disk.size());
        if let Err(e) = digest::check_units(&units, u64::from(unit_blocks), nblocks) {
            return Err(self
                .fail(Refusal::Protocol(format!("SUMS_REQUEST {id}: {e}")))
                .await);
        }
        // An honest primary keeps two batches in flight (verify may overlap a little), so a
        // longer queue is a flood: end the session rather than queue it.
        while self.sums_tasks.try_join_next().is_some() {}
        if self.sums_tasks.len() >= MAX_QUEUED_SUMS {
            return Err(self
                .fail(Refusal::Protocol(format!(
                    "more than {MAX_QUEUED_SUMS} SUMS requests at once from the primary"
                )))
                .await);
        }
        let (s, wr, one) = (self.s.clone(), self.wr.clone(), self.session_sums.clone());
        self.sums_tasks.spawn(async move {
            // Two requests of this session at a time, and few across sessions: the disk also
            // serves forwarded writes.
            let Ok(_mine) = one.acquire_owned().await else {
                return;
            };
            let Ok(_any) = s.sums_slots.acquire().await else {
                return;
            };
            let m = match digest::unit_sums(&*s.disk, &units, u64::from(unit_blocks)).await {
                Ok(sums) => Message::Sums { id, sums },
                Err(e) => refused(&Refusal::Disk(format!(
                    "reading the secondary disk for digests: {e}"
                ))),
            };
            let _ = send(&wr, &m).await;
        });
        Ok(())
    }

    async fn on_resume(&self, epoch: u64) -> std::result::Result<Message, ReplicaError> {
        match self.s.resume(epoch, self.key).await {
            Ok(()) => {
                tracing::info!(peer = %self.peer, epoch, "replication resumed");
                Ok(Message::ResumeAck { epoch })
            }
            Err(e) => Err(self.fail(Refusal::Protocol(e.to_string())).await),
        }
    }

    /// After GOODBYE (Ok) or a lost link (Err).
    async fn end(&self, end: std::result::Result<String, ReplicaError>) {
        let s = &self.s;
        let peer = &self.peer;
        match end {
            Ok(reason) => {
                tracing::info!(%peer, %reason, "the primary ended replication");
                s.events().emit(
                    "peer",
                    serde_json::json!({"state": "ended", "peer": peer, "reason": reason}),
                );
                let (clean, token) = {
                    let mut i = s.inner();
                    if !matches!(i.mode, Mode::Replicating | Mode::Syncing) {
                        return;
                    }
                    // A clean end comes right after a final checkpoint: nothing is open.
                    s.switch(&mut i, Mode::Waiting, Some(&reason));
                    i.peer = None;
                    i.token += 1;
                    i.session_key = None;
                    let clean = i.buffer.stats().blocks == 0 && i.sync.is_none();
                    (clean.then_some(i.committed), i.token)
                };
                if let Some(c) = clean {
                    s.store_clean(token, c).await;
                }
            }
            Err(e) => {
                s.set_error(format!("lost the primary {peer}: {e}"));
                s.events().emit(
                    "peer",
                    serde_json::json!({"state": "lost", "peer": peer, "reason": e.to_string()}),
                );
                let (policy, commits) = {
                    let mut i = s.inner();
                    if !matches!(i.mode, Mode::Replicating | Mode::Syncing) {
                        return;
                    }
                    s.switch(&mut i, Mode::Paused, Some(&e.to_string()));
                    i.token += 1;
                    i.session_key = None;
                    (s.opts.on_peer_loss, i.session_commits)
                };
                if policy == PeerLossPolicy::Failover && commits == 0 {
                    // It may have failed to start (a port it could not bind, a bad setting)
                    // and be restarted in a moment: taking over now would make that restart
                    // a split-brain although it never served a write.
                    tracing::warn!(
                        %peer,
                        "not failing over automatically: the primary was lost before its first checkpoint in this session (it may never have finished starting); paused, waiting for it (or for `lockstep failover`)"
                    );
                } else if policy == PeerLossPolicy::Failover {
                    match s.failover(FailoverTarget::Checkpoint).await {
                        Ok(r) => {
                            tracing::info!(
                                to = %r.target,
                                committed_epoch = r.committed_epoch,
                                restored_blocks = r.restored_blocks,
                                "automatic failover done"
                            );
                            // Why this node took over on its own stays in its status.
                            s.inner().last_error = Some(format!(
                                "failed over on its own (--on-peer-loss failover): lost the primary {peer}: {e}"
                            ));
                        }
                        Err(e) => s.set_error(format!("automatic failover failed: {e}")),
                    }
                } else {
                    tracing::info!(
                        "paused: waiting for the primary to reconnect (or for `lockstep failover`)"
                    );
                }
            }
        }
    }
}

impl Secondary {
    /// Whether the disk holds no data at all (every byte in a hole).
    async fn disk_is_empty(&self) -> Result<bool> {
        let data = crate::storage::data_ranges(&*self.disk, 0, self.disk.size()).await?;
        Ok(data.is_empty())
    }

    /// How the primary of `claim` must bring this disk up to date, or why it may not
    /// replicate here: [`admission::decide`] over this node's state.
    async fn admit(&self, claim: &Claim<'_>) -> std::result::Result<SyncKind, Refusal> {
        let meta = self.meta.get();
        let (mode, fresh) = {
            let i = self.inner();
            (i.mode, i.fresh)
        };
        let standing = match mode {
            Mode::Waiting | Mode::Paused => Standing::Free,
            Mode::Primary => Standing::FailedOver,
            other => Standing::Busy(other.name()),
        };
        let disk_empty = fresh
            && standing == Standing::Free
            && self
                .disk_is_empty()
                .await
                .map_err(|e| Refusal::Disk(format!("reading the secondary disk: {e}")))?;
        let local = Local {
            meta: &meta,
            standing,
            fresh,
            disk_size: self.disk.size(),
            disk_empty,
            discard_my_data: self.opts.discard_my_data,
        };
        let a = admission::decide(&local, claim)?;
        if let Some(r) = a.discarding {
            tracing::warn!(
                "{}; discarding this disk's data as asked (--discard-my-data)",
                r.local()
            );
        }
        Ok(a.sync)
    }

    /// After a clean end of the session of `token`: record that the disk is the checkpoint of
    /// epoch `committed` at rest, once the disk holds it durably.
    async fn store_clean(&self, token: u64, committed: u64) {
        // No forwarded request is in progress after this, and no RESUME (which marks the
        // disk unclean) runs until the metadata is stored.
        let _x = self.barrier.write().await;
        if let Err(e) = self.flush_disk().await {
            self.set_error(format!(
                "flushing the disk after the primary's GOODBYE: {e}; it stays marked unclean"
            ));
            return;
        }
        {
            let i = self.inner();
            if i.token != token || i.mode != Mode::Waiting {
                // Another primary connected meanwhile: its session decides.
                return;
            }
        }
        self.store_meta(|m| {
            m.clean = true;
            m.committed = committed;
        });
    }

    /// RESUME: the sync's comparison is done; take forwarded writes again from `epoch` on,
    /// on data connections that prove `key` when the port authenticates peers.
    async fn resume(
        &self,
        epoch: u64,
        key: Option<SessionKey>,
    ) -> std::result::Result<(), ReplicaError> {
        // No forwarded request of an earlier connection is in progress after this.
        let _x = self.barrier.write().await;
        {
            let mut i = self.inner();
            if i.mode != Mode::Syncing {
                return Err(ReplicaError::State(format!(
                    "RESUME while {}",
                    i.mode.name()
                )));
            }
            if epoch == 0 {
                return Err(ReplicaError::Protocol("RESUME to epoch 0".into()));
            }
            // The interrupted epochs were rolled back at HELLO: no originals are left.
            debug_assert_eq!(i.buffer.stats().epochs, 0);
            i.token += 1;
            i.session_key = key;
            i.current = epoch;
            i.next_commit = epoch;
            i.counts.clear();
            i.poisoned.clear();
            self.switch(&mut i, Mode::Replicating, None);
        }
        for p in self.others() {
            p.resume(epoch);
        }
        // From the first forwarded write on, the disk is no checkpoint at rest.
        self.store_meta(|m| m.clean = false);
        Ok(())
    }
}
