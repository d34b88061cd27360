//! Kernel tests in a QEMU guest (Debian's 6.12 kernel under TCG; see `tests/src/guest.rs` and
//! docs/operations.md): the harness itself, the ublk module, and the kernel's NBD client against
//! `lockstep export` on the host.

use std::time::{Duration, Instant};

use lockstep_tests::guest::{run_in_guest, GuestOptions, GuestRun};
use lockstep_tests::*;

fn report(name: &str, run: &GuestRun) {
    eprintln!(
        "guest[{name}]: status {:?}, boot {:?}, total {:?}\n--- script output ---\n{}\n---",
        run.status,
        run.boot,
        run.elapsed,
        run.output()
    );
}

// The guest boots, the binaries and their libraries work, and ublk_drv makes /dev/ublk-control
// (what the ublk tests need).
#[test]
fn guest_boots_and_loads_ublk() {
    let _g = heavy();
    let run = run_in_guest(
        r#"
lockstep --version
fio --version
nbd-client -V 2>&1 | head -n1
uname -r
test ! -e /dev/ublk-control
insmod /lib/modules/ublk_drv.ko
test -c /dev/ublk-control
ls -l /dev/ublk-control
echo smoke-ok
"#,
        &GuestOptions {
            load_modules: false,
            timeout: Duration::from_secs(90),
            ..Default::default()
        },
    );
    report("smoke", &run);
    run.assert_success();
    let out = run.output();
    assert!(out.contains("lockstep "), "no lockstep --version:\n{out}");
    assert!(out.contains("fio-"), "no fio --version:\n{out}");
    assert!(
        out.contains("+deb12-amd64"),
        "not the Debian kernel:\n{out}"
    );
    assert!(out.contains("smoke-ok"), "script did not finish:\n{out}");
}

// A failing command fails the script (sh -e), and its status reaches the host.
#[test]
fn guest_script_failure_is_reported() {
    let _g = heavy();
    let run = run_in_guest(
        "echo before\nfalse\necho after\n",
        &GuestOptions {
            load_modules: false,
            timeout: Duration::from_secs(90),
            ..Default::default()
        },
    );
    report("failure", &run);
    assert_eq!(
        run.status,
        Some(1),
        "expected status 1; console:\n{}",
        run.tail(40)
    );
    assert!(run.output().contains("before"));
    assert!(!run.output().contains("after"));
}

// The harness stops a guest that overstays its timeout, and reports it as a failure.
#[test]
fn guest_timeout_kills_qemu() {
    let _g = heavy();
    let run = run_in_guest(
        "echo sleeping\nsleep 600\n",
        &GuestOptions {
            load_modules: false,
            timeout: Duration::from_secs(15),
            ..Default::default()
        },
    );
    report("timeout", &run);
    assert!(run.timed_out, "not timed out: {run:?}");
    assert_eq!(run.status, None);
    assert!(run.elapsed < Duration::from_secs(25), "{:?}", run.elapsed);
    assert!(run.output().contains("sleeping"), "{}", run.tail(20));
}

// A guest kernel crash ends the run at once (panic=-1, -no-reboot) with no exit marker: a failure
// with the console, not a hang until the timeout.
#[test]
fn guest_kernel_panic_is_a_failure() {
    let _g = heavy();
    let run = run_in_guest(
        "echo crashing\necho 1 > /proc/sys/kernel/sysrq\necho c > /proc/sysrq-trigger\nsleep 600\n",
        &GuestOptions {
            load_modules: false,
            timeout: Duration::from_secs(90),
            ..Default::default()
        },
    );
    report("panic", &run);
    assert_eq!(run.status, None, "{}", run.tail(20));
    assert!(
        !run.timed_out,
        "the crash should end the run, not the timeout"
    );
    assert!(run.console.contains("Kernel panic"), "{}", run.tail(40));
}

// The kernel's NBD client in the guest against `lockstep export` on the host, over qemu user
// networking (the guest's 10.0.2.2 is the host's 127.0.0.1): fio random writes with crc32c
// verification, a reconnect and a second verification pass that can only read what the server
// stored, then timed random reads.
#[test]
fn kernel_nbd_client_against_host_export() {
    let _g = heavy();
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::export(
        dir.path(),
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--size",
            "256M",
            "--name",
            "lockstep",
        ],
        &addr,
    );
    let script = r#"
now() { cut -d' ' -f1 /proc/uptime; }
connect() {
  nbd-client -N lockstep 10.0.2.2 "$PORT" /dev/nbd0 -b 4096
  i=0; while [ "$(cat /sys/block/nbd0/size)" = 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  echo "nbd0: $(cat /sys/block/nbd0/size) sectors"
}
JOB="--name=nbd --filename=/dev/nbd0 --ioengine=libaio --iodepth=16 --direct=1 --bs=4k --size=64M
     --rw=randwrite --randseed=4242 --verify=crc32c --verify_fatal=1 --verify_state_save=0"
connect
t=$(now); fio $JOB --do_verify=1 --output-format=terse --terse-version=3 > /tmp/w.txt || { cat /tmp/w.txt; exit 1; }
echo "TIMING write+verify $(awk "BEGIN{print $(now)-$t}") s, $(cut -d';' -f49 /tmp/w.txt) write IOPS"
nbd-client -d /dev/nbd0
connect
t=$(now); fio $JOB --verify_only --output-format=terse --terse-version=3 > /tmp/v.txt || { cat /tmp/v.txt; exit 1; }
echo "TIMING verify-after-reconnect $(awk "BEGIN{print $(now)-$t}") s"
t=$(now)
fio --name=rr --filename=/dev/nbd0 --ioengine=libaio --iodepth=16 --direct=1 --bs=4k --size=64M \
    --rw=randread --time_based --runtime=5 --output-format=terse --terse-version=3 > /tmp/r.txt
echo "TIMING randread $(awk "BEGIN{print $(now)-$t}") s, $(cut -d';' -f8 /tmp/r.txt) read IOPS"
nbd-client -d /dev/nbd0
echo nbd-ok
"#;
    let start = Instant::now();
    let run = run_in_guest(
        script,
        &GuestOptions {
            net: true,
            timeout: Duration::from_secs(240),
            env: vec![("PORT".into(), port.to_string())],
            ..Default::default()
        },
    );
    report("nbd", &run);
    eprintln!("guest[nbd]: test took {:?}", start.elapsed());
    if run.status != Some(0) {
        eprintln!("lockstep export log:\n{}", d.log_text());
    }
    run.assert_success();
    assert!(run.output().contains("nbd-ok"), "{}", run.output());
    drop(d);
}

// memrep's soft-dirty tracker (how a QEMU VM's RAM is tracked under `lockstep primary --qmp`)
// on Debian's kernel, which keeps soft-dirty bits: a writer process's pages written through its
// own mapping are all reported, with collects while it runs and paused collects while it is
// stopped. (The host kernel here may lack CONFIG_MEM_SOFT_DIRTY; the guest's has it.)
#[test]
fn softdirty_tracking_misses_no_write_in_the_guest() {
    let _g = heavy();
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lockstep-softdirty-check"));
    let run = run_in_guest(
        "lockstep-softdirty-check\n",
        &GuestOptions {
            load_modules: false,
            timeout: Duration::from_secs(120),
            files: vec![(bin, "/usr/bin/lockstep-softdirty-check".into())],
            ..Default::default()
        },
    );
    report("softdirty", &run);
    run.assert_success();
    assert!(run.output().contains("softdirty-ok"), "{}", run.tail(40));
}
