//! One test suite for every tracking backend.
//!
//! Each test body takes a [`Backend`] and runs against a [`Fixture`] that the backend's factory
//! builds: the region (this process's mapping), the tracker, the digest table and a [`Writer`].
//! Backends:
//!
//! - `scan`: [`ScanTracker`], writers are threads of this process;
//! - `uffd_self`: [`UffdTracker::register_self`], writers are threads of this process writing
//!   through `region.as_ptr()`;
//! - `uffd_child`: a child process (this test binary re-run as the `writer_child` test with
//!   `MEMREP_TEST_WRITER` set) maps the file, registers it with
//!   [`WriterRegistration`], hands its descriptors over a unix socket, and then writes on
//!   command (lines on its stdin, acknowledged on its stderr).
//!
//! Every test ends with the invariant: after the collect / read / table-update loop, with writers
//! stopped and one final round, the table equals the hash of every page (no write was missed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use roaring::RoaringTreemap;

use super::scan::ScanTracker;
use super::uffd::UffdTracker;
use super::{probe_uffd, TrackError, Tracker, TrackerKind};
use crate::digest::{is_zero, page_hash, zero_hash, PageTable};
use crate::handoff::{answer, receive_handover, WriterRegistration};
use crate::region::Region;
use crate::testutil::ShmFile;
use crate::PAGE_SIZE;

const ENV_REGION: &str = "MEMREP_TEST_WRITER";
const ENV_SOCKET: &str = "MEMREP_TEST_SOCKET";
const WAIT: Duration = Duration::from_secs(30);
const PG: u64 = PAGE_SIZE as u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Scan,
    UffdSelf,
    UffdChild,
}

// ---- writer operations, shared by in-process writers and the child writer ----

/// Threads 0..4 each write their own 8 pages (t*8 .. t*8+8) and all of them pages 32..40, each
/// at its own offset. Returns the pages written.
fn multi_thread_writes(region: &Region) -> Vec<u64> {
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for round in 1..=3u64 {
                    for p in (t * 8..t * 8 + 8).chain(32..40) {
                        let v = (t + 1) << 32 | round << 16 | p;
                        region.write_at(p * PG + t * 64, &v.to_ne_bytes()).unwrap();
                    }
                }
            });
        }
    });
    (0..40).collect()
}

/// Write every other page (more separate ranges than the uffd tracker's 1024-entry buffer, so
/// the scan must resume from `walk_end`). Returns the pages written.
fn stripe_writes(region: &Region) -> Vec<u64> {
    let pages: Vec<u64> = (0..region.pages()).step_by(2).collect();
    for &p in &pages {
        region.write_at(p * PG + 8, &(p + 1).to_ne_bytes()).unwrap();
    }
    pages
}

fn fill(region: &Region, page: u64, byte: u8) {
    region.write_page(page, &[byte; PAGE_SIZE]);
}

/// Writer threads that write pseudo-random pages until stopped.
struct Race {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Race {
    fn start(region: Arc<Region>, threads: u64) -> Race {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (region, stop, writes) = (region.clone(), stop.clone(), writes.clone());
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ ((t + 1) * 0x1234_5677);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = x % region.pages();
                        let off = (x >> 32) % (PG / 8) * 8;
                        n += 1;
                        region
                            .write_at(page * PG + off, &(n | 1).to_ne_bytes())
                            .unwrap();
                        if n % 64 == 0 {
                            std::thread::yield_now();
                        }
                    }
                    writes.fetch_add(n, Ordering::Relaxed);
                })
            })
            .collect();
        Race {
            stop,
            writes,
            threads,
        }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        self.writes.load(Ordering::Relaxed)
    }
}

// ---- the child writer ----

/// The writer process of the `uffd_child` backend. A no-op unless `MEMREP_TEST_WRITER` is set.
#[test]
fn writer_child() {
    let Ok(region_path) = std::env::var(ENV_REGION) else {
        return;
    };
    let socket = std::env::var(ENV_SOCKET).expect("socket path");
    let region = Arc::new(Region::open(region_path.as_ref()).expect("child: open region"));
    let reg = WriterRegistration::register(region.as_ptr(), region.len() as usize)
        .expect("child: register");
    reg.hand_over(socket.as_ref(), region_path.as_ref())
        .expect("child: hand over");
    let ack = |s: &str| eprintln!("ACK {s}");
    ack("ready");
    let mut race = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("child: stdin");
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["fill", p, b] => {
                fill(&region, p.parse().unwrap(), b.parse().unwrap());
                ack("fill");
            }
            ["mt"] => {
                multi_thread_writes(&region);
                ack("mt");
            }
            ["stripe"] => {
                stripe_writes(&region);
                ack("stripe");
            }
            ["race", n] => {
                race = Some(Race::start(region.clone(), n.parse().unwrap()));
                ack("race");
            }
            ["stop"] => {
                let n = race.take().map_or(0, Race::stop);
                ack(&format!("stop {n}"));
            }
            ["exit"] => {
                ack("exit");
                break;
            }
            _ => panic!("child: unknown command {line:?}"),
        }
    }
    drop(reg);
}

