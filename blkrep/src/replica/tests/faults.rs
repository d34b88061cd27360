//! Disks that fail or stall under replication, with [`Faulty`] under both nodes: a failed
//! local write is the client's error and is not forwarded, but (as the primary cannot tell
//! how much of it reached its disk) it ends the session, and the resync sends the blocks'
//! actual bytes before anything more commits; a forwarded write or a
//! commit flush that fails on the secondary aborts its epoch, and the pair resyncs to equal
//! disks once the disk is healed; read errors on the secondary's view reach its clients; slow
//! disks lose nothing. Also the storage suite over the replication layer's own backends:
//! [`Primary`] (alone and with a secondary) and [`SecondaryView`] (alone, replicating and
//! failed over).
//!
//! [`SecondaryView`]: crate::replica::secondary::SecondaryView

use super::*;
use crate::nbd::errno_to_nbd;
use crate::storage::suite::{self, Guard};
use crate::storage::{Faulty, Op, Rule};

type Disk = Arc<Faulty<MemoryBackend>>;

fn faulty(size: u64) -> Disk {
    Arc::new(Faulty::new(MemoryBackend::new(size)))
}

/// A secondary over a [`Faulty`] disk, served on a loopback port.
struct Sec {
    sec: Arc<Secondary>,
    disk: Disk,
    ep: Endpoint,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

async fn secondary(size: u64) -> Sec {
    let dir = tempfile::tempdir().unwrap();
    let disk = faulty(size);
    let opts = SecondaryOptions {
        buffer_memory: 1 << 20,
        spill_path: dir.path().join("spill"),
        on_peer_loss: PeerLossPolicy::Wait,
        heartbeat_misses: 30,
        hello_timeout: Duration::from_secs(5),
        discard_my_data: false,
    };
    let sec = Secondary::new(disk.clone(), opts);
    let (ep, _stop) = serve_secondary(&sec, None).await;
    Sec {
        sec,
        disk,
        ep,
        _stop,
        _dir: dir,
    }
}

/// A primary over a [`Faulty`] disk, synced with `s` (the first checkpoint committed), its
/// link supervisor running: it reconnects and resyncs after every loss.
struct Pair {
    p: Arc<Primary>,
    disk: Disk,
    coord: Arc<EpochCoordinator>,
    s: Sec,
    _stop: watch::Sender<bool>,
}

async fn pair(size: u64, ack: AckMode) -> Pair {
    let s = secondary(size).await;
    let disk = faulty(size);
    let p = Primary::new(
        disk.clone(),
        crate::digest::DigestTable::zeroed(size),
        0,
        PrimaryOptions {
            ack,
            max_inflight: 8,
            ..PrimaryOptions::default()
        },
        Arc::new(MetaStore::in_memory(NodeMeta::fresh())),
    );
    let (stop, stop_rx) = watch::channel(false);
    let mut opts = ReplicatorOptions {
        secondary: s.ep.clone(),
        link: link_options(),
        ack,
        connect_timeout: Duration::from_secs(5),
        reconnect_timeout: Duration::from_secs(30),
        retry: Duration::from_millis(20),
        key: None,
        tls: None,
    };
    opts.link.misses = 30;
    let repl = Replicator::new(p.clone(), opts, stop_rx);
    repl.attempt().await.unwrap();
    let participants: Vec<Arc<dyn crate::epoch::Participant>> =
        vec![Arc::new(BlockParticipant(p.clone()))];
    let first = Epoch(p.resume_epoch());
    let coord = EpochCoordinator::new(
        participants,
        Arc::new(NoGuest),
        repl.clone(),
        first,
        CoordinatorOptions {
            interval: None,
            bytes: 0,
        },
    );
    tokio::spawn(repl.run());
    let pair = Pair {
        p,
        disk,
        coord,
        s,
        _stop: stop,
    };
    pair.recover().await;
    pair
}

impl Pair {
    /// Wait until the pair replicates with no resync in progress, then commit a checkpoint:
    /// the secondary's disk is the primary's. Returns the committed epoch.
    async fn recover(&self) -> u64 {
        wait_for("replicating, resync done", || {
            self.p.mode() == PrimaryMode::Replicating
                && !self.p.is_resyncing()
                && self.s.sec.mode() == Mode::Replicating
        })
        .await;
        let r = self.coord.checkpoint().await.unwrap();
        assert_eq!(self.committed(), (r.epoch.0, r.epoch.0));
        r.epoch.0
    }

