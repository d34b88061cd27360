//! An asynchronous, pipelined NBD client.
//!
//! Any number of tasks may issue requests at once; each gets a fresh cookie, the request goes
//! out under a short writer lock, and one reader task matches replies (in any order, simple or
//! structured) to their requests. The client implements [`Backend`], so a remote export can
//! stand wherever a local disk can, and the storage test suite runs against it.
//!
//! ```text
//!  task A ─┐ write(req A) ┌──────────┐          ┌────────────┐
//!  task B ─┼─────────────▶│  socket  │─────────▶│ NBD server │
//!  task C ─┘              └──────────┘◀─────────└────────────┘
//!     ▲  oneshot per cookie     │ replies in any order
//!     └──────── reader task ◀───┘
//! ```

use crate::sync::Locked;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::oneshot;

use super::codec::{self, Info, InfoRequest, MetaContextRequest, ReplyHeader, Request};
use super::proto::*;
use super::transport::{self, Endpoint, ReadHalf, WriteHalf};
use super::{errno_name, NbdError};
use crate::auth::{Credential, PeerKey, SessionKey};
use crate::storage::{self, Backend, Extent, IoBuf, IoFuture, Op, StorageError};
use crate::tls::ClientTls;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Export name ("" for the server's default).
    pub export: String,
    /// Ask for structured replies (and base:allocation).
    pub structured: bool,
    /// Give up on negotiation after this long.
    pub connect_timeout: Duration,
    /// Fail a request that gets no reply in this long (None: wait forever).
    pub request_timeout: Option<Duration>,
    /// Prove this session key before NBD: a data connection to an authenticating
    /// secondary ([`crate::auth`]).
    pub session: Option<SessionKey>,
    /// Speak TLS from the first byte (a secondary's replication port with certificates).
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            export: String::new(),
            structured: true,
            connect_timeout: Duration::from_secs(10),
            request_timeout: None,
            session: None,
            tls: None,
        }
    }
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest payload per request.
    pub max_payload: u32,
    /// Structured replies are on.
    pub structured: bool,
    /// The base:allocation context id, when negotiated.
    pub base_allocation: Option<u32>,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct NbdClient {
    shared: Arc<Shared>,
    info: ExportInfo,
}

/// A request already on the wire; [`Ticket::wait`] waits for its reply. Dropping a ticket
/// forgets the reply (the request still runs on the server).
#[derive(Debug)]
pub struct Ticket {
    shared: Arc<Shared>,
    cookie: u64,
    command: u16,
    offset: u64,
    rx: oneshot::Receiver<Result<Outcome, NbdError>>,
}

impl Ticket {
    /// Wait for the reply; an error reply becomes [`NbdError::Request`].
    pub async fn wait(self) -> Result<(), NbdError> {
        self.outcome().await.map(drop)
    }

    async fn outcome(self) -> Result<Outcome, NbdError> {
        let Ticket {
            shared,
            cookie,
            command,
            offset,
            rx,
        } = self;
        let answer = match shared.request_timeout {
            Some(t) => match tokio::time::timeout(t, rx).await {
                Ok(a) => a,
                Err(_) => {
                    shared.table().map.remove(&cookie);
                    return Err(NbdError::Timeout(format!(
                        "{} at {offset} on {}",
                        command_name(command),
                        shared.peer
                    )));
                }
            },
            None => rx.await,
        };
        let p = answer.map_err(|_| NbdError::Closed {
            peer: shared.peer.clone(),
            reason: None,
        })??;
        if let Some((errno, message)) = &p.error {
            return Err(NbdError::Request {
                command: command_name(p.command),
                offset: p.offset,
                length: u64::from(p.length),
                errno: *errno,
                message: if message.is_empty() {
                    errno_name(*errno).to_string()
                } else {
                    message.clone()
                },
            });
        }
        Ok(p)
    }
}

/// A reply in the making.
#[derive(Debug)]
struct Outcome {
    command: u16,
    offset: u64,
    length: u32,
    data: Option<IoBuf>,
    status: Vec<(u32, u32)>,
    error: Option<(u32, String)>,
}

#[derive(Debug)]
struct Pending {
    outcome: Outcome,
    done: oneshot::Sender<Result<Outcome, NbdError>>,
}

