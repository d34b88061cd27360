//! Running under systemd: `contrib/systemd/lockstep-{primary,secondary}@.service` pass
//! `systemd-analyze verify` (with the binary path pointed at the binary under test: verify
//! demands an executable ExecStart, and systemd is not PID 1 here), and the daemons speak the
//! sd_notify protocol: `READY=1` (with `STATUS=` and `MAINPID=`) on `$NOTIFY_SOCKET` once
//! their control socket answers, a primary's only when it replicates, `STOPPING=1` on
//! SIGTERM; `--pid-file` exists while they serve and is removed when they exit. `export` and
//! `netcmp` notify too.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lockstep_tests::control::{control_status, tail};
use lockstep_tests::pair::{primary_cmd, secondary_cmd};
use lockstep_tests::{free_port, lockstep_bin, refs, require, run, scratch, Daemon};

/// The repository's `contrib/systemd`.
fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("contrib/systemd")
}

/// `systemd-analyze verify` of an instance `NAME@r0.service` of the template `text`, written
/// with its `/usr/bin/lockstep` replaced by the binary under test; returns (success, stderr).
fn verify_unit(dir: &Path, name: &str, text: &str) -> (bool, String) {
    let bin = lockstep_bin();
    let template = dir.join(format!("{name}@.service"));
    std::fs::write(
        &template,
        text.replace("/usr/bin/lockstep", bin.to_str().unwrap()),
    )
    .unwrap();
    let instance = dir.join(format!("{name}@r0.service"));
    let _ = std::fs::remove_file(&instance);
    std::os::unix::fs::symlink(&template, &instance).unwrap();
    let out = run(
        "systemd-analyze",
        &["verify", instance.to_str().unwrap()],
        Duration::from_secs(60),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn units_pass_systemd_analyze_verify() {
    require("systemd-analyze", "systemd");
    let dir = scratch();
    for role in ["primary", "secondary"] {
        let name = format!("lockstep-{role}");
        let text = std::fs::read_to_string(units_dir().join(format!("{name}@.service")))
            .expect("unit file");
        assert!(text.contains("Type=notify"), "{name}: not Type=notify");
        assert!(
            text.contains(&format!("ExecStart=/usr/bin/lockstep {role} ")),
            "{name}: ExecStart"
        );
        let (ok, stderr) = verify_unit(dir.path(), &name, &text);
        // verify exits 0 on settings it ignores: any message is a failure.
        assert!(
            ok && stderr.trim().is_empty(),
            "{name}: systemd-analyze verify: {stderr}"
        );
    }
    // The check notices a broken unit (it prints the problem, exit status or not).
    let text = std::fs::read_to_string(units_dir().join("lockstep-primary@.service")).unwrap();
    let broken = text.replace("Type=notify", "Type=notifx");
    let (_, stderr) = verify_unit(dir.path(), "lockstep-broken", &broken);
    assert!(
        stderr.contains("notifx"),
        "a broken unit passed: {stderr:?}"
    );
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    sock: UnixDatagram,
    /// The value for `NOTIFY_SOCKET`.
    env: String,
}

impl NotifySocket {
    fn bind_path(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        Self {
            sock,
            env: path.to_str().unwrap().into(),
        }
    }

    fn bind_abstract(name: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Self {
            sock: UnixDatagram::bind_addr(&addr).expect("bind abstract notify socket"),
            env: format!("@{name}"),
        }
    }

    /// The next message, or None after `deadline`.
    fn recv(&self, deadline: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(deadline)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("notify socket: {e}"),
        }
    }

    /// Wait for a message with the line `line`, checking `d` is alive; returns the message.
    fn expect(&self, d: &mut Daemon, line: &str, deadline: Duration) -> String {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Some(m) = self.recv(Duration::from_millis(200)) {
                if m.lines().any(|l| l == line) {
                    return m;
                }
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("exited with {st} before {line}; log:\n{}", tail(d, 40));
            }
        }
        panic!("no {line} within {deadline:?}; log:\n{}", tail(d, 40));
    }
}

