//! Write ordering: what the secondary says about its disk (COMMITTED, clean, the adopted
//! generation) and a client FLUSH are never ahead of the disk's own flush.

use super::*;

#[test]
fn metadata_claims_about_the_disk_follow_its_flush() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let disk = GatedFlush::new(MemoryBackend::new(SIZE));
        let meta_file = dir.path().join("d.img.lockstep-meta");
        let (meta, known) = MetaStore::open(meta_file.clone()).unwrap();
        let stored = || crate::replica::meta::load(&meta_file).unwrap().unwrap();
        let mine = stored().generation;
        let sec = Secondary::with_meta(
            disk.clone(),
            SecondaryOptions {
                buffer_memory: 1 << 20,
                spill_path: dir.path().join("spill"),
                on_peer_loss: PeerLossPolicy::Wait,
                // Generous: the test's own steps between messages must not end the session
                // on a loaded machine.
                heartbeat_misses: 40,
                hello_timeout: Duration::from_millis(300),
                discard_my_data: false,
            },
            meta,
            known,
        );
        let (ep, _stop) = serve_secondary(&sec, None).await;
        let (mut rd, mut wr) = control_conn(&ep).await;
        raw_session(&mut rd, &mut wr).await;
        assert!(!stored().clean, "RESUME marks the disk unclean at once");
        let c = NbdClient::connect(&ep, &export(REPLICA_EXPORT))
            .await
            .unwrap();
        c.write(0, &[1; 4096], false).await.unwrap();
        let mark = c.submit_epoch_mark(2).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        // The first commit after the sync adopts the primary's generation (42): not before
        // the epoch's data is durable.
        disk.set_open(false);
        let before = disk.flushed();
        send_checkpoint(&mut wr, 1, block_summary(1, 4096)).await;
        // Heartbeats are answered while the flush waits (and keep the session alive).
        for seq in 0..5 {
            write_message(&mut wr, &Message::Heartbeat { seq })
                .await
                .unwrap();
            let m = tokio::time::timeout(Duration::from_secs(10), read_message(&mut rd))
                .await
                .expect("a heartbeat answer");
            assert_eq!(m.unwrap(), Message::HeartbeatAck { seq });
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(stored().generation, mine, "adopted before the flush");
        assert_eq!(stored().committed, 0);
        disk.set_open(true);
        assert_eq!(
            read_message(&mut rd).await.unwrap(),
            Message::Committed { epoch: 1 }
        );
        assert!(disk.flushed() > before);
        let m = stored();
        assert_eq!((m.generation, m.committed, m.clean), (42, 1, false));
        // GOODBYE claims a checkpoint at rest: not before the disk is flushed.
        let mark = c.submit_epoch_mark(3).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        send_checkpoint(&mut wr, 2, block_summary(0, 0)).await;
        assert_eq!(
            read_message(&mut rd).await.unwrap(),
            Message::Committed { epoch: 2 }
        );
        disk.set_open(false);
        let before = disk.flushed();
        write_message(
            &mut wr,
            &Message::Goodbye {
                reason: "test".into(),
            },
        )
        .await
        .unwrap();
        wait_for("the session to end", || sec.mode() == Mode::Waiting).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stored().clean, "marked clean before the flush");
        disk.set_open(true);
        wait_for("the clean mark", || stored().clean).await;
        assert!(disk.flushed() > before);
        assert_eq!(stored().committed, 2);
    });
}

#[test]
fn a_client_flush_completes_with_the_secondarys_flush() {
    rt().block_on(async {
        for ack in AckMode::ALL {
            let dir = tempfile::tempdir().unwrap();
            let (disk, _sec, ep, _stop) = gated_secondary(&dir).await;
            let p = start_primary(&ep, ack).await;
            p.primary
                .write_at(0, IoBuf::from_slice(&[3; 4096]), false)
                .await
                .unwrap();
            disk.set_open(false);
            let primary = p.primary.clone();
            let mut flush = tokio::spawn(async move { primary.flush().await });
            let early = tokio::time::timeout(Duration::from_millis(300), &mut flush).await;
            // `local` is DRBD's protocol A: the local flush is the answer.
            assert_eq!(early.is_err(), ack != AckMode::Local, "{ack:?}");
            disk.set_open(true);
            match early {
                Ok(r) => r.unwrap().unwrap(),
                Err(_) => flush.await.unwrap().unwrap(),
            }
            assert_eq!(p.primary.mode(), PrimaryMode::Replicating);
            // A secondary that fails the flush: the primary pauses (the blocks are dirty)
            // before the client's flush completes, and the client still succeeds.
            disk.fail.store(true, std::sync::atomic::Ordering::SeqCst);
            p.primary.flush().await.unwrap();
            if ack != AckMode::Local {
                assert_eq!(p.primary.mode(), PrimaryMode::Paused, "{ack:?}");
                assert!(p.primary.status().dirty_blocks >= 1);
            }
            wait_for("the primary to pause", || {
                p.primary.mode() == PrimaryMode::Paused
            })
            .await;
            // With the link down the local flush suffices, even with a stuck secondary.
            disk.set_open(false);
            tokio::time::timeout(Duration::from_secs(5), p.primary.flush())
                .await
                .expect("a paused primary's flush does not wait for the secondary")
                .unwrap();
            disk.set_open(true);
        }
    });
}

/// Ack mode `sync` makes every modification durable on the primary's own disk before it
/// completes, as on the secondary (a FUA write; a flush after a write-zeroes or trim); the
/// other modes leave that to the client's FLUSH, as the disk would.
#[test]
fn ack_mode_sync_makes_each_local_modification_durable() {
    rt().block_on(async {
        for ack in AckMode::ALL {
            let disk = Arc::new(crate::storage::PowerLossDisk::new(&MemoryBackend::new(
                SIZE,
            )));
            let p = Primary::new(
                disk.clone(),
                DigestTable::zeroed(SIZE),
                0,
                PrimaryOptions {
                    ack,
                    queue_bytes: 1 << 20,
                    max_inflight: 8,
                },
                Arc::new(MetaStore::in_memory(NodeMeta::fresh())),
            );
            p.write_at(8192, IoBuf::from_slice(&[9; 4096]), true)
                .await
                .unwrap();
            p.write_at(0, IoBuf::from_slice(&[5; 4096]), false)
                .await
                .unwrap();
            p.write_zeroes(8192, 4096, false).await.unwrap();
            // Each unflushed modification survives a power cut by the seed's coin.
            let survived = (0..16).all(|seed| {
                let image = disk.cut(seed).snapshot();
                image[..4096].iter().all(|&b| b == 5) && image[8192..12288].iter().all(|&b| b == 0)
            });
            assert_eq!(survived, ack == AckMode::Sync, "{ack:?}");
        }
    });
}
