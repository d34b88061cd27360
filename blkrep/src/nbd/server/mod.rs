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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::codec::{self, CodecError, InfoRequest, MetaContextRequest, Request};
use super::guard::{Handshake, PortAuth};
use super::proto::*;
use super::transport::{Listener, ReadHalf, WriteHalf};
use super::{errno_to_nbd, NbdError};
use crate::auth::{self, Accepted, PeerKey, SessionKey, SessionKeys};
use crate::storage::{Backend, IoBuf, StorageError};
use crate::tls::{self, ServerTls};

/// Largest request payload the server accepts (advertised as NBD_INFO_BLOCK_SIZE maximum).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Preferred request size advertised to clients.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Option payloads above this are refused with NBD_REP_ERR_TOO_BIG.
const MAX_OPTION_LEN: u32 = 64 << 10;
/// Option payloads above this are not even read: the connection is closed.
const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// A client may try this many options before it has to pick an export.
const MAX_OPTIONS: usize = 1024;
/// Context id for base:allocation.
const BASE_ALLOCATION_ID: u32 = 1;

/// One disk the server offers.
#[derive(Debug, Clone)]
pub struct Export {
    /// Name clients ask for (the first export also answers to "").
    pub name: String,
    /// Free text shown by `nbdinfo`.
    pub description: String,
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
            description: String::new(),
            backend,
            read_only: false,
            epochs: None,
        }
    }
}

/// Receives lockstep's epoch marks from a replication connection.
///
/// The server calls [`EpochSink::begin_epoch`] only after every earlier request of the same
/// connection has finished, and reads no later request until it returns: the mark is a
/// barrier that cuts the connection's request stream into epochs.
pub trait EpochSink: Send + Sync + std::fmt::Debug {
    /// Requests read from now on belong to `epoch`; `drain` is how long the server waited
    /// for the earlier requests to finish (the stall the mark put on this connection).
    fn begin_epoch(&self, epoch: u64, drain: Duration) -> Result<(), String>;

    /// A backend and epoch sink for one new connection in transmission (None: use the
    /// export's own). The secondary binds each replication connection to the session it
    /// was opened in this way, so that nothing from an interrupted session lands later:
    /// to `session` when the connection proved that session's key ([`crate::auth`]), else
    /// to the session current now.
    fn connect(&self, session: Option<u64>) -> Option<(Arc<dyn Backend>, Arc<dyn EpochSink>)> {
        let _ = session;
        None
    }
}

