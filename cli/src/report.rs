//! Printing what the daemons answer on their control socket, from the typed reports in
//! `blkrep::replica::status`: `status`, `verify` and `failover`.

use blkrep::replica::status::{
    DigestCheck, FailoverReport, LatencySummary, NodeStatus, PrimaryStatus, SecondaryStatus,
    VerifyReport,
};

/// A duration in microseconds, readable.
pub fn us(n: u64) -> String {
    if n >= 10_000 {
        format!("{:.1} ms", n as f64 / 1000.0)
    } else {
        format!("{n} µs")
    }
}

/// A byte count, in binary units.
pub fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

fn opt(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("-")
}

fn percentiles(l: &LatencySummary) -> String {
    format!("p50 {}  p99 {}", us(l.p50), us(l.p99))
}

fn row(k: &str, val: impl std::fmt::Display) {
    println!("{k:<22} {val}");
}

/// `lockstep status`, as text.
pub fn status(st: &NodeStatus) {
    match st {
        NodeStatus::Primary(p) => primary(p),
        NodeStatus::Secondary(s) => secondary(s),
    }
}

fn primary(p: &PrimaryStatus) {
    let (b, c) = (&p.block, &p.checkpoints);
    row("role", &p.role);
    row("mode", &b.mode);
    row(
        "epoch",
        format!("{} (committed {})", c.epoch, c.committed_epoch),
    );
    row("peer", format!("{} ({})", p.peer, p.link.peer_state));
    row("ack", &b.ack);
    let q = &b.forward_queue;
    row(
        "forward queue",
        format!("{} requests, {}", q.depth, bytes(q.bytes)),
    );
    row(
        "forwarded",
        format!(
            "{} writes, {}",
            b.forwarded_writes,
            bytes(b.forwarded_bytes)
        ),
    );
    row(
        "checkpoints",
        match (&c.last_skip_reason, c.checkpoints_skipped) {
            (Some(why), n) if n > 0 => format!(
                "{} ({} failed, {} skipped; last skipped: {why})",
                c.checkpoints, c.checkpoint_failures, n
            ),
            _ => format!("{} ({} failed)", c.checkpoints, c.checkpoint_failures),
        },
    );
    row("checkpoint pause", percentiles(&c.checkpoint_pause_us));
    row("checkpoint total", percentiles(&c.checkpoint_total_us));
    row("dirty blocks", b.dirty_blocks);
    let r = &b.resync;
    if let Some(kind) = &r.kind {
        row(
            "resync",
            format!(
                "{kind} {}: {} of {} units equal, {} of {} blocks sent ({}), {:.1} MB/s",
                r.state,
                r.equal_units,
                r.compared_units,
                r.sent_blocks,
                r.to_send_blocks,
                bytes(r.sent_bytes),
                r.throughput_mb_s
            ),
        );
    }
    row("generation", &b.generation);
    row("last error", opt(&p.last_error));
}

fn secondary(s: &SecondaryStatus) {
    if let Some(f) = &s.failover {
        return failed_over(s, f);
    }
    row("role", &s.role);
    row("mode", &s.mode);
    row(
        "epoch",
        format!("{} (committed {})", s.epoch, s.committed_epoch),
    );
    row("peer", format!("{} ({})", opt(&s.peer), s.peer_state));
    let b = &s.buffer;
    row(
        "buffer",
        format!(
            "{} blocks: {} in memory, {} spilled, {} open epochs",
            b.blocks,
            bytes(b.memory_bytes),
            bytes(b.spill_bytes),
            b.epochs
        ),
    );
    row(
        "forwarded",
        format!(
            "{} writes, {}",
            s.forwarded_writes,
            bytes(s.forwarded_bytes)
        ),
    );
    row(
        "checkpoints",
        format!("{} ({} aborted)", s.checkpoints, s.checkpoints_aborted),
    );
    row("epoch-mark stall", percentiles(&s.mark_drain_us));
    let resyncing = match &s.resyncing {
        Some(k) => format!(" (resyncing: {k})"),
        None => String::new(),
    };
    row("consistent", format!("{}{resyncing}", s.consistent));
    row("generation", &s.generation);
    peer_auth(s);
    row("last error", opt(&s.last_error));
}

/// A secondary that failed over: a primary without a secondary; only the rows that apply.
fn failed_over(s: &SecondaryStatus, f: &FailoverReport) {
    row("role", &s.role);
    row("mode", format!("{} (unprotected: no secondary)", s.mode));
    row(
        "failed over",
        format!(
            "to {} at epoch {}, {} blocks restored in {}",
            f.target,
            f.committed_epoch,
            f.restored_blocks,
            us(f.duration_us)
        ),
    );
    row("old primary", opt(&s.peer));
    row("written since", format!("{} blocks", s.dirty_blocks));
    row("generation", &s.generation);
    peer_auth(s);
    row(
        "re-protect",
        "restart as `lockstep primary` with a secondary (docs/operations.md)",
    );
    row("last error", opt(&s.last_error));
}