struct Shared {
    peer: String,
    writer: tokio::sync::Mutex<BufWriter<WriteHalf>>,
    pending: Mutex<PendingTable>,
    next_cookie: AtomicU64,
    request_timeout: Option<Duration>,
}

#[derive(Debug, Default)]
struct PendingTable {
    map: HashMap<u64, Pending>,
    /// Set once the reader has stopped: why the connection is gone.
    closed: Option<String>,
}

fn command_name(c: u16) -> &'static str {
    match c {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        CMD_LOCKSTEP_EPOCH => "epoch-mark",
        _ => "command",
    }
}

impl NbdClient {
    /// Connect to `ep` and negotiate `opts.export`.
    pub async fn connect(ep: &Endpoint, opts: &ClientOptions) -> Result<Self, NbdError> {
        let peer = ep.to_string();
        let fut = async {
            let (rd, wr) = secure_connect(ep, opts.tls.as_ref(), &peer).await?;
            let mut rd = BufReader::with_capacity(256 << 10, rd);
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            if let Some(k) = &opts.session {
                authenticate(&mut rd, &mut wr, Credential::Data(k), &peer).await?;
            }
            let info = negotiate(&mut rd, &mut wr, &peer, opts).await?;
            Ok::<_, NbdError>((rd, wr, info))
        };
        let (rd, wr, info) = tokio::time::timeout(opts.connect_timeout, fut)
            .await
            .map_err(|_| NbdError::Timeout(format!("connecting to {peer}")))??;
        let shared = Arc::new(Shared {
            peer,
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(PendingTable::default()),
            next_cookie: AtomicU64::new(1),
            request_timeout: opts.request_timeout,
        });
        tokio::spawn(read_replies(rd, shared.clone()));
        Ok(Self { shared, info })
    }

    /// What the server said about the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    /// Whether the server accepts FUA.
    pub fn can_fua(&self) -> bool {
        self.has(FLAG_SEND_FUA)
    }

    /// Whether the connection has failed or been closed.
    pub fn is_closed(&self) -> bool {
        self.shared.table().closed.is_some()
    }

    async fn request(
        &self,
        req: Request,
        payload: Option<&[u8]>,
        data: Option<IoBuf>,
    ) -> Result<Outcome, NbdError> {
        self.submit(req, payload, data, true).await?.outcome().await
    }

    /// Put a request on the wire (or, without `flush`, into the send buffer) and return
    /// without waiting for its reply. Requests submitted one after another by the same task
    /// reach the server in that order.
    async fn submit(
        &self,
        mut req: Request,
        payload: Option<&[u8]>,
        data: Option<IoBuf>,
        flush: bool,
    ) -> Result<Ticket, NbdError> {
        let cookie = self.shared.next_cookie.fetch_add(1, Ordering::Relaxed);
        req.cookie = cookie;
        let (tx, rx) = oneshot::channel();
        {
            let mut t = self.shared.table();
            if let Some(reason) = &t.closed {
                return Err(NbdError::Closed {
                    peer: self.shared.peer.clone(),
                    reason: Some(reason.clone()),
                });
            }
            let outcome = Outcome {
                command: req.command,
                offset: req.offset,
                length: req.length,
                data,
                status: Vec::new(),
                error: None,
            };
            let p = Pending { outcome, done: tx };
            t.map.insert(cookie, p);
        }
        let mut hdr = Vec::with_capacity(codec::REQUEST_LEN);
        req.encode(&mut hdr);
        let sent = async {
            let mut w = self.shared.writer.lock().await;
            w.write_all(&hdr).await?;
            if let Some(p) = payload {
                w.write_all(p).await?;
            }
            if flush {
                w.flush().await?;
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = sent {
            self.shared.table().map.remove(&cookie);
            return Err(NbdError::Io {
                context: format!(
                    "sending {} to {}",
                    command_name(req.command),
                    self.shared.peer
                ),
                source: e,
            });
        }
        Ok(Ticket {
            shared: self.shared.clone(),
            cookie,
            command: req.command,
            offset: req.offset,
            rx,
        })
    }

    /// Submit a write without waiting for its reply (see [`Ticket`]). Like every `submit_*`
    /// call it only buffers the request: [`NbdClient::send_submitted`] puts the batch on the
    /// wire, and a ticket waited on before that waits forever.
    pub async fn submit_write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<Ticket, NbdError> {
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Invalid("write larger than 4 GiB".into()))?;
        let flags = if fua { self.fua_flag()? } else { 0 };
        self.submit(
            Self::req(CMD_WRITE, flags, offset, len),
            Some(data),
            None,
            false,
        )
        .await
    }

    /// Submit a trim without waiting for its reply.
    pub async fn submit_trim(&self, offset: u64, len: u32, fua: bool) -> Result<Ticket, NbdError> {
        self.check(offset, u64::from(len))?;
        self.need(FLAG_SEND_TRIM, "trim")?;
        let flags = if fua { self.fua_flag()? } else { 0 };
        self.submit(Self::req(CMD_TRIM, flags, offset, len), None, None, false)
            .await
    }

    /// Submit a write-zeroes without waiting for its reply.
    pub async fn submit_write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_unmap: bool,
        fua: bool,
    ) -> Result<Ticket, NbdError> {
        self.check(offset, u64::from(len))?;
        self.need(FLAG_SEND_WRITE_ZEROES, "write-zeroes")?;
        let mut flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        if fua {
            flags |= self.fua_flag()?;
        }
        self.submit(
            Self::req(CMD_WRITE_ZEROES, flags, offset, len),
            None,
            None,
            false,
        )
        .await
    }

