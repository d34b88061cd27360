//! The [`Comparator`]: every flow's comparison, a memory budget over all of them, and the
//! actions the frontend carries out (release output, request a checkpoint, end a flow).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::flow::{FlowKey, Passthrough};
use crate::packet::PacketCompare;
use crate::stream::{StreamConfig, TcpCompare, TcpFlags};
use crate::Event;

/// Settings of the comparator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How long the primary's output waits for the secondary's before it is released anyway
    /// (and a checkpoint requested).
    pub compare_timeout: Duration,
    /// Per side and TCP flow, how far past the next in-order byte a segment may reach and
    /// still be buffered.
    pub max_out_of_order: usize,
    /// The most bytes all flows together may hold (unconfirmed primary output, uncompared
    /// secondary output, out-of-order segments). Past it, the flows holding the oldest output
    /// release it and stop comparing, and a checkpoint is requested.
    pub max_held_bytes: usize,
    /// A flow with no input for this long is forgotten (its held output released first).
    pub idle_timeout: Duration,
    /// How long an ended TCP flow is remembered, so that late segments (a retransmitted FIN)
    /// are ignored instead of starting a comparison that can only time out. A SYN starts a
    /// new comparison at once.
    pub ended_linger: Duration,
    /// Flows released without comparing.
    pub passthrough: Passthrough,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            compare_timeout: Duration::from_millis(100),
            max_out_of_order: 256 * 1024,
            max_held_bytes: 64 * 1024 * 1024,
            idle_timeout: Duration::from_secs(300),
            ended_linger: Duration::from_secs(10),
            passthrough: Passthrough::default(),
        }
    }
}

/// Why a checkpoint is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The outputs differ at this offset (TCP: stream byte; UDP/ICMP: packet number).
    Mismatch {
        /// Where.
        offset: u64,
    },
    /// The secondary did not produce the output at this offset within `compare_timeout`.
    Timeout {
        /// Where.
        offset: u64,
    },
    /// The flows held more than `max_held_bytes`; this flow's output was released unconfirmed.
    MemoryBudget,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Mismatch { offset } => write!(f, "mismatch at offset {offset}"),
            Reason::Timeout { offset } => {
                write!(f, "no secondary output at offset {offset} in time")
            }
            Reason::MemoryBudget => f.write_str("over the held-bytes budget"),
        }
    }
}

/// What the frontend must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this output of the primary to the client. TCP: the next bytes of the flow's
    /// stream, in order (segment them as you like); UDP/ICMP: one whole packet.
    Release {
        /// The flow.
        key: FlowKey,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The flow's output ended (TCP FIN or RST, after all its bytes were released); later
    /// segments of the flow are ignored (for [`Config::ended_linger`], or until a SYN).
    End {
        /// The flow.
        key: FlowKey,
        /// RST rather than FIN.
        reset: bool,
    },
    /// Run a checkpoint: the replicas diverged (or comparison had to stop). At most one
    /// request is outstanding: later divergences before [`Comparator::resync_all`] are
    /// counted but not requested again, since that checkpoint resyncs every flow.
    Checkpoint {
        /// The flow that diverged first.
        key: FlowKey,
        /// Why.
        reason: Reason,
    },
}

/// Counters for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Flows being compared (or passed through) now; ended flows not included.
    pub flows: usize,
    /// Bytes found identical on both sides.
    pub bytes_compared: u64,
    /// Divergences found by comparing (including a stream ending early on one side).
    pub mismatches: u64,
    /// Divergences by timeout.
    pub timeouts: u64,
    /// Flows whose held output was released to keep within `max_held_bytes`.
    pub evictions: u64,
    /// Checkpoints requested ([`Action::Checkpoint`]).
    pub checkpoints_requested: u64,
    /// Bytes released to clients (compared or not).
    pub bytes_released: u64,
    /// TCP segments dropped because they reached past the out-of-order window.
    pub segments_dropped: u64,
    /// Bytes held now.
    pub held_bytes: usize,
    /// The most bytes held at the end of any call.
    pub peak_held_bytes: usize,
}

#[derive(Debug)]
enum Compare {
    Tcp(TcpCompare),
    Packet(PacketCompare),
    /// A TCP flow that ended, remembered for `ended_linger`.
    Ended,
}

impl Compare {
    fn held_bytes(&self) -> usize {
        match self {
            Compare::Tcp(c) => c.held_bytes(),
            Compare::Packet(c) => c.held_bytes(),
            Compare::Ended => 0,
        }
    }
    fn oldest_held(&self) -> Option<Instant> {
        match self {
            Compare::Tcp(c) => c.oldest_held(),
            Compare::Packet(c) => c.oldest_held(),
            Compare::Ended => None,
        }
    }
    fn counters(&self) -> (u64, u64) {
        match self {
            Compare::Tcp(c) => (c.compared(), c.dropped_segments()),
            Compare::Packet(c) => (c.compared(), 0),
            Compare::Ended => (0, 0),
        }
    }
    fn poll(&mut self, now: Instant, out: &mut Vec<Event>) {
        match self {
            Compare::Tcp(c) => c.poll(now, out),
            Compare::Packet(c) => c.poll(now, out),
            Compare::Ended => {}
        }
    }
    fn resync(&mut self, out: &mut Vec<Event>) {
        match self {
            Compare::Tcp(c) => c.resync(out),
            Compare::Packet(c) => c.resync(out),
            Compare::Ended => {}
        }
    }
    fn shed(&mut self, out: &mut Vec<Event>) -> bool {
        match self {
            Compare::Tcp(c) => c.shed(out),
            Compare::Packet(c) => c.shed(out),
            Compare::Ended => false,
        }
    }
}

