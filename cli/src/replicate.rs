//! `lockstep primary | secondary | status | checkpoint | failover`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use blkrep::auth::PeerKey;
use blkrep::epoch::{CoordinatorOptions, GuestHook, GuestHooks, QmpGuest};
use blkrep::nbd::{Endpoint, DEFAULT_ENDPOINT};
use blkrep::replica::admin;
use blkrep::replica::node::{self, PrimaryConfig, SecondaryConfig};
use blkrep::replica::primary::PrimaryOptions;
use blkrep::replica::secondary::{PeerLossPolicy, SecondaryOptions};
use blkrep::replica::status::{DigestCheck, FailoverReport, NodeStatus, VerifyReport};
use blkrep::replica::wire::AckMode;
use blkrep::replica::FailoverTarget;
use blkrep::storage::DiskOptions;
use clap::Args;
use memrep::device::{DeviceReplica, DeviceState};
use serde_json::{json, Value};

use crate::daemon::UblkArgs;
use crate::memory::MemoryArg;
use crate::report;
use crate::service::{Service, ServiceArgs};
use crate::units::{
    choice, parse_size, DurationArg, SizeArg, ACK_MODES, ENDPOINT, FAILOVER_TARGETS,
    PEER_LOSS_POLICIES,
};

/// Flags both daemons share.
#[derive(Debug, Args)]
pub struct DiskArgs {
    /// The disk: a regular file or a block device.
    #[arg(long)]
    disk: PathBuf,
    /// Create the file, or grow it, to this size (e.g. 10G, 1.5GiB).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Do not take QEMU-compatible locks on the disk, nor refuse one that another process
    /// (a QEMU VM, qemu-nbd, qemu-img, another lockstep) holds: QEMU's locking=off.
    #[arg(long)]
    no_lock: bool,
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
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. 127.0.0.1:9810).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    #[command(flatten)]
    service: ServiceArgs,
}