    /// Submit a flush without waiting for its reply.
    pub async fn submit_flush(&self) -> Result<Ticket, NbdError> {
        self.need(FLAG_SEND_FLUSH, "flush")?;
        self.submit(Self::req(CMD_FLUSH, 0, 0, 0), None, None, false)
            .await
    }

    /// Submit lockstep's epoch mark (a lockstep extension, see `docs/protocol.md`): every
    /// request sent before it belongs to the epoch before `epoch`. Its reply arrives once
    /// the server has finished every earlier request of this connection.
    pub async fn submit_epoch_mark(&self, epoch: u64) -> Result<Ticket, NbdError> {
        self.submit(
            Self::req(CMD_LOCKSTEP_EPOCH, 0, epoch, 0),
            None,
            None,
            false,
        )
        .await
    }

    /// Push requests submitted with the `submit_*` calls onto the wire. Those calls only
    /// buffer (so that a batch of requests costs one system call): call this after a batch.
    pub async fn send_submitted(&self) -> Result<(), NbdError> {
        let mut w = self.shared.writer.lock().await;
        w.flush().await.map_err(|e| NbdError::Io {
            context: format!("sending requests to {}", self.shared.peer),
            source: e,
        })
    }

    fn fua_flag(&self) -> Result<u16, NbdError> {
        self.need(FLAG_SEND_FUA, "FUA").map(|()| CMD_FLAG_FUA)
    }

