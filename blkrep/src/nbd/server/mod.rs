//! The NBD server: fixed newstyle negotiation, then many requests in flight per connection.
//!
//! ```text
//!  connection task ──reads──▶ request header (+ write payload)
//!        │ spawn per request (bounded by an in-flight byte budget)
//!        ▼
//!  storage::Backend ──result──▶ reply channel ──▶ writer task ──▶ socket (batched, any order)
//! ```
//!
//! A client that breaks the protocol loses its own connection (with one log line); requests
//! that are merely wrong (out of range, unknown command, too large, write to a read-only
//! export) get the error the protocol names and the connection goes on.
//!
//! One phase per file:
//!
//! ```text
//!   mod           NbdServer, its exports and options; accepting and serving connections
//!   negotiate     the handshake: greeting, then one handler per NBD_OPT_*
//!   transmission  the request loop: check each request, run it against the Backend
//!   reply         simple and structured replies, written in completion order
//!   lockstep      lockstep's extensions: epoch marks, the control option
//! ```
//!
//! lockstep's own additions (epoch marks, the control option) are in `lockstep`; the traits
//! they hand over to ([`EpochSink`], [`ControlHandler`]) are in [`crate::nbd::lockstep`].

mod lockstep;
pub(super) mod negotiate;
pub(super) mod reply;
mod transmission;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use self::negotiate::Negotiated;
use super::guard::{Handshake, PortAuth};
pub use super::lockstep::{ControlHandler, EpochSink};
use super::proto::*;
use super::NbdError;
use crate::auth::{self, Accepted, PeerKey, SessionKeys};
use crate::storage::Backend;
use crate::tls::{self, ServerTls};
use crate::transport::{Listener, ReadHalf, WriteHalf};

/// Largest request payload the server accepts (advertised as NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred request size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Context id for base:allocation.
const BASE_ALLOCATION_ID: u32 = 1;

/// One disk the server offers.
#[derive(Debug, Clone)]
pub struct Export {
    /// Name clients ask for (the first export also answers to "").
    pub name: String,
    /// Free text shown by `nbdinfo`: fixed, or asked for at each listing (a role that
    /// changes, [`Description::live`]).
    pub description: Description,
    /// The disk.
    pub backend: Arc<dyn Backend>,
    /// Refuse writes even if the backend allows them.
    pub read_only: bool,
    /// Where lockstep's epoch marks go (`NBD_CMD_LOCKSTEP_EPOCH`); `None` refuses them.
    pub epochs: Option<Arc<dyn EpochSink>>,
}

impl Export {
    /// A plain export of `backend` under `name`.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Self {
            name: name.into(),
            description: Description::default(),
            backend,
            read_only: false,
            epochs: None,
        }
    }
}

/// An export's description: a fixed text, or one computed whenever a client asks.
#[derive(Clone, Default)]
pub struct Description(Option<Arc<dyn Fn() -> String + Send + Sync>>, String);

impl Description {
    /// A description computed each time a client lists or describes the export.
    pub fn live(f: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)), String::new())
    }

    /// The text now.
    pub fn text(&self) -> String {
        match &self.0 {
            Some(f) => f(),
            None => self.1.clone(),
        }
    }
}

impl From<String> for Description {
    fn from(s: String) -> Self {
        Self(None, s)
    }
}

impl From<&str> for Description {
    fn from(s: &str) -> Self {
        Self(None, s.into())
    }
}

impl std::fmt::Debug for Description {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.text())
    }
}

/// Server tuning knobs.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Time a client has to finish negotiation.
    pub handshake_timeout: Duration,
    /// Bytes of request payload and read data one connection may hold in flight.
    pub inflight_bytes: u32,
    /// Most connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// On an authenticating port: time a peer has to prove its key.
    pub auth_timeout: Duration,
    /// On an authenticating port: most key exchanges at once. They do not count against
    /// `max_connections`, so peers without the key cannot crowd out one that has it.
    pub max_handshakes: usize,
    /// On an authenticating port: most key exchanges at once from one IP address, so one
    /// host cannot take every exchange slot from another.
    pub max_handshakes_per_host: usize,
    /// Answer `NBD_OPT_LIST` with the exports; false lists none (an internal port, whose
    /// exports are still reachable by name).
    pub list_exports: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            inflight_bytes: 128 << 20,
            max_connections: 256,
            auth_timeout: Duration::from_secs(5),
            max_handshakes: 64,
            max_handshakes_per_host: 8,
            list_exports: true,
        }
    }
}

