//! Whole daemons: a primary node and a secondary node, from configuration to shutdown.
//!
//! The CLI parses flags into [`PrimaryConfig`] / [`SecondaryConfig`] and calls
//! [`run_primary`] / [`run_secondary`] with a future that resolves on SIGINT/SIGTERM.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::admin::{self, AdminHandler};
use super::meta::{meta_path, MetaStore};
use super::peer::LinkOptions;
use super::primary::{BlockParticipant, Primary, PrimaryMode, PrimaryOptions};
use super::secondary::{PeerLossPolicy, Secondary, SecondaryOptions};
use super::session::{Replicator, ReplicatorOptions};
use super::status::{DigestCheck, PeerAuth, PrimaryStatus};
use super::wire::AckMode;
use super::{FailoverTarget, REPLICA_EXPORT};
use crate::auth::{listen_policy, PeerKey};
use crate::digest::DigestTable;
use crate::epoch::{BoxFuture, CoordinatorOptions, Epoch, EpochCoordinator, NoGuest};
use crate::nbd::server::{Export, NbdServer, ServerOptions};
use crate::nbd::transport::{Endpoint, Listener};
use crate::storage::{open_disk, Backend, DiskOptions};
use crate::tls::{self, ClientTls, TlsFiles};
use crate::ublk::{self, UblkDevice, UblkOptions};

/// The default heartbeat period of the primary (`--heartbeat`).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(200);
/// The default number of missed heartbeat periods before either node counts its peer as lost
/// (`--heartbeat-misses`).
pub const DEFAULT_HEARTBEAT_MISSES: u32 = 5;
/// How long a primary keeps trying to reach its secondary at start by default
/// (`--connect-timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a primary stays `paused` after losing its secondary by default
/// (`--reconnect-timeout`).
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The default export name of both daemons (`--name`).
pub const DEFAULT_EXPORT_NAME: &str = "lockstep";

/// A primary daemon's settings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// The local disk.
    pub disk: DiskOptions,
    /// Where clients connect.
    pub export: Endpoint,
    /// Export name.
    pub export_name: String,
    /// The secondary's `--listen` address.
    pub secondary: Endpoint,
    /// Control socket path.
    pub control: PathBuf,
    /// Forwarding and ack settings.
    pub primary: PrimaryOptions,
    /// Checkpoint triggers.
    pub checkpoints: CoordinatorOptions,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Missed heartbeats before the secondary counts as lost.
    pub heartbeat_misses: u32,
    /// How long to keep trying to reach the secondary at start.
    pub connect_timeout: Duration,
    /// How long the primary stays `paused` after losing the secondary before it calls
    /// itself unprotected (it keeps trying to reconnect either way).
    pub reconnect_timeout: Duration,
    /// Also serve the disk as /dev/ublkbN.
    pub ublk: Option<UblkOptions>,
    /// The key both nodes share (`--psk-file`): every replication connection proves it.
    pub key: Option<PeerKey>,
    /// TLS to the secondary, both nodes presenting certificates of one CA.
    pub tls: Option<TlsFiles>,
}

/// A secondary daemon's settings.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// The secondary disk.
    pub disk: DiskOptions,
    /// Where the primary connects (replication data and control).
    pub listen: Endpoint,
    /// Control socket path.
    pub control: PathBuf,
    /// Where local clients connect (COLO running secondary; after failover, everyone).
    pub export: Option<Endpoint>,
    /// Export name for `export`.
    pub export_name: String,
    /// Buffer and peer-loss settings.
    pub secondary: SecondaryOptions,
    /// Also serve the secondary's view as /dev/ublkbN.
    pub ublk: Option<UblkOptions>,
    /// The key both nodes share (`--psk-file`): the listen port demands it before NBD.
    pub key: Option<PeerKey>,
    /// TLS on the listen port: this node's certificate, and the CA the primary's must chain
    /// to.
    pub tls: Option<TlsFiles>,
    /// Listen beyond loopback without a key or certificates (`--insecure-no-auth`).
    pub insecure_no_auth: bool,
}

fn stop_pair() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn bind(ep: &Endpoint) -> Result<Listener, String> {
    Listener::bind(ep)
        .await
        .map_err(|e| format!("listening on {ep}: {e}"))
}

