//! `lockstep demo`: lockstep's main job, end to end, on one machine.
//!
//! 1. a secondary and a primary start as separate processes on loopback, on fresh images;
//! 2. a verifiable write workload runs through the primary's NBD export while checkpoints
//!    run every `--interval`;
//! 3. the primary is killed with SIGKILL in the middle of the workload;
//! 4. the secondary fails over to the last committed checkpoint;
//! 5. the secondary's image is proven equal to the primary's image at that checkpoint (the
//!    primary's crc64-based digest, sent with the checkpoint, against the image's digest),
//!    and every block is checked to be either untouched or one whole write of the workload.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use blkrep::nbd::{ClientOptions, Endpoint, NbdClient};
use blkrep::replica::admin;
use blkrep::replica::primary::PrimaryOptions;
use blkrep::replica::status::{DigestCheck, FailoverReport, PrimaryStatus};
use blkrep::replica::wire::AckMode;
use clap::Args;
use serde_json::json;

use crate::units::{parse_size, DurationArg};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the workload runs before the primary is killed.
    #[arg(long, default_value = "5s")]
    duration: DurationArg,
    /// Disk size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// Checkpoint period.
    #[arg(long, default_value = "100ms")]
    interval: DurationArg,
    /// The primary's ack mode: local, received, durable or sync (docs/operations.md).
    #[arg(long, default_value = PrimaryOptions::default().ack.name(), value_parser = crate::units::choice::<AckMode>(crate::units::ACK_MODES))]
    ack: AckMode,
    /// Writes in flight.
    #[arg(long, default_value = "16")]
    depth: usize,
    /// Where the temporary images go (default: the system's temp directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the images and logs afterwards.
    #[arg(long)]
    keep: bool,
}

const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"LSDEMO01";

