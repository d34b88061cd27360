//! `verify --repair`: chunks damaged on the secondary behind replication's back are resent,
//! committed and compared again; with client writes going on; a failover afterwards keeps
//! them; a session lost before the resend leaves them to the next resync; a primary whose
//! own disk changed behind its back; refusals.

use super::*;
use crate::replica::status::ByteRange;

/// Run checkpoints on request, as the daemon does (a repair asks for one).
fn run_checkpoints(p: &PrimarySide) -> watch::Sender<bool> {
    p.repl.set_trigger(p.coord.trigger());
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(p.coord.clone().run(stop_rx));
    stop
}

/// Write `bytes` over the secondary's disk at `offset`, behind replication's back.
async fn damage(s: &SecondarySide, offset: u64, bytes: &[u8]) {
    s.disk
        .write_at(offset, IoBuf::from_slice(bytes), false)
        .await
        .unwrap();
}

#[test]
fn verify_repair_resends_differing_chunks_and_a_failover_keeps_them() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        let _stop = run_checkpoints(&p);
        fill_blocks(&p.primary, 0..64, 7).await;
        p.primary
            .write_at(64 * 4096, IoBuf::from_slice(&[0x42; 1000]), false)
            .await
            .unwrap();
        p.coord.checkpoint().await.unwrap();
        // Chunks 0, 2 and the short last one (block 64, 1000 bytes).
        damage(&s, 3 * 4096 + 5, &[0xee; 7]).await;
        damage(&s, 33 * 4096, &[0xdd; 4096]).await;
        damage(&s, 64 * 4096 + 500, &[0xcc; 9]).await;
        let v = p.repl.verify().await.unwrap();
        assert_eq!(v.differing_chunks, 3, "{v:?}");
        assert!(v.repair.is_none());
        let chunk = 16 * 4096;
        let mut events = p.primary.events().subscribe();
        let v = p.repl.verify_with(true).await.unwrap();
        let verify_event = loop {
            let e = events.try_recv().expect("a verify event");
            if e["event"] == "verify" {
                break e;
            }
        };
        assert_eq!(verify_event["state"], "done", "{verify_event}");
        assert_eq!(verify_event["repaired_chunks"], 3, "{verify_event}");
        assert_eq!(verify_event["still_differing_chunks"], 0, "{verify_event}");
        assert_eq!(v.differing_chunks, 3, "{v:?}");
        assert_eq!(
            v.differing,
            vec![
                ByteRange {
                    offset: 0,
                    len: chunk
                },
                ByteRange {
                    offset: 2 * chunk,
                    len: chunk
                },
                ByteRange {
                    offset: 4 * chunk,
                    len: 1000
                },
            ]
        );
        let r = v.repair.clone().expect("a repair report");
        assert_eq!(r.repaired_chunks, 3, "{r:?}");
        assert_eq!(r.repaired_bytes, 2 * chunk + 1000, "{r:?}");
        assert_eq!(r.reverified_chunks, 3, "{r:?}");
        assert_eq!(r.still_differing_chunks, 0, "{r:?}");
        assert_eq!(r.rehashed_blocks, 0, "{r:?}");
        // Two batches of at most two chunks in unit tests, a checkpoint each.
        assert_eq!(r.checkpoints, 2, "{r:?}");
        assert_eq!(r.committed_epoch, p.coord.committed().0, "{r:?}");
        assert_eq!(v.state, "done");
        assert_eq!(s.disk.snapshot(), p.disk.snapshot(), "repaired");
        assert!(p.primary.dirty_blocks().is_empty());
        let v = p.repl.verify().await.unwrap();
        assert_eq!(v.differing_chunks, 0, "{v:?}");
        // Failing over to the checkpoint (the repair's commit) keeps the repaired data and
        // drops what the primary wrote after it.
        let repaired = p.disk.snapshot();
        fill_blocks(&p.primary, 2..4, 9).await;
        p.primary.barrier().await.unwrap();
        s.sec
            .take_over(FailoverTarget::Checkpoint, true)
            .await
            .unwrap();
        assert_eq!(s.disk.snapshot(), repaired, "the repaired checkpoint");
    });
}

