//! [`PacketEngine`]: packet mode as a synchronous state machine. Frames come in as calls (one
//! per port), time as an [`Instant`] argument, and what to send where comes back as [`Out`]
//! values; there is no I/O and no clock.
//!
//! ```text
//!  client port ──from_client──▶ ToPrimary (unchanged)
//!                            └─▶ ToSecondary (ACK/SACK/TSecr rewritten, maybe queued first)
//!  primary port ─from_primary─▶ held per flow ──(comparator confirms)──▶ ToClient (unchanged)
//!  secondary port ─from_secondary─▶ compared, never sent on
//! ```
//!
//! **Primary output.** IP frames of TCP, UDP and ICMP are given to the [`Comparator`] as the
//! primary's output and the frame itself is held in a FIFO per flow:
//!
//! - TCP: each frame is tagged with the stream offset its payload ends at (stream offsets are
//!   payload bytes after the SYN, as in [`crate::stream`]; the engine mirrors the comparator's
//!   choice of the stream's base). A frame without payload (a pure ACK, a window update) is
//!   tagged with the furthest offset the primary reached; a FIN or RST frame is released only
//!   when the comparator ends the flow ([`crate::Action::End`]). The FIFO's head is released to
//!   the client once the comparator's releases for the flow cover its tag, so the client gets
//!   exactly the primary's frames, unmodified and in order, whatever segmentation the
//!   secondary used. `End` releases the rest; after it, the flow's frames pass at once until
//!   a SYN starts it again.
//! - A SYN (or SYN-ACK) without payload is released at once: the handshake is not output to
//!   compare. It reaches the comparator lazily, just before that replica's next segment of the
//!   connection (see [`super::rewrite::RewriteTable::take_unfed_syn`]), so the comparator
//!   still learns each side's ISN but a flood of handshakes creates no comparator flows.
//!   When a replica accepts a new connection on addresses whose old comparison never ended
//!   (the client reset it: the replicas then drop it silently), the old comparison is ended
//!   first, as reset.
//! - UDP and ICMP: one held frame per comparator release, in order.
//! - Frames that do not parse, IP fragments (not reassembled), other IP protocols and non-IP
//!   frames (ARP...) pass to the client at once, uncompared and counted.
//!
//! **Secondary output** is only compared (and teaches the rewrite table the secondary's ISNs);
//! nothing of it reaches the client. Its non-IP, malformed, fragmented and other-protocol
//! frames are dropped and counted.
//!
//! **Client input** goes to both replicas; TCP frames to the secondary through the
//! [`RewriteTable`]. Non-IP frames go to both unchanged, fragments too (not rewritten);
//! malformed IP frames are dropped and counted.
//!
//! **Bounds.** Held frames count toward [`EngineConfig::max_held_frame_bytes`] (each frame's
//! length plus [`HELD_FRAME_OVERHEAD`]); past it, the flow holding the oldest frame releases
//! all its frames unconfirmed and a checkpoint is requested. A frame held longer than
//! [`EngineConfig::hold_timeout`] (one whose bytes the comparator never releases: a segment
//! past its out-of-order window, say) is released the same way. The engine's flow states are
//! bounded by [`EngineConfig::max_flows`] (least recently used evicted, its frames released
//! unconfirmed); the rewrite table by [`RewriteConfig::max_connections`]; the comparator's
//! own flows by bytes and its idle timeout (see [`Comparator`]).
//!
//! **Checkpoints.** [`Out::Checkpoint`] is emitted at most once until [`PacketEngine::resync`].
//!
//! **Resync.** Once a checkpoint committed, the secondary is a copy of the primary, TCP stack
//! included: on every connection open at that moment it uses the primary's sequence numbers
//! and timestamp base. So the comparator compares in the primary's sequence space again
//! ([`Comparator::resync_all`]) and the rewrite offsets become 0 ([`RewriteTable::resync`];
//! QEMU's filter-rewriter also zeroes its offsets on a checkpoint). Keeping the old offsets
//! would shift the client's ACKs past what the secondary sent. Connections opened after the
//! checkpoint learn their own offsets from their SYN-ACKs.
//!
//! **Not handled.**
//! - IP fragments are not reassembled: from the primary they pass uncompared, from the client
//!   they are mirrored unrewritten (a fragmented ACK reaches the secondary in the primary's
//!   sequence space), from the secondary they are dropped.
//! - ICMP errors from the client quoting a TCP header (fragmentation needed...) reach the
//!   secondary with the quoted sequence numbers in the primary's space.
//! - IP protocols other than TCP, UDP and ICMP (and TCP behind an IPv6 header other than
//!   hop-by-hop, routing, destination options or an atomic fragment header, such as AH) pass
//!   uncompared; IPv6 jumbograms are malformed.
//! - A TCP segment that starts past a FIN its sender already sent is not compared (the
//!   comparator's reassembly cannot take it; no correct sender sends one); the primary's
//!   passes to the client at once.
//! - The timestamp offset is learned once per connection: the secondary's timestamp clock is
//!   taken to tick at the primary's rate.
//! - An engine flow state evicted while the comparator still holds bytes of that flow: the
//!   comparator's later releases of those bytes count toward the flow's next frames (a
//!   checkpoint was requested if frames were held). Only with more than `max_flows` active
//!   flows.

