//! Control-frame I/O: one [`Message`] at a time over a byte stream.
//!
//! Both nodes use these: the primary's [`super::peer::PeerLink`] and the secondary's control
//! session. The codec itself (bytes to [`Message`] and back) is pure and lives in
//! [`super::wire`].

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

use super::wire::{self, Message, WireError};
use crate::nbd::transport::WriteHalf;

/// Read one frame; errors say what was wrong.
pub async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
) -> std::result::Result<Message, String> {
    let mut h = [0u8; wire::HEADER_LEN];
    rd.read_exact(&mut h).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "connection closed".to_string(),
        _ => format!("reading a frame: {e}"),
    })?;
    let (_, len) = wire::decode_header(&h).map_err(|e: WireError| e.to_string())?;
    let mut payload = vec![0u8; len as usize];
    rd.read_exact(&mut payload)
        .await
        .map_err(|e| format!("truncated frame: {e}"))?;
    let mut t = [0u8; wire::TRAILER_LEN];
    rd.read_exact(&mut t)
        .await
        .map_err(|e| format!("truncated frame: {e}"))?;
    wire::decode_body(&h, &payload, &t).map_err(|e| e.to_string())
}

/// Write one frame.
pub async fn write_message<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    m: &Message,
) -> std::result::Result<(), String> {
    wr.write_all(&m.encode())
        .await
        .map_err(|e| format!("sending {}: {e}", m.name()))?;
    wr.flush()
        .await
        .map_err(|e| format!("sending {}: {e}", m.name()))
}

pub(crate) type SharedWriter = Arc<tokio::sync::Mutex<BufWriter<WriteHalf>>>;

pub(crate) async fn send(wr: &SharedWriter, m: &Message) -> std::result::Result<(), String> {
    let mut w = wr.lock().await;
    write_message(&mut *w, m).await
}