/// Counters of what the server did, for status and tests.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections closed for protocol violations or failed negotiation.
    pub rejected: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

/// An NBD server over a set of exports.
#[derive(Debug)]
pub struct NbdServer {
    exports: Vec<Export>,
    control: Option<Arc<dyn ControlHandler>>,
    opts: ServerOptions,
    stats: ServerStats,
    slots: Arc<Semaphore>,
    auth: Option<PortAuth>,
    /// `NBD_OPT_STARTTLS`, required before any export is named.
    starttls: Option<ServerTls>,
}

impl NbdServer {
    /// A server for `exports` (at least one; names unique).
    pub fn new(exports: Vec<Export>, opts: ServerOptions) -> Result<Self, NbdError> {
        if exports.is_empty() {
            return Err(NbdError::Invalid(
                "a server needs at least one export".into(),
            ));
        }
        let mut seen = HashMap::new();
        for e in &exports {
            if e.name.len() > MAX_STRING || e.name.contains('\0') {
                return Err(NbdError::Invalid(format!(
                    "export name {:?} is not a valid NBD string",
                    e.name
                )));
            }
            if seen.insert(e.name.clone(), ()).is_some() {
                return Err(NbdError::Invalid(format!(
                    "export name {:?} is used twice",
                    e.name
                )));
            }
        }
        let slots = Arc::new(Semaphore::new(opts.max_connections));
        Ok(Self {
            exports,
            control: None,
            opts,
            stats: ServerStats::default(),
            slots,
            auth: None,
            starttls: None,
        })
    }

    /// Accept `NBD_OPT_LOCKSTEP_CONTROL` and hand such connections to `handler`.
    pub fn with_control(mut self, handler: Arc<dyn ControlHandler>) -> Self {
        self.control = Some(handler);
        self
    }

    /// Demand `key` from every peer before NBD ([`crate::auth`]); data connections join the
    /// session `sessions` names.
    pub fn with_auth(mut self, key: PeerKey, sessions: Arc<dyn SessionKeys>) -> Self {
        self.port_auth().key = Some((key, sessions));
        self
    }

    /// Speak TLS from the first byte (the replication port), before the peer key if any.
    pub fn with_tls(mut self, acceptor: ServerTls) -> Self {
        self.port_auth().tls = Some(acceptor);
        self
    }

    /// Offer `NBD_OPT_STARTTLS` and require it before any export is named or described.
    pub fn with_starttls(mut self, acceptor: ServerTls) -> Self {
        self.starttls = Some(acceptor);
        self
    }

    fn port_auth(&mut self) -> &mut PortAuth {
        let handshakes = self.opts.max_handshakes;
        self.auth.get_or_insert_with(|| PortAuth::new(handshakes))
    }

    /// Count and log a connection closed for what its peer did.
    fn reject(&self, peer: &str, why: std::fmt::Arguments<'_>) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%peer, "closing connection: {why}");
    }