#[test]
fn verify_repair_under_client_writes_ends_with_equal_disks() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        let _stop = run_checkpoints(&p);
        fill_blocks(&p.primary, 0..64, 3).await;
        p.coord.checkpoint().await.unwrap();
        for b in [1, 17, 18, 40, 63] {
            damage(&s, b * 4096 + 100, &[0x5a; 300]).await;
        }
        // Writes into the damaged chunks while they are compared, resent and compared again.
        let writer = {
            let primary = p.primary.clone();
            tokio::spawn(async move {
                for round in 0..40u8 {
                    fill_blocks(&primary, [16, 17, 41, 62].into_iter(), round).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        let v = p.repl.verify_with(true).await.unwrap();
        writer.await.unwrap();
        let r = v.repair.expect("a repair report");
        assert_eq!(r.repaired_chunks, 4, "{r:?}");
        assert_eq!(r.still_differing_chunks, 0, "{r:?}");
        p.coord.checkpoint().await.unwrap();
        assert_eq!(s.disk.snapshot(), p.disk.snapshot());
        assert_eq!(p.repl.verify().await.unwrap().differing_chunks, 0);
    });
}

#[test]
fn blocks_marked_for_repair_are_resent_by_the_next_resync_after_a_loss() {
    rt().block_on(async {
        let (s, proxy, p) = pair_behind_proxy().await;
        damage(&s, 5 * 4096, &[0x77; 4096]).await;
        assert_eq!(p.repl.verify().await.unwrap().differing_chunks, 1);
        // The session ends before the repair sends anything.
        p.primary.mark_for_repair(&(0..16).collect()).await.unwrap();
        proxy.cut();
        wait_for("paused", || p.primary.mode() != PrimaryMode::Replicating).await;
        let e = p.primary.send_repair().await.unwrap_err().to_string();
        assert!(e.contains("next session's resync"), "{e}");
        let e = p.repl.verify_with(true).await.unwrap_err().to_string();
        assert!(e.contains("not replicating"), "{e}");
        let last = p.repl.status().verify.expect("the last verify");
        assert!(
            last.state.starts_with("done"),
            "a refused verify leaves the last one: {last:?}"
        );
        proxy.heal();
        wait_for("resumed and resynced", || {
            p.primary.mode() == PrimaryMode::Replicating && !p.primary.status().resyncing
        })
        .await;
        // An incremental resync: only the block that differs is sent.
        let r = p.primary.resync_stats();
        assert_eq!(r.kind.as_deref(), Some("incremental"), "{r:?}");
        assert_eq!(r.sent_bytes, 4096, "{r:?}");
        p.coord.checkpoint().await.unwrap();
        assert_eq!(s.disk.snapshot(), p.disk.snapshot());
        assert_eq!(p.repl.verify().await.unwrap().differing_chunks, 0);
    });
}

#[test]
fn verify_repair_needs_a_checkpoint_coordinator_and_one_verify_at_a_time() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        let e = p.repl.verify_with(true).await.unwrap_err().to_string();
        assert!(e.contains("no checkpoints"), "{e}");
        let _stop = run_checkpoints(&p);
        // The first verify waits for block 0, held here, while the second is asked for.
        let held = p.primary.lock_blocks(0, 0).await;
        let first = tokio::spawn({
            let repl = p.repl.clone();
            async move { repl.verify_with(true).await }
        });
        wait_for("the first verify to start", || {
            p.repl.status().verify.is_some_and(|v| v.state == "running")
        })
        .await;
        let e = p.repl.verify().await.unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        drop(held);
        let v = first.await.unwrap().unwrap();
        assert_eq!(v.differing_chunks, 0, "{v:?}");
        assert!(v.repair.is_none(), "nothing to repair: {v:?}");
    });
}

#[test]
fn verify_repair_sends_what_the_primary_disk_holds_when_it_changed_behind_its_back() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        let _stop = run_checkpoints(&p);
        fill_blocks(&p.primary, 0..32, 5).await;
        p.coord.checkpoint().await.unwrap();
        // Block 20 changes on both disks, differently, with no write through the primary.
        p.disk
            .write_at(20 * 4096, IoBuf::from_slice(&[0x11; 4096]), false)
            .await
            .unwrap();
        damage(&s, 20 * 4096, &[0x22; 4096]).await;
        let v = p.repl.verify_with(true).await.unwrap();
        assert_eq!(v.differing_chunks, 1, "{v:?}");
        let r = v.repair.expect("a repair report");
        assert_eq!(r.rehashed_blocks, 1, "{r:?}");
        assert_eq!(r.still_differing_chunks, 0, "{r:?}");
        let disk = s.disk.snapshot();
        assert!(disk[20 * 4096..21 * 4096].iter().all(|&b| b == 0x11));
        assert_eq!(disk, p.disk.snapshot());
        // The primary's digest says what its disk holds again.
        let fresh = DigestTable::scan(&p.disk).await.unwrap();
        assert_eq!(p.primary.digest(), fresh.sum());
    });
}