/// Takes over a connection that asked for lockstep's control protocol
/// (`NBD_OPT_LOCKSTEP_CONTROL`) once the server has acknowledged the option.
pub trait ControlHandler: Send + Sync + std::fmt::Debug {
    /// Run the control protocol on this connection until it ends. `session` is the key
    /// its data connections will prove, when the port authenticates peers.
    fn take_over(
        &self,
        rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        peer: String,
        session: Option<SessionKey>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// How negotiation ended.
enum Negotiated {
    Transmission(Session),
    Control,
    /// STARTTLS was acknowledged: the TLS handshake comes next, then more options.
    StartTls {
        no_zeroes: bool,
    },
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

/// What negotiation settled for the transmission phase.
#[derive(Debug)]
struct Session {
    export: Export,
    structured: bool,
    base_allocation: bool,
    flags: u16,
}

/// One reply on its way to the writer task; the permit returns the byte budget once written.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    body: ReplyBody,
    _permit: Option<OwnedSemaphorePermit>,
}

#[derive(Debug)]
enum ReplyBody {
    Ok,
    Data { offset: u64, buf: IoBuf },
    BlockStatus(Vec<(u32, u32)>),
    Error { errno: u32, message: String },
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
        let (rd, wr, accepted) = match r {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return self.reject(&peer, format_args!("{e}"));
            }
            Err(_) => {
                return self.reject(
                    &peer,
                    format_args!(
                        "no TLS handshake or key proven within {:?}",
                        self.opts.auth_timeout
                    ),
                );
            }
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
        let (rd, wr, negotiated) = match tokio::time::timeout(
            self.opts.handshake_timeout,
            self.negotiate_all(rd, wr, &peer),
        )
        .await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                return self.reject(&peer, format_args!("{e}"));
            }
            Err(_) => {
                return self.reject(
                    &peer,
                    format_args!(
                        "negotiation not finished within {:?}",
                        self.opts.handshake_timeout
                    ),
                );
            }
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

    // -----------------------------------------------------------------------------------------
    // Negotiation

    /// Negotiation to its end, through STARTTLS: after the TLS handshake the options go on
    /// over TLS (the NBD protocol's STARTTLS, as qemu and libnbd clients speak it).
    async fn negotiate_all(
        &self,
        rd: ReadHalf,
        wr: WriteHalf,
        peer: &str,
    ) -> Result<
        (
            BufReader<ReadHalf>,
            BufWriter<WriteHalf>,
            Option<Negotiated>,
        ),
        NbdError,
    > {
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let mut wr = BufWriter::with_capacity(256 << 10, wr);
        let mut tls_on = None;
        loop {
            match self.negotiate(&mut rd, &mut wr, peer, tls_on).await? {
                Some(Negotiated::StartTls { no_zeroes }) => {
                    let acceptor = self
                        .starttls
                        .as_ref()
                        .expect("STARTTLS is acknowledged only when configured");
                    // The client sends its first TLS record only after our ACK; whatever
                    // the buffer holds already belongs to the handshake.
                    let early = rd.buffer().to_vec();
                    let (r, w) = tls::accept(acceptor, early, rd.into_inner(), wr.into_inner())
                        .await
                        .map_err(NbdError::io(format!("TLS handshake with {peer}")))?;
                    rd = BufReader::with_capacity(256 << 10, r);
                    wr = BufWriter::with_capacity(256 << 10, w);
                    tls_on = Some(no_zeroes);
                }
                n => return Ok((rd, wr, n)),
            }
        }
    }

    /// The greeting (unless TLS was just started: `tls_on` holds the client's NO_ZEROES
    /// choice then) and options until one ends negotiation.
    async fn negotiate<R, W>(
        &self,
        rd: &mut R,
        wr: &mut W,
        peer: &str,
        tls_on: Option<bool>,
    ) -> Result<Option<Negotiated>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let io = |what: &str| NbdError::io(format!("negotiation with {peer}: {what}"));
        let proto = |source: CodecError| NbdError::Protocol {
            peer: peer.to_string(),
            source,
        };
        let no_zeroes = match tls_on {
            Some(nz) => nz,
            None => {
                wr.write_all(&codec::encode_greeting(
                    FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
                ))
                .await
                .map_err(io("greeting"))?;
                wr.flush().await.map_err(io("greeting"))?;
                let client_flags = rd.read_u32().await.map_err(io("client flags"))?;
                if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(NbdError::Negotiation {
                        peer: peer.into(),
                        reason: format!("unknown client flags {client_flags:#x}"),
                    });
                }
                if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    return Err(NbdError::Negotiation {
                        peer: peer.into(),
                        reason: "client does not speak fixed newstyle".into(),
                    });
                }
                client_flags & FLAG_C_NO_ZEROES != 0
            }
        };
        let mut structured = false;
        let mut base_allocation = false;
        for _ in 0..MAX_OPTIONS {
            let mut hdr = [0u8; codec::OPTION_HEADER_LEN];
            rd.read_exact(&mut hdr).await.map_err(io("option header"))?;
            let (opt, len) = codec::decode_option_header(&hdr).map_err(proto)?;
            if len > MAX_OPTION_LEN {
                if len > MAX_OPTION_DISCARD {
                    return Err(NbdError::Negotiation {
                        peer: peer.into(),
                        reason: format!("option {opt} with a {len}-byte payload"),
                    });
                }
                tokio::io::copy(&mut rd.take(u64::from(len)), &mut tokio::io::sink())
                    .await
                    .map_err(io("option payload"))?;
                self.reply_err(wr, opt, REP_ERR_TOO_BIG, "option payload too large")
                    .await
                    .map_err(io("reply"))?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data)
                .await
                .map_err(io("option payload"))?;
            let mut out = Vec::new();
            if self.starttls.is_some() && tls_on.is_none() {
                // TLS first: nothing about the exports is told, nothing is served.
                match opt {
                    OPT_STARTTLS | OPT_ABORT => {}
                    OPT_EXPORT_NAME => {
                        return Err(NbdError::Negotiation {
                            peer: peer.into(),
                            reason: "NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server"
                                .into(),
                        })
                    }
                    _ => {
                        self.reply_err(
                            wr,
                            opt,
                            REP_ERR_TLS_REQD,
                            "this server requires TLS: use NBD_OPT_STARTTLS first",
                        )
                        .await
                        .map_err(io("reply"))?;
                        continue;
                    }
                }
            }
            match opt {
                OPT_STARTTLS if self.starttls.is_some() => {
                    let why = if tls_on.is_some() {
                        Some("TLS is already on")
                    } else if !data.is_empty() {
                        Some("NBD_OPT_STARTTLS takes no data")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        self.reply_err(wr, opt, REP_ERR_INVALID, why)
                            .await
                            .map_err(io("reply"))?;
                        continue;
                    }
                    wr.write_all(&codec::encode_option_reply(opt, REP_ACK, &[]))
                        .await
                        .map_err(io("reply"))?;
                    wr.flush().await.map_err(io("reply"))?;
                    return Ok(Some(Negotiated::StartTls { no_zeroes }));
                }
                OPT_EXPORT_NAME => {
                    let name = codec::Reader::new(&data, "NBD_OPT_EXPORT_NAME")
                        .string(data.len())
                        .map_err(proto)?;
                    let Some(export) = self.find(&name).cloned() else {
                        // The protocol has no way to refuse EXPORT_NAME but to hang up.
                        return Err(NbdError::Negotiation {
                            peer: peer.into(),
                            reason: format!("unknown export {name:?}"),
                        });
                    };
                    let flags = transmission_flags(&export, structured);
                    wr.write_all(&codec::encode_export_name_reply(
                        export.backend.size(),
                        flags,
                        no_zeroes,
                    ))
                    .await
                    .map_err(io("reply"))?;
                    wr.flush().await.map_err(io("reply"))?;
                    return Ok(Some(Negotiated::Transmission(Session {
                        export,
                        structured,
                        base_allocation,
                        flags,
                    })));
                }
                OPT_ABORT => {
                    out.extend(codec::encode_option_reply(opt, REP_ACK, &[]));
                    let _ = wr.write_all(&out).await;
                    let _ = wr.flush().await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.reply_err(wr, opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
                            .await
                            .map_err(io("reply"))?;
                        continue;
                    }
                    for e in &self.exports {
                        let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(e.name.as_bytes());
                        d.extend_from_slice(e.description.as_bytes());
                        out.extend(codec::encode_option_reply(opt, REP_SERVER, &d));
                    }
                    out.extend(codec::encode_option_reply(opt, REP_ACK, &[]));
                }
                OPT_INFO | OPT_GO => {
                    let req = match InfoRequest::decode(&data) {
                        Ok(r) => r,
                        Err(e) => {
                            self.reply_err(wr, opt, REP_ERR_INVALID, &e.to_string())
                                .await
                                .map_err(io("reply"))?;
                            continue;
                        }
                    };
                    let Some(export) = self.find(&req.name).cloned() else {
                        self.reply_err(
                            wr,
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("no export named {:?}", req.name),
                        )
                        .await
                        .map_err(io("reply"))?;
                        continue;
                    };
                    let flags = transmission_flags(&export, structured);
                    out.extend(codec::encode_option_reply(
                        opt,
                        REP_INFO,
                        &codec::info_export(export.backend.size(), flags),
                    ));
                    out.extend(codec::encode_option_reply(
                        opt,
                        REP_INFO,
                        &codec::info_block_size(1, PREFERRED_BLOCK, MAX_PAYLOAD),
                    ));
                    if req.requests.contains(&INFO_NAME) {
                        out.extend(codec::encode_option_reply(
                            opt,
                            REP_INFO,
                            &codec::info_string(INFO_NAME, &export.name),
                        ));
                    }
                    if req.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                        out.extend(codec::encode_option_reply(
                            opt,
                            REP_INFO,
                            &codec::info_string(INFO_DESCRIPTION, &export.description),
                        ));
                    }
                    out.extend(codec::encode_option_reply(opt, REP_ACK, &[]));
                    if opt == OPT_GO {
                        wr.write_all(&out).await.map_err(io("reply"))?;
                        wr.flush().await.map_err(io("reply"))?;
                        return Ok(Some(Negotiated::Transmission(Session {
                            export,
                            structured,
                            base_allocation,
                            flags,
                        })));
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.reply_err(
                            wr,
                            opt,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )
                        .await
                        .map_err(io("reply"))?;
                        continue;
                    }
                    structured = true;
                    out.extend(codec::encode_option_reply(opt, REP_ACK, &[]));
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = opt == OPT_SET_META_CONTEXT;
                    if set && !structured {
                        self.reply_err(
                            wr,
                            opt,
                            REP_ERR_INVALID,
                            "negotiate structured replies first",
                        )
                        .await
                        .map_err(io("reply"))?;
                        continue;
                    }
                    let req = match MetaContextRequest::decode(&data) {
                        Ok(r) => r,
                        Err(e) => {
                            self.reply_err(wr, opt, REP_ERR_INVALID, &e.to_string())
                                .await
                                .map_err(io("reply"))?;
                            continue;
                        }
                    };
                    if self.find(&req.name).is_none() {
                        self.reply_err(
                            wr,
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("no export named {:?}", req.name),
                        )
                        .await
                        .map_err(io("reply"))?;
                        continue;
                    }
                    let wanted = req
                        .queries
                        .iter()
                        .any(|q| q == BASE_ALLOCATION || (!set && q == "base:"))
                        || (!set && req.queries.is_empty());
                    if set {
                        base_allocation = wanted;
                    }
                    if wanted {
                        let mut d = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        out.extend(codec::encode_option_reply(opt, REP_META_CONTEXT, &d));
                    }
                    out.extend(codec::encode_option_reply(opt, REP_ACK, &[]));
                }
                OPT_LOCKSTEP_CONTROL if self.control.is_some() => {
                    if !data.is_empty() {
                        self.reply_err(
                            wr,
                            opt,
                            REP_ERR_INVALID,
                            "the control option takes no data",
                        )
                        .await
                        .map_err(io("reply"))?;
                        continue;
                    }
                    wr.write_all(&codec::encode_option_reply(opt, REP_ACK, &[]))
                        .await
                        .map_err(io("reply"))?;
                    wr.flush().await.map_err(io("reply"))?;
                    return Ok(Some(Negotiated::Control));
                }
                other => {
                    let what = match other {
                        OPT_STARTTLS => "TLS is not supported",
                        OPT_EXTENDED_HEADERS => "extended headers are not supported",
                        _ => "unknown option",
                    };
                    self.reply_err(wr, opt, REP_ERR_UNSUP, what)
                        .await
                        .map_err(io("reply"))?;
                    continue;
                }
            }
            wr.write_all(&out).await.map_err(io("reply"))?;
            wr.flush().await.map_err(io("reply"))?;
        }
        Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: format!("more than {MAX_OPTIONS} options"),
        })
    }

    async fn reply_err<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        opt: u32,
        kind: u32,
        msg: &str,
    ) -> std::io::Result<()> {
        wr.write_all(&codec::encode_option_reply(opt, kind, msg.as_bytes()))
            .await?;
        wr.flush().await
    }

    // -----------------------------------------------------------------------------------------
    // Transmission

    async fn transmission(
        &self,
        mut rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        session: &Session,
        peer: &str,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), NbdError> {
        let (tx, rx) = mpsc::unbounded_channel::<Reply>();
        let structured = session.structured;
        let writer = tokio::spawn(write_replies(wr, rx, structured));
        let budget = Arc::new(Semaphore::new(self.opts.inflight_bytes as usize));
        let mut inflight = JoinSet::new();
        let result = loop {
            let mut hdr = [0u8; codec::REQUEST_LEN];
            let read = tokio::select! {
                r = rd.read_exact(&mut hdr) => r,
                _ = stopped(&mut shutdown) => break Ok(()),
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => {
                    break Err(NbdError::Io {
                        context: format!("reading a request from {peer}"),
                        source: e,
                    })
                }
            }
            let req = match Request::decode(&hdr) {
                Ok(r) => r,
                Err(source) => {
                    break Err(NbdError::Protocol {
                        peer: peer.into(),
                        source,
                    })
                }
            };
            if req.command == CMD_DISC {
                break Ok(());
            }
            if req.command == CMD_LOCKSTEP_EPOCH {
                if let Some(sink) = session.export.epochs.as_ref().filter(|_| req.length == 0) {
                    // A barrier: everything read before the mark finishes first.
                    let t = std::time::Instant::now();
                    while inflight.join_next().await.is_some() {}
                    let body = match sink.begin_epoch(req.offset, t.elapsed()) {
                        Ok(()) => ReplyBody::Ok,
                        Err(message) => ReplyBody::Error {
                            errno: EINVAL,
                            message,
                        },
                    };
                    self.stats.requests.fetch_add(1, Ordering::Relaxed);
                    let _ = tx.send(Reply {
                        cookie: req.cookie,
                        body,
                        _permit: None,
                    });
                    continue;
                }
            }
            // Reap finished request tasks so the set does not grow without bound.
            while inflight.try_join_next().is_some() {}
            let cost = request_cost(&req);
            let permit = match budget.clone().acquire_many_owned(cost).await {
                Ok(p) => p,
                Err(_) => break Ok(()),
            };
            // Check what can be checked before taking the payload off the wire.
            if let Err((errno, message)) = self.validate(&req, session) {
                if req.payload_len() > 0 {
                    if let Err(e) = tokio::io::copy(
                        &mut (&mut rd).take(req.payload_len() as u64),
                        &mut tokio::io::sink(),
                    )
                    .await
                    {
                        break Err(NbdError::Io {
                            context: format!("discarding a refused payload from {peer}"),
                            source: e,
                        });
                    }
                }
                let _ = tx.send(Reply {
                    cookie: req.cookie,
                    body: ReplyBody::Error { errno, message },
                    _permit: Some(permit),
                });
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let payload = if req.command == CMD_WRITE {
                let mut buf = IoBuf::zeroed(req.length as usize);
                if let Err(e) = rd.read_exact(&mut buf).await {
                    break Err(NbdError::Io {
                        context: format!("reading a write payload from {peer}"),
                        source: e,
                    });
                }
                Some(buf)
            } else {
                None
            };
            let backend = session.export.backend.clone();
            let tx = tx.clone();
            let base_allocation = session.base_allocation;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            inflight.spawn(async move {
                let body = execute(&*backend, &req, payload, base_allocation).await;
                let _ = tx.send(Reply {
                    cookie: req.cookie,
                    body,
                    _permit: Some(permit),
                });
            });
        };
        // Every request read gets its answer before the connection closes (NBD_CMD_DISC rule).
        while inflight.join_next().await.is_some() {}
        drop(tx);
        match writer.await {
            Ok(Ok(())) => result,
            Ok(Err(e)) => result.and(Err(NbdError::Io {
                context: format!("writing replies to {peer}"),
                source: e,
            })),
            Err(e) => result.and(Err(NbdError::Invalid(format!("reply writer failed: {e}")))),
        }
    }

    /// Protocol-level checks of a request against the negotiated session.
    fn validate(&self, req: &Request, s: &Session) -> Result<(), (u32, String)> {
        let size = s.export.backend.size();
        let writes = matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        let allowed_flags = match req.command {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_FLUSH | CMD_CACHE => 0,
            other => return Err((EINVAL, format!("unknown command {other}"))),
        };
        if req.flags & !allowed_flags != 0 {
            return Err((
                EINVAL,
                format!(
                    "flags {:#x} are not valid for command {}",
                    req.flags, req.command
                ),
            ));
        }
        if req.flags & CMD_FLAG_DF != 0 && !s.structured {
            return Err((EINVAL, "NBD_CMD_FLAG_DF needs structured replies".into()));
        }
        if writes && s.flags & FLAG_READ_ONLY != 0 {
            return Err((EPERM, "the export is read-only".into()));
        }
        if matches!(req.command, CMD_READ | CMD_WRITE) && req.length > MAX_PAYLOAD {
            let e = if req.command == CMD_READ && s.structured {
                EOVERFLOW
            } else {
                EINVAL
            };
            return Err((
                e,
                format!(
                    "request of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
                    req.length
                ),
            ));
        }
        if req.command == CMD_BLOCK_STATUS && (!s.base_allocation || req.length == 0) {
            return Err((
                EINVAL,
                "block status needs base:allocation negotiated and a non-zero length".into(),
            ));
        }
        if req.command != CMD_FLUSH
            && req
                .offset
                .checked_add(u64::from(req.length))
                .is_none_or(|end| end > size)
        {
            let e = if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) {
                ENOSPC
            } else {
                EINVAL
            };
            return Err((
                e,
                format!(
                    "offset {} + length {} is beyond the export size {size}",
                    req.offset, req.length
                ),
            ));
        }
        Ok(())
    }
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Budget units a request holds until its reply is written: payload or read data, and at
/// least one unit so that even empty requests are bounded.
/// What one request may hold of the connection's byte budget until its reply is written:
/// its data, and at least [`REQUEST_OVERHEAD`] for the request itself and an error reply's
/// message, so that a client that sends refused requests and reads no replies runs out of
/// budget (and waits) long before the server runs out of memory.
fn request_cost(req: &Request) -> u32 {
    let bytes = match req.command {
        CMD_READ | CMD_WRITE => req.length.min(MAX_PAYLOAD),
        _ => 0,
    };
    bytes.max(REQUEST_OVERHEAD)
}

