//! The Pacemaker resource agent `contrib/ocf/lockstep` (`ocf:lockstep:lockstep`, a
//! promotable clone) against real daemons on unix sockets:
//!
//! * `ocf-tester` (Debian's resource-agents) passes: meta-data against ra-api-1.dtd, probes,
//!   start, monitor, promote (a secondary nobody feeds becomes `lockstep primary` replicating
//!   to a peer secondary), demote (back to a secondary after the primary's last checkpoint
//!   and GOODBYE), repeated and idempotent actions, stop;
//! * promote is refused while a live primary replicates to the secondary (both nodes from one
//!   resource file, `--config FILE --node %node%`), and after that
//!   primary is killed (-9) it fails the secondary over: role primary, monitor 8; the promoted
//!   daemon killed in turn makes monitor say 9 (failed promoted);
//! * demote and promote of a node that failed over re-protect it: it restarts as a primary
//!   that resyncs the old primary's disk, now a secondary.
//!
//! The agent starts daemons in sessions of their own: every daemon it started is killed by
//! the pid in its state directory when a test ends, however it ends.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lockstep_tests::control::{control_status, tail, wait_status};
use lockstep_tests::pair::{primary_cmd, secondary_cmd, start_secondary};
use lockstep_tests::{lockstep_bin, refs, require, scratch, Daemon};

/// The agent in the repository.
fn agent_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("contrib/ocf/lockstep")
}

/// One node's resource: the agent's parameters for a disk, its sockets and the peer's
/// listen socket.
struct Node {
    dir: PathBuf,
    params: Vec<(String, String)>,
}