use std::time::{Duration, Instant};

use super::frame::{parse, Ip, Tcp, Transport};
use super::held::{FlowState, Totals};
use super::lru::Lru;
use super::rewrite::{Offsets, Replica, RewriteConfig, RewriteStats, RewriteTable};
use crate::flow::FlowKey;
use crate::stream::TcpFlags;
use crate::table::{Action, Comparator, Config, Stats};

pub use super::held::HELD_FRAME_OVERHEAD;

/// Settings of the [`PacketEngine`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The comparator's settings.
    pub compare: Config,
    /// The rewrite table's settings.
    pub rewrite: RewriteConfig,
    /// The most bytes of primary frames held over all flows (plus
    /// [`HELD_FRAME_OVERHEAD`] per frame).
    pub max_held_frame_bytes: usize,
    /// The most flows the engine keeps state for (least recently used evicted).
    pub max_flows: usize,
    /// A frame held this long is released unconfirmed (and a checkpoint requested). Taken as
    /// at least twice `compare.compare_timeout`.
    pub hold_timeout: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            compare: Config::default(),
            rewrite: RewriteConfig::default(),
            max_held_frame_bytes: 64 * 1024 * 1024,
            max_flows: 256 * 1024,
            hold_timeout: Duration::from_secs(1),
        }
    }
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Send this frame on the client port.
    ToClient(Vec<u8>),
    /// Send this frame on the primary's port.
    ToPrimary(Vec<u8>),
    /// Send this frame on the secondary's port.
    ToSecondary(Vec<u8>),
    /// Run a checkpoint (the replicas diverged, or output was released unconfirmed).
    Checkpoint(String),
}

/// Counters of one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received on the port.
    pub frames_in: u64,
    /// Frames sent on the port.
    pub frames_out: u64,
    /// Frames received that did not parse.
    pub malformed: u64,
    /// Non-IP frames received (passed on from the client and the primary, dropped from the
    /// secondary).
    pub non_ip: u64,
}