/// Run a primary until `shutdown` resolves; then stop serving, run a last checkpoint, say
/// goodbye to the secondary and flush.
pub async fn run_primary(
    cfg: PrimaryConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    // The secondary refuses a period outside this range: say so before touching anything.
    let heartbeat_ms = u32::try_from(cfg.heartbeat.as_millis()).unwrap_or(u32::MAX);
    super::wire::check_heartbeat_ms(heartbeat_ms).map_err(|e| format!("--heartbeat: {e}"))?;
    let local = open_disk(&cfg.disk).map_err(|e| e.to_string())?;
    let (meta, _) = MetaStore::open(meta_path(&cfg.disk.path)).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let table = DigestTable::scan(&*local)
        .await
        .map_err(|e| format!("reading {} for its digest: {e}", cfg.disk.path.display()))?;
    tracing::info!(digest = format!("{:016x}", table.sum()), generation = format!("{:016x}", meta.get().generation), took = ?started.elapsed(), "local disk scanned");
    let primary = Primary::new(local.clone(), table, 0, cfg.primary.clone(), Arc::new(meta));
    let link_opts = LinkOptions {
        heartbeat: cfg.heartbeat,
        misses: cfg.heartbeat_misses,
        commit_timeout: Duration::from_secs(30),
    };
    let (stop_tx, stop_rx) = stop_pair();
    let repl = Replicator::new(
        primary.clone(),
        ReplicatorOptions {
            secondary: cfg.secondary.clone(),
            link: link_opts,
            ack: cfg.primary.ack,
            connect_timeout: Duration::from_secs(10),
            reconnect_timeout: cfg.reconnect_timeout,
            retry: Duration::from_millis(250),
            key: cfg.key.clone(),
            tls: match (&cfg.tls, &cfg.secondary) {
                (Some(f), Endpoint::Tcp(addr)) => {
                    Some(ClientTls::new(f, addr).map_err(|e| e.to_string())?)
                }
                (Some(_), Endpoint::Unix(_)) => {
                    return Err("TLS to a unix-socket secondary: use --psk-file there".into())
                }
                (None, _) => None,
            },
        },
        stop_rx.clone(),
    );
    // Before the first session: its resync asks for the checkpoint that completes it.
    let coord = EpochCoordinator::new(
        vec![Arc::new(BlockParticipant(primary.clone()))],
        Arc::new(NoGuest),
        repl.clone(),
        Epoch(primary.resume_epoch()),
        cfg.checkpoints,
    );
    primary.set_trigger(coord.trigger());
    repl.set_trigger(coord.trigger());
    // The secondary may still be starting (or busy): retry until the deadline; a permanent
    // refusal is final.
    let deadline = Instant::now() + cfg.connect_timeout;
    loop {
        match repl.attempt().await {
            Ok(_) => break,
            Err(e) if !e.is_permanent_refusal() && Instant::now() < deadline => {
                tracing::debug!("secondary not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                return Err(format!(
                    "cannot start replication with {}: {e}",
                    cfg.secondary
                ))
            }
        }
    }
    let repl_task = tokio::spawn(repl.clone().run());
    let (coord_stop_tx, coord_stop_rx) = stop_pair();
    let coord_task = tokio::spawn({
        let c = coord.clone();
        async move {
            if let Err(e) = c.run(coord_stop_rx).await {
                tracing::warn!("checkpoints stopped: {e}");
            }
        }
    });

    let server = Arc::new(
        NbdServer::new(
            vec![Export {
                name: cfg.export_name.clone(),
                // Anyone who can list exports sees it: the role, not the disk's path.
                description: "lockstep primary".into(),
                backend: primary.clone(),
                read_only: false,
                epochs: None,
            }],
            ServerOptions::default(),
        )
        .map_err(|e| e.to_string())?,
    );
    let listener = bind(&cfg.export).await?;
    let (srv_stop_tx, srv_stop_rx) = stop_pair();
    let srv = tokio::spawn(server.serve(listener, srv_stop_rx));
    let handler = Arc::new(PrimaryAdmin {
        primary: primary.clone(),
        coord: coord.clone(),
        repl: repl.clone(),
        secondary: cfg.secondary.to_string(),
        started: Instant::now(),
    });
    let admin_task = admin::serve(cfg.control.clone(), handler, stop_rx.clone())
        .await
        .map_err(|e| e.to_string())?;
    let device = start_ublk(&cfg.ublk, primary.clone())?;
    tracing::info!(export = %cfg.export, secondary = %cfg.secondary, ack = cfg.primary.ack.name(), "primary replicating");

    shutdown.await;
    tracing::info!("shutting down: draining clients");
    stop_ublk(device).await;
    srv_stop_tx.send_replace(true);
    let _ = srv.await;
    // A resync in progress cannot end in a checkpoint: give it a moment to finish.
    let until = Instant::now() + Duration::from_secs(30);
    while primary.is_resyncing() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if primary.mode() == PrimaryMode::Replicating {
        match tokio::time::timeout(Duration::from_secs(30), coord.trigger().request()).await {
            Ok(Ok(r)) => {
                tracing::info!(epoch = r.epoch.0, "final checkpoint committed");
                repl.goodbye("primary shutting down").await;
            }
            Ok(Err(e)) => tracing::warn!("final checkpoint failed: {e}"),
            Err(_) => tracing::warn!("final checkpoint timed out"),
        }
    }
    coord_stop_tx.send_replace(true);
    let _ = coord_task.await;
    stop_tx.send_replace(true);
    let _ = repl_task.await;
    repl.shutdown().await;
    let _ = admin_task.await;
    local
        .flush()
        .await
        .map_err(|e| format!("final flush: {e}"))?;
    tracing::info!("primary stopped");
    Ok(())
}

