//! Surviving link loss and restarts: the primary pauses, reconnects and resyncs only what may
//! differ. Link cuts under fio through the [`CutProxy`](lockstep_tests::proxy::CutProxy)
//! (incremental resync), a secondary killed and restarted (incremental), and a secondary whose
//! disk holds other data (checksum sync of the differing chunks).

use std::time::Duration;

use serde_json::Value;

use lockstep_tests::control::{checkpoint, lockstep, status, T};
use lockstep_tests::fio::{fio_ok, load_job, rated, start_load};
use lockstep_tests::images::assert_images_equal;
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::trials::{fio_trials, Rng};
use lockstep_tests::{heavy, owned, random_file, require, scratch, sleep_ms};

/// What the link-cut trials resent, against what may have differed, and how long resuming took.
#[derive(Default)]
struct ResyncTotals {
    cuts: u64,
    sent_bytes: u64,
    dirty_bytes: u64,
    resume_s: Vec<f64>,
}

fn link_cut_trial(rng: &mut Rng, totals: &mut ResyncTotals) -> String {
    require("fio", "fio");
    let dir = scratch();
    let ack = rng.pick(&["local", "received", "durable", "sync"]);
    let (mut pair, proxy) = Pair::start_full(
        dir.path(),
        "256M",
        &owned(&[
            "--ack",
            ack,
            "--checkpoint-interval",
            "100ms",
            "--heartbeat",
            "100ms",
        ]),
        &[],
        true,
    );
    let proxy = proxy.expect("proxy");
    let seed = rng.next_u64() % 100_000;
    let mut fio = start_load(
        dir.path(),
        &rated(load_job(&pair.uri(), Some(seed), 16, "256M", 12)),
    );
    let mut report = Vec::new();
    let mut sessions = 1;
    for k in 0..3 {
        sleep_ms(rng.range(200, 1000));
        proxy.cut();
        let down = rng.range(50, 1200);
        sleep_ms(down);
        proxy.heal();
        let double = rng.range(0, 2) == 0;
        if double {
            // Break it again while the two sides are comparing or resuming.
            sleep_ms(rng.range(5, 60));
            proxy.cut();
            sleep_ms(rng.range(50, 300));
            let sv = status(&pair.s_sock).unwrap_or(Value::Null);
            let smode = sv["mode"].as_str().unwrap_or("?").to_string();
            assert!(
                matches!(smode.as_str(), "paused" | "syncing" | "replicating"),
                "cut {k}: after a failed recovery the secondary is {smode}: {sv}"
            );
            assert!(
                sv["failover"].is_null(),
                "the secondary must not have failed over: {sv}"
            );
            proxy.heal();
        }
        sessions += 1;
        let v = pair.wait_synced(Duration::from_secs(60), sessions);
        sessions = v["sessions"].as_u64().unwrap_or(sessions);
        let r = &v["resync"];
        let sent = r["sent_bytes"].as_u64().unwrap_or(0);
        let dirty = r["dirty_at_start"].as_u64().unwrap_or(0) * 4096;
        assert_eq!(r["kind"].as_str(), Some("incremental"), "cut {k}: {v}");
        // What was dirty when the sync began, plus what fio wrote during the comparison.
        assert!(
            sent <= dirty + dirty / 4 + (1 << 20),
            "cut {k}: resent {sent} bytes, far more than the {dirty} bytes that may have differed: {v}"
        );
        // Not a full resend of the 256 MiB disk. What is dirty can grow past 32 MiB (the
        // epochs of a cut that comes while the last resync still skips checkpoints), so the
        // bound is half the disk; the line above keeps the resend close to what was dirty.
        assert!(
            sent < 128 << 20,
            "cut {k}: a full resend ({sent} bytes): {v}"
        );
        totals.cuts += 1 + u64::from(double);
        totals.sent_bytes += sent;
        totals.dirty_bytes += dirty;
        totals
            .resume_s
            .push(v["last_resume_s"].as_f64().unwrap_or(0.0));
        report.push(format!(
            "cut {down} ms{}: {} KiB resent of {} KiB dirty",
            if double {
                " (+ a cut during recovery)"
            } else {
                ""
            },
            sent / 1024,
            dirty / 1024
        ));
    }
    fio_ok(&mut fio, "fio through the cuts", &pair.logs());
    checkpoint(&pair.p_sock)
        .unwrap_or_else(|e| panic!("checkpoint after the cuts: {e}\n{}", pair.logs()));
    let v = status(&pair.p_sock).expect("status");
    assert_eq!(v["mode"].as_str(), Some("replicating"), "{v}");
    // An online verify agrees, then the files themselves.
    let (ok, out, err) = lockstep(&["verify", "--control", pair.p_sock.to_str().unwrap()], T);
    assert!(ok, "lockstep verify: {out}{err}\n{}", pair.logs());
    assert!(out.contains(": 0 differ"), "{out}");
    drop(fio);
    let logs = pair.logs();
    let (p_img, s_img) = (pair.p_img.clone(), pair.s_img.clone());
    pair.primary.stop(Duration::from_secs(60));
    assert_images_equal(&p_img, &s_img, "after the cuts and a clean shutdown", &logs);
    format!("ack {ack}, {}", report.join("; "))
}