#[derive(Debug)]
struct ChildWriter {
    child: Child,
    stdin: ChildStdin,
    acks: mpsc::Receiver<String>,
}

impl ChildWriter {
    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to child");
        self.stdin.flush().unwrap();
        let want = line.split_whitespace().next().unwrap();
        self.wait_ack(want)
    }

    fn wait_ack(&mut self, want: &str) -> String {
        let ack = self
            .acks
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("child writer did not acknowledge {want:?}: {e}"));
        assert!(ack.starts_with(want), "child answered {ack:?} to {want:?}");
        ack
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("child writer {} did not exit", self.child.id());
    }
}

impl Drop for ChildWriter {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawn the child writer for `path` and receive its hand-over.
fn spawn_child(path: &std::path::Path, len: u64) -> (ChildWriter, UffdTracker) {
    let sock = ShmFile::new("sock");
    let listener = UnixListener::bind(sock.path()).expect("bind hand-over socket");
    listener.set_nonblocking(true).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "track::tests::writer_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ENV_REGION, path)
        .env(ENV_SOCKET, sock.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child writer");
    let stdin = child.stdin.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, acks) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix("ACK ") {
                Some(a) => {
                    if tx.send(a.to_owned()).is_err() {
                        break;
                    }
                }
                None => eprintln!("[child writer] {line}"),
            }
        }
    });
    let mut w = ChildWriter { child, stdin, acks };
    let deadline = Instant::now() + WAIT;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(Some(st)) = w.child.try_wait() {
                    panic!("child writer exited ({st}) before handing over");
                }
                assert!(Instant::now() < deadline, "no hand-over within {WAIT:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let h = receive_handover(&stream, WAIT).expect("receive hand-over");
    assert_eq!(h.pid, w.child.id());
    assert_eq!(h.len, len);
    assert_eq!(h.path, path);
    let tracker = UffdTracker::from_handover(h);
    let result = tracker.as_ref().map(|_| ()).map_err(|e| e.to_string());
    answer(&stream, &result).unwrap();
    let tracker = tracker.expect("tracker from hand-over");
    w.wait_ack("ready");
    (w, tracker)
}

// ---- fixture ----

#[derive(Debug)]
enum Writer {
    Local(Option<Race>),
    Child(ChildWriter),
}

impl std::fmt::Debug for Race {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Race")
    }
}

#[derive(Debug)]
struct Fixture {
    backend: Backend,
    region: Arc<Region>,
    tracker: Box<dyn Tracker>,
    table: PageTable,
    writer: Writer,
    _file: ShmFile,
}

impl Fixture {
    /// A region of `pages` pages. `sparse`: the file is all holes and the table starts as all
    /// zero-page hashes (hashing it through the mapping would populate it).
    fn new(backend: Backend, pages: u64, sparse: bool) -> Fixture {
        let file = ShmFile::new("track");
        let region = Arc::new(Region::create(file.path(), pages * PG).unwrap());
        let (tracker, writer): (Box<dyn Tracker>, Writer) = match backend {
            Backend::Scan => (Box::new(ScanTracker::new(2)), Writer::Local(None)),
            Backend::UffdSelf => (
                Box::new(UffdTracker::register_self(&region).expect("uffd must work on this host")),
                Writer::Local(None),
            ),
            Backend::UffdChild => {
                let (w, t) = spawn_child(file.path(), region.len());
                (Box::new(t), Writer::Child(w))
            }
        };
        let table = if sparse {
            PageTable::from_digests(vec![zero_hash(); pages as usize])
        } else {
            PageTable::hash_region(&region, 2)
        };
        let kind = tracker.kind();
        assert_eq!(
            kind,
            if backend == Backend::Scan {
                TrackerKind::Scan
            } else {
                TrackerKind::Uffd
            }
        );
        Fixture {
            backend,
            region,
            tracker,
            table,
            writer,
            _file: file,
        }
    }

    fn fill(&mut self, page: u64, byte: u8) {
        match &mut self.writer {
            Writer::Local(_) => fill(&self.region, page, byte),
            Writer::Child(c) => {
                c.cmd(&format!("fill {page} {byte}"));
            }
        }
    }

    fn multi_thread(&mut self) -> Vec<u64> {
        match &mut self.writer {
            Writer::Local(_) => multi_thread_writes(&self.region),
            Writer::Child(c) => {
                c.cmd("mt");
                (0..40).collect()
            }
        }
    }