/// The value of `KEY=` in an sd_notify message.
fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// At READY=1: the control socket answers, MAINPID is the daemon, the pid file says so.
fn check_ready(d: &Daemon, msg: &str, sock: &Path, pid_file: &Path) -> serde_json::Value {
    let st = control_status(sock, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("READY=1 but the control socket does not answer: {e}"));
    assert_eq!(
        field(msg, "MAINPID"),
        Some(d.pid().to_string().as_str()),
        "{msg}"
    );
    assert!(field(msg, "STATUS").is_some_and(|s| !s.is_empty()), "{msg}");
    let written = std::fs::read_to_string(pid_file).expect("pid file after READY=1");
    assert_eq!(written.trim(), d.pid().to_string());
    st
}

/// SIGTERM: STOPPING=1, a clean exit, the pid file gone.
fn check_stop(d: &mut Daemon, n: &NotifySocket, pid_file: &Path) {
    d.signal(libc::SIGTERM);
    n.expect(d, "STOPPING=1", Duration::from_secs(30));
    let st = d.wait(Duration::from_secs(90));
    assert!(st.success(), "exit {st}; log:\n{}", tail(d, 40));
    assert!(!pid_file.exists(), "pid file left after a clean exit");
}

#[test]
fn daemons_notify_ready_and_stopping_and_keep_a_pid_file() {
    let dir = scratch();
    let p = dir.path();
    let bin = lockstep_bin();
    let (s_sock, p_sock) = (p.join("s.sock"), p.join("p.sock"));
    let (s_pid, p_pid) = (p.join("s.pid"), p.join("p.pid"));
    let listen = format!("unix:{}", p.join("listen.sock").display());
    let export = format!("unix:{}", p.join("export.sock").display());

    // The secondary notifies a path socket.
    let ns = NotifySocket::bind_path(&p.join("notify-s.sock"));
    let mut sargs = secondary_cmd(&p.join("s.img"), Some("8M"), &listen, &s_sock, None, &[]);
    sargs.extend(["--pid-file".to_string(), s_pid.to_str().unwrap().into()]);
    let env = [("NOTIFY_SOCKET", ns.env.as_str())];
    let mut sec = Daemon::start_env("secondary", &bin, &refs(&sargs), p, &env);
    let msg = ns.expect(&mut sec, "READY=1", Duration::from_secs(30));
    let st = check_ready(&sec, &msg, &s_sock, &s_pid);
    assert_eq!(st["mode"], "waiting", "{st}");

    // The primary an abstract one; it is ready only once it replicates.
    let np = NotifySocket::bind_abstract(&format!("lockstep-test-notify-{}", std::process::id()));
    let mut pargs = primary_cmd(&p.join("p.img"), Some("8M"), &export, &listen, &p_sock, &[]);
    pargs.extend(["--pid-file".to_string(), p_pid.to_str().unwrap().into()]);
    let env = [("NOTIFY_SOCKET", np.env.as_str())];
    let mut pri = Daemon::start_env("primary", &bin, &refs(&pargs), p, &env);
    let msg = np.expect(&mut pri, "READY=1", Duration::from_secs(60));
    let st = check_ready(&pri, &msg, &p_sock, &p_pid);
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["mode"], "replicating", "{st}");

    // A second daemon given a pid file that names a running lockstep is refused.
    let mut again = pargs.clone();
    let at = again.iter().position(|a| a == "--control").unwrap() + 1;
    again[at] = p.join("p2.sock").to_str().unwrap().into();
    let out = run(
        bin.to_str().unwrap(),
        &refs(&again),
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--pid-file") && err.contains("is running"),
        "{err}"
    );

    check_stop(&mut pri, &np, &p_pid);
    check_stop(&mut sec, &ns, &s_pid);
}

