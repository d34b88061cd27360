//! After a failover the roles swap: the failed-over node becomes a replicating primary and the
//! old primary's disk, with its own unreplicated writes, its secondary (checksum resync). When
//! both nodes wrote as primary (split-brain, `--on-peer-loss failover` and a cut link), the old
//! primary refuses to become a secondary until `--discard-my-data`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use lockstep_tests::control::{checkpoint, failover, lockstep, tail, wait_synced, T};
use lockstep_tests::fio::{fio_ok, load_job, start_fio, start_load};
use lockstep_tests::images::assert_images_equal;
use lockstep_tests::pair::{ack_flags, Pair, Swapped};
use lockstep_tests::trials::fio_trials;
use lockstep_tests::{heavy, lockstep_bin, owned, refs, require, scratch, sleep_ms, Daemon};

/// Start the swapped primary on the failed-over node's disk and wait until its first resync
/// is done: (the primary, its status).
fn start_synced_primary(dir: &Path, swapped: &Swapped, pair: &Pair) -> (Daemon, Value) {
    let pargs = swapped.primary_args(&pair.s_img);
    let mut p2 = Daemon::start("primary2", &lockstep_bin(), &refs(&pargs), dir);
    let v = wait_synced(&mut p2, &swapped.p_sock, Duration::from_secs(60), 1);
    (p2, v)
}

/// Stop the swapped primary (its final checkpoint) and compare the two images.
fn stop_and_compare(p2: &mut Daemon, pair: &Pair, what: &str) {
    p2.stop(Duration::from_secs(60));
    assert_images_equal(&pair.s_img, &pair.p_img, what, &tail(p2, 40));
}

#[test]
fn failover_then_reprotect_with_the_old_primary_as_secondary() {
    fio_trials(
        "failover_then_reprotect_with_the_old_primary_as_secondary",
        2,
        |_, rng| {
            let dir = scratch();
            let mut pair = Pair::start(dir.path(), "64M", &ack_flags("received", "100ms"));
            let mut fio = start_load(
                dir.path(),
                &load_job(&pair.uri(), Some(rng.next_u64() % 1000), 16, "64M", 10),
            );
            sleep_ms(rng.range(1000, 3000));
            pair.primary.signal(libc::SIGKILL);
            pair.primary.wait(Duration::from_secs(10));
            let _ = fio.wait(Duration::from_secs(60));
            let (ok, out, err) = failover(&pair.s_sock, "checkpoint", &["--verify"]);
            assert!(ok, "failover: {out}{err}");
            // The failed-over node becomes a replicating primary; the old primary's disk, with
            // its own unreplicated writes, becomes its secondary.
            pair.secondary.stop(Duration::from_secs(30));
            let swapped = Swapped::new(dir.path());
            let _sec2 = swapped.start_secondary(dir.path(), "secondary2", &pair.p_img, &[]);
            let (mut p2, v) = start_synced_primary(dir.path(), &swapped, &pair);
            let r = &v["resync"];
            let sent = r["sent_bytes"].as_u64().unwrap_or(0);
            assert_eq!(r["kind"].as_str(), Some("checksum"), "{v}");
            let mut fio2 = start_fio(
                dir.path(),
                "fio-load2",
                &load_job(&swapped.uri(), Some(5), 8, "64M", 2),
            );
            fio_ok(&mut fio2, "fio on the new primary", &tail(&p2, 30));
            checkpoint(&swapped.p_sock).expect("checkpoint");
            stop_and_compare(&mut p2, &pair, "after re-protecting");
            format!(
                "re-protected: {} KiB sent ({} of {} chunks differed)",
                sent / 1024,
                r["compared_units"].as_u64().unwrap_or(0) - r["equal_units"].as_u64().unwrap_or(0),
                r["compared_units"].as_u64().unwrap_or(0)
            )
        },
    );
}

#[test]
fn split_brain_is_refused_until_discard_my_data() {
    require("fio", "fio");
    let _g = heavy();
    let dir = scratch();
    let (mut pair, proxy) = Pair::start_full(
        dir.path(),
        "64M",
        &owned(&["--checkpoint-interval", "100ms", "--heartbeat", "100ms"]),
        &owned(&["--on-peer-loss", "failover", "--heartbeat-misses", "3"]),
        true,
    );
    let proxy = proxy.expect("proxy");
    // The risk this test is about is on the operator's screen.
    // (Its exit code says whether the first sync is done yet: 0 or 3.)
    let out = lockstep_tests::run(
        lockstep_tests::lockstep_bin().to_str().unwrap(),
        &["status", "--control", pair.s_sock.to_str().unwrap()],
        T,
    );
    let text = lockstep_tests::output_text(&out);
    assert!(
        matches!(out.status.code(), Some(0 | 3))
            && text.contains("RISK")
            && text.contains("cannot tell a dead primary from a cut link"),
        "{text}"
    );
    let mut fio = start_load(dir.path(), &load_job(&pair.uri(), Some(3), 16, "64M", 4));
    sleep_ms(1000);
    proxy.cut();
    // The secondary fails over by itself; the primary keeps writing: both wrote as primary.
    pair.wait_secondary(Duration::from_secs(20), "primary");
    sleep_ms(500);
    proxy.heal();
    let v = pair.wait_primary(Duration::from_secs(30), |v| {
        v["last_attempt_error"]
            .as_str()
            .is_some_and(|e| e.contains("split-brain"))
    });
    assert_eq!(v["mode"].as_str(), Some("unprotected"), "{v}");
    fio_ok(&mut fio, "fio across the split", &pair.logs());
    pair.primary.stop(Duration::from_secs(30));
    pair.secondary.stop(Duration::from_secs(30));
    // The operator keeps the failed-over node's data: without --discard-my-data the old
    // primary's disk refuses to become its secondary.
    let swapped = Swapped::new(dir.path());
    let sec2 = swapped.start_secondary(dir.path(), "old-primary-as-secondary", &pair.p_img, &[]);
    let pargs = swapped.primary_args(&pair.s_img);
    let (ok, out, err) = lockstep(&refs(&pargs), Duration::from_secs(60));
    assert!(!ok, "a primary started on a split-brain pair: {out}");
    assert!(
        err.contains("split-brain") && err.contains("--discard-my-data"),
        "{err}"
    );
    drop(sec2);
    let _sec2 = swapped.start_secondary(
        dir.path(),
        "old-primary-discarding",
        &pair.p_img,
        &["--discard-my-data"],
    );
    let (mut p2, v) = start_synced_primary(dir.path(), &swapped, &pair);
    assert_eq!(v["resync"]["kind"].as_str(), Some("checksum"), "{v}");
    stop_and_compare(&mut p2, &pair, "after --discard-my-data");
}