    fn need(&self, flag: u16, what: &str) -> Result<(), NbdError> {
        if self.has(flag) {
            Ok(())
        } else {
            Err(NbdError::Invalid(format!(
                "{} does not support {what}",
                self.shared.peer
            )))
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        if offset.checked_add(len).is_none_or(|e| e > self.info.size) {
            return Err(NbdError::Invalid(format!(
                "offset {offset} + length {len} is beyond the export size {}",
                self.info.size
            )));
        }
        Ok(())
    }

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 0,
            offset,
            length,
        }
    }

    /// Read `len` bytes (at most the server's maximum payload) at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, NbdError> {
        self.check(offset, u64::from(len))?;
        let p = self
            .request(
                Self::req(CMD_READ, 0, offset, len),
                None,
                Some(IoBuf::zeroed(len as usize)),
            )
            .await?;
        Ok(p.data.expect("read keeps its buffer"))
    }

    /// Write `data` at `offset`; with `fua`, durable on the server when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Invalid("write larger than 4 GiB".into()))?;
        let flags = if fua && self.can_fua() {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.request(Self::req(CMD_WRITE, flags, offset, len), Some(data), None)
            .await?;
        if fua && !self.can_fua() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Ask the server to make every completed write durable.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(Self::req(CMD_FLUSH, 0, 0, 0), None, None)
            .await
            .map(drop)
    }

    /// Discard a range.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        self.check(offset, u64::from(len))?;
        if !self.has(FLAG_SEND_TRIM) {
            return Err(NbdError::Invalid(format!(
                "{} does not support trim",
                self.shared.peer
            )));
        }
        let flags = if fua && self.can_fua() {
            CMD_FLAG_FUA
        } else {
            0
        };
        self.request(Self::req(CMD_TRIM, flags, offset, len), None, None)
            .await
            .map(drop)
    }

    /// Zero a range; with `may_unmap`, the server may deallocate it.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), NbdError> {
        self.check(offset, u64::from(len))?;
        if !self.has(FLAG_SEND_WRITE_ZEROES) {
            return Err(NbdError::Invalid(format!(
                "{} does not support write-zeroes",
                self.shared.peer
            )));
        }
        let mut flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        if fua && self.can_fua() {
            flags |= CMD_FLAG_FUA;
        }
        self.request(Self::req(CMD_WRITE_ZEROES, flags, offset, len), None, None)
            .await
            .map(drop)
    }

    /// base:allocation extents from `offset`: (length, NBD_STATE_* flags).
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, NbdError> {
        self.check(offset, u64::from(len))?;
        if self.info.base_allocation.is_none() {
            return Err(NbdError::Invalid(
                "base:allocation was not negotiated".into(),
            ));
        }
        let p = self
            .request(Self::req(CMD_BLOCK_STATUS, 0, offset, len), None, None)
            .await?;
        Ok(p.status)
    }

    /// Send NBD_CMD_DISC once every earlier request has been answered, and close.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let mut hdr = Vec::new();
        Self::req(CMD_DISC, 0, 0, 0).encode(&mut hdr);
        let mut w = self.shared.writer.lock().await;
        w.write_all(&hdr)
            .await
            .map_err(NbdError::io("sending disconnect"))?;
        w.flush()
            .await
            .map_err(NbdError::io("sending disconnect"))?;
        let _ = w.shutdown().await;
        Ok(())
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn table(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.pending.locked()
    }
}

/// List the exports of a server (NBD_OPT_LIST).
pub async fn list_exports(ep: &Endpoint) -> Result<Vec<String>, NbdError> {
    let peer = ep.to_string();
    let (rd, wr) = transport::connect(ep).await?;
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);
    let no_zeroes = greet(&mut rd, &mut wr, &peer).await?;
    let _ = no_zeroes;
    send_option(&mut wr, OPT_LIST, &[]).await?;
    let mut names = Vec::new();
    loop {
        let (kind, data) = read_option_reply(&mut rd, OPT_LIST, &peer).await?;
        match kind {
            REP_ACK => break,
            REP_SERVER => {
                let mut r = codec::Reader::new(&data, "NBD_REP_SERVER");
                names.push(r.lstring().map_err(|source| NbdError::Protocol {
                    peer: peer.clone(),
                    source,
                })?);
            }
            k if is_rep_err(k) => return Err(negotiation_refused(&peer, "NBD_OPT_LIST", k, &data)),
            _ => {}
        }
    }
    send_option(&mut wr, OPT_ABORT, &[]).await?;
    Ok(names)
}

async fn greet(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    peer: &str,
) -> Result<bool, NbdError> {
    let mut g = [0u8; codec::GREETING_LEN];
    rd.read_exact(&mut g).await.map_err(|e| {
        if let Some(reason) = crate::tls::refusal(&e) {
            return NbdError::Negotiation {
                peer: peer.into(),
                reason,
            };
        }
        let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            " (the server closed the connection before greeting us: does it require TLS, --tls-cert/--tls-key/--tls-ca?)"
        } else {
            ""
        };
        NbdError::Io {
            context: format!("reading the greeting of {peer}{hint}"),
            source: e,
        }
    })?;
    if g.starts_with(&crate::auth::MAGIC) {
        return Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: "the server asks for a lockstep peer key first (a secondary run with --psk-file): give this node the same --psk-file".into(),
        });
    }
    let flags = codec::decode_greeting(&g).map_err(|source| NbdError::Protocol {
        peer: peer.into(),
        source,
    })?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: "server does not speak fixed newstyle".into(),
        });
    }
    let no_zeroes = flags & FLAG_NO_ZEROES != 0;
    let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
    wr.write_all(&cflags.to_be_bytes())
        .await
        .map_err(NbdError::io("sending client flags"))?;
    Ok(no_zeroes)
}

