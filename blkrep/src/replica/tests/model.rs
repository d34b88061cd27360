//! The model-checked replication test: random writes, trims, zeroing, local writes on the
//! secondary and pipelined checkpoints, then a failover; the secondary must hold exactly what
//! the model says.

use super::*;

#[derive(Debug, Clone)]
enum Step {
    /// A primary write of `len` bytes of `fill` (varied per byte) at `off`.
    Write {
        off: u64,
        len: u64,
        fill: u8,
    },
    Trim {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    /// A write by the secondary itself (COLO running secondary).
    Local {
        off: u64,
        len: u64,
        fill: u8,
    },
    /// Close the current epoch and drain it to the secondary, without committing yet:
    /// later writes belong to the next epoch while this one waits (pipelined checkpoints).
    Cut,
    /// Commit the oldest cut epoch.
    Commit,
    /// Cut and commit everything.
    Checkpoint,
}

fn range(aligned: bool) -> impl Strategy<Value = (u64, u64)> {
    if aligned {
        (0..64u64, 1..6u64)
            .prop_map(|(b, n)| (b * 4096, (n * 4096).min(SIZE - b * 4096)))
            .boxed()
    } else {
        (0..SIZE - 1)
            .prop_flat_map(|off| (Just(off), 1..(SIZE - off).min(20_000)))
            .boxed()
    }
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (any::<bool>(), any::<u8>()).prop_flat_map(|(a, fill)| range(a).prop_map(move |(off, len)| Step::Write { off, len, fill })),
        1 => range(false).prop_map(|(off, len)| Step::Trim { off, len }),
        1 => range(true).prop_map(|(off, len)| Step::Zero { off, len }),
        2 => (any::<bool>(), any::<u8>()).prop_flat_map(|(a, fill)| range(a).prop_map(move |(off, len)| Step::Local { off, len, fill })),
        1 => Just(Step::Cut),
        1 => Just(Step::Commit),
        1 => Just(Step::Checkpoint),
    ]
}

/// The model: the primary's disk, the last committed image, and the secondary's view.
struct Model {
    primary: Vec<u8>,
    committed: Vec<u8>,
    view: Vec<u8>,
    local_writes: bool,
}

