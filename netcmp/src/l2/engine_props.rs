//! Engine properties: a handshake flood stays within its bounds, garbage on every port never
//! panics, and any segmentation on either side releases exactly the primary's frames.

use std::time::Duration;

use proptest::prelude::*;

use super::build;
use super::engine::EngineConfig;
use super::engine_tests::{open, Conn, Run, C, MS, P, S};
use super::frame::tcp_flags as f;

#[test]
fn a_syn_flood_keeps_memory_bounded() {
    let mut cfg = EngineConfig::default();
    cfg.rewrite.max_connections = 100;
    cfg.max_flows = 50;
    cfg.max_held_frame_bytes = 20_000;
    let mut run = Run::new(cfg);
    for port in 0..3000u16 {
        let k = Conn::v4(port);
        run.client_in(k.client(7, 0, f::SYN, None, b""));
        run.primary_in(k.replica(P, 8, f::SYN | f::ACK, None, b""));
        run.secondary_in(k.replica(S, 8, f::SYN | f::ACK, None, b""));
        run.client_in(k.client(8, P + 1, f::ACK, None, b""));
    }
    assert_eq!(run.client.len(), 3000, "every SYN-ACK reaches its client");
    let st = run.e.stats();
    assert_eq!(st.rewrite.connections, 100);
    assert_eq!(st.rewrite.evicted, 2900);
    assert_eq!((st.flows, st.compare.flows, st.held_frames), (0, 0, 0));
    // Data on many flows with no secondary: held frames stay within the budget.
    for port in 0..3000u16 {
        run.primary_in(Conn::v4(port).replica(P + 1, 8, f::ACK, None, &[1; 100]));
        let st = run.e.stats();
        assert!(st.held_frame_bytes <= 20_000 && st.flows <= 50);
    }
    let st = run.e.stats();
    assert_eq!(run.client.len(), 3000 + st.forced_releases as usize);
    assert_eq!(st.forced_releases as usize + st.held_frames, 3000);
    assert_eq!((st.flows, st.flows_evicted), (50, 2950));
    assert_eq!(run.checkpoints.len(), 1);
    assert!(st.peak_held_frame_bytes <= 20_000);
}

/// Every port gets random bytes, truncated and corrupted valid frames: nothing panics, the
/// budget holds, the client only ever gets frames the primary sent.
fn garbage_case(frames: Vec<(u8, Vec<u8>)>) -> Result<(), TestCaseError> {
    let mut run = Run::new(EngineConfig {
        max_held_frame_bytes: 2000,
        ..EngineConfig::default()
    });
    let mut from_primary = Vec::new();
    for (port, fr) in frames {
        match port % 4 {
            0 => {
                run.client_in(fr);
            }
            1 => {
                from_primary.push(fr.clone());
                run.primary_in(fr);
            }
            2 => {
                run.secondary_in(fr);
            }
            _ => run.poll(30 * MS),
        }
        prop_assert!(run.e.stats().held_frame_bytes <= 2000);
    }
    run.poll(Duration::from_secs(5));
    for c in &run.client {
        prop_assert!(from_primary.contains(c));
    }
    Ok(())
}

fn valid_frames() -> Vec<Vec<u8>> {
    let k = Conn::v4(5);
    let k6 = Conn::v6(6);
    vec![
        k.client(C, 0, f::SYN, Some((1, 0)), b""),
        k.replica(P, C + 1, f::SYN | f::ACK, Some((1, 1)), b""),
        k.replica(S, C + 1, f::SYN | f::ACK, Some((9, 1)), b""),
        k.client(C + 1, P + 1, f::ACK, Some((2, 1)), b"req"),
        k.replica(P + 1, C + 4, f::ACK, None, b"reply"),
        k.replica(S + 1, C + 4, f::ACK | f::FIN, None, b"reply"),
        k6.replica(P, 1, f::ACK | f::RST, None, b""),
        build::udp_frame(&k.c, 1, 2, b"u"),
    ]
}