/// Counters of the [`PacketEngine`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// The client's port.
    pub client: PortStats,
    /// The primary's port.
    pub primary: PortStats,
    /// The secondary's port.
    pub secondary: PortStats,
    /// IP fragments received on any port (mirrored, passed or dropped uncompared).
    pub fragments: u64,
    /// Replica frames of IP protocols other than TCP, UDP and ICMP.
    pub other_protocols: u64,
    /// Flows the engine keeps state for now.
    pub flows: usize,
    /// Flow states evicted from a full table.
    pub flows_evicted: u64,
    /// Primary frames held now.
    pub held_frames: usize,
    /// Bytes they count (with the per-frame overhead).
    pub held_frame_bytes: usize,
    /// The most counted at the end of any call.
    pub peak_held_frame_bytes: usize,
    /// Frames released unconfirmed (budget, hold timeout, eviction).
    pub forced_releases: u64,
    /// TCP comparisons ended because the primary accepted a new connection on their
    /// addresses (the client had reset the old one).
    pub stale_ended: u64,
    /// Replica TCP segments starting past a FIN of the same side: not compared (the
    /// primary's pass to the client).
    pub past_fin: u64,
    /// [`Out::Checkpoint`]s emitted.
    pub checkpoints: u64,
    /// The rewrite table's counters.
    pub rewrite: RewriteStats,
    /// The comparator's counters.
    pub compare: Stats,
}

/// Packet mode: mirror the client's frames to both replicas, compare the replicas' output and
/// release the primary's frames to the client as the secondary confirms them.
#[derive(Debug)]
pub struct PacketEngine {
    cfg: EngineConfig,
    cmp: Comparator,
    rewrite: RewriteTable,
    flows: Lru<FlowKey, FlowState>,
    held: Totals,
    checkpoint_pending: bool,
    stats: EngineStats,
}

impl PacketEngine {
    /// A new engine.
    pub fn new(cfg: EngineConfig) -> PacketEngine {
        PacketEngine {
            cmp: Comparator::new(cfg.compare.clone()),
            rewrite: RewriteTable::new(cfg.rewrite.clone()),
            cfg,
            flows: Lru::new(),
            held: Totals::default(),
            checkpoint_pending: false,
            stats: EngineStats::default(),
        }
    }

    /// A frame from the client: to the primary unchanged, to the secondary rewritten (or
    /// queued until the connection's offset is known). A malformed IP frame is dropped.
    pub fn from_client(&mut self, frame: Vec<u8>, now: Instant) -> Vec<Out> {
        self.stats.client.frames_in += 1;
        let mut out = Vec::new();
        match parse(&frame) {
            Err(_) => self.stats.client.malformed += 1,
            Ok(f) => match f.ip {
                None => {
                    self.stats.client.non_ip += 1;
                    out.push(Out::ToPrimary(frame.clone()));
                    out.push(Out::ToSecondary(frame));
                }
                Some(ip) => {
                    out.push(Out::ToPrimary(frame.clone()));
                    self.stats.fragments += u64::from(ip.fragment);
                    match ip.transport {
                        Transport::Tcp(tcp) => {
                            let sent = self.rewrite.client_frame(frame, &ip, &tcp, now);
                            out.extend(sent.into_iter().map(Out::ToSecondary));
                        }
                        _ => out.push(Out::ToSecondary(frame)),
                    }
                }
            },
        }
        self.finish(&mut out);
        out
    }

    /// A frame from the primary: compared and held (TCP, UDP, ICMP), or passed to the client at
    /// once (handshake, non-IP, malformed, fragments, other protocols).
    pub fn from_primary(&mut self, frame: Vec<u8>, now: Instant) -> Vec<Out> {
        self.stats.primary.frames_in += 1;
        let mut out = Vec::new();
        match parse(&frame) {
            Err(_) => {
                self.stats.primary.malformed += 1;
                out.push(Out::ToClient(frame));
            }
            Ok(f) => match f.ip {
                None => {
                    self.stats.primary.non_ip += 1;
                    out.push(Out::ToClient(frame));
                }
                Some(ip) => self.replica_ip(Replica::Primary, frame, &ip, now, &mut out),
            },
        }
        self.finish(&mut out);
        out
    }

