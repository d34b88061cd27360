//! Replication across real processes on loopback: `lockstep secondary` and `lockstep primary`
//! under fio load (fio's nbd engine), kill -9 of either side at random moments, failover, and
//! three kinds of proof:
//!
//! * the checkpoint digest: the primary computes a digest of its own disk at every checkpoint
//!   cut and sends it with CHECKPOINT(n); `failover --to checkpoint --verify` recomputes the
//!   secondary's disk digest and compares (the secondary equals the primary at the last
//!   committed checkpoint);
//! * fio's own crash-consistency machinery: a writer with `--verify_state_save` records which
//!   writes completed when it lost its server; a second fio with `--verify_only
//!   --verify_state_load` (same job, same seed) checks every one of them on the new primary;
//! * byte comparison of the image files after a clean shutdown.
//!
//! Every random choice comes from one seed printed at the start of each test (run with
//! `--nocapture` to see it, it is also in every failure message); set `LOCKSTEP_TEST_SEED` to
//! replay a run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_tests::*;

/// Deadline for short commands (status, qemu-io, failover of a small disk).
const T: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A small JSON reader: the status and failover answers are JSON objects, and the tests crate
// keeps its dependencies to what the harness needs.

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static NULL: Json = Json::Null;

impl std::ops::Index<&str> for Json {
    type Output = Json;
    fn index(&self, key: &str) -> &Json {
        match self {
            Json::Obj(v) => v
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .unwrap_or(&NULL),
            _ => &NULL,
        }
    }
}

impl std::fmt::Display for Json {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Json::Null => write!(f, "null"),
            Json::Bool(b) => write!(f, "{b}"),
            Json::Num(n) => write!(f, "{n}"),
            Json::Str(s) => write!(f, "{s:?}"),
            Json::Arr(v) => {
                write!(f, "[")?;
                for (i, x) in v.iter().enumerate() {
                    write!(f, "{}{x}", if i > 0 { ", " } else { "" })?;
                }
                write!(f, "]")
            }
            Json::Obj(v) => {
                write!(f, "{{")?;
                for (i, (k, x)) in v.iter().enumerate() {
                    write!(f, "{}{k:?}: {x}", if i > 0 { ", " } else { "" })?;
                }
                write!(f, "}}")
            }
        }
    }
}

