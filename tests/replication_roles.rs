//! Role changes an operator makes, with the real `lockstep` binary: a failover refused while
//! the primary still replicates and forced with `--force`; a primary that cannot bind its
//! export port failing before its secondary ever hears of it; a primary that starts with
//! no secondary, serves alone, and resyncs the secondary that appears later.

use std::net::TcpListener;
use std::time::Duration;

use lockstep_tests::control::{failover, lockstep, status, status_code, wait_status, T};
use lockstep_tests::images::assert_cmp_equal;
use lockstep_tests::pair::{ack_flags, primary_cmd, secondary_cmd, start_secondary, Pair};
use lockstep_tests::{free_port, lockstep_bin, owned, refs, require, run_ok, scratch, Daemon};

#[test]
fn failover_is_refused_while_the_primary_replicates_and_forced_with_force() {
    let dir = scratch();
    let mut pair = Pair::start(dir.path(), "16M", &ack_flags("received", "100ms"));
    let (ok, out, err) = failover(&pair.s_sock, "checkpoint", &[]);
    assert!(
        !ok,
        "failover while the primary replicates was accepted: {out}"
    );
    assert!(
        err.contains("--force") && err.contains("split brain"),
        "the refusal does not say why or how: {err}"
    );
    let v = status(&pair.p_sock).expect("primary status");
    assert_eq!(v["mode"], "replicating", "{v}\n{}", pair.logs());
    let v = status(&pair.s_sock).expect("secondary status");
    assert_eq!(v["mode"], "replicating", "{v}\n{}", pair.logs());

    let (ok, out, err) = failover(&pair.s_sock, "checkpoint", &["--force"]);
    assert!(ok, "forced failover failed: {err}{out}\n{}", pair.logs());
    assert_eq!(status(&pair.s_sock).expect("status")["mode"], "primary");
    // The old primary learns at once and, refused for good, calls itself unprotected.
    let v = pair.wait_primary(Duration::from_secs(20), |v| v["mode"] == "unprotected");
    let reason = v["unprotected_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("refused"), "{v}");
}

#[test]
fn a_primary_that_cannot_bind_its_export_fails_before_contacting_the_secondary() {
    let dir = scratch();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let s_sock = d.join("secondary.sock");
    let sargs = secondary_cmd(
        &d.join("s.img"),
        Some("16M"),
        &listen,
        &s_sock,
        None,
        &owned(&["--on-peer-loss", "failover"]),
    );
    let mut secondary = start_secondary(d, "secondary", &sargs, &s_sock);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let export = taken.local_addr().unwrap().to_string();
    let pargs = primary_cmd(
        &d.join("p.img"),
        Some("16M"),
        &export,
        &listen,
        &d.join("primary.sock"),
        &[],
    );
    let (ok, out, err) = lockstep(&refs(&pargs), T);
    assert!(!ok, "the primary started on a port in use: {out}{err}");
    assert!(err.contains("listening on"), "{err}");
    let v = status(&s_sock).expect("secondary status");
    assert_eq!(v["mode"], "waiting", "the secondary heard from it: {v}");
    assert!(v["failover"].is_null(), "{v}");
    assert!(secondary.stop(T).success());
}

#[test]
fn a_primary_without_its_secondary_serves_alone_and_resyncs_it_later() {
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let dir = scratch();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let export = format!("127.0.0.1:{}", free_port());
    let (p_img, s_img) = (d.join("p.img"), d.join("s.img"));
    let (p_sock, s_sock) = (d.join("primary.sock"), d.join("secondary.sock"));
    let pargs = primary_cmd(
        &p_img,
        Some("16M"),
        &export,
        &listen,
        &p_sock,
        &owned(&["--connect-timeout", "1s", "--checkpoint-interval", "100ms"]),
    );
    let mut primary = Daemon::start("primary", &lockstep_bin(), &refs(&pargs), d);
    let v = wait_status(&mut primary, &p_sock, T, "primary", |v| {
        v["mode"] == "unprotected"
    });
    let reason = v["unprotected_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("--connect-timeout"), "{v}");
    assert!(
        primary.log_text().contains("UNPROTECTED"),
        "the log does not say it loudly:\n{}",
        primary.log_text()
    );
    // Clients are served meanwhile.
    let uri = format!("nbd://{export}/lockstep");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 2M", &uri],
        T,
    );
    // The secondary appears; the primary finds it and sends what was written.
    let sargs = secondary_cmd(&s_img, Some("16M"), &listen, &s_sock, None, &[]);
    let mut secondary = start_secondary(d, "secondary", &sargs, &s_sock);
    let v = wait_status(
        &mut primary,
        &p_sock,
        Duration::from_secs(60),
        "primary",
        |v| v["mode"] == "replicating" && v["resync"]["state"] == "done",
    );
    let sent = v["resync"]["sent_bytes"].as_u64().unwrap_or(0);
    assert!(
        (2 << 20..=(2 << 20) + (1 << 20)).contains(&sent),
        "resync sent {sent} bytes for 2 MiB written: {v}"
    );
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xa5 5M 1M", &uri],
        T,
    );
    assert!(primary.stop(Duration::from_secs(60)).success());
    let logs = format!("{}\n{}", primary.log_text(), secondary.log_text());
    assert_cmp_equal(&p_img, &s_img, "after a late secondary", &logs);
    assert!(secondary.stop(T).success());
}