async fn send_option(wr: &mut BufWriter<WriteHalf>, opt: u32, data: &[u8]) -> Result<(), NbdError> {
    wr.write_all(&codec::encode_option(opt, data))
        .await
        .map_err(NbdError::io("sending an option"))?;
    wr.flush().await.map_err(NbdError::io("sending an option"))
}

async fn read_option_reply(
    rd: &mut BufReader<ReadHalf>,
    opt: u32,
    peer: &str,
) -> Result<(u32, Vec<u8>), NbdError> {
    let proto = |source| NbdError::Protocol {
        peer: peer.into(),
        source,
    };
    let mut h = [0u8; codec::OPTION_REPLY_HEADER_LEN];
    rd.read_exact(&mut h)
        .await
        .map_err(NbdError::io(format!("reading an option reply from {peer}")))?;
    let (o, kind, len) = codec::decode_option_reply_header(&h).map_err(proto)?;
    if o != opt {
        return Err(proto(codec::CodecError::Invalid(format!(
            "reply for option {o}, expected {opt}"
        ))));
    }
    if len > 1 << 20 {
        return Err(proto(codec::CodecError::Invalid(format!(
            "option reply of {len} bytes"
        ))));
    }
    let mut data = vec![0u8; len as usize];
    rd.read_exact(&mut data)
        .await
        .map_err(NbdError::io(format!("reading an option reply from {peer}")))?;
    Ok((kind, data))
}

fn negotiation_refused(peer: &str, what: &str, kind: u32, data: &[u8]) -> NbdError {
    let name = match kind {
        REP_ERR_UNSUP => "unsupported",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid",
        REP_ERR_UNKNOWN => "unknown export",
        REP_ERR_TLS_REQD => "TLS required",
        REP_ERR_BLOCK_SIZE_REQD => "block size required",
        REP_ERR_SHUTDOWN => "server shutting down",
        _ => "error",
    };
    let msg = String::from_utf8_lossy(data);
    NbdError::Negotiation {
        peer: peer.into(),
        reason: format!(
            "{what}: {name}{}",
            if msg.is_empty() {
                String::new()
            } else {
                format!(" ({msg})")
            }
        ),
    }
}

async fn negotiate(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    peer: &str,
    opts: &ClientOptions,
) -> Result<ExportInfo, NbdError> {
    let proto = |source| NbdError::Protocol {
        peer: peer.into(),
        source,
    };
    let no_zeroes = greet(rd, wr, peer).await?;
    let mut info = ExportInfo {
        size: 0,
        flags: 0,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
        structured: false,
        base_allocation: None,
    };
    if opts.structured {
        send_option(wr, OPT_STRUCTURED_REPLY, &[]).await?;
        let (kind, _) = read_option_reply(rd, OPT_STRUCTURED_REPLY, peer).await?;
        info.structured = kind == REP_ACK;
        if info.structured {
            let q = MetaContextRequest {
                name: opts.export.clone(),
                queries: vec![BASE_ALLOCATION.into()],
            };
            send_option(wr, OPT_SET_META_CONTEXT, &q.encode()).await?;
            loop {
                let (kind, data) = read_option_reply(rd, OPT_SET_META_CONTEXT, peer).await?;
                match kind {
                    REP_META_CONTEXT
                        if data.len() >= 4 && &data[4..] == BASE_ALLOCATION.as_bytes() =>
                    {
                        info.base_allocation =
                            Some(u32::from_be_bytes(data[..4].try_into().expect("4 bytes")));
                    }
                    REP_ACK => break,
                    k if is_rep_err(k) => break,
                    _ => {}
                }
            }
        }
    }
    let go = InfoRequest {
        name: opts.export.clone(),
        requests: vec![INFO_BLOCK_SIZE],
    };
    send_option(wr, OPT_GO, &go.encode()).await?;
    let mut got_export = false;
    loop {
        let (kind, data) = read_option_reply(rd, OPT_GO, peer).await?;
        match kind {
            REP_ACK => break,
            REP_INFO => match Info::decode(&data).map_err(proto)? {
                Info::Export { size, flags } => {
                    (info.size, info.flags) = (size, flags);
                    got_export = true;
                }
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => {
                    (info.min_block, info.preferred_block, info.max_payload) =
                        (min.max(1), preferred.max(1), max.max(1));
                }
                _ => {}
            },
            REP_ERR_UNSUP => {
                // A server without NBD_OPT_GO: fall back to NBD_OPT_EXPORT_NAME.
                send_option(wr, OPT_EXPORT_NAME, opts.export.as_bytes()).await?;
                let mut b = vec![0u8; if no_zeroes { 10 } else { 134 }];
                rd.read_exact(&mut b)
                    .await
                    .map_err(NbdError::io(format!("reading export info from {peer}")))?;
                info.size = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
                info.flags = u16::from_be_bytes(b[8..10].try_into().expect("2 bytes"));
                got_export = true;
                break;
            }
            k if is_rep_err(k) => {
                return Err(negotiation_refused(
                    peer,
                    &format!("export {:?}", opts.export),
                    k,
                    &data,
                ))
            }
            _ => {}
        }
    }
    if !got_export {
        return Err(NbdError::Negotiation {
            peer: peer.into(),
            reason: "server finished NBD_OPT_GO without export information".into(),
        });
    }
    Ok(info)
}

