//! Guest hooks: a QEMU virtual machine stopped and resumed over QMP ([`QmpGuest`]), and
//! several hooks paused together ([`GuestHooks`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::{BoxFuture, GuestHook, Latencies};
use crate::sync::Locked;

/// Longest QMP line accepted (QEMU's answers to `stop`, `cont` and `query-status` are tiny;
/// events can be longer).
const MAX_QMP_LINE: u64 = 1 << 20;

/// Several hooks as one: paused in order, resumed in reverse order. If one fails to pause,
/// the ones already paused are resumed and the pause fails.
pub struct GuestHooks(pub Vec<std::sync::Arc<dyn GuestHook>>);

impl std::fmt::Debug for GuestHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestHooks")
            .field("hooks", &self.0.len())
            .finish()
    }
}

impl GuestHook for GuestHooks {
    fn pause(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            for (i, h) in self.0.iter().enumerate() {
                if let Err(e) = h.pause().await {
                    for done in self.0[..i].iter().rev() {
                        if let Err(r) = done.resume().await {
                            tracing::error!("resuming after a failed pause: {r}");
                        }
                    }
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut first_err = None;
            for h in self.0.iter().rev() {
                if let Err(e) = h.resume().await {
                    first_err.get_or_insert(e);
                }
            }
            first_err.map_or(Ok(()), Err)
        })
    }

    fn status(&self) -> Value {
        let parts: Vec<Value> = self
            .0
            .iter()
            .map(|h| h.status())
            .filter(|v| !v.is_null())
            .collect();
        match parts.len() {
            0 => Value::Null,
            1 => parts.into_iter().next().expect("one"),
            _ => Value::Array(parts),
        }
    }
}

struct Qmp {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

#[derive(Default)]
struct QmpStats {
    stops: u64,
    /// Checkpoints during which the VM was not running (left as it was).
    not_running: u64,
    failures: u64,
    stopped: Latencies,
    stopped_at: Option<Instant>,
    /// Whether the last pause stopped the VM (and the resume must continue it).
    we_stopped: bool,
    last_error: Option<String>,
}

/// A QEMU VM stopped (`stop`) for each cut and continued (`cont`) after it, over its QMP
/// socket. A VM that is not running when the checkpoint begins (paused by an operator,
/// migrating, shut down) is left as it is: the checkpoint runs, and `cont` is not sent.
/// The QMP connection is opened on first use and again after any error.
pub struct QmpGuest {
    path: PathBuf,
    timeout: Duration,
    conn: tokio::sync::Mutex<Option<Qmp>>,
    stats: Mutex<QmpStats>,
}

impl std::fmt::Debug for QmpGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpGuest")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl QmpGuest {
    /// The VM whose QMP socket (`-qmp unix:PATH,server=on,wait=off`) is at `path`; each QMP
    /// command may take `timeout`.
    pub fn new(path: &Path, timeout: Duration) -> QmpGuest {
        QmpGuest {
            path: path.to_path_buf(),
            timeout,
            conn: tokio::sync::Mutex::new(None),
            stats: Mutex::new(QmpStats::default()),
        }
    }