#[test]
fn a_primary_restarted_after_kill9_resyncs_incrementally_from_its_bitmap() {
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let dir = scratch();
    let mut pair = Pair::start(dir.path(), "64M", &ack_flags("received", "100ms"));
    pair.wait_synced(Duration::from_secs(30), 1);
    let uri = pair.uri();
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 8M", &uri],
        T,
    );
    let c0 = status(&pair.p_sock).unwrap()["committed_epoch"]
        .as_u64()
        .unwrap();
    pair.wait_primary(Duration::from_secs(20), |v| {
        v["committed_epoch"].as_u64() > Some(c0 + 1)
    });
    // 2 MiB more, 40 MiB away, then kill -9: some of it may not be committed yet.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x22 40M 2M", &uri],
        T,
    );
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait(T);
    let bitmap = format!("{}.lockstep-bitmap", pair.p_img.display());
    assert!(std::path::Path::new(&bitmap).exists(), "no {bitmap}");

    let pargs = primary_cmd(
        &pair.p_img,
        None,
        &pair.export,
        &pair.listen,
        &pair.p_sock,
        &ack_flags("received", "100ms"),
    );
    pair.primary = Daemon::start("primary2", &lockstep_bin(), &refs(&pargs), dir.path());
    let v = pair.wait_synced(Duration::from_secs(60), 1);
    eprintln!("resync after the restart: {}", v["resync"]);
    assert_eq!(v["resync"]["kind"], "incremental", "{v}\n{}", pair.logs());
    let sent = v["resync"]["sent_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        sent <= 2 << 20,
        "resync sent {sent} bytes; at most the 2 MiB of the last write were missing: {v}"
    );
    let compared = v["resync"]["compared_units"].as_u64().unwrap_or(0);
    assert!(
        compared < 64 << 8,
        "compared {compared} blocks of a 64 MiB disk: not incremental: {v}"
    );
    let logs = pair.logs();
    pair.stop_and_cmp("after a restart from the bitmap", &logs);
}

#[test]
fn a_pair_runs_from_one_resource_file() {
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let dir = scratch();
    let d = dir.path();
    let (p_img, s_img) = (d.join("a.img"), d.join("b.img"));
    let (p_sock, s_sock) = (d.join("a.sock"), d.join("b.sock"));
    let export = format!("127.0.0.1:{}", free_port());
    let file = d.join("r0.toml");
    let text = format!(
        r#"
[resource]
size = "16M"
checkpoint-interval = "100ms"
ack = "received"

[node.a]
address = "127.0.0.1:{pa}"
disk = "{pi}"
control = "{ps}"
export = "{export}"

[node.b]
address = "127.0.0.1:{pb}"
disk = "{si}"
control = "{ss}"
"#,
        pa = free_port(),
        pb = free_port(),
        pi = p_img.display(),
        ps = p_sock.display(),
        si = s_img.display(),
        ss = s_sock.display(),
    );
    std::fs::write(&file, &text).unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = lockstep(&["config", "check", f], T);
    assert!(ok, "config check: {err}{out}");
    assert!(
        out.contains("a as primary: lockstep primary") && out.contains("b as secondary:"),
        "{out}"
    );
    let mut secondary = start_secondary(
        d,
        "secondary",
        &owned(&["secondary", "--config", f, "--node", "b"]),
        &s_sock,
    );
    let mut primary = Daemon::start(
        "primary",
        &lockstep_bin(),
        &["primary", "--config", f, "--node", "a"],
        d,
    );
    wait_status(&mut primary, &p_sock, T, "primary", |v| {
        v["mode"] == "replicating" && v["resync"]["state"] == "done"
    });
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x66 3M 1M",
            &format!("nbd://{export}/lockstep"),
        ],
        T,
    );
    assert!(primary.stop(Duration::from_secs(60)).success());
    let logs = format!("{}\n{}", primary.log_text(), secondary.log_text());
    assert_cmp_equal(&p_img, &s_img, "a pair from a resource file", &logs);
    assert!(secondary.stop(T).success());

    // A typo is named, with its table.
    std::fs::write(&file, text.replace("ack =", "akc =")).unwrap();
    let (ok, _, err) = lockstep(&["config", "check", f], T);
    assert!(!ok && err.contains("[resource] akc"), "{err}");
}

