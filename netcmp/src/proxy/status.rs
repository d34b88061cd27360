//! The stream proxy's status.

use std::sync::atomic::Ordering;

use blkrep::epoch::LatencySummary;
use serde::{Deserialize, Serialize};

use super::{Mode, ProxyHandle};
use crate::link::LinkStatus;

/// The stream proxy's status (`lockstep status` on netcmp's socket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Always "netcmp".
    pub role: String,
    /// "stream".
    pub frontend: String,
    /// "compare" or "buffer".
    pub mode: String,
    /// Where clients connect.
    pub listen: String,
    /// The primary instance.
    pub primary: String,
    /// The secondary instance (compare mode).
    pub secondary: Option<String>,
    /// Connections now.
    pub connections_open: u64,
    /// Connections ever accepted.
    pub connections_total: u64,
    /// Connections refused: too many, or the primary instance unreachable.
    pub connections_refused: u64,
    /// Connections that lost (or never had) their secondary.
    pub secondary_failures: u64,
    /// Flows being compared.
    pub flows: u64,
    /// Bytes found identical.
    pub bytes_compared: u64,
    /// Bytes sent to clients.
    pub bytes_released: u64,
    /// Divergences found by comparing.
    pub mismatches: u64,
    /// Divergences by timeout.
    pub timeouts: u64,
    /// Flows released unconfirmed to stay within the memory bound.
    pub evictions: u64,
    /// Checkpoints the comparator asked for.
    pub checkpoints_requested: u64,
    /// Comparison restarts after a requested checkpoint committed.
    pub resyncs: u64,
    /// Output held now (compare: unconfirmed and uncompared; buffer: uncommitted).
    pub held_bytes: u64,
    /// The most held at once.
    pub peak_held_bytes: u64,
    /// Output dropped, never sent, because the primary daemon was lost (buffer mode).
    pub dropped_bytes: u64,
    /// From the primary's reply arriving to its release to the client, in µs.
    pub added_latency_us: LatencySummary,
    /// The epoch link.
    pub link: LinkStatus,
}

impl ProxyHandle {
    /// The status now.
    pub fn status(&self) -> ProxyStatus {
        let s = &self.0;
        let core = s.core();
        let (st, held, peak) = match &core.mode {
            Mode::Compare(c) => {
                let st = c.stats();
                (st, st.held_bytes, st.peak_held_bytes)
            }
            Mode::Buffer(b) => (Default::default(), b.held_bytes(), b.peak_held_bytes()),
        };
        let released = match &core.mode {
            Mode::Compare(_) => st.bytes_released,
            Mode::Buffer(_) => core.conns.values().map(|c| c.released).sum(),
        };
        ProxyStatus {
            role: "netcmp".into(),
            frontend: "stream".into(),
            mode: match core.mode {
                Mode::Compare(_) => "compare",
                Mode::Buffer(_) => "buffer",
            }
            .into(),
            listen: s.listen.to_string(),
            primary: s.cfg.primary.to_string(),
            secondary: s.cfg.secondary.map(|a| a.to_string()),
            connections_open: s.open.load(Ordering::Relaxed),
            connections_total: s.total.load(Ordering::Relaxed),
            connections_refused: s.refused.load(Ordering::Relaxed),
            secondary_failures: s.secondary_failures.load(Ordering::Relaxed),
            flows: st.flows as u64,
            bytes_compared: st.bytes_compared,
            bytes_released: released,
            mismatches: st.mismatches,
            timeouts: st.timeouts,
            evictions: st.evictions,
            checkpoints_requested: st.checkpoints_requested,
            resyncs: core.resyncs,
            held_bytes: held as u64,
            peak_held_bytes: peak as u64,
            dropped_bytes: core.dropped,
            added_latency_us: core.latency.summary(),
            link: s.link.status(),
        }
    }
}