    /// Run one QMP command; its `return` value, or its error's description.
    pub async fn execute(&self, cmd: &str, args: Option<Value>) -> Result<Value, String> {
        let mut conn = self.conn.lock().await;
        let r = tokio::time::timeout(self.timeout, async {
            if conn.is_none() {
                *conn = Some(self.connect().await?);
            }
            let q = conn.as_mut().expect("connected");
            let mut req = json!({ "execute": cmd });
            if let Some(a) = args {
                req["arguments"] = a;
            }
            send(q, &req, &self.path).await?;
            answer(q, &self.path).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "QMP {}: no answer to {cmd} within {}",
                self.path.display(),
                crate::units::duration(self.timeout)
            ))
        });
        if let Err(e) = &r {
            // A QMP error leaves the connection usable; anything else drops it.
            if !e.contains("QMP error") {
                *conn = None;
            }
        }
        r
    }

    async fn connect(&self) -> Result<Qmp, String> {
        let p = self.path.display();
        let s = UnixStream::connect(&self.path)
            .await
            .map_err(|e| format!("QMP {p}: {e}"))?;
        let (rd, wr) = s.into_split();
        let mut q = Qmp {
            rd: BufReader::new(rd),
            wr,
        };
        let greeting = line(&mut q, &self.path).await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP {p}: not a QMP greeting: {greeting}"));
        }
        send(&mut q, &json!({"execute": "qmp_capabilities"}), &self.path).await?;
        answer(&mut q, &self.path).await?;
        Ok(q)
    }

    /// Someone else stopped the VM for this checkpoint (the device state capture found it
    /// running: a `cont` raced in after [`GuestHook::pause`] saw it stopped): continue it
    /// at resume as if the pause had stopped it.
    pub fn stopped_for_checkpoint(&self) {
        let mut s = self.stats.locked();
        if !s.we_stopped {
            s.we_stopped = true;
            s.stops += 1;
            s.stopped_at = Some(Instant::now());
        }
    }

    fn fail(&self, e: String) -> String {
        let mut s = self.stats.locked();
        s.failures += 1;
        s.last_error = Some(e.clone());
        e
    }
}

async fn send(q: &mut Qmp, req: &Value, path: &Path) -> Result<(), String> {
    let mut out = req.to_string();
    out.push('\n');
    q.wr.write_all(out.as_bytes())
        .await
        .map_err(|e| format!("QMP {}: {e}", path.display()))
}

async fn line(q: &mut Qmp, path: &Path) -> Result<Value, String> {
    let mut buf = String::new();
    let n = (&mut q.rd)
        .take(MAX_QMP_LINE)
        .read_line(&mut buf)
        .await
        .map_err(|e| format!("QMP {}: {e}", path.display()))?;
    if n == 0 {
        return Err(format!("QMP {}: closed", path.display()));
    }
    serde_json::from_str(&buf).map_err(|e| format!("QMP {}: bad JSON ({e})", path.display()))
}

/// The answer to the command just sent, skipping events.
async fn answer(q: &mut Qmp, path: &Path) -> Result<Value, String> {
    loop {
        let v = line(q, path).await?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(e) = v.get("error") {
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
            return Err(format!("QMP error from {}: {desc}", path.display()));
        }
        // An event ({"event": ...}): not ours.
    }
}

impl GuestHook for QmpGuest {
    fn pause(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let st = self
                .execute("query-status", None)
                .await
                .map_err(|e| self.fail(e))?;
            if st.get("running").and_then(Value::as_bool) != Some(true) {
                let mut s = self.stats.locked();
                s.not_running += 1;
                s.we_stopped = false;
                return Ok(());
            }
            self.execute("stop", None).await.map_err(|e| self.fail(e))?;
            let mut s = self.stats.locked();
            s.stops += 1;
            s.we_stopped = true;
            s.stopped_at = Some(Instant::now());
            Ok(())
        })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if !self.stats.locked().we_stopped {
                return Ok(());
            }
            // A VM left stopped is an outage: try hard, reconnecting between attempts.
            let mut last = String::new();
            for attempt in 0..5u32 {
                match self.execute("cont", None).await {
                    Ok(_) => {
                        let mut s = self.stats.locked();
                        s.we_stopped = false;
                        if let Some(t) = s.stopped_at.take() {
                            s.stopped.record(t.elapsed());
                        }
                        return Ok(());
                    }
                    Err(e) => {
                        last = e;
                        tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
                    }
                }
            }
            Err(self.fail(format!("the VM stays stopped: {last}")))
        })
    }

    fn status(&self) -> Value {
        let s = self.stats.locked();
        json!({
            "kind": "qmp",
            "qmp": self.path.display().to_string(),
            "stops": s.stops,
            "not_running": s.not_running,
            "failures": s.failures,
            "stopped_us": s.stopped.summary(),
            "last_error": s.last_error,
        })
    }
}