impl Json {
    fn parse(s: &str) -> Result<Json, String> {
        let mut p = JsonParser {
            b: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.b.len() {
            return Err(format!("trailing data at byte {} of {s:?}", p.i));
        }
        Ok(v)
    }

    fn u64(&self) -> Option<u64> {
        match self {
            Json::Num(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }

    fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn next(&mut self) -> Result<u8, String> {
        let c = *self.b.get(self.i).ok_or("unexpected end of JSON")?;
        self.i += 1;
        Ok(c)
    }

    fn literal(&mut self, word: &str, v: Json) -> Result<Json, String> {
        if self.b[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(format!("bad literal at byte {}", self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.b.get(self.i).copied() {
            Some(b'{') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(v));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    if self.next()? != b':' {
                        return Err(format!("expected ':' at byte {}", self.i - 1));
                    }
                    let x = self.value()?;
                    v.push((k, x));
                    self.ws();
                    match self.next()? {
                        b',' => continue,
                        b'}' => return Ok(Json::Obj(v)),
                        _ => return Err(format!("expected ',' or '}}' at byte {}", self.i - 1)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value()?);
                    self.ws();
                    match self.next()? {
                        b',' => continue,
                        b']' => return Ok(Json::Arr(v)),
                        _ => return Err(format!("expected ',' or ']' at byte {}", self.i - 1)),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.b.len()
                    && matches!(
                        self.b[self.i],
                        b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'
                    )
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.b[start..self.i]).expect("ascii");
                t.parse()
                    .map(Json::Num)
                    .map_err(|e| format!("bad number {t:?}: {e}"))
            }
            _ => Err(format!("unexpected input at byte {}", self.i)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if self.next()? != b'"' {
            return Err(format!("expected a string at byte {}", self.i - 1));
        }
        let mut out = Vec::new();
        loop {
            match self.next()? {
                b'"' => break,
                b'\\' => match self.next()? {
                    b'n' => out.push(b'\n'),
                    b't' => out.push(b'\t'),
                    b'r' => out.push(b'\r'),
                    b'b' => out.push(8),
                    b'f' => out.push(12),
                    b'u' => {
                        let hex = self.b.get(self.i..self.i + 4).ok_or("short \\u escape")?;
                        self.i += 4;
                        let code = u32::from_str_radix(std::str::from_utf8(hex).unwrap_or("?"), 16)
                            .map_err(|e| format!("bad \\u escape: {e}"))?;
                        let c = char::from_u32(code).unwrap_or('\u{fffd}');
                        out.extend_from_slice(c.to_string().as_bytes());
                    }
                    c => out.push(c),
                },
                c => out.push(c),
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness, reproducible from one seed.

struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> (Rng, u64) {
        let seed = std::env::var("LOCKSTEP_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        eprintln!("{test}: seed {seed} (LOCKSTEP_TEST_SEED={seed} replays this run)");
        (Rng(seed ^ 0x9e37_79b9_7f4a_7c15), seed)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

/// Run `n` trials of `f`, each with its own random stream; every trial runs even when an
/// earlier one failed, and the test fails at the end with every failure.
fn trials(test: &str, n: usize, mut f: impl FnMut(usize, &mut Rng) -> String) {
    let (mut rng, seed) = Rng::from_env(test);
    let start = Instant::now();
    let mut failures = Vec::new();
    for i in 0..n {
        let mut r = Rng(rng.next());
        let t = Instant::now();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i, &mut r))) {
            Ok(summary) => eprintln!(
                "{test}: trial {i} ok in {:.1} s: {summary}",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "(panic without a message)".into());
                eprintln!("{test}: trial {i} FAILED");
                failures.push(format!("--- trial {i}:\n{msg}"));
            }
        }
    }
    eprintln!(
        "{test}: {n} trials in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{test}: {} of {n} trials failed (LOCKSTEP_TEST_SEED={seed} replays them):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Daemons and their control sockets.

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `n` lines of a daemon's log, without colour codes.
fn tail(d: &Daemon, n: usize) -> String {
    let text = strip_ansi(&d.log_text());
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One request on a control socket (JSON lines), without going through the CLI: cheap enough
/// to poll the primary every few tens of milliseconds under load.
fn control(sock: &Path, req: &str, timeout: Duration) -> Result<Json, String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v = Json::parse(line.trim())?;
    if v["ok"] != Json::Bool(true) {
        return Err(format!("control request {req} answered {v}"));
    }
    Ok(v)
}

/// `lockstep ARGS…` with a deadline: (success, stdout, stderr).
fn lockstep(args: &[&str], deadline: Duration) -> (bool, String, String) {
    let out = run(lockstep_bin().to_str().expect("utf-8 path"), args, deadline);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `lockstep status --control SOCK --json`, parsed.
fn status(sock: &Path) -> Result<Json, String> {
    let (ok, out, err) = lockstep(
        &["status", "--control", sock.to_str().unwrap(), "--json"],
        T,
    );
    if !ok {
        return Err(format!("lockstep status failed: {err}{out}"));
    }
    Json::parse(out.trim())
}

/// Wait until the daemon answers `status` on `sock` with an answer `ready` accepts.
fn wait_status(
    d: &mut Daemon,
    sock: &Path,
    deadline: Duration,
    what: &str,
    ready: impl Fn(&Json) -> bool,
) -> Json {
    let start = Instant::now();
    let mut last = String::from("(no answer yet)");
    loop {
        if let Ok(Some(st)) = d.child.try_wait() {
            panic!(
                "the {what} exited with {st} while we waited for it; log:\n{}",
                tail(d, 60)
            );
        }
        if sock.exists() {
            match control(sock, r#"{"cmd":"status"}"#, Duration::from_secs(5)) {
                Ok(v) if ready(&v) => return v,
                Ok(v) => last = v.to_string(),
                Err(e) => last = e,
            }
        }
        if start.elapsed() > deadline {
            panic!(
                "the {what} did not reach the expected state within {deadline:?}; last status: {last}\nlog:\n{}",
                tail(d, 60)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A secondary and a primary on fresh (sparse, hence identical) images.
struct Pair {
    p_img: PathBuf,
    s_img: PathBuf,
    p_sock: PathBuf,
    s_sock: PathBuf,
    /// The primary's NBD export (clients connect here).
    export: String,
    /// The secondary's replication port.
    listen: String,
    /// The secondary's own export (after failover: the new primary's).
    s_export: String,
    // Declared in this order so that on drop the primary stops before the secondary.
    primary: Daemon,
    secondary: Daemon,
}

impl Pair {
    fn start(dir: &Path, size: &str, primary_flags: &[String]) -> Pair {
        Self::start_full(dir, size, primary_flags, &[], false).0
    }

    /// Like `start`, with extra secondary flags, and optionally the primary reaching the
    /// secondary through a [`CutProxy`].
    fn start_full(
        dir: &Path,
        size: &str,
        primary_flags: &[String],
        secondary_flags: &[String],
        via_proxy: bool,
    ) -> (Pair, Option<CutProxy>) {
        let bin = lockstep_bin();
        let (p_img, s_img) = (dir.join("primary.img"), dir.join("secondary.img"));
        let (p_sock, s_sock) = (dir.join("primary.sock"), dir.join("secondary.sock"));
        let export = format!("127.0.0.1:{}", free_port());
        let listen = format!("127.0.0.1:{}", free_port());
        let s_export = format!("127.0.0.1:{}", free_port());
        let sargs = s(&[
            "secondary",
            "--disk",
            s_img.to_str().unwrap(),
            "--size",
            size,
            "--listen",
            &listen,
            "--control",
            s_sock.to_str().unwrap(),
            "--export",
            &s_export,
        ]);
        let mut sargs = sargs;
        sargs.extend(secondary_flags.iter().cloned());
        let mut secondary = Daemon::start("secondary", &bin, &refs(&sargs), dir);
        wait_status(
            &mut secondary,
            &s_sock,
            Duration::from_secs(20),
            "secondary",
            |v| v["mode"].str() == Some("waiting"),
        );
        let proxy = via_proxy.then(|| CutProxy::start(&listen));
        let target = proxy.as_ref().map_or(listen.clone(), |p| p.addr.clone());
        let mut pargs = s(&[
            "primary",
            "--disk",
            p_img.to_str().unwrap(),
            "--size",
            size,
            "--export",
            &export,
            "--secondary",
            &target,
            "--control",
            p_sock.to_str().unwrap(),
        ]);
        pargs.extend(primary_flags.iter().cloned());
        let mut primary = Daemon::start("primary", &bin, &refs(&pargs), dir);
        let st = wait_status(
            &mut primary,
            &p_sock,
            Duration::from_secs(40),
            "primary",
            |v| v["mode"].str().is_some(),
        );
        assert_eq!(
            st["mode"].str(),
            Some("replicating"),
            "a fresh primary should be replicating: {st}\nprimary log:\n{}\nsecondary log:\n{}",
            tail(&primary, 40),
            tail(&secondary, 40)
        );
        (
            Pair {
                p_img,
                s_img,
                p_sock,
                s_sock,
                export,
                listen,
                s_export,
                primary,
                secondary,
            },
            proxy,
        )
    }

    fn uri(&self) -> String {
        format!("nbd://{}/lockstep", self.export)
    }

    fn s_uri(&self) -> String {
        format!("nbd://{}/lockstep", self.s_export)
    }

    fn logs(&self) -> String {
        format!(
            "--- primary log (tail):\n{}\n--- secondary log (tail):\n{}",
            tail(&self.primary, 40),
            tail(&self.secondary, 40)
        )
    }
}

/// Block sizes for the fio loads: mostly 4 KiB, and sizes that are multiples of 512 but not
/// of 4096 (so writes cover partial blocks of the secondary's 4 KiB buffer), up to 64 KiB.
const BSSPLIT: &str = "--bssplit=512/5:1536/10:4k/45:7680/10:12k/10:36352/5:64k/15";

/// fio's summary counters: (reads issued, writes issued) from "issued rwts: total=R,W,…".
fn fio_issued(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("issued rwts: total="))?;
    let rest = line.split("total=").nth(1)?;
    let mut it = rest.split([',', ' ']);
    let r = it.next()?.parse().ok()?;
    let w = it.next()?.parse().ok()?;
    Some((r, w))
}

/// Job-level error codes fio reported ("err= 0" is success).
fn fio_errors(text: &str) -> usize {
    text.split("err=")
        .skip(1)
        .filter(|rest| {
            let r = rest.trim_start();
            !r.starts_with("0:") && !r.starts_with("0 ") && !r.starts_with("0\n")
        })
        .count()
}

/// A time-based random-write load on `uri` with the mixed block sizes of `BSSPLIT`.
fn load_job(uri: &str, seed: Option<u64>, depth: u32, size: &str, runtime_s: u32) -> Vec<String> {
    let mut a = vec![
        "--name=load".to_string(),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--rw=randwrite".into(),
        BSSPLIT.into(),
        "--norandommap".into(),
        format!("--iodepth={depth}"),
        format!("--size={size}"),
        "--time_based".into(),
        format!("--runtime={runtime_s}"),
    ];
    if let Some(seed) = seed {
        a.push(format!("--randseed={seed}"));
    }
    a
}

fn start_fio(dir: &Path, name: &str, args: &[String]) -> Daemon {
    require("fio", "fio");
    Daemon::start(name, Path::new("fio"), &refs(args), dir)
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// What the background poller saw on the primary: the highest top-level `committed_epoch`
/// and the highest `participants.block.committed_epoch`, and how many answers it got.
#[derive(Debug, Default)]
struct Seen {
    top: AtomicU64,
    block: AtomicU64,
    polls: AtomicU64,
    forwarded: AtomicU64,
}

/// Poll the primary's status in the background until `stop`.
fn poll_committed(sock: PathBuf) -> (Arc<AtomicBool>, Arc<Seen>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Seen::default());
    let (st, se) = (stop.clone(), seen.clone());
    let h = std::thread::spawn(move || {
        while !st.load(Ordering::SeqCst) {
            if let Ok(v) = control(&sock, r#"{"cmd":"status"}"#, Duration::from_secs(2)) {
                if let Some(c) = v["committed_epoch"].u64() {
                    se.top.fetch_max(c, Ordering::SeqCst);
                    se.polls.fetch_add(1, Ordering::SeqCst);
                }
                if let Some(c) = v["participants"]["block"]["committed_epoch"].u64() {
                    se.block.fetch_max(c, Ordering::SeqCst);
                }
                if let Some(c) = v["forwarded_writes"].u64() {
                    se.forwarded.fetch_max(c, Ordering::SeqCst);
                }
            }
            sleep_ms(40);
        }
    });
    (stop, seen, h)
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------------------
// 1. kill -9 the primary under fio load; fail over to the last checkpoint; prove it by digest.

fn kill_primary_trial(rng: &mut Rng) -> String {
    require("qemu-img", "qemu-utils");
    require("qemu-io", "qemu-utils");
    let dir = scratch();
    let ack = rng.pick(&["local", "received", "durable"]);
    let interval = rng.pick(&["50ms", "70ms", "100ms"]);
    let bytes = rng.pick(&["0", "0", "2M"]);
    let depth = rng.pick(&[16u32, 24, 32]);
    let kill_ms = rng.range(300, 2000);
    let wait_for_peer_loss = rng.range(0, 1) == 1;
    let fio_seed = rng.next() % 1_000_000_007;
    let params = format!(
        "ack={ack} interval={interval} checkpoint-bytes={bytes} iodepth={depth} kill after {kill_ms} ms, failover {}",
        if wait_for_peer_loss { "after the secondary saw the loss" } else { "at once" }
    );
    let mut pair = Pair::start(
        dir.path(),
        "32M",
        &s(&[
            "--ack",
            ack,
            "--checkpoint-interval",
            interval,
            "--checkpoint-bytes",
            bytes,
        ]),
    );
    let (stop, seen, poller) = poll_committed(pair.p_sock.clone());
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &load_job(&pair.uri(), Some(fio_seed), depth, "32M", 5),
    );
    sleep_ms(kill_ms);
    if let Ok(Some(st)) = fio.child.try_wait() {
        panic!(
            "[{params}] fio ended ({st}) before the primary was killed:\n{}\n{}",
            fio.log_text(),
            pair.logs()
        );
    }
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait(Duration::from_secs(10));
    let killed = Instant::now();
    stop.store(true, Ordering::SeqCst);
    poller.join().expect("status poller");
    let (seen_block, polls) = (
        seen.block.load(Ordering::SeqCst),
        seen.polls.load(Ordering::SeqCst),
    );
    let forwarded = seen.forwarded.load(Ordering::SeqCst);
    let seen = seen.top.load(Ordering::SeqCst);
    // fio loses its server: it must notice and end (with an error), not hang.
    fio.wait(Duration::from_secs(30));
    let fio_exit = killed.elapsed();
    let fio_text = fio.log_text();
    assert!(
        forwarded > 0,
        "[{params}] the primary forwarded no writes before the kill ({polls} status polls)\nfio:\n{fio_text}\n{}",
        pair.logs()
    );

    if wait_for_peer_loss {
        wait_status(
            &mut pair.secondary,
            &pair.s_sock,
            Duration::from_secs(15),
            "secondary",
            |v| v["mode"].str() == Some("paused"),
        );
    }
    let failover_start = Instant::now();
    let (ok, out, err) = lockstep(
        &[
            "failover",
            "--control",
            pair.s_sock.to_str().unwrap(),
            "--to",
            "checkpoint",
            "--verify",
            "--json",
        ],
        T,
    );
    let failover_took = failover_start.elapsed();
    let v = Json::parse(out.trim()).unwrap_or_else(|e| {
        panic!(
            "[{params}] failover printed no JSON ({e}); ok={ok}\nstdout:\n{out}\nstderr:\n{err}\n{}",
            pair.logs()
        )
    });
    let committed = v["committed_epoch"].u64().unwrap_or(0);
    assert!(
        ok && v["verified"] == Json::Bool(true),
        "[{params}] failover --to checkpoint --verify: the secondary's disk is not the primary's \
         disk at the last committed checkpoint (exit ok={ok}):\n{v}\nstderr: {err}\n{}",
        pair.logs()
    );
    // Sound whatever the status field means: the block participant commits only after the
    // secondary answered COMMITTED(n), so the secondary must have at least that checkpoint.
    assert!(
        committed >= seen_block,
        "[{params}] the primary's block participant had checkpoint {seen_block} committed (the \
         secondary answered COMMITTED), but the secondary failed over to checkpoint \
         {committed}:\n{v}\n{}",
        pair.logs()
    );
    // The documented status field. See also
    // primary_status_committed_epoch_is_committed_on_the_secondary.
    assert!(
        committed >= seen,
        "[{params}] the primary's status reported checkpoint {seen} committed, but the secondary \
         failed over to checkpoint {committed} (the block participant had reported {seen_block}: \
         the status field ran ahead of the secondary, see \
         primary_status_committed_epoch_is_committed_on_the_secondary):\n{v}\n{}",
        pair.logs()
    );
    let st = status(&pair.s_sock).unwrap_or_else(|e| panic!("[{params}] {e}\n{}", pair.logs()));
    assert!(
        st["role"].str() == Some("primary") && st["mode"].str() == Some("primary"),
        "[{params}] after failover the secondary should serve as primary: {st}\n{}",
        pair.logs()
    );

    // The new primary's export serves the disk: read it all, then write and read a pattern.
    let exported = dir.path().join("exported.raw");
    let u = pair.s_uri();
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &u,
            exported.to_str().unwrap(),
        ],
        T,
    );
    let io = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 1000 5000",
            "-c",
            "read -P 0x5a 1000 5000",
            "-c",
            "flush",
            &u,
        ],
        T,
    );
    assert!(
        !io.contains("Pattern verification failed") && !io.contains("error"),
        "[{params}] qemu-io on the failed-over export:\n{io}\n{}",
        pair.logs()
    );
    pair.secondary.signal(libc::SIGTERM);
    let st = pair.secondary.wait(Duration::from_secs(30));
    assert!(
        st.success(),
        "[{params}] the failed-over secondary exited with {st}\n{}",
        pair.logs()
    );
    let mut expect = std::fs::read(&exported).expect("exported copy");
    expect[1000..6000].fill(0x5a);
    let img = std::fs::read(&pair.s_img).expect("secondary image");
    if let Some(at) = first_difference(&expect, &img) {
        panic!(
            "[{params}] what the failed-over export served (plus qemu-io's pattern) differs from \
             the secondary's image file at byte {at}\n{}",
            pair.logs()
        );
    }
    let fio_w = match fio_issued(&fio_text) {
        Some((_, w)) => format!("fio issued {w} writes"),
        None => format!(
            "fio printed no summary (last line {:?})",
            fio_text.lines().last().unwrap_or("")
        ),
    };
    format!(
        "{params}: {fio_w}, the primary forwarded {forwarded}; primary committed {seen} (block \
         {seen_block}, {polls} polls), failover to checkpoint {committed}, {} blocks restored, \
         verified; fio ended {:.0} ms after the kill, failover took {:.0} ms",
        v["restored_blocks"],
        fio_exit.as_secs_f64() * 1000.0,
        failover_took.as_secs_f64() * 1000.0
    )
}

#[test]
fn kill9_primary_under_fio_failover_to_checkpoint_matches_digest() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "kill9_primary_under_fio_failover_to_checkpoint_matches_digest",
        21,
        |_, rng| kill_primary_trial(rng),
    );
}

// ---------------------------------------------------------------------------------------------
// 2. --ack durable, kill -9 the primary, fail over to latest: fio's crash verification.
//
// The writer runs with `--verify_state_save`: when it loses its server it saves how many
// writes it issued and which of the last `iodepth` completed. The verifier replays the same
// job (same seed, so the same offsets, sizes and contents) with `--verify_only
// --verify_state_load` against the new primary and reads back every write up to the window
// of writes that were in flight at the crash.
//
// Two caveats of fio 3.33 shape this check:
// * its window test counts *completed* verify reads, so a verifier with iodepth > 1 already
//   issues reads of the in-flight window before the test kicks in and reports writes that never
//   completed as bad (seen: every such offset was missing from the writer's completion log).
//   The verifier therefore runs at iodepth 1 (the depth does not change the replayed offsets).
// * a write that stalled while `iodepth` later ones completed would still count as completed.
//   So each bad block fio reports is looked up in the writer's own completion log (clat log
//   with offsets, only successful completions are logged): only a write fio saw acknowledged
//   and that is wrong on the secondary fails the test; the others are listed in the summary.

/// The offsets of writes that completed successfully, from fio's clat log
/// ("time, clat, ddir, bs, offset, prio"; ddir 1 is a write).
fn fio_completed_writes(log: &Path) -> std::collections::HashSet<u64> {
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|e| panic!("fio completion log {}: {e}", log.display()));
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            (f.len() >= 5 && f[2] == "1").then(|| f[4].parse().ok())?
        })
        .collect()
}

/// The offsets of the I/Os fio's verifier found bad ("requested block: offset=N").
fn fio_bad_blocks(text: &str) -> Vec<u64> {
    let mut v: Vec<u64> = text
        .split("requested block: offset=")
        .skip(1)
        .filter_map(|rest| {
            let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
            n.parse().ok()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Big enough that the writer is far from done with its one pass when the primary dies
/// (about 100 MB/s with ack=durable here); sparse, so it costs only what is written.
const CRASH_DISK: &str = "384M";

struct CrashVerify {
    summary: String,
    /// Everything needed to understand a failure: both fio outputs and the daemon logs.
    context: String,
    /// Bad blocks fio had seen acknowledged.
    acknowledged_bad: Vec<u64>,
    /// Bad blocks that were never acknowledged (in flight at the crash).
    unacknowledged_bad: Vec<u64>,
}

fn crash_verify_trial(rng: &mut Rng, target: &str, interval: &str) -> CrashVerify {
    let dir = scratch();
    let depth = rng.pick(&[16u32, 32]);
    let kill_ms = rng.range(350, 1000);
    let fio_seed = rng.next() % 1_000_000_007;
    let params = format!(
        "ack=durable interval={interval} iodepth={depth} kill after {kill_ms} ms, failover --to {target}"
    );
    let mut pair = Pair::start(
        dir.path(),
        CRASH_DISK,
        &s(&["--ack", "durable", "--checkpoint-interval", interval]),
    );
    // One job for the writer and the verifier; only the target, the depth and the verify
    // phase differ. Not time_based (verify_only does not support it), and one pass over a disk
    // much larger than what the writer gets through before the kill: fio's random map keeps its
    // writes from overlapping, so each block has exactly one expected content.
    let job = |uri: &str| -> Vec<String> {
        vec![
            "--name=crash".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=randwrite".into(),
            BSSPLIT.into(),
            format!("--size={CRASH_DISK}"),
            "--verify=crc32c".into(),
            format!("--randseed={fio_seed}"),
            format!("--aux-path={}", dir.path().display()),
        ]
    };
    let state = dir.path().join("local-crash-0-verify.state");
    let mut wargs = job(&pair.uri());
    wargs.extend([
        format!("--iodepth={depth}"),
        "--do_verify=0".into(),
        "--verify_state_save=1".into(),
        format!("--write_lat_log={}", dir.path().join("writer").display()),
        "--log_offset=1".into(),
    ]);
    let mut writer = start_fio(dir.path(), "fio-writer", &wargs);
    sleep_ms(kill_ms);
    if let Ok(Some(st)) = writer.child.try_wait() {
        panic!(
            "[{params}] the fio writer ended ({st}) before the primary was killed (the crash test \
             needs it mid-run):\n{}\n{}",
            writer.log_text(),
            pair.logs()
        );
    }
    pair.primary.signal(libc::SIGKILL);
    pair.primary.wait(Duration::from_secs(10));
    writer.wait(Duration::from_secs(30));
    let wtext = writer.log_text();
    let (_, written) = fio_issued(&wtext)
        .unwrap_or_else(|| panic!("[{params}] no summary from the fio writer:\n{wtext}"));
    assert!(
        state.exists(),
        "[{params}] fio saved no verify state at {} when it lost the primary:\n{wtext}",
        state.display()
    );
    let completed = fio_completed_writes(&dir.path().join("writer_clat.1.log"));
    assert!(
        completed.len() > 64,
        "[{params}] the writer completed only {} writes before the kill:\n{wtext}\n{}",
        completed.len(),
        pair.logs()
    );

    let (ok, out, err) = lockstep(
        &[
            "failover",
            "--control",
            pair.s_sock.to_str().unwrap(),
            "--to",
            target,
            "--json",
        ],
        T,
    );
    assert!(
        ok,
        "[{params}] failover --to {target} failed:\n{out}\n{err}\n{}",
        pair.logs()
    );
    let v = Json::parse(out.trim()).unwrap_or_else(|e| panic!("[{params}] {e}: {out}"));

    let mut vargs = job(&pair.s_uri());
    vargs.extend(s(&[
        "--iodepth=1",
        "--do_verify=1",
        "--verify_only",
        "--verify_state_load=1",
        "--verify_fatal=0",
        "--continue_on_error=verify",
    ]));
    let vout = run("fio", &refs(&vargs), Duration::from_secs(120));
    let vtext =
        String::from_utf8_lossy(&vout.stdout).into_owned() + &String::from_utf8_lossy(&vout.stderr);
    let bad = fio_bad_blocks(&vtext);
    let (acknowledged_bad, unacknowledged_bad): (Vec<u64>, Vec<u64>) =
        bad.iter().partition(|o| completed.contains(o));
    let (checked, _) = fio_issued(&vtext).unwrap_or((0, 0));
    let summary = format!(
        "{params}: writer issued {written} writes, {} acknowledged; verifier checked {checked}: \
         {} bad of which {} acknowledged; failover: committed epoch {}, {} blocks restored",
        completed.len(),
        bad.len(),
        acknowledged_bad.len(),
        v["committed_epoch"],
        v["restored_blocks"]
    );
    let context = format!(
        "{summary}\nacknowledged writes bad on the new primary (first 20): {:?}\n\
         --- writer:\n{}\n--- verifier:\n{}\n{}",
        &acknowledged_bad[..acknowledged_bad.len().min(20)],
        wtext.lines().take(40).collect::<Vec<_>>().join("\n"),
        vtext.lines().take(60).collect::<Vec<_>>().join("\n"),
        pair.logs()
    );
    // The verifier itself must have worked: either a clean pass, or failures it explained.
    assert!(
        (vout.status.success() && fio_errors(&vtext) == 0) || !bad.is_empty(),
        "[{params}] fio's verifier failed without reporting bad blocks:\n{context}"
    );
    // fio verifies everything up to the window of writes in flight at the crash: make sure
    // the check was not vacuous.
    assert!(
        checked > 0 && checked + 2 * u64::from(depth) >= written,
        "[{params}] fio's verifier checked only {checked} of {written} writes:\n{context}"
    );
    CrashVerify {
        summary,
        context,
        acknowledged_bad,
        unacknowledged_bad,
    }
}

#[test]
fn ack_durable_failover_to_latest_keeps_every_acknowledged_write() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "ack_durable_failover_to_latest_keeps_every_acknowledged_write",
        4,
        |_, rng| {
            let interval = rng.pick(&["50ms", "100ms"]);
            let r = crash_verify_trial(rng, "latest", interval);
            assert!(
                r.acknowledged_bad.is_empty(),
                "writes fio saw acknowledged (ack=durable) are missing or wrong on the secondary \
                 after failover --to latest:\n{}",
                r.context
            );
            if r.unacknowledged_bad.is_empty() {
                r.summary
            } else {
                format!(
                    "{} (fio also verified {} writes that were in flight at the crash: {:?})",
                    r.summary,
                    r.unacknowledged_bad.len(),
                    r.unacknowledged_bad
                )
            }
        },
    );
}

/// The control for test 2: the same crash, but failing over to the last checkpoint drops the
/// acknowledged writes of the open epoch, and the check must notice. This proves the
/// verify-state machinery and the completion-log cross-check have teeth with the nbd engine.
#[test]
fn fio_crash_verification_catches_writes_lost_by_failover_to_checkpoint() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "fio_crash_verification_catches_writes_lost_by_failover_to_checkpoint",
        1,
        |_, rng| {
            let r = crash_verify_trial(rng, "checkpoint", "300ms");
            assert!(
                !r.acknowledged_bad.is_empty(),
                "after failover --to checkpoint the writes acknowledged since the last checkpoint \
                 are gone, yet the crash check found nothing: it is vacuous:\n{}",
                r.context
            );
            r.summary
        },
    );
}
// ---------------------------------------------------------------------------------------------
// 3. kill -9 the secondary under fio load: the primary goes unprotected, clients see nothing.

fn kill_secondary_trial(rng: &mut Rng, ack: &str) -> String {
    require("qemu-io", "qemu-utils");
    let dir = scratch();
    let kill_ms = rng.range(300, 1200);
    let depth = rng.pick(&[16u32, 32]);
    let fio_seed = rng.next() % 1_000_000_007;
    let params = format!("ack={ack} iodepth={depth} kill the secondary after {kill_ms} ms");
    let mut pair = Pair::start(
        dir.path(),
        "64M",
        &s(&["--ack", ack, "--checkpoint-interval", "100ms"]),
    );
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &load_job(&pair.uri(), Some(fio_seed), depth, "64M", 2),
    );
    sleep_ms(kill_ms);
    pair.secondary.signal(libc::SIGKILL);
    pair.secondary.wait(Duration::from_secs(10));
    let st = fio.wait(Duration::from_secs(60));
    let text = fio.log_text();
    assert!(
        st.success() && fio_errors(&text) == 0 && text.contains("err= 0"),
        "[{params}] fio on the primary must not see the secondary die (exit {st}):\n{text}\n{}",
        pair.logs()
    );
    let v = status(&pair.p_sock).unwrap_or_else(|e| panic!("[{params}] {e}\n{}", pair.logs()));
    let dirty = v["dirty_blocks"].u64().unwrap_or(0);
    let reason = v["unprotected_reason"].str().unwrap_or("").to_string();
    let last_error = v["last_error"].str().unwrap_or("").to_string();
    let peer_state = v["peer_state"].str().unwrap_or("").to_string();
    assert!(
        matches!(v["mode"].str(), Some("paused" | "unprotected")) && dirty > 0,
        "[{params}] after losing the secondary the primary should be paused (reconnecting) \
         with dirty blocks recorded: {v}\n{}",
        pair.logs()
    );
    assert!(
        reason.contains(&pair.listen) && last_error.contains(&pair.listen),
        "[{params}] unprotected_reason and last_error should name the lost link to {}: \
         unprotected_reason={reason:?} last_error={last_error:?}\n{}",
        pair.listen,
        pair.logs()
    );
    assert!(
        ["lost", "paused", "unprotected"]
            .iter()
            .any(|p| peer_state.starts_with(p)),
        "[{params}] peer_state={peer_state:?}"
    );
    // Still serving, unprotected.
    let io = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 4096 8192",
            "-c",
            "read -P 0x3c 4096 8192",
            &pair.uri(),
        ],
        T,
    );
    assert!(
        !io.contains("Pattern verification failed") && !io.contains("error"),
        "[{params}] qemu-io on the unprotected primary:\n{io}"
    );
    let after = status(&pair.p_sock).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        after["dirty_blocks"].u64().unwrap_or(0) >= dirty,
        "[{params}] dirty blocks went down while unprotected: {dirty} then {after}"
    );
    pair.primary.signal(libc::SIGTERM);
    let st = pair.primary.wait(Duration::from_secs(30));
    assert!(
        st.success(),
        "[{params}] the unprotected primary exited with {st}\n{}",
        pair.logs()
    );
    let (_, w) = fio_issued(&text).unwrap_or((0, 0));
    format!("{params}: fio issued {w} writes without error; {dirty} dirty blocks; reason: {reason}")
}

#[test]
fn kill9_secondary_under_fio_primary_goes_unprotected() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "kill9_secondary_under_fio_primary_goes_unprotected",
        3,
        |i, rng| kill_secondary_trial(rng, ["received", "durable", "local"][i % 3]),
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Clean shutdown: SIGTERM the primary runs a final checkpoint; the images end identical.

fn clean_shutdown_trial(rng: &mut Rng, ack: &str, interval: &str) -> String {
    let dir = scratch();
    let params = format!("ack={ack} checkpoint-interval={interval}");
    let mut pair = Pair::start(
        dir.path(),
        "64M",
        &s(&["--ack", ack, "--checkpoint-interval", interval]),
    );
    let fio_seed = rng.next() % 1_000_000_007;
    let out = run(
        "fio",
        &[
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", pair.uri()),
            "--rw=randwrite",
            BSSPLIT,
            "--norandommap",
            &format!("--randseed={fio_seed}"),
            "--iodepth=32",
            "--size=64M",
            "--io_size=48M",
        ],
        Duration::from_secs(120),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && fio_errors(&text) == 0,
        "[{params}] fio:\n{text}\n{}",
        pair.logs()
    );
    let before = status(&pair.p_sock).unwrap_or_else(|e| panic!("{e}"));
    let committed_before = before["committed_epoch"].u64().unwrap_or(0);
    pair.primary.signal(libc::SIGTERM);
    let st = pair.primary.wait(Duration::from_secs(60));
    assert!(
        st.success(),
        "[{params}] the primary exited with {st} after SIGTERM\n{}",
        pair.logs()
    );
    assert!(
        strip_ansi(&pair.primary.log_text()).contains("final checkpoint committed"),
        "[{params}] the primary did not log a final checkpoint\n{}",
        pair.logs()
    );
    let sec = wait_status(
        &mut pair.secondary,
        &pair.s_sock,
        Duration::from_secs(15),
        "secondary",
        |v| v["mode"].str() == Some("waiting"),
    );
    let committed = sec["committed_epoch"].u64().unwrap_or(0);
    assert!(
        committed > committed_before,
        "[{params}] the secondary's committed epoch {committed} should be past the primary's \
         {committed_before} before shutdown (the final checkpoint): {sec}\n{}",
        pair.logs()
    );
    assert_eq!(
        sec["buffer"]["blocks"].u64(),
        Some(0),
        "[{params}] the secondary still buffers originals after the final checkpoint: {sec}"
    );
    pair.secondary.signal(libc::SIGTERM);
    let st = pair.secondary.wait(Duration::from_secs(30));
    assert!(
        st.success(),
        "[{params}] secondary exited with {st}\n{}",
        pair.logs()
    );
    let p = std::fs::read(&pair.p_img).expect("primary image");
    let q = std::fs::read(&pair.s_img).expect("secondary image");
    if let Some(at) = first_difference(&p, &q) {
        panic!(
            "[{params}] after a clean shutdown the images differ at byte {at} (block {})\n{}",
            at / 4096,
            pair.logs()
        );
    }
    assert!(
        p.iter().any(|&b| b != 0),
        "[{params}] the workload wrote nothing"
    );
    format!(
        "{params}: committed {committed_before} before SIGTERM, {committed} after; images identical"
    )
}

#[test]
fn sigterm_primary_runs_final_checkpoint_and_images_match() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "sigterm_primary_runs_final_checkpoint_and_images_match",
        3,
        |i, rng| {
            let (ack, interval) = [("local", "0"), ("received", "150ms"), ("durable", "1s")][i];
            clean_shutdown_trial(rng, ack, interval)
        },
    );
}

