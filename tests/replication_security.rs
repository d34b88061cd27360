//! Hostile peers on the replication port and authenticated links. With `--psk-file` on both
//! nodes, everything an attacker without the key tries is refused before any state changes:
//! reading or writing the replica export with real NBD clients, a forged HELLO, a flood of idle
//! connections from another host while the primary has to reconnect. Key mistakes are clear
//! errors. A pair over TLS replicates and refuses other certificates. Images are compared with
//! `cmp`, not the daemons' own verify.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use lockstep_tests::control::{lockstep, status, T};
use lockstep_tests::fio::{fio_ok, load_job, rated, start_load};
use lockstep_tests::pair::{secondary_cmd, Pair};
use lockstep_tests::security::{flood, key_file, raw_exchange, rss_kib, PEER_SECRET};
use lockstep_tests::tls::TestPki;
use lockstep_tests::{heavy, owned, refs, require, run, scratch, sleep_ms};

#[test]
fn hostile_peers_without_the_key_change_nothing() {
    require("fio", "fio");
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let _g = heavy();
    let dir = scratch();
    let key = key_file(dir.path(), "peer.key", PEER_SECRET);
    let kf = owned(&["--psk-file", key.to_str().unwrap()]);
    let mut pflags = kf.clone();
    pflags.extend(owned(&[
        "--checkpoint-interval",
        "100ms",
        "--heartbeat",
        "100ms",
    ]));
    let (mut pair, proxy) = Pair::start_full(dir.path(), "64M", &pflags, &kf, true);
    let proxy = proxy.expect("proxy");
    let mut fio = start_load(
        dir.path(),
        &rated(load_job(&pair.uri(), Some(11), 8, "64M", 15)),
    );
    sleep_ms(500);
    let replica = format!("nbd://{}/lockstep-replica", pair.listen);

    // Read the replica export with libnbd's nbdinfo, write it with qemu-io.
    let out = run("nbdinfo", &[&replica], T);
    assert!(!out.status.success(), "nbdinfo read the replica export");
    let out = run(
        "qemu-io",
        &["-f", "raw", &replica, "-c", "write -P 0x55 0 4k"],
        T,
    );
    assert!(!out.status.success(), "qemu-io wrote the replica export");

    // Pose as a primary: a HELLO with an absurd heartbeat, then an NBD write request.
    let mut forged = blkrep::replica::wire::Message::Hello {
        size: 64 << 20,
        generation: 0x1234,
        history: vec![],
        tracked: 0,
        committed: 0,
        session: 1,
        ack: blkrep::replica::wire::AckMode::Received,
        heartbeat_ms: u32::MAX,
    }
    .encode();
    forged.extend_from_slice(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1]);
    forged.resize(8192, 0x55);
    let got = raw_exchange(&pair.listen, &forged);
    assert!(
        got.starts_with(b"LSAUTH") && got.len() <= 40 + 33,
        "the port answered a forger with {} bytes: {:02x?}",
        got.len(),
        &got[..got.len().min(64)]
    );

    // A flood of idle connections from another host while the primary must reconnect.
    let rss_before = rss_kib(pair.secondary.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(pair.listen.clone(), 200, stop.clone());
    sleep_ms(1000);
    let before = status(&pair.p_sock).expect("status")["sessions"]
        .as_u64()
        .unwrap_or(1);
    proxy.cut();
    sleep_ms(400);
    proxy.heal();
    let v = pair.wait_synced(Duration::from_secs(30), before + 1);
    stop.store(true, Ordering::Relaxed);
    let flooded = flooder.join().expect("flood thread");
    assert!(flooded > 8, "the flood opened only {flooded} connections");
    let rss_after = rss_kib(pair.secondary.pid());
    assert!(
        rss_after < rss_before + (64 << 10),
        "the secondary grew from {rss_before} KiB to {rss_after} KiB under the flood"
    );
    assert_eq!(v["mode"].as_str(), Some("replicating"), "{v}");

    fio_ok(&mut fio, "fio during the attacks", &pair.logs());
    let sv = status(&pair.s_sock).expect("secondary status");
    assert_eq!(sv["mode"].as_str(), Some("replicating"), "{sv}");
    assert!(sv["failover"].is_null(), "{sv}");
    assert_eq!(sv["peer_auth"]["psk"].as_bool(), Some(true), "{sv}");
    assert_eq!(sv["peer_auth"]["tls"].as_bool(), Some(false), "{sv}");
    let logs = pair.logs();
    assert!(
        logs.contains("wrong key") || logs.contains("closing connection"),
        "the secondary logged nothing about the strangers:\n{logs}"
    );
    pair.stop_and_cmp("after the attacks", &logs);
}

