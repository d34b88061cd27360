//! Links that break and peers that come back: a silent primary, a vanished secondary, a cut
//! link and its incremental resync, split-brain, fencing of interrupted sessions, online
//! verify.

use super::*;

#[test]
fn a_silent_primary_is_lost_and_the_policy_fails_over() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Failover, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        raw_session(&mut rd, &mut wr).await;
        let c = NbdClient::connect(&s.ep, &export(REPLICA_EXPORT))
            .await
            .unwrap();
        // Epoch 1 commits: this primary had finished starting.
        c.write(0, &[5; 4096], false).await.unwrap();
        let mark = c.submit_epoch_mark(2).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        send_checkpoint(&mut wr, 1, block_summary(1, 4096)).await;
        let m = read_message(&mut rd).await.unwrap();
        assert!(matches!(m, Message::Committed { epoch: 1, .. }), "{m:?}");
        c.write(8192, &[3; 4096], false).await.unwrap();
        // No heartbeats: 3 misses of 50 ms.
        wait_for("failover", || s.sec.mode() == Mode::Primary).await;
        assert!(
            last_error(&s.sec).contains("missed heartbeats"),
            "{}",
            last_error(&s.sec)
        );
        // Rolled back to epoch 1; forwarded writes are refused now.
        let disk = s.disk.snapshot();
        assert!(disk[..4096].iter().all(|&b| b == 5));
        assert!(disk[4096..].iter().all(|&b| b == 0));
        let e = c.write(0, &[1; 512], false).await.unwrap_err();
        assert!(
            e.to_string().contains("interrupted session")
                || e.to_string().contains("forwarded writes are refused"),
            "{e}"
        );
    });
}

#[test]
fn automatic_failover_ignores_a_primary_lost_before_its_first_checkpoint() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Failover, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        raw_session(&mut rd, &mut wr).await;
        // A primary that never got as far as a checkpoint (it failed to start) goes silent.
        drop((rd, wr));
        wait_for("paused", || s.sec.mode() == Mode::Paused).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.sec.mode(), Mode::Paused, "no automatic failover");
        // The operator may still decide to.
        s.sec
            .take_over(FailoverTarget::Checkpoint, false)
            .await
            .unwrap();
        assert_eq!(s.sec.mode(), Mode::Primary);
    });
}

#[test]
fn failover_is_refused_while_the_primary_replicates_unless_forced() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        p.primary
            .write_at(0, IoBuf::from_slice(&[1; 4096]), false)
            .await
            .unwrap();
        p.coord.checkpoint().await.unwrap();
        let e = s
            .sec
            .take_over(FailoverTarget::Latest, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("--force") && e.contains("split brain"), "{e}");
        assert_eq!(s.sec.mode(), Mode::Replicating);
        assert_eq!(p.primary.mode(), PrimaryMode::Replicating);
        // Forced: the session is broken off and the primary learns it at once.
        s.sec
            .take_over(FailoverTarget::Checkpoint, true)
            .await
            .unwrap();
        assert_eq!(s.sec.mode(), Mode::Primary);
        wait_for("the primary to stop replicating", || {
            p.primary.mode() != PrimaryMode::Replicating
        })
        .await;
        let e = p.coord.checkpoint().await.unwrap_err().to_string();
        assert!(!e.is_empty());
    });
}

#[test]
fn the_primary_survives_a_vanished_secondary() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Durable).await;
        p.primary
            .write_at(0, IoBuf::from_slice(&[1; 4096]), false)
            .await
            .unwrap();
        p.coord.checkpoint().await.unwrap();
        p.primary
            .write_at(4096, IoBuf::from_slice(&[2; 4096]), false)
            .await
            .unwrap();
        drop(s); // the secondary's server stops: its connections close
                 // Writes keep succeeding; the primary goes unprotected and records dirty blocks.
        for i in 0..20u64 {
            p.primary
                .write_at(i * 4096 + 8192, IoBuf::from_slice(&[3; 4096]), false)
                .await
                .unwrap();
        }
        wait_for("paused", || p.primary.mode() == PrimaryMode::Paused).await;
        p.primary
            .write_at(40 * 4096, IoBuf::from_slice(&[4; 100]), false)
            .await
            .unwrap();
        let dirty = p.primary.dirty_blocks();
        assert!(dirty.contains(1) && dirty.contains(40), "{dirty:?}");
        assert!(!dirty.contains(0), "block 0 was committed before the loss");
        assert!(p.coord.checkpoint().await.is_err());
    });
}

#[test]
fn a_cut_link_pauses_both_sides_and_an_incremental_resync_restores_them() {
    rt().block_on(async {
        let (s, proxy, p) = pair_behind_proxy().await;
        let committed = s.disk.snapshot();
        // Writes of an epoch that will never commit, then the cut.
        fill_blocks(&p.primary, 4..12, 2).await;
        proxy.cut();
        fill_blocks(&p.primary, 20..30, 3).await; // while the link is down
        wait_for("both paused", || {
            p.primary.mode() == PrimaryMode::Paused && s.sec.mode() == Mode::Paused
        })
        .await;
        assert!(
            p.coord.checkpoint().await.is_err(),
            "no checkpoint while paused"
        );
        // The secondary still holds the last checkpoint in its view.
        assert_eq!(read_all(&*s.sec.view()).await, committed);
        let dirty = p.primary.dirty_blocks();
        assert!(
            dirty.contains(4) && dirty.contains(11) && dirty.contains(29),
            "{dirty:?}"
        );
        assert!(!dirty.contains(0), "committed blocks are not dirty");
        proxy.heal();
        wait_for("resumed and resynced", || {
            p.primary.mode() == PrimaryMode::Replicating && !p.primary.status().resyncing
        })
        .await;
        let r = p.primary.resync_stats();
        assert_eq!(r.kind.as_deref(), Some("incremental"));
        assert!(
            r.sent_bytes <= 18 * 4096,
            "resent more than what was dirty: {r:?}"
        );
        p.coord.checkpoint().await.unwrap();
        assert_eq!(
            s.disk.snapshot(),
            p.disk.snapshot(),
            "images equal after the resync"
        );
        assert_eq!(read_all(&*s.sec.view()).await, p.disk.snapshot());
        assert!(s.sec.status().consistent);
        assert!(s.sec.status().resyncing.is_none());
    });
}

