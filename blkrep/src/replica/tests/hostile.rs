//! The secondary against hostile or broken peers: garbage, wrong versions, stalls, numbers out
//! of range, SUMS floods, lying checkpoints, and a primary pointed at something that is not a
//! secondary.

use super::*;

#[test]
fn garbage_bad_versions_and_stalls_get_clear_errors_and_no_session() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        // Garbage.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        wr.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        wr.flush().await.unwrap();
        wait_for("garbage error", || {
            last_error(&s.sec).contains("bad frame magic")
        })
        .await;
        // A frame of a future version.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        let mut f = hello().encode();
        f[5] = 9;
        wr.write_all(&f).await.unwrap();
        wr.flush().await.unwrap();
        wait_for("version error", || {
            last_error(&s.sec).contains("version 9 is not supported")
        })
        .await;
        // A damaged frame.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        let mut f = hello().encode();
        f[14] ^= 0x40;
        wr.write_all(&f).await.unwrap();
        wr.flush().await.unwrap();
        wait_for("checksum error", || {
            last_error(&s.sec).contains("checksum mismatch")
        })
        .await;
        // Half a frame, then silence.
        let (_rd, mut wr) = control_conn(&s.ep).await;
        let f = hello().encode();
        wr.write_all(&f[..10]).await.unwrap();
        wr.flush().await.unwrap();
        wait_for("stall error", || {
            last_error(&s.sec).contains("no HELLO within")
        })
        .await;
        // A HELLO for a disk of another size.
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        write_message(&mut wr, &hello_of(SIZE + 4096, 1))
            .await
            .unwrap();
        let m = read_message(&mut rd).await.unwrap();
        assert!(
            matches!(&m, Message::Refused { code: RefusalCode::SizeMismatch, reason } if reason.contains("disk sizes differ")),
            "{m:?}"
        );
        assert_eq!(s.sec.mode(), Mode::Waiting);
        // After all that, a real primary still replicates.
        let p = start_primary(&s.ep, AckMode::Received).await;
        p.primary
            .write_at(4096, IoBuf::from_slice(&[7; 4096]), false)
            .await
            .unwrap();
        p.coord.checkpoint().await.unwrap();
        assert_eq!(s.sec.status().committed_epoch, 2);
    });
}

#[test]
fn hostile_numbers_are_refused_and_reveal_no_generation() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        // A heartbeat period that would hold the session for years.
        for ms in [0, 9, 60_001, u32::MAX] {
            let (mut rd, mut wr) = control_conn(&s.ep).await;
            let mut h = hello();
            if let Message::Hello { heartbeat_ms, .. } = &mut h {
                *heartbeat_ms = ms;
            }
            write_message(&mut wr, &h).await.unwrap();
            let m = read_message(&mut rd).await.unwrap();
            assert!(
                matches!(&m, Message::Refused { code: RefusalCode::Hello, reason } if reason.contains("heartbeat period")),
                "{ms} ms: {m:?}"
            );
            assert_eq!(s.sec.mode(), Mode::Waiting);
        }
        // WELCOME does not carry the secondary's generation.
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        write_message(&mut wr, &hello()).await.unwrap();
        let m = read_message(&mut rd).await.unwrap();
        assert!(matches!(m, Message::Welcome { generation: 0, .. }), "{m:?}");
        // Units past the end of the disk, up to u64::MAX: refused before any work, and the
        // connection ends.
        let nblocks = crate::digest::blocks(SIZE);
        for (unit_blocks, unit) in [(1u32, u64::MAX), (1 << 16, u64::MAX / 2), (1, nblocks)] {
            let units: roaring::RoaringTreemap = [0, unit].into_iter().collect();
            write_message(
                &mut wr,
                &Message::SumsRequest {
                    id: 1,
                    unit_blocks,
                    units,
                },
            )
            .await
            .unwrap();
            let m = read_message(&mut rd).await.unwrap();
            assert!(
                matches!(&m, Message::Refused { code: RefusalCode::Protocol, reason } if reason.contains("past the end of the disk")),
                "{m:?}"
            );
            assert!(read_message(&mut rd).await.is_err(), "the connection ends");
            wait_for("the session to end", || s.sec.mode() == Mode::Paused).await;
            let (r, w) = control_conn(&s.ep).await;
            (rd, wr) = (r, w);
            write_message(&mut wr, &hello()).await.unwrap();
            let m = read_message(&mut rd).await.unwrap();
            assert!(matches!(m, Message::Welcome { .. }), "{m:?}");
        }
        // The last unit, partly past the end, is answered.
        let units: roaring::RoaringTreemap = [(nblocks - 1) / 16].into_iter().collect();
        write_message(
            &mut wr,
            &Message::SumsRequest {
                id: 2,
                unit_blocks: 16,
                units,
            },
        )
        .await
        .unwrap();
        let m = read_message(&mut rd).await.unwrap();
        assert!(matches!(&m, Message::Sums { id: 2, sums } if sums.len() == 1), "{m:?}");
    });
}