impl Node {
    fn new(root: &Path, name: &str, peer_listen: &str, extra: &[(&str, &str)]) -> Node {
        let dir = root.join(name);
        let disk = root.join(format!("{name}.img"));
        let listen = root.join(format!("{name}-listen.sock"));
        let export = root.join(format!("{name}-export.sock"));
        let (disk, listen, export) = (disk.display(), listen.display(), export.display());
        let mut params = vec![
            (
                "binary".into(),
                lockstep_bin().to_str().unwrap().to_string(),
            ),
            ("state_dir".into(), dir.to_str().unwrap().to_string()),
            (
                "secondary_args".into(),
                format!("--disk {disk} --size 8M --listen unix:{listen} --export unix:{export}"),
            ),
            (
                "primary_args".into(),
                format!(
                    "--disk {disk} --size 8M --export unix:{export} --secondary {peer_listen} \
                     --connect-timeout 10s --checkpoint-interval 100ms"
                ),
            ),
        ];
        for (k, v) in extra {
            params.push((k.to_string(), v.to_string()));
        }
        Node { dir, params }
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    /// The pid of the daemon the agent started, if any.
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("lockstep.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Run `agent ACTION` as Pacemaker would (OCF_ROOT, OCF_RESKEY_*, a 60 s operation
    /// timeout); returns its exit code and output.
    fn run(&self, action: &str) -> (i32, String) {
        let log = self.dir.with_extension(format!("{action}.out"));
        let f = std::fs::File::create(&log).unwrap();
        let mut c = Command::new(agent_src());
        c.arg(action)
            .env("OCF_ROOT", "/usr/lib/ocf")
            .env("OCF_RESOURCE_INSTANCE", "lockstep-test")
            .env("OCF_RESKEY_CRM_meta_timeout", "60000")
            .env(
                "OCF_RESKEY_CRM_meta_interval",
                if action == "monitor" { "10000" } else { "0" },
            )
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .process_group(0);
        for (k, v) in &self.params {
            c.env(format!("OCF_RESKEY_{k}"), v);
        }
        let mut child = c.spawn().expect("run the agent");
        let start = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > Duration::from_secs(90) {
                // SAFETY: kill(2) of the process group the agent leads (its daemons have
                // sessions of their own and are killed by `Drop`).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                panic!("agent {action} did not finish in 90 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = std::fs::read_to_string(&log).unwrap_or_default();
        (st.code().unwrap_or(-1), out)
    }

    /// `agent ACTION`, which must exit with `want`.
    fn expect(&self, action: &str, want: i32) -> String {
        let (rc, out) = self.run(action);
        assert_eq!(
            rc,
            want,
            "agent {action}: {out}\ndaemon log:\n{}",
            self.log_tail()
        );
        out
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("lockstep.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "lockstep" {
                // SAFETY: kill(2) of a daemon this test's agent started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A scratch directory every user can traverse (ocf-tester runs meta-data as `nobody`).
fn open_scratch() -> tempfile::TempDir {
    let dir = scratch();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_PROMOTED: i32 = 8;
const OCF_FAILED_PROMOTED: i32 = 9;

#[test]
fn ocf_tester_passes_with_a_real_peer() {
    require("ocf-tester", "resource-agents");
    let mode = std::fs::metadata(agent_src()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "contrib/ocf/lockstep should be 755");
    let root = open_scratch();
    let r = root.path();
    // The peer: a plain secondary the agent's primary replicates to.
    let b_listen = format!("unix:{}", r.join("b-listen.sock").display());
    let b_sock = r.join("b.sock");
    let bargs = secondary_cmd(&r.join("b.img"), Some("8M"), &b_listen, &b_sock, None, &[]);
    let mut peer = start_secondary(r, "peer", &bargs, &b_sock);
    // One configuration for both nodes: %self% and %peer% from `nodes`, as in a cluster.
    let a_listen = format!("unix:{}", r.join("a-listen.sock").display());
    let nodes = format!("node-a={a_listen} node-b={b_listen}");
    let mut node = Node::new(
        r,
        "a",
        "%peer%",
        &[("nodes", &nodes), ("node_name", "node-a")],
    );
    for (k, v) in node.params.iter_mut() {
        if k == "secondary_args" {
            *v = v.replace(&a_listen, "%self%");
            assert!(v.contains("%self%"), "{v}");
        }
    }
    let agent = r.join("lockstep-agent");
    std::fs::copy(agent_src(), &agent).unwrap();
    let mut args = vec!["-n".to_string(), "lockstep".into()];
    for (k, v) in &node.params {
        args.push("-o".into());
        args.push(format!("{k}={v}"));
    }
    args.push(agent.to_str().unwrap().into());
    let out = lockstep_tests::run("ocf-tester", &refs(&args), Duration::from_secs(600));
    let text = lockstep_tests::output_text(&out);
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed:\n{text}\nagent's daemon log:\n{}\npeer log:\n{}",
        node.log_tail(),
        tail(&peer, 30)
    );
    // The agent promoted and demoted several times: its primary really replicated.
    let log = std::fs::read_to_string(node.dir.join("lockstep.log")).unwrap();
    assert!(log.contains("ready: primary (replicating)"), "{log}");
    assert!(node.pid().is_none(), "the agent's daemon outlived its stop");
    let st = control_status(&b_sock, Duration::from_secs(10)).expect("peer answers");
    assert_eq!(st["consistent"], true, "{st}");
    assert!(peer.child.try_wait().unwrap().is_none(), "peer died");
}

#[test]
fn promote_is_refused_while_the_primary_lives_and_fails_over_once_it_is_killed() {
    let root = open_scratch();
    let r = root.path();
    // Both nodes from one resource file (`--config FILE --node NAME`): node-b under the
    // agent (`--node %node%`), node-a a plain primary replicating to it.
    let config = r.join("r0.toml");
    let node = |n: &str| {
        let at = |f: &str| r.join(format!("{n}{f}")).display().to_string();
        format!(
            "[node.node-{n}]\naddress = \"unix:{}\"\ndisk = \"{}\"\nexport = \"unix:{}\"\n",
            at("-listen.sock"),
            at(".img"),
            at("-export.sock")
        )
    };
    let text = format!(
        "[resource]\nsize = \"8M\"\ncheckpoint-interval = \"100ms\"\n\n{}\n{}",
        node("a"),
        node("b")
    );
    std::fs::write(&config, text).unwrap();
    let flags = format!("--config {} --node %node%", config.display());
    let mut b = Node::new(
        r,
        "b",
        "-",
        &[("peer_loss_wait", "2"), ("node_name", "node-b")],
    );
    for (k, v) in b.params.iter_mut() {
        if k == "secondary_args" || k == "primary_args" {
            v.clone_from(&flags);
        }
    }
    b.expect("monitor", OCF_NOT_RUNNING);
    b.expect("start", OCF_SUCCESS);
    b.expect("monitor", OCF_SUCCESS);
    let p_sock = r.join("a.sock");
    let pargs = [
        "primary",
        "--config",
        config.to_str().unwrap(),
        "--node",
        "node-a",
        "--control",
        p_sock.to_str().unwrap(),
    ]
    .map(String::from);
    let mut primary = Daemon::start("primary", &lockstep_bin(), &refs(&pargs), r);
    wait_status(
        &mut primary,
        &p_sock,
        Duration::from_secs(60),
        "primary",
        |v| v["mode"] == "replicating" && v["committed_epoch"].as_u64() >= Some(2),
    );

    // Two writable nodes are never made by the agent.
    let out = b.expect("promote", OCF_ERR_GENERIC);
    assert!(out.contains("live primary"), "{out}");
    b.expect("monitor", OCF_SUCCESS);

    primary.signal(libc::SIGKILL);
    primary.wait(Duration::from_secs(10));
    b.expect("promote", OCF_SUCCESS);
    b.expect("monitor", OCF_RUNNING_PROMOTED);
    let st = control_status(&b.control(), Duration::from_secs(10)).unwrap();
    assert_eq!(st["role"], "primary", "{st}");
    b.expect("promote", OCF_SUCCESS);

    // The promoted daemon dies: failed promoted, until stopped.
    let pid = b.pid().expect("the agent's pid file");
    // SAFETY: kill(2) of the daemon the agent started for this test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(format!("/proc/{pid}/stat")).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    b.expect("monitor", OCF_FAILED_PROMOTED);
    b.expect("stop", OCF_SUCCESS);
    b.expect("monitor", OCF_NOT_RUNNING);
}

#[test]
fn demote_and_promote_of_a_failed_over_node_re_protect_it() {
    let root = open_scratch();
    let r = root.path();
    let a_listen = format!("unix:{}", r.join("a-listen.sock").display());
    let b_listen = format!("unix:{}", r.join("b-listen.sock").display());
    let b = Node::new(r, "b", &a_listen, &[("peer_loss_wait", "5")]);
    b.expect("start", OCF_SUCCESS);
    let export = format!("unix:{}", r.join("a-export.sock").display());
    let p_sock = r.join("a.sock");
    let a_img = r.join("a.img");
    let pargs = primary_cmd(&a_img, Some("8M"), &export, &b_listen, &p_sock, &[]);
    let mut primary = Daemon::start("primary", &lockstep_bin(), &refs(&pargs), r);
    wait_status(
        &mut primary,
        &p_sock,
        Duration::from_secs(60),
        "primary",
        |v| v["mode"] == "replicating" && v["committed_epoch"].as_u64() >= Some(1),
    );
    primary.signal(libc::SIGKILL);
    primary.wait(Duration::from_secs(10));
    b.expect("promote", OCF_SUCCESS);
    let st = control_status(&b.control(), Duration::from_secs(10)).unwrap();
    assert_eq!(st["mode"], "primary", "failed over: {st}");

    // Demote keeps b's newer disk (b restarts as a secondary): the old primary, with older
    // data, cannot become b's primary.
    b.expect("demote", OCF_SUCCESS);
    b.expect("monitor", OCF_SUCCESS);
    let mut again = pargs.clone();
    again.extend(["--connect-timeout".to_string(), "5s".into()]);
    let out = lockstep_tests::run(
        lockstep_bin().to_str().unwrap(),
        &refs(&again),
        Duration::from_secs(60),
    );
    let err = lockstep_tests::output_text(&out);
    assert!(
        !out.status.success() && err.contains("newer data"),
        "the old primary was not refused: {err}"
    );
    b.expect("monitor", OCF_SUCCESS);

    // The old primary's node comes back unpromoted: a secondary on its own disk. Promote
    // restarts b as a primary, which resyncs the old primary's disk.
    let s_sock = r.join("a-sec.sock");
    let sargs = secondary_cmd(&a_img, None, &a_listen, &s_sock, None, &[]);
    let mut old = start_secondary(r, "old-primary", &sargs, &s_sock);
    b.expect("promote", OCF_SUCCESS);
    b.expect("monitor", OCF_RUNNING_PROMOTED);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = control_status(&b.control(), Duration::from_secs(10)).unwrap();
        let o = control_status(&s_sock, Duration::from_secs(10)).unwrap();
        if st["mode"] == "replicating" && o["consistent"] == true && o["mode"] == "replicating" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not re-protected: {st}\nold primary: {o}\n{}",
            tail(&old, 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(old.child.try_wait().unwrap().is_none());
    b.expect("demote", OCF_SUCCESS);
    b.expect("stop", OCF_SUCCESS);
    old.stop(Duration::from_secs(30));
}

#[test]
fn validate_all_refuses_bad_parameters() {
    const OCF_ERR_INSTALLED: i32 = 5;
    const OCF_ERR_CONFIGURED: i32 = 6;
    let root = open_scratch();
    let r = root.path();
    let ok = Node::new(r, "v", "unix:/nonexistent", &[]);
    ok.expect("validate-all", OCF_SUCCESS);
    for (k, v, want, says) in [
        ("failover_to", "newest", OCF_ERR_CONFIGURED, "failover_to"),
        ("nodes", "x=1 y=2", OCF_ERR_CONFIGURED, "not in nodes"),
        ("nodes", "node-a=1", OCF_ERR_CONFIGURED, "two nodes"),
        (
            "primary_args",
            "--disk d --control c",
            OCF_ERR_CONFIGURED,
            "control",
        ),
        ("peer_loss_wait", "5s", OCF_ERR_CONFIGURED, "peer_loss_wait"),
        (
            "binary",
            "/nonexistent/lockstep",
            OCF_ERR_INSTALLED,
            "not an executable",
        ),
    ] {
        let mut n = Node::new(r, "v", "unix:/nonexistent", &[("node_name", "node-a")]);
        n.params.retain(|(name, _)| name != k);
        n.params.push((k.into(), v.into()));
        let out = n.expect("validate-all", want);
        assert!(out.contains(says), "{k}={v}: {out}");
    }
}

#[test]
fn promote_without_a_reachable_peer_fails_unless_promote_alone() {
    let root = open_scratch();
    let r = root.path();
    let nobody = format!("unix:{}", r.join("nobody-listens.sock").display());
    let mut b = Node::new(r, "b", &nobody, &[]);
    for (k, v) in b.params.iter_mut() {
        if k == "primary_args" {
            *v = v.replace("--connect-timeout 10s", "--connect-timeout 2s");
        }
    }
    b.expect("start", OCF_SUCCESS);
    // A secondary no primary feeds becomes a primary only with its peer's secondary.
    let out = b.expect("promote", OCF_ERR_GENERIC);
    assert!(out.contains("cannot start as primary"), "{out}");
    b.expect("monitor", OCF_SUCCESS);
    // promote_alone: a primary serving alone, unprotected.
    b.params.push(("promote_alone".into(), "true".into()));
    b.expect("promote", OCF_SUCCESS);
    b.expect("monitor", OCF_RUNNING_PROMOTED);
    let st = control_status(&b.control(), Duration::from_secs(10)).unwrap();
    assert_eq!(st["role"], "primary", "{st}");
    assert_eq!(st["mode"], "unprotected", "{st}");
    b.expect("stop", OCF_SUCCESS);
    b.expect("monitor", OCF_NOT_RUNNING);
}

#[test]
fn the_agent_is_posix_shell_that_shellcheck_accepts() {
    require("shellcheck", "shellcheck");
    let agent = agent_src();
    let agent = agent.to_str().unwrap();
    let out = lockstep_tests::run("sh", &["-n", agent], Duration::from_secs(30));
    assert!(
        out.status.success(),
        "{}",
        lockstep_tests::output_text(&out)
    );
    let out = lockstep_tests::run("shellcheck", &["-s", "sh", agent], Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        lockstep_tests::output_text(&out)
    );
}
