//! Scenarios of the packet engine built from synthesized frames: TCP sessions (IPv4 and IPv6)
//! whose replicas pick different ISNs and segment the same reply differently, divergence,
//! rewriting of the client's ACKs, UDP and ICMP, ARP, timeouts, resync, floods and garbage.

use std::time::{Duration, Instant};

use super::build::{self, Endpoints, TcpSegment};
use super::checksum;
use super::engine::{EngineConfig, Out, PacketEngine};
use super::frame::{parse, tcp_flags as f, Transport};
use super::rewrite::Offsets;
use crate::flow::FlowKey;

pub(super) const MS: Duration = Duration::from_millis(1);

/// The client's end (`c`) and the service's (`s`) of one connection.
#[derive(Clone, Copy)]
pub(super) struct Conn {
    pub(super) c: Endpoints,
    pub(super) cport: u16,
}

impl Conn {
    pub(super) fn v4(cport: u16) -> Conn {
        Conn {
            c: super::frame_tests::ends("10.0.0.9", "10.0.0.1"),
            cport,
        }
    }
    pub(super) fn v6(cport: u16) -> Conn {
        Conn {
            c: super::frame_tests::ends("2001:db8::9", "2001:db8::1"),
            cport,
        }
    }
    pub(super) fn key(&self) -> FlowKey {
        FlowKey::tcp(
            std::net::SocketAddr::new(self.c.dst, 80),
            std::net::SocketAddr::new(self.c.src, self.cport),
        )
    }
    /// A segment from the client.
    pub(super) fn client(
        &self,
        seq: u32,
        ack: u32,
        flags: u8,
        ts: Option<(u32, u32)>,
        data: &[u8],
    ) -> Vec<u8> {
        build::tcp_frame(
            &self.c,
            &self.seg(self.cport, 80, seq, ack, flags, ts, data),
        )
    }
    /// A segment from a replica (both replicas use the same addresses).
    pub(super) fn replica(
        &self,
        seq: u32,
        ack: u32,
        flags: u8,
        ts: Option<(u32, u32)>,
        data: &[u8],
    ) -> Vec<u8> {
        build::tcp_frame(
            &self.c.reversed(),
            &self.seg(80, self.cport, seq, ack, flags, ts, data),
        )
    }
    #[allow(clippy::too_many_arguments)]
    fn seg<'a>(
        &self,
        sp: u16,
        dp: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        ts: Option<(u32, u32)>,
        data: &'a [u8],
    ) -> TcpSegment<'a> {
        TcpSegment {
            src_port: sp,
            dst_port: dp,
            seq,
            ack,
            flags,
            timestamps: ts,
            payload: data,
            ..TcpSegment::default()
        }
    }
}

/// An engine and everything it sent, per port.
pub(super) struct Run {
    pub(super) e: PacketEngine,
    pub(super) now: Instant,
    pub(super) client: Vec<Vec<u8>>,
    pub(super) primary: Vec<Vec<u8>>,
    pub(super) secondary: Vec<Vec<u8>>,
    pub(super) checkpoints: Vec<String>,
}

impl Run {
    pub(super) fn new(cfg: EngineConfig) -> Run {
        Run {
            e: PacketEngine::new(cfg),
            now: Instant::now(),
            client: Vec::new(),
            primary: Vec::new(),
            secondary: Vec::new(),
            checkpoints: Vec::new(),
        }
    }
    pub(super) fn take(&mut self, outs: Vec<Out>) -> usize {
        let n = outs.len();
        for o in outs {
            match o {
                Out::ToClient(x) => self.client.push(x),
                Out::ToPrimary(x) => self.primary.push(x),
                Out::ToSecondary(x) => self.secondary.push(x),
                Out::Checkpoint(r) => self.checkpoints.push(r),
            }
        }
        n
    }
    pub(super) fn client_in(&mut self, fr: Vec<u8>) -> usize {
        let o = self.e.from_client(fr, self.now);
        self.take(o)
    }
    pub(super) fn primary_in(&mut self, fr: Vec<u8>) -> usize {
        let o = self.e.from_primary(fr, self.now);
        self.take(o)
    }
    pub(super) fn secondary_in(&mut self, fr: Vec<u8>) -> usize {
        let o = self.e.from_secondary(fr, self.now);
        self.take(o)
    }
    pub(super) fn poll(&mut self, dt: Duration) {
        self.now += dt;
        let o = self.e.poll(self.now);
        self.take(o);
    }
}

