//! Prometheus metrics of a node (`--metrics ADDR:PORT`): a minimal HTTP server answering
//! `GET /metrics` with the text exposition format (version 0.0.4), rendered from the same
//! typed status that `lockstep status` shows, plus the checkpoint histograms.
//!
//! The port faces the network like any other: a request head is read only up to 8 KiB and
//! for 5 s, at most 16 scrapes run at once, and only `GET /metrics` (or `/`) is answered.
//! It serves read-only numbers: no disk paths, keys or generations.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::status::{PrimaryStatus, SecondaryStatus};
use crate::epoch::BoxFuture;
use crate::latency::Histogram;

/// Longest request head read.
const MAX_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
const MAX_SCRAPES: usize = 16;

/// Renders a node's metrics on demand.
pub trait MetricsSource: Send + Sync + 'static {
    /// The exposition text.
    fn render(&self) -> BoxFuture<'_, String>;
}

/// The exposition text being built: each metric family's HELP and TYPE once, then samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
    declared: BTreeSet<String>,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

impl Exposition {
    fn declare(&mut self, name: &str, kind: &str, help: &str) {
        if self.declared.insert(name.to_string()) {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
    }

    fn sample(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A value that goes up and down.
    pub fn gauge(&mut self, name: &str, help: &str, labels: Labels<'_>, value: f64) {
        self.declare(name, "gauge", help);
        self.sample(name, labels, value);
    }

    /// A count since the daemon started (`name` ends in `_total`).
    pub fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.declare(name, "counter", help);
        self.sample(name, &[], value);
    }

    /// One gauge per state, 1 for `current` and 0 for the others.
    pub fn state(&mut self, name: &str, help: &str, states: &[&str], current: &str) {
        for s in states {
            self.gauge(
                name,
                help,
                &[("mode", s)],
                f64::from(u8::from(*s == current)),
            );
        }
    }

    /// A histogram in seconds from one in microseconds.
    pub fn histogram(&mut self, name: &str, help: &str, h: &Histogram) {
        self.declare(name, "histogram", help);
        for (le, n) in &h.buckets {
            let le = format!("{}", *le as f64 / 1e6);
            self.sample(&format!("{name}_bucket"), &[("le", &le)], *n as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum_us as f64 / 1e6);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

fn b(v: bool) -> f64 {
    f64::from(u8::from(v))
}

/// The modes a primary reports.
const PRIMARY_MODES: &[&str] = &["replicating", "paused", "unprotected"];
/// The modes a secondary reports (`primary` after a failover).
const SECONDARY_MODES: &[&str] = &[
    "waiting",
    "syncing",
    "replicating",
    "paused",
    "failing-over",
    "primary",
];

/// A primary's metrics: its status and the coordinator's histograms (pause, whole).
pub fn primary_metrics(s: &PrimaryStatus, pause: &Histogram, total: &Histogram) -> String {
    let mut e = Exposition::default();
    let bl = &s.block;
    let cp = &s.checkpoints;
    e.gauge(
        "lockstep_info",
        "The daemon's role and version.",
        &[("role", "primary"), ("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.gauge(
        "lockstep_uptime_seconds",
        "Seconds since the daemon started.",
        &[],
        s.uptime_s,
    );
    e.state(
        "lockstep_mode",
        "The node's replication mode (1: current).",
        PRIMARY_MODES,
        &bl.mode,
    );
    e.gauge(
        "lockstep_protected",
        "1 when replicating with no resync in progress: a failover loses nothing committed.",
        &[],
        b(bl.mode == "replicating" && !bl.resyncing),
    );
    e.gauge(
        "lockstep_epoch",
        "The epoch writes belong to now.",
        &[],
        cp.epoch as f64,
    );
    e.gauge(
        "lockstep_committed_epoch",
        "The last checkpoint the secondary committed.",
        &[],
        cp.committed_epoch as f64,
    );
    e.counter(
        "lockstep_checkpoints_total",
        "Checkpoints committed.",
        cp.checkpoints as f64,
    );
    e.counter(
        "lockstep_checkpoint_failures_total",
        "Checkpoints that were cut but failed.",
        cp.checkpoint_failures as f64,
    );
    e.counter(
        "lockstep_checkpoints_skipped_total",
        "Checkpoints due that could not run (not replicating, a resync, a participant not ready).",
        cp.checkpoints_skipped as f64,
    );
    e.histogram(
        "lockstep_checkpoint_pause_seconds",
        "How long each checkpoint held client I/O (and the guest).",
        pause,
    );
    e.histogram(
        "lockstep_checkpoint_duration_seconds",
        "Each checkpoint from its pause to the secondary's COMMITTED.",
        total,
    );
    e.counter(
        "lockstep_forwarded_writes_total",
        "Modifications forwarded to the secondary.",
        bl.forwarded_writes as f64,
    );
    e.counter(
        "lockstep_forwarded_bytes_total",
        "Bytes forwarded to the secondary.",
        bl.forwarded_bytes as f64,
    );
    let q = &bl.forward_queue;
    e.gauge(
        "lockstep_forward_queue_requests",
        "Requests queued or in flight to the secondary.",
        &[],
        q.depth as f64,
    );
    e.gauge(
        "lockstep_forward_queue_bytes",
        "Their bytes.",
        &[],
        q.bytes as f64,
    );
    e.gauge(
        "lockstep_forward_queue_limit_bytes",
        "The forward queue's limit (--forward-queue).",
        &[],
        q.limit_bytes as f64,
    );
    e.gauge(
        "lockstep_dirty_blocks",
        "4 KiB blocks the secondary lacks or may lack.",
        &[],
        bl.dirty_blocks as f64,
    );
    if let Some(bm) = &bl.bitmap {
        e.gauge(
            "lockstep_bitmap_marked_extents",
            "Extents marked in the persistent dirty bitmap.",
            &[],
            bm.marked_extents as f64,
        );
        e.counter(
            "lockstep_bitmap_writes_total",
            "Writes of the persistent dirty bitmap.",
            bm.writes as f64,
        );
    }
    let r = &bl.resync;
    e.gauge(
        "lockstep_resync_active",
        "1 while a resync sends dirty blocks.",
        &[],
        b(bl.resyncing),
    );
    e.gauge(
        "lockstep_resync_to_send_blocks",
        "Blocks the current (or last) resync has to send.",
        &[],
        r.to_send_blocks as f64,
    );
    e.gauge(
        "lockstep_resync_sent_blocks",
        "Blocks it sent so far.",
        &[],
        r.sent_blocks as f64,
    );
    e.gauge(
        "lockstep_resync_sent_bytes",
        "Bytes it sent so far.",
        &[],
        r.sent_bytes as f64,
    );
    e.counter(
        "lockstep_resyncs_completed_total",
        "Resyncs completed.",
        r.completed as f64,
    );
    e.counter(
        "lockstep_sessions_total",
        "Replication sessions started.",
        s.link.sessions as f64,
    );
    e.counter(
        "lockstep_connect_attempts_total",
        "Attempts to reach the secondary.",
        s.link.connect_attempts as f64,
    );
    e.finish()
}

/// A secondary's metrics.
pub fn secondary_metrics(s: &SecondaryStatus) -> String {
    let mut e = Exposition::default();
    e.gauge(
        "lockstep_info",
        "The daemon's role and version.",
        &[("role", &s.role), ("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.state(
        "lockstep_mode",
        "The node's replication mode (1: current).",
        SECONDARY_MODES,
        &s.mode,
    );
    e.gauge(
        "lockstep_consistent",
        "1 when the disk (with its buffer) holds a checkpoint it can fail over to.",
        &[],
        b(s.consistent),
    );
    e.gauge(
        "lockstep_epoch",
        "The epoch forwarded writes belong to now.",
        &[],
        s.epoch as f64,
    );
    e.gauge(
        "lockstep_committed_epoch",
        "The last checkpoint committed here.",
        &[],
        s.committed_epoch as f64,
    );
    e.counter(
        "lockstep_checkpoints_total",
        "Checkpoints committed.",
        s.checkpoints as f64,
    );
    e.counter(
        "lockstep_checkpoint_failures_total",
        "Checkpoints aborted here.",
        s.checkpoints_aborted as f64,
    );
    e.counter(
        "lockstep_received_writes_total",
        "Forwarded modifications applied.",
        s.forwarded_writes as f64,
    );
    e.counter(
        "lockstep_received_bytes_total",
        "Their bytes.",
        s.forwarded_bytes as f64,
    );
    e.counter(
        "lockstep_heartbeats_total",
        "Heartbeats received.",
        s.heartbeats as f64,
    );
    e.gauge(
        "lockstep_buffer_blocks",
        "Blocks in the disk buffer (originals and own writes).",
        &[],
        s.buffer.blocks as f64,
    );
    e.gauge(
        "lockstep_buffer_memory_bytes",
        "Disk-buffer bytes in memory.",
        &[],
        s.buffer.memory_bytes as f64,
    );
    e.gauge(
        "lockstep_buffer_spill_bytes",
        "Disk-buffer bytes in the spill file.",
        &[],
        s.buffer.spill_bytes as f64,
    );
    e.gauge(
        "lockstep_buffer_epochs",
        "Uncommitted epochs with originals kept.",
        &[],
        s.buffer.epochs as f64,
    );
    e.gauge(
        "lockstep_dirty_blocks",
        "Blocks written here since the failover.",
        &[],
        s.dirty_blocks as f64,
    );
    e.finish()
}

/// Serve `source` at `addr` until `stop`; returns the address bound (port 0: any free).
pub async fn serve(
    addr: SocketAddr,
    source: Arc<dyn MetricsSource>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics on {addr}: {e}")))?;
    let bound = l.local_addr()?;
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    let task = tokio::spawn(async move {
        loop {
            let (s, _) = tokio::select! {
                _ = crate::epoch::until_true(&mut stop) => return,
                r = l.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("metrics accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Over the limit: close at once rather than queue.
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let src = source.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(HEAD_TIMEOUT * 2, scrape(s, &*src)).await;
            });
        }
    });
    Ok((bound, task))
}

async fn scrape(mut s: tokio::net::TcpStream, src: &dyn MetricsSource) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = s.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Err(std::io::Error::other("bad request head"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::other("request head timed out"))??;
    let line = head.split(|&c| c == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics" | "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            src.render().await,
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(reply.as_bytes()).await?;
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_declared_once_and_labels_escaped() {
        let mut e = Exposition::default();
        e.state("m", "help", &["a", "b"], "b");
        e.gauge("g", "h", &[("x", "q\"\\\n")], 1.5);
        let t = e.finish();
        assert_eq!(t.matches("# TYPE m gauge").count(), 1, "{t}");
        assert!(t.contains("m{mode=\"a\"} 0\nm{mode=\"b\"} 1\n"), "{t}");
        assert!(t.contains("g{x=\"q\\\"\\\\\\n\"} 1.5\n"), "{t}");
    }

    struct Fixed;
    impl MetricsSource for Fixed {
        fn render(&self) -> BoxFuture<'_, String> {
            Box::pin(async { "x 1\n".to_string() })
        }
    }

    #[test]
    fn the_server_answers_get_metrics_and_nothing_else() {
        crate::test_runtime().block_on(async {
            let (_tx, rx) = watch::channel(false);
            let (addr, _t) = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Fixed), rx)
                .await
                .unwrap();
            let ask = |req: &'static [u8]| async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(req).await.unwrap();
                let mut out = String::new();
                s.read_to_string(&mut out).await.unwrap();
                out
            };
            let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(
                ok.starts_with("HTTP/1.1 200") && ok.ends_with("\r\n\r\nx 1\n"),
                "{ok}"
            );
            let nf = ask(b"GET /etc/passwd HTTP/1.1\r\n\r\n").await;
            assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
            let post = ask(b"POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            // A head that never ends is cut off at 8 KiB.
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let junk = vec![b'a'; 16 << 10];
            let _ = s.write_all(&junk).await;
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            assert!(out.is_empty(), "answered a 16 KiB head");
        });
    }
}