#[test]
fn sums_requests_are_computed_two_at_a_time_and_a_flood_ends_the_session() {
    rt().block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let (disk, sec, ep, _stop) = gated_secondary(&dir).await;
        disk.disk
            .write_at(0, IoBuf::from_slice(&[1; 4096]), false)
            .await
            .unwrap();
        let (mut rd, mut wr) = control_conn(&ep).await;
        write_message(&mut wr, &hello()).await.unwrap();
        assert!(matches!(
            read_message(&mut rd).await.unwrap(),
            Message::Welcome { .. }
        ));
        disk.reads_open.send_replace(false);
        let ask = |id| Message::SumsRequest {
            id,
            unit_blocks: 1,
            units: [0u64].into_iter().collect(),
        };
        for id in 0..3 {
            write_message(&mut wr, &ask(id)).await.unwrap();
        }
        wait_for("the first two reads", || {
            disk.reading.load(std::sync::atomic::Ordering::SeqCst) == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        disk.reads_open.send_replace(true);
        // Answered by id, in whatever order the computations got their turn.
        let mut ids = Vec::new();
        for _ in 0..3 {
            match read_message(&mut rd).await.unwrap() {
                Message::Sums { id, sums } if sums.len() == 1 => ids.push(id),
                m => panic!("{m:?}"),
            }
        }
        ids.sort();
        assert_eq!(ids, vec![0, 1, 2]);
        assert_eq!(
            disk.most_reading.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "two SUMS computations of a session at a time, never the third"
        );
        // A flood: more than 8 outstanding requests end the session.
        disk.reads_open.send_replace(false);
        for id in 0..=8 {
            write_message(&mut wr, &ask(id)).await.unwrap();
        }
        let m = read_message(&mut rd).await.unwrap();
        assert!(
            matches!(&m, Message::Refused { code: RefusalCode::Protocol, reason } if reason.contains("SUMS requests at once")),
            "{m:?}"
        );
        wait_for("the session to end", || sec.mode() == Mode::Paused).await;
        disk.reads_open.send_replace(true);
    });
}

#[test]
fn lying_checkpoints_are_aborted_never_committed() {
    rt().block_on(async {
        let s = start_secondary(PeerLossPolicy::Wait, 1 << 20).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        let sync = raw_session(&mut rd, &mut wr).await;
        assert!(matches!(sync, SyncKind::Full | SyncKind::Checksum), "a fresh disk: {sync:?}");
        // One real forwarded write in epoch 1.
        let c = NbdClient::connect(&s.ep, &export(REPLICA_EXPORT))
            .await
            .unwrap();
        c.write(0, &[1; 4096], false).await.unwrap();
        let summary = block_summary;
        let mut ask = async |epoch, s: Vec<EpochSummary>| {
            send_checkpoint(&mut wr, epoch, s).await;
            read_message(&mut rd).await.unwrap()
        };
        // Epoch 1 is still open (no epoch mark yet).
        let m = ask(1, summary(1, 4096)).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("still open")), "{m:?}");
        let mark = c.submit_epoch_mark(2).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        // Wrong epoch.
        let m = ask(5, summary(1, 4096)).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("expected a checkpoint of epoch 1")), "{m:?}");
        // Counts that do not match what arrived.
        let m = ask(1, summary(2, 8192)).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("2 writes")), "{m:?}");
        // Unknown participant.
        let mut bad = summary(1, 4096);
        bad.push(EpochSummary { participant: 99, ..Default::default() });
        let m = ask(1, bad).await;
        assert!(matches!(&m, Message::Aborted { reason, .. } if reason.contains("unknown participant")), "{m:?}");
        assert_eq!(s.sec.status().committed_epoch, 0);
        assert_eq!(s.sec.status().checkpoints_aborted, 4);
        // Failover to the checkpoint undoes the uncommitted write.
        s.sec.failover(FailoverTarget::Checkpoint).await.unwrap();
        assert!(s.disk.snapshot().iter().all(|&b| b == 0));
        // The truthful checkpoint would have committed (on a fresh pair).
    });
}

#[test]
fn not_a_secondary_is_a_clear_error() {
    rt().block_on(async {
        let srv = Arc::new(
            NbdServer::new(
                vec![Export::new("x", Arc::new(MemoryBackend::new(4096)))],
                ServerOptions::default(),
            )
            .unwrap(),
        );
        let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))
            .await
            .unwrap();
        let ep = l.local_endpoint();
        let (_stop, rx) = watch::channel(false);
        tokio::spawn(srv.serve(l, rx));
        let hello = Hello {
            size: 4096,
            generation: 1,
            history: vec![],
            tracked: 0,
            committed: 0,
            ack: AckMode::Local,
            heartbeat: Duration::from_millis(100),
        };
        let opts = LinkOptions {
            heartbeat: Duration::from_millis(100),
            misses: 3,
            commit_timeout: Duration::from_secs(1),
        };
        let Err(e) = PeerLink::connect(&ep, hello, opts, Duration::from_secs(5), None, None).await
        else {
            panic!("a plain NBD server accepted the control protocol");
        };
        let e = e.to_string();
        assert!(e.contains("not a lockstep secondary"), "{e}");
    });
}