#[derive(Debug)]
struct Flow {
    cmp: Compare,
    /// `cmp.held_bytes()` as last counted in the table's total.
    held: usize,
    last_input: Instant,
}

/// The comparator core: feed it both replicas' output, poll it, and carry out its actions.
/// It has no clock of its own: every call that needs time takes `now`.
#[derive(Debug)]
pub struct Comparator {
    cfg: Config,
    flows: HashMap<FlowKey, Flow>,
    held: usize,
    checkpoint_pending: bool,
    stats: Stats,
}

impl Comparator {
    /// A comparator with no flows.
    pub fn new(cfg: Config) -> Comparator {
        Comparator {
            cfg,
            flows: HashMap::new(),
            held: 0,
            checkpoint_pending: false,
            stats: Stats::default(),
        }
    }

    /// A TCP segment of the primary's output (`key.proto` is TCP).
    pub fn primary_tcp(
        &mut self,
        key: FlowKey,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
        now: Instant,
    ) -> Vec<Action> {
        self.revive(key, flags);
        self.with_tcp(key, now, |c, out| c.primary(seq, flags, payload, now, out))
    }

    /// A TCP segment of the secondary's output.
    pub fn secondary_tcp(
        &mut self,
        key: FlowKey,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
        now: Instant,
    ) -> Vec<Action> {
        self.revive(key, flags);
        self.with_tcp(key, now, |c, out| c.secondary(seq, flags, payload, out))
    }

    /// A UDP or ICMP packet of the primary's output.
    pub fn primary_packet(&mut self, key: FlowKey, payload: &[u8], now: Instant) -> Vec<Action> {
        self.with_packet(key, now, |c, out| c.primary(payload, now, out))
    }

    /// A UDP or ICMP packet of the secondary's output.
    pub fn secondary_packet(&mut self, key: FlowKey, payload: &[u8], now: Instant) -> Vec<Action> {
        self.with_packet(key, now, |c, out| c.secondary(payload, out))
    }

    /// Check compare timeouts and forget idle and ended flows. Call it every few milliseconds.
    pub fn poll(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let keys: Vec<FlowKey> = self.flows.keys().copied().collect();
        for key in keys {
            let idle = self.flows.get(&key).is_some_and(|f| {
                let limit = match f.cmp {
                    Compare::Ended => self.cfg.ended_linger,
                    _ => self.cfg.idle_timeout,
                };
                now.saturating_duration_since(f.last_input) >= limit
            });
            if idle {
                let mut events = Vec::new();
                if let Some(f) = self.flows.get_mut(&key) {
                    f.cmp.shed(&mut events);
                }
                self.apply(key, events, &mut actions);
                self.remove(key);
            } else {
                self.run(key, &mut actions, |c, out| c.poll(now, out));
            }
        }
        self.finish(&mut actions);
        actions
    }

    /// A checkpoint committed: every flow compares again from its current position (see
    /// [`TcpCompare::resync`]), and a new checkpoint may be requested.
    pub fn resync_all(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        self.checkpoint_pending = false;
        let keys: Vec<FlowKey> = self.flows.keys().copied().collect();
        for key in keys {
            self.run(key, &mut actions, |c, out| c.resync(out));
        }
        self.finish(&mut actions);
        actions
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        Stats {
            flows: self
                .flows
                .values()
                .filter(|f| !matches!(f.cmp, Compare::Ended))
                .count(),
            held_bytes: self.held,
            ..self.stats
        }
    }

    /// A TCP flow's backlog per side ([`TcpCompare::backlog`]): zero for other flows, or
    /// when not comparing.
    pub fn backlog(&self, key: &FlowKey) -> (usize, usize) {
        match self.flows.get(key).map(|f| &f.cmp) {
            Some(Compare::Tcp(c)) => c.backlog(),
            _ => (0, 0),
        }
    }

    /// Bytes held by all flows now.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Whether a requested checkpoint has not been followed by [`Comparator::resync_all`] yet.
    pub fn checkpoint_pending(&self) -> bool {
        self.checkpoint_pending
    }

    fn with_tcp(
        &mut self,
        key: FlowKey,
        now: Instant,
        f: impl FnOnce(&mut TcpCompare, &mut Vec<Event>),
    ) -> Vec<Action> {
        debug_assert_eq!(key.proto, crate::Proto::Tcp);
        let cfg = StreamConfig {
            compare_timeout: self.cfg.compare_timeout,
            max_out_of_order: self.cfg.max_out_of_order,
        };
        let pass = self.cfg.passthrough.matches(&key);
        self.input(
            key,
            now,
            || {
                Compare::Tcp(if pass {
                    TcpCompare::passthrough(cfg)
                } else {
                    TcpCompare::new(cfg)
                })
            },
            |cmp, out| {
                if let Compare::Tcp(c) = cmp {
                    f(c, out)
                }
            },
        )
    }

