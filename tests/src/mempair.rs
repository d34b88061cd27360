//! The harness of the memory replication tests (`tests/memory_replication.rs`,
//! `tests/memory_library.rs`): region files in /dev/shm, a secondary and a primary with
//! `--memory`, the `lockstep-memwriter` writer, and reading what they leave behind.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control::{checkpoint, control_status, tail, wait_status, T};
use crate::images::first_difference;
use crate::memwriter::{read_header, PAGE};
use crate::pair::{primary_cmd, secondary_cmd, start_secondary};
use crate::proxy::CutProxy;
use crate::{free_port, lockstep_bin, owned, refs, scratch, sleep_ms, Daemon};

pub const DISK: &str = "16M";
pub const MIB: u64 = 1 << 20;

/// A region file in /dev/shm with a name of its own, removed on drop.
#[derive(Debug)]
pub struct ShmFile {
    pub path: PathBuf,
}

impl ShmFile {
    pub fn new(name: &str, len: u64) -> ShmFile {
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

    pub fn s(&self) -> &str {
        self.path.to_str().expect("utf-8")
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `lockstep-memwriter` that cargo built with the test running now (the test binary
/// lives in `target/PROFILE/deps`, the package's binaries in `target/PROFILE`).
pub fn memwriter() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let w = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/PROFILE/deps")
        .join("lockstep-memwriter");
    assert!(w.is_file(), "{} is not built", w.display());
    w
}

/// The region's participant in a status answer.
pub fn mem(v: &Value) -> &Value {
    &v["participants"]["memory0"]
}

pub fn u(v: &Value, k: &str) -> u64 {
    mem(v)[k].as_u64().unwrap_or(0)
}

/// How the pair is set up.
#[derive(Debug)]
pub struct Opts {
    pub p_len: u64,
    pub s_len: u64,
    /// `writer=SOCKET` on the primary's region.
    pub writer_socket: bool,
    pub via_proxy: bool,
    pub extra_primary: Vec<String>,
}

impl Opts {
    pub fn new(len: u64) -> Opts {
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
#[derive(Debug)]
pub struct MemPair {
    pub writer: Option<Daemon>,
    pub primary: Option<Daemon>,
    pub secondary: Daemon,
    pub proxy: Option<CutProxy>,
    pub p_region: ShmFile,
    pub s_region: ShmFile,
    pub p_img: PathBuf,
    pub s_img: PathBuf,
    pub p_sock: PathBuf,
    pub s_sock: PathBuf,
    pub w_sock: PathBuf,
    pub export: String,
    pub listen: String,
    pub dir: tempfile::TempDir,
}

impl MemPair {
    /// Start the secondary (waiting for a primary) and, unless `start_primary` is false, the
    /// primary replicating to it.
    pub fn start(o: &Opts, start_primary: bool) -> MemPair {
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
            p.start_primary(o);
        }
        p
    }

    /// Start the primary and wait until it replicates.
    pub fn start_primary(&mut self, o: &Opts) {
        let args = self.primary_args(o);
        let mut primary = Daemon::start("primary", &lockstep_bin(), &refs(&args), self.dir.path());
        let v = wait_status(
            &mut primary,
            &self.p_sock,
            Duration::from_secs(40),
            "primary",
            |v| v["mode"] == "replicating" && !mem(v).is_null(),
        );
        assert_eq!(mem(&v)["connected"], true, "{v}");
        self.primary = Some(primary);
    }

    pub fn primary_args(&self, o: &Opts) -> Vec<String> {
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
    pub fn restart_secondary(&mut self, name: &str) {
        let args = secondary_args(&self.s_img, &self.listen, &self.s_sock, &self.s_region);
        self.secondary = Daemon::start(name, &lockstep_bin(), &refs(&args), self.dir.path());
    }

    pub fn primary(&mut self) -> &mut Daemon {
        self.primary.as_mut().expect("a primary")
    }

    pub fn pages(&self) -> u64 {
        std::fs::metadata(&self.p_region.path)
            .expect("region")
            .len()
            / PAGE as u64
    }

    /// Start `lockstep-memwriter --region R ARGS…` and wait for its READY.
    pub fn start_writer(&mut self, name: &str, region: &Path, args: &[&str]) -> Daemon {
        let mut a = vec!["--region", region.to_str().unwrap()];
        a.extend_from_slice(args);
        let mut w = Daemon::start(name, &memwriter(), &a, self.dir.path());
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

    /// Wait until the primary's first resync (and its checkpoint) is done. A writer that hands
    /// over before risks landing in that checkpoint's long first cut, where a hand-over gets a
    /// stray resume (see [`writers_handing_over_during_a_cut_keep_running`]).
    pub fn wait_resync_done(&mut self) {
        self.wait_primary(Duration::from_secs(30), "primary (resync done)", |v| {
            v["resyncing"] == false && v["resync"]["state"] == "done"
        });
    }

    /// The counter writer: hands over on the writer socket, writes block 0 through the export.
    pub fn start_counter_writer(&mut self) {
        self.wait_resync_done();
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

    pub fn logs(&self) -> String {
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

    pub fn p_status(&self) -> Value {
        control_status(&self.p_sock, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("primary status: {e}\n{}", self.logs()))
    }

    /// Wait until the primary's status satisfies `ready`.
    pub fn wait_primary(
        &mut self,
        deadline: Duration,
        what: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let sock = self.p_sock.clone();
        wait_status(self.primary(), &sock, deadline, what, ready)
    }

    /// Wait until the region's committed epoch passes `n`.
    pub fn wait_mem_committed(&mut self, n: u64) -> Value {
        self.wait_primary(Duration::from_secs(30), "primary (region committed)", |v| {
            u(v, "committed_epoch") > n
        })
    }

    /// Wait for the writer's hand-over, then for three committed checkpoints after it.
    pub fn wait_uffd_and_commits(&mut self) -> Value {
        let v = self.wait_primary(Duration::from_secs(20), "primary (uffd)", |v| {
            mem(v)["tracker"] == "uffd"
        });
        self.wait_mem_committed(u(&v, "committed_epoch") + 2)
    }

    /// The writer must still run, and the region be tracked through its hand-over.
    pub fn assert_writer_running(&mut self, what: &str) {
        let w = self.writer.as_mut().expect("a writer");
        if let Ok(Some(st)) = w.child.try_wait() {
            panic!(
                "{what}: the writer exited ({st}):\n{}\n{}",
                w.log_text(),
                self.logs()
            );
        }
        let v = self.p_status();
        assert_eq!(
            mem(&v)["tracker"],
            "uffd",
            "{what}: {}\n{}",
            mem(&v),
            self.logs()
        );
    }

    /// Kill the writer (its last state is whatever it wrote).
    pub fn kill_writer(&mut self) {
        if let Some(w) = &mut self.writer {
            w.signal(libc::SIGKILL);
            w.wait(Duration::from_secs(10));
        }
    }

    /// Request checkpoints until the region's committed epoch is one opened after now (nothing
    /// writes any more), then both regions must be equal byte for byte and the disks' block 0.
    pub fn final_checkpoint_and_compare(&mut self, what: &str) -> String {
        self.checkpoint_after_now(what);
        let p = std::fs::read(&self.p_region.path).expect("primary region");
        self.compare_regions(&p, what)
    }

    /// The secondary's region must equal `p` (the primary's region as read by the caller) and
    /// the disks' block 0 must be equal.
    pub fn compare_regions(&self, p: &[u8], what: &str) -> String {
        let s = std::fs::read(&self.s_region.path).expect("secondary region");
        if let Some(at) = first_difference(p, &s) {
            panic!(
                "{what}: the regions differ at byte {at} (page {}): primary {}, secondary {}\n{}",
                at / PAGE,
                mem(&self.p_status()),
                mem(&control_status(&self.s_sock, T).unwrap_or_default()),
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

    /// Request checkpoints until the region's committed epoch is one opened after now.
    pub fn checkpoint_after_now(&mut self, what: &str) {
        let epoch = u(&self.p_status(), "epoch");
        let start = Instant::now();
        loop {
            let _ = checkpoint(&self.p_sock);
            let v = self.p_status();
            if u(&v, "committed_epoch") >= epoch {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{what}: no checkpoint of the region committed: {v}\n{}",
                self.logs()
            );
            sleep_ms(50);
        }
    }
}

pub fn secondary_args(img: &Path, listen: &str, sock: &Path, region: &ShmFile) -> Vec<String> {
    secondary_cmd(
        img,
        Some(DISK),
        listen,
        sock,
        None,
        &owned(&["--memory", region.s()]),
    )
}

pub fn block0(path: &Path) -> Vec<u8> {
    let mut b = vec![0u8; PAGE];
    File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_exact_at(&mut b, 0)
        .expect("read block 0");
    b
}

/// Fill a region file with deterministic bytes (every page non-zero).
pub fn fill_region(path: &Path, seed: u64) {
    let len = std::fs::metadata(path).expect("region").len() as usize;
    crate::random_file(path, len, seed);
}
