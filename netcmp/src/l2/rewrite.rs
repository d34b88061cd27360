//! TCP sequence and timestamp rewriting for the secondary (what QEMU's filter-rewriter does,
//! done here on the client's frames instead of in the secondary's host).
//!
//! The client talks to the primary: it sees the primary's SYN-ACK, so its acknowledgment
//! numbers, SACK edges and echoed timestamps (TSecr) are in the primary's spaces. The
//! secondary, which gets a copy of every client frame, picked its own initial sequence number
//! (and its timestamps run from its own base), so per connection the table learns
//!
//! - `seq offset = ISN(secondary) - ISN(primary)`, and
//! - `ts offset = TSval(secondary SYN) - TSval(primary SYN)` (0 unless both had the option),
//!
//! from each replica's SYN or SYN-ACK (a connection the replica accepts: SYN-ACK; one it opens:
//! SYN), and adds them to the client's ACK number, SACK edges and TSecr on the way to the
//! secondary, fixing the TCP checksum incrementally (RFC 1624). The client's own sequence
//! numbers need nothing: both replicas see the same client.
//!
//! Until both replicas' ISNs are known, client frames with ACK set are queued (bounded per
//! connection by count and bytes, and over all connections by bytes; overflow drops the
//! oldest, counted) and flushed, rewritten, when the second ISN arrives. Frames without ACK
//! (the client's SYN, a bare RST) carry nothing to rewrite and pass at once.
//!
//! Client frames of connections the table does not know pass unrewritten (counted as
//! `unknown`): that is right for connections opened before the last checkpoint (see
//! [`RewriteTable::resync`]) and wrong for a connection evicted from a full table while its
//! offset was nonzero — the secondary then diverges and the comparator asks for a checkpoint,
//! which makes the offset 0 again.
//!
//! A connection ends on FIN both ways (the client's and the primary's) or an RST from the
//! client or the primary, and is forgotten [`RewriteConfig::linger`] later (the last ACKs
//! still need rewriting); a connection idle for [`RewriteConfig::idle_timeout`] is forgotten
//! too. The table holds at most [`RewriteConfig::max_connections`]: past it the least recently
//! used connection is evicted (counted).
//!
//! The table also remembers, per replica, whether that replica's SYN was given to the
//! comparator yet ([`RewriteTable::take_unfed_syn`]): the engine hands a SYN to the comparator
//! only with the connection's first later segment, so a flood of handshakes costs the
//! comparator nothing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::checksum;
use super::frame::{tcp_flags, Ip, Tcp};
use super::lru::Lru;
use crate::flow::FlowKey;

/// One of the two replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Replica {
    /// The primary: its output goes to the client.
    Primary,
    /// The secondary: its output is only compared.
    Secondary,
}

impl Replica {
    fn index(self) -> usize {
        match self {
            Replica::Primary => 0,
            Replica::Secondary => 1,
        }
    }
}

/// What is added to a client frame's fields for the secondary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offsets {
    /// Added to the ACK number and SACK edges.
    pub seq: u32,
    /// Added to the timestamps option's TSecr.
    pub ts: u32,
}

/// Settings of the [`RewriteTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteConfig {
    /// The most connections remembered; past it the least recently used is evicted.
    pub max_connections: usize,
    /// The most client frames queued per connection while its offset is unknown.
    pub max_queued_frames: usize,
    /// The most bytes queued per connection.
    pub max_queued_bytes: usize,
    /// The most bytes queued over all connections.
    pub max_total_queued_bytes: usize,
    /// How long an ended connection is remembered.
    pub linger: Duration,
    /// A connection with no frame for this long is forgotten.
    pub idle_timeout: Duration,
}

