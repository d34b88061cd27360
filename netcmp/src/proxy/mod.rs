//! The stream proxy (L4 frontend): clients connect to netcmp, which opens one connection to
//! the primary instance of the service and one to the secondary instance, mirrors the
//! client's bytes to both, and sends the client the primary's reply once the secondary
//! produced the same bytes ([`Comparator`]). A divergence, or a secondary later than the
//! compare timeout, releases the primary's reply anyway and asks the epoch link for a
//! checkpoint; after it commits, comparison restarts ([`Comparator::resync_all`]).
//!
//! Without a secondary ([`ProxyConfig::secondary`] is `None`) the proxy buffers output
//! instead ([`OutputBuffer`]): the primary's reply reaches the client only after a
//! checkpoint of a state at least as new as the one that produced it commits, and it is
//! dropped (the client's connection reset) if the primary daemon dies first.
//!
//! ```text
//!  client ──▶ upstream ──▶ primary ──▶ primary reader ─┐
//!      ▲          └──▶ secondary ──▶ secondary reader ─┤ core: Comparator or OutputBuffer
//!      └────────── client writer ◀──── released ───────┘   ◀── commits (EpochLink)
//! ```
//!
//! Every connection's tasks share one core under a mutex; nothing awaits while holding it.
//! Memory is bounded: the comparator by `max_held_bytes`, the buffer by its bound (the
//! primary is not read while it is full), each client's unsent bytes by
//! [`CLIENT_QUEUE`] (the primary is not read meanwhile), each secondary's unsent input by
//! [`SECONDARY_QUEUE`] chunks (past it the secondary is dropped from that connection), and
//! the number of connections by [`ProxyConfig::max_connections`].

mod conn;
mod outbox;
mod status;

pub use status::ProxyStatus;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blkrep::epoch::{monotonic_ns, Latencies};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::buffer::{BufferError, Output, OutputBuffer};
use crate::link::{EpochLink, LinkEvent};
use crate::{Action, Comparator, Config, FlowKey, TcpFlags};
use outbox::Outbox;

/// A client's released bytes not yet written to it; past this the primary is not read.
pub const CLIENT_QUEUE: usize = 1 << 20;
/// Client input queued for a slow secondary (bytes); past this the secondary is dropped from
/// the connection (its output then times out, and a checkpoint resyncs it).
pub const SECONDARY_QUEUE: usize = 16 << 20;
/// How far one instance's reply may run ahead of the other's before netcmp stops reading it
/// (compare mode); the other catches up, or the compare timeout releases the bytes.
pub const FLOW_WINDOW: usize = 4 << 20;
/// Read size.
const CHUNK: usize = 256 << 10;

/// Settings of the stream proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// The primary instance of the service.
    pub primary: SocketAddr,
    /// The secondary instance; `None` buffers the primary's output until checkpoints commit.
    pub secondary: Option<SocketAddr>,
    /// The comparator's settings (compare mode).
    pub compare: Config,
    /// The most output held in buffering mode.
    pub buffer_bytes: usize,
    /// How long connecting to an instance may take.
    pub connect_timeout: Duration,
    /// Connections served at once; more are refused (closed at once).
    pub max_connections: usize,
}

impl ProxyConfig {
    /// Defaults for everything but the addresses.
    pub fn new(listen: SocketAddr, primary: SocketAddr, secondary: Option<SocketAddr>) -> Self {
        ProxyConfig {
            listen,
            primary,
            secondary,
            compare: Config::default(),
            buffer_bytes: 64 << 20,
            connect_timeout: Duration::from_secs(5),
            max_connections: 4096,
        }
    }
}

struct Conn {
    client: Arc<Outbox>,
    /// Bytes of the primary's / secondary's reply seen (their stream offsets).
    pri_off: u64,
    sec_off: u64,
    /// The primary's bytes released so far, and when each chunk arrived (end offset, time).
    released: u64,
    arrivals: VecDeque<(u64, Instant)>,
}

enum Mode {
    Compare(Comparator),
    Buffer(OutputBuffer),
}

struct Core {
    mode: Mode,
    conns: HashMap<FlowKey, Conn>,
    latency: Latencies,
    /// When the outstanding checkpoint request was made ([`monotonic_ns`]).
    pending_since: Option<u64>,
    resyncs: u64,
    dropped: u64,
}

struct Shared {
    cfg: ProxyConfig,
    listen: SocketAddr,
    link: EpochLink,
    core: Mutex<Core>,
    open: AtomicU64,
    total: AtomicU64,
    refused: AtomicU64,
    secondary_failures: AtomicU64,
}

/// A handle for status while the proxy runs.
#[derive(Clone)]
pub struct ProxyHandle(Arc<Shared>);

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("listen", &self.0.listen)
            .finish_non_exhaustive()
    }
}