#[test]
fn export_and_netcmp_notify_ready_and_stopping() {
    let dir = scratch();
    let p = dir.path();
    let bin = lockstep_bin();

    // export: ready when it listens, with a pid file.
    let n = NotifySocket::bind_path(&p.join("notify-e.sock"));
    let pid_file = p.join("e.pid");
    let listen = format!("127.0.0.1:{}", free_port());
    let disk = p.join("e.img");
    let args = [
        "export",
        "--disk",
        disk.to_str().unwrap(),
        "--size",
        "1M",
        "--listen",
        &listen,
        "--pid-file",
        pid_file.to_str().unwrap(),
    ];
    let env = [("NOTIFY_SOCKET", n.env.as_str())];
    let mut e = Daemon::start_env("export", &bin, &args, p, &env);
    let msg = n.expect(&mut e, "READY=1", Duration::from_secs(30));
    assert_eq!(field(&msg, "MAINPID"), Some(e.pid().to_string().as_str()));
    std::net::TcpStream::connect(&listen).expect("READY=1 before the export listens");
    let written = std::fs::read_to_string(&pid_file).expect("pid file after READY=1");
    assert_eq!(written.trim(), e.pid().to_string());
    check_stop(&mut e, &n, &pid_file);

    // netcmp (stream proxy): ready when its port and control socket are bound.
    let n = NotifySocket::bind_path(&p.join("notify-n.sock"));
    let listen = format!("127.0.0.1:{}", free_port());
    let (pri, sec) = (free_port(), free_port());
    let sock = p.join("netcmp.sock");
    let args = [
        "netcmp",
        "--listen",
        &listen,
        "--primary",
        &format!("127.0.0.1:{pri}"),
        "--secondary",
        &format!("127.0.0.1:{sec}"),
        "--socket",
        sock.to_str().unwrap(),
    ]
    .map(String::from);
    let env = [("NOTIFY_SOCKET", n.env.as_str())];
    let mut c = Daemon::start_env("netcmp", &bin, &refs(&args), p, &env);
    n.expect(&mut c, "READY=1", Duration::from_secs(30));
    std::net::TcpStream::connect(&listen).expect("READY=1 before netcmp listens");
    let st = control_status(&sock, Duration::from_secs(5)).expect("netcmp's socket answers");
    assert_eq!(st["role"], "netcmp", "{st}");
    c.signal(libc::SIGTERM);
    n.expect(&mut c, "STOPPING=1", Duration::from_secs(30));
    assert!(c.wait(Duration::from_secs(30)).success());
}

/// A primary whose secondary does not answer is ready once it decides to serve alone.
#[test]
fn a_primary_serving_alone_is_ready_and_says_unprotected() {
    let dir = scratch();
    let p = dir.path();
    let n = NotifySocket::bind_path(&p.join("notify.sock"));
    let sock = p.join("p.sock");
    let nobody = format!("unix:{}", p.join("nobody.sock").display());
    let export = format!("unix:{}", p.join("export.sock").display());
    let mut args = primary_cmd(&p.join("p.img"), Some("8M"), &export, &nobody, &sock, &[]);
    args.extend(["--connect-timeout".to_string(), "1s".into()]);
    let env = [("NOTIFY_SOCKET", n.env.as_str())];
    let mut d = Daemon::start_env("primary", &lockstep_bin(), &refs(&args), p, &env);
    let msg = n.expect(&mut d, "READY=1", Duration::from_secs(30));
    assert!(
        field(&msg, "STATUS").is_some_and(|s| s.contains("unprotected")),
        "{msg}"
    );
    let st = control_status(&sock, Duration::from_secs(5)).expect("status at READY=1");
    assert_eq!(st["mode"], "unprotected", "{st}");
    d.signal(libc::SIGTERM);
    n.expect(&mut d, "STOPPING=1", Duration::from_secs(30));
    assert!(d.wait(Duration::from_secs(60)).success());
}
