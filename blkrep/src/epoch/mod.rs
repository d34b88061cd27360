//! Checkpoint epochs: the coordinator on the primary and the API its participants implement.
//!
//! Epoch `n` is everything written between checkpoint `n-1` and checkpoint `n`. One
//! checkpoint, as the [`EpochCoordinator`] runs it:
//!
//! ```text
//!  guest.pause() ─▶ cut(n) on every participant ─▶ guest.resume()     (the client-visible pause)
//!       ─▶ prepare(n) on every participant (drain epoch n to the secondary, concurrently)
//!       ─▶ link.checkpoint(n, summaries) ─▶ secondary commits all-or-nothing ─▶ COMMITTED(n)
//!       ─▶ commit(n) on every participant          (or abort(n) everywhere on any failure)
//! ```
//!
//! `cut` must be quick: it only decides which data belongs to epoch `n` (the block layer puts
//! an epoch mark into its forward stream). Draining happens after the guest runs again, so
//! writes of epoch `n+1` flow while epoch `n` is still being committed; the secondary keeps
//! originals per epoch, which makes that safe. A participant that needs the guest stopped for
//! longer (a memory checkpoint without pre-copy) does its capture in `cut`.
//!
//! Triggers: a period, a byte threshold reported by participants
//! ([`CheckpointTrigger::add_bytes`]), and explicit requests (operator command, or netcmp
//! seeing diverging output) through [`CheckpointTrigger::request`].

mod events;
mod guest;
mod peer;

pub use crate::latency::{Latencies, LatencySummary};
pub use events::{
    control_request, monotonic_ns, request_checkpoint, EpochEvent, Subscribed, Subscription,
};
pub use guest::{GuestHooks, QmpGuest};
pub use peer::{FailoverTarget, PeerChannel, SecondaryParticipant, MAX_PEER_MESSAGE};

use crate::sync::Locked;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot, watch, Notify};

/// A checkpoint epoch number. Epoch 0 is the state both sides start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

/// Why a checkpoint failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EpochError {
    /// The link to the secondary is gone or broke during the checkpoint.
    #[error("{epoch}: the secondary is unreachable: {reason}")]
    PeerLost {
        /// The epoch being checkpointed.
        epoch: Epoch,
        /// What happened.
        reason: String,
    },
    /// The secondary refused to commit.
    #[error("{epoch}: the secondary refused to commit: {reason}")]
    Refused {
        /// The epoch being checkpointed.
        epoch: Epoch,
        /// The secondary's reason.
        reason: String,
    },
    /// A participant failed.
    #[error("{epoch}: {participant}: {reason}")]
    Participant {
        /// The epoch being checkpointed.
        epoch: Epoch,
        /// Which participant.
        participant: String,
        /// What went wrong.
        reason: String,
    },
    /// No checkpoints are possible (the node is not replicating).
    #[error("not replicating: {0}")]
    NotReplicating(String),
}

pub use crate::sync::BoxFuture;

/// What a participant tells the secondary about its share of an epoch; the secondary's half
/// of the participant checks it before committing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EpochSummary {
    /// Participant id (see `replica::wire`); 1 = block.
    pub participant: u16,
    /// Units sent in the epoch (writes, pages, ...).
    pub items: u64,
    /// Bytes sent in the epoch.
    pub bytes: u64,
    /// A digest of the participant's state at the end of the epoch (0 if it keeps none).
    pub digest: u64,
}