    fn stripe(&mut self) -> Vec<u64> {
        match &mut self.writer {
            Writer::Local(_) => stripe_writes(&self.region),
            Writer::Child(c) => {
                c.cmd("stripe");
                (0..self.region.pages()).step_by(2).collect()
            }
        }
    }

    fn race_start(&mut self, threads: u64) {
        match &mut self.writer {
            Writer::Local(r) => *r = Some(Race::start(self.region.clone(), threads)),
            Writer::Child(c) => {
                c.cmd(&format!("race {threads}"));
            }
        }
    }

    fn race_stop(&mut self) -> u64 {
        match &mut self.writer {
            Writer::Local(r) => r.take().map_or(0, Race::stop),
            Writer::Child(c) => c.cmd("stop")["stop ".len()..].parse().unwrap(),
        }
    }

    /// collect, then read every reported page and store its hash (the caller's side of the
    /// contract). Returns the reported pages.
    fn round(&mut self) -> RoaringTreemap {
        let mut out = RoaringTreemap::new();
        let stats = self
            .tracker
            .collect(&self.region, &self.table, &mut out)
            .unwrap_or_else(|e| panic!("{:?} collect: {e}", self.backend));
        assert_eq!(stats.pages, out.len());
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for i in out.iter() {
            self.region.read_page(i, &mut buf);
            self.table.set(i, page_hash(&buf[..]));
        }
        out
    }

    /// The invariant: one final round with writers stopped, then the table equals a fresh hash of
    /// every page (holes counted as zero pages without touching them).
    fn assert_nothing_missed(&mut self) {
        self.round();
        let mut fresh = vec![zero_hash(); self.region.pages() as usize];
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for r in self.region.data_pages() {
            for i in r {
                self.region.read_page(i, &mut buf);
                fresh[i as usize] = page_hash(&buf[..]);
            }
        }
        let fresh = PageTable::from_digests(fresh);
        let wrong: Vec<u64> = (0..fresh.len())
            .filter(|&i| fresh.get(i) != self.table.get(i))
            .take(10)
            .collect();
        assert!(
            wrong.is_empty(),
            "{:?}: table is stale for pages {wrong:?}",
            self.backend
        );
        assert_eq!(fresh.fold(), self.table.fold());
    }
}

fn set(pages: impl IntoIterator<Item = u64>) -> RoaringTreemap {
    pages.into_iter().collect()
}

// ---- the test bodies ----

fn nothing_written_nothing_reported(b: Backend) {
    let mut fx = Fixture::new(b, 64, false);
    assert!(fx.round().is_empty());
    fx.assert_nothing_missed();
}

fn writes_from_every_thread(b: Backend) {
    let mut fx = Fixture::new(b, 64, false);
    let written = fx.multi_thread();
    assert_eq!(fx.round(), set(written));
    assert!(fx.round().is_empty(), "second collect without writes");
    // The same writes again: the same pages are written (uffd) but their content is unchanged
    // (scan).
    let written = fx.multi_thread();
    let out = fx.round();
    match b {
        Backend::Scan => assert!(out.is_empty(), "{out:?}"),
        _ => assert_eq!(out, set(written)),
    }
    fx.assert_nothing_missed();
}

fn many_scattered_pages(b: Backend) {
    let mut fx = Fixture::new(b, 8192, false);
    let written = fx.stripe();
    assert_eq!(written.len(), 4096);
    assert_eq!(fx.round(), set(written));
    assert!(fx.round().is_empty());
    fx.assert_nothing_missed();
}

fn writes_racing_collect(b: Backend) {
    let mut fx = Fixture::new(b, 256, false);
    fx.race_start(3);
    let t0 = Instant::now();
    let mut rounds = 0;
    let mut reported = 0;
    while t0.elapsed() < Duration::from_millis(700) || rounds < 5 {
        reported += fx.round().len();
        rounds += 1;
    }
    let writes = fx.race_stop();
    assert!(
        writes > 0 && reported > 0,
        "writes {writes}, reported {reported}"
    );
    fx.assert_nothing_missed();
    // And the tracker is quiet again.
    assert!(fx.round().is_empty());
}

fn written_twice_reported_once(b: Backend) {
    let mut fx = Fixture::new(b, 64, false);
    fx.fill(5, 1);
    fx.fill(5, 2);
    fx.fill(9, 3);
    // Page 7 is written with the content it already has (zeros): uffd reports it (written),
    // scan does not (unchanged).
    fx.fill(7, 0);
    let out = fx.round();
    match b {
        Backend::Scan => assert_eq!(out, set([5, 9])),
        _ => assert_eq!(out, set([5, 7, 9])),
    }
    assert!(fx.round().is_empty());
    fx.fill(5, 2); // same content again
    let out = fx.round();
    match b {
        Backend::Scan => assert!(out.is_empty(), "{out:?}"),
        _ => assert_eq!(out, set([5])),
    }
    fx.assert_nothing_missed();
}

