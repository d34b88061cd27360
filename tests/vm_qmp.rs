//! `lockstep primary --qmp`: a QEMU VM (here `-machine none`, no guest) stopped for each
//! checkpoint's cut and continued after it, over QMP.
//!
//! * the VM is stopped and continued once per checkpoint and runs between them;
//! * a VM an operator paused stays paused through checkpoints;
//! * a QMP socket with nobody behind it, or a QEMU that dies, skips checkpoints (with the
//!   reason in status) and the primary keeps serving; when QEMU is back, checkpoints resume.

use std::time::Duration;

use lockstep_tests::control::control_status;
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::qmp::Vm;
use lockstep_tests::{owned, scratch, sleep_ms};
use serde_json::Value;

fn pair_with_qmp(dir: &std::path::Path, qmp: &std::path::Path) -> Pair {
    let mut flags = ack_flags("received", "100ms");
    flags.extend(owned(&["--qmp", qmp.to_str().unwrap()]));
    Pair::start(dir, "16M", &flags)
}

fn guest(st: &Value) -> Value {
    st["participants"]["guest"].clone()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

#[test]
fn the_vm_is_stopped_for_each_checkpoint_and_runs_between_them() {
    let dir = scratch();
    let qmp = dir.path().join("lockstep.qmp");
    let vm = Vm::start(dir.path(), &qmp);
    let mut p = pair_with_qmp(dir.path(), &qmp);
    let st = p.wait_primary(Duration::from_secs(30), |s| {
        guest(s)["stops"].as_u64().is_some_and(|n| n >= 10)
    });
    let g = guest(&st);
    assert_eq!(n(&g, "failures"), 0, "{g}");
    assert!(n(&st, "checkpoints") >= 10, "{st}");
    assert!(g["stopped_us"]["p50"].as_u64().unwrap() < 50_000, "{g}");
    let mut q = vm.connect();
    // QEMU itself reports the stops and continues (to every monitor): about one each per
    // 100 ms checkpoint.
    let stops = q.count_events("STOP", Duration::from_secs(2));
    assert!(
        stops >= 5,
        "QEMU saw {stops} STOP events in 2 s of 100 ms checkpoints"
    );
    // Between checkpoints the VM runs (sampled a few times).
    let running = (0..20)
        .filter(|_| {
            sleep_ms(7);
            q.running()
        })
        .count();
    assert!(running >= 15, "the VM ran in only {running} of 20 samples");
    // An operator's pause is respected: checkpoints go on, the VM stays paused.
    q.execute("stop");
    let before = n(
        &guest(&control_status(&p.p_sock, Duration::from_secs(10)).unwrap()),
        "stops",
    );
    let st = p.wait_primary(Duration::from_secs(30), |s| {
        guest(s)["not_running"].as_u64().is_some_and(|n| n >= 5)
    });
    assert!(
        !q.running(),
        "a checkpoint continued a VM the operator had paused"
    );
    assert!(n(&guest(&st), "stops") <= before + 1, "{st}");
    q.execute("cont");
    assert!(q.running());
    println!("guest stop per checkpoint: {}", guest(&st)["stopped_us"]);
}

#[test]
fn without_qemu_checkpoints_are_skipped_until_it_is_back() {
    let dir = scratch();
    let qmp = dir.path().join("lockstep.qmp");
    let mut p = pair_with_qmp(dir.path(), &qmp);
    let st = p.wait_primary(Duration::from_secs(30), |s| {
        s["checkpoints_skipped"].as_u64().is_some_and(|n| n >= 3)
    });
    let why = st["last_skip_reason"].as_str().unwrap_or("");
    assert!(why.contains("did not pause") && why.contains("QMP"), "{st}");
    let committed = n(&st, "checkpoints");
    // QEMU appears: checkpoints resume.
    let mut vm = Vm::start(dir.path(), &qmp);
    let st = p.wait_primary(Duration::from_secs(30), |s| {
        s["checkpoints"]
            .as_u64()
            .is_some_and(|c| c >= committed + 5)
    });
    assert!(n(&guest(&st), "stops") >= 5, "{st}");
    // QEMU dies: skipped again, the primary serves on.
    vm.daemon.signal(libc::SIGKILL);
    vm.daemon.wait(Duration::from_secs(10));
    let skipped = n(&st, "checkpoints_skipped");
    let st = p.wait_primary(Duration::from_secs(30), |s| {
        s["checkpoints_skipped"]
            .as_u64()
            .is_some_and(|n| n >= skipped + 3)
    });
    assert_eq!(st["mode"], "replicating", "{st}");
    let out = lockstep_tests::run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 7 0 64k", &p.uri()],
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "the primary still serves: {out:?}");
}