    fn with_packet(
        &mut self,
        key: FlowKey,
        now: Instant,
        f: impl FnOnce(&mut PacketCompare, &mut Vec<Event>),
    ) -> Vec<Action> {
        debug_assert_ne!(key.proto, crate::Proto::Tcp);
        let timeout = self.cfg.compare_timeout;
        let pass = self.cfg.passthrough.matches(&key);
        self.input(
            key,
            now,
            || {
                Compare::Packet(if pass {
                    PacketCompare::passthrough()
                } else {
                    PacketCompare::new(timeout)
                })
            },
            |cmp, out| {
                if let Compare::Packet(c) = cmp {
                    f(c, out)
                }
            },
        )
    }

    /// A SYN on an ended flow starts a new connection with the same addresses.
    fn revive(&mut self, key: FlowKey, flags: TcpFlags) {
        if flags.syn
            && self
                .flows
                .get(&key)
                .is_some_and(|f| matches!(f.cmp, Compare::Ended))
        {
            self.flows.remove(&key);
        }
    }

    fn input(
        &mut self,
        key: FlowKey,
        now: Instant,
        create: impl FnOnce() -> Compare,
        f: impl FnOnce(&mut Compare, &mut Vec<Event>),
    ) -> Vec<Action> {
        let flow = self.flows.entry(key).or_insert_with(|| Flow {
            cmp: create(),
            held: 0,
            last_input: now,
        });
        flow.last_input = now;
        let mut actions = Vec::new();
        self.run(key, &mut actions, f);
        self.finish(&mut actions);
        actions
    }

    /// Run `f` on one flow and turn its events into actions, keeping the counters.
    fn run(
        &mut self,
        key: FlowKey,
        actions: &mut Vec<Action>,
        f: impl FnOnce(&mut Compare, &mut Vec<Event>),
    ) {
        let Some(flow) = self.flows.get_mut(&key) else {
            return;
        };
        let before = flow.cmp.counters();
        let mut events = Vec::new();
        f(&mut flow.cmp, &mut events);
        let after = flow.cmp.counters();
        self.stats.bytes_compared += after.0 - before.0;
        self.stats.segments_dropped += after.1 - before.1;
        let ended = self.apply(key, events, actions);
        if ended {
            if let Some(flow) = self.flows.get_mut(&key) {
                flow.cmp = Compare::Ended;
            }
        }
        self.recount(key);
    }

    /// Turn events into actions; returns whether the flow ended.
    fn apply(&mut self, key: FlowKey, events: Vec<Event>, actions: &mut Vec<Action>) -> bool {
        let mut ended = false;
        for ev in events {
            match ev {
                Event::Release(data) => {
                    self.stats.bytes_released += data.len() as u64;
                    actions.push(Action::Release { key, data });
                }
                Event::Mismatch { offset } => {
                    self.stats.mismatches += 1;
                    self.request(key, Reason::Mismatch { offset }, actions);
                }
                Event::Timeout { offset } => {
                    self.stats.timeouts += 1;
                    self.request(key, Reason::Timeout { offset }, actions);
                }
                Event::End { reset } => {
                    ended = true;
                    actions.push(Action::End { key, reset });
                }
            }
        }
        ended
    }

    fn request(&mut self, key: FlowKey, reason: Reason, actions: &mut Vec<Action>) {
        if !self.checkpoint_pending {
            self.checkpoint_pending = true;
            self.stats.checkpoints_requested += 1;
            actions.push(Action::Checkpoint { key, reason });
        }
    }

    fn recount(&mut self, key: FlowKey) {
        if let Some(flow) = self.flows.get_mut(&key) {
            let now = flow.cmp.held_bytes();
            self.held = self.held - flow.held + now;
            flow.held = now;
        }
    }

    fn remove(&mut self, key: FlowKey) {
        if let Some(flow) = self.flows.remove(&key) {
            self.held -= flow.held;
        }
    }

    /// Keep within the memory budget: while over it, the flow holding the oldest output
    /// releases it and stops comparing.
    fn finish(&mut self, actions: &mut Vec<Action>) {
        while self.held > self.cfg.max_held_bytes {
            let victim = self
                .flows
                .iter()
                .filter(|(_, f)| f.held > 0)
                .min_by_key(|(_, f)| f.cmp.oldest_held().unwrap_or(f.last_input))
                .map(|(k, _)| *k);
            let Some(key) = victim else {
                break;
            };
            let mut compared = false;
            self.run(key, actions, |c, out| compared = c.shed(out));
            self.stats.evictions += 1;
            if compared {
                self.request(key, Reason::MemoryBudget, actions);
            }
        }
        self.stats.peak_held_bytes = self.stats.peak_held_bytes.max(self.held);
    }
}

#[cfg(test)]
mod tests;
