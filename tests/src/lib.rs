//! Harness for lockstep's end-to-end tests: start real processes, bound every wait, kill by pid.
//!
//! The tests use the `lockstep` binary named by `LOCKSTEP_BIN`, else the newest of
//! `target/release/lockstep` and `target/debug/lockstep`. `tests/run-all` builds it first.
//! A missing tool or binary fails the test loudly: nothing here skips.

pub mod control;
pub mod fio;
pub mod guest;
pub mod images;
pub mod mempair;
pub mod memwriter;
pub mod netns;
pub mod netpair;
pub mod packetlab;
pub mod pair;
pub mod proxy;
pub mod qmp;
pub mod security;
pub mod tls;
pub mod trials;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Heavy tests (fio, big copies) run one at a time even when the harness runs tests in
/// parallel: the machine has two cores shared by daemons, clients and the test runner.
pub fn heavy() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Path of the lockstep binary under test.
pub fn lockstep_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOCKSTEP_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "LOCKSTEP_BIN={} does not exist", p.display());
        return p;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("target");
    let newest = ["release", "debug"]
        .iter()
        .map(|p| root.join(p).join("lockstep"))
        .filter_map(|p| p.metadata().and_then(|m| m.modified()).ok().map(|t| (t, p)))
        .max();
    match newest {
        Some((_, p)) => p,
        None => panic!("no lockstep binary: run `cargo build -p lockstep-cli` (or tests/run-all) first, or set LOCKSTEP_BIN"),
    }
}

/// Fail loudly if an external tool is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "required tool `{tool}` is missing: install the Debian package `{package}` (tests/run-all does)");
}

/// A free TCP port on loopback for a daemon a test starts.
///
/// Ports come from below the kernel's ephemeral range, so the outgoing connections that
/// tests and daemons make (whose source ports the kernel picks from that range) can never
/// take a port between our probe and the daemon's own bind. Each test process walks the
/// range from its own starting point and never hands out a port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u32>().ok())
        })
        .unwrap_or(32768);
    let (low, high) = (10_000u32, ephemeral_low.clamp(12_000, 65_536));
    let span = high - low;
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        std::process::id().wrapping_mul(7919).wrapping_add(nanos)
    });
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + start.wrapping_add(n) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// Poll until `addr` accepts TCP connections, or panic after `deadline`.
pub fn wait_port(addr: &str, deadline: Duration, child: &mut Child) {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("process exited with {st} before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listening on {addr} after {deadline:?}");
}

/// A background process killed (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Where its stderr goes.
    pub log: PathBuf,
    name: String,
}

impl Daemon {
    /// Start `program args…`, stderr to a log file in `dir`.
    pub fn start(name: &str, program: &Path, args: &[&str], dir: &Path) -> Self {
        Self::start_env(name, program, args, dir, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_env(
        name: &str,
        program: &Path,
        args: &[&str],
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self {
            child,
            log,
            name: name.into(),
        }
    }

    /// Start `lockstep export` serving on `addr` (TCP) and wait until it listens.
    pub fn export(dir: &Path, args: &[&str], addr: &str) -> Self {
        let mut all = vec!["export", "--listen", addr];
        all.extend_from_slice(args);
        let mut d = Self::start("lockstep-export", &lockstep_bin(), &all, dir);
        wait_port(addr, Duration::from_secs(15), &mut d.child);
        d
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a pid we started and have not reaped; touches no memory.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for exit with a deadline; panics (after SIGKILL) if it does not come.
    pub fn wait(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            if start.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {deadline:?}; log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait for the exit (see [`Daemon::wait`]).
    pub fn stop(&mut self, deadline: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(deadline)
    }

    /// Everything the process printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Run a command to completion within `deadline`; returns its output (not checked). The
/// command runs in a process group of its own, killed whole when the deadline passes.
pub fn run(program: &str, args: &[&str], deadline: Duration) -> Output {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(program)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if start.elapsed() > deadline {
            // SAFETY: kill(2) with the negated pid of the group this child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "`{program} {}` did not finish within {deadline:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// Run a command and assert it succeeded; returns stdout as text.
pub fn run_ok(program: &str, args: &[&str], deadline: Duration) -> String {
    let out = run(program, args, deadline);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{program} {}` failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A file of `size` bytes of deterministic pseudo-random data.
pub fn random_file(path: &Path, size: usize, seed: u64) {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(size);
    while v.len() < size {
        // xorshift64*: fast, deterministic, incompressible enough for our purposes.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(size);
    std::fs::write(path, v).expect("write random file");
}

/// A scratch directory on a disk-backed filesystem (O_DIRECT and hole punching work there).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lockstep-e2e")
        .tempdir_in("/var/tmp")
        .expect("scratch dir")
}

/// Sleep for `ms` milliseconds.
pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Owned copies of string arguments (to extend a command line with computed ones).
pub fn owned(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Borrowed views of owned arguments, for [`Daemon::start`] and [`run`].
pub fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// What a finished command printed, stdout then stderr, as text.
pub fn output_text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Copy a whole NBD export (`nbd://…`) to the raw file `dest` with `qemu-img convert`.
pub fn read_export(uri: &str, dest: &Path, deadline: Duration) {
    let dest = dest.to_str().expect("utf-8 path");
    run_ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", uri, dest],
        deadline,
    );
}
