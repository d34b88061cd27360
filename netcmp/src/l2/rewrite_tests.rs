//! Tests of the rewrite table: field rewriting and checksums, learning offsets, queueing
//! and flushing, bounds, ends of connections, resync.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::build::{tcp_frame, Endpoints, TcpSegment};
use super::frame::{parse, Transport};
use super::frame::{Ip, Tcp};
use super::rewrite::*;
use super::{checksum, frame::tcp_flags as f};
use crate::flow::FlowKey;

const MS: Duration = Duration::from_millis(1);

fn client() -> Endpoints {
    Endpoints {
        src_mac: [2, 0, 0, 0, 0, 9],
        dst_mac: [2, 0, 0, 0, 0, 1],
        vlan: None,
        src: "10.0.0.9".parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
    }
}

fn key(port: u16) -> FlowKey {
    FlowKey::tcp(
        "10.0.0.1:80".parse().unwrap(),
        SocketAddr::new("10.0.0.9".parse().unwrap(), port),
    )
}

/// A segment from the client's port `port` to the service.
fn from_client(port: u16, seq: u32, ack: u32, flags: u8, ts: Option<(u32, u32)>) -> Vec<u8> {
    tcp_frame(
        &client(),
        &TcpSegment {
            src_port: port,
            dst_port: 80,
            seq,
            ack,
            flags,
            timestamps: ts,
            payload: b"req",
            ..TcpSegment::default()
        },
    )
}

/// A replica's segment on connection `port`.
fn from_replica(port: u16, seq: u32, flags: u8, tsval: Option<u32>) -> Tcp {
    let fr = tcp_frame(
        &client().reversed(),
        &TcpSegment {
            src_port: 80,
            dst_port: port,
            seq,
            ack: 1,
            flags,
            timestamps: tsval.map(|v| (v, 0)),
            ..TcpSegment::default()
        },
    );
    tcp_of(&fr).1
}

fn tcp_of(fr: &[u8]) -> (Ip, Tcp) {
    let ip = parse(fr).unwrap().ip.unwrap();
    let Transport::Tcp(t) = ip.transport else {
        panic!("not tcp")
    };
    (ip, t)
}

fn send(t: &mut RewriteTable, fr: Vec<u8>, now: Instant) -> Vec<Vec<u8>> {
    let (ip, tcp) = tcp_of(&fr);
    t.client_frame(fr, &ip, &tcp, now)
}

#[test]
fn rewrites_ack_sack_and_tsecr_with_a_valid_checksum() {
    let fr = tcp_frame(
        &client(),
        &TcpSegment {
            src_port: 5,
            dst_port: 80,
            seq: 1,
            ack: 0xffff_fff0,
            flags: f::ACK,
            timestamps: Some((7, 1000)),
            sack: &[(10, 20), (30, 40)],
            payload: b"odd",
            ..TcpSegment::default()
        },
    );
    // Also an odd-aligned SACK option: NOP SACK ... EOL instead of NOP NOP SACK ....
    let (_, t) = tcp_of(&fr);
    let mut odd = fr.clone();
    let s = t.options.sack.at - 4;
    odd.copy_within(s + 1..s + 20, s);
    odd[s + 19] = 0;
    let (ip, _) = tcp_of(&odd);
    checksum::fill(&mut odd, &ip);
    for mut g in [fr, odd] {
        let (ip, t) = tcp_of(&g);
        let o = Offsets { seq: 0x20, ts: 5 };
        assert!(rewrite_for_secondary(&mut g, &t, o));
        let (ip2, u) = tcp_of(&g);
        assert!(checksum::verify(&g, &ip2), "{ip:?}");
        assert_eq!(u.ack, 0x10);
        assert_eq!(u.options.sack.as_slice(), &[(0x2a, 0x34), (0x3e, 0x48)]);
        assert_eq!(
            u.options.timestamps.map(|t| (t.val, t.ecr)),
            Some((7, 1005))
        );
        assert_eq!((u.seq, u.payload(&g)), (1, &b"odd"[..]));
    }
    // No ACK flag, or zero offsets: unchanged.
    let mut syn = from_client(5, 1, 0, f::SYN, None);
    let (_, t) = tcp_of(&syn);
    assert!(!rewrite_for_secondary(
        &mut syn,
        &t,
        Offsets { seq: 1, ts: 1 }
    ));
}

