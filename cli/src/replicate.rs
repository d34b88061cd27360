//! `lockstep primary | secondary | status | checkpoint | failover`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context};
use blkrep::auth::PeerKey;
use blkrep::epoch::CoordinatorOptions;
use blkrep::nbd::{Endpoint, DEFAULT_ENDPOINT};
use blkrep::replica::admin;
use blkrep::replica::node::{self, PrimaryConfig, SecondaryConfig};
use blkrep::replica::primary::PrimaryOptions;
use blkrep::replica::secondary::{PeerLossPolicy, SecondaryOptions};
use blkrep::replica::wire::AckMode;
use blkrep::replica::FailoverTarget;
use blkrep::storage::DiskOptions;
use clap::Args;
use serde_json::{json, Value};

use crate::daemon::{runtime, shutdown_signal, UblkArgs};
use crate::units::{parse_size, DurationArg, SizeArg, ENDPOINT};

/// Flags both daemons share.
#[derive(Debug, Args)]
pub struct DiskArgs {
    /// The disk: a regular file or a block device.
    #[arg(long)]
    disk: PathBuf,
    /// Create the file, or grow it, to this size (e.g. 10G).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Unix control socket (JSON lines) for `lockstep status|checkpoint|failover`.
    #[arg(long)]
    control: PathBuf,
    /// A secret both nodes share (the same file on each; at least 16 bytes, mode 600):
    /// every replication connection proves it before anything else is read.
    /// Make one with `head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE`.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// TLS on the replication link: both nodes present a certificate (--tls-cert,
    /// --tls-key) that chains to --tls-ca, and verify the other's. Combines with --psk-file.
    #[command(flatten)]
    tls: crate::secure::TlsArgs,
}

impl DiskArgs {
    fn options(&self) -> DiskOptions {
        let mut o = DiskOptions::new(&self.disk);
        o.size = self.size;
        o.direct = self.direct;
        o
    }

    /// The peer key, read before anything starts.
    fn key(&self) -> anyhow::Result<Option<PeerKey>> {
        self.psk_file
            .as_deref()
            .map(PeerKey::from_file)
            .transpose()
            .map_err(Into::into)
    }
}

/// The secondary's library defaults, which its flags show and start from.
fn secondary_defaults() -> SecondaryOptions {
    node::default_secondary_options(Path::new(""))
}

/// The flag value of a peer-loss policy.
fn peer_loss_name(p: PeerLossPolicy) -> &'static str {
    match p {
        PeerLossPolicy::Failover => "failover",
        PeerLossPolicy::Wait => "wait",
    }
}

#[derive(Debug, Args)]
pub struct PrimaryArgs {
    #[command(flatten)]
    disk: DiskArgs,
    #[command(flatten)]
    ublk: UblkArgs,
    /// Where clients connect: ADDR:PORT, or unix:PATH.
    #[arg(long, value_name = ENDPOINT, default_value = DEFAULT_ENDPOINT)]
    export: Endpoint,
    /// Export name (the export also answers to the empty name).
    #[arg(long, default_value = node::DEFAULT_EXPORT_NAME)]
    name: String,
    /// The secondary's --listen endpoint: ADDR:PORT, or unix:PATH.
    #[arg(long, value_name = ENDPOINT)]
    secondary: Endpoint,
    /// What a client's write waits for: local (local disk), received (the secondary
    /// applied it), durable (the secondary has it on stable storage).
    #[arg(long, default_value = PrimaryOptions::default().ack.name())]
    ack: AckMode,
    /// Checkpoint period (e.g. 100ms, 2s; 0 for none).
    #[arg(long, default_value_t = DurationArg(CoordinatorOptions::default().interval.unwrap_or_default()))]
    checkpoint_interval: DurationArg,
    /// Also checkpoint once this much data was written in an epoch (0 for none).
    #[arg(long, default_value_t = SizeArg(CoordinatorOptions::default().bytes))]
    checkpoint_bytes: SizeArg,
    /// Bytes the forward queue holds before client writes wait.
    #[arg(long, default_value_t = SizeArg(PrimaryOptions::default().queue_bytes))]
    forward_queue: SizeArg,
    /// Heartbeat period on the control channel.
    #[arg(long, default_value_t = DurationArg(node::DEFAULT_HEARTBEAT))]
    heartbeat: DurationArg,
    /// Missed heartbeats before the secondary counts as lost.
    #[arg(long, default_value_t = node::DEFAULT_HEARTBEAT_MISSES)]
    heartbeat_misses: u32,
    /// How long to keep trying to reach the secondary at start.
    #[arg(long, default_value_t = DurationArg(node::DEFAULT_CONNECT_TIMEOUT))]
    connect_timeout: DurationArg,
    /// After losing the secondary, how long to stay `paused` (expecting it back) before
    /// calling this node unprotected; reconnection attempts go on either way, and what is
    /// written meanwhile is resynced incrementally when the secondary returns.
    #[arg(long, default_value_t = DurationArg(node::DEFAULT_RECONNECT_TIMEOUT))]
    reconnect_timeout: DurationArg,
}

