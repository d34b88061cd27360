//! The transmission phase: read requests off the wire, check them against the negotiated
//! session, run each as its own task against the [`Backend`], and hand the results to the
//! reply writer ([`super::reply`]); the picture is in [`super`].

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::lockstep::{mark_epoch, participant_message};
use super::negotiate::Session;
use super::reply::{storage_error, write_replies, Reply, ReplyBody};
use super::{stopped, NbdServer, MAX_PAYLOAD};
use crate::nbd::codec::{self, Request};
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::storage::{Backend, IoBuf};
use crate::sync::BoxFuture;
use crate::transport::{ReadHalf, WriteHalf};

/// Requests up to this size are first tried on the connection's reader itself.
const INLINE_MAX: u32 = 64 << 10;

impl NbdServer {
    /// Serve requests until the client disconnects, breaks the protocol or `shutdown`
    /// turns true; every request read gets its reply before this returns.
    pub(super) async fn transmission(
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
            // lockstep's extensions run inline: the next request is read only after them.
            let epochs = session.export.epochs.as_ref();
            let inline = match epochs {
                Some(sink) if req.command == CMD_LOCKSTEP_EPOCH && req.length == 0 => {
                    Some(Ok(mark_epoch(&**sink, req.offset, &mut inflight).await))
                }
                _ if req.command == CMD_LOCKSTEP_PARTICIPANT => {
                    Some(participant_message(&mut rd, &req, epochs, structured, peer).await)
                }
                _ => None,
            };
            if let Some(body) = inline {
                let body = match body {
                    Ok(b) => b,
                    Err(e) => break Err(e),
                };
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let _ = tx.send(Reply {
                    cookie: req.cookie,
                    body,
                    _permit: None,
                });
                continue;
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
                match IoBuf::read_from(&mut rd, req.length as usize).await {
                    Ok(buf) => Some(buf),
                    Err(e) => {
                        break Err(NbdError::Io {
                            context: format!("reading a write payload from {peer}"),
                            source: e,
                        })
                    }
                }
            } else {
                None
            };
            let backend = session.export.backend.clone();
            let base_allocation = session.base_allocation;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let small = req.length <= INLINE_MAX;
            let mut run: BoxFuture<'static, ReplyBody> =
                Box::pin(async move { execute(&*backend, &req, payload, base_allocation).await });
            // A small request that completes at once (a page-cache hit) is answered from here,
            // without a task of its own; anything that has to wait continues as a task.
            if small {
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(body) = run.as_mut().poll(&mut cx) {
                    let _ = tx.send(Reply {
                        cookie: req.cookie,
                        body,
                        _permit: Some(permit),
                    });
                    continue;
                }
            }
            let tx = tx.clone();
            inflight.spawn(async move {
                let body = run.await;
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

/// Run one request against the backend.
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
