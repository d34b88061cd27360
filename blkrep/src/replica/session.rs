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
//! The comparison runs while the primary is paused, so the secondary's disk stands still;
//! each unit is compared with the primary's digest table under the write gate, so no client
//! write can slip between the comparison and forgetting the unit.

use crate::sync::Locked;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::peer::{Hello, LinkOptions, PeerLink, Welcome};
use super::primary::{open_replica_connection, Primary, PrimaryMode};
use super::wire::{AckMode, SyncKind, MAX_SUM_UNITS};
use crate::auth::PeerKey;
use crate::digest::{self, DIGEST_BLOCK};
use crate::epoch::{BoxFuture, CheckpointLink, CheckpointTrigger, Epoch, EpochError, EpochSummary};
use crate::nbd::transport::Endpoint;
use crate::tls::ClientTls;

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

/// Why an attempt failed.
#[derive(Debug, Clone)]
pub enum AttemptError {
    /// Nobody answered, or the connection broke.
    Unreachable(String),
    /// The secondary refused us (split-brain, a newer disk, another primary, sizes).
    Refused(String),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Unreachable(e) | AttemptError::Refused(e) => f.write_str(e),
        }
    }
}

#[derive(Debug, Default)]
struct SessionState {
    attempts: u64,
    sessions: u64,
    last_attempt_error: Option<String>,
    lost_at: Option<Instant>,
    last_resume_s: Option<f64>,
    last_sync: Option<&'static str>,
    verify: Option<Value>,
}

