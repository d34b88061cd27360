//! The frontends' link to the epochs: checkpoint requests out, commits in.
//!
//! With a control socket ([`EpochLink::connect`]) the link subscribes to the primary daemon's
//! epoch events (`subscribe` on its control socket) and asks it for checkpoints
//! (`checkpoint`); one request is in flight at a time, and a failed one is retried until a
//! checkpoint commits. Losing the subscription is reported ([`LinkEvent::Lost`]: the primary
//! daemon is gone, so output held for its checkpoints can never be released) and the link
//! reconnects.
//!
//! Without a control socket ([`EpochLink::local`]) there are no epochs: a requested
//! checkpoint "commits" at once. That is comparison without replication — divergences are
//! counted and comparison restarts — useful to learn whether a service is deterministic.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkrep::epoch::{monotonic_ns, request_checkpoint, EpochEvent, Subscription};
use tokio::sync::mpsc;

/// How long a checkpoint request may take before it counts as failed and is sent again.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The pause between failed requests, and between attempts to resubscribe.
const RETRY: Duration = Duration::from_millis(500);

/// What the link tells a frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A checkpoint committed: the primary's state as of `paused_at_ns`
    /// ([`monotonic_ns`]) survives a failover.
    Committed {
        /// Its epoch (0 without a control socket).
        epoch: u64,
        /// When its pause began.
        paused_at_ns: u64,
    },
    /// The subscription ended: the primary daemon stopped or died. Output held for its
    /// checkpoints must be dropped.
    Lost(String),
    /// The subscription is back.
    Connected,
}

/// Counters of the link, for status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// The primary daemon's control socket, if any.
    pub control: Option<String>,
    /// Whether the subscription is up (always true without a control socket).
    pub connected: bool,
    /// Checkpoint requests sent (retries included).
    pub requests_sent: u64,
    /// Requests that failed.
    pub request_failures: u64,
    /// Commits seen.
    pub commits_seen: u64,
    /// The last error (request or subscription).
    pub last_error: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    in_flight: AtomicBool,
    requests: AtomicU64,
    failures: AtomicU64,
    commits: AtomicU64,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

/// The handle frontends request checkpoints through.
#[derive(Debug, Clone)]
pub struct EpochLink {
    control: Option<PathBuf>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<LinkEvent>,
}

impl EpochLink {
    /// Subscribe to the primary daemon at control socket `control`; its commits arrive on the
    /// returned receiver. Fails if the daemon does not answer now.
    pub async fn connect(
        control: PathBuf,
    ) -> Result<(EpochLink, mpsc::UnboundedReceiver<LinkEvent>), String> {
        let sub = Subscription::connect(&control, Duration::from_secs(10)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let link = EpochLink {
            control: Some(control),
            shared: Arc::new(Shared::default()),
            events: tx,
        };
        link.shared.connected.store(true, Ordering::Relaxed);
        let l = link.clone();
        tokio::spawn(async move { l.follow(sub).await });
        Ok((link, rx))
    }

    /// No primary daemon: requested checkpoints commit at once.
    pub fn local() -> (EpochLink, mpsc::UnboundedReceiver<LinkEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = EpochLink {
            control: None,
            shared: Arc::new(Shared::default()),
            events: tx,
        };
        link.shared.connected.store(true, Ordering::Relaxed);
        (link, rx)
    }

    /// Ask for a checkpoint, unless one is being asked for already. Its commit arrives as a
    /// [`LinkEvent::Committed`] like any other.
    pub fn request(&self) {
        if self.shared.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(control) = self.control.clone() else {
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            self.shared.commits.fetch_add(1, Ordering::Relaxed);
            self.shared.in_flight.store(false, Ordering::Release);
            let _ = self.events.send(LinkEvent::Committed {
                epoch: 0,
                paused_at_ns: monotonic_ns(),
            });
            return;
        };
        let link = self.clone();
        tokio::spawn(async move {
            // Retried until a checkpoint commits: the divergence stays unresolved until then.
            loop {
                link.shared.requests.fetch_add(1, Ordering::Relaxed);
                match request_checkpoint(&control, REQUEST_TIMEOUT).await {
                    Ok(_) => break,
                    Err(e) => {
                        link.shared.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("checkpoint request failed: {e}");
                        link.set_error(e);
                        if link.events.is_closed() {
                            break;
                        }
                        tokio::time::sleep(RETRY).await;
                    }
                }
            }
            link.shared.in_flight.store(false, Ordering::Release);
        });
    }

    /// The counters.
    pub fn status(&self) -> LinkStatus {
        LinkStatus {
            control: self.control.as_ref().map(|p| p.display().to_string()),
            connected: self.shared.connected.load(Ordering::Relaxed),
            requests_sent: self.shared.requests.load(Ordering::Relaxed),
            request_failures: self.shared.failures.load(Ordering::Relaxed),
            commits_seen: self.shared.commits.load(Ordering::Relaxed),
            last_error: self
                .shared
                .last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or(None),
        }
    }

    fn set_error(&self, e: String) {
        if let Ok(mut g) = self.shared.last_error.lock() {
            *g = Some(e);
        }
    }

    /// Forward the subscription's commits; on its loss report it and resubscribe.
    async fn follow(self, mut sub: Subscription) {
        let control = self
            .control
            .clone()
            .expect("a subscription has a control socket");
        loop {
            let lost = loop {
                match sub.next().await {
                    Ok(EpochEvent::Committed {
                        epoch,
                        paused_at_ns,
                    }) => {
                        self.shared.commits.fetch_add(1, Ordering::Relaxed);
                        if self
                            .events
                            .send(LinkEvent::Committed {
                                epoch,
                                paused_at_ns,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(EpochEvent::Aborted { epoch, error }) => {
                        tracing::info!("checkpoint {epoch} aborted: {error}");
                    }
                    // Commits are cumulative: the next one covers what was missed.
                    Ok(EpochEvent::Lagged { missed }) => {
                        tracing::warn!("missed {missed} epoch events");
                    }
                    Err(e) => break e,
                }
            };
            tracing::warn!("epoch subscription lost: {lost}");
            self.shared.connected.store(false, Ordering::Relaxed);
            self.set_error(lost.clone());
            if self.events.send(LinkEvent::Lost(lost)).is_err() {
                return;
            }
            sub = loop {
                tokio::time::sleep(RETRY).await;
                if self.events.is_closed() {
                    return;
                }
                if let Ok(s) = Subscription::connect(&control, Duration::from_secs(5)).await {
                    break s;
                }
            };
            self.shared.connected.store(true, Ordering::Relaxed);
            if self.events.send(LinkEvent::Connected).is_err() {
                return;
            }
        }
    }
}