pub(super) fn tcp_fields(fr: &[u8]) -> (u32, u32, Option<(u32, u32)>) {
    let ip = parse(fr).unwrap().ip.unwrap();
    assert!(checksum::verify(fr, &ip), "bad checksum");
    let Transport::Tcp(t) = ip.transport else {
        panic!("not tcp")
    };
    (t.seq, t.ack, t.options.timestamps.map(|t| (t.val, t.ecr)))
}

pub(super) const C: u32 = 1000;
pub(super) const P: u32 = 50_000;
pub(super) const S: u32 = 0xffff_ff00;

/// Handshake with a client ACK sent before the secondary's SYN-ACK (queued, then flushed), and
/// the client's request. Returns the primary's frames the client must have got so far.
pub(super) fn open(run: &mut Run, k: &Conn) -> Vec<Vec<u8>> {
    let syn = k.client(C, 0, f::SYN, Some((1, 0)), b"");
    assert_eq!(run.client_in(syn.clone()), 2);
    assert_eq!(
        (run.primary.last(), run.secondary.last()),
        (Some(&syn), Some(&syn))
    );
    let p_synack = k.replica(P, C + 1, f::SYN | f::ACK, Some((100, 1)), b"");
    run.primary_in(p_synack.clone());
    assert_eq!(run.client, vec![p_synack.clone()]);
    let ack = k.client(C + 1, P + 1, f::ACK, Some((2, 100)), b"");
    run.client_in(ack.clone());
    assert_eq!(run.primary.last(), Some(&ack));
    assert_eq!(
        run.secondary.len(),
        1,
        "queued until the secondary's SYN-ACK"
    );
    run.secondary_in(k.replica(S, C + 1, f::SYN | f::ACK, Some((7000, 1)), b""));
    assert_eq!(run.secondary.len(), 2);
    assert_eq!(
        tcp_fields(&run.secondary[1]),
        (C + 1, S.wrapping_add(1), Some((2, 7000)))
    );
    let req = k.client(C + 1, P + 1, f::ACK | f::PSH, Some((3, 100)), b"GET /");
    run.client_in(req);
    assert_eq!(
        tcp_fields(&run.secondary[2]),
        (C + 1, S.wrapping_add(1), Some((3, 7000)))
    );
    assert_eq!(
        run.e.rewrite_offsets(&k.key()),
        Some(Offsets {
            seq: S.wrapping_sub(P),
            ts: 6900
        })
    );
    vec![p_synack]
}

pub(super) fn reply() -> Vec<u8> {
    (0..300u32).map(|i| (i * 7 % 251) as u8).collect()
}

/// The whole session: the client gets exactly the primary's frames, in order.
fn session(k: Conn) {
    let mut run = Run::new(EngineConfig::default());
    let mut expect = open(&mut run, &k);
    let data = reply();
    let p = |off: usize, end: usize, fl: u8| {
        k.replica(
            P + 1 + off as u32,
            C + 6,
            fl,
            Some((101, 3)),
            &data[off..end],
        )
    };
    let s = |off: usize, end: usize, fl: u8| {
        k.replica(
            S.wrapping_add(1 + off as u32),
            C + 6,
            fl,
            Some((7001, 3)),
            &data[off..end],
        )
    };
    // The primary acknowledges the request at once: nothing to wait for.
    let p_ack = k.replica(P + 1, C + 6, f::ACK, Some((101, 3)), b"");
    run.primary_in(p_ack.clone());
    expect.push(p_ack);
    assert_eq!(run.client, expect);
    let (p1, p2, p3) = (
        p(0, 100, f::ACK),
        p(100, 250, f::ACK),
        p(250, 300, f::ACK | f::FIN),
    );
    run.primary_in(p1.clone());
    assert_eq!(run.client.len(), 2);
    run.secondary_in(s(0, 200, f::ACK));
    expect.push(p1);
    assert_eq!(run.client, expect);
    run.primary_in(p2.clone());
    run.primary_in(p3.clone());
    assert_eq!(run.client.len(), 3);
    run.secondary_in(s(200, 300, f::ACK));
    expect.push(p2);
    assert_eq!(
        run.client, expect,
        "p3 carries the FIN: it waits for the secondary's"
    );
    run.secondary_in(s(300, 300, f::ACK | f::FIN));
    expect.push(p3);
    assert_eq!(run.client, expect);
    // The client closes; its ACK reaches the secondary rewritten.
    run.client_in(k.client(C + 6, P + 302, f::ACK | f::FIN, Some((4, 101)), b""));
    assert_eq!(
        tcp_fields(run.secondary.last().unwrap()),
        (C + 6, S.wrapping_add(302), Some((4, 7001)))
    );
    // After the end the primary's last ACK passes at once.
    let last = k.replica(P + 302, C + 7, f::ACK, Some((102, 4)), b"");
    run.primary_in(last.clone());
    expect.push(last);
    assert_eq!(run.client, expect);
    run.poll(Duration::from_secs(1));
    assert!(run.checkpoints.is_empty(), "{:?}", run.checkpoints);
    let st = run.e.stats();
    assert_eq!(
        (st.held_frames, st.held_frame_bytes, st.forced_releases),
        (0, 0, 0)
    );
    assert_eq!(st.compare.bytes_compared, 300);
    assert_eq!(st.primary.frames_in as usize, st.client.frames_out as usize);
    assert_eq!(st.rewrite.rewritten, 3);
}