    /// What a step under a deadline of `limit` gave; when it failed or was `late`, the
    /// connection is rejected and there is nothing.
    fn in_time<T, E: std::fmt::Display>(
        &self,
        peer: &str,
        r: Result<Result<T, E>, tokio::time::error::Elapsed>,
        late: &str,
        limit: Duration,
    ) -> Option<T> {
        match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.reject(peer, format_args!("{e}"));
                None
            }
            Err(_) => {
                self.reject(
                    peer,
                    format_args!("{late} within {}", crate::units::duration(limit)),
                );
                None
            }
        }
    }

    /// What the server has done so far.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    fn find(&self, name: &str) -> Option<&Export> {
        if name.is_empty() {
            return self.exports.first();
        }
        self.exports.iter().find(|e| e.name == name)
    }

    /// Accept and serve connections until `shutdown` turns true; then stop accepting, let
    /// every connection finish the requests it has in flight, and return.
    pub async fn serve(self: Arc<Self>, listener: Listener, mut shutdown: watch::Receiver<bool>) {
        let mut conns = JoinSet::new();
        let conn_shutdown = shutdown.clone();
        loop {
            tokio::select! {
                _ = stopped(&mut shutdown) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                r = listener.accept() => match r {
                    Ok((rd, wr, peer)) => {
                        let me = self.clone();
                        let sd = conn_shutdown.clone();
                        if let Some(a) = &self.auth {
                            let hs = match a.admit(&peer, self.opts.max_handshakes_per_host) {
                                Ok(hs) => hs,
                                Err(why) => {
                                    a.report_closed(&peer, why);
                                    continue;
                                }
                            };
                            conns.spawn(async move { me.authenticate(rd, wr, peer, sd, hs).await });
                            continue;
                        }
                        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                            tracing::warn!(%peer, "too many connections ({}); closing the new one", self.opts.max_connections);
                            continue;
                        };
                        conns.spawn(async move {
                            me.serve_connection(rd, wr, peer, sd, None).await;
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        while conns.join_next().await.is_some() {}
    }

    /// The TLS handshake and the key exchange of a guarded port, then the connection itself
    /// if the peer passed them. Nothing but those is read before that.
    async fn authenticate(
        self: Arc<Self>,
        rd: ReadHalf,
        wr: WriteHalf,
        peer: String,
        shutdown: watch::Receiver<bool>,
        handshake: Handshake,
    ) {
        let a = self.auth.as_ref().expect("a guarded port");
        let r = tokio::time::timeout(self.opts.auth_timeout, async {
            let (mut rd, mut wr) = match &a.tls {
                Some(t) => tls::accept(t, Vec::new(), rd, wr)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?,
                None => (rd, wr),
            };
            let accepted = match &a.key {
                Some((k, sessions)) => Some(
                    auth::accept(&mut rd, &mut wr, k, &**sessions)
                        .await
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            Ok::<_, String>((rd, wr, accepted))
        })
        .await;
        drop(handshake);
        let late = "no TLS handshake or key proven";
        let Some((rd, wr, accepted)) = self.in_time(&peer, r, late, self.opts.auth_timeout) else {
            return;
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many connections ({}); closing the new one", self.opts.max_connections);
            return;
        };
        self.serve_connection(rd, wr, peer, shutdown, accepted)
            .await;
        drop(slot);
    }

    /// Serve one connection from negotiation to close. Errors are logged, never returned:
    /// one client's trouble is not the server's. `auth` is what the peer proved on an
    /// authenticating port: a control credential opens only the control protocol, a data
    /// credential only transmission, bound to its session.
    pub async fn serve_connection(
        self: Arc<Self>,
        rd: ReadHalf,
        wr: WriteHalf,
        peer: String,
        shutdown: watch::Receiver<bool>,
        auth: Option<Accepted>,
    ) {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let limit = self.opts.handshake_timeout;
        let r = tokio::time::timeout(limit, self.negotiate_all(rd, wr, &peer)).await;
        let late = "negotiation not finished";
        let Some((rd, wr, negotiated)) = self.in_time(&peer, r, late, limit) else {
            return;
        };
        let session = match negotiated {
            Some(Negotiated::Transmission(_)) if matches!(auth, Some(Accepted::Control(_))) => {
                return self.reject(
                    &peer,
                    format_args!("a control-channel credential opened an export"),
                );
            }
            Some(Negotiated::Control) if matches!(auth, Some(Accepted::Data { .. })) => {
                return self.reject(
                    &peer,
                    format_args!("a data-connection credential asked for the control protocol"),
                );
            }
            Some(Negotiated::Transmission(mut s)) => {
                // A replication export may bind each connection to its own session.
                let bound = match auth {
                    Some(Accepted::Data { session }) => Some(session),
                    _ => None,
                };
                if let Some((backend, epochs)) =
                    s.export.epochs.as_ref().and_then(|e| e.connect(bound))
                {
                    s.export.backend = backend;
                    s.export.epochs = Some(epochs);
                }
                s
            }
            Some(Negotiated::Control) => {
                let handler = self
                    .control
                    .clone()
                    .expect("control negotiated only with a handler");
                tracing::debug!(%peer, "connection switched to the control protocol");
                let session = match auth {
                    Some(Accepted::Control(k)) => Some(k),
                    _ => None,
                };
                handler.take_over(rd, wr, peer, session).await;
                return;
            }
            Some(Negotiated::StartTls { .. }) => unreachable!("negotiate_all upgrades"),
            None => {
                tracing::debug!(%peer, "client ended negotiation");
                return;
            }
        };
        tracing::debug!(%peer, export = %session.export.name, structured = session.structured, "client connected");
        match self.transmission(rd, wr, &session, &peer, shutdown).await {
            Ok(()) => tracing::debug!(%peer, "client disconnected"),
            Err(e) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, "closing connection: {e}");
            }
        }
    }
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