#[derive(Debug, Args)]
pub struct SecondaryArgs {
    #[command(flatten)]
    disk: DiskArgs,
    #[command(flatten)]
    ublk: UblkArgs,
    /// Where the primary connects (replication data and control channel): ADDR:PORT, or
    /// unix:PATH.
    #[arg(long, value_name = ENDPOINT)]
    listen: Endpoint,
    /// Serve the secondary's own view here (COLO running secondary; after failover, the
    /// disk as an unprotected primary): ADDR:PORT, or unix:PATH.
    #[arg(long, value_name = ENDPOINT)]
    export: Option<Endpoint>,
    /// Export name for --export.
    #[arg(long, default_value = node::DEFAULT_EXPORT_NAME)]
    name: String,
    /// Disk buffer bytes kept in memory before spilling to a file next to the disk.
    #[arg(long, default_value_t = SizeArg(secondary_defaults().buffer_memory))]
    buffer_memory: SizeArg,
    /// After the primary misses --heartbeat-misses heartbeats: fail over to the last
    /// checkpoint, or wait for an operator.
    #[arg(long, default_value = peer_loss_name(secondary_defaults().on_peer_loss))]
    on_peer_loss: PeerLossPolicy,
    /// Missed heartbeat periods (the primary's period) before the primary counts as lost.
    #[arg(long, default_value_t = secondary_defaults().heartbeat_misses)]
    heartbeat_misses: u32,
    /// Let a primary overwrite data this disk has and the primary does not (after a
    /// split-brain, or when this disk was written as a primary later): DRBD's option of the
    /// same name. Without it such a primary is refused.
    #[arg(long)]
    discard_my_data: bool,
    /// Listen on a non-loopback address without --psk-file or --tls-cert. Anyone who
    /// reaches the address can then write this disk, pose as its primary or make it fail
    /// over.
    #[arg(long)]
    insecure_no_auth: bool,
}

pub fn primary(a: PrimaryArgs) -> anyhow::Result<()> {
    let key = a.disk.key()?;
    let tls = a.disk.tls.link_files()?;
    let cfg = PrimaryConfig {
        disk: a.disk.options(),
        export: a.export,
        export_name: a.name,
        secondary: a.secondary,
        control: a.disk.control,
        primary: PrimaryOptions {
            ack: a.ack,
            queue_bytes: a.forward_queue.0,
            ..PrimaryOptions::default()
        },
        checkpoints: CoordinatorOptions {
            interval: Some(a.checkpoint_interval.0).filter(|d| !d.is_zero()),
            bytes: a.checkpoint_bytes.0,
        },
        heartbeat: a.heartbeat.0,
        heartbeat_misses: a.heartbeat_misses,
        connect_timeout: a.connect_timeout.0,
        reconnect_timeout: a.reconnect_timeout.0,
        ublk: a.ublk.options()?,
        key,
        tls,
    };
    runtime()?
        .block_on(node::run_primary(cfg, shutdown_signal()))
        .map_err(|e| anyhow!(e))
}