impl DiskArgs {
    fn options(&self) -> DiskOptions {
        let mut o = DiskOptions::new(&self.disk);
        o.size = self.size;
        o.direct = self.direct;
        o.lock = !self.no_lock;
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
    /// Where clients connect: an endpoint (forms below).
    #[arg(long, value_name = ENDPOINT, default_value = DEFAULT_ENDPOINT)]
    export: Endpoint,
    /// Export name (the export also answers to the empty name).
    #[arg(long, default_value = node::DEFAULT_EXPORT_NAME)]
    name: String,
    /// The secondary's --listen endpoint: an endpoint (forms below).
    #[arg(long, value_name = ENDPOINT)]
    secondary: Endpoint,
    /// What a client's write waits for, as DRBD's protocols: local (A: the local disk;
    /// forwarding queued), received (B: the secondary has it in memory), durable (C: the
    /// secondary wrote it to its disk); sync: stable storage on both (FUA every write).
    #[arg(long, default_value = PrimaryOptions::default().ack.name(), value_parser = choice::<AckMode>(ACK_MODES))]
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
    /// A shared-memory region replicated with the disk, at the same checkpoints (a file in
    /// /dev/shm or on hugetlbfs, e.g. QEMU's memory-backend-file,share=on). With
    /// writer=SOCKET, a writer process may hand over its userfaultfd there (memrep's
    /// hand-over); dirty pages are then tracked by write-protect and the writer is paused
    /// at each cut. Repeat for several regions; the secondary lists its copies in the same
    /// order.
    #[arg(long = "memory", value_name = "PATH[,writer=SOCKET]")]
    memory: Vec<MemoryArg>,
    /// A QEMU VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`): the VM is stopped for
    /// each checkpoint's cut and continued after it (left alone if it was not running).
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Also replicate the VM's device state (needs --qmp, and the guest's RAM as a shared
    /// `memory-backend-file` given to --memory): QEMU writes it to PATH at each checkpoint
    /// (`migrate` with x-ignore-shared while the VM is stopped), lockstep sends it on.
    #[arg(long, value_name = "PATH", requires = "qmp")]
    device_state: Option<PathBuf>,
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
    /// Where the primary connects (replication data and control channel): an endpoint
    /// (forms below). Not loopback: needs --psk-file or TLS (or --insecure-no-auth).
    #[arg(long, value_name = ENDPOINT)]
    listen: Endpoint,
    /// Serve the secondary's own view here (COLO running secondary; after failover, the
    /// disk as an unprotected primary): an endpoint (forms below).
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
    #[arg(long, default_value = peer_loss_name(secondary_defaults().on_peer_loss), value_parser = choice::<PeerLossPolicy>(PEER_LOSS_POLICIES))]
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
    /// This node's copy of a primary's --memory region (same size): it holds the last
    /// committed checkpoint's memory, and after failover whatever takes over maps it. Repeat
    /// in the primary's order.
    #[arg(long = "memory", value_name = "PATH")]
    memory: Vec<MemoryArg>,
    /// Keep the VM device state the primary sends (its --device-state) at PATH.<epoch> per
    /// checkpoint; a failover puts the committed checkpoint's at PATH, for
    /// `lockstep vm-resume`.
    #[arg(long, value_name = "PATH")]
    device_state: Option<PathBuf>,
}

pub fn primary(a: PrimaryArgs) -> anyhow::Result<()> {
    let service = Service::new(&a.disk.service)?;
    let memory = crate::memory::primary(&a.memory)?;
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
        metrics: a.disk.metrics,
        connect_timeout: a.connect_timeout.0,
        reconnect_timeout: a.reconnect_timeout.0,
        ublk: a.ublk.options()?,
        key,
        tls,
    };
    service.runtime()?.block_on(async {
        memory.serve_writers().await?;
        if a.qmp.is_some() {
            memory.follow_vm();
        }
        let mut participants = memory.participants;
        let guest: Arc<dyn GuestHook> = match &a.qmp {
            Some(p) => {
                let qmp = Arc::new(QmpGuest::new(p, QMP_TIMEOUT));
                if let Some(scratch) = &a.device_state {
                    participants.push(Arc::new(DeviceState::new(qmp.clone(), scratch)));
                }
                // The VM stops first and continues last: the writers it runs are quiet by then.
                Arc::new(GuestHooks(vec![qmp, memory.pause]))
            }
            None => memory.pause,
        };
        let stop = service.shutdown_signal("stopping: final checkpoint, goodbye, flush")?;
        let r = node::run_primary_ready(cfg, participants, guest, stop, service.hook()).await;
        service.finish();
        r.map_err(|e| anyhow!(e))
    })
}

/// How long one QMP command (`query-status`, `stop`, `cont`) may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

pub fn secondary(a: SecondaryArgs) -> anyhow::Result<()> {
    let service = Service::new(&a.disk.service)?;
    let mut memory = crate::memory::secondary(&a.memory)?;
    if let Some(p) = &a.device_state {
        memory.push(Arc::new(DeviceReplica::new(p)));
    }
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
        metrics: a.disk.metrics,
    };
    let rt = service.runtime()?;
    let stop = {
        let _in_runtime = rt.enter();
        service.shutdown_signal("stopping: flush")?
    };
    let r = rt.block_on(node::run_secondary_ready(cfg, memory, stop, service.hook()));
    service.finish();
    r.map_err(|e| anyhow!(e))
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
    /// The primary's control socket (on a node that failed over: compares its disk with the
    /// checkpoint it took over at).
    #[arg(long)]
    control: PathBuf,
    /// Resend the chunks that differ from the primary, commit them with a checkpoint and
    /// compare them again; exit 0 when the disks are equal at the end.
    #[arg(long)]
    repair: bool,
    /// Print the raw JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The primary's control socket (a node that failed over has no secondary to
    /// checkpoint with).
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
    #[arg(long, value_parser = choice::<FailoverTarget>(FAILOVER_TARGETS))]
    to: FailoverTarget,
    /// Afterwards, compare the disk with the checkpoint's digest sent by the primary.
    #[arg(long)]
    verify: bool,
    /// Take over even though the primary is still connected and replicating. Without it
    /// that is refused: if the primary goes on serving its clients, both nodes accept
    /// writes (split brain). Stop or fence the primary first.
    #[arg(long)]
    force: bool,
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