async fn run_case(steps: Vec<Step>, end: FailoverTarget, ack: AckMode, spill: bool) {
    use crate::epoch::{CheckpointLink, Participant};
    let s = start_secondary(PeerLossPolicy::Wait, if spill { 8 * 4096 } else { 1 << 20 }).await;
    let p = start_primary(&s.ep, ack).await;
    let block = BlockParticipant(p.primary.clone());
    let view = s.sec.view();
    let mut m = Model {
        primary: vec![0; SIZE as usize],
        committed: vec![0; SIZE as usize],
        view: vec![0; SIZE as usize],
        local_writes: false,
    };
    let mut next = p.coord.current().0;
    let mut pending: std::collections::VecDeque<(u64, EpochSummary, Vec<u8>)> = Default::default();
    let mut steps = steps;
    steps.push(Step::Commit); // sometimes leaves a cut epoch open before the failover
    for (i, st) in steps.iter().enumerate() {
        let mut commits = 0;
        match st {
            Step::Write { off, len, fill } => {
                let data = pattern(*off, *len, *fill);
                p.primary
                    .write_at(*off, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                m.primary[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
            }
            Step::Trim { off, len } => {
                p.primary.discard(*off, *len).await.unwrap();
                m.primary[*off as usize..(*off + *len) as usize].fill(0);
            }
            Step::Zero { off, len } => {
                p.primary.write_zeroes(*off, *len, false).await.unwrap();
                m.primary[*off as usize..(*off + *len) as usize].fill(0);
            }
            Step::Local { off, len, fill } => {
                let data = pattern(*off, *len, *fill);
                view.write_at(*off, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                m.view[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
                m.local_writes = true;
            }
            Step::Cut | Step::Checkpoint if pending.len() < 3 => {
                block.cut(Epoch(next)).await.unwrap();
                let summary = block.prepare(Epoch(next)).await.unwrap();
                assert_eq!(
                    summary.digest,
                    {
                        let t = DigestTable::scan(&p.disk).await.unwrap();
                        t.sum()
                    },
                    "step {i}: the cut's digest is the primary disk's"
                );
                pending.push_back((next, summary, m.primary.clone()));
                next += 1;
                if matches!(st, Step::Checkpoint) {
                    commits = pending.len();
                }
            }
            Step::Commit => commits = 1.min(pending.len()),
            Step::Cut | Step::Checkpoint => {}
        }
        for _ in 0..commits {
            let (e, summary, image) = pending.pop_front().unwrap();
            p.link().checkpoint(Epoch(e), vec![summary]).await.unwrap();
            block.commit(Epoch(e));
            m.committed = image.clone();
            m.view = image;
            m.local_writes = false;
            if pending.is_empty() && m.committed == m.primary {
                // Nothing written since the cut: the secondary disk equals the primary's.
                assert!(
                    s.disk.snapshot() == m.primary,
                    "step {i}: disk != primary after checkpoint"
                );
                let (img, cp) = s.sec.verify_checkpoint().await.unwrap();
                assert_eq!(Some(img), cp, "step {i}: digest of the checkpoint");
            }
            assert_eq!(s.sec.status().committed_epoch, e);
        }
        assert!(
            p.disk.snapshot() == m.primary,
            "step {i} {st:?}: primary disk != model"
        );
        assert!(
            read_all(&*view).await == m.view,
            "step {i} {st:?}: secondary view != model"
        );
        let _ = &p.coord;
    }
    if end == FailoverTarget::Latest && ack == AckMode::Local {
        assert!(wait_idle(&p.primary, Duration::from_secs(10)).await);
    }
    let rep = s.sec.failover(end).await.unwrap();
    let expect = match end {
        FailoverTarget::Checkpoint => &m.view,
        FailoverTarget::Latest => &m.primary,
    };
    assert!(
        s.disk.snapshot() == *expect,
        "after failover to {end:?}: disk != model"
    );
    assert_eq!(s.sec.mode(), Mode::Primary);
    if end == FailoverTarget::Checkpoint {
        assert_eq!(rep.comparable, !m.local_writes);
        if !m.local_writes {
            let (img, cp) = s.sec.verify_checkpoint().await.unwrap();
            assert_eq!(Some(img), cp, "failover to the checkpoint: digest");
        }
    }
    // After failover the view is the disk.
    assert!(read_all(&*view).await == *expect);
    drop(p);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn replication_matches_the_model(
        steps in proptest::collection::vec(step(), 1..40),
        latest in any::<bool>(),
        ack in prop_oneof![Just(AckMode::Local), Just(AckMode::Received), Just(AckMode::Durable), Just(AckMode::Sync)],
        spill in any::<bool>(),
    ) {
        let end = if latest { FailoverTarget::Latest } else { FailoverTarget::Checkpoint };
        rt().block_on(run_case(steps, end, ack, spill));
    }
}

/// Concurrent writers to overlapping blocks: both disks must end up identical (the forwarder
/// keeps the local order per block).
#[test]
fn concurrent_overlapping_writes_stay_in_order() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Local).await;
        let mut tasks = Vec::new();
        for k in 0..8u64 {
            let pr = p.primary.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    let off = ((k * 7 + i * 13) % 60) * 4096 + (i % 3) * 1000;
                    let data = pattern(off, 5000, (k * 31 + i) as u8);
                    pr.write_at(off, IoBuf::from_slice(&data), false)
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        p.coord.checkpoint().await.unwrap();
        assert!(s.disk.snapshot() == p.disk.snapshot());
        let (img, cp) = s.sec.verify_checkpoint().await.unwrap();
        assert_eq!(Some(img), cp);
    });
}