/// Who may connect to the listen port as a primary, and what that risks.
fn peer_auth(s: &SecondaryStatus) {
    if let Some(pa) = &s.peer_auth {
        let how = match (pa.tls, pa.psk) {
            (true, true) => "TLS certificates and peer key",
            (true, false) => "TLS certificates",
            (false, true) => "peer key (--psk-file)",
            (false, false) => "none",
        };
        row("peer authentication", how);
        for r in &pa.risks {
            row("RISK", r);
        }
    }
}

/// `lockstep verify` on a node that failed over: its disk against the checkpoint.
pub fn digest_check(c: &DigestCheck) {
    let checkpoint = opt(&c.checkpoint_digest);
    if c.equal() {
        println!(
            "the disk equals checkpoint {} (digest {})",
            c.committed_epoch, c.image_digest
        );
    } else if c.checkpoint_digest.is_none() {
        println!(
            "disk digest {}; no checkpoint digest known to compare it with",
            c.image_digest
        );
    } else if !c.comparable {
        println!(
            "disk digest {} differs from checkpoint {}'s {checkpoint}, as expected: {}",
            c.image_digest,
            c.committed_epoch,
            if c.written_blocks > 0 {
                format!("{} blocks written since the failover", c.written_blocks)
            } else {
                "failed over to the latest writes, not to the checkpoint".into()
            }
        );
    } else {
        println!(
            "DIFFERS: disk digest {} but checkpoint {}'s is {checkpoint}",
            c.image_digest, c.committed_epoch
        );
    }
}

/// `lockstep verify`, as text.
pub fn verify(v: &VerifyReport) {
    println!(
        "compared {} in {} chunks of {} in {:.2} s ({:.0} MB/s): {} differ",
        bytes(v.bytes_compared),
        v.total_chunks,
        bytes(v.chunk_bytes),
        v.duration_s,
        v.mb_per_s,
        v.differing_chunks
    );
    for d in &v.differing {
        println!("  differs: offset {} length {}", d.offset, d.len);
    }
    if v.unlisted_chunks > 0 {
        println!("  … and {} more differing chunks", v.unlisted_chunks);
    }
    if let Some(r) = &v.repair {
        println!(
            "repaired {} chunks ({}) in {:.2} s: resent from the primary, committed in epoch {}",
            r.repaired_chunks,
            bytes(r.repaired_bytes),
            r.duration_s,
            r.committed_epoch
        );
        if r.rehashed_blocks > 0 {
            println!(
                "  {} blocks on the primary's disk no longer matched its digest (changed behind lockstep's back): sent as they are",
                r.rehashed_blocks
            );
        }
        println!(
            "compared again: {} chunks, {} differ",
            r.reverified_chunks, r.still_differing_chunks
        );
        for d in &r.still_differing {
            println!("  still differs: offset {} length {}", d.offset, d.len);
        }
    }
    for (name, r) in &v.participants {
        let n = |k: &str| r.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        match r.get("error").and_then(serde_json::Value::as_str) {
            Some(e) => println!("{name}: not compared: {e}"),
            None => println!(
                "{name}: compared {} pages: {} differ ({} changed since the last checkpoint, {} diverged{})",
                n("pages"),
                n("differing_pages"),
                n("pending_pages"),
                n("diverged_pages"),
                if n("diverged_pages") > 0 {
                    ": sent again before the next commit"
                } else {
                    ""
                }
            ),
        }
    }
}

/// What `failover --verify` adds to the failover report.
#[derive(Debug, serde::Deserialize)]
pub struct Verified {
    /// The failed-over disk's digest.
    pub image_digest: Option<String>,
    /// Whether it equals the checkpoint's (None: not comparable).
    pub verified: Option<bool>,
}

/// `lockstep failover`, as text.
pub fn failover(f: &FailoverReport, v: Option<&Verified>) {
    println!(
        "failed over to {} (epoch {}): {} blocks restored in {}",
        f.target,
        f.committed_epoch,
        f.restored_blocks,
        us(f.duration_us)
    );
    let Some(v) = v else { return };
    match v.verified {
        Some(true) => println!(
            "verified: the disk equals checkpoint {} (digest {})",
            f.committed_epoch,
            opt(&v.image_digest)
        ),
        Some(false) => println!(
            "VERIFY FAILED: disk digest {} differs from the checkpoint's {}",
            opt(&v.image_digest),
            opt(&f.checkpoint_digest)
        ),
        None => {
            println!("not verifiable (failover to latest, or the secondary wrote to its disk)")
        }
    }
}

