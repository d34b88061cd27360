//! Shared-memory regions replicated with the disk (memrep through `lockstep --memory`), with
//! real processes only: a `lockstep secondary` and a `lockstep primary` each with a region file
//! in /dev/shm, and `lockstep-memwriter` writing the region (and block 0 of the disk, through
//! the primary's NBD export) and handing over its userfaultfd.
//!
//! * crash trials: kill -9 the primary, fail over to the checkpoint; memory and disk hold the
//!   same counter, and the region is exactly the writer's pattern at that counter;
//! * link cuts (through the [`CutProxy`]) during pre-send and around a requested checkpoint;
//! * a secondary killed and restarted: the resync is by page digest, only what changed;
//! * bad input: regions of different sizes, a writer that never hands over, bad hand-overs,
//!   a region file unlinked or truncated under the primary.
//!
//! Every random choice comes from one seed printed at the start of each test; set
//! `LOCKSTEP_TEST_SEED` to replay a run.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use lockstep_tests::control::{
    checkpoint, control, control_status, failover, lockstep, parse_json, tail, wait_status, T,
};
use lockstep_tests::images::first_difference;
use lockstep_tests::memwriter::{expected_region, read_header, PAGE};
use lockstep_tests::pair::{primary_cmd, secondary_cmd, start_secondary};
use lockstep_tests::proxy::CutProxy;
use lockstep_tests::trials::{trials, Rng};
use lockstep_tests::{free_port, heavy, lockstep_bin, owned, refs, scratch, sleep_ms, Daemon};
use memrep::region::Region;

const DISK: &str = "16M";
const MIB: u64 = 1 << 20;

/// A region file in /dev/shm with a name of its own, removed on drop.
struct ShmFile {
    path: PathBuf,
}