/// The least a request costs in the in-flight budget (its reply, an error message).
const REQUEST_OVERHEAD: u32 = 512;

fn transmission_flags(e: &Export, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_CACHE;
    if e.read_only || e.backend.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        // Every connection shares one backend whose flush covers every completed write, so a
        // flush on any connection is a flush for all: multi-conn is honest.
        f |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_CAN_MULTI_CONN;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

fn storage_error(e: &StorageError) -> ReplyBody {
    ReplyBody::Error {
        errno: errno_to_nbd(e.errno()),
        message: e.to_string(),
    }
}

async fn execute(
    b: &dyn Backend,
    req: &Request,
    payload: Option<IoBuf>,
    base_allocation: bool,
) -> ReplyBody {
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let len = u64::from(req.length);
    let r = match req.command {
        CMD_READ => {
            return match b.read_at(req.offset, req.length as usize).await {
                Ok(buf) => ReplyBody::Data {
                    offset: req.offset,
                    buf,
                },
                Err(e) => storage_error(&e),
            }
        }
        CMD_WRITE => {
            b.write_at(req.offset, payload.expect("write payload"), fua)
                .await
        }
        CMD_FLUSH => b.flush().await,
        CMD_TRIM => b.discard(req.offset, len).await,
        CMD_WRITE_ZEROES => {
            b.write_zeroes(req.offset, len, req.flags & CMD_FLAG_NO_HOLE == 0)
                .await
        }
        CMD_CACHE => Ok(()),
        CMD_BLOCK_STATUS if base_allocation => {
            return match b.block_status(req.offset, len).await {
                Ok(ext) => ReplyBody::BlockStatus(status_descriptors(
                    &ext,
                    len,
                    req.flags & CMD_FLAG_REQ_ONE != 0,
                )),
                Err(e) => storage_error(&e),
            }
        }
        _ => {
            return ReplyBody::Error {
                errno: EINVAL,
                message: "unsupported command".into(),
            }
        }
    };
    match r {
        // FUA on discard and zeroing: make it durable the same way as a write.
        Ok(()) if fua && matches!(req.command, CMD_TRIM | CMD_WRITE_ZEROES) => {
            match b.flush().await {
                Ok(()) => ReplyBody::Ok,
                Err(e) => storage_error(&e),
            }
        }
        Ok(()) => ReplyBody::Ok,
        Err(e) => storage_error(&e),
    }
}

/// base:allocation descriptors for extents, clipped to the request and to u32 lengths.
fn status_descriptors(ext: &[crate::storage::Extent], len: u64, one: bool) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut left = len;
    for e in ext {
        let mut n = e.len.min(left);
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        while n > 0 {
            // Keep descriptors block-sized so clients with alignment needs are happy.
            let piece = n.min(u64::from(u32::MAX - 4095));
            out.push((piece as u32, flags));
            n -= piece;
            left -= piece;
        }
        if left == 0 || (one && !out.is_empty()) {
            break;
        }
    }
    if out.is_empty() {
        out.push((len.min(u64::from(u32::MAX - 4095)) as u32, 0));
    }
    if one {
        out.truncate(1);
    }
    out
}

