//! Network namespaces for end-to-end tests, deleted when dropped (also on a panic), and
//! commands run in them. Names carry the test process's id and a counter, so that concurrent
//! and crashed runs never collide.

use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{require, run, run_ok, Daemon};

/// A short name unique to this process and call: `ls` + the pid in hex + a counter (at most
/// 12 characters, so that a suffix still makes a valid interface name).
pub fn unique_id() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "ls{:x}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fail loudly unless the test runs as root with `ip` at hand.
pub fn require_root() {
    require("ip", "iproute2");
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test creates network namespaces and TAP interfaces: run it as root"
    );
}

/// A network namespace, deleted on drop (its processes must be gone first: drop them earlier).
#[derive(Debug)]
pub struct Netns {
    /// Its name.
    pub name: String,
}

impl Netns {
    /// Create `name`, with its loopback up.
    pub fn new(name: &str) -> Netns {
        run_ok("ip", &["netns", "add", name], Duration::from_secs(10));
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS…`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        run_ok("ip", &a, Duration::from_secs(10))
    }

    /// `ip netns exec NS PROGRAM ARGS…` to completion within `deadline` (not checked).
    pub fn exec(&self, program: &str, args: &[&str], deadline: Duration) -> Output {
        let mut a = vec!["netns", "exec", &self.name, program];
        a.extend_from_slice(args);
        run("ip", &a, deadline)
    }

    /// As [`Netns::exec`], asserting success; stdout as text.
    pub fn exec_ok(&self, program: &str, args: &[&str], deadline: Duration) -> String {
        let mut a = vec!["netns", "exec", &self.name, program];
        a.extend_from_slice(args);
        run_ok("ip", &a, deadline)
    }

    /// Start a background process in the namespace (`ip netns exec` execs it: the pid is the
    /// program's, and dropping the [`Daemon`] kills it).
    pub fn spawn(&self, name: &str, program: &str, args: &[&str], dir: &Path) -> Daemon {
        let mut a = vec!["netns", "exec", &self.name, program];
        a.extend_from_slice(args);
        Daemon::start(name, Path::new("ip"), &a, dir)
    }

    /// Disable IPv6 for interfaces created or moved here from now on, and for those already
    /// here (no router or neighbour solicitations, no DAD).
    pub fn no_ipv6(&self) {
        self.exec_ok(
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            Duration::from_secs(10),
        );
    }

    /// Run `probe` in the namespace until its stdout contains `want`; panics after `deadline`
    /// (with `log` in the message) or if `d` exits first.
    pub fn wait_for(&self, d: &mut Daemon, probe: &[&str], want: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            let out = self.exec(probe[0], &probe[1..], Duration::from_secs(10));
            if String::from_utf8_lossy(&out.stdout).contains(want) {
                return;
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("{probe:?}: the process exited with {st}: {}", d.log_text());
            }
            assert!(
                start.elapsed() < deadline,
                "{probe:?} in {}: no {want:?} within {deadline:?}: {out:?}\n{}",
                self.name,
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = run("ip", &["netns", "del", &self.name], Duration::from_secs(10));
        if !out.status.success() {
            eprintln!(
                "ip netns del {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
