//! fio as the load and the judge: the random-write job over fio's nbd engine, starting it in
//! the background, and reading its output (issued counts, job errors, the verifier's bad
//! blocks, the completion log).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::{refs, require, Daemon};

/// Block sizes for the fio loads: mostly 4 KiB, and sizes that are multiples of 512 but not
/// of 4096 (so writes cover partial blocks of the secondary's 4 KiB buffer), up to 64 KiB.
pub const BSSPLIT: &str = "--bssplit=512/5:1536/10:4k/45:7680/10:12k/10:36352/5:64k/15";

/// fio's summary counters: (reads issued, writes issued) from "issued rwts: total=R,W,…".
pub fn fio_issued(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.contains("issued rwts: total="))?;
    let rest = line.split("total=").nth(1)?;
    let mut it = rest.split([',', ' ']);
    let r = it.next()?.parse().ok()?;
    let w = it.next()?.parse().ok()?;
    Some((r, w))
}

/// Job-level error codes fio reported ("err= 0" is success).
pub fn fio_errors(text: &str) -> usize {
    text.split("err=")
        .skip(1)
        .filter(|rest| {
            let r = rest.trim_start();
            !r.starts_with("0:") && !r.starts_with("0 ") && !r.starts_with("0\n")
        })
        .count()
}

/// A time-based random-write load on `uri` with the mixed block sizes of [`BSSPLIT`].
pub fn load_job(
    uri: &str,
    seed: Option<u64>,
    depth: u32,
    size: &str,
    runtime_s: u32,
) -> Vec<String> {
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

/// The load at a bounded rate (16 MB/s), so that an outage of a second or so dirties a
/// part of the disk, not all of it.
pub fn rated(mut job: Vec<String>) -> Vec<String> {
    job.push("--rate=16m".into());
    job
}

/// fio in the background, its output in `dir/NAME.log`.
pub fn start_fio(dir: &Path, name: &str, args: &[String]) -> Daemon {
    require("fio", "fio");
    Daemon::start(name, Path::new("fio"), &refs(args), dir)
}

/// A load job (see [`load_job`]) in the background as `fio-load`.
pub fn start_load(dir: &Path, job: &[String]) -> Daemon {
    start_fio(dir, "fio-load", job)
}

/// Wait for a background fio and assert it ended without errors.
pub fn fio_ok(fio: &mut Daemon, what: &str, logs: &str) {
    let st = fio.wait(Duration::from_secs(90));
    let out = fio.log_text();
    assert!(
        st.success() && fio_errors(&out) == 0,
        "{what}: fio failed ({st}):\n{}\n{logs}",
        out.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
}

/// The offsets of writes that completed successfully, from fio's clat log
/// ("time, clat, ddir, bs, offset, prio"; ddir 1 is a write).
pub fn fio_completed_writes(log: &Path) -> HashSet<u64> {
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
pub fn fio_bad_blocks(text: &str) -> Vec<u64> {
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
