//! memrep as a library: `lockstep-protected` is a program that is its own primary
//! (`run_primary_with`), tracks its own region through its own mapping with userfaultfd
//! (`UffdTracker::register_self`) and pauses its own writer thread around every cut. Against a
//! `lockstep secondary --memory`, kill -9 the program at random moments, fail the secondary
//! over, and find memory and disk at the same counter, the region exactly the pattern at it.

use std::fs::File;
use std::time::Duration;

use lockstep_tests::control::{failover, parse_json, wait_status};
use lockstep_tests::images::first_difference;
use lockstep_tests::mempair::{block0, ShmFile};
use lockstep_tests::memwriter::{expected_region, read_header, PAGE};
use lockstep_tests::pair::{secondary_cmd, start_secondary};
use lockstep_tests::trials::{trials, Rng};
use lockstep_tests::{free_port, heavy, owned, scratch, sleep_ms, Daemon};

const MIB: u64 = 1 << 20;

fn trial(rng: &mut Rng) -> String {
    let len = rng.pick(&[4, 8]) * MIB;
    let run_ms = rng.range(300, 1500);
    let dir = scratch();
    let d = dir.path();
    let p_region = ShmFile::new("p", len);
    let s_region = ShmFile::new("s", len);
    let listen = format!("127.0.0.1:{}", free_port());
    let s_sock = d.join("secondary.sock");
    let s_img = d.join("secondary.img");
    let _secondary = start_secondary(
        d,
        "secondary",
        &secondary_cmd(
            &s_img,
            Some("16M"),
            &listen,
            &s_sock,
            None,
            &owned(&["--memory", s_region.s()]),
        ),
        &s_sock,
    );
    let p_img = d.join("primary.img");
    File::create(&p_img).unwrap().set_len(16 * MIB).unwrap();
    let p_sock = d.join("primary.sock");
    let export = format!("unix:{}", d.join("export.sock").display());
    let mut program = Daemon::start(
        "protected",
        std::path::Path::new(env!("CARGO_BIN_EXE_lockstep-protected")),
        &[
            "--region",
            p_region.s(),
            "--disk",
            p_img.to_str().unwrap(),
            "--secondary",
            &listen,
            "--control",
            p_sock.to_str().unwrap(),
            "--export",
            &export,
        ],
        d,
    );
    let mem = |v: &serde_json::Value| v["participants"]["memory0"].clone();
    let before = wait_status(
        &mut program,
        &p_sock,
        Duration::from_secs(30),
        "program",
        |v| {
            mem(v)["tracker"] == "uffd"
                && mem(v)["committed_epoch"].as_u64().unwrap_or(0) >= 3
                && v["participants"]["block"]["committed_epoch"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 3
        },
    );
    sleep_ms(run_ms);
    program.signal(libc::SIGKILL);
    program.wait(Duration::from_secs(10));
    let (ok, out, err) = failover(&s_sock, "checkpoint", &["--json"]);
    assert!(ok, "failover failed: {out}\n{err}");
    let fv = parse_json(&out).unwrap();
    let disk = read_header(&block0(&s_img));
    let region = std::fs::read(&s_region.path).unwrap();
    let c = read_header(&region[..PAGE]);
    let ctx = format!(
        "region {} MiB, killed after {run_ms} ms: disk {disk:?}, memory {c:?}, failover {fv}, before {}",
        len / MIB,
        mem(&before)
    );
    assert!(c.is_some_and(|c| c > 0), "no counter: {ctx}");
    assert_eq!(disk, c, "memory and disk disagree: {ctx}");
    let c = c.unwrap();
    if let Some(at) = first_difference(&expected_region(len / PAGE as u64, c), &region) {
        panic!("the region is not the pattern at {c}: byte {at} differs: {ctx}");
    }
    format!("{ctx}: ok")
}

#[test]
fn a_program_protecting_its_own_region_survives_kill_9_with_memory_and_disk_alike() {
    let _h = heavy();
    trials("library kill -9", 5, |_, rng| trial(rng));
}
