//! The `lockstep` CLI as an operator runs it against a pair, before and after a failover:
//! what `verify`, `checkpoint`, `status` and `set` print and exit with on each role, what
//! `nbdinfo` lists and describes on each port, `status | head -1` without a panic, and logs
//! without colour codes or Rust debug output.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_tests::control::{failover, lockstep, status, T};
use lockstep_tests::pair::{ack_flags, Pair};
use lockstep_tests::{lockstep_bin, require, run, run_ok, scratch};

/// `lockstep ARGS…` whose stdout is closed before it prints: it must end without a panic
/// (SIGPIPE, or an exit that says nothing of a broken pipe).
fn reader_gone(args: &[&str]) {
    let mut child = Command::new(lockstep_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lockstep");
    // The reader goes away before the daemon has answered.
    drop(child.stdout.take());
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > T {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "`lockstep {}` did not end without its reader",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "`lockstep {}` ({st}): {err}",
        args.join(" ")
    );
    use std::os::unix::process::ExitStatusExt;
    // `status` answers by its exit code too (3, 4, 5: not protected).
    assert!(
        matches!(st.code(), Some(0 | 3 | 4 | 5)) || st.signal() == Some(libc::SIGPIPE),
        "`lockstep {}` ended with {st}: {err}",
        args.join(" ")
    );
}

/// `lockstep status --control SOCK | head -1` as a shell runs it: one line, no panic.
fn status_head(sock: &Path) {
    let line = format!(
        "{} status --control {} | head -1; {} status --json --control {} | head -1",
        lockstep_bin().display(),
        sock.display(),
        lockstep_bin().display(),
        sock.display()
    );
    let out = run("sh", &["-c", &line], T);
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success() && e.is_empty(), "{line}: {o}\n{e}");
    assert_eq!(o.lines().count(), 2, "{o}");
}

/// `nbdinfo ARGS… URI` (with a deadline).
fn nbdinfo(args: &[&str]) -> String {
    run_ok("nbdinfo", args, T)
}

/// Log lines must read as text: no colour codes (stderr is a file), no Debug formatting.
fn readable_log(name: &str, log: &str) {
    assert!(
        !log.contains('\u{1b}'),
        "{name} log has colour codes:\n{log}"
    );
    for bad in ["Some(", "None,", "Report {", " { "] {
        assert!(
            !log.contains(bad),
            "{name} log has debug output ({bad:?}):\n{log}"
        );
    }
}

#[test]
fn every_command_answers_for_the_role_it_finds() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    let dir = scratch();
    let mut pair = Pair::start(dir.path(), "16M", &ack_flags("received", "100ms"));
    let (p, s) = (
        pair.p_sock.to_str().unwrap().to_string(),
        pair.s_sock.to_str().unwrap().to_string(),
    );

    // The replication port lists no export, and the primary still reaches its own by name
    // (it replicates); a client asking by name is served too.
    let listen = format!("nbd://{}", pair.listen);
    let list = nbdinfo(&["--list", &listen]);
    assert!(!list.contains("lockstep-replica"), "{list}");
    let by_name = nbdinfo(&["--size", &format!("{listen}/lockstep-replica")]);
    assert_eq!(by_name.trim(), (16u64 << 20).to_string());
    // Ports of clients list theirs.
    let list = nbdinfo(&["--list", &format!("nbd://{}", pair.export)]);
    assert!(list.contains("export=\"lockstep\""), "{list}");
    let info = nbdinfo(&[&pair.s_uri()]);
    assert!(info.contains("description: lockstep secondary"), "{info}");

    // The primary: set, verify, status | head.
    let (ok, out, err) = lockstep(&["set", "--control", &p, "checkpoint-interval", "200ms"], T);
    assert!(
        ok && out.contains("checkpoint-interval set to 200ms"),
        "{out}{err}"
    );
    let (ok, _, err) = lockstep(&["set", "--control", &p, "checkpoint-interval", "200"], T);
    assert!(!ok && err.contains("200ms"), "{err}");
    let (ok, out, err) = lockstep(&["verify", "--control", &p], T);
    assert!(
        ok && out.contains(": 0 differ"),
        "{out}{err}\n{}",
        pair.logs()
    );
    status_head(&pair.p_sock);
    reader_gone(&["status", "--json", "--control", &p]);

    // The secondary before a failover: checkpoints and verify are the primary's.
    let (ok, _, err) = lockstep(&["checkpoint", "--control", &s], T);
    assert!(!ok && err.contains("run by the primary"), "{err}");
    let (ok, _, err) = lockstep(&["verify", "--control", &s], T);
    assert!(!ok && err.contains("runs on the primary"), "{err}");
    let (ok, _, err) = lockstep(&["set", "--control", &s, "checkpoint-bytes", "1M"], T);
    assert!(!ok && err.contains("the primary's"), "{err}");

    // kill -9 of the primary; the secondary notices (an error it shows), then fails over.
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait(Duration::from_secs(10));
    pair.wait_secondary(Duration::from_secs(15), "paused");
    let before = status(&pair.s_sock).unwrap();
    assert!(before["last_error"].is_string(), "{before}");
    let (ok, out, err) = failover(&pair.s_sock, "checkpoint", &[]);
    assert!(ok, "{out}{err}\n{}", pair.logs());

    let (ok, _, err) = failover(&pair.s_sock, "latest", &[]);
    assert!(!ok && err.contains("already failed over"), "{err}");

    // verify: the digest check the daemon did, as it answered.
    let (ok, out, err) = lockstep(&["verify", "--control", &s], T);
    assert!(
        ok && out.contains("the disk equals checkpoint"),
        "{out}{err}"
    );
    assert!(!out.contains("differ"), "{out}");
    let (ok, out, _) = lockstep(&["verify", "--json", "--control", &s], T);
    assert!(ok && out.contains("\"comparable\": true"), "{out}");

    // checkpoint: this node took over; no secondary; how to re-protect.
    let (ok, _, err) = lockstep(&["checkpoint", "--control", &s], T);
    assert!(!ok, "{err}");
    assert!(
        err.contains("took over")
            && err.contains("no secondary")
            && err.contains("docs/operations.md"),
        "{err}"
    );
    assert!(!err.contains("run by the primary"), "{err}");

    // status: the rows of a primary without a secondary, no stale error.
    let out = run(
        lockstep_bin().to_str().unwrap(),
        &["status", "--control", &s],
        T,
    );
    let (code, err) = (out.status.code(), String::from_utf8_lossy(&out.stderr));
    assert_eq!(code, Some(4), "a failed-over node is unprotected: {err}");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.starts_with("role                   primary\n"), "{out}");
    assert!(
        out.contains("unprotected") && out.contains("failed over"),
        "{out}"
    );
    for row in [
        "buffer",
        "forwarded",
        "epoch-mark stall",
        "checkpoints",
        "consistent",
    ] {
        assert!(
            !out.lines().any(|l| l.starts_with(row)),
            "a secondary's row {row:?} after failover:\n{out}"
        );
    }
    assert!(out.contains("last error             -\n"), "{out}");
    assert!(!out.contains("--on-peer-loss failover"), "{out}");
    status_head(&pair.s_sock);
    reader_gone(&["status", "--control", &s]);

    // The export describes the role.
    let info = nbdinfo(&[&pair.s_uri()]);
    assert!(
        info.contains("description: lockstep primary (failed over"),
        "{info}"
    );

    // Written after the failover: a difference verify expects, and says so.
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 0 64k", &pair.s_uri()],
        T,
    );
    let (ok, out, err) = lockstep(&["verify", "--control", &s], T);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("as expected") && out.contains("written since the failover"),
        "{out}"
    );

    readable_log("primary", &pair.primary.log_text());
    readable_log("secondary", &pair.secondary.log_text());
}