    /// The committed epoch on (primary, secondary).
    fn committed(&self) -> (u64, u64) {
        let s = self.s.sec.status().committed_epoch;
        (self.p.committed(), s)
    }

    async fn write(&self, block: u64, fill: u8) {
        let data = pattern(block * 4096, 4096, fill);
        self.p
            .write_at(block * 4096, IoBuf::from_slice(&data), false)
            .await
            .unwrap();
    }

    /// The disks (under the fault layers) are equal, and so is the secondary's view.
    async fn assert_equal(&self, what: &str) {
        let img = self.disk.inner().snapshot();
        assert!(
            self.s.disk.inner().snapshot() == img,
            "{what}: the disks differ"
        );
        assert!(
            read_all(&*self.s.sec.view()).await == img,
            "{what}: the view differs"
        );
    }

    /// A checkpoint fails; the primary pauses and nothing new is committed on either side.
    async fn checkpoint_fails(&self, committed: u64) -> String {
        let e = self.coord.checkpoint().await.unwrap_err().to_string();
        wait_for("the primary to pause", || {
            self.p.mode() != PrimaryMode::Replicating
        })
        .await;
        assert_eq!(self.committed(), (committed, committed), "{e}");
        e
    }
}

fn nbd_errno(e: crate::nbd::NbdError) -> u32 {
    match e {
        crate::nbd::NbdError::Request { errno, .. } => errno,
        other => panic!("not an error reply: {other}"),
    }
}

/// Serve `backend` as export "x" on a loopback port; a client of it.
async fn nbd_client(backend: Arc<dyn Backend>) -> (NbdClient, watch::Sender<bool>) {
    let srv = NbdServer::new(vec![Export::new("x", backend)], ServerOptions::default());
    let l = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".into()))
        .await
        .unwrap();
    let ep = l.local_endpoint();
    let (stop, rx) = watch::channel(false);
    tokio::spawn(Arc::new(srv.unwrap()).serve(l, rx));
    (NbdClient::connect(&ep, &export("x")).await.unwrap(), stop)
}

// ---------------------------------------------------------------------------------------------
// (a) The primary's own disk fails.

#[test]
fn a_write_that_fails_on_the_primary_disk_is_the_clients_error_and_is_not_forwarded() {
    rt().block_on(async {
        let pr = pair(SIZE, AckMode::Received).await;
        pr.write(1, 1).await;
        let committed = pr.recover().await;
        let syncs = pr.p.resync_stats().completed;
        pr.disk.add(Rule::on(Op::Write).range(8 * 4096, 4096));
        pr.disk.add(
            Rule::on(Op::WriteZeroes)
                .range(20 * 4096, 1)
                .fail(libc::ENOSPC),
        );
        // Through the Backend interface: the chosen errors, nothing written anywhere.
        let e =
            pr.p.write_at(8 * 4096 + 100, IoBuf::from_slice(&[7; 5000]), false)
                .await
                .unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        let e = pr.p.write_zeroes(20 * 4096, 4096, false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        // Through NBD: the error reply carries the errno.
        let (c, _stop) = nbd_client(pr.p.clone()).await;
        let e = c.write(8 * 4096, &[8; 4096], true).await.unwrap_err();
        assert_eq!(nbd_errno(e), errno_to_nbd(libc::EIO));
        c.write(2 * 4096, &[9; 4096], false).await.unwrap();
        assert_eq!(pr.disk.injected().failed, 3);
        // These requests failed before touching the disk, but a request that fails may as
        // well have been applied in part (see the torn write below), and the primary cannot
        // tell the two apart: each failure ended the session (this used to assert that the
        // pair went on replicating, with only the write that succeeded forwarded). The
        // failed writes were not forwarded as such: the resync sent the blocks' bytes as the
        // primary's disk holds them, here the old ones, before the next commit.
        assert_eq!(pr.recover().await, committed + 1);
        assert!(pr.p.resync_stats().completed > syncs);
        pr.assert_equal("after the failed writes").await;
        let img = pr.s.disk.inner().snapshot();
        assert!(img[8 * 4096..9 * 4096].iter().all(|&b| b == 0));
        assert!(img[2 * 4096..3 * 4096].iter().all(|&b| b == 9));
        // Healed: the same writes go through, and are replicated.
        pr.disk.heal();
        c.write(8 * 4096, &[8; 4096], true).await.unwrap();
        pr.p.write_zeroes(20 * 4096, 4096, false).await.unwrap();
        pr.recover().await;
        pr.assert_equal("after the healed writes").await;
    });
}

/// A write whose local request fails after part or all of it reached the primary's disk (a
/// torn write, `fail_after`), or whose read-back of a partial block fails after the write
/// succeeded, is the client's error, and its blocks' content is unknown: they become dirty,
/// their digest entries unknown, and the session ends, so the next checkpoint commits only
/// after the resync sent the bytes the primary's disk holds (and serves). (It used to be
/// dropped: the checkpoint committed with the secondary lacking those bytes, a failover
/// would change data no one wrote, and verify could not tell, the digest table being stale
/// too.)
#[test]
fn a_write_that_fails_after_reaching_the_primary_disk_does_not_split_the_pair() {
    rt().block_on(async {
        let pr = pair(SIZE, AckMode::Received).await;
        let mut differ = Vec::new();
        for (what, rule) in [
            (
                "a torn write",
                Rule::on(Op::Write)
                    .range(8 * 4096, 4096)
                    .fail_after(libc::EIO),
            ),
            (
                "a failed read-back of a partial block",
                Rule::on(Op::Read).range(9 * 4096, 1),
            ),
        ] {
            let id = pr.disk.add(rule);
            let r =
                pr.p.write_at(8 * 4096 + 100, IoBuf::from_slice(&[7; 5000]), false)
                    .await;
            assert!(r.is_err(), "{what}: the write succeeded");
            assert_eq!(pr.disk.remove(id), Some(1));
            pr.recover().await;
            let (img, cp) = pr.s.sec.verify_checkpoint().await.unwrap();
            if pr.s.disk.inner().snapshot() != pr.disk.inner().snapshot() {
                // The checkpoint's digest comes from the primary's table: does the
                // secondary's own check notice?
                differ.push((what, Some(img) != cp));
            } else {
                // The resync rehashed the unknown entries: the committed digest is the disk's.
                assert_eq!(
                    Some(img),
                    cp,
                    "{what}: the committed digest is not the disk's"
                );
            }
            // Put the pair back in step for the next case.
            pr.p.write_zeroes(8 * 4096, 8 * 4096, false).await.unwrap();
            pr.recover().await;
        }
        assert!(
            differ.is_empty(),
            "a checkpoint committed with the disks different (case, noticed by verify): {differ:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// (b) A forwarded write fails on the secondary's disk.

/// Deterministic, at the secondary's control protocol: the write's epoch ABORTs, with the
/// disk error as the reason, whether the disk fails the write itself or the read that
/// preserves the original; the view keeps the last checkpoint.
#[test]
fn a_forwarded_write_that_fails_on_the_secondary_aborts_its_epoch() {
    rt().block_on(async {
        for rule in [
            Rule::on(Op::Write).range(4096, 1),
            Rule::on(Op::Read).range(4096, 1).fail(libc::ENOSPC),
        ] {
            let s = secondary(SIZE).await;
            let (mut rd, mut wr) = control_conn(&s.ep).await;
            raw_session(&mut rd, &mut wr).await;
            let c = NbdClient::connect(&s.ep, &export(REPLICA_EXPORT))
                .await
                .unwrap();
            c.write(0, &[1; 4096], false).await.unwrap();
            s.disk.add(rule.clone());
            let e = c.write(4096, &[2; 4096], false).await.unwrap_err();
            assert!(
                [errno_to_nbd(libc::EIO), errno_to_nbd(libc::ENOSPC)].contains(&nbd_errno(e)),
                "{rule:?}"
            );
            let mark = c.submit_epoch_mark(2).await.unwrap();
            c.send_submitted().await.unwrap();
            mark.wait().await.unwrap();
            // The primary counted both writes it sent.
            send_checkpoint(&mut wr, 1, block_summary(2, 8192)).await;
            let m = read_message(&mut rd).await.unwrap();
            assert!(
                matches!(&m, Message::Aborted { epoch: 1, reason }
                    if reason.contains("a write of epoch 1 failed here") && reason.contains("fault injection")),
                "{rule:?}: {m:?}"
            );
            assert_eq!(s.sec.status().committed_epoch, 0);
            assert_eq!(s.sec.status().checkpoints_aborted, 1);
            s.disk.heal();
            assert!(
                read_all(&*s.sec.view()).await.iter().all(|&b| b == 0),
                "{rule:?}: the view is not the last checkpoint"
            );
        }
    });
}

/// Ack mode `received`, at the secondary's control protocol: a forwarded write is answered
/// on receipt and applied afterwards. A FLUSH waits for it; a disk failure shows at the next
/// FLUSH and aborts the epoch's checkpoint; a FUA write is answered only once applied, so
/// its failure is its own error.
#[test]
fn a_write_answered_on_receipt_is_applied_before_flushes_and_checkpoints() {
    rt().block_on(async {
        let s = secondary(SIZE).await;
        let (mut rd, mut wr) = control_conn(&s.ep).await;
        raw_session_acking(&mut rd, &mut wr, AckMode::Received).await;
        let c = NbdClient::connect(&s.ep, &export(REPLICA_EXPORT))
            .await
            .unwrap();
        // Slow: answered long before the disk has it; the FLUSH waits for it.
        let slow = s
            .disk
            .add(Rule::on(Op::Write).range(0, 4096).delay(Duration::from_millis(400)));
        let t = std::time::Instant::now();
        c.write(0, &[1; 4096], false).await.unwrap();
        assert!(t.elapsed() < Duration::from_millis(300), "{:?}", t.elapsed());
        c.flush().await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(400), "{:?}", t.elapsed());
        assert!(s.disk.read_at(0, 4096).await.unwrap().iter().all(|&b| b == 1));
        s.disk.remove(slow);
        // Failing: answered all the same; the FLUSH reports it.
        s.disk.add(Rule::on(Op::Write).range(4096, 1));
        c.write(4096, &[2; 4096], false).await.unwrap();
        let e = c.flush().await.unwrap_err();
        assert!(e.to_string().contains("failed here"), "{e}");
        let fua = c.write(4096, &[3; 4096], true).await.unwrap_err();
        assert_eq!(nbd_errno(fua), errno_to_nbd(libc::EIO));
        let mark = c.submit_epoch_mark(2).await.unwrap();
        c.send_submitted().await.unwrap();
        mark.wait().await.unwrap();
        send_checkpoint(&mut wr, 1, block_summary(3, 3 * 4096)).await;
        let m = read_message(&mut rd).await.unwrap();
        assert!(
            matches!(&m, Message::Aborted { epoch: 1, reason }
                if reason.contains("a write of epoch 1 failed here") && reason.contains("fault injection")),
            "{m:?}"
        );
        s.disk.heal();
        assert!(read_all(&*s.sec.view()).await.iter().all(|&b| b == 0));
    });
}

/// A real pair, in every ack mode: the secondary's disk fails writes to one block; the
/// checkpoint fails and nothing is committed; the primary keeps retrying the session, which
/// cannot finish its resync while the disk fails; healed, it does, and the disks end equal.
#[test]
fn a_secondary_disk_that_fails_writes_blocks_commits_until_healed_then_resyncs() {
    rt().block_on(async {
        for ack in AckMode::ALL {
            let pr = pair(SIZE, ack).await;
            fill_blocks(&pr.p, 0..8, 1).await;
            let committed = pr.recover().await;
            let bad = pr.s.disk.add(Rule::on(Op::Write).range(5 * 4096, 4096));
            fill_blocks(&pr.p, 3..12, 2).await;
            let e = pr.checkpoint_fails(committed).await;
            // The retried sessions hit the bad block again (the resync must resend it).
            wait_for("a retried session to fail too", || pr.s.disk.hits(bad) >= 2).await;
            assert!(
                pr.coord.checkpoint().await.is_err(),
                "{ack:?}: a checkpoint while the disk fails"
            );
            assert_eq!(pr.committed(), (committed, committed), "{ack:?}: {e}");
            pr.s.disk.heal();
            assert!(pr.recover().await > committed);
            pr.assert_equal(ack.name()).await;
            assert!(pr.s.sec.status().consistent);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// (c) The flush before COMMITTED fails.

#[test]
fn a_failing_commit_flush_on_the_secondary_aborts_the_checkpoint() {
    rt().block_on(async {
        let pr = pair(SIZE, AckMode::Received).await;
        fill_blocks(&pr.p, 0..4, 1).await;
        let committed = pr.recover().await;
        let image = read_all(&*pr.s.sec.view()).await;
        let flush = pr.s.disk.add(Rule::on(Op::Flush).fail(libc::EIO));
        fill_blocks(&pr.p, 2..6, 2).await;
        let e = pr.checkpoint_fails(committed).await;
        assert!(e.contains("flushing the secondary disk"), "{e}");
        assert!(pr.s.disk.hits(flush) >= 1);
        assert!(pr.s.sec.status().checkpoints_aborted >= 1);
        // What the secondary serves is still the last checkpoint.
        assert!(read_all(&*pr.s.sec.view()).await == image);
        pr.s.disk.heal();
        assert!(pr.recover().await > committed);
        pr.assert_equal("after the healed flush").await;
    });
}

// ---------------------------------------------------------------------------------------------
// (d) The secondary's disk fails reads.

#[test]
fn read_errors_under_the_secondary_view_reach_its_clients() {
    rt().block_on(async {
        let pr = pair(SIZE, AckMode::Received).await;
        fill_blocks(&pr.p, 0..8, 1).await;
        pr.recover().await;
        let view = pr.s.sec.view();
        view.write_at(6 * 4096, IoBuf::from_slice(&[5; 4096]), false)
            .await
            .unwrap();
        let (c, _stop) = nbd_client(view.clone()).await;
        let bad =
            pr.s.disk
                .add(Rule::on(Op::Read).range(4 * 4096, 3 * 4096).fail(libc::EIO));
        // Reads that touch the bad range fail, whether the block is on the disk or held in
        // the buffer; so does a partial local write, which must read the block first.
        let e = view.read_at(4 * 4096 + 10, 10).await.unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        assert!(view.read_at(6 * 4096, 4096).await.is_err());
        let e = c.read(3 * 4096, 8192).await.unwrap_err();
        assert_eq!(nbd_errno(e), errno_to_nbd(libc::EIO));
        let e = view
            .write_at(5 * 4096 + 1, IoBuf::from_slice(&[1; 10]), false)
            .await
            .unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert!(pr.s.disk.hits(bad) >= 4);
        // Elsewhere the view answers, with the checkpoint's data.
        let good = c.read(0, 4 * 4096).await.unwrap();
        assert_eq!(&good[..], &pr.disk.inner().snapshot()[..4 * 4096]);
        pr.s.disk.heal();
        let healed = c.read(6 * 4096, 4096).await.unwrap();
        assert!(healed.iter().all(|&b| b == 5));
    });
}

// ---------------------------------------------------------------------------------------------
// (e) Slow disks.

/// Slow writes and flushes on the secondary (and slow writes on part of the primary's disk)
/// under concurrent overlapping writers and checkpoints: every checkpoint commits, and the
/// disks end equal.
#[test]
fn slow_disks_lose_no_data() {
    rt().block_on(async {
        for ack in [AckMode::Local, AckMode::Durable] {
            let pr = pair(SIZE, ack).await;
            let ms = Duration::from_millis;
            pr.s.disk
                .add(Rule::on(Op::Write).range(0, 16 * 4096).delay(ms(15)));
            pr.s.disk.add(Rule::on(Op::Flush).delay(ms(40)));
            pr.s.disk.add(Rule::any().range(30 * 4096, 1).delay(ms(5)));
            pr.disk
                .add(Rule::on(Op::Write).range(8 * 4096, 24 * 4096).delay(ms(3)));
            let first = pr.committed().0;
            let mut writers = tokio::task::JoinSet::new();
            for k in 0..4u64 {
                let p = pr.p.clone();
                writers.spawn(async move {
                    for i in 0..25u64 {
                        let off = ((k * 5 + i * 7) % 40) * 4096 + (i % 3) * 1000;
                        let data = IoBuf::from_slice(&pattern(off, 6000, (k * 17 + i) as u8));
                        p.write_at(off, data, false).await.unwrap();
                    }
                });
            }
            // Checkpoints while the writers run.
            let mut checkpoints = 0;
            loop {
                while let Some(r) = writers.try_join_next() {
                    r.unwrap();
                }
                if writers.is_empty() {
                    break;
                }
                pr.coord.checkpoint().await.unwrap();
                checkpoints += 1;
            }
            assert_eq!(pr.recover().await, first + checkpoints + 1, "{ack:?}");
            pr.assert_equal(ack.name()).await;
            assert!(pr.s.disk.injected().delayed > 0 && pr.disk.injected().delayed > 0);
            assert_eq!(pr.s.sec.status().checkpoints_aborted, 0);
            assert_eq!(pr.p.mode(), PrimaryMode::Replicating);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The storage suite over the replication layer's backends.

/// Build a backend on a runtime of its own thread, which runs until the guard is dropped
/// (the suite drives the backend from its own runtime).
fn on_own_runtime<T, F>(build: impl FnOnce() -> F + Send + 'static) -> (Arc<dyn Backend>, Guard)
where
    T: Send + 'static,
    F: std::future::Future<Output = (Arc<dyn Backend>, T)>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let (hold, held) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        rt().block_on(async move {
            let (backend, keep) = build().await;
            tx.send(backend).unwrap();
            let _ = held.await;
            drop(keep);
        })
    });
    (rx.recv().unwrap(), Box::new(hold))
}

#[test]
fn suite_over_a_primary_without_a_secondary() {
    suite::run_all(|size| {
        let p = Primary::new(
            faulty(size),
            crate::digest::DigestTable::zeroed(size),
            0,
            PrimaryOptions::default(),
            Arc::new(MetaStore::in_memory(NodeMeta::fresh())),
        );
        (p, Box::new(()))
    });
}

#[test]
fn suite_over_a_primary_replicating_to_a_secondary() {
    suite::run_all(|size| {
        on_own_runtime(move || async move {
            let pr = pair(size, AckMode::Received).await;
            (pr.p.clone() as Arc<dyn Backend>, pr)
        })
    });
}

#[test]
fn suite_over_the_view_of_a_waiting_secondary() {
    suite::run_all(|size| {
        on_own_runtime(move || async move {
            let s = secondary(size).await;
            (s.sec.view() as Arc<dyn Backend>, s)
        })
    });
}

#[test]
fn suite_over_the_view_of_a_replicating_secondary() {
    suite::run_all(|size| {
        on_own_runtime(move || async move {
            let pr = pair(size, AckMode::Local).await;
            (pr.s.sec.view() as Arc<dyn Backend>, pr)
        })
    });
}

#[test]
fn suite_over_the_view_of_a_failed_over_secondary() {
    suite::run_all(|size| {
        on_own_runtime(move || async move {
            let s = secondary(size).await;
            s.sec.failover(FailoverTarget::Latest).await.unwrap();
            (s.sec.view() as Arc<dyn Backend>, s)
        })
    });
}