#[test]
fn link_cuts_under_fio_pause_and_resync_incrementally() {
    let mut totals = ResyncTotals::default();
    fio_trials(
        "link_cuts_under_fio_pause_and_resync_incrementally",
        7,
        |_, rng| link_cut_trial(rng, &mut totals),
    );
    let mut r = totals.resume_s.clone();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "link cuts: {} cuts, resent {:.1} MiB of {:.1} MiB that may have differed (ratio {:.2}); time from the loss to resumed replication (cut + reconnect + compare): median {:.2} s, max {:.2} s",
        totals.cuts,
        totals.sent_bytes as f64 / (1 << 20) as f64,
        totals.dirty_bytes as f64 / (1 << 20) as f64,
        totals.sent_bytes as f64 / totals.dirty_bytes.max(1) as f64,
        r.get(r.len() / 2).copied().unwrap_or(0.0),
        r.last().copied().unwrap_or(0.0),
    );
    assert!(totals.cuts >= 20, "only {} cuts", totals.cuts);
}

#[test]
fn restarted_secondary_under_fio_resyncs_incrementally() {
    fio_trials(
        "restarted_secondary_under_fio_resyncs_incrementally",
        3,
        |_, rng| {
            let dir = scratch();
            let ack = rng.pick(&["received", "durable"]);
            let mut pair = Pair::start(dir.path(), "256M", &ack_flags(ack, "100ms"));
            let mut fio = start_load(
                dir.path(),
                &rated(load_job(
                    &pair.uri(),
                    Some(rng.next_u64() % 1000),
                    16,
                    "256M",
                    8,
                )),
            );
            sleep_ms(rng.range(1000, 2500));
            pair.secondary.signal(libc::SIGKILL);
            pair.secondary.wait(Duration::from_secs(10));
            sleep_ms(rng.range(200, 1500));
            pair.restart_secondary(dir.path(), "secondary2");
            let v = pair.wait_synced(Duration::from_secs(60), 2);
            let r = &v["resync"];
            assert_eq!(r["kind"].as_str(), Some("incremental"), "{v}");
            let sent = r["sent_bytes"].as_u64().unwrap_or(0);
            assert!(sent < 128 << 20, "not a full resend: {v}");
            fio_ok(&mut fio, "fio across the restart", &pair.logs());
            checkpoint(&pair.p_sock).expect("checkpoint");
            let logs = pair.logs();
            pair.primary.stop(Duration::from_secs(60));
            assert_images_equal(
                &pair.p_img,
                &pair.s_img,
                "after the secondary's restart",
                &logs,
            );
            format!(
                "ack {ack}: resent {} KiB of {} KiB dirty",
                sent / 1024,
                r["dirty_at_start"].as_u64().unwrap_or(0) * 4
            )
        },
    );
}

#[test]
fn a_secondary_with_other_data_gets_a_checksum_sync_of_the_differing_chunks() {
    let _g = heavy();
    let dir = scratch();
    let size = 32usize << 20;
    let (p_img, s_img) = (
        dir.path().join("primary.img"),
        dir.path().join("secondary.img"),
    );
    random_file(&p_img, size, 7);
    let mut other = std::fs::read(&p_img).unwrap();
    let chunks = [3usize, 100, 101, 400, 511];
    for c in chunks {
        other[c * 65536 + 1000] ^= 0xff;
    }
    std::fs::write(&s_img, &other).unwrap();
    let mut pair = Pair::start(
        dir.path(),
        "32M",
        &owned(&["--checkpoint-interval", "200ms"]),
    );
    let v = pair.wait_synced(Duration::from_secs(60), 1);
    let r = &v["resync"];
    assert_eq!(r["kind"].as_str(), Some("checksum"), "{v}");
    assert_eq!(r["compared_units"].as_u64(), Some(512), "{v}");
    assert_eq!(
        r["sent_bytes"].as_u64(),
        Some(chunks.len() as u64 * 65536),
        "only the differing chunks travel: {v}"
    );
    pair.primary.stop(Duration::from_secs(60));
    assert_images_equal(&pair.p_img, &pair.s_img, "after the checksum sync", "");
}