#[test]
fn status_exit_codes_say_how_protected_each_node_is() {
    let dir = scratch();
    let mut flags = ack_flags("received", "100ms");
    flags.extend(owned(&["--reconnect-timeout", "1s"]));
    let mut pair = Pair::start(dir.path(), "16M", &flags);
    pair.wait_synced(Duration::from_secs(30), 1);
    let code = |sock: &std::path::Path| status_code(sock).expect("status").0;
    assert_eq!(code(&pair.p_sock), 0, "a synced primary is protected");
    let v = pair.wait_secondary(Duration::from_secs(10), "replicating");
    assert!(v["resyncing"].is_null(), "{v}");
    assert_eq!(code(&pair.s_sock), 0);
    // The secondary dies: the primary is paused (3), and gives up after
    // --reconnect-timeout (4).
    pair.secondary.signal(libc::SIGKILL);
    pair.secondary.wait(T);
    pair.wait_primary(Duration::from_secs(10), |v| v["mode"] == "paused");
    assert_eq!(code(&pair.p_sock), 3);
    pair.wait_primary(Duration::from_secs(10), |v| v["mode"] == "unprotected");
    assert_eq!(code(&pair.p_sock), 4);
    // Restarted without the buffer it kept in memory, the secondary has no checkpoint to
    // fail over to (5) until a primary resyncs it.
    pair.stop_primary_ok(Duration::from_secs(60), "an unprotected primary");
    pair.restart_secondary(dir.path(), "secondary2");
    pair.wait_secondary(Duration::from_secs(20), "waiting");
    let v = status(&pair.s_sock).expect("status");
    assert_eq!(v["consistent"], false, "{v}");
    assert_eq!(code(&pair.s_sock), 5);
}

/// The outage DRBD users know: both nodes were in sync, the primary's host restarts while
/// the secondary's is down. The primary comes up alone, serves, and when the secondary
/// returns resyncs only what was written meanwhile (from its on-disk bitmap).
#[test]
fn a_primary_restarted_alone_resyncs_its_returning_secondary_incrementally() {
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let dir = scratch();
    let mut pair = Pair::start(dir.path(), "64M", &ack_flags("received", "100ms"));
    pair.wait_synced(Duration::from_secs(30), 1);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 16M", &pair.uri()],
        T,
    );
    pair.stop_primary_ok(Duration::from_secs(60), "the first primary");
    pair.stop_secondary_ok(T, "the secondary");

    let mut flags = ack_flags("received", "100ms");
    flags.extend(owned(&["--connect-timeout", "1s"]));
    let pargs = primary_cmd(
        &pair.p_img,
        None,
        &pair.export,
        &pair.listen,
        &pair.p_sock,
        &flags,
    );
    pair.primary = Daemon::start("primary2", &lockstep_bin(), &refs(&pargs), dir.path());
    pair.wait_primary(T, |v| v["mode"] == "unprotected");
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x77 32M 1M", &pair.uri()],
        T,
    );
    pair.restart_secondary(dir.path(), "secondary2");
    let v = pair.wait_synced(Duration::from_secs(60), 1);
    let r = &v["resync"];
    assert_eq!(r["kind"], "incremental", "{v}\n{}", pair.logs());
    assert_eq!(
        r["sent_bytes"].as_u64(),
        Some(1 << 20),
        "only the megabyte written alone travels: {v}"
    );
    let logs = pair.logs();
    pair.stop_and_cmp(
        "after an incremental resync of a primary that started alone",
        &logs,
    );
}
