//! A VM that survives the loss of its host: Debian's kernel under TCG with a counter program
//! (tests/src/guest/vm.rs), its RAM replicated by `--memory`, its disk by lockstep, its device
//! state captured over QMP at each checkpoint (`--qmp --device-state`), its web port behind
//! `lockstep netcmp` in buffering mode. Each trial kills QEMU and the primary lockstep with
//! SIGKILL at a random moment (in a random order), fails the secondary over to the
//! checkpoint, starts QEMU there with `-incoming defer` and `lockstep vm-resume`, and checks:
//!
//! * the guest goes on from the checkpoint: memory and disk agree (the guest checks at every
//!   step), and its counter is past every value a client was shown through netcmp;
//! * its filesystem checks clean (`e2fsck -fn` on the secondary's image afterwards);
//! * with QEMU dead and the primary alive, checkpoints stop and the last one stays committed;
//! * a device state that does not load is refused with a clear error, and the good one
//!   still resumes.
//!
//! Every random choice comes from one seed printed at the start; `LOCKSTEP_TEST_SEED`
//! replays a run.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockstep_tests::control::{control_status, failover, lockstep};
use lockstep_tests::guest::vm::{counts, start_vm, vm_initrd, wait_count, VmSpec};
use lockstep_tests::pair::{ack_flags, primary_cmd, secondary_cmd, Pair};
use lockstep_tests::trials::{trials, Rng};
use lockstep_tests::{free_port, heavy, lockstep_bin, owned, refs, run, scratch, sleep_ms, Daemon};

const RAM_MIB: u32 = 96;
const DISK: &str = "64M";

/// GET `path` from `addr`: the body, or None if the connection fails or is reset.
fn get_path(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body.split("\r\n\r\n").nth(1)?.to_string())
}

/// GET /count through `addr`.
fn get_count(addr: &str) -> Option<u64> {
    get_path(addr, "/count")?.trim().parse().ok()
}

struct Node {
    pair: Pair,
    p_ram: std::path::PathBuf,
    s_ram: std::path::PathBuf,
    s_dev: std::path::PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.p_ram);
        let _ = std::fs::remove_file(&self.s_ram);
    }
}

fn ram_file(name: &str) -> std::path::PathBuf {
    let p = std::path::PathBuf::from(format!(
        "/dev/shm/lockstep-vm-{}-{name}",
        std::process::id()
    ));
    let f = std::fs::File::create(&p).expect("ram file");
    f.set_len(u64::from(RAM_MIB) << 20).expect("ram size");
    p
}

/// Two formatted, identical images, RAM files, and a pair replicating disk, RAM and device
/// state with checkpoints every `interval`.
fn start_node(dir: &Path, tag: &str, interval: &str) -> Node {
    let p_img = dir.join("primary.img");
    let out = run(
        "mkfs.ext2",
        &["-q", "-F", p_img.to_str().unwrap(), DISK],
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "mkfs.ext2: {out:?}");
    std::fs::copy(&p_img, dir.join("secondary.img")).expect("copy image");
    let (p_ram, s_ram) = (ram_file(&format!("{tag}-p")), ram_file(&format!("{tag}-s")));
    let s_dev = dir.join("secondary.device");
    let mut pflags = ack_flags("received", interval);
    pflags.extend(owned(&[
        "--memory",
        p_ram.to_str().unwrap(),
        "--qmp",
        dir.join("primary.qmp").to_str().unwrap(),
        "--device-state",
        dir.join("primary.device").to_str().unwrap(),
    ]));
    let sflags = owned(&[
        "--memory",
        s_ram.to_str().unwrap(),
        "--device-state",
        s_dev.to_str().unwrap(),
    ]);
    let (pair, _) = Pair::start_full(dir, DISK, &pflags, &sflags, false);
    Node {
        pair,
        p_ram,
        s_ram,
        s_dev,
    }
}