// ---------------------------------------------------------------------------------------------
// 5. The primary's status must not claim a checkpoint the secondary has not committed.
//
// The secondary commits epoch n before it answers COMMITTED(n), and only that answer may make
// the primary call n committed. So if the primary says "committed_epoch n" at time t1 and the
// secondary, asked afterwards at t2 > t1, has not committed n, the primary's claim was false
// when it was made. Monitoring (and test 1) trust this field to know what survives a crash.

#[test]
fn primary_status_committed_epoch_is_committed_on_the_secondary() {
    require("fio", "fio");
    let _g = heavy();
    let dir = scratch();
    // ack=local and a short period: the forward queue is deep, so draining an epoch (between
    // the cut and COMMITTED) takes a while.
    let pair = Pair::start(
        dir.path(),
        "64M",
        &s(&["--ack", "local", "--checkpoint-interval", "50ms"]),
    );
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &load_job(&pair.uri(), None, 32, "64M", 3),
    );
    let req = r#"{"cmd":"status"}"#;
    let start = Instant::now();
    let (mut samples, mut top_ahead, mut block_ahead) = (0u64, Vec::new(), Vec::new());
    while start.elapsed() < Duration::from_millis(2500) {
        let (Ok(p), Ok(q)) = (
            control(&pair.p_sock, req, Duration::from_secs(5)),
            control(&pair.s_sock, req, Duration::from_secs(5)),
        ) else {
            continue;
        };
        samples += 1;
        let top = p["committed_epoch"].u64().unwrap_or(0);
        let block = p["participants"]["block"]["committed_epoch"]
            .u64()
            .unwrap_or(0);
        let sec = q["committed_epoch"].u64().unwrap_or(0);
        if top > sec {
            top_ahead.push(format!(
                "primary committed_epoch={top} (epoch={}, block participant={block}), then the secondary committed_epoch={sec}",
                p["epoch"]
            ));
        }
        if block > sec {
            block_ahead.push(format!("block participant={block}, then secondary={sec}"));
        }
        sleep_ms(3);
    }
    let st = fio.wait(Duration::from_secs(60));
    let text = fio.log_text();
    assert!(
        st.success() && fio_errors(&text) == 0,
        "fio under load failed:\n{text}\n{}",
        pair.logs()
    );
    assert!(samples > 50, "only {samples} status pairs sampled");
    assert!(
        block_ahead.is_empty(),
        "the primary's block participant counted a checkpoint the secondary had not committed \
         ({} of {samples} samples), e.g. {:?}\n{}",
        block_ahead.len(),
        &block_ahead[..block_ahead.len().min(5)],
        pair.logs()
    );
    assert!(
        top_ahead.is_empty(),
        "the primary's status reported a committed_epoch the secondary had not committed yet in \
         {} of {samples} samples (status asked of the primary first, then of the secondary); \
         e.g.:\n{}\n(EpochCoordinator::status reports committed_epoch = current - 1, and \
         `current` advances at the cut, before the epoch is drained and COMMITTED)",
        top_ahead.len(),
        top_ahead[..top_ahead.len().min(5)].join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Surviving link loss and restarts: pause, reconnect, resync (incremental, checksum),
//    re-protect after failover, split-brain.

/// The load at a bounded rate (16 MB/s), so that an outage of a second or so dirties a
/// part of the disk, not all of it.
fn rated(mut job: Vec<String>) -> Vec<String> {
    job.push("--rate=16m".into());
    job
}

fn jbool(v: &Json) -> Option<bool> {
    match v {
        Json::Bool(b) => Some(*b),
        _ => None,
    }
}

fn jf64(v: &Json) -> f64 {
    match v {
        Json::Num(n) => *n,
        _ => 0.0,
    }
}

/// Wait until the primary replicates with its resync complete (the resync's checkpoint
/// committed, or nothing was left to send and a later checkpoint ran).
fn wait_synced(d: &mut Daemon, sock: &Path, deadline: Duration, min_sessions: u64) -> Json {
    wait_status(d, sock, deadline, "primary (resynced)", |v| {
        v["mode"].str() == Some("replicating")
            && jbool(&v["resyncing"]) == Some(false)
            && v["resync"]["state"].str() == Some("done")
            && v["sessions"].u64().unwrap_or(0) >= min_sessions
    })
}

fn assert_images_equal(a: &Path, b: &Path, what: &str, logs: &str) {
    let p = std::fs::read(a).expect("image");
    let q = std::fs::read(b).expect("image");
    if let Some(at) = first_difference(&p, &q) {
        panic!(
            "{what}: the images differ at byte {at} (block {})\n{logs}",
            at / 4096
        );
    }
}

fn fio_ok(fio: &mut Daemon, what: &str, logs: &str) {
    let st = fio.wait(Duration::from_secs(90));
    let out = fio.log_text();
    assert!(
        st.success() && fio_errors(&out) == 0,
        "{what}: fio failed ({st}):\n{}\n{logs}",
        out.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
}

#[derive(Default)]
struct ResyncTotals {
    cuts: u64,
    sent_bytes: u64,
    dirty_bytes: u64,
    resume_s: Vec<f64>,
}

fn link_cut_trial(rng: &mut Rng, totals: &mut ResyncTotals) -> String {
    require("fio", "fio");
    let dir = scratch();
    let ack = rng.pick(&["local", "received", "durable"]);
    let (mut pair, proxy) = Pair::start_full(
        dir.path(),
        "256M",
        &s(&[
            "--ack",
            ack,
            "--checkpoint-interval",
            "100ms",
            "--heartbeat",
            "100ms",
        ]),
        &[],
        true,
    );
    let proxy = proxy.expect("proxy");
    let seed = rng.next() % 100_000;
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &rated(load_job(&pair.uri(), Some(seed), 16, "256M", 12)),
    );
    let mut report = Vec::new();
    let mut sessions = 1;
    for k in 0..3 {
        sleep_ms(rng.range(200, 1000));
        proxy.cut();
        let down = rng.range(50, 1200);
        sleep_ms(down);
        proxy.heal();
        let double = rng.range(0, 2) == 0;
        if double {
            // Break it again while the two sides are comparing or resuming.
            sleep_ms(rng.range(5, 60));
            proxy.cut();
            sleep_ms(rng.range(50, 300));
            let sv = status(&pair.s_sock).unwrap_or(Json::Null);
            let smode = sv["mode"].str().unwrap_or("?").to_string();
            assert!(
                matches!(smode.as_str(), "paused" | "syncing" | "replicating"),
                "cut {k}: after a failed recovery the secondary is {smode}: {sv}"
            );
            assert!(
                sv["failover"] == Json::Null,
                "the secondary must not have failed over: {sv}"
            );
            proxy.heal();
        }
        sessions += 1;
        let v = wait_synced(
            &mut pair.primary,
            &pair.p_sock,
            Duration::from_secs(60),
            sessions,
        );
        sessions = v["sessions"].u64().unwrap_or(sessions);
        let r = &v["resync"];
        let sent = r["sent_bytes"].u64().unwrap_or(0);
        let dirty = r["dirty_at_start"].u64().unwrap_or(0) * 4096;
        assert_eq!(r["kind"].str(), Some("incremental"), "cut {k}: {v}");
        // What was dirty when the sync began, plus what fio wrote during the comparison.
        assert!(
            sent <= dirty + dirty / 4 + (1 << 20),
            "cut {k}: resent {sent} bytes, far more than the {dirty} bytes that may have differed: {v}"
        );
        assert!(
            sent < 32 << 20,
            "cut {k}: a full resend ({sent} bytes): {v}"
        );
        totals.cuts += 1 + u64::from(double);
        totals.sent_bytes += sent;
        totals.dirty_bytes += dirty;
        totals.resume_s.push(jf64(&v["last_resume_s"]));
        report.push(format!(
            "cut {down} ms{}: {} KiB resent of {} KiB dirty",
            if double {
                " (+ a cut during recovery)"
            } else {
                ""
            },
            sent / 1024,
            dirty / 1024
        ));
    }
    fio_ok(&mut fio, "fio through the cuts", &pair.logs());
    control(&pair.p_sock, r#"{"cmd":"checkpoint"}"#, T)
        .unwrap_or_else(|e| panic!("checkpoint after the cuts: {e}\n{}", pair.logs()));
    let v = status(&pair.p_sock).expect("status");
    assert_eq!(v["mode"].str(), Some("replicating"), "{v}");
    // An online verify agrees, then the files themselves.
    let (ok, out, err) = lockstep(&["verify", "--control", pair.p_sock.to_str().unwrap()], T);
    assert!(ok, "lockstep verify: {out}{err}\n{}", pair.logs());
    assert!(out.contains(": 0 differ"), "{out}");
    drop(fio);
    let logs = pair.logs();
    let (p_img, s_img) = (pair.p_img.clone(), pair.s_img.clone());
    pair.primary.signal(libc::SIGTERM);
    pair.primary.wait(Duration::from_secs(60));
    assert_images_equal(&p_img, &s_img, "after the cuts and a clean shutdown", &logs);
    format!("ack {ack}, {}", report.join("; "))
}

#[test]
fn link_cuts_under_fio_pause_and_resync_incrementally() {
    let _g = heavy();
    let mut totals = ResyncTotals::default();
    trials(
        "link_cuts_under_fio_pause_and_resync_incrementally",
        7,
        |_, rng| link_cut_trial(rng, &mut totals),
    );
    let mut r = totals.resume_s.clone();
    r.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "link cuts: {} cuts, resent {:.1} MiB of {:.1} MiB that may have differed (ratio {:.2}); time from the loss to resumed replication (cut + reconnect + compare): median {:.2} s, max {:.2} s",
        totals.cuts,
        totals.sent_bytes as f64 / (1 << 20) as f64,
        totals.dirty_bytes as f64 / (1 << 20) as f64,
        totals.sent_bytes as f64 / totals.dirty_bytes.max(1) as f64,
        r.get(r.len() / 2).copied().unwrap_or(0.0),
        r.last().copied().unwrap_or(0.0),
    );
    assert!(totals.cuts >= 20, "only {} cuts", totals.cuts);
}

fn secondary_args(pair: &Pair, size: &str, extra: &[&str]) -> Vec<String> {
    let mut a = s(&[
        "secondary",
        "--disk",
        pair.s_img.to_str().unwrap(),
        "--size",
        size,
        "--listen",
        &pair.listen,
        "--control",
        pair.s_sock.to_str().unwrap(),
        "--export",
        &pair.s_export,
    ]);
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

#[test]
fn restarted_secondary_under_fio_resyncs_incrementally() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "restarted_secondary_under_fio_resyncs_incrementally",
        3,
        |_, rng| {
            let dir = scratch();
            let ack = rng.pick(&["received", "durable"]);
            let mut pair = Pair::start(
                dir.path(),
                "256M",
                &s(&["--ack", ack, "--checkpoint-interval", "100ms"]),
            );
            let mut fio = start_fio(
                dir.path(),
                "fio-load",
                &rated(load_job(
                    &pair.uri(),
                    Some(rng.next() % 1000),
                    16,
                    "256M",
                    8,
                )),
            );
            sleep_ms(rng.range(1000, 2500));
            pair.secondary.signal(libc::SIGKILL);
            pair.secondary.wait(Duration::from_secs(10));
            sleep_ms(rng.range(200, 1500));
            let args = secondary_args(&pair, "256M", &[]);
            pair.secondary = Daemon::start("secondary2", &lockstep_bin(), &refs(&args), dir.path());
            let v = wait_synced(&mut pair.primary, &pair.p_sock, Duration::from_secs(60), 2);
            let r = &v["resync"];
            assert_eq!(r["kind"].str(), Some("incremental"), "{v}");
            let sent = r["sent_bytes"].u64().unwrap_or(0);
            assert!(sent < 128 << 20, "not a full resend: {v}");
            fio_ok(&mut fio, "fio across the restart", &pair.logs());
            control(&pair.p_sock, r#"{"cmd":"checkpoint"}"#, T).expect("checkpoint");
            let logs = pair.logs();
            pair.primary.signal(libc::SIGTERM);
            pair.primary.wait(Duration::from_secs(60));
            assert_images_equal(
                &pair.p_img,
                &pair.s_img,
                "after the secondary's restart",
                &logs,
            );
            format!(
                "ack {ack}: resent {} KiB of {} KiB dirty",
                sent / 1024,
                r["dirty_at_start"].u64().unwrap_or(0) * 4
            )
        },
    );
}

#[test]
fn a_secondary_with_other_data_gets_a_checksum_sync_of_the_differing_chunks() {
    let _g = heavy();
    let dir = scratch();
    let size = 32usize << 20;
    let (p_img, s_img) = (
        dir.path().join("primary.img"),
        dir.path().join("secondary.img"),
    );
    random_file(&p_img, size, 7);
    let mut other = std::fs::read(&p_img).unwrap();
    let chunks = [3usize, 100, 101, 400, 511];
    for c in chunks {
        other[c * 65536 + 1000] ^= 0xff;
    }
    std::fs::write(&s_img, &other).unwrap();
    let pair = Pair::start(dir.path(), "32M", &s(&["--checkpoint-interval", "200ms"]));
    let mut primary = pair.primary;
    let v = wait_synced(&mut primary, &pair.p_sock, Duration::from_secs(60), 1);
    let r = &v["resync"];
    assert_eq!(r["kind"].str(), Some("checksum"), "{v}");
    assert_eq!(r["compared_units"].u64(), Some(512), "{v}");
    assert_eq!(
        r["sent_bytes"].u64(),
        Some(chunks.len() as u64 * 65536),
        "only the differing chunks travel: {v}"
    );
    primary.signal(libc::SIGTERM);
    primary.wait(Duration::from_secs(60));
    assert_images_equal(&pair.p_img, &pair.s_img, "after the checksum sync", "");
}

/// Start `lockstep secondary` on `disk`, wait until it waits for a primary.
fn start_secondary_on(
    dir: &Path,
    name: &str,
    disk: &Path,
    listen: &str,
    sock: &Path,
    extra: &[&str],
) -> Daemon {
    let mut a = s(&[
        "secondary",
        "--disk",
        disk.to_str().unwrap(),
        "--listen",
        listen,
        "--control",
        sock.to_str().unwrap(),
    ]);
    a.extend(extra.iter().map(|x| x.to_string()));
    let mut d = Daemon::start(name, &lockstep_bin(), &refs(&a), dir);
    wait_status(&mut d, sock, Duration::from_secs(20), name, |v| {
        v["mode"].str() == Some("waiting")
    });
    d
}

/// Addresses for a pair whose roles are swapped (the old secondary's disk as the primary).
struct Swapped {
    listen2: String,
    export2: String,
    sock_p2: PathBuf,
    sock_s2: PathBuf,
}

impl Swapped {
    fn new(dir: &Path) -> Swapped {
        Swapped {
            listen2: format!("127.0.0.1:{}", free_port()),
            export2: format!("127.0.0.1:{}", free_port()),
            sock_p2: dir.join("p2.sock"),
            sock_s2: dir.join("s2.sock"),
        }
    }
}

fn primary_args(disk: &Path, export: &str, secondary: &str, sock: &Path) -> Vec<String> {
    s(&[
        "primary",
        "--disk",
        disk.to_str().unwrap(),
        "--export",
        export,
        "--secondary",
        secondary,
        "--control",
        sock.to_str().unwrap(),
        "--checkpoint-interval",
        "100ms",
        "--connect-timeout",
        "10s",
    ])
}

#[test]
fn failover_then_reprotect_with_the_old_primary_as_secondary() {
    require("fio", "fio");
    let _g = heavy();
    trials(
        "failover_then_reprotect_with_the_old_primary_as_secondary",
        2,
        |_, rng| {
            let dir = scratch();
            let mut pair = Pair::start(
                dir.path(),
                "64M",
                &s(&["--ack", "received", "--checkpoint-interval", "100ms"]),
            );
            let mut fio = start_fio(
                dir.path(),
                "fio-load",
                &load_job(&pair.uri(), Some(rng.next() % 1000), 16, "64M", 10),
            );
            sleep_ms(rng.range(1000, 3000));
            pair.primary.signal(libc::SIGKILL);
            pair.primary.wait(Duration::from_secs(10));
            let _ = fio.wait(Duration::from_secs(60));
            let (ok, out, err) = lockstep(
                &[
                    "failover",
                    "--control",
                    pair.s_sock.to_str().unwrap(),
                    "--to",
                    "checkpoint",
                    "--verify",
                ],
                T,
            );
            assert!(ok, "failover: {out}{err}");
            // The failed-over node becomes a replicating primary; the old primary's disk, with
            // its own unreplicated writes, becomes its secondary.
            pair.secondary.signal(libc::SIGTERM);
            pair.secondary.wait(Duration::from_secs(30));
            let Swapped {
                listen2,
                export2,
                sock_p2,
                sock_s2,
            } = Swapped::new(dir.path());
            let _sec2 = start_secondary_on(
                dir.path(),
                "secondary2",
                &pair.p_img,
                &listen2,
                &sock_s2,
                &[],
            );
            let pargs = primary_args(&pair.s_img, &export2, &listen2, &sock_p2);
            let mut p2 = Daemon::start("primary2", &lockstep_bin(), &refs(&pargs), dir.path());
            let v = wait_synced(&mut p2, &sock_p2, Duration::from_secs(60), 1);
            let r = &v["resync"];
            let sent = r["sent_bytes"].u64().unwrap_or(0);
            assert_eq!(r["kind"].str(), Some("checksum"), "{v}");
            let mut fio2 = start_fio(
                dir.path(),
                "fio-load2",
                &load_job(&format!("nbd://{export2}/lockstep"), Some(5), 8, "64M", 2),
            );
            fio_ok(&mut fio2, "fio on the new primary", &tail(&p2, 30));
            control(&sock_p2, r#"{"cmd":"checkpoint"}"#, T).expect("checkpoint");
            p2.signal(libc::SIGTERM);
            p2.wait(Duration::from_secs(60));
            assert_images_equal(
                &pair.s_img,
                &pair.p_img,
                "after re-protecting",
                &tail(&p2, 40),
            );
            format!(
                "re-protected: {} KiB sent ({} of {} chunks differed)",
                sent / 1024,
                r["compared_units"].u64().unwrap_or(0) - r["equal_units"].u64().unwrap_or(0),
                r["compared_units"].u64().unwrap_or(0)
            )
        },
    );
}

#[test]
fn split_brain_is_refused_until_discard_my_data() {
    require("fio", "fio");
    let _g = heavy();
    let dir = scratch();
    let (mut pair, proxy) = Pair::start_full(
        dir.path(),
        "64M",
        &s(&["--checkpoint-interval", "100ms", "--heartbeat", "100ms"]),
        &s(&["--on-peer-loss", "failover", "--heartbeat-misses", "3"]),
        true,
    );
    let proxy = proxy.expect("proxy");
    // The risk this test is about is on the operator's screen.
    let (ok, out, err) = lockstep(&["status", "--control", pair.s_sock.to_str().unwrap()], T);
    assert!(
        ok && out.contains("RISK") && out.contains("cannot tell a dead primary from a cut link"),
        "{out}{err}"
    );
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &load_job(&pair.uri(), Some(3), 16, "64M", 4),
    );
    sleep_ms(1000);
    proxy.cut();
    // The secondary fails over by itself; the primary keeps writing: both wrote as primary.
    wait_status(
        &mut pair.secondary,
        &pair.s_sock,
        Duration::from_secs(20),
        "secondary",
        |v| v["mode"].str() == Some("primary"),
    );
    sleep_ms(500);
    proxy.heal();
    let v = wait_status(
        &mut pair.primary,
        &pair.p_sock,
        Duration::from_secs(30),
        "primary",
        |v| {
            v["last_attempt_error"]
                .str()
                .is_some_and(|e| e.contains("split-brain"))
        },
    );
    assert_eq!(v["mode"].str(), Some("unprotected"), "{v}");
    fio_ok(&mut fio, "fio across the split", &pair.logs());
    pair.primary.signal(libc::SIGTERM);
    pair.primary.wait(Duration::from_secs(30));
    pair.secondary.signal(libc::SIGTERM);
    pair.secondary.wait(Duration::from_secs(30));
    // The operator keeps the failed-over node's data: without --discard-my-data the old
    // primary's disk refuses to become its secondary.
    let Swapped {
        listen2,
        export2,
        sock_p2,
        sock_s2,
    } = Swapped::new(dir.path());
    let sec2 = start_secondary_on(
        dir.path(),
        "old-primary-as-secondary",
        &pair.p_img,
        &listen2,
        &sock_s2,
        &[],
    );
    let pargs = primary_args(&pair.s_img, &export2, &listen2, &sock_p2);
    let (ok, out, err) = lockstep(&refs(&pargs), Duration::from_secs(60));
    assert!(!ok, "a primary started on a split-brain pair: {out}");
    assert!(
        err.contains("split-brain") && err.contains("--discard-my-data"),
        "{err}"
    );
    drop(sec2);
    let _sec2 = start_secondary_on(
        dir.path(),
        "old-primary-discarding",
        &pair.p_img,
        &listen2,
        &sock_s2,
        &["--discard-my-data"],
    );
    let mut p2 = Daemon::start("primary2", &lockstep_bin(), &refs(&pargs), dir.path());
    let v = wait_synced(&mut p2, &sock_p2, Duration::from_secs(60), 1);
    assert_eq!(v["resync"]["kind"].str(), Some("checksum"), "{v}");
    p2.signal(libc::SIGTERM);
    p2.wait(Duration::from_secs(60));
    assert_images_equal(
        &pair.s_img,
        &pair.p_img,
        "after --discard-my-data",
        &tail(&p2, 40),
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Hostile peers on the replication port. With --psk-file on both nodes, everything an
// attacker without the key tries is refused before any state changes: reading or writing
// the replica export with real NBD clients, a forged HELLO, a flood of idle connections
// from another host while the primary has to reconnect. The pair keeps replicating and the
// images stay equal (compared with cmp, not the daemons' own verify).

fn key_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).expect("key file");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    p
}

/// Stop the primary with SIGTERM (its final checkpoint) and compare the two images with
/// `cmp`, the real tool, not the daemons' own verify.
fn stop_and_cmp(pair: &mut Pair, what: &str, logs: &str) {
    pair.primary.signal(libc::SIGTERM);
    pair.primary.wait(Duration::from_secs(60));
    let out = run(
        "cmp",
        &[pair.p_img.to_str().unwrap(), pair.s_img.to_str().unwrap()],
        T,
    );
    assert!(
        out.status.success(),
        "the images differ {what}: {}\n{logs}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .expect("VmRSS")
}

/// What a raw connection that sends `bytes` at once gets back before the port closes it.
fn raw_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = c.write_all(bytes);
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    got
}

/// Keep up to `n` idle connections from 127.0.0.2 to `addr` open, reopening the ones the
/// port closes, until `stop`.
fn flood(addr: String, n: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let target: std::net::SocketAddr = addr.parse().expect("addr");
        let mut open: Vec<std::net::TcpStream> = Vec::new();
        let mut made = 0u64;
        while !stop.load(Ordering::Relaxed) {
            open.retain(|c| {
                let mut b = [0u8; 64];
                c.set_nonblocking(true).ok();
                !matches!(std::io::Read::read(&mut &*c, &mut b), Ok(0))
            });
            while open.len() < n {
                let sock = connect_from_other_host(target);
                match sock {
                    Some(c) => {
                        made += 1;
                        open.push(c)
                    }
                    None => break,
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        made
    })
}

/// A TCP connection from 127.0.0.2 (another host, as far as the port can tell).
fn connect_from_other_host(to: std::net::SocketAddr) -> Option<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2)/bind(2)/connect(2) on a descriptor this function owns; the
    // sockaddr structures live on the stack for the duration of each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let mut src: libc::sockaddr_in = std::mem::zeroed();
        src.sin_family = libc::AF_INET as libc::sa_family_t;
        src.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 2]);
        let mut dst: libc::sockaddr_in = std::mem::zeroed();
        dst.sin_family = libc::AF_INET as libc::sa_family_t;
        dst.sin_port = to.port().to_be();
        dst.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &src as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &dst as *const _ as *const libc::sockaddr, len) != 0
        {
            libc::close(fd);
            return None;
        }
        Some(std::net::TcpStream::from_raw_fd(fd))
    }
}

