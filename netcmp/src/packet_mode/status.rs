//! The packet mode's status.

use std::sync::atomic::Ordering;

use blkrep::epoch::LatencySummary;
use serde::{Deserialize, Serialize};

use super::port::{PortCounters, Side};
use super::{PacketHandle, PortSpec};
use crate::l2::{PortStats, RewriteStats};
use crate::link::LinkStatus;

/// One port's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortStatus {
    /// `tap:NAME` or `unix:PATH`.
    pub port: String,
    /// A `unix:` port: a peer is connected; a TAP: it is readable.
    pub connected: bool,
    /// Frames read.
    pub frames_in: u64,
    /// Frames written.
    pub frames_out: u64,
    /// Frames for the port not written: no peer, its queue full, the write refused.
    pub dropped: u64,
    /// Frames read that did not parse as Ethernet (and IP, if they claimed to be).
    pub malformed: u64,
    /// Frames read that were not IP (ARP...).
    pub non_ip: u64,
    /// Framing errors: a `unix:` peer's length of 0 or too long, a peer leaving mid-frame, a
    /// TAP frame too long.
    pub bad_framing: u64,
    /// `unix:` peers accepted.
    pub peers_accepted: u64,
    /// `unix:` peers dropped (bad framing, not reading, replaced by a newer one).
    pub peers_dropped: u64,
    /// The last error of the port.
    pub last_error: Option<String>,
}

/// The three ports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortsStatus {
    /// The clients' side.
    pub client: PortStatus,
    /// The primary replica's.
    pub primary: PortStatus,
    /// The secondary replica's.
    pub secondary: PortStatus,
}

/// The TCP rewriting's counters ([`RewriteStats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteStatus {
    /// Connections remembered now.
    pub connections: u64,
    /// Client frames queued now (their connection's offset not yet known).
    pub queued_frames: u64,
    /// Their bytes.
    pub queued_bytes: u64,
    /// Client frames whose ACK, SACK or TSecr fields were shifted for the secondary.
    pub rewritten: u64,
    /// Client frames queued, in all.
    pub queued: u64,
    /// Queued frames sent once the offset was known.
    pub flushed: u64,
    /// Queued frames dropped.
    pub queue_dropped: u64,
    /// Connections evicted from a full table.
    pub evicted: u64,
    /// Connections forgotten after their linger or idle time.
    pub expired: u64,
    /// Client frames of connections the table did not know (passed unrewritten).
    pub unknown: u64,
}

impl From<RewriteStats> for RewriteStatus {
    fn from(r: RewriteStats) -> Self {
        RewriteStatus {
            connections: r.connections as u64,
            queued_frames: r.queued_frames as u64,
            queued_bytes: r.queued_bytes as u64,
            rewritten: r.rewritten,
            queued: r.queued,
            flushed: r.flushed,
            queue_dropped: r.queue_dropped,
            evicted: r.evicted,
            expired: r.expired,
            unknown: r.unknown,
        }
    }
}

/// The packet mode's status (`lockstep status` on netcmp's socket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PacketStatus {
    /// Always "netcmp".
    pub role: String,
    /// "packet".
    pub frontend: String,
    /// "compare" (the packet mode does not buffer).
    pub mode: String,
    /// The ports.
    pub ports: PortsStatus,
    /// Flows the engine keeps state for.
    pub flows: u64,
    /// Flows the comparator compares.
    pub compared_flows: u64,
    /// Bytes found identical.
    pub bytes_compared: u64,
    /// Bytes the comparator released (compared or not).
    pub bytes_released: u64,
    /// Divergences found by comparing.
    pub mismatches: u64,
    /// Divergences by timeout.
    pub timeouts: u64,
    /// Comparator flows released unconfirmed to stay within its memory bound.
    pub evictions: u64,
    /// Checkpoints asked of the epoch link.
    pub checkpoints_requested: u64,
    /// Engine resyncs after a requested checkpoint committed.
    pub resyncs: u64,
    /// Primary frames held now.
    pub held_frames: u64,
    /// Their bytes, with the per-frame overhead.
    pub held_bytes: u64,
    /// The most held at once.
    pub peak_held_bytes: u64,
    /// Bytes the comparator holds now (both sides' uncompared output).
    pub compare_held_bytes: u64,
    /// Primary frames released unconfirmed (memory bound, hold timeout, flow eviction).
    pub forced_releases: u64,
    /// Flow states evicted from a full table.
    pub flows_evicted: u64,
    /// IP fragments seen (not compared).
    pub fragments: u64,
    /// Frames of IP protocols other than TCP, UDP and ICMP (not compared).
    pub other_protocols: u64,
    /// TCP segments beyond the out-of-order window (not compared).
    pub segments_dropped: u64,
    /// The rewriting of client TCP frames for the secondary.
    pub rewrite: RewriteStatus,
    /// From a primary frame's arrival to its release to the client, in µs.
    pub added_latency_us: LatencySummary,
    /// The epoch link.
    pub link: LinkStatus,
}

fn port_status(spec: &PortSpec, c: &PortCounters, e: &PortStats) -> PortStatus {
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    PortStatus {
        port: spec.to_string(),
        connected: c.connected.load(Ordering::Relaxed),
        frames_in: n(&c.frames_in),
        frames_out: n(&c.frames_out),
        dropped: n(&c.dropped),
        malformed: e.malformed,
        non_ip: e.non_ip,
        bad_framing: n(&c.bad_framing),
        peers_accepted: n(&c.peers_accepted),
        peers_dropped: n(&c.peers_dropped),
        last_error: c.last_error.lock().map(|g| g.clone()).unwrap_or(None),
    }
}

impl PacketHandle {
    /// The status now.
    pub fn status(&self) -> PacketStatus {
        let s = &self.0;
        let core = s.core();
        let st = core.engine.stats();
        let c = st.compare;
        let port = |side: Side, spec: &PortSpec, e: &PortStats| {
            port_status(spec, &s.port(side).counters, e)
        };
        PacketStatus {
            role: "netcmp".into(),
            frontend: "packet".into(),
            mode: "compare".into(),
            ports: PortsStatus {
                client: port(Side::Client, &s.cfg.client, &st.client),
                primary: port(Side::Primary, &s.cfg.primary, &st.primary),
                secondary: port(Side::Secondary, &s.cfg.secondary, &st.secondary),
            },
            flows: st.flows as u64,
            compared_flows: c.flows as u64,
            bytes_compared: c.bytes_compared,
            bytes_released: c.bytes_released,
            mismatches: c.mismatches,
            timeouts: c.timeouts,
            evictions: c.evictions,
            checkpoints_requested: core.checkpoints_requested,
            resyncs: core.resyncs,
            held_frames: st.held_frames as u64,
            held_bytes: st.held_frame_bytes as u64,
            peak_held_bytes: st.peak_held_frame_bytes as u64,
            compare_held_bytes: c.held_bytes as u64,
            forced_releases: st.forced_releases,
            flows_evicted: st.flows_evicted,
            fragments: st.fragments,
            other_protocols: st.other_protocols,
            segments_dropped: c.segments_dropped,
            rewrite: st.rewrite.into(),
            added_latency_us: core.arrivals.latency.summary(),
            link: s.link.status(),
        }
    }
}