/// Endpoints as NBD URIs: `export --listen nbd+unix:///?socket=…` serves there, logs the
/// export's URI with its name in the path, and that URI works as it is; `--listen nbd://…`
/// likewise; a secondary's `--listen :PORT` is every address, refused without a key.
#[test]
fn endpoints_are_nbd_uris_in_and_out() {
    require("nbdinfo", "libnbd-bin");
    let dir = scratch();
    let disk = dir.path().join("a.img");
    let sock = dir.path().join("e.sock");
    let listen = format!("nbd+unix:///?socket={}", sock.display());
    let args = [
        "export",
        "--disk",
        disk.to_str().unwrap(),
        "--size",
        "1.5M",
        "--listen",
        &listen,
    ];
    let mut d = lockstep_tests::Daemon::start("export-unix", &lockstep_bin(), &args, dir.path());
    let start = Instant::now();
    let uri = loop {
        let log = d.log_text();
        if let Some(i) = log.find("nbd+unix:///") {
            let uri: String = log[i..].split_whitespace().next().unwrap().into();
            if sock.exists() {
                break uri;
            }
        }
        assert!(start.elapsed() < T, "no export URI in the log:\n{log}");
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!("export exited ({st}):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(uri, format!("nbd+unix:///a?socket={}", sock.display()));
    assert!(
        d.log_text().contains("1.5 MiB (1572864 bytes)"),
        "{}",
        d.log_text()
    );
    assert_eq!(nbdinfo(&["--size", &uri]).trim(), "1572864");
    d.stop(Duration::from_secs(20));

    let port = lockstep_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let listen = format!("nbd://{addr}");
    let args = [
        "export",
        "--disk",
        disk.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    let mut d = lockstep_tests::Daemon::start("export-tcp", &lockstep_bin(), &args, dir.path());
    lockstep_tests::wait_port(&addr, T, &mut d.child);
    assert_eq!(
        nbdinfo(&["--size", &format!("nbd://{addr}/a")]).trim(),
        "1572864"
    );
    d.stop(Duration::from_secs(20));

    let s_sock = dir.path().join("s.sock");
    let (ok, _, err) = lockstep(
        &[
            "secondary",
            "--disk",
            dir.path().join("s.img").to_str().unwrap(),
            "--size",
            "1M",
            "--listen",
            &format!(":{}", lockstep_tests::free_port()),
            "--control",
            s_sock.to_str().unwrap(),
        ],
        T,
    );
    assert!(
        !ok && err.contains("refusing to listen on 0.0.0.0:") && err.contains("--psk-file"),
        "{err}"
    );
}