/// `lockstep status` of netcmp.
pub fn netcmp(s: &netcmp::ProxyStatus) {
    row("role", format!("{} ({} proxy)", s.role, s.frontend));
    row("mode", &s.mode);
    row("listen", &s.listen);
    row(
        "instances",
        format!(
            "primary {}, secondary {}",
            s.primary,
            s.secondary.as_deref().unwrap_or("none (buffering)")
        ),
    );
    epochs(&s.link);
    row(
        "connections",
        format!(
            "{} open, {} total, {} refused, {} without secondary",
            s.connections_open, s.connections_total, s.connections_refused, s.secondary_failures
        ),
    );
    row("flows", s.flows);
    compared(s.bytes_compared, s.bytes_released);
    row(
        "divergences",
        format!(
            "{} mismatches, {} timeouts, {} evictions",
            s.mismatches, s.timeouts, s.evictions
        ),
    );
    requested(s.checkpoints_requested, &s.link, s.resyncs);
    row(
        "held",
        format!(
            "{} now, {} peak, {} dropped",
            bytes(s.held_bytes),
            bytes(s.peak_held_bytes),
            bytes(s.dropped_bytes)
        ),
    );
    row("added latency", percentiles(&s.added_latency_us));
}

/// The rows both netcmp frontends show: bytes compared and released.
fn compared(compared: u64, released: u64) {
    row(
        "bytes",
        format!("{} compared, {} released", bytes(compared), bytes(released)),
    );
}

/// Checkpoints netcmp asked for, and the comparisons restarted after them.
fn requested(requested: u64, link: &netcmp::LinkStatus, resyncs: u64) {
    row(
        "checkpoints",
        format!(
            "{requested} requested ({} sent, {} failed), {resyncs} resyncs",
            link.requests_sent, link.request_failures
        ),
    );
}

fn epochs(link: &netcmp::LinkStatus) {
    row(
        "epochs",
        match &link.control {
            Some(c) if link.connected => {
                format!("{c} (connected, {} commits seen)", link.commits_seen)
            }
            Some(c) => format!("{c} (LOST: {})", link.last_error.as_deref().unwrap_or("?")),
            None => "none (divergences resync at once; no replication)".into(),
        },
    );
}

fn port(name: &str, p: &netcmp::packet_mode::PortStatus) {
    let mut line = format!(
        "{} ({}): {} in, {} out, {} dropped, {} malformed, {} non-IP",
        p.port,
        if p.connected { "up" } else { "no peer" },
        p.frames_in,
        p.frames_out,
        p.dropped,
        p.malformed,
        p.non_ip
    );
    if p.bad_framing > 0 || p.peers_accepted > 0 {
        line.push_str(&format!(
            ", {} bad framing, peers {} accepted {} dropped",
            p.bad_framing, p.peers_accepted, p.peers_dropped
        ));
    }
    if let Some(e) = &p.last_error {
        line.push_str(&format!(" (last error: {e})"));
    }
    row(&format!("{name} port"), line);
}

/// `lockstep status` of netcmp's packet mode.
pub fn netcmp_packet(s: &netcmp::PacketStatus) {
    row("role", format!("{} ({} mode)", s.role, s.frontend));
    row("mode", &s.mode);
    port("client", &s.ports.client);
    port("primary", &s.ports.primary);
    port("secondary", &s.ports.secondary);
    epochs(&s.link);
    row(
        "flows",
        format!("{} ({} compared)", s.flows, s.compared_flows),
    );
    compared(s.bytes_compared, s.bytes_released);
    row(
        "divergences",
        format!(
            "{} mismatches, {} timeouts, {} evictions, {} frames released unconfirmed",
            s.mismatches, s.timeouts, s.evictions, s.forced_releases
        ),
    );
    requested(s.checkpoints_requested, &s.link, s.resyncs);
    row(
        "held",
        format!(
            "{} frames, {} now, {} peak; comparator {}",
            s.held_frames,
            bytes(s.held_bytes),
            bytes(s.peak_held_bytes),
            bytes(s.compare_held_bytes)
        ),
    );
    let r = &s.rewrite;
    row(
        "rewrite",
        format!(
            "{} frames rewritten, {} connections, {} queued ({} now, {} flushed, {} dropped), {} unknown",
            r.rewritten, r.connections, r.queued, r.queued_frames, r.flushed, r.queue_dropped, r.unknown
        ),
    );
    row(
        "not compared",
        format!(
            "{} fragments, {} other protocols, {} segments past the window",
            s.fragments, s.other_protocols, s.segments_dropped
        ),
    );
    row("added latency", percentiles(&s.added_latency_us));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_well() {
        assert_eq!(us(950), "950 µs");
        assert_eq!(us(12_500), "12.5 ms");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }
}