/// Something that joins checkpoint epochs on the primary: the block layer today; memory
/// (memrep) and packet comparison (netcmp) later.
pub trait Participant: Send + Sync {
    /// Short name for logs and status.
    fn name(&self) -> &str;
    /// Close epoch `n` while the guest is paused: decide what belongs to it. Must be quick.
    fn cut(&self, epoch: Epoch) -> BoxFuture<'_, Result<(), EpochError>>;
    /// Bring epoch `n` completely to the secondary (after the guest has resumed).
    fn prepare(&self, epoch: Epoch) -> BoxFuture<'_, Result<EpochSummary, EpochError>>;
    /// The secondary committed epoch `n`.
    fn commit(&self, epoch: Epoch);
    /// Checkpoint `n` failed and will not be committed; `reason` says why.
    fn abort(&self, epoch: Epoch, reason: &EpochError);
    /// This participant's share of the status report.
    fn status(&self) -> serde_json::Value;
    /// Compare this participant's state with its secondary half's without moving the data
    /// (`lockstep verify`); Null when it has nothing to compare.
    fn verify(&self) -> BoxFuture<'_, Result<serde_json::Value, String>> {
        Box::pin(async { Ok(serde_json::Value::Null) })
    }
    /// Whether a checkpoint may start now. An error (a resync still in progress, say) means
    /// no checkpoint runs this time: nothing is paused or cut, and the error is the reason.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
    /// The coordinator this participant joined hands it its trigger, so that it can ask for
    /// checkpoints itself (a threshold of dirty bytes, say).
    fn set_trigger(&self, trigger: CheckpointTrigger) {
        let _ = trigger;
    }
    /// The id of this participant's secondary half ([`SecondaryParticipant::id`]) if it
    /// talks to it over a [`PeerChannel`]; such participants get a channel from every
    /// replication session ([`Participant::connected`]).
    fn peer_id(&self) -> Option<u16> {
        None
    }
    /// A replication session began: the secondary resumed at `epoch` (it holds checkpoint
    /// `epoch - 1`), and `channel` reaches this participant's secondary half until the
    /// session ends. Bring the secondary half up to date here or in the background.
    /// [`EpochError::Refused`] is permanent (the two halves cannot work together, e.g.
    /// different sizes) and ends the attempt for good; other errors end this attempt only.
    fn connected(
        &self,
        channel: std::sync::Arc<dyn PeerChannel>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), EpochError>> {
        let _ = (channel, epoch);
        Box::pin(async { Ok(()) })
    }
}

/// Pauses and resumes whatever produces writes, around `cut`. For a bare block device there
/// is nothing to pause ([`NoGuest`]); a QEMU VM is stopped over QMP ([`QmpGuest`]); memrep
/// pauses a cooperating writer process; [`GuestHooks`] combines several.
pub trait GuestHook: Send + Sync {
    /// Stop the guest.
    fn pause(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Let it run again.
    fn resume(&self) -> BoxFuture<'_, Result<(), String>>;
    /// Its share of the primary's status (under `participants.guest`); nothing by default.
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

/// The guest hook for a bare block device: nothing to pause.
#[derive(Debug, Default)]
pub struct NoGuest;

impl GuestHook for NoGuest {
    fn pause(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    fn resume(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
}

/// Carries CHECKPOINT(n) to the secondary and waits for COMMITTED(n).
pub trait CheckpointLink: Send + Sync {
    /// Ask the secondary to commit `epoch`, all participants at once.
    fn checkpoint(
        &self,
        epoch: Epoch,
        summaries: Vec<EpochSummary>,
    ) -> BoxFuture<'_, Result<(), EpochError>>;
}

/// Why a checkpoint ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The period elapsed.
    Interval,
    /// Enough data was written since the last checkpoint.
    Bytes,
    /// Someone asked (operator, netcmp).
    Requested,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Interval => "interval",
            Reason::Bytes => "bytes written",
            Reason::Requested => "requested",
        })
    }
}

/// The result of one checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointReport {
    /// The epoch that was committed.
    pub epoch: Epoch,
    /// How long the guest was paused / the I/O path was cut.
    pub pause: Duration,
    /// From pause to COMMITTED.
    pub total: Duration,
}

/// Where a requested checkpoint's result goes.
type ReportSender = oneshot::Sender<Result<CheckpointReport, EpochError>>;

/// Requests checkpoints from anywhere: operator commands, byte thresholds, netcmp.
#[derive(Debug, Clone)]
pub struct CheckpointTrigger {
    requests: mpsc::Sender<ReportSender>,
    bytes: Arc<AtomicU64>,
    threshold: Arc<AtomicU64>,
    kick: Arc<Notify>,
}

impl CheckpointTrigger {
    /// Run a checkpoint now (after the one in progress) and wait for its result.
    pub async fn request(&self) -> Result<CheckpointReport, EpochError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| EpochError::NotReplicating("the coordinator has stopped".into()))?;
        rx.await
            .map_err(|_| EpochError::NotReplicating("the coordinator has stopped".into()))?
    }

    /// Count `n` bytes written in the current epoch; past the threshold a checkpoint runs.
    pub fn add_bytes(&self, n: u64) {
        let total = self.bytes.fetch_add(n, Ordering::Relaxed) + n;
        let t = self.threshold.load(Ordering::Relaxed);
        if t > 0 && total >= t && total - n < t {
            self.kick.notify_one();
        }
    }
}