struct PrimaryAdmin {
    primary: Arc<Primary>,
    coord: Arc<EpochCoordinator>,
    repl: Arc<Replicator>,
    secondary: String,
    started: Instant,
}

impl AdminHandler for PrimaryAdmin {
    fn handle(&self, cmd: &str, req: &Value) -> BoxFuture<'_, Result<Value, String>> {
        let cmd = cmd.to_string();
        let req = req.clone();
        Box::pin(async move {
            match cmd.as_str() {
                "status" => {
                    let block = self.primary.status();
                    let checkpoints = self.coord.status();
                    to_json(PrimaryStatus {
                        role: "primary".into(),
                        peer: self.secondary.clone(),
                        uptime_s: self.started.elapsed().as_secs_f64(),
                        last_error: block
                            .unprotected_reason
                            .clone()
                            .or_else(|| checkpoints.last_checkpoint_error.clone()),
                        link: self.repl.status(),
                        block,
                        checkpoints,
                    })
                }
                "checkpoint" => {
                    let r = self
                        .coord
                        .trigger()
                        .request()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(json!({
                        "epoch": r.epoch.0,
                        "pause_us": r.pause.as_micros() as u64,
                        "total_us": r.total.as_micros() as u64,
                    }))
                }
                "set" => {
                    let key = req
                        .get("key")
                        .and_then(Value::as_str)
                        .ok_or("set needs \"key\"")?;
                    let value = req.get("value").ok_or("set needs \"value\"")?;
                    match key {
                        "checkpoint-interval-ms" => {
                            let ms = value
                                .as_u64()
                                .ok_or("checkpoint-interval-ms takes a number (0: off)")?;
                            self.coord
                                .set_interval((ms > 0).then(|| Duration::from_millis(ms)));
                        }
                        "checkpoint-bytes" => {
                            let b = value
                                .as_u64()
                                .ok_or("checkpoint-bytes takes a number (0: off)")?;
                            self.coord.set_bytes(b);
                        }
                        other => {
                            return Err(format!(
                            "unknown setting {other:?} (checkpoint-interval-ms, checkpoint-bytes)"
                        ))
                        }
                    }
                    Ok(json!({}))
                }
                "failover" => {
                    Err("failover runs on the secondary (this node is the primary)".into())
                }
                "verify" => to_json(self.repl.verify().await?),
                other => Err(format!(
                    "unknown command {other:?} (status, checkpoint, verify, set)"
                )),
            }
        })
    }
}

/// A typed report as the JSON the control socket answers with.
fn to_json(t: impl serde::Serialize) -> Result<Value, String> {
    serde_json::to_value(t).map_err(|e| e.to_string())
}