pub fn secondary(a: SecondaryArgs) -> anyhow::Result<()> {
    let mut opts = node::default_secondary_options(&a.disk.disk);
    opts.buffer_memory = a.buffer_memory.0;
    opts.on_peer_loss = a.on_peer_loss;
    opts.heartbeat_misses = a.heartbeat_misses;
    opts.discard_my_data = a.discard_my_data;
    let key = a.disk.key()?;
    let tls = a.disk.tls.link_files()?;
    let cfg = SecondaryConfig {
        disk: a.disk.options(),
        listen: a.listen,
        control: a.disk.control,
        export: a.export,
        export_name: a.name,
        secondary: opts,
        ublk: a.ublk.options()?,
        key,
        tls,
        insecure_no_auth: a.insecure_no_auth,
    };
    runtime()?
        .block_on(node::run_secondary(cfg, shutdown_signal()))
        .map_err(|e| anyhow!(e))
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long)]
    control: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The primary's control socket.
    #[arg(long)]
    control: PathBuf,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The primary's control socket.
    #[arg(long)]
    control: PathBuf,
}

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// The secondary's control socket.
    #[arg(long)]
    control: PathBuf,
    /// checkpoint: the last committed checkpoint (COLO); latest: every write the secondary
    /// acknowledged (DRBD).
    #[arg(long, value_parser = |s: &str| s.parse::<FailoverTarget>())]
    to: FailoverTarget,
    /// Afterwards, compare the disk with the checkpoint's digest sent by the primary.
    #[arg(long)]
    verify: bool,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

fn call(control: &std::path::Path, req: Value, timeout: Duration) -> anyhow::Result<Value> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(admin::request(control, &req, timeout))
        .map_err(|e| anyhow!(e))
}