/// An exit code that is a command's answer, not an error (nothing more is printed).
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// `lockstep status`'s exit codes (docs/operations.md): whether the disk is protected now.
pub mod exit_code {
    /// Protected: replicating, no resync running, the secondary consistent.
    pub const PROTECTED: u8 = 0;
    /// Not protected right now, but on the way back by itself: paused (the link is down
    /// and being retried), a sync or resync running, a secondary waiting for its primary.
    pub const DEGRADED: u8 = 3;
    /// Unprotected, and an operator must act: the primary gave up on its secondary, or this
    /// node failed over and serves alone.
    pub const UNPROTECTED: u8 = 4;
    /// The secondary holds no checkpoint it could fail over to (it restarted mid-session).
    pub const INCONSISTENT: u8 = 5;
}

/// The exit code `lockstep status` gives for a daemon's status.
pub fn status_code(v: &Value) -> u8 {
    use exit_code::*;
    let mode = v["mode"].as_str().unwrap_or("");
    match v["role"].as_str().unwrap_or("") {
        _ if v["consistent"] == false => INCONSISTENT,
        _ if mode == "primary" || mode == "unprotected" => UNPROTECTED,
        "primary" | "secondary" if mode == "replicating" => {
            let resyncing = v["resyncing"].as_bool() == Some(true)
                || v["resyncing"].is_string()
                || v["resync"]["state"]
                    .as_str()
                    .is_some_and(|s| s != "done" && !s.is_empty());
            if resyncing {
                DEGRADED
            } else {
                PROTECTED
            }
        }
        "primary" | "secondary" => DEGRADED,
        // netcmp and plain exports have no protection to report.
        _ => PROTECTED,
    }
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let req = json!({"cmd": "status"});
    let v = call_printing_json(&a.control, req, Duration::from_secs(10), a.json)?;
    let code = status_code(&v);
    if !a.json && v.get("role").and_then(Value::as_str) == Some("netcmp") {
        if v.get("frontend").and_then(Value::as_str) == Some("packet") {
            let st: netcmp::PacketStatus =
                serde_json::from_value(v).context("netcmp's status is not one this CLI reads")?;
            report::netcmp_packet(&st);
        } else {
            let st: netcmp::ProxyStatus =
                serde_json::from_value(v).context("netcmp's status is not one this CLI reads")?;
            report::netcmp(&st);
        }
    } else if !a.json {
        let st: NodeStatus =
            serde_json::from_value(v).context("the daemon's status is not one this CLI reads")?;
        report::status(&st);
    }
    if code != exit_code::PROTECTED {
        return Err(Exit(code).into());
    }
    Ok(())
}

pub fn checkpoint(a: CheckpointArgs) -> anyhow::Result<()> {
    let v = call(
        &a.control,
        json!({"cmd": "checkpoint"}),
        Duration::from_secs(60),
    )?;
    let num = |k: &str| v[k].as_u64().unwrap_or(0);
    println!(
        "checkpoint of epoch {} committed: pause {}, total {}",
        num("epoch"),
        report::us(num("pause_us")),
        report::us(num("total_us"))
    );
    Ok(())
}

