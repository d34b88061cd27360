//! The test PKI of `lockstep_tests::tls` against real TLS peers, independent of lockstep:
//! nbdkit as the reference server, nbdinfo (libnbd, GnuTLS) and qemu-img (QEMU, GnuTLS) as
//! clients. If these fail, the credentials are wrong, not lockstep.

use std::path::Path;
use std::time::Duration;

use lockstep_tests::tls::TestPki;
use lockstep_tests::*;

const T: Duration = Duration::from_secs(30);

fn tools() {
    require("openssl", "openssl");
    require("nbdkit", "nbdkit");
    require("nbdinfo", "libnbd-bin");
    require("qemu-img", "qemu-utils");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// nbdkit serving 1 MiB of memory with TLS required, credentials from `certs`.
fn nbdkit(log_dir: &Path, certs: &Path, verify_peer: bool) -> (Daemon, u16) {
    let port = free_port();
    let certs = format!("--tls-certificates={}", s(certs));
    let port_s = port.to_string();
    let mut args = vec!["--tls=require", &certs];
    if verify_peer {
        args.push("--tls-verify-peer");
    }
    args.extend([
        "-p",
        &port_s,
        "-i",
        "127.0.0.1",
        "--exit-with-parent",
        "-f",
        "memory",
        "1M",
    ]);
    let mut d = Daemon::start("nbdkit", Path::new("nbdkit"), &args, log_dir);
    wait_port(&format!("127.0.0.1:{port}"), T, &mut d.child);
    (d, port)
}

/// libnbd URI for NBD over TLS with client credentials from `certs`.
fn nbds_uri(port: u16, certs: &Path) -> String {
    format!("nbds://127.0.0.1:{port}/?tls-certificates={}", s(certs))
}

/// `qemu-img info` over NBD with TLS, client credentials from `certs`; `extra` is appended to
/// the NBD block options (e.g. `,tls-hostname=...`).
fn qemu_img_info(port: u16, certs: &Path, extra: &str) -> Vec<String> {
    vec![
        "info".into(),
        "--output=json".into(),
        "--object".into(),
        format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(certs)),
        "--image-opts".into(),
        format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},tls-creds=tls0{extra}"
        ),
    ]
}

fn ok(program: &str, args: &[String]) -> String {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(program, &args, T)
}