/// Knobs of the coordinator; changeable at run time through [`EpochCoordinator::set_interval`]
/// and [`EpochCoordinator::set_bytes`].
#[derive(Debug, Clone, Copy)]
pub struct CoordinatorOptions {
    /// Checkpoint at least this often (None: only on other triggers).
    pub interval: Option<Duration>,
    /// Checkpoint once this many bytes were written in the epoch (0: never).
    pub bytes: u64,
}

/// The default checkpoint period (`--checkpoint-interval`).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

impl Default for CoordinatorOptions {
    /// A checkpoint every [`DEFAULT_CHECKPOINT_INTERVAL`], none by bytes written.
    fn default() -> Self {
        Self {
            interval: Some(DEFAULT_CHECKPOINT_INTERVAL),
            bytes: 0,
        }
    }
}

/// Counters and latencies for status.
#[derive(Debug, Default)]
pub struct CoordinatorStats {
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Checkpoints that failed.
    pub failures: u64,
    /// Client-visible pause (guest pause + cut).
    pub pause: Latencies,
    /// The whole checkpoint, pause to COMMITTED.
    pub total: Latencies,
    /// The last failure.
    pub last_error: Option<String>,
    /// Checkpoints due that did not run (not replicating, a resync, a participant not ready,
    /// a guest that did not pause).
    pub skipped: u64,
    /// Why the last of them did not run.
    pub last_skip: Option<String>,
}

/// The coordinator's share of a primary's status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointStatus {
    /// The epoch writes belong to now.
    pub epoch: u64,
    /// The last epoch the secondary committed.
    pub committed_epoch: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Checkpoints that failed.
    pub checkpoint_failures: u64,
    /// How long the guest was paused per checkpoint.
    pub checkpoint_pause_us: crate::latency::LatencySummary,
    /// How long each checkpoint took, to COMMITTED.
    pub checkpoint_total_us: crate::latency::LatencySummary,
    /// The checkpoint period, if any.
    pub checkpoint_interval_ms: Option<u64>,
    /// The byte threshold (0: none).
    pub checkpoint_bytes: u64,
    /// Why the last checkpoint failed.
    pub last_checkpoint_error: Option<String>,
    /// Checkpoints due that did not run.
    #[serde(default)]
    pub checkpoints_skipped: u64,
    /// Why the last of them did not run (a resync, a participant not ready, ...).
    #[serde(default)]
    pub last_skip_reason: Option<String>,
    /// Each participant's share, by name.
    pub participants: serde_json::Map<String, serde_json::Value>,
}

/// Runs checkpoints on the primary.
pub struct EpochCoordinator {
    participants: Vec<Arc<dyn Participant>>,
    guest: Arc<dyn GuestHook>,
    link: Arc<dyn CheckpointLink>,
    current: AtomicU64,
    committed: AtomicU64,
    stats: Mutex<CoordinatorStats>,
    interval: watch::Sender<Option<Duration>>,
    trigger: CheckpointTrigger,
    requests: tokio::sync::Mutex<Option<mpsc::Receiver<ReportSender>>>,
    events: broadcast::Sender<EpochEvent>,
}

impl fmt::Debug for EpochCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochCoordinator")
            .field("epoch", &self.current())
            .finish_non_exhaustive()
    }
}

impl EpochCoordinator {
    /// A coordinator starting in `first` (the epoch being written now).
    pub fn new(
        participants: Vec<Arc<dyn Participant>>,
        guest: Arc<dyn GuestHook>,
        link: Arc<dyn CheckpointLink>,
        first: Epoch,
        opts: CoordinatorOptions,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(64);
        let trigger = CheckpointTrigger {
            requests: tx,
            bytes: Arc::new(AtomicU64::new(0)),
            threshold: Arc::new(AtomicU64::new(opts.bytes)),
            kick: Arc::new(Notify::new()),
        };
        for p in &participants {
            p.set_trigger(trigger.clone());
        }
        Arc::new(Self {
            participants,
            guest,
            link,
            current: AtomicU64::new(first.0),
            committed: AtomicU64::new(first.0.saturating_sub(1)),
            stats: Mutex::new(CoordinatorStats::default()),
            interval: watch::Sender::new(opts.interval),
            trigger,
            requests: tokio::sync::Mutex::new(Some(rx)),
            events: broadcast::Sender::new(events::EVENT_BACKLOG),
        })
    }