/// Keeps a [`Primary`] replicating to its secondary.
pub struct Replicator {
    primary: Arc<Primary>,
    opts: ReplicatorOptions,
    link: Mutex<Option<Arc<PeerLink>>>,
    trigger: OnceLock<CheckpointTrigger>,
    state: Mutex<SessionState>,
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
            state: Mutex::new(SessionState::default()),
            stop,
        })
    }

    /// Where the checkpoint that completes a resync is requested.
    pub fn set_trigger(&self, t: CheckpointTrigger) {
        let _ = self.trigger.set(t);
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
    pub async fn attempt(self: &Arc<Self>) -> Result<SyncKind, AttemptError> {
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
                self.st().last_attempt_error = Some(e.to_string());
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
                st.sessions += 1;
                st.last_sync = Some(welcome.sync.name());
                st.last_attempt_error = None;
                Ok(welcome.sync)
            }
            Err(e) => {
                link.close(&e);
                let e = format!("{ep}: {e}");
                self.st().last_attempt_error = Some(e.clone());
                Err(AttemptError::Unreachable(e))
            }
        }
    }

    async fn sync_and_resume(
        self: &Arc<Self>,
        link: &Arc<PeerLink>,
        welcome: Welcome,
    ) -> Result<(), String> {
        let p = &self.primary;
        let kind = welcome.sync;
        let unit = match kind {
            SyncKind::Incremental => 1,
            SyncKind::Checksum => CHUNK_BLOCKS,
            SyncKind::Full => 0,
        };
        tracing::info!(sync = kind.name(), secondary = %self.opts.secondary, consistent = welcome.consistent, "secondary connected: syncing");
        p.begin_sync(kind.name(), unit);
        match kind {
            SyncKind::Checksum => p.mark_all_dirty().await,
            SyncKind::Full => p
                .mark_allocated_dirty()
                .await
                .map_err(|e| format!("reading the local disk: {e}"))?,
            SyncKind::Incremental => {}
        }
        if unit > 0 {
            let units = p.dirty_units(unit);
            let mut batch = RoaringTreemap::new();
            let mut it = units.iter().peekable();
            while let Some(u) = it.next() {
                batch.insert(u);
                if batch.len() == MAX_SUM_UNITS || it.peek().is_none() {
                    let b = std::mem::take(&mut batch);
                    let sums = link.sums(unit as u32, b.clone()).await?;
                    p.forget_equal(unit, &b, &sums).await;
                }
            }
        }
        let epoch = p.resume_epoch();
        link.resume(epoch).await?;
        // Opened after RESUME_ACK: the secondary binds it to the resumed session.
        let client = open_replica_connection(
            &self.opts.secondary,
            link,
            self.opts.connect_timeout,
            self.opts.tls.clone(),
        )
        .await?;
        p.resumed().await;
        *self.link.locked() = Some(link.clone());
        // The previous session's forwarder has ended: run() waits for it (end_session).
        p.start_forwarder(client);
        if let Some(r) = link.dead_reason() {
            p.link_lost(&r).await;
        }
        let stats = p.resync_stats();
        tracing::info!(
            epoch,
            compared_units = stats.compared_units,
            equal_units = stats.equal_units,
            to_send_blocks = stats.to_send_blocks,
            "replication resumed; resyncing"
        );
        let me = self.clone();
        tokio::spawn(async move {
            match me.primary.resync().await {
                Ok(bytes) => {
                    tracing::info!(bytes, "resync data sent; checkpointing");
                    if let Some(t) = me.trigger.get() {
                        if let Err(e) = t.request().await {
                            tracing::warn!("the checkpoint after the resync failed: {e}");
                        }
                    }
                }
                Err(e) => tracing::info!("resync interrupted: {e}"),
            }
        });
        Ok(())
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
                            sync = kind.name(),
                            after_s = s,
                            "reconnected to the secondary"
                        );
                        self.st().last_resume_s = Some(s);
                        break;
                    }
                    Err(e) => {
                        let refused = matches!(e, AttemptError::Refused(_));
                        if refused {
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
    pub fn status(&self) -> Value {
        let st = self.st();
        let link = self.current_link();
        json!({
            "peer_state": match (self.primary.mode(), link.as_ref().and_then(|l| l.dead_reason())) {
                (PrimaryMode::Replicating, None) if link.is_some() => "connected".to_string(),
                (PrimaryMode::Replicating, Some(r)) => format!("lost: {r}"),
                (mode, _) => format!("{}: {}", mode.name(), st.last_attempt_error.clone().unwrap_or_else(|| "reconnecting".into())),
            },
            "sessions": st.sessions,
            "connect_attempts": st.attempts,
            "last_attempt_error": st.last_attempt_error,
            "last_resume_s": st.last_resume_s,
            "last_sync": st.last_sync,
            "paused_for_s": (self.primary.mode() != PrimaryMode::Replicating)
                .then(|| st.lost_at.map(|t| t.elapsed().as_secs_f64())).flatten(),
            "verify": st.verify,
        })
    }

    /// Compare the primary's and the secondary's disks chunk by chunk (64 KiB) by digest,
    /// without moving the data, while both keep serving. Each batch of chunks is locked
    /// against client writes and waits until everything forwarded before it is applied on
    /// the secondary, so only real differences are reported.
    pub async fn verify(&self) -> Result<Value, String> {
        let p = &self.primary;
        let link = self
            .current_link()
            .filter(|_| p.mode() == PrimaryMode::Replicating)
            .ok_or("not replicating: nothing to verify against")?;
        if p.is_resyncing() {
            return Err("a resync is in progress: verify after it completes".into());
        }
        let start = Instant::now();
        let size = p.size_bytes();
        let nblocks = digest::blocks(size);
        let nunits = nblocks.div_ceil(CHUNK_BLOCKS);
        const BATCH: u64 = 256;
        let mut differing: Vec<(u64, u64)> = Vec::new();
        let mut ndiff = 0u64;
        let mut last_log = Instant::now();
        let mut u0 = 0;
        while u0 < nunits {
            let u1 = (u0 + BATCH).min(nunits);
            let first = u0 * CHUNK_BLOCKS;
            let last = (u1 * CHUNK_BLOCKS).min(nblocks) - 1;
            let units: RoaringTreemap = (u0..u1).collect();
            let sums = {
                let _l = p.lock_blocks(first, last).await;
                p.barrier().await.map_err(|e| format!("verify: {e}"))?;
                link.sums(CHUNK_BLOCKS as u32, units.clone())
                    .await
                    .map_err(|e| format!("verify: {e}"))?
            };
            for (u, theirs) in units.iter().zip(&sums) {
                if p.digest_table().unit_sum(u, CHUNK_BLOCKS) != *theirs {
                    ndiff += 1;
                    let off = u * CHUNK_BLOCKS * DIGEST_BLOCK;
                    let len = (CHUNK_BLOCKS * DIGEST_BLOCK).min(size - off);
                    match differing.last_mut() {
                        Some((o, l)) if *o + *l == off => *l += len,
                        _ => differing.push((off, len)),
                    }
                }
            }
            u0 = u1;
            let progress = json!({
                "state": "running",
                "done_chunks": u0,
                "total_chunks": nunits,
                "differing_chunks": ndiff,
            });
            self.st().verify = Some(progress);
            if last_log.elapsed() > Duration::from_secs(1) {
                last_log = Instant::now();
                tracing::info!(
                    done = u0,
                    total = nunits,
                    differing = ndiff,
                    "verify: {:.0}%",
                    100.0 * u0 as f64 / nunits as f64
                );
            }
        }
        let secs = start.elapsed().as_secs_f64();
        let result = json!({
            "state": "done",
            "chunk_bytes": CHUNK_BLOCKS * DIGEST_BLOCK,
            "total_chunks": nunits,
            "done_chunks": nunits,
            "differing_chunks": ndiff,
            "differing": differing.iter().map(|(o, l)| json!({"offset": o, "len": l})).collect::<Vec<_>>(),
            "bytes_compared": size,
            "duration_s": secs,
            "mb_per_s": size as f64 / secs.max(1e-9) / 1e6,
        });
        tracing::info!(differing = ndiff, secs, "verify done");
        self.st().verify = Some(result.clone());
        Ok(result)
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
