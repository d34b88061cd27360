//! ublk in a QEMU guest: `/dev/ublkbN` served by lockstep, checked with fio and dd; a
//! replication pair whose primary serves ublk; daemon restart with user recovery; and the
//! informational ublk / kernel NBD / loop comparison. The scripts live in
//! `tests/guest/scripts/` and run under busybox `sh -e` in the guest.

use std::path::PathBuf;
use std::time::Duration;

use lockstep_tests::guest::{run_in_guest, GuestOptions, GuestRun};
use lockstep_tests::heavy;

fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("guest/scripts")
}

/// Run `tests/guest/scripts/<name>` in a guest with every script under /scripts.
fn run_script(name: &str, timeout: Duration) -> GuestRun {
    let dir = scripts_dir();
    let mut files = Vec::new();
    for e in std::fs::read_dir(&dir).expect("tests/guest/scripts") {
        let p = e.expect("dir entry").path();
        let guest = format!("/scripts/{}", p.file_name().unwrap().to_string_lossy());
        files.push((p, guest));
    }
    let run = run_in_guest(
        &format!(". /scripts/{name}\n"),
        &GuestOptions {
            timeout,
            files,
            ..Default::default()
        },
    );
    eprintln!(
        "guest[{name}]: status {:?}, boot {:?}, total {:?}\n--- output ---\n{}\n---",
        run.status,
        run.boot,
        run.elapsed,
        run.output()
    );
    run
}

#[test]
fn ublk_export_fio_verify_and_dd() {
    let _g = heavy();
    let run = run_script("ublk-export.sh", Duration::from_secs(300));
    run.assert_success();
    let out = run.output();
    for step in [
        "randwrite + crc32c verify ok",
        "randread ok",
        "read-back identical",
        "discard ok",
        "clean shutdown removed the device",
    ] {
        assert!(out.contains(step), "missing step {step:?}:\n{out}");
    }
}

#[test]
fn ublk_user_recovery_after_kill_9() {
    let _g = heavy();
    let run = run_script("ublk-recovery.sh", Duration::from_secs(300));
    run.assert_success();
    let out = run.output();
    assert!(out.contains("device recovered"), "{out}");
    assert!(out.contains("no I/O error, verify passed"), "{out}");
}

#[test]
fn ublk_primary_killed_secondary_matches_checkpoint() {
    let _g = heavy();
    let run = run_script("ublk-replication.sh", Duration::from_secs(300));
    run.assert_success();
    let out = run.output();
    assert!(out.contains("failover verified at epoch"), "{out}");
}

/// Informational (TCG makes absolute numbers meaningless): the same fio job on ublk, on the
/// kernel NBD client and on a loop device, all over the same file. Fails only if a path fails.
#[test]
fn ublk_nbd_loop_side_by_side() {
    let _g = heavy();
    let run = run_script("ublk-perf.sh", Duration::from_secs(300));
    run.assert_success();
    let line = run
        .output()
        .lines()
        .find(|l| l.starts_with("PERF "))
        .unwrap_or_default()
        .to_string();
    assert!(!line.is_empty(), "no PERF line:\n{}", run.output());
    eprintln!("{line}");
}