/// Where a VM resumes: this node's RAM file and export, the device state to load.
struct Resume<'a> {
    ram: &'a Path,
    disk: &'a str,
    state: &'a Path,
    /// Give QEMU a second QMP socket (`NAME-admin.qmp`) for the test.
    admin_qmp: bool,
}

/// Start QEMU `name` with `-incoming defer` on `to` and run `lockstep vm-resume`: QEMU, the
/// command's (success, stdout, stderr), and the host port of the guest's web server.
fn resume_vm(
    d: &Path,
    initrd: &Path,
    name: &str,
    console: &str,
    to: &Resume<'_>,
) -> (Daemon, (bool, String, String), u16) {
    let qmp = d.join(format!("{name}.qmp"));
    let http = free_port();
    let vm = start_vm(
        &VmSpec {
            ram: to.ram.to_path_buf(),
            ram_mib: RAM_MIB,
            disk: to.disk.to_string(),
            admin_qmp: to.admin_qmp.then(|| d.join(format!("{name}-admin.qmp"))),
            qmp: qmp.clone(),
            http_port: http,
            console: d.join(console),
            incoming: true,
        },
        initrd,
        d,
        name,
    );
    let start = std::time::Instant::now();
    while !qmp.exists() && start.elapsed() < Duration::from_secs(20) {
        sleep_ms(20);
    }
    let r = lockstep(
        &[
            "vm-resume",
            "--qmp",
            qmp.to_str().unwrap(),
            "--device-state",
            to.state.to_str().unwrap(),
        ],
        Duration::from_secs(90),
    );
    (vm, r, http)
}

