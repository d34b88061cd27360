//! One client connection: its tasks (upstream, the instances' readers, the outboxes'
//! writers) and how it ends.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::outbox::{Ended, Outbox};
use super::{Conn, Mode, Shared, CHUNK, SECONDARY_QUEUE};
use crate::{FlowKey, TcpFlags};

/// Make closing `s` send an RST (linger 0).
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
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
    let (c_rd, c_wr) = client.into_split();
    let client = Outbox::new(c_wr);
    shared.core().conns.insert(
        key,
        Conn {
            client: client.clone(),
            pri_off: 0,
            sec_off: 0,
            released: 0,
            arrivals: VecDeque::new(),
        },
    );
    shared.open_flow(key);
    let (p_rd, p_wr) = primary.into_split();
    let mut tasks = tokio::task::JoinSet::new();
    let sec = secondary.map(|s| {
        let (s_rd, s_wr) = s.into_split();
        let out = Outbox::new(s_wr);
        let o = out.clone();
        // The secondary's end is not the connection's: its writer runs until aborted.
        tasks.spawn(async move {
            o.run().await;
            std::future::pending::<bool>().await
        });
        tasks.spawn(reader(shared.clone(), key, s_rd, false, client.clone()));
        out
    });
    tasks.spawn(upstream(shared.clone(), c_rd, p_wr, sec));
    tasks.spawn(reader(shared.clone(), key, p_rd, true, client.clone()));
    // The client's end decides: after a FIN the client may still send (half-close), so the
    // connection lasts until the upstream task ends too; after a reset or a failed write it
    // ends now.
    if client.clone().run().await == Ended::Fin {
        wait_upstream(&mut tasks).await;
    }
    tasks.shutdown().await;
    let mut core = shared.core();
    // The last reference to the client's socket: after a reset, closing it sends the RST.
    core.conns.remove(&key);
    // End the flow's comparison if the primary's reply did not end on its own.
    if let Mode::Compare(c) = &mut core.mode {
        let _ = c.primary_tcp(key, 0, TcpFlags::RST, &[], Instant::now());
    }
    drop(core);
    drop(client);
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
    mut sec: Option<Arc<Outbox>>,
) -> bool {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match c_rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(s) = &sec {
            if s.queued() > SECONDARY_QUEUE {
                tracing::warn!("the secondary instance fell {SECONDARY_QUEUE} bytes behind: dropping it from this connection");
                shared.secondary_failures.fetch_add(1, Ordering::Relaxed);
                s.finish(true);
                sec = None;
            } else {
                s.push(buf[..n].to_vec());
            }
        }
        if p_wr.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if let Some(s) = sec {
        s.finish(false);
    }
    let _ = p_wr.shutdown().await;
    true
}

/// An instance's reply → the core, waiting while [`Shared::must_wait`] says so.
async fn reader(
    shared: Arc<Shared>,
    key: FlowKey,
    mut rd: OwnedReadHalf,
    primary: bool,
    client: Arc<Outbox>,
) -> bool {
    let mut buf = vec![0u8; CHUNK];
    let wait_room = |c: &Arc<Outbox>| {
        let c = c.clone();
        async move {
            let _ = tokio::time::timeout(Duration::from_millis(20), c.room.notified()).await;
        }
    };
    loop {
        while shared.must_wait(&key, primary, &client) {
            wait_room(&client).await;
        }
        match rd.read(&mut buf).await {
            Ok(0) => {
                shared.end(key, primary, false);
                break;
            }
            Ok(n) if primary => {
                while shared.primary_data(key, &buf[..n]).is_err() {
                    wait_room(&client).await;
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