/// The reader task: match every reply to its request until the connection ends.
async fn read_replies(mut rd: BufReader<ReadHalf>, shared: Arc<Shared>) {
    let reason = match reply_loop(&mut rd, &shared).await {
        Ok(()) => "closed by the server".to_string(),
        Err(e) => e.to_string(),
    };
    let mut t = shared.table();
    t.closed = Some(reason.clone());
    for (_, p) in t.map.drain() {
        let _ = p.done.send(Err(NbdError::Closed {
            peer: shared.peer.clone(),
            reason: Some(reason.clone()),
        }));
    }
}

async fn reply_loop(rd: &mut BufReader<ReadHalf>, shared: &Shared) -> Result<(), NbdError> {
    let peer = shared.peer.as_str();
    let io = || NbdError::io(format!("reading a reply from {peer}"));
    let proto = |source| NbdError::Protocol {
        peer: peer.into(),
        source,
    };
    let bad = |m: String| NbdError::Protocol {
        peer: peer.into(),
        source: codec::CodecError::Invalid(m),
    };
    loop {
        let mut h = [0u8; codec::CHUNK_HEADER_LEN];
        match rd.read_exact(&mut h[..4]).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io()(e)),
        }
        let n = ReplyHeader::len_for_magic(h[..4].try_into().expect("4 bytes")).map_err(proto)?;
        rd.read_exact(&mut h[4..n]).await.map_err(io())?;
        let hdr = ReplyHeader::decode(&h[..n]).map_err(proto)?;
        let cookie = hdr.cookie();
        // Take the request out while its payload is read; put it back if more chunks follow.
        let mut pending = shared
            .table()
            .map
            .remove(&cookie)
            .ok_or_else(|| bad(format!("reply for unknown cookie {cookie}")))?;
        let p = &mut pending.outcome;
        let done = match hdr {
            ReplyHeader::Simple { error, .. } => {
                if error != 0 {
                    p.error = Some((error, String::new()));
                } else if p.command == CMD_READ {
                    let buf = p.data.as_mut().expect("read buffer");
                    rd.read_exact(buf).await.map_err(io())?;
                }
                true
            }
            ReplyHeader::Chunk {
                flags,
                kind,
                length,
                ..
            } => {
                match kind {
                    REPLY_TYPE_NONE if length == 0 => {}
                    REPLY_TYPE_OFFSET_DATA if p.command == CMD_READ && length >= 8 => {
                        let off = rd.read_u64().await.map_err(io())?;
                        let n = u64::from(length - 8);
                        let rel = off
                            .checked_sub(p.offset)
                            .filter(|r| r + n <= u64::from(p.length))
                            .ok_or_else(|| {
                                bad(format!("read chunk at {off}+{n} outside the request"))
                            })?;
                        let buf = p.data.as_mut().expect("read buffer");
                        rd.read_exact(&mut buf[rel as usize..(rel + n) as usize])
                            .await
                            .map_err(io())?;
                    }
                    REPLY_TYPE_OFFSET_HOLE if p.command == CMD_READ && length == 12 => {
                        let off = rd.read_u64().await.map_err(io())?;
                        let n = u64::from(rd.read_u32().await.map_err(io())?);
                        let rel = off
                            .checked_sub(p.offset)
                            .filter(|r| r + n <= u64::from(p.length))
                            .ok_or_else(|| {
                                bad(format!("hole chunk at {off}+{n} outside the request"))
                            })?;
                        p.data.as_mut().expect("read buffer")[rel as usize..(rel + n) as usize]
                            .fill(0);
                    }
                    REPLY_TYPE_BLOCK_STATUS
                        if p.command == CMD_BLOCK_STATUS && length <= 1 << 20 =>
                    {
                        let mut b = vec![0u8; length as usize];
                        rd.read_exact(&mut b).await.map_err(io())?;
                        p.status = codec::decode_block_status(&b).map_err(proto)?.1;
                    }
                    k if k & (1 << 15) != 0 && (6..=1 << 20).contains(&length) => {
                        let mut b = vec![0u8; length as usize];
                        rd.read_exact(&mut b).await.map_err(io())?;
                        let (errno, msg) = codec::decode_error_chunk(&b).map_err(proto)?;
                        p.error = Some((if errno == 0 { EIO } else { errno }, msg));
                    }
                    k => {
                        return Err(bad(format!(
                            "unexpected reply chunk type {k} (length {length}) for {}",
                            command_name(p.command)
                        )))
                    }
                }
                flags & REPLY_FLAG_DONE != 0
            }
        };
        if done {
            let _ = pending.done.send(Ok(pending.outcome));
        } else {
            shared.table().map.insert(cookie, pending);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A remote export as a storage backend.

fn to_storage(op: Op, offset: u64, len: u64, e: NbdError) -> StorageError {
    let errno = match &e {
        NbdError::Request { errno, .. } => *errno as i32,
        NbdError::Closed { .. } => libc::ESHUTDOWN,
        NbdError::Timeout(_) => libc::ETIMEDOUT,
        _ => libc::EIO,
    };
    StorageError::Io {
        op,
        path: "nbd".into(),
        offset,
        len,
        source: std::io::Error::new(
            std::io::Error::from_raw_os_error(errno).kind(),
            e.to_string(),
        ),
    }
}

impl NbdClient {
    fn chunks(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = u64::from(self.info.max_payload.min(32 << 20));
        let end = offset + len;
        (0..)
            .map(move |i| offset + i * max)
            .take_while(move |&o| o < end)
            .map(move |o| (o, (end - o).min(max) as u32))
    }
}

impl Backend for NbdClient {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn alignment(&self) -> u32 {
        self.info.min_block
    }

    fn read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            storage::check_range(
                Op::Read,
                offset,
                len as u64,
                self.info.size,
                self.info.min_block,
            )?;
            if len as u64 <= u64::from(self.info.max_payload) {
                return self
                    .read(offset, len as u32)
                    .await
                    .map_err(|e| to_storage(Op::Read, offset, len as u64, e));
            }
            let mut out = IoBuf::zeroed(len);
            for (o, n) in self.chunks(offset, len as u64) {
                let b = self
                    .read(o, n)
                    .await
                    .map_err(|e| to_storage(Op::Read, o, n.into(), e))?;
                let at = (o - offset) as usize;
                out[at..at + n as usize].copy_from_slice(&b);
            }
            Ok(out)
        })
    }

    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            storage::check_range(
                Op::Write,
                offset,
                data.len() as u64,
                self.info.size,
                self.info.min_block,
            )?;
            if self.read_only() {
                return Err(StorageError::ReadOnly);
            }
            for (o, n) in self.chunks(offset, data.len() as u64) {
                let at = (o - offset) as usize;
                self.write(o, &data[at..at + n as usize], fua)
                    .await
                    .map_err(|e| to_storage(Op::Write, o, n.into(), e))?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.flush()
                .await
                .map_err(|e| to_storage(Op::Flush, 0, 0, e))
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            storage::check_range(
                Op::Discard,
                offset,
                len,
                self.info.size,
                self.info.min_block,
            )?;
            for (o, n) in self.chunks(offset, len) {
                self.trim(o, n, false)
                    .await
                    .map_err(|e| to_storage(Op::Discard, o, n.into(), e))?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            storage::check_range(
                Op::WriteZeroes,
                offset,
                len,
                self.info.size,
                self.info.min_block,
            )?;
            for (o, n) in self.chunks(offset, len) {
                self.write_zeroes(o, n, may_unmap, false)
                    .await
                    .map_err(|e| to_storage(Op::WriteZeroes, o, n.into(), e))?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            storage::check_range(Op::BlockStatus, offset, len, self.info.size, 1)?;
            if self.info.base_allocation.is_none() || len == 0 {
                return Ok(vec![Extent {
                    len,
                    hole: false,
                    zero: false,
                }]);
            }
            let n = len.min(u64::from(u32::MAX - 4095)) as u32;
            let d = self
                .block_status(offset, n)
                .await
                .map_err(|e| to_storage(Op::BlockStatus, offset, len, e))?;
            Ok(d.into_iter()
                .map(|(l, f)| Extent {
                    len: l.into(),
                    hole: f & STATE_HOLE != 0,
                    zero: f & STATE_ZERO != 0,
                })
                .collect())
        })
    }
}

