//! The packet mode's frontend ([`PacketProxy`]): three L2 ports carrying whole Ethernet
//! frames — the clients' side, the primary replica's NIC, the secondary replica's NIC — and the
//! [`PacketEngine`] between them.
//!
//! ```text
//!  client port ──▶ engine ──▶ primary port      (unchanged)
//!                    │  └───▶ secondary port    (ACK/SACK/TSecr rewritten)
//!  primary port ───▶ │ held until the secondary's frames confirm them ──▶ client port
//!  secondary port ─▶ │ compared, never sent on
//!                    └─ Out::Checkpoint ──▶ EpochLink::request ── Committed ──▶ engine.resync
//! ```
//!
//! Ports ([`port`]): `tap:NAME` (a TAP interface netcmp creates or attaches to) and
//! `unix:PATH` (a unix stream socket netcmp listens on, framed like QEMU's `-netdev stream`:
//! [`framing`]). Each port is a task; frames read are stamped and queued to the engine task,
//! which calls the engine and queues what it returns to the ports (dropping, and counting,
//! frames for a port without a peer or with [`port::OUT_QUEUE_BYTES`] queued).
//!
//! Checkpoints follow the stream proxy's rule: [`Out::Checkpoint`] records when it was asked
//! for ([`monotonic_ns`]) and asks the [`EpochLink`]; only a commit whose pause began at or
//! after that moment resyncs the engine ([`PacketEngine::resync`]), since only such a
//! checkpoint made the secondary a copy of a primary that already produced the divergent
//! output.
//!
//! Output buffering (no secondary) is not offered in packet mode.

pub mod framing;
pub mod port;
mod status;
mod tap;

pub use port::{PortSpec, Side};
pub use status::{PacketStatus, PortStatus, RewriteStatus};

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blkrep::epoch::{monotonic_ns, Latencies};
use tokio::sync::{mpsc, watch};

use crate::l2::{EngineConfig, Out, PacketEngine};
use crate::link::{EpochLink, LinkEvent};
use port::{Incoming, Port, PortSender};

/// Frames read from the ports and not yet given to the engine; the ports stop reading past it.
const INCOMING_QUEUE: usize = 256;
/// Frames taken from the incoming queue in one go before timers and link events are looked at.
const BATCH: usize = 64;
/// Primary frames whose arrival is remembered to measure their added latency; past it the
/// record starts over (samples lost, nothing else).
const MAX_TRACKED: usize = 64 * 1024;

/// Settings of the packet mode.
#[derive(Debug, Clone)]
pub struct PacketConfig {
    /// The clients' side.
    pub client: PortSpec,
    /// The primary replica's NIC.
    pub primary: PortSpec,
    /// The secondary replica's NIC.
    pub secondary: PortSpec,
    /// The engine's settings.
    pub engine: EngineConfig,
}

impl PacketConfig {
    /// Defaults for everything but the ports.
    pub fn new(client: PortSpec, primary: PortSpec, secondary: PortSpec) -> PacketConfig {
        PacketConfig {
            client,
            primary,
            secondary,
            engine: EngineConfig::default(),
        }
    }
}

/// When each primary frame arrived, to time its release.
#[derive(Debug, Default)]
struct Arrivals {
    at: HashMap<u64, Instant>,
    latency: Latencies,
}

impl Arrivals {
    /// A frame's identity: its length, its first 96 bytes (addresses, IP ID, sequence and
    /// acknowledgment numbers, checksums) and its last 16. Collisions only misplace a sample.
    fn key(frame: &[u8]) -> u64 {
        let mut h = DefaultHasher::new();
        frame.len().hash(&mut h);
        frame[..frame.len().min(96)].hash(&mut h);
        frame[frame.len().saturating_sub(16)..].hash(&mut h);
        h.finish()
    }

    fn arrived(&mut self, frame: &[u8], at: Instant) {
        if self.at.len() >= MAX_TRACKED {
            self.at.clear();
        }
        self.at.insert(Self::key(frame), at);
    }

    fn released(&mut self, frame: &[u8], now: Instant) {
        if let Some(at) = self.at.remove(&Self::key(frame)) {
            self.latency.record(now.saturating_duration_since(at));
        }
    }
}

struct Core {
    engine: PacketEngine,
    arrivals: Arrivals,
    /// When the outstanding checkpoint request was made ([`monotonic_ns`]).
    pending_since: Option<u64>,
    resyncs: u64,
    checkpoints_requested: u64,
}

struct Shared {
    cfg: PacketConfig,
    link: EpochLink,
    core: Mutex<Core>,
    ports: [PortSender; 3],
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn port(&self, side: Side) -> &PortSender {
        &self.ports[side as usize]
    }
}

/// A handle for status while the packet mode runs.
#[derive(Clone)]
pub struct PacketHandle(Arc<Shared>);

impl std::fmt::Debug for PacketHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketHandle")
            .field("client", &self.0.cfg.client)
            .field("primary", &self.0.cfg.primary)
            .field("secondary", &self.0.cfg.secondary)
            .finish_non_exhaustive()
    }
}