/// Run a command that must fail; returns its stderr.
fn fails(program: &str, args: &[String]) -> String {
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run(program, &argv, T);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "`{program} {}` should have failed\nstdout:\n{}\nstderr:\n{stderr}",
        argv.join(" "),
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

fn pki() -> (tempfile::TempDir, TestPki) {
    let scratch = scratch();
    let dir = scratch.path().join("pki");
    std::fs::create_dir(&dir).expect("pki dir");
    let pki = TestPki::generate(&dir);
    (scratch, pki)
}

#[test]
fn pki_files_chains_and_purposes() {
    require("openssl", "openssl");
    let (_scratch, pki) = pki();
    for f in [
        pki.ca(),
        pki.server_cert(),
        pki.client_cert(),
        pki.rogue_ca(),
        pki.rogue_cert(),
    ] {
        let text = std::fs::read_to_string(&f).expect("read certificate");
        assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{f:?}");
    }
    for f in [
        pki.dir.join("ca-key.pem"),
        pki.server_key(),
        pki.client_key(),
        pki.rogue_key(),
    ] {
        let text = std::fs::read_to_string(&f).expect("read key");
        assert!(
            text.starts_with("-----BEGIN PRIVATE KEY-----"),
            "not PKCS#8: {f:?}"
        );
    }
    let ca = s(&pki.ca()).to_string();
    let v = |extra: &[&str], cert: &Path| {
        let mut args = vec!["verify", "-CAfile", &ca];
        args.extend_from_slice(extra);
        args.push(s(cert));
        run("openssl", &args, T).status.success()
    };
    let server = ["-purpose", "sslserver", "-verify_hostname", "localhost"];
    assert!(v(&server, &pki.server_cert()));
    assert!(v(
        &["-purpose", "sslserver", "-verify_ip", "127.0.0.1"],
        &pki.server_cert()
    ));
    assert!(v(&["-purpose", "sslclient"], &pki.server_cert()));
    assert!(v(&["-purpose", "sslclient"], &pki.client_cert()));
    assert!(!v(&["-purpose", "sslserver"], &pki.client_cert()));
    assert!(!v(&[], &pki.rogue_cert()));
    assert!(run_ok(
        "openssl",
        &[
            "verify",
            "-CAfile",
            s(&pki.rogue_ca()),
            "-purpose",
            "sslclient",
            s(&pki.rogue_cert())
        ],
        T
    )
    .contains("OK"));
}

#[test]
fn nbdkit_tls_with_nbdinfo_and_qemu_img() {
    tools();
    let (scratch, pki) = pki();
    let (_server, port) = nbdkit(scratch.path(), &pki.dir, false);

    let json = ok("nbdinfo", &["--json".into(), nbds_uri(port, &pki.dir)]);
    assert!(json.contains("\"TLS\": true"), "nbdinfo: {json}");
    assert!(json.contains("\"export-size\": 1048576"), "nbdinfo: {json}");

    let info = ok("qemu-img", &qemu_img_info(port, &pki.dir, ""));
    assert!(
        info.contains("\"virtual-size\": 1048576"),
        "qemu-img: {info}"
    );

    // TLS is required: a plain client gets nowhere.
    fails("nbdinfo", &[format!("nbd://127.0.0.1:{port}")]);

    // A client that trusts only the rogue CA refuses the server's certificate.
    let distrust = pki.client_dir_with("distrust", None, None, &[&pki.rogue_ca()]);
    let e = fails("nbdinfo", &[nbds_uri(port, &distrust)]);
    assert!(e.contains("certificate"), "nbdinfo: {e}");
    fails("qemu-img", &qemu_img_info(port, &distrust, ""));

    // QEMU checks the server's name against the certificate.
    let e = fails(
        "qemu-img",
        &qemu_img_info(port, &pki.dir, ",tls-hostname=example.com"),
    );
    assert!(e.contains("does not match the hostname"), "qemu-img: {e}");
}

#[test]
fn nbdkit_verify_peer_accepts_our_client_refuses_rogue() {
    tools();
    let (scratch, pki) = pki();
    let (server, port) = nbdkit(scratch.path(), &pki.dir, true);

    // Our client certificate, straight from the PKI directory, is accepted.
    ok("nbdinfo", &["--size".into(), nbds_uri(port, &pki.dir)]);
    let good = pki.client_dir_with(
        "good",
        Some(&pki.client_cert()),
        Some(&pki.client_key()),
        &[&pki.ca()],
    );
    ok("nbdinfo", &["--size".into(), nbds_uri(port, &good)]);
    ok("qemu-img", &qemu_img_info(port, &good, ""));
    assert!(!server.log_text().contains("gnutls_handshake"));

    // The rogue certificate is refused by the server (the client trusts the server).
    let rogue = pki.rogue_client_dir();
    fails("nbdinfo", &["--size".into(), nbds_uri(port, &rogue)]);
    fails("qemu-img", &qemu_img_info(port, &rogue, ""));
    // nbdkit may log just after the client saw the connection drop.
    let refused = |log: &str| {
        log.matches("gnutls_handshake: Error in the certificate")
            .count()
    };
    let start = std::time::Instant::now();
    while refused(&server.log_text()) < 2 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = server.log_text();
    assert_eq!(refused(&log), 2, "nbdkit log: {log}");

    // So is a client with no certificate at all.
    let anon = pki.client_dir_with("anonymous", None, None, &[&pki.ca()]);
    fails("nbdinfo", &["--size".into(), nbds_uri(port, &anon)]);
    fails("qemu-img", &qemu_img_info(port, &anon, ""));
}