/// The connection halves of a control channel, and the session key its data connections
/// prove (with a peer key).
pub type ControlConnection = (
    BufReader<ReadHalf>,
    BufWriter<WriteHalf>,
    Option<SessionKey>,
);

/// The peer key exchange on a fresh connection, before NBD.
async fn authenticate(
    rd: &mut BufReader<ReadHalf>,
    wr: &mut BufWriter<WriteHalf>,
    cred: Credential<'_>,
    peer: &str,
) -> Result<Option<SessionKey>, NbdError> {
    crate::auth::connect(rd, wr, cred)
        .await
        .map_err(|source| NbdError::Auth {
            peer: peer.to_string(),
            source,
        })
}

/// Connect to `ep`, with TLS from the first byte when `tls` is given.
async fn secure_connect(
    ep: &Endpoint,
    tls: Option<&ClientTls>,
    peer: &str,
) -> Result<(ReadHalf, WriteHalf), NbdError> {
    let (rd, wr) = transport::connect(ep).await?;
    match tls {
        Some(t) => crate::tls::connect(t, rd, wr)
            .await
            .map_err(|e| NbdError::Negotiation {
                peer: peer.to_string(),
                reason: format!("TLS: {e}"),
            }),
        None => Ok((rd, wr)),
    }
}

/// Open a connection to a lockstep secondary and switch it to the replication control
/// protocol (`NBD_OPT_LOCKSTEP_CONTROL`), with TLS and then the peer key first when given.
/// Returns the two halves, ready for control frames, and the session key.
pub async fn connect_control(
    ep: &Endpoint,
    timeout: Duration,
    key: Option<&PeerKey>,
    tls: Option<&ClientTls>,
) -> Result<ControlConnection, NbdError> {
    let peer = ep.to_string();
    let fut = async {
        let (rd, wr) = secure_connect(ep, tls, &peer).await?;
        let mut rd = BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let session = match key {
            Some(k) => authenticate(&mut rd, &mut wr, Credential::Control(k), &peer).await?,
            None => None,
        };
        greet(&mut rd, &mut wr, &peer).await?;
        send_option(&mut wr, OPT_LOCKSTEP_CONTROL, &[]).await?;
        let (kind, data) = read_option_reply(&mut rd, OPT_LOCKSTEP_CONTROL, &peer).await?;
        if kind != REP_ACK {
            let mut e = negotiation_refused(&peer, "lockstep control", kind, &data);
            if kind == REP_ERR_UNSUP {
                e = NbdError::Negotiation {
                    peer: peer.clone(),
                    reason: "not a lockstep secondary (the control option is unsupported)".into(),
                };
            }
            return Err(e);
        }
        Ok((rd, wr, session))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| NbdError::Timeout(format!("connecting to {peer}")))?
}