#[test]
fn hostile_peers_without_the_key_change_nothing() {
    require("fio", "fio");
    require("nbdinfo", "libnbd-bin");
    require("qemu-io", "qemu-utils");
    require("cmp", "diffutils");
    let _g = heavy();
    let dir = scratch();
    let key = key_file(
        dir.path(),
        "peer.key",
        "a secret both nodes share, 32 bytes",
    );
    let kf = s(&["--psk-file", key.to_str().unwrap()]);
    let mut pflags = kf.clone();
    pflags.extend(s(&[
        "--checkpoint-interval",
        "100ms",
        "--heartbeat",
        "100ms",
    ]));
    let (mut pair, proxy) = Pair::start_full(dir.path(), "64M", &pflags, &kf, true);
    let proxy = proxy.expect("proxy");
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &rated(load_job(&pair.uri(), Some(11), 8, "64M", 15)),
    );
    sleep_ms(500);
    let replica = format!("nbd://{}/lockstep-replica", pair.listen);

    // Read the replica export with libnbd's nbdinfo, write it with qemu-io.
    let out = run("nbdinfo", &[&replica], T);
    assert!(!out.status.success(), "nbdinfo read the replica export");
    let out = run(
        "qemu-io",
        &["-f", "raw", &replica, "-c", "write -P 0x55 0 4k"],
        T,
    );
    assert!(!out.status.success(), "qemu-io wrote the replica export");

    // Pose as a primary: a HELLO with an absurd heartbeat, then an NBD write request.
    let mut forged = blkrep::replica::wire::Message::Hello {
        size: 64 << 20,
        generation: 0x1234,
        history: vec![],
        tracked: 0,
        committed: 0,
        session: 1,
        ack: blkrep::replica::wire::AckMode::Received,
        heartbeat_ms: u32::MAX,
    }
    .encode();
    forged.extend_from_slice(&[0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1]);
    forged.resize(8192, 0x55);
    let got = raw_exchange(&pair.listen, &forged);
    assert!(
        got.starts_with(b"LSAUTH") && got.len() <= 40 + 33,
        "the port answered a forger with {} bytes: {:02x?}",
        got.len(),
        &got[..got.len().min(64)]
    );

    // A flood of idle connections from another host while the primary must reconnect.
    let rss_before = rss_kib(pair.secondary.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = flood(pair.listen.clone(), 200, stop.clone());
    sleep_ms(1000);
    let before = status(&pair.p_sock).expect("status")["sessions"]
        .u64()
        .unwrap_or(1);
    proxy.cut();
    sleep_ms(400);
    proxy.heal();
    let v = wait_synced(
        &mut pair.primary,
        &pair.p_sock,
        Duration::from_secs(30),
        before + 1,
    );
    stop.store(true, Ordering::Relaxed);
    let flooded = flooder.join().expect("flood thread");
    assert!(flooded > 8, "the flood opened only {flooded} connections");
    let rss_after = rss_kib(pair.secondary.pid());
    assert!(
        rss_after < rss_before + (64 << 10),
        "the secondary grew from {rss_before} KiB to {rss_after} KiB under the flood"
    );
    assert_eq!(v["mode"].str(), Some("replicating"), "{v}");

    fio_ok(&mut fio, "fio during the attacks", &pair.logs());
    let sv = status(&pair.s_sock).expect("secondary status");
    assert_eq!(sv["mode"].str(), Some("replicating"), "{sv}");
    assert!(sv["failover"] == Json::Null, "{sv}");
    assert_eq!(jbool(&sv["peer_auth"]["psk"]), Some(true), "{sv}");
    assert_eq!(jbool(&sv["peer_auth"]["tls"]), Some(false), "{sv}");
    let logs = pair.logs();
    assert!(
        logs.contains("wrong key") || logs.contains("closing connection"),
        "the secondary logged nothing about the strangers:\n{logs}"
    );
    stop_and_cmp(&mut pair, "after the attacks", &logs);
}

