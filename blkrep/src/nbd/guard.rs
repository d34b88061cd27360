//! What a guarded port demands before NBD (TLS from the first byte, the peer key, or both)
//! and the budget of those handshakes: a number per port and per host, apart from the
//! connection limit, so strangers cannot crowd out a peer that has the credentials. The
//! exchanges themselves run in `NbdServer::authenticate` ([`crate::auth`], [`crate::tls`]).

use crate::sync::Locked;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{PeerKey, SessionKeys};
use crate::tls::ServerTls;

/// What a port demands before NBD: TLS from the first byte, the peer key, or both (TLS
/// first); and the budget of such handshakes.
#[derive(Debug)]
pub(super) struct PortAuth {
    /// The peer key, and where data connections find their session.
    pub(super) key: Option<(PeerKey, Arc<dyn SessionKeys>)>,
    pub(super) tls: Option<ServerTls>,
    handshakes: Arc<Semaphore>,
    per_host: HostCounts,
    /// Connections closed for want of an exchange slot since the last log line.
    closed: AtomicU64,
    last_warn: std::sync::Mutex<std::time::Instant>,
}

/// Key exchanges in progress per IP address.
type HostCounts = Arc<std::sync::Mutex<HashMap<std::net::IpAddr, usize>>>;

/// One key exchange in progress, counted in the port's and its host's budgets until dropped.
#[derive(Debug)]
pub(super) struct Handshake {
    _slot: OwnedSemaphorePermit,
    host: Option<(std::net::IpAddr, HostCounts)>,
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if let Some((ip, map)) = &self.host {
            let mut m = map.locked();
            if let Some(n) = m.get_mut(ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(ip);
                }
            }
        }
    }
}

impl PortAuth {
    /// A guard with room for `handshakes` exchanges at once, and nothing demanded yet.
    pub(super) fn new(handshakes: usize) -> Self {
        Self {
            key: None,
            tls: None,
            handshakes: Arc::new(Semaphore::new(handshakes)),
            per_host: Arc::default(),
            closed: AtomicU64::new(0),
            last_warn: std::sync::Mutex::new(
                std::time::Instant::now()
                    .checked_sub(Duration::from_secs(2))
                    .unwrap_or_else(std::time::Instant::now),
            ),
        }
    }

    /// Log a connection closed for want of an exchange slot: a flood would flood the log
    /// too, so one line a second with the count.
    pub(super) fn report_closed(&self, peer: &str, why: &str) {
        let n = self.closed.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warn.locked();
        if last.elapsed() >= Duration::from_secs(1) {
            *last = std::time::Instant::now();
            self.closed.store(0, Ordering::Relaxed);
            tracing::warn!(%peer, "{why}; closed {n} new connection(s) since the last report");
        }
    }

    /// A place for one more key exchange from `peer` ("ip:port", or a unix socket), or why
    /// there is none.
    pub(super) fn admit(&self, peer: &str, per_host: usize) -> Result<Handshake, &'static str> {
        let slot = self
            .handshakes
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many unauthenticated connections")?;
        let Ok(addr) = peer.parse::<std::net::SocketAddr>() else {
            return Ok(Handshake {
                _slot: slot,
                host: None,
            });
        };
        let ip = addr.ip();
        let mut m = self.per_host.locked();
        let n = m.entry(ip).or_insert(0);
        if *n >= per_host {
            return Err("too many unauthenticated connections from this host");
        }
        *n += 1;
        Ok(Handshake {
            _slot: slot,
            host: Some((ip, self.per_host.clone())),
        })
    }
}