fn trial(rng: &mut Rng, index: usize) -> String {
    let dir = scratch();
    let d = dir.path();
    let initrd = vm_initrd(d);
    let mut node = start_node(d, &format!("t{index}"), "300ms");
    let http = free_port();
    let mut vm1 = start_vm(
        &VmSpec {
            ram: node.p_ram.clone(),
            ram_mib: RAM_MIB,
            disk: node.pair.export.clone(),
            admin_qmp: None,
            qmp: d.join("primary.qmp"),
            http_port: http,
            console: d.join("console1.log"),
            incoming: false,
        },
        &initrd,
        d,
        "qemu1",
    );
    // The client's view goes through netcmp, which holds replies until their checkpoint.
    let nc_addr = format!("127.0.0.1:{}", free_port());
    let nc_args = owned(&[
        "netcmp",
        "--listen",
        &nc_addr,
        "--primary",
        &format!("127.0.0.1:{http}"),
        "--control",
        node.pair.p_sock.to_str().unwrap(),
    ]);
    let mut netcmp = Daemon::start("netcmp", &lockstep_bin(), &refs(&nc_args), d);
    lockstep_tests::wait_port(&nc_addr, Duration::from_secs(15), &mut netcmp.child);
    wait_count(
        &d.join("console1.log"),
        3,
        Duration::from_secs(120),
        &mut vm1,
    );
    let seen = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (seen, stop, addr) = (seen.clone(), stop.clone(), nc_addr.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(n) = get_count(&addr) {
                    seen.fetch_max(n, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
        })
    };
    // At least one checkpoint of the running counter committed (a client saw it), so that
    // the trial fails over from a checkpoint taken while the guest worked.
    let start = std::time::Instant::now();
    while seen.load(Ordering::Relaxed) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "trial {index}: no checkpoint of the running guest committed within 90 s:\n{}",
            node.pair.logs()
        );
        sleep_ms(50);
    }
    let run_ms = rng.range(200, 4000);
    let qemu_first = rng.range(0, 1) == 0;
    let params = format!(
        "trial {index}: kill after {run_ms} ms, {} first",
        if qemu_first { "QEMU" } else { "lockstep" }
    );
    sleep_ms(run_ms);
    if qemu_first {
        let before = control_status(&node.pair.p_sock, Duration::from_secs(10)).unwrap();
        vm1.signal(libc::SIGKILL);
        vm1.wait(Duration::from_secs(10));
        // Without its VM the primary commits nothing more: the last checkpoint stays.
        sleep_ms(1200);
        let after = control_status(&node.pair.p_sock, Duration::from_secs(10)).unwrap();
        assert!(
            after["committed_epoch"].as_u64() <= before["committed_epoch"].as_u64().map(|e| e + 2),
            "[{params}] checkpoints went on without the VM: {before} → {after}"
        );
        assert!(
            after["checkpoints_skipped"].as_u64() > before["checkpoints_skipped"].as_u64()
                || after["checkpoint_failures"].as_u64() > before["checkpoint_failures"].as_u64(),
            "[{params}] {after}"
        );
        node.pair.primary.signal(libc::SIGKILL);
    } else {
        node.pair.primary.signal(libc::SIGKILL);
        vm1.signal(libc::SIGKILL);
        vm1.wait(Duration::from_secs(10));
    }
    node.pair.primary.wait(Duration::from_secs(10));
    sleep_ms(300);
    stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    let max_seen = seen.load(Ordering::Relaxed);
    let (before_kill, bad1) = counts(&d.join("console1.log"));
    assert!(bad1.is_empty(), "[{params}] the primary's guest: {bad1:?}");

    let (ok, out, err) = failover(&node.pair.s_sock, "checkpoint", &[]);
    assert!(ok, "[{params}] failover: {out}{err}\n{}", node.pair.logs());
    let resume = |name: &str, state: &Path, console: &str| {
        let to = Resume {
            ram: &node.s_ram,
            disk: &node.pair.s_export,
            state,
            admin_qmp: false,
        };
        resume_vm(d, &initrd, name, console, &to)
    };
    if index == 0 {
        // A device state that does not load is refused, loudly; the good one still works.
        let bad = d.join("truncated.device");
        let good = std::fs::read(&node.s_dev).expect("device state in place");
        std::fs::write(&bad, &good[..good.len() / 3]).unwrap();
        let (mut vm, (ok, out, err), _) = resume("qemu-bad", &bad, "console-bad.log");
        assert!(!ok, "[{params}] a truncated device state resumed: {out}");
        assert!(err.contains("did not load"), "[{params}] {err}");
        vm.signal(libc::SIGKILL);
        vm.wait(Duration::from_secs(10));
    }
    let (mut vm2, (ok, out, err), http2) = resume("qemu2", &node.s_dev, "console2.log");
    assert!(ok, "[{params}] vm-resume: {out}{err}\n{}", vm2.log_text());
    let c2 = d.join("console2.log");
    wait_count(&c2, 1, Duration::from_secs(60), &mut vm2);
    let first = counts(&c2).0[0];
    let last = wait_count(&c2, first + 5, Duration::from_secs(60), &mut vm2);
    let (_, bad2) = counts(&c2);
    assert!(
        bad2.is_empty(),
        "[{params}] memory and disk disagree after failover: {bad2:?}"
    );
    assert!(
        first > max_seen,
        "[{params}] a client was shown {max_seen}, the resumed VM counts from {first}"
    );
    let now = get_count(&format!("127.0.0.1:{http2}")).expect("the resumed VM answers");
    assert!(now >= first, "[{params}] {now} < {first}");
    // The guest unmounts its disk, then the filesystem it leaves must check clean.
    let _ = get_path(&format!("127.0.0.1:{http2}"), "/cgi-bin/stop");
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&c2)
        .unwrap_or_default()
        .contains("GUEST-UNMOUNTED")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "[{params}] the resumed guest did not unmount its disk"
        );
        sleep_ms(50);
    }
    vm2.signal(libc::SIGKILL);
    vm2.wait(Duration::from_secs(10));
    netcmp.signal(libc::SIGKILL);
    node.pair.secondary.stop(Duration::from_secs(30));
    let fsck = run(
        "e2fsck",
        &["-fn", d.join("secondary.img").to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert!(
        fsck.status.success(),
        "[{params}] the failed-over filesystem does not check clean: {fsck:?}"
    );
    format!(
        "{params}: primary reached {}, clients saw ≤ {max_seen}, resumed at {first}, ran to {last}",
        before_kill.last().copied().unwrap_or(0)
    )
}

#[test]
fn the_vm_survives_the_loss_of_its_host() {
    lockstep_tests::require("e2fsck", "e2fsprogs");
    lockstep_tests::require("mkfs.ext2", "e2fsprogs");
    let _h = heavy();
    // LOCKSTEP_VM_TRIALS: fewer (or more) trials while debugging; the suite runs 10.
    let n = std::env::var("LOCKSTEP_VM_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    trials("vm failover", n, |i, rng| trial(rng, i));
}

/// After a failover, the survivor gets a new secondary without stopping for longer than a
/// daemon restart: the VM is stopped, the failed-over node's daemon is replaced in place by a
/// `lockstep primary` (same export, so QEMU's NBD client reconnects), the old primary's host
/// becomes the secondary (its stale disk and RAM resynced: only what differs is sent), and
/// the VM continues. Then that host fails over back and the VM resumes there.
#[test]
fn a_failed_over_vm_is_protected_again_and_fails_back() {
    let _h = heavy();
    let dir = scratch();
    let d = dir.path();
    let initrd = vm_initrd(d);
    let mut node = start_node(d, "rp", "300ms");
    let mut vm1 = start_vm(
        &VmSpec {
            ram: node.p_ram.clone(),
            ram_mib: RAM_MIB,
            disk: node.pair.export.clone(),
            admin_qmp: None,
            qmp: d.join("primary.qmp"),
            http_port: free_port(),
            console: d.join("console1.log"),
            incoming: false,
        },
        &initrd,
        d,
        "qemu1",
    );
    wait_count(
        &d.join("console1.log"),
        3,
        Duration::from_secs(120),
        &mut vm1,
    );
    let p = node.pair.p_sock.clone();
    let committed = |sock: &Path| {
        control_status(sock, Duration::from_secs(10)).unwrap()["committed_epoch"]
            .as_u64()
            .unwrap()
    };
    let c0 = committed(&p);
    node.pair.wait_primary(Duration::from_secs(60), |s| {
        s["committed_epoch"].as_u64() > Some(c0 + 2)
    });
    vm1.signal(libc::SIGKILL);
    node.pair.primary.signal(libc::SIGKILL);
    vm1.wait(Duration::from_secs(10));
    node.pair.primary.wait(Duration::from_secs(10));
    let (ok, out, err) = failover(&node.pair.s_sock, "checkpoint", &[]);
    assert!(ok, "failover: {out}{err}");
    let b_export = node.pair.s_export.clone();
    let resumed = Resume {
        ram: &node.s_ram,
        disk: &b_export,
        state: &node.s_dev,
        admin_qmp: true,
    };
    let (mut vm2, (ok, out, err), _) = resume_vm(d, &initrd, "qemu2", "console2.log", &resumed);
    assert!(ok, "vm-resume: {out}{err}");
    let c2 = d.join("console2.log");
    let first = {
        wait_count(&c2, 1, Duration::from_secs(60), &mut vm2);
        counts(&c2).0[0]
    };
    wait_count(&c2, first + 3, Duration::from_secs(60), &mut vm2);

    // Re-protect: the old primary's host (stale disk and RAM) becomes the secondary.
    let a_listen = format!("127.0.0.1:{}", free_port());
    let a_export = format!("127.0.0.1:{}", free_port());
    let a_sock = d.join("a2.sock");
    let a_dev = d.join("a2.device");
    let sargs = secondary_cmd(
        &node.pair.p_img,
        None,
        &a_listen,
        &a_sock,
        Some(&a_export),
        &owned(&[
            "--memory",
            node.p_ram.to_str().unwrap(),
            "--device-state",
            a_dev.to_str().unwrap(),
        ]),
    );
    let mut a2 = Daemon::start("secondary-a2", &lockstep_bin(), &refs(&sargs), d);
    lockstep_tests::control::wait_mode(&mut a2, &a_sock, Duration::from_secs(20), "a2", "waiting");
    let mut admin = lockstep_tests::qmp::Qmp::connect(&d.join("qemu2-admin.qmp"));
    admin.execute("stop");
    // The failed-over daemon makes way for a primary on the same disk and export.
    node.pair.secondary.stop(Duration::from_secs(30));
    let b_sock = d.join("b2.sock");
    let mut extra = owned(&[
        "--memory",
        node.s_ram.to_str().unwrap(),
        "--qmp",
        d.join("qemu2.qmp").to_str().unwrap(),
        "--device-state",
        d.join("b2.device").to_str().unwrap(),
    ]);
    extra.extend(ack_flags("received", "300ms"));
    let pargs = primary_cmd(
        &node.pair.s_img,
        None,
        &b_export,
        &a_listen,
        &b_sock,
        &extra,
    );
    let mut b2 = Daemon::start("primary-b2", &lockstep_bin(), &refs(&pargs), d);
    let st = lockstep_tests::control::wait_status(
        &mut b2,
        &b_sock,
        Duration::from_secs(120),
        "b2",
        |s| s["mode"] == "replicating" && s["committed_epoch"].as_u64() > Some(0),
    );
    let at_cont = counts(&c2).0.last().copied().unwrap_or(0);
    admin.execute("cont");
    let base = st["committed_epoch"].as_u64().unwrap();
    let st = lockstep_tests::control::wait_status(
        &mut b2,
        &b_sock,
        Duration::from_secs(120),
        "b2",
        |s| {
            s["committed_epoch"].as_u64() > Some(base + 3)
                && s["participants"]["device"]["captures"].as_u64() > Some(2)
        },
    );
    let resync = st["resync"].clone();
    let mem = st["participants"]["memory0"].clone();
    let before = counts(&c2).0.last().copied().unwrap_or(0);
    wait_count(&c2, before + 3, Duration::from_secs(60), &mut vm2);

    // Fail back: kill the VM and the new primary; the old host resumes the VM.
    vm2.signal(libc::SIGKILL);
    b2.signal(libc::SIGKILL);
    vm2.wait(Duration::from_secs(10));
    b2.wait(Duration::from_secs(10));
    let reached = counts(&c2).0.last().copied().unwrap_or(0);
    let (ok, out, err) = failover(&a_sock, "checkpoint", &[]);
    assert!(ok, "failover back: {out}{err}\n{}", a2.log_text());
    let back = Resume {
        ram: &node.p_ram,
        disk: &a_export,
        state: &a_dev,
        admin_qmp: false,
    };
    let (mut vm3, (ok, out, err), _) = resume_vm(d, &initrd, "qemu3", "console3.log", &back);
    assert!(ok, "vm-resume on the old host: {out}{err}");
    let c3 = d.join("console3.log");
    wait_count(&c3, 1, Duration::from_secs(60), &mut vm3);
    let again = counts(&c3).0[0];
    wait_count(&c3, again + 3, Duration::from_secs(60), &mut vm3);
    for c in [&c2, &c3] {
        let (_, bad) = counts(c);
        assert!(bad.is_empty(), "memory and disk disagree: {bad:?}");
    }
    // The checkpoints committed after `cont` hold a counter of at least `at_cont`.
    assert!(
        again >= at_cont,
        "the VM failed back to {again}, before it continued under the new pair ({at_cont})"
    );
    assert!(before >= at_cont);
    assert!(again <= reached + 1, "{again} > {reached} + 1");
    println!(
        "re-protected: disk resync {} ({} of {} chunks sent), memory resync {} pages of {}; \
         failed back at {again} (reached {reached})",
        resync["kind"],
        resync["sent_blocks"],
        resync["compared_units"],
        mem["resync_pages"],
        mem["pages_sent"]
    );
}