#[test]
fn peer_key_mistakes_are_clear_errors() {
    let dir = scratch();
    let key = key_file(
        dir.path(),
        "peer.key",
        "a secret both nodes share, 32 bytes",
    );
    let other = key_file(dir.path(), "other.key", "not the secret the secondary has");
    let kf = s(&["--psk-file", key.to_str().unwrap()]);
    let (pair, _) = Pair::start_full(dir.path(), "16M", &kf, &kf, false);
    let primary_with = |extra: &[&str]| {
        let mut a = vec![
            "primary".to_string(),
            "--disk".into(),
            dir.path().join("p2.img").to_str().unwrap().into(),
            "--size".into(),
            "16M".into(),
            "--export".into(),
            format!("127.0.0.1:{}", free_port()),
            "--secondary".into(),
            pair.listen.clone(),
            "--control".into(),
            dir.path().join("p2.sock").to_str().unwrap().into(),
            "--connect-timeout".into(),
            "5s".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        lockstep(&refs(&a), T)
    };
    let (ok, _, err) = primary_with(&[]);
    assert!(!ok && err.contains("--psk-file"), "no key: {err}");
    let (ok, _, err) = primary_with(&["--psk-file", other.to_str().unwrap()]);
    assert!(!ok && err.contains("refused our key"), "wrong key: {err}");
    // A key file others may read.
    let loose = dir.path().join("loose.key");
    std::fs::write(&loose, "a secret both nodes share, 32 bytes").unwrap();
    let (ok, _, err) = primary_with(&["--psk-file", loose.to_str().unwrap()]);
    assert!(!ok && err.contains("chmod 600"), "loose key: {err}");
    // A secondary beyond loopback without a key.
    let (ok, _, err) = lockstep(
        &[
            "secondary",
            "--disk",
            dir.path().join("s2.img").to_str().unwrap(),
            "--size",
            "16M",
            "--listen",
            "0.0.0.0:0",
            "--control",
            dir.path().join("s2.sock").to_str().unwrap(),
        ],
        T,
    );
    assert!(
        !ok && err.contains("--psk-file") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    assert!(
        !dir.path().join("s2.img").exists(),
        "the disk was created anyway"
    );
    // The pair was not disturbed.
    let v = status(&pair.p_sock).expect("status");
    assert_eq!(v["mode"].str(), Some("replicating"), "{v}");
}

/// A pair whose replication link runs over TLS, both nodes presenting a certificate of the
/// test CA (and the peer key on top): replicates under fio, and a primary with another CA's
/// certificate, or without TLS, is refused with a message that says so.
#[test]
fn a_tls_pair_replicates_and_refuses_other_certificates() {
    use lockstep_tests::tls::TestPki;
    require("fio", "fio");
    require("openssl", "openssl");
    require("cmp", "diffutils");
    let _g = heavy();
    let dir = scratch();
    let pki = TestPki::generate(&dir.path().join("pki"));
    let key = key_file(
        dir.path(),
        "peer.key",
        "a secret both nodes share, 32 bytes",
    );
    let tls = |cert: &Path, k: &Path, ca: &Path| {
        s(&[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            k.to_str().unwrap(),
            "--tls-ca",
            ca.to_str().unwrap(),
        ])
    };
    let mut sflags = tls(&pki.server_cert(), &pki.server_key(), &pki.ca());
    sflags.extend(s(&["--psk-file", key.to_str().unwrap()]));
    let mut pflags = tls(&pki.client_cert(), &pki.client_key(), &pki.ca());
    pflags.extend(s(&[
        "--psk-file",
        key.to_str().unwrap(),
        "--checkpoint-interval",
        "100ms",
    ]));
    let (mut pair, _) = Pair::start_full(dir.path(), "64M", &pflags, &sflags, false);
    let mut fio = start_fio(
        dir.path(),
        "fio-load",
        &rated(load_job(&pair.uri(), Some(5), 8, "64M", 4)),
    );
    fio_ok(&mut fio, "fio over a TLS link", &pair.logs());
    let v = status(&pair.p_sock).expect("status");
    assert_eq!(v["mode"].str(), Some("replicating"), "{v}");

    // Another primary: a certificate of another CA, then no TLS at all.
    let other = |flags: &[String]| {
        let mut a = s(&[
            "primary",
            "--disk",
            dir.path().join("p2.img").to_str().unwrap(),
            "--size",
            "64M",
            "--export",
            &format!("127.0.0.1:{}", free_port()),
            "--secondary",
            &pair.listen,
            "--control",
            dir.path().join("p2.sock").to_str().unwrap(),
            "--connect-timeout",
            "3s",
        ]);
        a.extend(flags.iter().cloned());
        lockstep(&refs(&a), T)
    };
    let (ok, _, err) = other(&tls(&pki.rogue_cert(), &pki.rogue_key(), &pki.ca()));
    assert!(!ok && err.contains("TLS"), "a rogue certificate: {err}");
    let (ok, _, err) = other(&s(&["--psk-file", key.to_str().unwrap()]));
    assert!(!ok, "a primary without TLS started: {err}");
    assert!(
        pair.secondary.log_text().contains("TLS handshake"),
        "the secondary logged no refused handshake"
    );

    let logs = pair.logs();
    stop_and_cmp(&mut pair, "after replicating over TLS", &logs);
}
