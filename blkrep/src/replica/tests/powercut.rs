//! The secondary loses power under load: its disk keeps only what was flushed (and whatever
//! else a volatile cache happened to write back), its metadata what was stored. After the
//! restart and the resync, nothing the primary holds may be missing on the secondary, and
//! the secondary may not call itself consistent before that resync has committed.

use super::*;
use crate::storage::PowerLossDisk;

/// A secondary on `disk` that listens on `addr` ("127.0.0.1:0" for any port).
async fn secondary_on(
    addr: &str,
    disk: Arc<PowerLossDisk>,
    meta: Option<NodeMeta>,
    dir: &std::path::Path,
) -> (Arc<Secondary>, Endpoint, watch::Sender<bool>) {
    let known = meta.is_some();
    let sec = Secondary::with_meta(
        disk,
        SecondaryOptions {
            buffer_memory: 1 << 20,
            spill_path: dir.join("spill"),
            on_peer_loss: PeerLossPolicy::Wait,
            heartbeat_misses: 3,
            hello_timeout: Duration::from_millis(300),
            discard_my_data: false,
        },
        MetaStore::in_memory(meta.unwrap_or_else(NodeMeta::fresh)),
        known,
    );
    let (ep, stop) = serve_secondary_at(&sec, None, addr).await;
    (sec, ep, stop)
}

/// One trial: load with checkpoints and flushes, a power cut at a random moment, restart,
/// resync. Returns what happened, for the report.
async fn power_cut_trial(seed: u64) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let disk = Arc::new(PowerLossDisk::new(&MemoryBackend::new(SIZE)));
    let (sec, ep, stop) = secondary_on("127.0.0.1:0", disk.clone(), None, dir.path()).await;
    let (proxy, via) = cut_proxy(&ep);
    let ack = AckMode::ALL[(next() % 4) as usize];
    let p = start_primary(&via, ack).await;
    tokio::spawn(p.repl.clone().run());

    // The load: 4 KiB writes over 64 blocks (many overwrites), a flush now and then, a
    // checkpoint now and then; it goes on through the cut.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let load = {
        let (primary, coord, running) = (p.primary.clone(), p.coord.clone(), running.clone());
        let mut x = next();
        tokio::spawn(async move {
            let mut n = 0u64;
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 33) % 64;
                let data = pattern(b * 4096, 4096, (x >> 20) as u8);
                primary
                    .write_at(b * 4096, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                n += 1;
                if n % 9 == 0 {
                    primary.flush().await.unwrap();
                }
                if n % 13 == 0 {
                    // Refused while paused; that is fine.
                    let _ = coord.checkpoint().await;
                }
                tokio::task::yield_now().await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(20 + next() % 200)).await;

    // Power cut: the link dies with the host; the disk keeps what it keeps.
    proxy.cut();
    let survived = disk.cut(next());
    let meta = sec.meta();
    stop.send_replace(true);
    drop(sec);
    let crate::nbd::Endpoint::Tcp(addr) = &ep else {
        unreachable!()
    };
    let restarted = Arc::new(PowerLossDisk::new(&survived));
    let (sec2, _, _stop2) =
        secondary_on(addr, restarted.clone(), Some(meta.clone()), dir.path()).await;
    assert!(
        !sec2.status().consistent,
        "a secondary that lost power called itself consistent before any resync"
    );
    proxy.heal();
    wait_for("resumed and resynced", || {
        p.primary.mode() == PrimaryMode::Replicating
            && !p.primary.status().resyncing
            && sec2.mode() == Mode::Replicating
    })
    .await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let writes = load.await.unwrap();
    p.coord.checkpoint().await.unwrap();
    let r = p.primary.resync_stats();
    let primary_image = p.disk.snapshot();
    let secondary_image = restarted.visible();
    if let Some(at) = (0..primary_image.len()).find(|&i| primary_image[i] != secondary_image[i]) {
        panic!(
            "seed {seed} (ack {}): after the power cut and the {:?} resync the secondary differs at block {} ({writes} writes)",
            ack.name(),
            r.kind,
            at / 4096
        );
    }
    assert!(sec2.status().consistent);
    format!(
        "ack {}: {writes} writes, {:?} resync, {} bytes resent",
        ack.name(),
        r.kind,
        r.sent_bytes
    )
}

#[test]
fn a_secondary_that_loses_power_under_load_resyncs_to_an_equal_disk() {
    let trials: u64 = std::env::var("LOCKSTEP_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let base: u64 = std::env::var("LOCKSTEP_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let rt = rt();
    for t in 0..trials {
        let seed = base.wrapping_mul(31).wrapping_add(2 * t + 1);
        let line = rt.block_on(power_cut_trial(seed));
        eprintln!("power cut {t} (seed {seed}): {line}");
    }
}