/// Run a secondary until `shutdown` resolves.
pub async fn run_secondary(
    cfg: SecondaryConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let notice = listen_policy(
        &cfg.listen,
        cfg.key.is_some() || cfg.tls.is_some(),
        cfg.insecure_no_auth,
    )?;
    let tls = cfg
        .tls
        .as_ref()
        .map(|f| tls::acceptor(f, true))
        .transpose()
        .map_err(|e| e.to_string())?;
    let disk = open_disk(&cfg.disk).map_err(|e| e.to_string())?;
    let (meta, known) = MetaStore::open(meta_path(&cfg.disk.path)).map_err(|e| e.to_string())?;
    let sec = Secondary::with_meta(disk.clone(), cfg.secondary.clone(), meta, known);
    let sink = sec.replica_sink();
    let mut replica = NbdServer::new(
        vec![Export {
            name: REPLICA_EXPORT.into(),
            description: "lockstep replication target (primary only)".into(),
            backend: sink.clone(),
            read_only: false,
            epochs: Some(sink),
        }],
        ServerOptions::default(),
    )
    .map_err(|e| e.to_string())?
    .with_control(sec.control());
    if let Some(t) = tls {
        replica = replica.with_tls(t);
    }
    if let Some(k) = cfg.key.clone() {
        replica = replica.with_auth(k, sec.clone());
    }
    let replica = Arc::new(replica);
    match notice {
        Some(n) if cfg.insecure_no_auth => tracing::warn!("{n}"),
        Some(n) => tracing::info!("{n}"),
        None => tracing::info!(
            listen = %cfg.listen,
            tls = cfg.tls.is_some(),
            key = cfg.key.is_some(),
            "peers must present a certificate of our CA and/or prove the --psk-file key"
        ),
    }
    let (stop_tx, stop_rx) = stop_pair();
    let listener = bind(&cfg.listen).await?;
    let mut tasks = vec![tokio::spawn(replica.serve(listener, stop_rx.clone()))];
    tasks.push(tokio::spawn(push_writeback(
        sec.clone(),
        disk.clone(),
        stop_rx.clone(),
    )));
    if let Some(ep) = &cfg.export {
        let view = Arc::new(
            NbdServer::new(
                vec![Export {
                    name: cfg.export_name.clone(),
                    description: "lockstep secondary".into(),
                    backend: sec.view(),
                    read_only: false,
                    epochs: None,
                }],
                ServerOptions::default(),
            )
            .map_err(|e| e.to_string())?,
        );
        let l = bind(ep).await?;
        tasks.push(tokio::spawn(view.serve(l, stop_rx.clone())));
    }
    let handler = Arc::new(SecondaryAdmin {
        sec: sec.clone(),
        peer_auth: peer_auth_status(&cfg),
    });
    let admin_task = admin::serve(cfg.control.clone(), handler, stop_rx.clone())
        .await
        .map_err(|e| e.to_string())?;
    let device = start_ublk(&cfg.ublk, sec.view())?;
    tracing::info!(listen = %cfg.listen, export = ?cfg.export.as_ref().map(|e| e.to_string()), "secondary waiting for a primary");
    shutdown.await;
    tracing::info!("shutting down");
    stop_ublk(device).await;
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = admin_task.await;
    disk.flush()
        .await
        .map_err(|e| format!("final flush: {e}"))?;
    tracing::info!("secondary stopped");
    Ok(())
}

struct SecondaryAdmin {
    sec: Arc<Secondary>,
    /// How primaries prove themselves on the listen port, for `status`.
    peer_auth: PeerAuth,
}

impl AdminHandler for SecondaryAdmin {
    fn handle(&self, cmd: &str, req: &Value) -> BoxFuture<'_, Result<Value, String>> {
        let cmd = cmd.to_string();
        let req = req.clone();
        Box::pin(async move {
            match cmd.as_str() {
                "status" => {
                    let mut st = self.sec.status();
                    st.peer_auth = Some(self.peer_auth.clone());
                    to_json(st)
                }
                "failover" => {
                    let to: FailoverTarget = req
                        .get("to")
                        .and_then(Value::as_str)
                        .unwrap_or("checkpoint")
                        .parse()?;
                    let report = self.sec.failover(to).await?;
                    let mut v = serde_json::to_value(&report).map_err(|e| e.to_string())?;
                    if req.get("verify").and_then(Value::as_bool) == Some(true) {
                        let t = Instant::now();
                        let (image, checkpoint) = self.sec.verify_checkpoint().await?;
                        v["image_digest"] = json!(format!("{image:016x}"));
                        v["verify_us"] = json!(t.elapsed().as_micros() as u64);
                        v["verified"] = match checkpoint {
                            Some(c) if report.comparable => json!(c == image),
                            _ => Value::Null,
                        };
                    }
                    Ok(v)
                }
                "verify" => {
                    if self.sec.mode() != super::secondary::Mode::Primary {
                        return Err("online verify runs on the primary (lockstep verify --control PRIMARY.sock); on a secondary, verify compares a failed-over disk with its checkpoint digest".into());
                    }
                    let (image, checkpoint) = self.sec.verify_checkpoint().await?;
                    to_json(DigestCheck {
                        image_digest: format!("{image:016x}"),
                        checkpoint_digest: checkpoint.map(|c| format!("{c:016x}")),
                    })
                }
                "checkpoint" => Err("checkpoints are run by the primary".into()),
                other => Err(format!(
                    "unknown command {other:?} (status, failover, verify)"
                )),
            }
        })
    }
}