impl ShmFile {
    fn new(name: &str, len: u64) -> ShmFile {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = PathBuf::from(format!(
            "/dev/shm/lockstep-e2e-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let f = File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f.set_len(len).expect("set_len");
        ShmFile { path }
    }

    fn s(&self) -> &str {
        self.path.to_str().expect("utf-8")
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn memwriter() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lockstep-memwriter"))
}

/// The region's participant in a status answer.
fn mem(v: &Value) -> &Value {
    &v["participants"]["memory0"]
}

fn u(v: &Value, k: &str) -> u64 {
    mem(v)[k].as_u64().unwrap_or(0)
}

/// How the pair is set up.
struct Opts {
    p_len: u64,
    s_len: u64,
    /// `writer=SOCKET` on the primary's region.
    writer_socket: bool,
    via_proxy: bool,
    extra_primary: Vec<String>,
}

impl Opts {
    fn new(len: u64) -> Opts {
        Opts {
            p_len: len,
            s_len: len,
            writer_socket: true,
            via_proxy: false,
            extra_primary: Vec::new(),
        }
    }
}

/// A secondary and a primary, each with a region, and maybe a writer. Dropped in field order:
/// the writer first (it may stand paused by the primary), then the primary, the secondary, the
/// proxy, the region files and the directory.
struct MemPair {
    writer: Option<Daemon>,
    primary: Option<Daemon>,
    secondary: Daemon,
    proxy: Option<CutProxy>,
    p_region: ShmFile,
    s_region: ShmFile,
    p_img: PathBuf,
    s_img: PathBuf,
    p_sock: PathBuf,
    s_sock: PathBuf,
    w_sock: PathBuf,
    export: String,
    listen: String,
    dir: tempfile::TempDir,
}

impl MemPair {
    /// Start the secondary (waiting for a primary) and, unless `start_primary` is false, the
    /// primary replicating to it.
    fn start(o: &Opts, start_primary: bool) -> MemPair {
        let dir = scratch();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        let p_region = ShmFile::new("p", o.p_len);
        let s_region = ShmFile::new("s", o.s_len);
        let listen = format!("127.0.0.1:{}", free_port());
        let s_img = d.join("secondary.img");
        let s_sock = d.join("secondary.sock");
        let secondary = start_secondary(
            d,
            "secondary",
            &secondary_args(&s_img, &listen, &s_sock, &s_region),
            &s_sock,
        );
        let mut p = MemPair {
            writer: None,
            primary: None,
            secondary,
            proxy: None,
            p_img: d.join("primary.img"),
            s_img,
            p_sock: d.join("primary.sock"),
            s_sock,
            w_sock: d.join("writer.sock"),
            export: format!("127.0.0.1:{}", free_port()),
            listen,
            p_region,
            s_region,
            dir,
        };
        p.proxy = o.via_proxy.then(|| CutProxy::start(&p.listen));
        if start_primary {
            let args = p.primary_args(o);
            let mut primary = Daemon::start("primary", &lockstep_bin(), &refs(&args), d);
            let v = wait_status(
                &mut primary,
                &p.p_sock,
                Duration::from_secs(40),
                "primary",
                |v| v["mode"].is_string() && !mem(v).is_null(),
            );
            assert_eq!(v["mode"], "replicating", "{v}");
            p.primary = Some(primary);
        }
        p
    }

    fn primary_args(&self, o: &Opts) -> Vec<String> {
        let target = self
            .proxy
            .as_ref()
            .map_or(self.listen.clone(), |x| x.addr.clone());
        let region = if o.writer_socket {
            format!("{},writer={}", self.p_region.s(), self.w_sock.display())
        } else {
            self.p_region.s().to_string()
        };
        let mut extra = owned(&["--memory", &region, "--checkpoint-interval", "100ms"]);
        extra.extend(o.extra_primary.iter().cloned());
        primary_cmd(
            &self.p_img,
            Some(DISK),
            &self.export,
            &target,
            &self.p_sock,
            &extra,
        )
    }

    /// Start the secondary again on the same files and addresses.
    fn restart_secondary(&mut self, name: &str) {
        let args = secondary_args(&self.s_img, &self.listen, &self.s_sock, &self.s_region);
        self.secondary = Daemon::start(name, &lockstep_bin(), &refs(&args), self.dir.path());
    }

    fn primary(&mut self) -> &mut Daemon {
        self.primary.as_mut().expect("a primary")
    }

    fn pages(&self) -> u64 {
        std::fs::metadata(&self.p_region.path).expect("region").len() / PAGE as u64
    }

    /// Start `lockstep-memwriter --region R ARGS…` and wait for its READY.
    fn start_writer(&mut self, name: &str, region: &Path, args: &[&str]) -> Daemon {
        let mut a = vec!["--region", region.to_str().unwrap()];
        a.extend_from_slice(args);
        let mut w = Daemon::start(name, memwriter(), &a, self.dir.path());
        let start = Instant::now();
        loop {
            if w.log_text().contains("READY") {
                return w;
            }
            if let Ok(Some(st)) = w.child.try_wait() {
                panic!(
                    "{name} exited with {st} before READY:\n{}\n{}",
                    w.log_text(),
                    self.logs()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name} not READY within 20 s:\n{}\n{}",
                w.log_text(),
                self.logs()
            );
            sleep_ms(10);
        }
    }

    /// The counter writer: hands over on the writer socket, writes block 0 through the export.
    fn start_counter_writer(&mut self) {
        let (r, s, e) = (
            self.p_region.path.clone(),
            self.w_sock.clone(),
            self.export.clone(),
        );
        let w = self.start_writer(
            "memwriter",
            &r,
            &["--handover", s.to_str().unwrap(), "--nbd", &e],
        );
        self.writer = Some(w);
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        if let Some(p) = &self.primary {
            s += &format!("--- primary log (tail):\n{}\n", tail(p, 40));
        }
        s += &format!("--- secondary log (tail):\n{}\n", tail(&self.secondary, 40));
        if let Some(w) = &self.writer {
            s += &format!("--- writer log (tail):\n{}\n", tail(w, 10));
        }
        s
    }

    fn p_status(&self) -> Value {
        control_status(&self.p_sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("primary status: {e}\n{}", self.logs()))
    }

    /// Wait until the primary's status satisfies `ready`.
    fn wait_primary(&mut self, deadline: Duration, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
        let sock = self.p_sock.clone();
        wait_status(self.primary(), &sock, deadline, what, ready)
    }

    /// Wait until the region's committed epoch passes `n`.
    fn wait_mem_committed(&mut self, n: u64) -> Value {
        self.wait_primary(Duration::from_secs(30), "primary (region committed)", |v| {
            u(v, "committed_epoch") > n
        })
    }

    /// Wait for the writer's hand-over, then for three committed checkpoints after it.
    fn wait_uffd_and_commits(&mut self) -> Value {
        let v = self.wait_primary(Duration::from_secs(20), "primary (uffd)", |v| {
            mem(v)["tracker"] == "uffd"
        });
        self.wait_mem_committed(u(&v, "committed_epoch") + 2)
    }

    /// Kill the writer (its last state is whatever it wrote).
    fn kill_writer(&mut self) {
        if let Some(w) = &mut self.writer {
            w.signal(libc::SIGKILL);
            w.wait(Duration::from_secs(10));
        }
    }

    /// Request checkpoints until the region's committed epoch is one opened after now (nothing
    /// writes any more), then both regions must be equal byte for byte and the disks' block 0.
    fn final_checkpoint_and_compare(&mut self, what: &str) -> String {
        let epoch = u(&self.p_status(), "epoch");
        let start = Instant::now();
        loop {
            let _ = checkpoint(&self.p_sock);
            let v = self.p_status();
            if u(&v, "committed_epoch") >= epoch {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: no checkpoint of the region committed after the writer stopped: {v}\n{}",
                self.logs()
            );
            sleep_ms(50);
        }
        let p = std::fs::read(&self.p_region.path).expect("primary region");
        let s = std::fs::read(&self.s_region.path).expect("secondary region");
        if let Some(at) = first_difference(&p, &s) {
            panic!(
                "{what}: the regions differ at byte {at} (page {}): primary {}, secondary {}\nprimary status: {}\n{}",
                at / PAGE,
                mem(&self.p_status()),
                mem(&control_status(&self.s_sock, T).unwrap_or_default()),
                self.p_status(),
                self.logs()
            );
        }
        let (pb, sb) = (block0(&self.p_img), block0(&self.s_img));
        assert!(
            pb == sb,
            "{what}: the disks' block 0 differ: primary counter {:?}, secondary {:?}\n{}",
            read_header(&pb),
            read_header(&sb),
            self.logs()
        );
        format!(
            "regions equal ({} pages), block 0 counter {:?}",
            p.len() / PAGE,
            read_header(&pb)
        )
    }
}

fn secondary_args(img: &Path, listen: &str, sock: &Path, region: &ShmFile) -> Vec<String> {
    secondary_cmd(
        img,
        Some(DISK),
        listen,
        sock,
        None,
        &owned(&["--memory", region.s()]),
    )
}

fn block0(path: &Path) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_exact_at(&mut b, 0)
        .expect("read block 0");
    b
}

/// Fill a region file with deterministic bytes (every page non-zero).
fn fill_region(path: &Path, seed: u64) {
    let len = std::fs::metadata(path).expect("region").len() as usize;
    lockstep_tests::random_file(path, len, seed);
}

// ---------------------------------------------------------------------------------------------
// 1. Crash trials.

fn crash_trial(rng: &mut Rng) -> String {
    let len = rng.pick(&[8, 12, 16]) * MIB;
    let run_ms = rng.range(300, 2000);
    let params = format!("region {} MiB, kill after {run_ms} ms", len / MIB);
    let mut p = MemPair::start(&Opts::new(len), true);
    p.start_counter_writer();
    let before = p.wait_uffd_and_commits();
    sleep_ms(run_ms);
    if let Ok(Some(st)) = p.writer.as_mut().unwrap().child.try_wait() {
        panic!("[{params}] the writer exited ({st}) before the kill:\n{}", p.logs());
    }
    let at_kill = p.p_status();
    p.primary().signal(libc::SIGKILL);
    p.primary().wait(Duration::from_secs(10));
    p.kill_writer();
    let (ok, out, err) = failover(&p.s_sock, "checkpoint", &["--json"]);
    assert!(ok, "[{params}] failover failed:\n{out}\n{err}\n{}", p.logs());
    let fv = parse_json(&out).unwrap_or_else(|e| panic!("[{params}] {e}"));
    let disk = read_header(&block0(&p.s_img));
    let region = std::fs::read(&p.s_region.path).expect("region");
    let mem_c = read_header(&region[..PAGE]);
    let primary_c = read_header(&std::fs::read(&p.p_region.path).expect("region")[..PAGE]);
    let ctx = format!(
        "[{params}] after failover: disk counter {disk:?}, region counter {mem_c:?} (the dead primary's region: {primary_c:?}); failover {fv}; primary's region status at the kill {}; before {}\n{}",
        mem(&at_kill),
        mem(&before),
        p.logs()
    );
    assert!(
        mem_c.is_some() && mem_c > Some(0),
        "no counter in the region: {ctx}"
    );
    assert_eq!(disk, mem_c, "disk and memory disagree: {ctx}");
    let c = mem_c.unwrap();
    assert!(primary_c >= Some(c), "the secondary is ahead: {ctx}");
    let want = expected_region(len / PAGE as u64, c);
    if let Some(at) = first_difference(&want, &region) {
        panic!(
            "the region is not the writer's pattern at counter {c}: first difference at byte {at} (page {}): {ctx}",
            at / PAGE
        );
    }
    format!(
        "{params}: counter {c} in memory and on disk (primary was at {primary_c:?}), committed epoch {}",
        fv["committed_epoch"]
    )
}

#[test]
fn crash_of_the_primary_fails_over_to_memory_and_disk_of_the_same_checkpoint() {
    let _g = heavy();
    trials(
        "crash_of_the_primary_fails_over_to_memory_and_disk_of_the_same_checkpoint",
        20,
        |_, rng| crash_trial(rng),
    );
}
