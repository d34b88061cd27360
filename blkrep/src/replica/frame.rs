//! Control-frame I/O: one [`Message`] at a time over a byte stream.
//!
//! Both nodes use these: the primary's [`super::peer::PeerLink`] and the secondary's control
//! session. The codec itself (bytes to [`Message`] and back) is pure and lives in
//! [`super::wire`].

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

use super::error::ReplicaError;
use super::wire::{self, Message};
use crate::transport::WriteHalf;

type Result<T> = std::result::Result<T, ReplicaError>;

/// Read one frame: [`ReplicaError::Closed`] at a clean end of the stream, else
/// [`ReplicaError::Io`] saying what was wrong.
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(rd: &mut R) -> Result<Message> {
    let mut h = [0u8; wire::HEADER_LEN];
    rd.read_exact(&mut h).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ReplicaError::Closed,
        _ => ReplicaError::Io(format!("reading a frame: {e}")),
    })?;
    let (_, len) = wire::decode_header(&h).map_err(|e| ReplicaError::Io(e.to_string()))?;
    let truncated = |e: std::io::Error| ReplicaError::Io(format!("truncated frame: {e}"));
    let mut payload = vec![0u8; len as usize];
    rd.read_exact(&mut payload).await.map_err(truncated)?;
    let mut t = [0u8; wire::TRAILER_LEN];
    rd.read_exact(&mut t).await.map_err(truncated)?;
    wire::decode_body(&h, &payload, &t).map_err(|e| ReplicaError::Io(e.to_string()))
}

/// Write one frame.
pub async fn write_message<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    m: &Message,
) -> Result<()> {
    let failed = |e: std::io::Error| ReplicaError::Io(format!("sending {}: {e}", m.name()));
    wr.write_all(&m.encode()).await.map_err(failed)?;
    wr.flush().await.map_err(failed)
}

pub(crate) type SharedWriter = Arc<tokio::sync::Mutex<BufWriter<WriteHalf>>>;

/// Write one frame on a writer that several tasks share.
pub(crate) async fn send(wr: &SharedWriter, m: &Message) -> Result<()> {
    let mut w = wr.lock().await;
    write_message(&mut *w, m).await
}
