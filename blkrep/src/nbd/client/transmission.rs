//! The transmission phase's machinery: every request gets a fresh cookie and a place in the
//! pending table, goes out under a short writer lock, and waits on a oneshot that the reader
//! task fills when the reply (simple, or structured chunks until NBD_REPLY_FLAG_DONE) for its
//! cookie has arrived. The picture is in [`super`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::oneshot;

use super::{command_name, NbdClient};
use crate::epoch::MAX_PEER_MESSAGE;
use crate::nbd::codec::{self, ReplyHeader, Request};
use crate::nbd::proto::*;
use crate::nbd::{errno_name, NbdError};
use crate::storage::IoBuf;
use crate::sync::Locked;
use crate::transport::{ReadHalf, WriteHalf};

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
pub(super) struct Outcome {
    command: u16,
    offset: u64,
    length: u32,
    /// What a read read.
    pub(super) data: Option<IoBuf>,
    /// What a block status found.
    pub(super) status: Vec<(u32, u32)>,
    error: Option<(u32, String)>,
}

impl Outcome {
    /// The part of a read's buffer that a chunk of `n` bytes at `off` fills, if the chunk
    /// lies within the request.
    fn chunk(&mut self, off: u64, n: u64) -> Option<&mut [u8]> {
        let rel = off.checked_sub(self.offset)?;
        let end = rel
            .checked_add(n)
            .filter(|&e| e <= u64::from(self.length))?;
        let buf = self.data.as_mut().expect("read buffer");
        Some(&mut buf[rel as usize..end as usize])
    }
}

/// A request waiting for its reply.
#[derive(Debug)]
struct Pending {
    outcome: Outcome,
    done: oneshot::Sender<Result<Outcome, NbdError>>,
}

/// One connection, shared by its client handles, tickets and reader task.
pub(super) struct Shared {
    pub(super) peer: String,
    pub(super) writer: tokio::sync::Mutex<BufWriter<WriteHalf>>,
    pending: Mutex<PendingTable>,
    next_cookie: AtomicU64,
    request_timeout: Option<Duration>,
}

/// Requests waiting for their replies, by cookie.
#[derive(Debug, Default)]
pub(super) struct PendingTable {
    map: HashMap<u64, Pending>,
    /// Set once the reader has stopped: why the connection is gone.
    pub(super) closed: Option<String>,
}

impl NbdClient {
    /// Send a request and wait for its reply.
    pub(super) async fn request(
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
    pub(in crate::nbd) async fn submit(
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
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Start transmission on a negotiated connection: the reader task runs from now on.
    pub(super) fn start(
        rd: BufReader<ReadHalf>,
        wr: BufWriter<WriteHalf>,
        peer: String,
        request_timeout: Option<Duration>,
    ) -> Arc<Self> {
        let shared = Arc::new(Shared {
            peer,
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(PendingTable::default()),
            next_cookie: AtomicU64::new(1),
            request_timeout,
        });
        tokio::spawn(read_replies(rd, shared.clone()));
        shared
    }

    pub(super) fn table(&self) -> std::sync::MutexGuard<'_, PendingTable> {
        self.pending.locked()
    }
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
                        let buf = p.chunk(off, n).ok_or_else(|| {
                            bad(format!("read chunk at {off}+{n} outside the request"))
                        })?;
                        rd.read_exact(buf).await.map_err(io())?;
                    }
                    REPLY_TYPE_OFFSET_DATA
                        if p.command == CMD_LOCKSTEP_PARTICIPANT
                            && p.data.is_none()
                            && (8..=MAX_PEER_MESSAGE as u64 + 8).contains(&u64::from(length)) =>
                    {
                        let _offset = rd.read_u64().await.map_err(io())?;
                        let mut buf = IoBuf::zeroed(length as usize - 8);
                        rd.read_exact(&mut buf).await.map_err(io())?;
                        p.data = Some(buf);
                    }
                    REPLY_TYPE_OFFSET_HOLE if p.command == CMD_READ && length == 12 => {
                        let off = rd.read_u64().await.map_err(io())?;
                        let n = u64::from(rd.read_u32().await.map_err(io())?);
                        p.chunk(off, n)
                            .ok_or_else(|| {
                                bad(format!("hole chunk at {off}+{n} outside the request"))
                            })?
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
