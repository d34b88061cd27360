//! The operator's control socket: a unix socket speaking JSON lines (QMP-like).
//!
//! Each request is one JSON object on one line with a `"cmd"` field; each answer is one line:
//! `{"ok": true, ...}` or `{"ok": false, "error": "..."}`. Commands: `status`,
//! `checkpoint`, `failover` (`"to": "checkpoint" | "latest"`, optional `"verify": true`),
//! `set` (`"key"`, `"value"`), `events`, which turns the connection into a stream of the
//! node's state changes ([`crate::replica::events`]), and on the primary `subscribe`, a
//! stream of epoch events ([`EpochEvent`]). See `docs/operations.md`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};

use crate::epoch::{BoxFuture, EpochEvent};
use crate::replica::events::NodeEvents;

/// Longest request line.
const MAX_LINE: usize = 64 << 10;

/// Answers control requests.
pub trait AdminHandler: Send + Sync + 'static {
    /// Handle one request (a JSON object with "cmd"); return the answer's fields, or an error.
    fn handle(&self, cmd: String, req: Value) -> BoxFuture<'_, Result<Value, String>>;

    /// For `subscribe`: the first answer's fields and the events to send after it (the
    /// primary's commits and aborts); `None` where there are none (the secondary).
    fn subscribe(&self) -> Option<(Value, broadcast::Receiver<EpochEvent>)> {
        None
    }

    /// For `events`: the first answer's fields (the node's status now) and its state
    /// changes after it ([`crate::replica::events`]).
    fn events(&self) -> Option<BoxFuture<'_, (Value, broadcast::Receiver<Value>)>> {
        None
    }
}

/// Bind the control socket at `path` (replacing a stale socket file, refusing to replace
/// anything else) and serve it until `stop`.
pub async fn serve(
    path: PathBuf,
    handler: Arc<dyn AdminHandler>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        if UnixStream::connect(&path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another daemon", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding control socket {}: {e}", path.display()),
        )
    })?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = crate::epoch::until_true(&mut stop) => break,
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        let h = handler.clone();
                        tokio::spawn(async move { connection(s, h).await });
                    }
                    Err(e) => {
                        tracing::warn!("control socket accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn connection(s: UnixStream, h: Arc<dyn AdminHandler>) {
    let (rd, mut wr) = s.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut rd)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let answer = if line.len() > MAX_LINE {
            json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else if command_is(&line, "subscribe") {
            match h.subscribe() {
                Some((first, events)) => {
                    return send_events(wr, rd, first, events, |missed| EpochEvent::Lagged {
                        missed,
                    })
                    .await
                }
                None => {
                    json!({"ok": false, "error": "this daemon has no epoch events (it is not a primary)"})
                }
            }
        } else if command_is(&line, "events") {
            match h.events() {
                Some(f) => {
                    // Subscribed before the snapshot is taken: nothing falls between them.
                    let (first, events) = f.await;
                    return send_events(wr, rd, first, events, NodeEvents::lagged).await;
                }
                None => json!({"ok": false, "error": "this daemon publishes no events"}),
            }
        } else {
            answer(&*h, &line).await
        };
        let mut out = answer.to_string();
        out.push('\n');
        if wr.write_all(out.as_bytes()).await.is_err() || line.len() > MAX_LINE {
            return;
        }
    }
}

use tokio::io::AsyncReadExt as _;

fn command_is(line: &[u8], cmd: &str) -> bool {
    serde_json::from_slice::<Value>(line)
        .ok()
        .and_then(|v| v.get("cmd").and_then(Value::as_str).map(|c| c == cmd))
        .unwrap_or(false)
}

/// A subscription: the first answer, then one event per line until the subscriber closes,
/// the events end (the daemon stops) or a write fails. A subscriber that falls behind by
/// more than the backlog gets a `lagged` event instead of the events it missed.
async fn send_events<T: Clone + serde::Serialize>(
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut rd: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut first: Value,
    mut events: broadcast::Receiver<T>,
    lagged: impl Fn(u64) -> T,
) {
    if let Value::Object(m) = &mut first {
        m.insert("ok".into(), Value::Bool(true));
    }
    let mut out = first.to_string();
    out.push('\n');
    if wr.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    let mut sink = [0u8; 256];
    loop {
        let e = tokio::select! {
            // Anything the subscriber sends is ignored; its EOF ends the subscription.
            r = rd.read(&mut sink) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            e = events.recv() => match e {
                Ok(e) => e,
                Err(broadcast::error::RecvError::Lagged(missed)) => lagged(missed),
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        let Ok(mut out) = serde_json::to_string(&e) else {
            return;
        };
        out.push('\n');
        if wr.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn answer(h: &dyn AdminHandler, line: &[u8]) -> Value {
    let req: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return json!({"ok": false, "error": format!("not a JSON request: {e}")}),
    };
    let Some(cmd) = req.get("cmd").and_then(Value::as_str).map(str::to_string) else {
        return json!({"ok": false, "error": "the request has no \"cmd\" string"});
    };
    match h.handle(cmd, req).await {
        Ok(Value::Object(mut m)) => {
            m.insert("ok".into(), Value::Bool(true));
            Value::Object(m)
        }
        Ok(other) => json!({"ok": true, "result": other}),
        Err(e) => json!({"ok": false, "error": e}),
    }
}

/// Send one request to the control socket at `path` and return the answer (an error for
/// `"ok": false`).
pub use crate::epoch::control_request as request;