    /// A frame from the secondary: compared, never sent to the client. Non-IP, malformed,
    /// fragmented and other-protocol frames are dropped.
    pub fn from_secondary(&mut self, frame: Vec<u8>, now: Instant) -> Vec<Out> {
        self.stats.secondary.frames_in += 1;
        let mut out = Vec::new();
        match parse(&frame) {
            Err(_) => self.stats.secondary.malformed += 1,
            Ok(f) => match f.ip {
                None => self.stats.secondary.non_ip += 1,
                Some(ip) => self.replica_ip(Replica::Secondary, frame, &ip, now, &mut out),
            },
        }
        self.finish(&mut out);
        out
    }

    /// Check the comparator's timeouts, forget idle and ended flows and connections, release
    /// frames held past the hold timeout. Call it every few milliseconds.
    pub fn poll(&mut self, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        let actions = self.cmp.poll(now);
        self.apply(actions, &mut out);
        // Forget what the comparator forgot (the same rule on the same inputs), and release
        // frames held past the hold timeout.
        let (idle, linger) = (self.cfg.compare.idle_timeout, self.cfg.compare.ended_linger);
        let hold = self
            .cfg
            .hold_timeout
            .max(2 * self.cfg.compare.compare_timeout);
        let mut late = Vec::new();
        for key in self.flows.keys() {
            let Some(st) = self.flows.get_mut(&key) else {
                continue;
            };
            let limit = if st.ended { linger } else { idle };
            if now.saturating_duration_since(st.last_input) >= limit {
                let mut st = self.flows.remove(&key).expect("present");
                late.extend(st.take_unconfirmed(&mut self.held));
            } else {
                late.extend(st.take_expired(now, hold, &mut self.held));
            }
        }
        self.release_unconfirmed(late, &mut out);
        self.rewrite.poll(now);
        self.finish(&mut out);
        out
    }

    /// A checkpoint committed: every flow compares again ([`Comparator::resync_all`]), a new
    /// checkpoint may be requested, and the rewrite offsets become 0 (the secondary is now a
    /// copy of the primary and uses its sequence numbers; see [`RewriteTable::resync`]), which
    /// sends the frames queued for connections whose primary ISN is known. `now` is not used
    /// today (the call takes it like the others).
    pub fn resync(&mut self, _now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        self.checkpoint_pending = false;
        let actions = self.cmp.resync_all();
        self.apply(actions, &mut out);
        for key in self.flows.keys() {
            if let Some(st) = self.flows.get_mut(&key) {
                st.resync();
            }
        }
        out.extend(self.rewrite.resync().into_iter().map(Out::ToSecondary));
        self.finish(&mut out);
        out
    }

