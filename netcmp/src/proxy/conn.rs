//! One client connection: its tasks (upstream, the instances' readers, the secondary's
//! writer, the client's writer) and how it ends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use super::{Conn, Mode, Shared, ToClient, CHUNK, SECONDARY_QUEUE};
use crate::{FlowKey, TcpFlags};

/// Make closing `s` send an RST. Linger 0 is the one setting that does not block on drop
/// (tokio deprecates `set_linger` for the others).
#[allow(deprecated)]
fn reset(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr}: no answer within {timeout:?}"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Serve one client connection (already counted in `open`).
pub(super) async fn connection(shared: Arc<Shared>, client: TcpStream, peer: SocketAddr) {
    shared.total.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let timeout = shared.cfg.connect_timeout;
    let primary = match connect(shared.cfg.primary, timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, "refused: the primary instance: {e}");
            shared.refused.fetch_add(1, Ordering::Relaxed);
            reset(&client);
            shared.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    let secondary = match shared.cfg.secondary {
        Some(a) => match connect(a, timeout).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(%peer, "the secondary instance: {e}; its output will time out");
                shared.secondary_failures.fetch_add(1, Ordering::Relaxed);
                None
            }
        },
        None => None,
    };
    let key = FlowKey::tcp(shared.listen, peer);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let room = Arc::new(Notify::new());
    shared.core().conns.insert(
        key,
        Conn {
            out: out_tx,
            queued: queued.clone(),
            room: room.clone(),
            pri_off: 0,
            sec_off: 0,
            released: 0,
            arrivals: VecDeque::new(),
        },
    );

    shared.open_flow(key);
    let (c_rd, c_wr) = client.into_split();
    let (p_rd, p_wr) = primary.into_split();
    let mut tasks = tokio::task::JoinSet::new();
    let sec_tx = secondary.map(|s| {
        let (s_rd, s_wr) = s.into_split();
        let (tx, rx) = mpsc::channel(SECONDARY_QUEUE);
        tasks.spawn(secondary_writer(s_wr, rx));
        tasks.spawn(reader(shared.clone(), key, s_rd, false, None));
        tx
    });
    tasks.spawn(upstream(shared.clone(), c_rd, p_wr, sec_tx));
    tasks.spawn(reader(
        shared.clone(),
        key,
        p_rd,
        true,
        Some((queued.clone(), room.clone())),
    ));
    let writer = tokio::spawn(client_writer(c_wr, out_rx, queued, room));
    // The client's end decides: after a FIN the client may still send (half-close), so the
    // connection lasts until the upstream task ends too; after a reset or a failed write it
    // ends now.
    let wr = match writer.await {
        Ok(Ok(wr)) => {
            wait_upstream(&mut tasks).await;
            Some(wr)
        }
        Ok(Err(wr)) => wr,
        Err(_) => None,
    };
    tasks.shutdown().await;
    drop(wr);
    let mut core = shared.core();
    core.conns.remove(&key);
    // End the flow's comparison if the primary's reply did not end on its own.
    if let Mode::Compare(c) = &mut core.mode {
        let _ = c.primary_tcp(key, 0, TcpFlags::RST, &[], Instant::now());
    }
    drop(core);
    shared.open.fetch_sub(1, Ordering::Relaxed);
}

/// Wait for the upstream task (the only one returning `true`).
async fn wait_upstream(tasks: &mut tokio::task::JoinSet<bool>) {
    while let Some(r) = tasks.join_next().await {
        if matches!(r, Ok(true)) {
            return;
        }
    }
}

/// Client → primary, and a copy to the secondary. Returns `true` (see [`wait_upstream`]).
async fn upstream(
    shared: Arc<Shared>,
    mut c_rd: OwnedReadHalf,
    mut p_wr: OwnedWriteHalf,
    mut sec: Option<mpsc::Sender<Vec<u8>>>,
) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match c_rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(tx) = &sec {
            if tx.try_send(buf[..n].to_vec()).is_err() {
                tracing::warn!("the secondary instance fell {SECONDARY_QUEUE} chunks behind: dropping it from this connection");
                shared.secondary_failures.fetch_add(1, Ordering::Relaxed);
                sec = None;
            }
        }
        if p_wr.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // Closing the sender makes the secondary writer send its FIN.
    drop(sec);
    let _ = p_wr.shutdown().await;
    true
}

async fn secondary_writer(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<Vec<u8>>) -> bool {
    while let Some(d) = rx.recv().await {
        if wr.write_all(&d).await.is_err() {
            return false;
        }
    }
    let _ = wr.shutdown().await;
    // Keep the half open until the connection ends: dropping it would not send anything
    // more, but the secondary's reply is still being read.
    std::future::pending::<()>().await;
    false
}

/// An instance's reply → the core. `room` (the primary only): wait while the client is
/// behind or the buffer is full.
async fn reader(
    shared: Arc<Shared>,
    key: FlowKey,
    mut rd: OwnedReadHalf,
    primary: bool,
    room: Option<(Arc<AtomicUsize>, Arc<Notify>)>,
) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if let Some((queued, notify)) = &room {
            while shared.must_wait(queued) {
                let _ = tokio::time::timeout(Duration::from_millis(20), notify.notified()).await;
            }
        }
        match rd.read(&mut buf).await {
            Ok(0) => {
                shared.end(key, primary, false);
                break;
            }
            Ok(n) if primary => {
                while shared.primary_data(key, &buf[..n]).is_err() {
                    if let Some((_, notify)) = &room {
                        let _ = tokio::time::timeout(Duration::from_millis(20), notify.notified())
                            .await;
                    }
                }
            }
            Ok(n) => shared.secondary_data(key, &buf[..n]),
            Err(_) => {
                shared.end(key, primary, true);
                break;
            }
        }
    }
    false
}

/// Released bytes → the client. `Ok(half)` after a FIN; `Err(Some(half))` after a reset
/// (linger 0 set: dropping both halves sends the RST); `Err(None)` when the client is gone.
async fn client_writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<ToClient>,
    queued: Arc<AtomicUsize>,
    room: Arc<Notify>,
) -> Result<OwnedWriteHalf, Option<OwnedWriteHalf>> {
    while let Some(m) = rx.recv().await {
        match m {
            ToClient::Data(d) => {
                if wr.write_all(&d).await.is_err() {
                    return Err(None);
                }
                queued.fetch_sub(d.len(), Ordering::Relaxed);
                room.notify_one();
            }
            ToClient::End { reset: false } => {
                let _ = wr.shutdown().await;
                return Ok(wr);
            }
            ToClient::End { reset: true } => {
                reset(wr.as_ref());
                return Err(Some(wr));
            }
        }
    }
    Err(None)
}