pub fn verify(a: VerifyArgs) -> anyhow::Result<()> {
    // Reads both disks whole: allow an hour.
    let v = crate::progress::verify(&a.control, a.repair, Duration::from_secs(3600))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    if v.get("image_digest").is_some() {
        // A failed-over node: its disk against the checkpoint it took over at.
        let c: DigestCheck = serde_json::from_value(v)
            .context("the daemon's digest check is not one this CLI reads")?;
        if !a.json {
            report::digest_check(&c);
        }
        if c.comparable && !c.equal() {
            return Err(anyhow!(
                "the disk differs from the checkpoint it failed over to"
            ));
        }
        return Ok(());
    }
    let v: VerifyReport = serde_json::from_value(v)
        .context("the daemon's verify report is not one this CLI reads")?;
    if !a.json {
        report::verify(&v);
    }
    match &v.repair {
        Some(r) if r.still_differing_chunks != 0 => Err(anyhow!(
            "the primary's and the secondary's disks still differ after the repair"
        )),
        Some(_) => Ok(()),
        None if v.differing_chunks != 0 => {
            Err(anyhow!("the primary's and the secondary's disks differ"))
        }
        None => Ok(()),
    }
}

pub fn failover(a: FailoverArgs) -> anyhow::Result<()> {
    let req = json!({"cmd": "failover", "to": a.to.name(), "verify": a.verify, "force": a.force});
    let v = call_printing_json(&a.control, req, Duration::from_secs(600), a.json)?;
    let report: FailoverReport = serde_json::from_value(v.clone())
        .context("the daemon's failover report is not one this CLI reads")?;
    let verified: Option<report::Verified> = if a.verify {
        Some(serde_json::from_value(v).context("reading the verify result")?)
    } else {
        None
    };
    if !a.json {
        report::failover(&report, verified.as_ref());
    }
    if verified.and_then(|v| v.verified) == Some(false) {
        return Err(anyhow!("the disk does not match the checkpoint"));
    }
    Ok(())
}

/// What `lockstep set` changes on a running primary.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Setting {
    /// The checkpoint period (a duration in whole milliseconds; 0 for none).
    CheckpointInterval,
    /// Checkpoint once this much was written in an epoch (a size; 0 for none).
    CheckpointBytes,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The primary's control socket.
    #[arg(long)]
    control: PathBuf,
    /// What to change.
    #[arg(value_enum)]
    setting: Setting,
    /// The new value: a duration for checkpoint-interval (100ms, 2s; 0 for none), a size for
    /// checkpoint-bytes (64M; 0 for none).
    value: String,
}

/// The control socket's `set` request for `a`, with the value as the daemon takes it.
fn set_request(a: &SetArgs) -> anyhow::Result<Value> {
    let (key, value) = match a.setting {
        Setting::CheckpointInterval => {
            let d = crate::units::parse_duration(&a.value).map_err(|e| anyhow!(e))?;
            if d.subsec_nanos() % 1_000_000 != 0 {
                return Err(anyhow!(
                    "checkpoint-interval {}: give whole milliseconds",
                    a.value
                ));
            }
            ("checkpoint-interval-ms", d.as_millis() as u64)
        }
        Setting::CheckpointBytes => (
            "checkpoint-bytes",
            parse_size(&a.value).map_err(|e| anyhow!(e))?,
        ),
    };
    Ok(json!({"cmd": "set", "key": key, "value": value}))
}

/// `lockstep set`: change a setting of a running primary (not kept across restarts).
pub fn set(a: SetArgs) -> anyhow::Result<()> {
    let req = set_request(&a)?;
    call(&a.control, req, Duration::from_secs(10))?;
    let name = clap::ValueEnum::to_possible_value(&a.setting)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    println!("{name} set to {} (until the primary restarts)", a.value);
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

    #[test]
    fn set_sends_what_the_primary_takes() {
        let args = |setting, value: &str| SetArgs {
            control: "c".into(),
            setting,
            value: value.into(),
        };
        let r = set_request(&args(Setting::CheckpointInterval, "1.5s")).unwrap();
        assert_eq!(
            r,
            json!({"cmd": "set", "key": "checkpoint-interval-ms", "value": 1500})
        );
        let r = set_request(&args(Setting::CheckpointBytes, "64M")).unwrap();
        assert_eq!(r["value"], 64 << 20);
        assert!(set_request(&args(Setting::CheckpointInterval, "100")).is_err());
        assert!(set_request(&args(Setting::CheckpointInterval, "100us")).is_err());
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