fn zero_pages(b: Backend) {
    let mut fx = Fixture::new(b, 16, false);
    for p in 1..5 {
        fx.fill(p, 0xa5);
    }
    assert_eq!(fx.round(), set(1..5));
    fx.fill(2, 0);
    assert_eq!(fx.round(), set([2]));
    let mut buf = Box::new([0u8; PAGE_SIZE]);
    fx.region.read_page(2, &mut buf);
    assert!(is_zero(&buf[..]));
    assert_eq!(fx.table.get(2), zero_hash());
    fx.region.read_page(3, &mut buf);
    assert!(!is_zero(&buf[..]));
    fx.assert_nothing_missed();
}

fn file_blocks(region: &Region) -> u64 {
    use std::os::unix::fs::MetadataExt;
    region.file().metadata().unwrap().blocks() * 512
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    let line = s.lines().find(|l| l.starts_with("Rss:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn sparse_gigabyte(b: Backend) {
    let pages = (1u64 << 30) / PG;
    let rss0 = rss_bytes();
    let mut fx = Fixture::new(b, pages, true);
    assert!(fx.round().is_empty());
    let touched = [0, 1, 4095, 100_000, pages - 1];
    for (k, &p) in touched.iter().enumerate() {
        fx.fill(p, k as u8 + 1);
    }
    assert_eq!(fx.round(), set(touched));
    assert!(fx.round().is_empty());
    let blocks = file_blocks(&fx.region);
    assert!(
        blocks <= 16 << 20,
        "{b:?}: file has {blocks} bytes allocated after collect"
    );
    fx.assert_nothing_missed();
    let blocks = file_blocks(&fx.region);
    assert!(
        blocks <= 16 << 20,
        "{b:?}: file has {blocks} bytes allocated"
    );
    // RSS of this process: other tests run in parallel threads, so allow slack, but far less
    // than the 1 GiB a populating tracker would cost.
    let rss = rss_bytes();
    assert!(
        rss < rss0 + (256 << 20),
        "{b:?}: RSS grew from {rss0} to {rss}"
    );
}

macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod scan {
            $( #[test] fn $name() { super::$name(super::Backend::Scan) } )*
        }
        mod uffd_self {
            $( #[test] fn $name() { super::$name(super::Backend::UffdSelf) } )*
        }
        mod uffd_child {
            $( #[test] fn $name() { super::$name(super::Backend::UffdChild) } )*
        }
    };
}

backend_tests!(
    nothing_written_nothing_reported,
    writes_from_every_thread,
    writes_racing_collect,
    many_scattered_pages,
    written_twice_reported_once,
    zero_pages,
    sparse_gigabyte,
);

// ---- backend-specific ----

#[test]
fn uffd_is_available() {
    probe_uffd().expect("uffd async write-protect + PAGEMAP_SCAN must work on this host");
}

#[test]
fn kinds_display() {
    assert_eq!(TrackerKind::Uffd.to_string(), "uffd");
    assert_eq!(TrackerKind::Scan.to_string(), "scan");
}

#[test]
fn uffd_child_exit_is_reported() {
    let mut fx = Fixture::new(Backend::UffdChild, 16, false);
    fx.fill(3, 1);
    assert_eq!(fx.round(), set([3]));
    let Writer::Child(c) = &mut fx.writer else {
        unreachable!()
    };
    c.kill();
    let mut out = RoaringTreemap::new();
    let e = fx
        .tracker
        .collect(&fx.region, &fx.table, &mut out)
        .unwrap_err();
    assert!(matches!(e, TrackError::WriterGone { .. }), "{e}");
}

#[test]
fn trackers_refuse_a_region_of_another_size() {
    let f = ShmFile::new("other");
    let other = Region::create(f.path(), 8 * PG).unwrap();
    let mut fx = Fixture::new(Backend::UffdSelf, 16, false);
    let mut out = RoaringTreemap::new();
    let e = fx.tracker.collect(&other, &fx.table, &mut out).unwrap_err();
    assert!(matches!(e, TrackError::Mismatch(_)), "{e}");
    let e = ScanTracker::new(1)
        .collect(&other, &fx.table, &mut out)
        .unwrap_err();
    assert!(matches!(e, TrackError::Mismatch(_)), "{e}");
}

/// The soft-dirty probe answers either way, with the kernel option named when it says no.
#[test]
fn softdirty_probe_names_the_missing_kernel_option() {
    match super::softdirty::probe() {
        Ok(()) => println!("this kernel keeps soft-dirty bits"),
        Err(e) => assert!(e.contains("CONFIG_MEM_SOFT_DIRTY"), "{e}"),
    }
}
