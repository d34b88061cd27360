//! Tests of the comparator table.

use super::*;
use crate::flow::{PassRule, Proto};
use proptest::prelude::*;
use std::net::SocketAddr;

const MS: Duration = Duration::from_millis(1);

fn tcp_key(port: u16) -> FlowKey {
    FlowKey::tcp(
        "10.0.0.1:80".parse().unwrap(),
        SocketAddr::new("10.0.0.9".parse().unwrap(), port),
    )
}

fn cfg() -> Config {
    Config {
        compare_timeout: 100 * MS,
        ..Config::default()
    }
}

fn released(actions: &[Action], of: FlowKey) -> Vec<u8> {
    let mut out = Vec::new();
    for a in actions {
        if let Action::Release { key, data } = a {
            if *key == of {
                out.extend_from_slice(data);
            }
        }
    }
    out
}

fn checkpoints(actions: &[Action]) -> Vec<&Action> {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Checkpoint { .. }))
        .collect()
}

#[test]
fn tcp_flow_compares_releases_and_ends() {
    let t = Instant::now();
    let k = tcp_key(4000);
    let mut c = Comparator::new(cfg());
    assert!(c.primary_tcp(k, 100, TcpFlags::SYN, b"", t).is_empty());
    assert!(c
        .primary_tcp(k, 101, TcpFlags::NONE, b"hello", t)
        .is_empty());
    assert!(c.secondary_tcp(k, 9000, TcpFlags::SYN, b"", t).is_empty());
    let a = c.secondary_tcp(k, 9001, TcpFlags::NONE, b"hel", t);
    assert_eq!(
        a,
        vec![Action::Release {
            key: k,
            data: b"hel".to_vec()
        }]
    );
    let mut a = c.secondary_tcp(k, 9004, TcpFlags::FIN, b"lo", t);
    a.extend(c.primary_tcp(k, 106, TcpFlags::FIN, b"", t));
    assert_eq!(
        a,
        vec![
            Action::Release {
                key: k,
                data: b"lo".to_vec()
            },
            Action::End {
                key: k,
                reset: false
            }
        ]
    );
    let s = c.stats();
    assert_eq!((s.flows, s.bytes_compared, s.bytes_released), (0, 5, 5));
    assert_eq!(
        (s.mismatches, s.checkpoints_requested, s.held_bytes),
        (0, 0, 0)
    );
    assert_eq!(s.peak_held_bytes, 5);
}

#[test]
fn timeouts_request_one_checkpoint_and_resync_compares_again() {
    let t = Instant::now();
    let (k1, k2) = (tcp_key(1), tcp_key(2));
    let mut c = Comparator::new(cfg());
    c.primary_tcp(k1, 5, TcpFlags::NONE, b"abc", t);
    c.primary_tcp(k2, 7, TcpFlags::NONE, b"xyz", t + 10 * MS);
    assert!(c.poll(t + 99 * MS).is_empty());
    let a = c.poll(t + 110 * MS);
    assert_eq!(released(&a, k1), b"abc");
    assert_eq!(released(&a, k2), b"xyz");
    assert_eq!(checkpoints(&a).len(), 1);
    assert!(c.checkpoint_pending());
    // Diverged: output passes through, nothing more is requested.
    let a = c.primary_tcp(k1, 8, TcpFlags::NONE, b"d", t + 200 * MS);
    assert_eq!(
        a,
        vec![Action::Release {
            key: k1,
            data: b"d".to_vec()
        }]
    );
    assert!(c.poll(t + 900 * MS).is_empty());
    let s = c.stats();
    assert_eq!((s.timeouts, s.checkpoints_requested), (2, 1));
    // The checkpoint committed: compare again, in the primary's sequence space.
    assert!(c.resync_all().is_empty());
    assert!(!c.checkpoint_pending());
    assert!(c
        .primary_tcp(k1, 9, TcpFlags::NONE, b"ef", t + MS)
        .is_empty());
    let a = c.secondary_tcp(k1, 9, TcpFlags::NONE, b"ef", t + MS);
    assert_eq!(released(&a, k1), b"ef");
    let a = c.primary_tcp(k2, 10, TcpFlags::NONE, b"1", t + MS);
    assert!(a.is_empty());
    let a = c.secondary_tcp(k2, 10, TcpFlags::NONE, b"2", t + MS);
    assert_eq!(
        checkpoints(&a),
        vec![&Action::Checkpoint {
            key: k2,
            reason: Reason::Mismatch { offset: 3 }
        }]
    );
    assert_eq!(c.stats().checkpoints_requested, 2);
}