impl Default for RewriteConfig {
    fn default() -> Self {
        RewriteConfig {
            max_connections: 65536,
            max_queued_frames: 64,
            max_queued_bytes: 256 * 1024,
            max_total_queued_bytes: 16 * 1024 * 1024,
            linger: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Counters of the [`RewriteTable`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// Connections remembered now.
    pub connections: usize,
    /// Client frames queued now.
    pub queued_frames: usize,
    /// Bytes of client frames queued now.
    pub queued_bytes: usize,
    /// Client frames whose fields were changed.
    pub rewritten: u64,
    /// Client frames queued (in all).
    pub queued: u64,
    /// Queued frames sent once the offset was known.
    pub flushed: u64,
    /// Queued frames dropped (queue full, connection evicted, forgotten or reopened).
    pub queue_dropped: u64,
    /// Connections evicted from a full table.
    pub evicted: u64,
    /// Connections forgotten after their linger or idle timeout.
    pub expired: u64,
    /// Client frames of connections the table did not know (passed unrewritten).
    pub unknown: u64,
}

#[derive(Debug)]
struct Conn {
    /// Which connection on these addresses this is ([`RewriteTable::generation`]).
    generation: u64,
    client_isn: Option<u32>,
    /// Per replica ([`Replica::index`]): the ISN, the SYN's TSval, whether the SYN was fed.
    isn: [Option<u32>; 2],
    tsval: [Option<u32>; 2],
    syn_fed: [bool; 2],
    client_fin: bool,
    primary_fin: bool,
    reset: bool,
    closed_at: Option<Instant>,
    last_seen: Instant,
    queue: VecDeque<(Vec<u8>, Tcp)>,
    queue_bytes: usize,
}

impl Conn {
    fn new(generation: u64, now: Instant) -> Conn {
        Conn {
            generation,
            client_isn: None,
            isn: [None; 2],
            tsval: [None; 2],
            syn_fed: [false; 2],
            client_fin: false,
            primary_fin: false,
            reset: false,
            closed_at: None,
            last_seen: now,
            queue: VecDeque::new(),
            queue_bytes: 0,
        }
    }

    fn offsets(&self) -> Option<Offsets> {
        let (p, s) = (self.isn[0]?, self.isn[1]?);
        let ts = match (self.tsval[0], self.tsval[1]) {
            (Some(p), Some(s)) => s.wrapping_sub(p),
            _ => 0,
        };
        Some(Offsets {
            seq: s.wrapping_sub(p),
            ts,
        })
    }
}

/// The per-connection rewriting state of the client's frames for the secondary.
#[derive(Debug)]
pub struct RewriteTable {
    cfg: RewriteConfig,
    conns: Lru<FlowKey, Conn>,
    /// Ended connections in the order they ended: (when, key).
    closing: VecDeque<(Instant, FlowKey)>,
    queued_bytes: usize,
    queued_frames: usize,
    generations: u64,
    stats: RewriteStats,
}

/// The connection key of a client frame: the replica's end first, as for the replica's output.
pub fn client_frame_key(ip: &Ip, tcp: &Tcp) -> FlowKey {
    FlowKey::tcp(
        SocketAddr::new(ip.dst, tcp.dst_port),
        SocketAddr::new(ip.src, tcp.src_port),
    )
}

impl RewriteTable {
    /// An empty table.
    pub fn new(cfg: RewriteConfig) -> RewriteTable {
        RewriteTable {
            cfg,
            conns: Lru::new(),
            closing: VecDeque::new(),
            queued_bytes: 0,
            queued_frames: 0,
            generations: 0,
            stats: RewriteStats::default(),
        }
    }

    /// A TCP frame from the client (`ip`, `tcp`: its parse), to be sent to the secondary.
    /// Returns what to send to the secondary now, in order: the frame rewritten, or nothing if
    /// it was queued.
    pub fn client_frame(
        &mut self,
        mut frame: Vec<u8>,
        ip: &Ip,
        tcp: &Tcp,
        now: Instant,
    ) -> Vec<Vec<u8>> {
        let key = client_frame_key(ip, tcp);
        if tcp.has(tcp_flags::SYN) && !tcp.has(tcp_flags::ACK) {
            let fresh = self.conns.get(&key).is_none_or(|c| {
                c.closed_at.is_some() || c.client_isn.is_some_and(|i| i != tcp.seq)
            });
            if fresh {
                self.open(key, now);
            }
            if let Some(c) = self.conns.get_mut(&key) {
                c.client_isn = Some(tcp.seq);
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            self.stats.unknown += 1;
            return vec![frame];
        };
        conn.last_seen = now;
        conn.client_fin |= tcp.has(tcp_flags::FIN);
        conn.reset |= tcp.has(tcp_flags::RST);
        let offsets = conn.offsets();
        self.note_close(key, now);
        self.conns.touch(&key);
        if !tcp.has(tcp_flags::ACK) {
            return vec![frame];
        }
        match offsets {
            Some(o) => {
                if rewrite_for_secondary(&mut frame, tcp, o) {
                    self.stats.rewritten += 1;
                }
                vec![frame]
            }
            None => {
                self.enqueue(key, frame, *tcp);
                Vec::new()
            }
        }
    }

    /// A TCP frame of a replica's output on connection `key` (the replica's end first). Learns
    /// the replica's ISN and TSval from its SYN (or SYN-ACK) and notes the primary's FIN or
    /// RST. Returns queued client frames that became sendable to the secondary, rewritten.
    pub fn replica_frame(
        &mut self,
        side: Replica,
        key: FlowKey,
        tcp: &Tcp,
        now: Instant,
    ) -> Vec<Vec<u8>> {
        let i = side.index();
        if tcp.has(tcp_flags::SYN) {
            let opening = !tcp.has(tcp_flags::ACK);
            let fresh = self.conns.get(&key).is_none_or(|c| {
                c.closed_at.is_some() || (opening && c.isn[i].is_some_and(|x| x != tcp.seq))
            });
            if fresh {
                self.open(key, now);
            }
            if let Some(c) = self.conns.get_mut(&key) {
                if c.isn[i].is_none() {
                    c.isn[i] = Some(tcp.seq);
                    c.tsval[i] = tcp.options.timestamps.map(|t| t.val);
                }
            }
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return Vec::new();
        };
        conn.last_seen = now;
        if side == Replica::Primary {
            conn.primary_fin |= tcp.has(tcp_flags::FIN);
            conn.reset |= tcp.has(tcp_flags::RST);
        }
        self.note_close(key, now);
        self.conns.touch(&key);
        self.flush(key)
    }

    /// The replica's ISN on connection `key` if it is known and was not taken before; marks
    /// it taken. The engine gives a replica's SYN to the comparator only with that replica's
    /// next segment of the connection.
    pub fn take_unfed_syn(&mut self, side: Replica, key: FlowKey) -> Option<u32> {
        let c = self.conns.get_mut(&key)?;
        let i = side.index();
        if c.syn_fed[i] {
            return None;
        }
        let isn = c.isn[i]?;
        c.syn_fed[i] = true;
        Some(isn)
    }

    /// A number telling the connections on `key` apart: each one the table starts (on a SYN)
    /// gets a new one.
    pub fn generation(&self, key: &FlowKey) -> Option<u64> {
        Some(self.conns.get(key)?.generation)
    }

    /// The offsets of connection `key`, once both ISNs are known.
    pub fn offsets(&self, key: &FlowKey) -> Option<Offsets> {
        self.conns.get(key)?.offsets()
    }

    /// A checkpoint committed: the secondary is now a copy of the primary, TCP state
    /// included, so on every connection it uses the primary's sequence numbers and timestamp
    /// base from here on and every offset becomes 0 (QEMU's filter-rewriter does the same on
    /// a checkpoint). A connection whose primary ISN is known takes it as the secondary's;
    /// frames queued for it go out now, unchanged. On one whose primary has not answered yet
    /// the secondary's earlier SYN-ACK is forgotten: both replicas will answer from the same
    /// state, and the secondary's answer is learned again. Returns the frames to send to the
    /// secondary.
    pub fn resync(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for key in self.conns.keys() {
            if let Some(c) = self.conns.get_mut(&key) {
                c.isn[1] = c.isn[0];
                c.tsval[1] = c.tsval[0];
            }
            out.extend(self.flush(key));
        }
        out
    }

    /// Forget connections past their linger or idle timeout.
    pub fn poll(&mut self, now: Instant) {
        while let Some(&(t, key)) = self.closing.front() {
            if now.saturating_duration_since(t) < self.cfg.linger {
                break;
            }
            self.closing.pop_front();
            if self.conns.get(&key).is_some_and(|c| c.closed_at == Some(t)) {
                self.forget(key);
                self.stats.expired += 1;
            }
        }
        while let Some((&key, c)) = self.conns.oldest() {
            if now.saturating_duration_since(c.last_seen) < self.cfg.idle_timeout {
                break;
            }
            self.forget(key);
            self.stats.expired += 1;
        }
    }

    /// The counters.
    pub fn stats(&self) -> RewriteStats {
        RewriteStats {
            connections: self.conns.len(),
            queued_frames: self.queued_frames,
            queued_bytes: self.queued_bytes,
            ..self.stats
        }
    }

    /// Start a new connection at `key` (dropping what an old one there queued), evicting the
    /// least recently used one if the table is full.
    fn open(&mut self, key: FlowKey, now: Instant) {
        self.forget(key);
        while self.conns.len() >= self.cfg.max_connections.max(1) {
            let Some(k) = self.conns.oldest().map(|(k, _)| *k) else {
                break;
            };
            self.forget(k);
            self.stats.evicted += 1;
        }
        self.generations += 1;
        self.conns.insert(key, Conn::new(self.generations, now));
    }

    fn forget(&mut self, key: FlowKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.queued_bytes -= c.queue_bytes;
            self.queued_frames -= c.queue.len();
            self.stats.queue_dropped += c.queue.len() as u64;
        }
    }

    fn note_close(&mut self, key: FlowKey, now: Instant) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.closed_at.is_none() && (c.reset || (c.client_fin && c.primary_fin)) {
                c.closed_at = Some(now);
                self.closing.push_back((now, key));
            }
        }
    }

    fn enqueue(&mut self, key: FlowKey, frame: Vec<u8>, tcp: Tcp) {
        let len = frame.len();
        let cfg = &self.cfg;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if cfg.max_queued_frames == 0
            || len > cfg.max_queued_bytes
            || len > cfg.max_total_queued_bytes
        {
            self.stats.queue_dropped += 1;
            return;
        }
        while c.queue.len() >= cfg.max_queued_frames
            || c.queue_bytes + len > cfg.max_queued_bytes
            || self.queued_bytes + len > cfg.max_total_queued_bytes
        {
            let Some((old, _)) = c.queue.pop_front() else {
                break;
            };
            c.queue_bytes -= old.len();
            self.queued_bytes -= old.len();
            self.queued_frames -= 1;
            self.stats.queue_dropped += 1;
        }
        if self.queued_bytes + len > cfg.max_total_queued_bytes {
            // Other connections fill the shared budget: this frame is the one dropped.
            self.stats.queue_dropped += 1;
            return;
        }
        c.queue_bytes += len;
        c.queue.push_back((frame, tcp));
        self.queued_bytes += len;
        self.queued_frames += 1;
        self.stats.queued += 1;
    }

    /// Send the queue of `key` if its offsets are known.
    fn flush(&mut self, key: FlowKey) -> Vec<Vec<u8>> {
        let Some(c) = self.conns.get_mut(&key) else {
            return Vec::new();
        };
        let Some(o) = c.offsets() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(c.queue.len());
        while let Some((mut f, tcp)) = c.queue.pop_front() {
            c.queue_bytes -= f.len();
            self.queued_bytes -= f.len();
            self.queued_frames -= 1;
            self.stats.flushed += 1;
            if rewrite_for_secondary(&mut f, &tcp, o) {
                self.stats.rewritten += 1;
            }
            out.push(f);
        }
        out
    }
}

/// Rewrite a client frame for the secondary in place: add `o.seq` to the ACK number and to
/// every SACK edge, and `o.ts` to the TSecr, updating the TCP checksum incrementally. Only a
/// frame with ACK set is changed. Returns whether anything changed.
pub fn rewrite_for_secondary(frame: &mut [u8], tcp: &Tcp, o: Offsets) -> bool {
    if !tcp.has(tcp_flags::ACK) || o == Offsets::default() {
        return false;
    }
    let csum_at = tcp.at + 16;
    let mut csum = u16::from_be_bytes([frame[csum_at], frame[csum_at + 1]]);
    if o.seq != 0 {
        add_u32(frame, tcp.at, tcp.at + 8, o.seq, &mut csum);
        let sack = tcp.options.sack;
        for k in 0..sack.len {
            add_u32(frame, tcp.at, sack.at + 8 * k, o.seq, &mut csum);
            add_u32(frame, tcp.at, sack.at + 8 * k + 4, o.seq, &mut csum);
        }
    }
    if o.ts != 0 {
        if let Some(ts) = tcp.options.timestamps {
            add_u32(frame, tcp.at, ts.at + 4, o.ts, &mut csum);
        }
    }
    frame[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());
    true
}

/// Add `by` to the big-endian u32 at `at` and update `csum` (over data starting at `base`):
/// the change is taken over the enclosing 16-bit words, so a field at an odd offset (options
/// need no alignment) is handled too.
fn add_u32(frame: &mut [u8], base: usize, at: usize, by: u32, csum: &mut u16) {
    let start = at - (at - base) % 2;
    let end = start + if start == at { 4 } else { 6 };
    let mut old = [0u8; 6];
    old[..end - start].copy_from_slice(&frame[start..end]);
    let v = u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
    frame[at..at + 4].copy_from_slice(&v.wrapping_add(by).to_be_bytes());
    *csum = checksum::adjust(*csum, &old[..end - start], &frame[start..end]);
}