/// Block content: magic, block index, sequence, crc64 of the rest; the rest is derived from
/// (block, seq), so any torn or misplaced block is detected.
fn block_content(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    for chunk in b[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let crc = crc(&b[32..]);
    b[24..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn crc(b: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(b);
    d.sum64()
}

/// None: a valid block (zero, or one whole write); Some(reason) otherwise.
fn check_block(index: u64, b: &[u8]) -> Option<String> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    if &b[..8] != MAGIC {
        return Some("not a block the workload wrote".into());
    }
    let block = u64::from_le_bytes(b[8..16].try_into().expect("8"));
    let seq = u64::from_le_bytes(b[16..24].try_into().expect("8"));
    if block != index {
        return Some(format!("holds block {block}'s data"));
    }
    if b != block_content(block, seq).as_slice() {
        return Some(format!("torn write (seq {seq})"));
    }
    None
}

/// Kills the daemons and removes the files, whatever happens.
struct Cleanup {
    children: Vec<(String, Child)>,
    dir: PathBuf,
    keep: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.keep {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(port: u16, deadline: Duration, child: &mut Child, log: &Path) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "daemon exited ({st}) before listening; its log:\n{}",
                read_log(log)
            );
        }
        if Instant::now() > end {
            bail!(
                "nothing listens on port {port} after {deadline:?}; log:\n{}",
                read_log(log)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_log(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

fn spawn(name: &str, args: &[String], dir: &Path) -> anyhow::Result<(Child, PathBuf)> {
    let log = dir.join(format!("{name}.log"));
    let f = std::fs::File::create(&log)?;
    let child = Command::new(std::env::current_exe().context("finding the lockstep binary")?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .env("RUST_LOG", "info")
        .spawn()
        .with_context(|| format!("starting the {name}"))?;
    Ok((child, log))
}

#[derive(Default)]
struct Counters {
    writes: AtomicU64,
    bytes: AtomicU64,
    stop: AtomicBool,
}

/// A fresh random secret, readable by its owner only.
fn write_peer_key(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .context("reading /dev/urandom")?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    if a.size < 16 << 20 || a.size % BLOCK as u64 != 0 {
        bail!("--size must be a multiple of 4 KiB and at least 16M");
    }
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("lockstep-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cleanup = Cleanup {
        children: Vec::new(),
        dir: dir.clone(),
        keep: a.keep,
    };
    let (p_img, s_img) = (dir.join("primary.img"), dir.join("secondary.img"));
    let (p_sock, s_sock) = (dir.join("primary.sock"), dir.join("secondary.sock"));
    let (export, listen, s_export) = (free_port()?, free_port()?, free_port()?);
    let s = |v: &str| v.to_string();
    // The nodes prove a shared key on every replication connection, as in production.
    let key = dir.join("peer.key");
    write_peer_key(&key)?;
    // The flags both nodes take, then a node's own.
    let node_args = |role: &str, img: &Path, control: &Path, own: &[String]| {
        let mut v = vec![s(role), s("--disk"), img.display().to_string()];
        v.extend([s("--size"), a.size.to_string()]);
        v.extend([s("--control"), control.display().to_string()]);
        v.extend([s("--psk-file"), key.display().to_string()]);
        v.extend_from_slice(own);
        v
    };

    println!(
        "lockstep demo: replicating a {} MiB disk with a checkpoint every {}, ack={}",
        a.size >> 20,
        a.interval,
        a.ack.name()
    );
    println!(
        "  files in {} (peer.key: the secret both nodes prove on every replication connection)",
        dir.display()
    );
    let (mut sec, s_log) = spawn(
        "secondary",
        &node_args(
            "secondary",
            &s_img,
            &s_sock,
            &[
                s("--listen"),
                format!("127.0.0.1:{listen}"),
                s("--export"),
                format!("127.0.0.1:{s_export}"),
            ],
        ),
        &dir,
    )?;
    wait_port(listen, Duration::from_secs(20), &mut sec, &s_log)?;
    cleanup.children.push(("secondary".into(), sec));
    let (mut pri, p_log) = spawn(
        "primary",
        &node_args(
            "primary",
            &p_img,
            &p_sock,
            &[
                s("--export"),
                format!("127.0.0.1:{export}"),
                s("--secondary"),
                format!("127.0.0.1:{listen}"),
                s("--ack"),
                s(a.ack.name()),
                s("--checkpoint-interval"),
                a.interval.to_string(),
            ],
        ),
        &dir,
    )?;
    wait_port(export, Duration::from_secs(30), &mut pri, &p_log)?;
    let pri_pid = pri.id();
    cleanup.children.push(("primary".into(), pri));
    println!("  secondary pid {} on 127.0.0.1:{listen}, primary pid {pri_pid} exporting nbd://127.0.0.1:{export}", cleanup.children[0].1.id());

    let rt = crate::daemon::runtime()?;
    let counters = Arc::new(Counters::default());
    let blocks = a.size / BLOCK as u64;

    // The workload: `depth` writers, each owning the blocks i ≡ k (mod depth), so no two
    // writes to one block are ever in flight together.
    let client = rt
        .block_on(NbdClient::connect(
            &Endpoint::Tcp(format!("127.0.0.1:{export}")),
            &ClientOptions::default(),
        ))
        .map_err(|e| anyhow!("connecting to the primary's export: {e}"))?;
    let mut writers = Vec::new();
    for k in 0..a.depth as u64 {
        let c = client.clone();
        let n = counters.clone();
        let depth = a.depth as u64;
        writers.push(rt.spawn(async move {
            let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ (k + 1).wrapping_mul(0x9e37_79b9);
            let mut seq = 0u64;
            while !n.stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = (x % (blocks / depth)) * depth + k;
                seq += 1;
                let data = block_content(block, (k << 48) | seq);
                if c.write(block * BLOCK as u64, &data, false).await.is_err() {
                    return;
                }
                n.writes.fetch_add(1, Ordering::Relaxed);
                n.bytes.fetch_add(BLOCK as u64, Ordering::Relaxed);
            }
        }));
    }

    // Progress, with the primary's own numbers.
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_status: Option<PrimaryStatus> = None;
    let mut last_print = Instant::now() - Duration::from_secs(1);
    while start.elapsed() < a.duration.0 {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(v) = rt.block_on(admin::request(
            &p_sock,
            &json!({"cmd": "status"}),
            Duration::from_secs(2),
        )) {
            last_status = serde_json::from_value(v).ok().or(last_status);
        }
        let t = start.elapsed().as_secs_f64();
        let frac = (t / a.duration.0.as_secs_f64()).min(1.0);
        let bar: String = (0..30)
            .map(|i| if (i as f64) < frac * 30.0 { '#' } else { '-' })
            .collect();
        let mib = counters.bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        let line = format!(
            "  [{bar}] {t:4.1}s  {:>7} writes  {:6.1} MiB/s  checkpoint {:>4}  pause p99 {} µs",
            counters.writes.load(Ordering::Relaxed),
            mib / t.max(0.001),
            last_status
                .as_ref()
                .map_or(0, |s| s.checkpoints.committed_epoch),
            last_status
                .as_ref()
                .map_or(0, |s| s.checkpoints.checkpoint_pause_us.p99),
        );
        if tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            last_print = Instant::now();
        }
    }
    if tty {
        eprintln!();
    }

    // SIGKILL the primary in the middle of the workload.
    let st = last_status.ok_or_else(|| anyhow!("the primary never answered status"))?;
    let committed_seen = st.checkpoints.committed_epoch;
    let elapsed = start.elapsed();
    let (_, pri) = cleanup
        .children
        .iter_mut()
        .find(|(n, _)| n == "primary")
        .expect("primary");
    pri.kill().context("killing the primary")?;
    let _ = pri.wait();
    let writes = counters.writes.load(Ordering::Relaxed);
    let bytes = counters.bytes.load(Ordering::Relaxed);
    counters.stop.store(true, Ordering::Relaxed);
    println!(
        "  killed the primary (SIGKILL) after {:.1}s and {writes} writes",
        elapsed.as_secs_f64()
    );
    for w in writers {
        let _ = rt.block_on(w);
    }

    // Fail over to the last checkpoint, and prove the result.
    let t = Instant::now();
    let failover = rt
        .block_on(admin::request(
            &s_sock,
            &json!({"cmd": "failover", "to": "checkpoint"}),
            Duration::from_secs(120),
        ))
        .map_err(|e| anyhow!("failover: {e}\nsecondary log:\n{}", read_log(&s_log)))?;
    let failover: FailoverReport = serde_json::from_value(failover)?;
    let failover_time = t.elapsed();
    let verify = rt
        .block_on(admin::request(
            &s_sock,
            &json!({"cmd": "verify"}),
            Duration::from_secs(300),
        ))
        .map_err(|e| anyhow!("verify: {e}"))?;
    let verify: DigestCheck = serde_json::from_value(verify)?;
    let digest_ok = verify.equal();
    let committed = failover.committed_epoch;
    // Independent of the digest: every block is untouched or one whole write.
    let mut bad = Vec::new();
    let mut written_blocks = 0u64;
    {
        let mut f =
            std::fs::File::open(&s_img).with_context(|| format!("opening {}", s_img.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let mut index = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            for b in buf[..n].chunks(BLOCK) {
                if b.iter().any(|&x| x != 0) {
                    written_blocks += 1;
                }
                if let Some(why) = check_block(index, b) {
                    bad.push(format!("block {index}: {why}"));
                }
                index += 1;
            }
        }
    }
    let ok = digest_ok && bad.is_empty() && committed >= committed_seen && committed > 0;
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1000.0);
    let c = &st.checkpoints;
    println!();
    println!(
        "  {:<34} {writes} writes of 4 KiB, {} in flight",
        "workload", a.depth
    );
    println!(
        "  {:<34} {:.1} MiB/s, {:.0} IOPS",
        format!("throughput (ack={})", a.ack.name()),
        bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        writes as f64 / elapsed.as_secs_f64()
    );
    println!("  {:<34} {}", "checkpoints committed", c.checkpoints);
    println!(
        "  {:<34} p50 {}  p99 {}",
        "checkpoint pause (I/O cut)",
        ms(c.checkpoint_pause_us.p50),
        ms(c.checkpoint_pause_us.p99)
    );
    println!(
        "  {:<34} p50 {}  p99 {}",
        "checkpoint round trip",
        ms(c.checkpoint_total_us.p50),
        ms(c.checkpoint_total_us.p99)
    );
    println!(
        "  {:<34} {:.1} MiB",
        "bytes forwarded",
        st.block.forwarded_bytes as f64 / (1 << 20) as f64
    );
    println!(
        "  {:<34} {:.1} ms ({} blocks rolled back to checkpoint {committed})",
        "failover time",
        failover_time.as_secs_f64() * 1000.0,
        failover.restored_blocks
    );
    println!(
        "  {:<34} {} (image {}, checkpoint {})",
        "crc64 digest vs. checkpoint",
        if digest_ok { "EQUAL" } else { "DIFFERENT" },
        verify.image_digest,
        verify.checkpoint_digest.as_deref().unwrap_or("-")
    );
    println!(
        "  {:<34} {}",
        "block check",
        if bad.is_empty() {
            format!("all {written_blocks} written blocks whole and in place")
        } else {
            format!("{} bad blocks, e.g. {}", bad.len(), bad[0])
        }
    );
    println!();
    // Stop the secondary cleanly.
    let (_, sec) = cleanup
        .children
        .iter_mut()
        .find(|(n, _)| n == "secondary")
        .expect("secondary");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(sec.id().to_string())
        .status();
    let end = Instant::now() + Duration::from_secs(10);
    while sec.try_wait()?.is_none() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    if ok {
        println!("  RESULT: the secondary holds exactly the primary's disk as of checkpoint {committed}.");
        Ok(())
    } else {
        cleanup.keep = true;
        bail!(
            "verification failed (digest equal: {digest_ok}, bad blocks: {}, committed {committed}, last seen on the primary {committed_seen}); logs in {}",
            bad.len(),
            dir.display()
        )
    }
}