#[test]
fn queues_until_both_isns_then_flushes_rewritten() {
    let t0 = Instant::now();
    let mut t = RewriteTable::new(RewriteConfig::default());
    assert_eq!(
        send(&mut t, from_client(1000, 500, 0, f::SYN, Some((9, 0))), t0).len(),
        1
    );
    assert!(t
        .replica_frame(
            Replica::Primary,
            key(1000),
            &from_replica(1000, 7000, f::SYN | f::ACK, Some(100)),
            t0
        )
        .is_empty());
    // The client's ACK of the primary's SYN-ACK waits for the secondary's.
    assert!(send(
        &mut t,
        from_client(1000, 501, 7001, f::ACK, Some((10, 100))),
        t0
    )
    .is_empty());
    assert!(send(
        &mut t,
        from_client(1000, 504, 7001, f::ACK, Some((11, 100))),
        t0
    )
    .is_empty());
    assert_eq!(t.stats().queued_frames, 2);
    assert_eq!(t.take_unfed_syn(Replica::Secondary, key(1000)), None);
    let out = t.replica_frame(
        Replica::Secondary,
        key(1000),
        &from_replica(1000, 9000, f::SYN | f::ACK, Some(40)),
        t0 + MS,
    );
    assert_eq!(
        t.offsets(&key(1000)),
        Some(Offsets {
            seq: 2000,
            ts: 40u32.wrapping_sub(100)
        })
    );
    assert_eq!(out.len(), 2);
    for (g, seq) in out.iter().zip([501, 504]) {
        let (ip, u) = tcp_of(g);
        assert!(checksum::verify(g, &ip));
        assert_eq!(
            (u.seq, u.ack, u.options.timestamps.unwrap().ecr),
            (seq, 9001, 40)
        );
    }
    // From now on at once.
    let out = send(&mut t, from_client(1000, 507, 7004, f::ACK, None), t0);
    assert_eq!(tcp_of(&out[0]).1.ack, 9004);
    let s = t.stats();
    assert_eq!(
        (
            s.queued,
            s.flushed,
            s.rewritten,
            s.queued_frames,
            s.queued_bytes
        ),
        (2, 2, 3, 0, 0)
    );
    assert_eq!(t.take_unfed_syn(Replica::Secondary, key(1000)), Some(9000));
    assert_eq!(t.take_unfed_syn(Replica::Secondary, key(1000)), None);
    assert_eq!(t.take_unfed_syn(Replica::Primary, key(1000)), Some(7000));
}

#[test]
fn outbound_connections_learn_from_the_replicas_syns() {
    let t0 = Instant::now();
    let mut t = RewriteTable::new(RewriteConfig::default());
    t.replica_frame(
        Replica::Secondary,
        key(2),
        &from_replica(2, 50, f::SYN, None),
        t0,
    );
    // The remote's SYN-ACK acknowledges the primary's SYN: queued until it is seen.
    assert!(send(&mut t, from_client(2, 900, 11, f::SYN | f::ACK, None), t0).is_empty());
    let out = t.replica_frame(
        Replica::Primary,
        key(2),
        &from_replica(2, 10, f::SYN, None),
        t0,
    );
    assert_eq!(tcp_of(&out[0]).1.ack, 51);
    assert_eq!(t.offsets(&key(2)), Some(Offsets { seq: 40, ts: 0 }));
}