    /// The counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            flows: self.flows.len(),
            held_frames: self.held.frames,
            held_frame_bytes: self.held.bytes,
            rewrite: self.rewrite.stats(),
            compare: self.cmp.stats(),
            ..self.stats
        }
    }

    /// Whether an [`Out::Checkpoint`] was emitted and [`PacketEngine::resync`] not called since.
    pub fn checkpoint_pending(&self) -> bool {
        self.checkpoint_pending
    }

    /// The rewrite offsets of TCP connection `key` (the replica's end first), once known.
    pub fn rewrite_offsets(&self, key: &FlowKey) -> Option<Offsets> {
        self.rewrite.offsets(key)
    }

    fn replica_ip(
        &mut self,
        side: Replica,
        frame: Vec<u8>,
        ip: &Ip,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let primary = side == Replica::Primary;
        let Some(key) = ip.output_key() else {
            if ip.fragment {
                self.stats.fragments += 1;
            } else {
                self.stats.other_protocols += 1;
            }
            if primary {
                out.push(Out::ToClient(frame));
            }
            return;
        };
        let Transport::Tcp(tcp) = ip.transport else {
            let payload = ip.payload(&frame);
            let actions = if primary {
                self.cmp.primary_packet(key, payload, now)
            } else {
                self.cmp.secondary_packet(key, payload, now)
            };
            self.state(key, now, out);
            if primary {
                self.hold(key, frame, 0, now);
            }
            self.apply(actions, out);
            return;
        };
        let sent = self.rewrite.replica_frame(side, key, &tcp, now);
        out.extend(sent.into_iter().map(Out::ToSecondary));
        let flags = tcp.compare_flags();
        if flags.syn && tcp.payload_at == tcp.payload_end {
            if primary {
                out.push(Out::ToClient(frame));
            }
            return;
        }
        let unfed = self.rewrite.take_unfed_syn(side, key);
        if flags.syn || unfed.is_some() {
            let isn = if flags.syn { Some(tcp.seq) } else { unfed };
            self.end_stale(side, key, isn, now, out);
        }
        if let (Some(isn), false) = (unfed, flags.syn) {
            self.feed_tcp(side, key, isn, TcpFlags::SYN, Vec::new(), &tcp, now, out);
        }
        self.feed_tcp(side, key, tcp.seq, flags, frame, &tcp, now, out);
    }

    /// A replica accepted a new connection on `key` (its SYN, at `isn`, is about to be fed)
    /// while an older one is still compared there: the client reset the old one, and a reset
    /// connection leaves the replicas silently, so the comparator never saw it end. End it as
    /// reset (its held output goes to the client, which ignores it) so that the SYN starts a
    /// new comparison. The connections are told apart by the rewrite table's generation, or,
    /// for a comparison begun without a SYN, by the primary's ISN.
    fn end_stale(
        &mut self,
        side: Replica,
        key: FlowKey,
        isn: Option<u32>,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let generation = self.rewrite.generation(&key);
        let st = self.state(key, now, out);
        let Some(pos) = st.tcp.as_ref() else {
            return;
        };
        let (Some(seq), Some(base)) = (pos.released_seq(), pos.base) else {
            return;
        };
        let stale = match (st.connection, generation) {
            (Some(old), Some(new)) => old != new,
            (None, _) => side == Replica::Primary && isn.is_some_and(|i| base != i.wrapping_add(1)),
            (Some(_), None) => false,
        };
        if st.ended || !stale {
            return;
        }
        self.stats.stale_ended += 1;
        let actions = self.cmp.primary_tcp(key, seq, TcpFlags::RST, &[], now);
        self.apply(actions, out);
    }

    /// Give one TCP segment to the comparator; a primary segment's frame (when not empty: a
    /// lazily fed SYN has none) is held until the comparator's releases cover it.
    #[allow(clippy::too_many_arguments)]
    fn feed_tcp(
        &mut self,
        side: Replica,
        key: FlowKey,
        seq: u32,
        flags: TcpFlags,
        frame: Vec<u8>,
        tcp: &Tcp,
        now: Instant,
        out: &mut Vec<Out>,
    ) {
        let payload: &[u8] = if frame.is_empty() {
            &[]
        } else {
            tcp.payload(&frame)
        };
        let generation = self.rewrite.generation(&key);
        let st = self.state(key, now, out);
        if flags.syn && st.ended {
            // The comparator starts a new comparison on a SYN after the end.
            *st = FlowState::new(&key, now);
        }
        if flags.syn && st.connection.is_none() {
            st.connection = generation;
        }
        let i = usize::from(side == Replica::Secondary);
        if !st.ended && st.past_fin(i, seq, flags, payload.len()) {
            self.stats.past_fin += 1;
            if side == Replica::Primary && !frame.is_empty() {
                out.push(Out::ToClient(frame));
            }
            return;
        }
        let ended = st.ended;
        let mut until = 0;
        if side == Replica::Primary && !ended {
            if let Some(pos) = st.tcp.as_mut() {
                until = pos.tag(seq, flags, payload.len());
            }
        }
        let actions = match side {
            Replica::Primary => self.cmp.primary_tcp(key, seq, flags, payload, now),
            Replica::Secondary => self.cmp.secondary_tcp(key, seq, flags, payload, now),
        };
        if side == Replica::Primary && !frame.is_empty() {
            if ended {
                out.push(Out::ToClient(frame));
            } else {
                self.hold(key, frame, until, now);
            }
        }
        self.apply(actions, out);
        if let Some(st) = self.flows.get_mut(&key) {
            let ready = st.covered(&mut self.held);
            out.extend(ready.into_iter().map(Out::ToClient));
        }
    }

    /// The state of `key` (created if needed, evicting the least recently used one if the
    /// table is full), marked as having input now.
    fn state(&mut self, key: FlowKey, now: Instant, out: &mut Vec<Out>) -> &mut FlowState {
        if self.flows.get(&key).is_none() {
            while self.flows.len() >= self.cfg.max_flows.max(1) {
                let Some((_, mut st)) = self.flows.pop_oldest() else {
                    break;
                };
                self.stats.flows_evicted += 1;
                let frames = st.take_unconfirmed(&mut self.held);
                self.release_unconfirmed(frames, out);
            }
            self.flows.insert(key, FlowState::new(&key, now));
        }
        self.flows.touch(&key);
        let st = self.flows.get_mut(&key).expect("just inserted");
        st.last_input = now;
        st
    }

    fn hold(&mut self, key: FlowKey, frame: Vec<u8>, until: u64, since: Instant) {
        if let Some(st) = self.flows.get_mut(&key) {
            st.push(frame, until, since, &mut self.held);
        }
    }

    fn apply(&mut self, actions: Vec<Action>, out: &mut Vec<Out>) {
        for a in actions {
            let ready = match a {
                Action::Release { key, data } => match self.flows.get_mut(&key) {
                    Some(st) => st.released(data.len(), &mut self.held),
                    None => continue,
                },
                Action::End { key, .. } => match self.flows.get_mut(&key) {
                    Some(st) => st.end(&mut self.held),
                    None => continue,
                },
                Action::Checkpoint { key, reason } => {
                    self.request(format!("{reason:?} on {key}"), out);
                    continue;
                }
            };
            out.extend(ready.into_iter().map(Out::ToClient));
        }
    }

    /// Send frames taken out of flows to the client unconfirmed and request a checkpoint.
    fn release_unconfirmed(&mut self, frames: Vec<Vec<u8>>, out: &mut Vec<Out>) {
        if frames.is_empty() {
            return;
        }
        self.stats.forced_releases += frames.len() as u64;
        out.extend(frames.into_iter().map(Out::ToClient));
        self.request("primary frames released unconfirmed".into(), out);
    }

    fn request(&mut self, reason: String, out: &mut Vec<Out>) {
        if !self.checkpoint_pending {
            self.checkpoint_pending = true;
            self.stats.checkpoints += 1;
            out.push(Out::Checkpoint(reason));
        }
    }

    /// Keep within the held-frame budget, count what goes out.
    fn finish(&mut self, out: &mut Vec<Out>) {
        while self.held.bytes > self.cfg.max_held_frame_bytes {
            let victim = self
                .flows
                .iter()
                .filter_map(|(k, st)| st.oldest().map(|t| (t, *k)))
                .min();
            let Some(st) = victim.and_then(|(_, key)| self.flows.get_mut(&key)) else {
                break;
            };
            let frames = st.take_unconfirmed(&mut self.held);
            self.release_unconfirmed(frames, out);
        }
        self.stats.peak_held_frame_bytes = self.stats.peak_held_frame_bytes.max(self.held.bytes);
        for o in out.iter() {
            match o {
                Out::ToClient(_) => self.stats.client.frames_out += 1,
                Out::ToPrimary(_) => self.stats.primary.frames_out += 1,
                Out::ToSecondary(_) => self.stats.secondary.frames_out += 1,
                Out::Checkpoint(_) => {}
            }
        }
    }
}