/// The packet mode, its ports open and ready to [`run`](PacketProxy::run).
#[derive(Debug)]
pub struct PacketProxy {
    handle: PacketHandle,
    events: mpsc::UnboundedReceiver<LinkEvent>,
    incoming: mpsc::Receiver<Incoming>,
    stop_ports: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PacketProxy {
    /// Open the three ports (TAPs attached, sockets listening) and start their tasks. `link`
    /// and `events` come from [`EpochLink::connect`], or [`EpochLink::local`] to compare
    /// without replication (a divergence resyncs at once).
    pub async fn bind(
        cfg: PacketConfig,
        link: EpochLink,
        events: mpsc::UnboundedReceiver<LinkEvent>,
    ) -> Result<PacketProxy, String> {
        let specs = [&cfg.client, &cfg.primary, &cfg.secondary];
        for (i, a) in specs.iter().enumerate() {
            if specs[i + 1..].contains(a) {
                return Err(format!(
                    "port {a} is given twice: the three ports must differ"
                ));
            }
        }
        let mut opened = Vec::new();
        for (side, spec) in [Side::Client, Side::Primary, Side::Secondary]
            .into_iter()
            .zip(specs)
        {
            let p = Port::open(spec)
                .await
                .map_err(|e| format!("{side} port {spec}: {e}"))?;
            opened.push((side, p));
        }
        let (in_tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        let (stop_ports, stop_rx) = watch::channel(false);
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for (side, p) in opened {
            let (tx, task) = p.spawn(side, in_tx.clone(), stop_rx.clone());
            senders.push(tx);
            tasks.push(task);
        }
        let ports: [PortSender; 3] = senders.try_into().expect("three ports");
        let shared = Shared {
            core: Mutex::new(Core {
                engine: PacketEngine::new(cfg.engine.clone()),
                arrivals: Arrivals::default(),
                pending_since: None,
                resyncs: 0,
                checkpoints_requested: 0,
            }),
            cfg,
            link,
            ports,
        };
        Ok(PacketProxy {
            handle: PacketHandle(Arc::new(shared)),
            events,
            incoming,
            stop_ports,
            tasks,
        })
    }

    /// A handle for status.
    pub fn handle(&self) -> PacketHandle {
        self.handle.clone()
    }

    /// Serve until `stop` turns true; the ports then close (TAPs netcmp created disappear,
    /// sockets are removed). Held frames are not sent.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let shared = self.handle.0.clone();
        let mut events = self.events;
        let mut incoming = self.incoming;
        let tick = shared.cfg.engine.compare.compare_timeout / 10;
        let mut ticker =
            tokio::time::interval(tick.clamp(Duration::from_millis(2), Duration::from_millis(20)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = blkrep::epoch::until_true(&mut stop) => break,
                f = incoming.recv() => {
                    let Some(f) = f else { break };
                    let mut core = shared.core();
                    shared.frame(&mut core, f);
                    for _ in 1..BATCH {
                        match incoming.try_recv() {
                            Ok(f) => shared.frame(&mut core, f),
                            Err(_) => break,
                        }
                    }
                }
                e = events.recv() => match e {
                    Some(e) => shared.link_event(e),
                    None => break,
                },
                _ = ticker.tick() => {
                    let now = Instant::now();
                    let mut core = shared.core();
                    let outs = core.engine.poll(now);
                    shared.dispatch(&mut core, outs, now);
                }
            }
        }
        self.stop_ports.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

impl Shared {
    fn frame(&self, core: &mut Core, (side, frame, at): Incoming) {
        let now = Instant::now();
        let outs = match side {
            Side::Client => core.engine.from_client(frame, now),
            Side::Primary => {
                core.arrivals.arrived(&frame, at);
                core.engine.from_primary(frame, now)
            }
            Side::Secondary => core.engine.from_secondary(frame, now),
        };
        self.dispatch(core, outs, now);
    }

    fn link_event(&self, e: LinkEvent) {
        match e {
            LinkEvent::Committed { paused_at_ns, .. } => {
                let now = Instant::now();
                let mut core = self.core();
                // Only a checkpoint paused after the divergence resyncs the replicas.
                if core.pending_since.is_some_and(|t| paused_at_ns >= t) {
                    core.pending_since = None;
                    core.resyncs += 1;
                    let outs = core.engine.resync(now);
                    self.dispatch(&mut core, outs, now);
                }
            }
            LinkEvent::Lost(why) => {
                tracing::warn!("epoch link lost ({why}): divergences wait for it to come back");
            }
            LinkEvent::Connected => tracing::info!("epoch link back"),
        }
    }

    /// Carry out what the engine returned.
    fn dispatch(&self, core: &mut Core, outs: Vec<Out>, now: Instant) {
        for o in outs {
            match o {
                Out::ToClient(f) => {
                    core.arrivals.released(&f, now);
                    self.port(Side::Client).send(f);
                }
                Out::ToPrimary(f) => self.port(Side::Primary).send(f),
                Out::ToSecondary(f) => self.port(Side::Secondary).send(f),
                Out::Checkpoint(reason) => {
                    tracing::info!("replicas diverged ({reason}): requesting a checkpoint");
                    core.checkpoints_requested += 1;
                    core.pending_since.get_or_insert_with(monotonic_ns);
                    self.link.request();
                }
            }
        }
    }
}

impl PacketHandle {
    fn counters(&self, side: Side) -> &port::PortCounters {
        &self.0.port(side).counters
    }

    /// Whether the port has a peer (a `unix:` port) or is readable (a TAP).
    pub fn connected(&self, side: Side) -> bool {
        self.counters(side).connected.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