    /// The participants, in the order they cut.
    pub fn participants(&self) -> &[Arc<dyn Participant>] {
        &self.participants
    }

    /// A handle that requests checkpoints.
    pub fn trigger(&self) -> CheckpointTrigger {
        self.trigger.clone()
    }

    /// Commits and aborts from now on, for processes that hold output until its state is
    /// safe ([`EpochEvent`]).
    pub fn subscribe(&self) -> broadcast::Receiver<EpochEvent> {
        self.events.subscribe()
    }

    /// The last epoch the secondary committed.
    pub fn committed(&self) -> Epoch {
        Epoch(self.committed.load(Ordering::Acquire))
    }

    /// The epoch being written now.
    pub fn current(&self) -> Epoch {
        Epoch(self.current.load(Ordering::Acquire))
    }

    /// Change the period (None: no periodic checkpoints).
    pub fn set_interval(&self, d: Option<Duration>) {
        self.interval.send_replace(d);
    }

    /// Change the byte threshold (0: none).
    pub fn set_bytes(&self, n: u64) {
        self.trigger.threshold.store(n, Ordering::Relaxed);
    }

    /// The period and byte threshold in force.
    pub fn options(&self) -> CoordinatorOptions {
        CoordinatorOptions {
            interval: *self.interval.borrow(),
            bytes: self.trigger.threshold.load(Ordering::Relaxed),
        }
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, CoordinatorStats> {
        self.stats.locked()
    }

    /// Histograms of every checkpoint's client-visible pause and whole duration.
    pub fn histograms(&self) -> (crate::latency::Histogram, crate::latency::Histogram) {
        let s = self.stats();
        (s.pause.histogram(), s.total.histogram())
    }

    /// Status: epoch, counters, pause and total latencies, participants.
    pub fn status(&self) -> CheckpointStatus {
        let s = self.stats();
        let opts = self.options();
        CheckpointStatus {
            epoch: self.current().0,
            committed_epoch: self.committed.load(Ordering::Acquire),
            checkpoints: s.checkpoints,
            checkpoint_failures: s.failures,
            checkpoint_pause_us: s.pause.summary(),
            checkpoint_total_us: s.total.summary(),
            checkpoint_interval_ms: opts.interval.map(|d| d.as_millis() as u64),
            checkpoint_bytes: opts.bytes,
            last_checkpoint_error: s.last_error.clone(),
            checkpoints_skipped: s.skipped,
            last_skip_reason: s.last_skip.clone(),
            participants: self
                .participants
                .iter()
                .map(|p| (p.name().to_string(), p.status()))
                .chain(
                    Some(("guest".to_string(), self.guest.status())).filter(|(_, v)| !v.is_null()),
                )
                .collect(),
        }
    }

    /// Run one checkpoint of the current epoch now. Checkpoints never overlap: callers other
    /// than [`EpochCoordinator::run`] should go through [`CheckpointTrigger::request`].
    pub async fn checkpoint(&self) -> Result<CheckpointReport, EpochError> {
        let epoch = self.current();
        let start = Instant::now();
        let paused_at_ns = monotonic_ns();
        let r = self.checkpoint_inner(epoch, start).await;
        if let Err(EpochError::NotReplicating(why)) = &r {
            // Nothing was cut (paused, resyncing): no checkpoint to count or abort.
            let mut s = self.stats();
            s.skipped += 1;
            s.last_skip = Some(why.clone());
            return r;
        }
        let mut s = self.stats();
        match &r {
            Ok(rep) => {
                s.checkpoints += 1;
                s.pause.record(rep.pause);
                s.total.record(rep.total);
            }
            Err(e) => {
                s.failures += 1;
                s.last_error = Some(e.to_string());
            }
        }
        drop(s);
        // Nobody listening is fine: send fails only without subscribers.
        let _ = self.events.send(match &r {
            Ok(rep) => EpochEvent::Committed {
                epoch: rep.epoch.0,
                paused_at_ns,
            },
            Err(e) => EpochEvent::Aborted {
                epoch: epoch.0,
                error: e.to_string(),
            },
        });
        if let Err(e) = &r {
            for p in &self.participants {
                p.abort(epoch, e);
            }
        }
        r
    }

    async fn checkpoint_inner(
        &self,
        epoch: Epoch,
        start: Instant,
    ) -> Result<CheckpointReport, EpochError> {
        let guest = |reason: String| EpochError::Participant {
            epoch,
            participant: "guest".into(),
            reason,
        };
        for p in &self.participants {
            p.ready()
                .map_err(|why| EpochError::NotReplicating(format!("{}: {why}", p.name())))?;
        }
        // Nothing is cut yet: a guest that cannot pause means no checkpoint this time.
        self.guest
            .pause()
            .await
            .map_err(|e| EpochError::NotReplicating(format!("the guest did not pause: {e}")))?;
        let mut cut = Ok(());
        let mut any_cut = false;
        for p in &self.participants {
            if let Err(e) = p.cut(epoch).await {
                cut = Err(match e {
                    // Others have cut: this is a failed checkpoint, to abort everywhere.
                    EpochError::NotReplicating(reason) if any_cut => EpochError::Participant {
                        epoch,
                        participant: p.name().to_string(),
                        reason,
                    },
                    e => e,
                });
                break;
            }
            any_cut = true;
        }
        // Once one participant has cut, the epoch is closed for all, whatever happens next:
        // a later participant's failure aborts it everywhere, and the next epoch begins.
        if cut.is_ok() || any_cut {
            // Writes from here on belong to the next epoch.
            self.current.store(epoch.next().0, Ordering::Release);
            self.trigger.bytes.store(0, Ordering::Relaxed);
        }
        let resumed = self.guest.resume().await.map_err(guest);
        let pause = start.elapsed();
        cut?;
        resumed?;
        let summaries = futures_join_all(self.participants.iter().map(|p| p.prepare(epoch))).await;
        let summaries = summaries.into_iter().collect::<Result<Vec<_>, _>>()?;
        self.link.checkpoint(epoch, summaries).await?;
        self.committed.store(epoch.0, Ordering::Release);
        for p in &self.participants {
            p.commit(epoch);
        }
        Ok(CheckpointReport {
            epoch,
            pause,
            total: start.elapsed(),
        })
    }

    /// Run checkpoints on every trigger until `stop` turns true. A failed checkpoint does not
    /// end the loop (its participants were aborted; the link is re-established elsewhere);
    /// the only error is a second `run` of the same coordinator.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) -> Result<(), EpochError> {
        let mut requests = self
            .requests
            .lock()
            .await
            .take()
            .ok_or_else(|| EpochError::NotReplicating("the coordinator runs already".into()))?;
        let mut interval_rx = self.interval.subscribe();
        let mut last = Instant::now();
        loop {
            let period = *interval_rx.borrow_and_update();
            let next = last + period.unwrap_or_default();
            let sleep = async {
                match period {
                    Some(_) => tokio::time::sleep_until(next.into()).await,
                    None => std::future::pending().await,
                }
            };
            let (reason, reply) = tokio::select! {
                _ = until_true(&mut stop) => return Ok(()),
                _ = interval_rx.changed() => continue,
                _ = sleep => (Reason::Interval, None),
                _ = self.trigger.kick.notified() => (Reason::Bytes, None),
                r = requests.recv() => match r {
                    Some(tx) => (Reason::Requested, Some(tx)),
                    None => return Ok(()),
                },
            };
            last = Instant::now();
            let r = self.checkpoint().await;
            match &r {
                Err(EpochError::NotReplicating(why)) => {
                    tracing::debug!("no checkpoint ({reason}): {why}")
                }
                Err(e) => tracing::warn!("checkpoint failed ({reason}): {e}"),
                Ok(_) => {}
            }
            // A lost peer does not end the loop: the participants pause, the link is
            // re-established and resynced, and checkpoints go on from there.
            if let Some(tx) = reply {
                let _ = tx.send(r);
            }
        }
    }
}

/// Resolves once `rx` holds true (or its sender is gone).
pub async fn until_true(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Await every future, keeping their order (a tiny join_all without the futures crate).
async fn futures_join_all<'a, T>(futs: impl Iterator<Item = BoxFuture<'a, T>>) -> Vec<T> {
    // Participants are few (one to three): poll them all on every wake-up.
    let mut pending: Vec<Option<BoxFuture<'a, T>>> = futs.map(Some).collect();
    let mut out = Vec::with_capacity(pending.len());
    let mut results: Vec<Option<T>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(
        results
            .into_iter()
            .map(|r| r.expect("every future finished")),
    );
    out
}

#[cfg(test)]
mod tests;