#[test]
fn tcp_session_ipv4_releases_exactly_the_primarys_frames() {
    session(Conn::v4(40000));
}

#[test]
fn tcp_session_ipv6_releases_exactly_the_primarys_frames() {
    session(Conn::v6(40001));
}

#[test]
fn a_one_byte_difference_requests_a_checkpoint_and_releases_everything() {
    let k = Conn::v4(40002);
    let mut run = Run::new(EngineConfig::default());
    let mut expect = open(&mut run, &k);
    let data = reply();
    let mut other = data.clone();
    other[150] ^= 1;
    let p1 = k.replica(P + 1, C + 6, f::ACK, None, &data[..120]);
    let p2 = k.replica(P + 121, C + 6, f::ACK | f::FIN, None, &data[120..]);
    run.primary_in(p1.clone());
    run.primary_in(p2.clone());
    run.secondary_in(k.replica(S.wrapping_add(1), C + 6, f::ACK, None, &other[..100]));
    assert_eq!(run.client, expect, "100 bytes confirmed, p1 ends at 120");
    assert!(run.checkpoints.is_empty());
    run.secondary_in(k.replica(S.wrapping_add(101), C + 6, f::ACK, None, &other[100..]));
    expect.push(p1);
    expect.push(p2);
    assert_eq!(run.client, expect);
    assert_eq!(run.checkpoints.len(), 1);
    assert!(
        run.checkpoints[0].contains("Mismatch { offset: 150 }"),
        "{}",
        run.checkpoints[0]
    );
    assert!(run.e.checkpoint_pending());
    assert_eq!(run.e.stats().checkpoints, 1);
}

#[test]
fn resync_zeroes_offsets_and_compares_in_the_primarys_sequence_space() {
    let k = Conn::v4(40003);
    let mut run = Run::new(EngineConfig::default());
    open(&mut run, &k);
    run.primary_in(k.replica(P + 1, C + 6, f::ACK, None, b"abc"));
    run.secondary_in(k.replica(S.wrapping_add(1), C + 6, f::ACK, None, b"abX"));
    assert_eq!((run.client.len(), run.checkpoints.len()), (2, 1));
    // The checkpoint committed: the secondary is a copy of the primary.
    let o = run.e.resync(run.now);
    run.take(o);
    assert_eq!(run.e.rewrite_offsets(&k.key()), Some(Offsets::default()));
    let ack = k.client(C + 6, P + 4, f::ACK, Some((5, 100)), b"");
    run.client_in(ack.clone());
    assert_eq!(run.secondary.last(), Some(&ack), "no longer rewritten");
    let p = k.replica(P + 4, C + 6, f::ACK, None, b"def");
    run.primary_in(p.clone());
    assert_eq!(run.client.len(), 2);
    run.secondary_in(k.replica(P + 4, C + 6, f::ACK, None, b"def"));
    assert_eq!(run.client.last(), Some(&p));
    assert_eq!(run.checkpoints.len(), 1);
}