/// [`call`], printing the answer as JSON when `json` (the caller prints text otherwise).
fn call_printing_json(
    control: &std::path::Path,
    req: Value,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<Value> {
    let v = call(control, req, timeout)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(v)
}

fn us(v: &Value) -> String {
    match v.as_u64() {
        Some(n) if n >= 10_000 => format!("{:.1} ms", n as f64 / 1000.0),
        Some(n) => format!("{n} µs"),
        None => "-".into(),
    }
}

fn bytes(v: &Value) -> String {
    let Some(n) = v.as_u64() else {
        return "-".into();
    };
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < units.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let req = json!({"cmd": "status"});
    let v = call_printing_json(&a.control, req, Duration::from_secs(10), a.json)?;
    if a.json {
        return Ok(());
    }
    let row = |k: &str, val: String| println!("{k:<22} {val}");
    row("role", text(&v["role"]));
    row("mode", text(&v["mode"]));
    row(
        "epoch",
        format!(
            "{} (committed {})",
            text(&v["epoch"]),
            text(&v["committed_epoch"])
        ),
    );
    row(
        "peer",
        format!("{} ({})", text(&v["peer"]), text(&v["peer_state"])),
    );
    let forwarded = format!(
        "{} writes, {}",
        text(&v["forwarded_writes"]),
        bytes(&v["forwarded_bytes"])
    );
    let percentiles = |key: &str| format!("p50 {}  p99 {}", us(&v[key]["p50"]), us(&v[key]["p99"]));
    let is_primary = v["role"] == "primary" && v.get("forward_queue").is_some();
    // What holds writes on their way: the primary's forward queue, the secondary's buffer.
    let (held, held_summary, failed, failed_key) = if is_primary {
        row("ack", text(&v["ack"]));
        let q = &v["forward_queue"];
        let summary = format!("{} requests, {}", text(&q["depth"]), bytes(&q["bytes"]));
        ("forward queue", summary, "failed", "checkpoint_failures")
    } else {
        let b = &v["buffer"];
        let summary = format!(
            "{} blocks: {} in memory, {} spilled, {} open epochs",
            text(&b["blocks"]),
            bytes(&b["memory_bytes"]),
            bytes(&b["spill_bytes"]),
            text(&b["epochs"])
        );
        ("buffer", summary, "aborted", "checkpoints_aborted")
    };
    row(held, held_summary);
    row("forwarded", forwarded);
    let checkpoints = text(&v["checkpoints"]);
    row(
        "checkpoints",
        format!("{checkpoints} ({} {failed})", text(&v[failed_key])),
    );
    if is_primary {
        row("checkpoint pause", percentiles("checkpoint_pause_us"));
        row("checkpoint total", percentiles("checkpoint_total_us"));
        row("dirty blocks", text(&v["dirty_blocks"]));
        let r = &v["resync"];
        if !r["kind"].is_null() {
            row(
                "resync",
                format!(
                    "{} {}: {} of {} units equal, {} of {} blocks sent ({}), {:.1} MB/s",
                    text(&r["kind"]),
                    text(&r["state"]),
                    text(&r["equal_units"]),
                    text(&r["compared_units"]),
                    text(&r["sent_blocks"]),
                    text(&r["to_send_blocks"]),
                    bytes(&r["sent_bytes"]),
                    r["throughput_mb_s"].as_f64().unwrap_or(0.0)
                ),
            );
        }
        row("generation", text(&v["generation"]));
    } else {
        row("epoch-mark stall", percentiles("mark_drain_us"));
        row(
            "consistent",
            format!(
                "{}{}",
                text(&v["consistent"]),
                match &v["resyncing"] {
                    Value::String(k) => format!(" (resyncing: {k})"),
                    _ => String::new(),
                }
            ),
        );
        row("generation", text(&v["generation"]));
        let pa = &v["peer_auth"];
        if pa.is_object() {
            let how = match (pa["tls"].as_bool(), pa["psk"].as_bool()) {
                (Some(true), Some(true)) => "TLS certificates and peer key",
                (Some(true), _) => "TLS certificates",
                (_, Some(true)) => "peer key (--psk-file)",
                _ => "none",
            };
            row("peer authentication", how.to_string());
            for r in pa["risks"].as_array().into_iter().flatten() {
                row("RISK", text(r));
            }
        }
        if !v["failover"].is_null() {
            row(
                "failover",
                format!(
                    "to {} at epoch {}, {} blocks restored in {}",
                    text(&v["failover"]["target"]),
                    text(&v["failover"]["committed_epoch"]),
                    text(&v["failover"]["restored_blocks"]),
                    us(&v["failover"]["duration_us"])
                ),
            );
            row("dirty blocks", text(&v["dirty_blocks"]));
        }
    }
    row("last error", text(&v["last_error"]));
    Ok(())
}

pub fn checkpoint(a: CheckpointArgs) -> anyhow::Result<()> {
    let v = call(
        &a.control,
        json!({"cmd": "checkpoint"}),
        Duration::from_secs(60),
    )?;
    println!(
        "checkpoint of epoch {} committed: pause {}, total {}",
        text(&v["epoch"]),
        us(&v["pause_us"]),
        us(&v["total_us"])
    );
    Ok(())
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    // Reads both disks whole: allow an hour.
    let req = json!({"cmd": "verify"});
    let v = call_printing_json(&a.control, req, Duration::from_secs(3600), a.json)?;
    if !a.json {
        let (compared, chunk) = (bytes(&v["bytes_compared"]), bytes(&v["chunk_bytes"]));
        let (chunks, differ) = (text(&v["total_chunks"]), text(&v["differing_chunks"]));
        let secs = v["duration_s"].as_f64().unwrap_or(0.0);
        let rate = v["mb_per_s"].as_f64().unwrap_or(0.0);
        println!(
            "compared {compared} in {chunks} chunks of {chunk} in {secs:.2} s ({rate:.0} MB/s): {differ} differ"
        );
        for d in v["differing"].as_array().into_iter().flatten() {
            println!(
                "  differs: offset {} length {}",
                text(&d["offset"]),
                text(&d["len"])
            );
        }
    }
    if v["differing_chunks"].as_u64() != Some(0) {
        return Err(anyhow!("the primary's and the secondary's disks differ"));
    }
    Ok(())
}

pub fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    let req = json!({"cmd": "failover", "to": a.to.name(), "verify": a.verify});
    let v = call_printing_json(&a.control, req, Duration::from_secs(600), a.json)?;
    if !a.json {
        println!(
            "failed over to {} (epoch {}): {} blocks restored in {}",
            text(&v["target"]),
            text(&v["committed_epoch"]),
            text(&v["restored_blocks"]),
            us(&v["duration_us"])
        );
        if a.verify {
            match v["verified"].as_bool() {
                Some(true) => println!(
                    "verified: the disk equals checkpoint {} (digest {})",
                    text(&v["committed_epoch"]),
                    text(&v["image_digest"])
                ),
                Some(false) => println!(
                    "VERIFY FAILED: disk digest {} differs from the checkpoint's {}",
                    text(&v["image_digest"]),
                    text(&v["checkpoint_digest"])
                ),
                None => println!(
                    "not verifiable (failover to latest, or the secondary wrote to its disk)"
                ),
            }
        }
    }
    if v["verified"] == json!(false) {
        return Err(anyhow!("the disk does not match the checkpoint"));
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct UblkDeleteArgs {
    /// The device id (N in /dev/ublkbN).
    #[arg(long)]
    id: u32,
}

pub fn ublk_delete(a: UblkDeleteArgs) -> anyhow::Result<()> {
    blkrep::ublk::delete(a.id)?;
    println!("deleted /dev/ublkb{}", a.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Primary {
        #[command(flatten)]
        a: PrimaryArgs,
    }

    #[derive(Debug, Parser)]
    struct Secondary {
        #[command(flatten)]
        a: SecondaryArgs,
    }

    /// The defaults shown in `--help` come from the library and parse back to its values.
    #[test]
    fn defaults_are_the_library_s() {
        let disk = ["x", "--disk", "d", "--control", "c"];
        let p = Primary::parse_from(disk.iter().chain(&["--secondary", "b:1"])).a;
        let (o, c) = (PrimaryOptions::default(), CoordinatorOptions::default());
        assert_eq!(p.ack, o.ack);
        assert_eq!(p.forward_queue.0, o.queue_bytes);
        assert_eq!(Some(p.checkpoint_interval.0), c.interval);
        assert_eq!(p.checkpoint_bytes.0, c.bytes);
        assert_eq!(p.heartbeat.0, node::DEFAULT_HEARTBEAT);
        assert_eq!(p.heartbeat_misses, node::DEFAULT_HEARTBEAT_MISSES);
        assert_eq!(p.connect_timeout.0, node::DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(p.reconnect_timeout.0, node::DEFAULT_RECONNECT_TIMEOUT);
        assert_eq!(p.export, DEFAULT_ENDPOINT.parse::<Endpoint>().unwrap());
        assert_eq!(p.name, node::DEFAULT_EXPORT_NAME);
        let s = Secondary::parse_from(disk.iter().chain(&["--listen", "a:1"])).a;
        let o = secondary_defaults();
        assert_eq!(s.buffer_memory.0, o.buffer_memory);
        assert_eq!(s.on_peer_loss, o.on_peer_loss);
        assert_eq!(s.heartbeat_misses, o.heartbeat_misses);
        assert_eq!(s.name, node::DEFAULT_EXPORT_NAME);
    }
}