/// Write replies as they come, batching whatever is ready into one flush.
async fn write_replies(
    mut wr: BufWriter<WriteHalf>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
) -> std::io::Result<()> {
    let mut hdr = Vec::with_capacity(64);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            hdr.clear();
            let data = encode_reply(&mut hdr, &reply, structured);
            wr.write_all(&hdr).await?;
            if let Some(d) = data {
                wr.write_all(d).await?;
            }
            drop(reply);
            next = rx.try_recv().ok();
        }
        wr.flush().await?;
    }
    wr.flush().await
}

/// Encode a reply's header (and small payloads) into `hdr`; return read data to send after it.
fn encode_reply<'a>(hdr: &mut Vec<u8>, reply: &'a Reply, structured: bool) -> Option<&'a [u8]> {
    let cookie = reply.cookie;
    match (&reply.body, structured) {
        (ReplyBody::Ok, false) => codec::encode_simple_reply(hdr, 0, cookie),
        (ReplyBody::Ok, true) => {
            codec::encode_chunk_header(hdr, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
        }
        (ReplyBody::Data { buf, .. }, false) => {
            codec::encode_simple_reply(hdr, 0, cookie);
            return Some(buf);
        }
        (ReplyBody::Data { offset, buf }, true) => {
            codec::encode_chunk_header(
                hdr,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                cookie,
                8 + buf.len() as u32,
            );
            hdr.extend_from_slice(&offset.to_be_bytes());
            return Some(buf);
        }
        (ReplyBody::BlockStatus(d), _) => {
            codec::encode_chunk_header(
                hdr,
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                cookie,
                4 + 8 * d.len() as u32,
            );
            codec::encode_block_status(hdr, BASE_ALLOCATION_ID, d);
        }
        (ReplyBody::Error { errno, .. }, false) => codec::encode_simple_reply(hdr, *errno, cookie),
        (ReplyBody::Error { errno, message }, true) => {
            codec::encode_error_chunk(hdr, cookie, *errno, message)
        }
    }
    None
}