#[test]
fn a_missing_secondary_reply_times_out() {
    let k = Conn::v6(40004);
    let mut run = Run::new(EngineConfig::default());
    open(&mut run, &k);
    let p = k.replica(P + 1, C + 6, f::ACK, None, b"late");
    run.primary_in(p.clone());
    run.poll(99 * MS);
    assert_eq!(run.client.len(), 1);
    run.poll(MS);
    assert_eq!(run.client.last(), Some(&p));
    assert_eq!(run.checkpoints.len(), 1);
    assert!(run.checkpoints[0].contains("Timeout"));
}

#[test]
fn udp_and_icmp_are_compared_per_packet() {
    let mut run = Run::new(EngineConfig::default());
    let srv = super::frame_tests::ends("10.0.0.1", "10.0.0.9");
    let q = build::udp_frame(&srv.reversed(), 3333, 53, b"query");
    assert_eq!(run.client_in(q.clone()), 2);
    assert_eq!(
        (run.primary[0].clone(), run.secondary[0].clone()),
        (q.clone(), q)
    );
    let a1 = build::udp_frame(&srv, 53, 3333, b"answer-1");
    let a2 = build::udp_frame(&srv, 53, 3333, b"answer-2");
    run.primary_in(a1.clone());
    run.primary_in(a2.clone());
    assert!(run.client.is_empty());
    run.secondary_in(build::udp_frame(&srv, 53, 3333, b"answer-1"));
    assert_eq!(run.client, vec![a1.clone()]);
    run.secondary_in(build::udp_frame(&srv, 53, 3333, b"answer-X"));
    assert_eq!(run.client, vec![a1, a2]);
    assert_eq!(run.checkpoints.len(), 1);
    // ICMP echo replies, per identifier.
    let pong = build::icmp_echo_frame(&srv, false, 77, 1, b"abc");
    run.primary_in(pong.clone());
    assert_eq!(run.client.len(), 2);
    run.secondary_in(pong.clone());
    assert_eq!(run.client.last(), Some(&pong));
}

#[test]
fn arp_from_the_primary_passes_and_from_the_secondary_is_dropped() {
    let mut run = Run::new(EngineConfig::default());
    let arp = build::arp_request(
        [2; 6],
        "10.0.0.1".parse().unwrap(),
        "10.0.0.9".parse().unwrap(),
    );
    assert_eq!(run.client_in(arp.clone()), 2);
    run.primary_in(arp.clone());
    assert_eq!(run.client, vec![arp.clone()]);
    assert_eq!(run.secondary_in(arp), 0);
    let st = run.e.stats();
    assert_eq!(
        (st.client.non_ip, st.primary.non_ip, st.secondary.non_ip),
        (1, 1, 1)
    );
    assert_eq!(
        (
            st.client.frames_out,
            st.primary.frames_out,
            st.secondary.frames_out
        ),
        (1, 1, 1)
    );
}

#[test]
fn malformed_frames_per_port() {
    let mut run = Run::new(EngineConfig::default());
    let mut bad = Conn::v4(1).replica(1, 1, f::ACK, None, b"x");
    bad[14] = 0x44;
    assert_eq!(run.client_in(bad.clone()), 0);
    assert_eq!(run.primary_in(bad.clone()), 1);
    assert_eq!(run.secondary_in(bad.clone()), 0);
    assert_eq!(run.client, vec![bad]);
    let st = run.e.stats();
    assert_eq!(
        (
            st.client.malformed,
            st.primary.malformed,
            st.secondary.malformed
        ),
        (1, 1, 1)
    );
}

#[test]
fn a_frame_never_covered_goes_out_after_the_hold_timeout() {
    let k = Conn::v4(40005);
    let mut run = Run::new(EngineConfig::default());
    open(&mut run, &k);
    // Far past the comparator's out-of-order window: dropped there, nothing will cover it.
    let far = k.replica(P + 1 + 1_000_000, C + 6, f::ACK, None, b"far");
    run.primary_in(far.clone());
    run.poll(999 * MS);
    assert_eq!((run.client.len(), run.checkpoints.len()), (1, 0));
    run.poll(MS);
    assert_eq!(run.client.last(), Some(&far));
    assert_eq!(run.checkpoints.len(), 1);
    let st = run.e.stats();
    assert_eq!((st.forced_releases, st.compare.segments_dropped), (1, 1));
}