#[test]
fn split_brain_is_refused_and_discard_my_data_converges_by_checksum() {
    rt().block_on(async {
        // The secondary was in sync with generation 111; the primary's data is generation
        // 222, unrelated: both wrote on their own.
        let theirs = NodeMeta {
            generation: 111,
            history: vec![],
            clean: true,
            committed: 5,
        };
        let s =
            start_secondary_with(PeerLossPolicy::Wait, 1 << 20, Some(theirs.clone()), false).await;
        s.disk
            .write_at(0, IoBuf::from_slice(&[9; 8192]), false)
            .await
            .unwrap();
        let pdisk = MemoryBackend::new(SIZE);
        pdisk
            .write_at(40 * 4096, IoBuf::from_slice(&[5; 4096]), false)
            .await
            .unwrap();
        let mine = NodeMeta {
            generation: 222,
            history: vec![100],
            clean: true,
            committed: 0,
        };
        let table = DigestTable::scan(&pdisk).await.unwrap();
        let primary = Primary::new(
            Arc::new(pdisk.clone()),
            table,
            0,
            PrimaryOptions::default(),
            Arc::new(MetaStore::in_memory(mine.clone())),
        );
        let (_stop, stop_rx) = watch::channel(false);
        let repl = Replicator::new(
            primary,
            test_options(&s.ep, AckMode::Received, None),
            stop_rx,
        );
        let e = repl.attempt().await.unwrap_err().to_string();
        assert!(
            e.contains("split-brain") && e.contains("--discard-my-data"),
            "{e}"
        );
        // The peer is not told this node's generation; the local log and status are.
        assert!(!e.contains(&format!("{:016x}", 111)), "{e}");
        assert!(last_error(&s.sec).contains(&format!("{:016x}", 111)));
        assert_eq!(s.sec.mode(), Mode::Waiting);
        assert_eq!(
            s.sec.meta().generation,
            111,
            "nothing changed on the secondary"
        );
        drop(s);
        // The same secondary disk, told to discard its data.
        let s = start_secondary_with(PeerLossPolicy::Wait, 1 << 20, Some(theirs), true).await;
        s.disk
            .write_at(0, IoBuf::from_slice(&[9; 8192]), false)
            .await
            .unwrap();
        let p = start_primary_on(&s.ep, AckMode::Received, pdisk.clone(), mine).await;
        let r = p.primary.resync_stats();
        assert_eq!(r.kind.as_deref(), Some("checksum"));
        let chunk = 16 * 4096;
        assert_eq!(
            r.sent_bytes,
            2 * chunk,
            "only the two differing 64 KiB chunks travel: {r:?}"
        );
        assert_eq!(s.disk.snapshot(), pdisk.snapshot());
        assert_eq!(
            s.sec.meta().generation,
            222,
            "the secondary joined the primary's lineage"
        );
    });
}

#[test]
fn connections_of_an_interrupted_session_are_fenced_off() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        write_message(&mut wr, &hello()).await.unwrap();
        assert!(matches!(
            read_message(&mut rd).await.unwrap(),
            Message::Welcome { .. }
        ));
        // A data connection opened before RESUME (think: left over from the last session).
        let opts = ClientOptions {
            export: REPLICA_EXPORT.into(),
            ..ClientOptions::default()
        };
        let old = NbdClient::connect(&s.ep, &opts).await.unwrap();
        write_message(&mut wr, &Message::Resume { epoch: 1 })
            .await
            .unwrap();
        assert_eq!(
            read_message(&mut rd).await.unwrap(),
            Message::ResumeAck { epoch: 1 }
        );
        let e = old.write(0, &[1; 4096], false).await.unwrap_err();
        assert!(e.to_string().contains("interrupted session"), "{e}");
        let new = NbdClient::connect(&s.ep, &opts).await.unwrap();
        new.write(4096, &[2; 4096], false).await.unwrap();
        let disk = s.disk.snapshot();
        assert!(
            disk[..4096].iter().all(|&b| b == 0),
            "the fenced write landed"
        );
        assert!(
            disk[4096..8192].iter().all(|&b| b == 2),
            "the session's write is missing"
        );
    });
}

#[test]
fn online_verify_finds_a_block_that_differs_and_only_that() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let p = start_primary(&s.ep, AckMode::Received).await;
        fill_blocks(&p.primary, 0..40, 7).await;
        p.coord.checkpoint().await.unwrap();
        let v = p.repl.verify().await.unwrap();
        assert_eq!(v.differing_chunks, 0, "{v:?}");
        assert_eq!(v.total_chunks, 5, "{v:?}");
        // Damage the secondary's disk behind replication's back: chunk 2 (blocks 32..48).
        s.disk
            .write_at(33 * 4096 + 17, IoBuf::from_slice(&[0xee; 3]), false)
            .await
            .unwrap();
        let v = p.repl.verify().await.unwrap();
        assert_eq!(v.differing_chunks, 1, "{v:?}");
        assert_eq!(
            v.differing,
            vec![crate::replica::status::ByteRange {
                offset: 32 * 4096,
                len: 16 * 4096
            }]
        );
    });
}

// ---------------------------------------------------------------------------------------------
// Peer authentication: only a node that holds the key becomes the peer.
