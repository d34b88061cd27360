//! `lockstep export` with TLS (NBD_OPT_STARTTLS) against the real clients: nbdinfo (libnbd)
//! and qemu-img/qemu-io (QEMU), both GnuTLS, with the test PKI of `lockstep_tests::tls`
//! (checked against nbdkit in tls_pki.rs).

use std::path::Path;
use std::time::Duration;

use lockstep_tests::tls::TestPki;
use lockstep_tests::*;

const T: Duration = Duration::from_secs(60);

fn tools() {
    require("openssl", "openssl");
    require("nbdinfo", "libnbd-bin");
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn nbds(addr: &str, name: &str, certs: &Path) -> String {
    format!("nbds://{addr}/{name}?tls-certificates={}", s(certs))
}

fn qemu_creds(certs: &Path) -> String {
    format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(certs))
}

fn qemu_target(addr: &str, name: &str) -> String {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    format!("driver=nbd,server.type=inet,server.host={host},server.port={port},export={name},tls-creds=tls0")
}

fn export_tls(dir: &Path, pki: &TestPki, disk: &Path, extra: &[&str]) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let (cert, key, ca) = (pki.server_cert(), pki.server_key(), pki.ca());
    let mut args = vec![
        "--disk",
        s(disk),
        "--size",
        "8M",
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--tls-ca",
        s(&ca),
    ];
    args.extend_from_slice(extra);
    let d = Daemon::export(dir, &args, &addr);
    (d, addr)
}

#[test]
fn starttls_export_serves_nbdinfo_and_qemu_and_refuses_plain_clients() {
    tools();
    let dir = scratch();
    let pki = TestPki::generate(&dir.path().join("pki"));
    let disk = dir.path().join("disk.img");
    let (d, addr) = export_tls(dir.path(), &pki, &disk, &[]);

    // nbdinfo over TLS sees the export and says TLS is on.
    let info = run_ok("nbdinfo", &["--json", &nbds(&addr, "disk", &pki.dir)], T);
    assert!(
        info.contains("\"TLS\": true") && info.contains("8388608"),
        "nbdinfo: {info}"
    );
    // qemu-io writes a pattern over TLS, qemu-img reads it back over TLS.
    let src = dir.path().join("src.raw");
    random_file(&src, 8 << 20, 7);
    let creds = qemu_creds(&pki.dir);
    let target = qemu_target(&addr, "disk");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "--object",
            &creds,
            "-f",
            "raw",
            s(&src),
            "--target-image-opts",
            &target,
        ],
        T,
    );
    let back = dir.path().join("back.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &creds,
            "--image-opts",
            &target,
            "-O",
            "raw",
            s(&back),
        ],
        T,
    );
    assert!(
        std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(),
        "the data read back over TLS differs"
    );
    // Plain clients learn nothing: no export list, no size, no data.
    let plain = format!("nbd://{addr}/disk");
    let out = run("nbdinfo", &[&plain], T);
    assert!(!out.status.success(), "plain nbdinfo was served");
    let out = run("nbdinfo", &["--list", &format!("nbd://{addr}")], T);
    assert!(!out.status.success(), "plain nbdinfo --list was served");
    let out = run("qemu-img", &["info", &plain], T);
    assert!(!out.status.success(), "plain qemu-img was served");
    // A client that does not trust our CA refuses the server.
    let rogue_only = pki.client_dir_with("rogue-trust", None, None, &[&pki.rogue_ca()]);
    let out = run("nbdinfo", &[&nbds(&addr, "disk", &rogue_only)], T);
    assert!(
        !out.status.success(),
        "a client trusting another CA connected"
    );
    let log = d.log_text();
    assert!(log.contains("TLS required"), "{log}");
    drop(d);
}

#[test]
fn tls_verify_peer_accepts_our_clients_and_refuses_others() {
    tools();
    let dir = scratch();
    let pki = TestPki::generate(&dir.path().join("pki"));
    let disk = dir.path().join("disk.img");
    let (d, addr) = export_tls(dir.path(), &pki, &disk, &["--tls-verify-peer"]);
    // The PKI directory presents client-cert.pem of our CA.
    run_ok("nbdinfo", &["--size", &nbds(&addr, "disk", &pki.dir)], T);
    let creds = qemu_creds(&pki.dir);
    run_ok(
        "qemu-img",
        &[
            "info",
            "--object",
            &creds,
            "--image-opts",
            &qemu_target(&addr, "disk"),
        ],
        T,
    );
    // Another CA's certificate, and no certificate at all, are refused by the server.
    let rogue = pki.rogue_client_dir();
    let out = run("nbdinfo", &["--size", &nbds(&addr, "disk", &rogue)], T);
    assert!(
        !out.status.success(),
        "a rogue client certificate was accepted"
    );
    let none = pki.client_dir_with("no-cert", None, None, &[&pki.ca()]);
    let out = run("nbdinfo", &["--size", &nbds(&addr, "disk", &none)], T);
    assert!(
        !out.status.success(),
        "a client without a certificate was accepted"
    );
    let log = d.log_text();
    assert!(
        log.contains("TLS handshake"),
        "the server logged no refusal: {log}"
    );
}

#[test]
fn tls_flag_mistakes_are_clear_errors() {
    let dir = scratch();
    let disk = dir.path().join("d.img");
    let missing = dir.path().join("missing.pem");
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &[
            "export",
            "--disk",
            s(&disk),
            "--size",
            "1M",
            "--tls-cert",
            s(&missing),
            "--tls-key",
            s(&missing),
        ],
        T,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("missing.pem"),
        "{err}"
    );
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &[
            "export",
            "--disk",
            s(&disk),
            "--size",
            "1M",
            "--tls-verify-peer",
        ],
        T,
    );
    assert!(!out.status.success(), "--tls-verify-peer without --tls-ca");
}