#[test]
fn peer_key_mistakes_are_clear_errors() {
    let dir = scratch();
    let key = key_file(dir.path(), "peer.key", PEER_SECRET);
    let other = key_file(dir.path(), "other.key", "not the secret the secondary has");
    let kf = owned(&["--psk-file", key.to_str().unwrap()]);
    let (pair, _) = Pair::start_full(dir.path(), "16M", &kf, &kf, false);
    let primary_with = |extra: &[&str]| pair.intruding_primary(dir.path(), "5s", &owned(extra));
    let (ok, _, err) = primary_with(&[]);
    assert!(!ok && err.contains("--psk-file"), "no key: {err}");
    let (ok, _, err) = primary_with(&["--psk-file", other.to_str().unwrap()]);
    assert!(!ok && err.contains("refused our key"), "wrong key: {err}");
    // A key file others may read.
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, PEER_SECRET).unwrap();
    let (ok, _, err) = primary_with(&["--psk-file", loose.to_str().unwrap()]);
    assert!(!ok && err.contains("chmod 600"), "loose key: {err}");
    // A secondary beyond loopback without a key.
    let open_secondary = secondary_cmd(
        &dir.path().join("s2.img"),
        Some("16M"),
        "0.0.0.0:0",
        &dir.path().join("s2.sock"),
        None,
        &[],
    );
    let (ok, _, err) = lockstep(&refs(&open_secondary), T);
    assert!(
        !ok && err.contains("--psk-file") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    assert!(
        !dir.path().join("s2.img").exists(),
        "the disk was created anyway"
    );
    // The pair was not disturbed.
    let v = status(&pair.p_sock).expect("status");
    assert_eq!(v["mode"].as_str(), Some("replicating"), "{v}");
}

/// A pair whose replication link runs over TLS, both nodes presenting a certificate of the
/// test CA (and the peer key on top): replicates under fio, and a primary with another CA's
/// certificate, or without TLS, is refused with a message that says so.
#[test]
fn a_tls_pair_replicates_and_refuses_other_certificates() {
    require("fio", "fio");
    require("openssl", "openssl");
    require("cmp", "diffutils");
    let _g = heavy();
    let dir = scratch();
    let pki = TestPki::generate(&dir.path().join("pki"));
    let key = key_file(dir.path(), "peer.key", PEER_SECRET);
    let tls = |cert: &Path, k: &Path, ca: &Path| {
        owned(&[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            k.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
        ])
    };
    let mut sflags = tls(&pki.server_cert(), &pki.server_key(), &pki.ca());
    sflags.extend(owned(&["--psk-file", key.to_str().unwrap()]));
    let mut pflags = tls(&pki.client_cert(), &pki.client_key(), &pki.ca());
    pflags.extend(owned(&[
        "--psk-file",
        key.to_str().unwrap(),
        "--checkpoint-interval",
        "100ms",
    ]));
    let (mut pair, _) = Pair::start_full(dir.path(), "64M", &pflags, &sflags, false);
    let mut fio = start_load(
        dir.path(),
        &rated(load_job(&pair.uri(), Some(5), 8, "64M", 4)),
    );
    fio_ok(&mut fio, "fio over a TLS link", &pair.logs());
    let v = status(&pair.p_sock).expect("status");
    assert_eq!(v["mode"].as_str(), Some("replicating"), "{v}");

    // Another primary: a certificate of another CA, then no TLS at all.
    let other = |flags: &[String]| pair.intruding_primary(dir.path(), "3s", flags);
    let (ok, _, err) = other(&tls(&pki.rogue_cert(), &pki.rogue_key(), &pki.ca()));
    assert!(!ok && err.contains("TLS"), "a rogue certificate: {err}");
    let (ok, _, err) = other(&owned(&["--psk-file", key.to_str().unwrap()]));
    assert!(!ok, "a primary without TLS started: {err}");
    assert!(
        pair.secondary.log_text().contains("TLS handshake"),
        "the secondary logged no refused handshake"
    );

    let logs = pair.logs();
    pair.stop_and_cmp("after replicating over TLS", &logs);
}