/// The stream proxy, bound and ready to [`run`](Proxy::run).
#[derive(Debug)]
pub struct Proxy {
    handle: ProxyHandle,
    listener: TcpListener,
    events: mpsc::UnboundedReceiver<LinkEvent>,
}

impl Proxy {
    /// Bind the listening socket. `link` and `events` come from [`EpochLink::connect`] (or
    /// [`EpochLink::local`] for comparison without replication; buffering needs a daemon).
    pub async fn bind(
        cfg: ProxyConfig,
        link: EpochLink,
        events: mpsc::UnboundedReceiver<LinkEvent>,
    ) -> Result<Proxy, String> {
        if cfg.secondary.is_none() && link.status().control.is_none() {
            return Err("buffering output (no secondary) needs the primary daemon's control socket: without checkpoints nothing could ever be released".into());
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("listening on {}: {e}", cfg.listen))?;
        let listen = listener.local_addr().map_err(|e| e.to_string())?;
        let mode = match cfg.secondary {
            Some(_) => Mode::Compare(Comparator::new(cfg.compare.clone())),
            None => Mode::Buffer(OutputBuffer::new(cfg.buffer_bytes)),
        };
        let shared = Shared {
            cfg,
            listen,
            link,
            core: Mutex::new(Core {
                mode,
                conns: HashMap::new(),
                latency: Latencies::default(),
                pending_since: None,
                resyncs: 0,
                dropped: 0,
            }),
            open: AtomicU64::new(0),
            total: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            secondary_failures: AtomicU64::new(0),
        };
        Ok(Proxy {
            handle: ProxyHandle(Arc::new(shared)),
            listener,
            events,
        })
    }