#[test]
fn queues_are_bounded_and_drop_the_oldest() {
    let t0 = Instant::now();
    let frame_len = from_client(1, 0, 0, f::ACK, None).len();
    let mut t = RewriteTable::new(RewriteConfig {
        max_queued_frames: 3,
        max_queued_bytes: 10 * frame_len,
        max_total_queued_bytes: 4 * frame_len,
        ..RewriteConfig::default()
    });
    for port in [1, 2] {
        send(&mut t, from_client(port, 0, 0, f::SYN, None), t0);
    }
    for seq in 1..=5 {
        assert!(send(&mut t, from_client(1, seq, 1, f::ACK, None), t0).is_empty());
    }
    assert_eq!(t.stats().queued_frames, 3);
    assert_eq!(t.stats().queue_dropped, 2);
    // The shared budget: port 2 gets one frame in, then its own oldest goes first.
    send(&mut t, from_client(2, 1, 1, f::ACK, None), t0);
    send(&mut t, from_client(2, 2, 1, f::ACK, None), t0);
    assert_eq!(t.stats().queued_frames, 4);
    assert_eq!(t.stats().queue_dropped, 3);
    t.replica_frame(
        Replica::Primary,
        key(1),
        &from_replica(1, 0, f::SYN | f::ACK, None),
        t0,
    );
    let out = t.replica_frame(
        Replica::Secondary,
        key(1),
        &from_replica(1, 0, f::SYN | f::ACK, None),
        t0,
    );
    let seqs: Vec<u32> = out.iter().map(|g| tcp_of(g).1.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(t.stats().queued_bytes, frame_len);
}

#[test]
fn table_is_bounded_and_connections_end() {
    let t0 = Instant::now();
    let mut t = RewriteTable::new(RewriteConfig {
        max_connections: 3,
        ..RewriteConfig::default()
    });
    for port in 1..=5 {
        send(&mut t, from_client(port, 0, 0, f::SYN, None), t0);
    }
    let s = t.stats();
    assert_eq!((s.connections, s.evicted), (3, 2));
    assert!(t.offsets(&key(1)).is_none());
    send(&mut t, from_client(9, 0, 0, f::ACK, None), t0);
    assert_eq!(t.stats().unknown, 1);
    // Port 3: FIN both ways, then forgotten after the linger; port 4: RST; port 5 idle.
    send(&mut t, from_client(3, 1, 1, f::FIN | f::ACK, None), t0);
    t.replica_frame(
        Replica::Primary,
        key(3),
        &from_replica(3, 1, f::FIN | f::ACK, None),
        t0 + MS,
    );
    send(&mut t, from_client(4, 1, 1, f::RST, None), t0 + 2 * MS);
    t.poll(t0 + Duration::from_secs(10));
    assert_eq!(t.stats().connections, 3);
    t.poll(t0 + Duration::from_secs(10) + MS);
    assert_eq!(t.stats().connections, 2);
    t.poll(t0 + Duration::from_secs(10) + 2 * MS);
    assert_eq!(t.stats().connections, 1);
    send(
        &mut t,
        from_client(5, 1, 1, f::ACK, None),
        t0 + Duration::from_secs(200),
    );
    t.poll(t0 + Duration::from_secs(499));
    assert_eq!(t.stats().connections, 1);
    t.poll(t0 + Duration::from_secs(500));
    assert_eq!(t.stats().connections, 0);
    assert_eq!(t.stats().expired, 3);
}

#[test]
fn a_new_syn_reopens_and_resync_zeroes_the_offsets() {
    let t0 = Instant::now();
    let mut t = RewriteTable::new(RewriteConfig::default());
    send(&mut t, from_client(1, 100, 0, f::SYN, None), t0);
    t.replica_frame(
        Replica::Primary,
        key(1),
        &from_replica(1, 1000, f::SYN | f::ACK, Some(5)),
        t0,
    );
    t.replica_frame(
        Replica::Secondary,
        key(1),
        &from_replica(1, 3000, f::SYN | f::ACK, Some(9)),
        t0,
    );
    assert_eq!(t.offsets(&key(1)), Some(Offsets { seq: 2000, ts: 4 }));
    // A retransmitted SYN changes nothing; one with another ISN is a new connection.
    send(&mut t, from_client(1, 100, 0, f::SYN, None), t0);
    assert!(t.offsets(&key(1)).is_some());
    send(&mut t, from_client(1, 200, 0, f::SYN, None), t0);
    assert!(t.offsets(&key(1)).is_none());
    // Port 2 waits for its secondary; port 3 for both replicas.
    send(&mut t, from_client(2, 1, 0, f::SYN, None), t0);
    t.replica_frame(
        Replica::Primary,
        key(2),
        &from_replica(2, 70, f::SYN | f::ACK, None),
        t0,
    );
    assert!(send(&mut t, from_client(2, 2, 71, f::ACK, None), t0).is_empty());
    send(&mut t, from_client(3, 1, 0, f::SYN, None), t0);
    t.replica_frame(
        Replica::Secondary,
        key(3),
        &from_replica(3, 99, f::SYN | f::ACK, None),
        t0,
    );
    let out = t.resync();
    assert_eq!(out.len(), 1);
    assert_eq!(tcp_of(&out[0]).1.ack, 71);
    assert_eq!(t.offsets(&key(2)), Some(Offsets::default()));
    assert_eq!(t.offsets(&key(3)), None);
    // Port 3's primary answers after the checkpoint; the copy answers the same.
    t.replica_frame(
        Replica::Primary,
        key(3),
        &from_replica(3, 500, f::SYN | f::ACK, None),
        t0,
    );
    t.replica_frame(
        Replica::Secondary,
        key(3),
        &from_replica(3, 500, f::SYN | f::ACK, None),
        t0,
    );
    assert_eq!(t.offsets(&key(3)), Some(Offsets::default()));
}