proptest! {
    #[test]
    fn garbage_on_every_port_never_panics(
        frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..120)), 0..60),
    ) {
        garbage_case(frames)?;
    }

    #[test]
    fn truncated_and_corrupted_frames_never_panic(
        ops in proptest::collection::vec((any::<u8>(), 0usize..8, any::<usize>(), any::<usize>(), any::<u8>()), 0..60),
    ) {
        let valid = valid_frames();
        let frames = ops
            .into_iter()
            .map(|(port, which, cut, at, v)| {
                let mut fr = valid[which].clone();
                if v % 2 == 0 {
                    let n = fr.len();
                    fr[at % n] = v;
                }
                fr.truncate(cut % (fr.len() + 1).max(1) + if v % 3 == 0 { 0 } else { fr.len() });
                (port, fr)
            })
            .collect();
        garbage_case(frames)?;
    }

    /// The same reply cut differently on each side, arriving interleaved at random, with
    /// primary retransmissions, over IPv4 or IPv6, tagged or not: the client gets exactly the primary's frames in the order
    /// the primary sent them, and no checkpoint is requested.
    #[test]
    fn any_segmentation_releases_the_primarys_frames_in_order(
        len in 1usize..3000,
        p_cuts in proptest::collection::vec(any::<usize>(), 0..12),
        s_cuts in proptest::collection::vec(any::<usize>(), 0..12),
        order in proptest::collection::vec(any::<bool>(), 40),
        dup in proptest::collection::vec(any::<usize>(), 0..3),
        v6 in any::<bool>(),
        vlan in proptest::option::of(0u16..4096),
    ) {
        let mut k = if v6 { Conn::v6(40100) } else { Conn::v4(40100) };
        k.c.vlan = vlan;
        let mut run = Run::new(EngineConfig::default());
        let mut expect = open(&mut run, &k);
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 256) as u8).collect();
        let cut = |cuts: &[usize]| {
            let mut b: Vec<usize> = cuts.iter().map(|c| c % (len + 1)).collect();
            b.extend([0, len]);
            b.sort_unstable();
            b.dedup();
            b
        };
        let (pb, sb) = (cut(&p_cuts), cut(&s_cuts));
        let mut p_frames: Vec<Vec<u8>> = pb.windows(2).enumerate().map(|(i, w)| {
            let fl = if i + 2 == pb.len() { f::ACK | f::FIN } else { f::ACK };
            k.replica(P + 1 + w[0] as u32, C + 6, fl, None, &data[w[0]..w[1]])
        }).collect();
        for d in dup {
            let i = d % p_frames.len();
            let copy = p_frames[i].clone();
            p_frames.insert(i + 1, copy);
        }
        let s_frames: Vec<Vec<u8>> = sb.windows(2).enumerate().map(|(i, w)| {
            let fl = if i + 2 == sb.len() { f::ACK | f::FIN } else { f::ACK };
            k.replica(S.wrapping_add(1 + w[0] as u32), C + 6, fl, None, &data[w[0]..w[1]])
        }).collect();
        let (mut pi, mut si, mut oi) = (0, 0, 0);
        while pi < p_frames.len() || si < s_frames.len() {
            let primary_next = si == s_frames.len() || (pi < p_frames.len() && order[oi % order.len()]);
            oi += 1;
            if primary_next {
                run.primary_in(p_frames[pi].clone());
                pi += 1;
            } else {
                run.secondary_in(s_frames[si].clone());
                si += 1;
            }
            prop_assert!(expect.len() + pi >= run.client.len());
        }
        expect.extend(p_frames);
        prop_assert_eq!(&run.client, &expect);
        prop_assert!(run.checkpoints.is_empty());
        prop_assert_eq!(run.e.stats().held_frames, 0);
    }
}

proptest! {
    /// Well-formed but arbitrary TCP segments (any flags, sequence numbers near a few bases,
    /// both replicas, two connections) with polls, resyncs and client frames in between:
    /// nothing panics, the budget holds, and every primary frame reaches the client in the
    /// end.
    #[test]
    fn arbitrary_tcp_segments_never_panic(
        ops in proptest::collection::vec(
            (0u8..6, 0usize..2, 0u32..4, -40i32..400, any::<u8>(), 0usize..30),
            1..120,
        ),
    ) {
        let bases = [0u32, P, S, u32::MAX - 10];
        let mut run = Run::new(EngineConfig {
            max_held_frame_bytes: 4000,
            ..EngineConfig::default()
        });
        let mut sent = 0;
        for (op, conn, base, delta, flags, len) in ops {
            let k = if conn == 0 { Conn::v4(7) } else { Conn::v6(8) };
            let seq = bases[base as usize].wrapping_add(delta as u32);
            let data = vec![delta as u8; len];
            let flags = flags & (f::FIN | f::SYN | f::RST | f::ACK | f::PSH);
            match op {
                0 | 1 => {
                    sent += 1;
                    run.primary_in(k.replica(seq, C, flags, Some((1, 2)), &data));
                }
                2 | 3 => {
                    run.secondary_in(k.replica(seq, C, flags, Some((3, 2)), &data));
                }
                4 => {
                    run.client_in(k.client(C, seq, flags, Some((5, 6)), &data));
                }
                _ if delta % 2 == 0 => run.poll(Duration::from_millis(len as u64 * 20)),
                _ => {
                    let o = run.e.resync(run.now);
                    run.take(o);
                }
            }
            prop_assert!(run.e.stats().held_frame_bytes <= 4000);
        }
        run.poll(Duration::from_secs(2));
        prop_assert_eq!(run.client.len(), sent);
        prop_assert_eq!(run.e.stats().held_frames, 0);
    }
}