/// While replicating, keep the secondary's page cache written back: each checkpoint flushes
/// the disk before COMMITTED, and that flush then only waits for the last few milliseconds of
/// writes instead of a whole epoch's.
async fn push_writeback(
    sec: Arc<Secondary>,
    disk: Arc<dyn Backend>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(WRITEBACK_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if sec.mode() == super::secondary::Mode::Replicating {
            let d = disk.clone();
            let _ = tokio::task::spawn_blocking(move || d.start_writeback()).await;
        }
    }
}

/// How often a replicating secondary starts writeback.
const WRITEBACK_PERIOD: Duration = Duration::from_millis(50);

/// What `status` says about who may become this secondary's primary, and what automatic
/// failover risks.
fn peer_auth_status(cfg: &SecondaryConfig) -> PeerAuth {
    let mut risks = Vec::new();
    if cfg.key.is_none() && cfg.tls.is_none() {
        risks.push(if cfg.insecure_no_auth {
            "no peer authentication (--insecure-no-auth): anyone who reaches the listen address can write this disk, pose as its primary or make it fail over"
        } else {
            "no peer authentication: any local process can reach the loopback listen port"
        });
    }
    if cfg.secondary.on_peer_loss == PeerLossPolicy::Failover {
        risks.push("--on-peer-loss failover cannot tell a dead primary from a cut link: if the primary is alive, this makes two writable nodes; prefer fencing or a cluster manager's quorum");
    }
    PeerAuth {
        psk: cfg.key.is_some(),
        tls: cfg.tls.is_some(),
        risks: risks.into_iter().map(Into::into).collect(),
    }
}

/// Start a ublk device over `backend` if asked to.
pub fn start_ublk(
    opts: &Option<UblkOptions>,
    backend: Arc<dyn Backend>,
) -> Result<Option<UblkDevice>, String> {
    let Some(o) = opts else { return Ok(None) };
    // Starting the device issues I/O (partition scan) that runs on this runtime: wait for it
    // without holding up a worker.
    let handle = tokio::runtime::Handle::current();
    let dev = tokio::task::block_in_place(|| ublk::start(backend, handle, o))
        .map_err(|e| e.to_string())?;
    tracing::info!(device = %dev.path(), "block device ready");
    Ok(Some(dev))
}

/// Stop and delete a ublk device (its requests in flight finish first).
pub async fn stop_ublk(dev: Option<UblkDevice>) {
    if let Some(d) = dev {
        let path = d.path();
        match tokio::task::spawn_blocking(move || d.stop()).await {
            Ok(Ok(())) => tracing::info!(device = %path, "block device removed"),
            Ok(Err(e)) => tracing::warn!(device = %path, "removing the block device: {e}"),
            Err(e) => tracing::warn!(device = %path, "removing the block device: {e}"),
        }
    }
}

/// Defaults shared by the CLI and tests.
pub fn default_secondary_options(disk: &std::path::Path) -> SecondaryOptions {
    let mut spill = disk.as_os_str().to_owned();
    spill.push(".lockstep-spill");
    SecondaryOptions {
        buffer_memory: 256 << 20,
        spill_path: spill.into(),
        on_peer_loss: PeerLossPolicy::Wait,
        heartbeat_misses: DEFAULT_HEARTBEAT_MISSES,
        hello_timeout: Duration::from_secs(10),
        discard_my_data: false,
    }
}

/// Ack mode parsing re-exported for the CLI.
pub fn parse_ack(s: &str) -> Result<AckMode, String> {
    s.parse()
}

#[allow(dead_code)]
fn _assert_backend(p: Arc<Primary>) -> Arc<dyn Backend> {
    p
}