#[test]
fn idle_flows_are_forgotten_with_the_comparator_and_start_again() {
    let mut cfg = EngineConfig::default();
    cfg.compare.idle_timeout = Duration::from_secs(10);
    let k = Conn::v4(40006);
    let mut run = Run::new(cfg);
    open(&mut run, &k);
    run.primary_in(k.replica(P + 1, C + 6, f::ACK, None, b"abc"));
    run.secondary_in(k.replica(S.wrapping_add(1), C + 6, f::ACK, None, b"abc"));
    assert_eq!(run.client.len(), 2);
    run.poll(Duration::from_secs(10));
    let st = run.e.stats();
    assert_eq!((st.flows, st.compare.flows), (0, 0));
    // Both pick the flow up again from its next segments.
    let p = k.replica(P + 4, C + 6, f::ACK, None, b"def");
    run.primary_in(p.clone());
    assert_eq!(run.client.len(), 2);
    run.secondary_in(k.replica(S.wrapping_add(4), C + 6, f::ACK, None, b"def"));
    assert_eq!(run.client.last(), Some(&p));
    assert!(run.checkpoints.is_empty());
}

#[test]
fn a_new_connection_on_the_same_ports_compares_from_its_own_syn() {
    let k = Conn::v6(40007);
    let mut run = Run::new(EngineConfig::default());
    open(&mut run, &k);
    run.primary_in(k.replica(P + 1, C + 6, f::ACK | f::FIN, None, b"bye"));
    run.secondary_in(k.replica(S.wrapping_add(1), C + 6, f::ACK | f::FIN, None, b"bye"));
    run.client_in(k.client(C + 6, P + 5, f::ACK | f::FIN, None, b""));
    assert_eq!(run.client.len(), 2);
    // Reopened at once (within the comparator's ended linger), with new ISNs everywhere.
    let (c2, p2, s2) = (9_000u32, 77_000u32, 3u32);
    run.client_in(k.client(c2, 0, f::SYN, None, b""));
    run.primary_in(k.replica(p2, c2 + 1, f::SYN | f::ACK, None, b""));
    run.secondary_in(k.replica(s2, c2 + 1, f::SYN | f::ACK, None, b""));
    run.client_in(k.client(c2 + 1, p2 + 1, f::ACK, None, b"again"));
    assert_eq!(tcp_fields(run.secondary.last().unwrap()).1, s2 + 1);
    let p = k.replica(p2 + 1, c2 + 6, f::ACK, None, b"hello");
    run.primary_in(p.clone());
    assert_eq!(run.client.len(), 3);
    run.secondary_in(k.replica(s2 + 1, c2 + 6, f::ACK, None, b"hel"));
    assert_eq!(run.client.len(), 3);
    run.secondary_in(k.replica(s2 + 4, c2 + 6, f::ACK, None, b"lo"));
    assert_eq!(run.client.last(), Some(&p));
    assert!(run.checkpoints.is_empty());
}

#[test]
fn packets_released_over_budget_do_not_release_later_ones_early() {
    let srv = super::frame_tests::ends("10.0.0.1", "10.0.0.9");
    let a = |n: u8| build::udp_frame(&srv, 53, 3333, &[n; 100]);
    let mut run = Run::new(EngineConfig {
        max_held_frame_bytes: 2 * (a(0).len() + super::engine::HELD_FRAME_OVERHEAD),
        ..EngineConfig::default()
    });
    run.primary_in(a(1));
    run.primary_in(a(2));
    assert!(run.client.is_empty());
    run.primary_in(a(3));
    assert_eq!(run.client, vec![a(1), a(2), a(3)], "the whole flow goes");
    assert_eq!(run.checkpoints.len(), 1);
    run.primary_in(a(4));
    for n in 1..=3 {
        run.secondary_in(a(n));
    }
    assert_eq!(
        run.client.len(),
        3,
        "the comparator's releases of 1-3 are skipped"
    );
    run.secondary_in(a(4));
    assert_eq!(run.client.last(), Some(&a(4)));
}

