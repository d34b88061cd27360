//! Replies of the transmission phase: what a request's task hands to the connection's writer
//! task, and how the writer puts it on the wire — a simple reply (`NBD_SIMPLE_REPLY_MAGIC`)
//! or, once structured replies are negotiated, one structured chunk per reply.

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::BASE_ALLOCATION_ID;
use crate::nbd::codec;
use crate::nbd::errno_to_nbd;
use crate::nbd::proto::*;
use crate::storage::{IoBuf, StorageError};
use crate::transport::WriteHalf;

/// One reply on its way to the writer task; the permit returns the byte budget once written.
#[derive(Debug)]
pub(in crate::nbd) struct Reply {
    pub(in crate::nbd) cookie: u64,
    pub(in crate::nbd) body: ReplyBody,
    pub(in crate::nbd) _permit: Option<OwnedSemaphorePermit>,
}

/// What a reply says.
#[derive(Debug)]
pub(in crate::nbd) enum ReplyBody {
    Ok,
    Data { offset: u64, buf: IoBuf },
    BlockStatus(Vec<(u32, u32)>),
    Error { errno: u32, message: String },
}

/// The reply to a request the backend failed.
pub(super) fn storage_error(e: &StorageError) -> ReplyBody {
    ReplyBody::Error {
        errno: errno_to_nbd(e.errno()),
        message: e.to_string(),
    }
}

/// Write replies as they come, batching whatever is ready into one flush.
pub(super) async fn write_replies(
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