#[test]
fn udp_and_icmp_per_packet() {
    let t = Instant::now();
    let udp = FlowKey::udp(
        "[2001:db8::1]:53".parse().unwrap(),
        "[2001:db8::2]:3333".parse().unwrap(),
    );
    let icmp = FlowKey::icmp("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 77);
    let mut c = Comparator::new(cfg());
    // Equal.
    assert!(c.primary_packet(udp, b"answer", t).is_empty());
    let a = c.secondary_packet(udp, b"answer", t);
    assert_eq!(
        a,
        vec![Action::Release {
            key: udp,
            data: b"answer".to_vec()
        }]
    );
    // Different.
    c.secondary_packet(icmp, b"pong-2", t);
    let a = c.primary_packet(icmp, b"pong-1", t);
    assert_eq!(
        a,
        vec![
            Action::Checkpoint {
                key: icmp,
                reason: Reason::Mismatch { offset: 0 }
            },
            Action::Release {
                key: icmp,
                data: b"pong-1".to_vec()
            }
        ]
    );
    c.resync_all();
    // Missing.
    c.primary_packet(udp, b"second", t);
    let a = c.poll(t + 100 * MS);
    assert_eq!(
        a,
        vec![
            Action::Checkpoint {
                key: udp,
                reason: Reason::Timeout { offset: 1 }
            },
            Action::Release {
                key: udp,
                data: b"second".to_vec()
            }
        ]
    );
    let s = c.stats();
    assert_eq!(
        (s.mismatches, s.timeouts, s.checkpoints_requested),
        (1, 1, 2)
    );
    assert_eq!(s.bytes_compared, 6);
}

#[test]
fn passthrough_releases_without_comparing() {
    let t = Instant::now();
    let mut cfg = cfg();
    cfg.passthrough.rules.push(PassRule {
        proto: Some(Proto::Udp),
        port: Some(123),
        addr: None,
    });
    cfg.passthrough.rules.push(PassRule {
        addr: Some("10.0.0.1".parse().unwrap()),
        ..PassRule::default()
    });
    let ntp = FlowKey::udp(
        "10.0.0.5:123".parse().unwrap(),
        "10.0.0.9:999".parse().unwrap(),
    );
    let mut c = Comparator::new(cfg);
    assert_eq!(
        c.primary_packet(ntp, b"time=1", t),
        vec![Action::Release {
            key: ntp,
            data: b"time=1".to_vec()
        }]
    );
    assert!(c.secondary_packet(ntp, b"time=2", t).is_empty());
    let k = tcp_key(5);
    assert!(c
        .secondary_tcp(k, 1, TcpFlags::NONE, b"other", t)
        .is_empty());
    assert_eq!(
        released(&c.primary_tcp(k, 50, TcpFlags::NONE, b"clock", t), k),
        b"clock"
    );
    assert!(c.poll(t + Duration::from_secs(5)).is_empty());
    assert!(c.resync_all().is_empty());
    assert_eq!(
        released(&c.primary_tcp(k, 55, TcpFlags::NONE, b"!", t), k),
        b"!"
    );
    let s = c.stats();
    assert_eq!(
        (s.bytes_compared, s.checkpoints_requested, s.held_bytes),
        (0, 0, 0)
    );
}

#[test]
fn late_segments_of_an_ended_flow_are_ignored_until_a_syn() {
    let t = Instant::now();
    let k = tcp_key(7);
    let mut c = Comparator::new(cfg());
    c.primary_tcp(k, 10, TcpFlags::FIN, b"bye", t);
    let a = c.secondary_tcp(k, 20, TcpFlags::FIN, b"bye", t);
    assert_eq!(
        a.last(),
        Some(&Action::End {
            key: k,
            reset: false
        })
    );
    // The primary retransmits its FIN: no new comparison that could only time out.
    assert!(c
        .primary_tcp(k, 10, TcpFlags::FIN, b"bye", t + MS)
        .is_empty());
    assert!(c.poll(t + Duration::from_secs(1)).is_empty());
    assert_eq!(c.stats().flows, 0);
    assert_eq!(c.flows.len(), 1);
    // A new connection on the same addresses compares from its SYN.
    assert!(c
        .primary_tcp(k, 500, TcpFlags::SYN, b"", t + 2 * MS)
        .is_empty());
    assert!(c
        .primary_tcp(k, 501, TcpFlags::NONE, b"hi", t + 2 * MS)
        .is_empty());
    let a = c.secondary_tcp(k, 900, TcpFlags::SYN, b"hi", t + 2 * MS);
    assert_eq!(released(&a, k), b"hi");
    assert_eq!(c.stats().flows, 1);
    c.primary_tcp(k, 503, TcpFlags::RST, b"", t + 3 * MS);
    // Ended flows are forgotten after `ended_linger`.
    assert!(c.poll(t + Duration::from_secs(11)).is_empty());
    assert_eq!(c.flows.len(), 0);
    assert_eq!(c.stats().checkpoints_requested, 0);
}

#[test]
fn idle_flows_are_forgotten() {
    let t = Instant::now();
    let mut cfg = cfg();
    cfg.idle_timeout = Duration::from_secs(10);
    let mut c = Comparator::new(cfg);
    let k = tcp_key(1);
    c.primary_tcp(k, 1, TcpFlags::NONE, b"a", t);
    c.secondary_tcp(k, 1, TcpFlags::NONE, b"a", t);
    assert_eq!(c.stats().flows, 1);
    assert!(c.poll(t + Duration::from_secs(9)).is_empty());
    assert!(c.poll(t + Duration::from_secs(10)).is_empty());
    assert_eq!(c.stats().flows, 0);
}

#[test]
fn over_budget_the_oldest_flow_is_released_and_a_checkpoint_requested() {
    let t = Instant::now();
    let mut cfg = cfg();
    cfg.max_held_bytes = 10;
    let mut c = Comparator::new(cfg);
    let (k1, k2) = (tcp_key(1), tcp_key(2));
    assert!(c
        .primary_tcp(k1, 0, TcpFlags::NONE, b"111111", t)
        .is_empty());
    let a = c.primary_tcp(k2, 0, TcpFlags::NONE, b"2222", t + MS);
    assert!(a.is_empty());
    let a = c.primary_tcp(k2, 4, TcpFlags::NONE, b"2", t + 2 * MS);
    assert_eq!(
        a,
        vec![
            Action::Release {
                key: k1,
                data: b"111111".to_vec()
            },
            Action::Checkpoint {
                key: k1,
                reason: Reason::MemoryBudget
            }
        ]
    );
    assert_eq!(c.held_bytes(), 5);
    let s = c.stats();
    assert_eq!((s.evictions, s.peak_held_bytes), (1, 10));
    // k2 still compares.
    assert_eq!(
        released(&c.secondary_tcp(k2, 0, TcpFlags::NONE, b"22222", t), k2),
        b"22222"
    );
}

/// What the test knows of one flow: the bytes each side has sent (the same stream).
#[derive(Debug, Default, Clone)]
struct Model {
    p_isn: u32,
    s_isn: u32,
    p_pos: usize,
    s_pos: usize,
    released: Vec<u8>,
}

fn byte(flow: usize, off: usize) -> u8 {
    (flow * 31 + off * 7 + off / 251) as u8
}

fn stream(flow: usize, from: usize, len: usize) -> Vec<u8> {
    (from..from + len).map(|o| byte(flow, o)).collect()
}

fn record(models: &mut [Model], actions: &[Action]) -> Result<(), TestCaseError> {
    for a in actions {
        if let Action::Release { key, data } = a {
            let f = key.dst.port() as usize;
            let m = &mut models[f];
            m.released.extend_from_slice(data);
            prop_assert!(m.released.len() <= m.p_pos);
            prop_assert_eq!(&m.released, &stream(f, 0, m.released.len()));
        }
    }
    Ok(())
}

proptest! {
    /// Many flows, both replicas producing the same output at different paces, a small
    /// memory budget: held bytes never exceed it, no flow's output is lost, duplicated or
    /// reordered, every flow's output is released in the end, and after a resync every
    /// flow compares again.
    #[test]
    fn memory_stays_within_the_budget(
        nflows in 1usize..40,
        budget in 300usize..4000,
        ops in proptest::collection::vec((any::<usize>(), 0u8..10, 1usize..400), 1..300),
        isns in proptest::collection::vec(any::<u32>(), 80),
    ) {
        let t0 = Instant::now();
        let mut cfg = cfg();
        cfg.max_held_bytes = budget;
        cfg.compare_timeout = Duration::from_secs(1);
        let mut c = Comparator::new(cfg);
        let mut models: Vec<Model> = (0..nflows)
            .map(|f| Model {
                p_isn: isns[2 * f],
                s_isn: isns[2 * f + 1],
                ..Model::default()
            })
            .collect();
        let mut now = t0;
        for (f, op, len) in ops {
            let f = f % nflows;
            let key = tcp_key(f as u16);
            now += MS;
            let m = &mut models[f];
            let actions = match op {
                0..=3 => {
                    let seq = m.p_isn.wrapping_add(m.p_pos as u32);
                    let data = stream(f, m.p_pos, len);
                    m.p_pos += len;
                    c.primary_tcp(key, seq, TcpFlags::NONE, &data, now)
                }
                4..=7 => {
                    let seq = m.s_isn.wrapping_add(m.s_pos as u32);
                    let data = stream(f, m.s_pos, len);
                    m.s_pos += len;
                    c.secondary_tcp(key, seq, TcpFlags::NONE, &data, now)
                }
                8 => {
                    now += len as u32 * 5 * MS;
                    c.poll(now)
                }
                _ => {
                    // A checkpoint committed: the secondary continues from the
                    // primary's position in the primary's sequence space.
                    for m in models.iter_mut() {
                        m.s_isn = m.p_isn;
                        m.s_pos = m.p_pos;
                    }
                    c.resync_all()
                }
            };
            record(&mut models, &actions)?;
            prop_assert!(c.held_bytes() <= budget);
            prop_assert!(c.stats().peak_held_bytes <= budget);
        }
        prop_assert_eq!(c.stats().mismatches, 0);
        // Whatever is still held goes out by timeout.
        now += Duration::from_secs(2);
        let actions = c.poll(now);
        record(&mut models, &actions)?;
        for (f, m) in models.iter().enumerate() {
            prop_assert_eq!(m.released.len(), m.p_pos, "flow {}", f);
        }
        // After a resync nothing is held (the secondary's bytes ahead of the primary's
        // are dropped) and every flow compares again.
        let actions = c.resync_all();
        record(&mut models, &actions)?;
        prop_assert_eq!(c.held_bytes(), 0);
        for (f, m) in models.iter_mut().enumerate() {
            let key = tcp_key(f as u16);
            let data = stream(f, m.p_pos, 10);
            let seq = m.p_isn.wrapping_add(m.p_pos as u32);
            m.p_pos += 10;
            let a = c.primary_tcp(key, seq, TcpFlags::NONE, &data, now);
            prop_assert!(a.is_empty());
            let a = c.secondary_tcp(key, seq, TcpFlags::NONE, &data, now);
            prop_assert_eq!(&a, &vec![Action::Release { key, data: data.clone() }]);
            m.released.extend_from_slice(&data);
        }
        let s = c.stats();
        prop_assert_eq!(s.mismatches, 0);
        prop_assert!(s.bytes_released >= s.bytes_compared);
    }
}