#[test]
fn fragments_pass_uncompared() {
    let srv = super::frame_tests::ends("10.0.0.1", "10.0.0.9");
    let mut frag = build::udp_frame(&srv, 53, 3333, b"first fragment");
    frag[20] |= 0x20;
    let mut run = Run::new(EngineConfig::default());
    assert_eq!(run.client_in(frag.clone()), 2);
    assert_eq!(run.secondary, vec![frag.clone()]);
    run.primary_in(frag.clone());
    assert_eq!(run.client, vec![frag.clone()]);
    assert_eq!(run.secondary_in(frag), 0);
    assert_eq!(run.e.stats().fragments, 3);
}

#[test]
fn a_segment_past_a_fin_is_not_compared() {
    // The comparator's reassembly cannot take a segment that starts past a FIN it has not
    // reached in order yet; the engine keeps such segments from it.
    let k = Conn::v4(40008);
    let mut run = Run::new(EngineConfig::default());
    let a = k.replica(100, C, f::ACK, None, b"ab");
    let fin = k.replica(110, C, f::ACK | f::FIN, None, b"xy");
    let past = k.replica(120, C, f::ACK, None, b"zz");
    let gap = k.replica(102, C, f::ACK, None, b"cdefghij");
    for fr in [&a, &fin, &past, &gap] {
        run.primary_in(fr.clone());
    }
    assert_eq!(run.client, vec![past.clone()]);
    assert_eq!(run.e.stats().past_fin, 1);
    run.secondary_in(k.replica(500, C, f::ACK | f::FIN, None, b"abcdefghijxy"));
    assert_eq!(run.client, vec![past, a, fin, gap]);
    assert!(run.checkpoints.is_empty());
}

#[test]
fn a_connection_reset_by_the_client_and_reopened_compares_again() {
    let k = Conn::v4(40009);
    let mut run = Run::new(EngineConfig::default());
    open(&mut run, &k);
    let old = k.replica(P + 1, C + 6, f::ACK, None, b"never confirmed");
    run.primary_in(old.clone());
    run.client_in(k.client(C + 6, 0, f::RST, None, b""));
    // The replicas drop the connection silently; the client reconnects from the same port.
    let (c2, p2, s2) = (4_000_000u32, 123u32, 456u32);
    run.client_in(k.client(c2, 0, f::SYN, None, b""));
    run.primary_in(k.replica(p2, c2 + 1, f::SYN | f::ACK, None, b""));
    run.secondary_in(k.replica(s2, c2 + 1, f::SYN | f::ACK, None, b""));
    assert_eq!(run.client.len(), 2);
    let new = k.replica(p2 + 1, c2 + 1, f::ACK, None, b"new");
    run.primary_in(new.clone());
    assert_eq!(run.client.last(), Some(&old), "the old comparison ended");
    run.secondary_in(k.replica(s2 + 1, c2 + 1, f::ACK, None, b"new"));
    assert_eq!(run.client.last(), Some(&new));
    assert!(run.checkpoints.is_empty());
    assert_eq!(run.e.stats().stale_ended, 1);
}

#[test]
fn a_reopened_connection_whose_secondary_answers_first_compares_again() {
    let k = Conn::v6(40010);
    let mut run = Run::new(EngineConfig::default());
    open(&mut run, &k);
    run.primary_in(k.replica(P + 1, C + 6, f::ACK, None, b"old"));
    run.client_in(k.client(C + 6, 0, f::RST, None, b""));
    let (c2, p2, s2) = (4_000_000u32, 123u32, 456u32);
    run.client_in(k.client(c2, 0, f::SYN, None, b""));
    run.primary_in(k.replica(p2, c2 + 1, f::SYN | f::ACK, None, b""));
    run.secondary_in(k.replica(s2, c2 + 1, f::SYN | f::ACK, None, b""));
    // This time the secondary's reply comes first.
    run.secondary_in(k.replica(s2 + 1, c2 + 1, f::ACK, None, b"new"));
    assert_eq!(run.client.len(), 3, "the old comparison ended");
    let new = k.replica(p2 + 1, c2 + 1, f::ACK, None, b"new");
    run.primary_in(new.clone());
    assert_eq!(run.client.last(), Some(&new));
    assert!(run.checkpoints.is_empty());
    assert_eq!(run.e.stats().stale_ended, 1);
}
