//! `lockstep verify --repair` with the real binary: chunks of the secondary's image damaged
//! behind its back (written straight into the file while the pair runs) are found by
//! `lockstep verify` (exit 1), resent and committed by `lockstep verify --repair` (exit 0),
//! and `cmp` finds the two images equal after the primary's last checkpoint; a repair of
//! more than the forward queue holds while a client writes into the damaged range; `--repair`
//! refused with a reason when the primary is not replicating.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use lockstep_tests::control::{lockstep, status, T};
use lockstep_tests::images::assert_cmp_equal;
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::{owned, require, run_ok, scratch};

/// Write `bytes` into the image file at `offset`, behind the daemon's back.
fn damage(img: &std::path::Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("opening the image");
    f.write_all_at(bytes, offset).expect("writing the image");
    f.sync_data().expect("syncing the image");
}

#[test]
fn verify_repair_mends_chunks_damaged_behind_the_secondarys_back() {
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let dir = scratch();
    let mut pair = Pair::start(dir.path(), "32M", &ack_flags("received", "200ms"));
    pair.wait_synced(Duration::from_secs(30), 1);
    let uri = pair.uri();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 0 16M", &uri],
        T,
    );
    let c0 = status(&pair.p_sock).unwrap()["committed_epoch"]
        .as_u64()
        .unwrap();
    pair.wait_primary(Duration::from_secs(20), |v| {
        v["committed_epoch"].as_u64() > Some(c0 + 1)
    });
    let sock = pair.p_sock.to_str().unwrap().to_string();
    let (ok, out, err) = lockstep(&["verify", "--control", &sock], T);
    assert!(
        ok && out.contains(": 0 differ"),
        "{out}{err}\n{}",
        pair.logs()
    );

    // Four chunks: inside one, across the boundary of two, and over a hole of the primary.
    const M: u64 = 1 << 20;
    damage(&pair.s_img, M + 100, &[0xff; 50]);
    damage(&pair.s_img, 8 * M - 10, &[0; 20]);
    damage(&pair.s_img, 20 * M, &[1; 4096]);
    let (ok, out, err) = lockstep(&["verify", "--control", &sock], T);
    assert!(!ok, "verify found no difference: {out}");
    assert!(out.contains(": 4 differ"), "{out}");
    assert!(out.contains(&format!("offset {} length 65536", M)), "{out}");
    assert!(
        out.contains(&format!("offset {} length 131072", 8 * M - 65536)),
        "{out}"
    );
    assert!(err.contains("differ"), "{err}");

    let (ok, out, err) = lockstep(&["verify", "--control", &sock, "--repair"], T);
    assert!(ok, "verify --repair: {out}{err}\n{}", pair.logs());
    eprintln!("lockstep verify --repair:\n{out}");
    assert!(out.contains(": 4 differ"), "{out}");
    assert!(out.contains("repaired 4 chunks"), "{out}");
    assert!(out.contains("compared again: 4 chunks, 0 differ"), "{out}");
    let v = status(&pair.p_sock).unwrap();
    assert_eq!(v["verify"]["state"], "done", "{v}");
    assert_eq!(v["verify"]["repair"]["still_differing_chunks"], 0, "{v}");

    let (ok, out, err) = lockstep(&["verify", "--control", &sock, "--json"], T);
    assert!(ok, "verify after the repair: {out}{err}\n{}", pair.logs());
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(v["differing_chunks"], 0, "{v}");

    let logs = pair.logs();
    assert!(pair.primary.stop(Duration::from_secs(60)).success());
    assert_cmp_equal(&pair.p_img, &pair.s_img, "after verify --repair", &logs);
}

/// `len` bytes of pseudo-random data.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

#[test]
fn verify_repair_under_client_writes_mends_more_than_the_forward_queue_holds() {
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let dir = scratch();
    let mut flags = ack_flags("received", "100ms");
    flags.extend(owned(&["--forward-queue", "4M"]));
    let mut pair = Pair::start(dir.path(), "64M", &flags);
    pair.wait_synced(Duration::from_secs(30), 1);
    let uri = pair.uri();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x3c 0 48M", &uri],
        T,
    );
    let c0 = status(&pair.p_sock).unwrap()["committed_epoch"]
        .as_u64()
        .unwrap();
    pair.wait_primary(Duration::from_secs(20), |v| {
        v["committed_epoch"].as_u64() > Some(c0 + 1)
    });
    // 24 MiB of the secondary's image replaced, half over data and half over holes.
    const M: u64 = 1 << 20;
    damage(&pair.s_img, 36 * M, &noise(24 << 20, 7));
    // A client writes into the damaged range while it is compared, resent and compared again.
    let writer = std::thread::spawn({
        let uri = uri.clone();
        move || {
            for k in 0..6u64 {
                let cmd = format!("write -P 0x{:x} {}M 2M", 0x40 + k, 37 + 3 * k);
                run_ok("qemu-io", &["-f", "raw", "-c", &cmd, &uri], T);
            }
        }
    });
    let sock = pair.p_sock.to_str().unwrap().to_string();
    let (ok, out, err) = lockstep(&["verify", "--control", &sock, "--repair"], T);
    writer.join().expect("the writer");
    assert!(ok, "verify --repair: {out}{err}\n{}", pair.logs());
    eprintln!("lockstep verify --repair under writes:\n{out}");
    assert!(out.contains(", 0 differ"), "{out}");
    let (ok, out, err) = lockstep(&["verify", "--control", &sock], T);
    assert!(
        ok && out.contains(": 0 differ"),
        "{out}{err}\n{}",
        pair.logs()
    );
    let logs = pair.logs();
    assert!(pair.primary.stop(Duration::from_secs(60)).success());
    assert_cmp_equal(
        &pair.p_img,
        &pair.s_img,
        "after a repair under writes",
        &logs,
    );
}

#[test]
fn verify_repair_is_refused_while_not_replicating() {
    let dir = scratch();
    let mut pair = Pair::start(dir.path(), "16M", &ack_flags("received", "200ms"));
    pair.wait_synced(Duration::from_secs(30), 1);
    assert!(pair.secondary.stop(T).success());
    pair.wait_primary(Duration::from_secs(20), |v| v["mode"] != "replicating");
    let sock = pair.p_sock.to_str().unwrap().to_string();
    let (ok, out, err) = lockstep(&["verify", "--control", &sock, "--repair"], T);
    assert!(!ok, "verify --repair without a secondary: {out}");
    assert!(err.contains("not replicating"), "{err}");
}