    /// Where clients connect (the bound address, port resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.0.listen
    }

    /// A handle for status.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Serve until `stop` turns true. Held output that no commit released is dropped.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let shared = self.handle.0.clone();
        let mut events = self.events;
        let tick = shared.cfg.compare.compare_timeout / 10;
        let mut ticker =
            tokio::time::interval(tick.clamp(Duration::from_millis(1), Duration::from_millis(20)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = blkrep::epoch::until_true(&mut stop) => break,
                _ = ticker.tick() => shared.poll(),
                e = events.recv() => match e {
                    Some(e) => shared.link_event(e),
                    None => break,
                },
                r = self.listener.accept() => match r {
                    Ok((client, peer)) => {
                        if shared.open.fetch_add(1, Ordering::Relaxed) >= shared.cfg.max_connections as u64 {
                            shared.open.fetch_sub(1, Ordering::Relaxed);
                            shared.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%peer, "refused: {} connections open", shared.cfg.max_connections);
                            continue;
                        }
                        let s = shared.clone();
                        conns.spawn(async move { conn::connection(s, client, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        conns.shutdown().await;
    }
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary's next reply bytes. In buffering mode, `Err` gives them back when the
    /// buffer is full: wait for a commit and offer them again.
    fn primary_data(&self, key: FlowKey, data: &[u8]) -> Result<(), ()> {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        let Some(conn) = core.conns.get_mut(&key) else {
            return Ok(());
        };
        let seq = conn.pri_off as u32;
        let actions = match &mut core.mode {
            Mode::Compare(c) => c.primary_tcp(key, seq, TcpFlags::NONE, data, now),
            Mode::Buffer(b) => {
                match b.push(monotonic_ns(), key, Output::Data(data.to_vec())) {
                    Ok(()) => {}
                    Err(BufferError::Full { .. }) => return Err(()),
                    Err(e @ BufferError::Stale { .. }) => {
                        unreachable!("stamps come from one monotonic clock: {e}")
                    }
                }
                Vec::new()
            }
        };
        conn.pri_off += data.len() as u64;
        let end = conn.pri_off;
        conn.arrivals.push_back((end, now));
        self.apply(core, actions, now);
        Ok(())
    }

    /// A new connection: both replies start here. The SYN starts a fresh comparison even if
    /// an ended one of the same client address and port is still remembered.
    fn open_flow(&self, key: FlowKey) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        if let Mode::Compare(c) = &mut core.mode {
            // Stream offset 0 is the byte after the SYN.
            let mut actions = c.primary_tcp(key, u32::MAX, TcpFlags::SYN, &[], now);
            actions.extend(c.secondary_tcp(key, u32::MAX, TcpFlags::SYN, &[], now));
            self.apply(core, actions, now);
        }
    }

    fn secondary_data(&self, key: FlowKey, data: &[u8]) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        let Some(conn) = core.conns.get_mut(&key) else {
            return;
        };
        let seq = conn.sec_off as u32;
        conn.sec_off += data.len() as u64;
        if let Mode::Compare(c) = &mut core.mode {
            let actions = c.secondary_tcp(key, seq, TcpFlags::NONE, data, now);
            self.apply(core, actions, now);
        }
    }

    /// The primary's (`primary`) or the secondary's reply ended: FIN, or RST if `reset`.
    fn end(&self, key: FlowKey, primary: bool, reset: bool) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        let Some(conn) = core.conns.get(&key) else {
            return;
        };
        let flags = if reset { TcpFlags::RST } else { TcpFlags::FIN };
        let seq = if primary { conn.pri_off } else { conn.sec_off } as u32;
        let actions = match &mut core.mode {
            Mode::Compare(c) if primary => c.primary_tcp(key, seq, flags, &[], now),
            Mode::Compare(c) => c.secondary_tcp(key, seq, flags, &[], now),
            Mode::Buffer(b) if primary => {
                // An end has no bytes: it always fits.
                let _ = b.push(monotonic_ns(), key, Output::End { reset });
                Vec::new()
            }
            Mode::Buffer(_) => Vec::new(),
        };
        self.apply(core, actions, now);
    }

    fn poll(&self) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        if let Mode::Compare(c) = &mut core.mode {
            let actions = c.poll(now);
            self.apply(core, actions, now);
        }
    }

    fn link_event(&self, e: LinkEvent) {
        let now = Instant::now();
        let mut core = self.core();
        let core = &mut *core;
        match (e, &mut core.mode) {
            (LinkEvent::Committed { paused_at_ns, .. }, Mode::Compare(c)) => {
                // Only a checkpoint paused after the divergence resyncs the replicas.
                if core.pending_since.is_some_and(|t| paused_at_ns >= t) {
                    core.pending_since = None;
                    core.resyncs += 1;
                    let actions = c.resync_all();
                    for conn in core.conns.values_mut() {
                        conn.sec_off = conn.pri_off;
                    }
                    self.apply(core, actions, now);
                }
            }
            (LinkEvent::Committed { paused_at_ns, .. }, Mode::Buffer(b)) => {
                for (key, out) in b.commit(paused_at_ns) {
                    let Some(conn) = core.conns.get_mut(&key) else {
                        continue;
                    };
                    match out {
                        Output::Data(d) => send(conn, d, now, &mut core.latency),
                        Output::End { reset } => {
                            conn.client.finish(reset);
                        }
                    }
                }
                for conn in core.conns.values() {
                    conn.client.room.notify_one();
                }
            }
            (LinkEvent::Lost(why), Mode::Buffer(b)) => {
                // The primary daemon is gone: what it did not checkpoint must never be seen.
                let (flows, bytes) = b.fail();
                core.dropped += bytes as u64;
                if bytes > 0 {
                    tracing::warn!(
                        "dropped {bytes} bytes of uncommitted output of {} connections: {why}",
                        flows.len()
                    );
                }
                for key in flows {
                    if let Some(conn) = core.conns.get(&key) {
                        conn.client.finish(true);
                    }
                }
            }
            (LinkEvent::Lost(_) | LinkEvent::Connected, _) => {}
        }
    }

    /// Carry out the comparator's actions.
    fn apply(&self, core: &mut Core, actions: Vec<Action>, now: Instant) {
        for a in actions {
            match a {
                Action::Release { key, data } => {
                    if let Some(conn) = core.conns.get_mut(&key) {
                        send(conn, data, now, &mut core.latency);
                    }
                }
                Action::End { key, reset } => {
                    if let Some(conn) = core.conns.get(&key) {
                        conn.client.finish(reset);
                    }
                }
                Action::Checkpoint { key, reason } => {
                    tracing::info!(flow = %key, %reason, "outputs diverged: requesting a checkpoint");
                    core.pending_since.get_or_insert_with(monotonic_ns);
                    self.link.request();
                }
            }
        }
    }

    /// Whether the primary's (`primary`) or the secondary's reply of `key` should wait before
    /// the next read: the client has too much unwritten (primary), the side is more than
    /// [`FLOW_WINDOW`] ahead of the other (compare), or the buffer is full (buffer).
    fn must_wait(&self, key: &FlowKey, primary: bool, client: &Outbox) -> bool {
        if primary && client.queued() >= CLIENT_QUEUE {
            return true;
        }
        let core = self.core();
        match &core.mode {
            Mode::Compare(c) => {
                let (held, pending) = c.backlog(key);
                if primary {
                    held >= FLOW_WINDOW
                } else {
                    pending >= FLOW_WINDOW
                }
            }
            Mode::Buffer(b) => primary && b.is_full(),
        }
    }
}

/// Queue released bytes for the client and record how long they were held.
fn send(conn: &mut Conn, data: Vec<u8>, now: Instant, latency: &mut Latencies) {
    conn.released += data.len() as u64;
    while conn
        .arrivals
        .front()
        .is_some_and(|&(end, _)| end <= conn.released)
    {
        let (_, at) = conn.arrivals.pop_front().expect("not empty");
        latency.record(now.saturating_duration_since(at));
    }
    conn.client.push(data);
    // A reader waiting for the other side to catch up may go on.
    conn.client.room.notify_waiters();
}
