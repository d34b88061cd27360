//! The primary daemon: open the disk, connect to the secondary, serve clients, checkpoint,
//! and on shutdown a last checkpoint and GOODBYE; its control-socket commands.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{bind, stop_pair, to_json, PrimaryConfig, Ready};
use crate::digest::DigestTable;
use crate::epoch::{
    BoxFuture, Epoch, EpochCoordinator, EpochEvent, GuestHook, NoGuest, Participant,
};
use crate::nbd::server::{Export, NbdServer, ServerOptions};
use crate::replica::admin::{self, AdminHandler};
use crate::replica::bitmap::{bitmap_path, DiskBitmap};
use crate::replica::meta::{meta_path, MetaStore};
use crate::replica::metrics::{self, MetricsSource};
use crate::replica::peer::LinkOptions;
use crate::replica::primary::{BlockParticipant, Primary, PrimaryMode};
use crate::replica::session::{Replicator, ReplicatorOptions};
use crate::replica::status::PrimaryStatus;
use crate::storage::open_disk;
use crate::tls::ClientTls;
use crate::transport::Endpoint;
use crate::ublk;

/// Run a primary until `shutdown` resolves; then stop serving, run a last checkpoint, say
/// goodbye to the secondary and flush.
pub async fn run_primary(
    cfg: PrimaryConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_primary_with(cfg, Vec::new(), Arc::new(NoGuest), shutdown).await
}

/// [`run_primary`] with checkpoint participants besides the block layer (memory regions),
/// which cut, prepare and commit in the same epochs as the disk, after it, and with `guest`
/// paused around every cut (the writers of those regions and of the disk).
pub async fn run_primary_with(
    cfg: PrimaryConfig,
    others: Vec<Arc<dyn Participant>>,
    guest: Arc<dyn GuestHook>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_primary_ready(cfg, others, guest, shutdown, Box::new(|_| {})).await
}

/// [`run_primary_with`], calling `ready` once the node serves: replication started, the
/// export and the control socket bound (and the ublk device up). Its argument is a one-line
/// status for a service manager (`STATUS=` of sd_notify).
pub async fn run_primary_ready(
    cfg: PrimaryConfig,
    others: Vec<Arc<dyn Participant>>,
    guest: Arc<dyn GuestHook>,
    shutdown: impl Future<Output = ()>,
    ready: Ready,
) -> Result<(), String> {
    // The secondary refuses a period outside this range: say so before touching anything.
    let heartbeat_ms = u32::try_from(cfg.heartbeat.as_millis()).unwrap_or(u32::MAX);
    crate::replica::wire::check_heartbeat_ms(heartbeat_ms)
        .map_err(|e| format!("--heartbeat: {e}"))?;
    let local = open_disk(&cfg.disk).map_err(|e| e.to_string())?;
    let (meta, _) = MetaStore::open(meta_path(&cfg.disk.path)).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let table = DigestTable::scan(&*local)
        .await
        .map_err(|e| format!("reading {} for its digest: {e}", cfg.disk.path.display()))?;
    tracing::info!(digest = %format!("{:016x}", table.sum()), generation = %format!("{:016x}", meta.get().generation), took_ms = started.elapsed().as_millis() as u64, "local disk scanned");
    let primary = Primary::new(local.clone(), table, 0, cfg.primary.clone(), Arc::new(meta));
    let bm_path = bitmap_path(&cfg.disk.path);
    let (bm, tracked, marked) = DiskBitmap::open(&bm_path, local.size())
        .map_err(|e| format!("opening the dirty bitmap {}: {e}", bm_path.display()))?;
    if tracked != 0 {
        tracing::info!(
            extents = marked.len(),
            tracked = %format!("{tracked:016x}"),
            "dirty bitmap read: the next sync with that secondary generation is incremental"
        );
    } else {
        tracing::info!(
            "no dirty bitmap relative to a secondary yet: the first sync compares the whole disk"
        );
    }
    primary.attach_bitmap(bm, tracked, &marked);
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
    let mut participants: Vec<Arc<dyn Participant>> =
        vec![Arc::new(BlockParticipant(primary.clone()))];
    participants.extend(others);
    let coord = EpochCoordinator::new(
        participants,
        guest,
        repl.clone(),
        Epoch(primary.resume_epoch()),
        cfg.checkpoints,
    );
    primary.set_trigger(coord.trigger());
    repl.set_trigger(coord.trigger());
    repl.set_participants(coord.participants().to_vec());
    // Everything of our own that can fail is checked before the secondary hears from us: a
    // primary that syncs and then dies on a port it cannot bind would leave a secondary
    // that may fail over on its own.
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
    let handler = Arc::new(PrimaryAdmin {
        primary: primary.clone(),
        coord: coord.clone(),
        repl: repl.clone(),
        secondary: cfg.secondary.to_string(),
        started: Instant::now(),
    });
    let admin_task = admin::serve(cfg.control.clone(), handler.clone(), stop_rx.clone())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(addr) = cfg.metrics {
        let (bound, _) = metrics::serve(addr, handler, stop_rx.clone())
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    let device = ublk::start_if(&cfg.ublk, primary.clone())?;
    tokio::pin!(shutdown);
    let first = tokio::select! {
        r = first_session(&repl, &cfg) => r.map(|()| true),
        () = &mut shutdown => Ok(false),
    };
    if !matches!(first, Ok(true)) {
        ublk::stop_if(device).await;
        stop_tx.send_replace(true);
        let _ = admin_task.await;
        return first.map(|_| tracing::info!("stopped before the first session"));
    }
    let repl_task = tokio::spawn(repl.clone().run());
    tokio::spawn(publish_checkpoints(
        coord.subscribe(),
        primary.events().clone(),
    ));
    let (coord_stop_tx, coord_stop_rx) = stop_pair();
    let coord_task = tokio::spawn({
        let c = coord.clone();
        async move {
            if let Err(e) = c.run(coord_stop_rx).await {
                tracing::warn!("checkpoints stopped: {e}");
            }
        }
    });
    let (srv_stop_tx, srv_stop_rx) = stop_pair();
    let srv = tokio::spawn(server.serve(listener, srv_stop_rx));
    tracing::info!(export = %cfg.export.uri(&cfg.export_name), secondary = %cfg.secondary, ack = %cfg.primary.ack.name(), mode = %primary.mode().name(), "primary serving");
    ready(format!(
        "primary ({}): serving {}, secondary {}",
        primary.mode().name(),
        cfg.export.uri(&cfg.export_name),
        cfg.secondary
    ));

    shutdown.await;
    tracing::info!("shutting down: draining clients");
    ublk::stop_if(device).await;
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

/// Wait up to `--connect-timeout` for the first session with the secondary. A secondary
/// that refuses for good (split-brain, another size, a wrong key), or anything that accepts
/// connections at its address without a session coming of it, ends the start; an address
/// where nothing answers does not: the primary then serves alone, unprotected, recording
/// what it writes, and the reconnection loop resyncs the secondary when it appears.
async fn first_session(repl: &Arc<Replicator>, cfg: &PrimaryConfig) -> Result<(), String> {
    if cfg.connect_timeout.is_zero() {
        repl.primary()
            .give_up("started without waiting for the secondary (--connect-timeout 0)");
        return Ok(());
    }
    tracing::info!(secondary = %cfg.secondary, timeout = %humantime::format_duration(cfg.connect_timeout), "connecting to the secondary");
    let deadline = Instant::now() + cfg.connect_timeout;
    loop {
        match repl.attempt().await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_permanent_refusal() => {
                return Err(format!(
                    "cannot start replication with {}: {e}",
                    cfg.secondary
                ))
            }
            Err(e) if Instant::now() >= deadline => {
                // Something answers there but no session comes of it (TLS or key trouble,
                // busy with another primary, not a secondary): a mistake to fix, not a
                // secondary that is gone.
                let probe = tokio::time::timeout(
                    Duration::from_secs(2),
                    crate::transport::connect(&cfg.secondary),
                )
                .await;
                if matches!(probe, Ok(Ok(_))) {
                    return Err(format!(
                        "cannot start replication with {}: {e}",
                        cfg.secondary
                    ));
                }
                let reason = format!(
                    "the secondary {} was not reachable within --connect-timeout {}: {e}",
                    cfg.secondary,
                    humantime::format_duration(cfg.connect_timeout)
                );
                tracing::warn!("{reason}; serving alone, UNPROTECTED: writes are recorded and resynced when the secondary connects");
                repl.primary().give_up(&reason);
                return Ok(());
            }
            Err(e) => {
                tracing::debug!("secondary not reachable yet: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The coordinator's checkpoint outcomes as node events, until the coordinator is gone.
async fn publish_checkpoints(
    mut rx: tokio::sync::broadcast::Receiver<EpochEvent>,
    events: crate::replica::events::NodeEvents,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match rx.recv().await {
            Ok(EpochEvent::Committed { epoch, .. }) => {
                events.emit("checkpoint", json!({"state": "committed", "epoch": epoch}))
            }
            Ok(EpochEvent::Aborted { epoch, error }) => events.emit(
                "checkpoint",
                json!({"state": "aborted", "epoch": epoch, "error": error}),
            ),
            Ok(EpochEvent::Lagged { .. }) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

struct PrimaryAdmin {
    primary: Arc<Primary>,
    coord: Arc<EpochCoordinator>,
    repl: Arc<Replicator>,
    secondary: String,
    started: Instant,
}

impl PrimaryAdmin {
    fn report(&self) -> PrimaryStatus {
        let block = self.primary.status();
        let checkpoints = self.coord.status();
        PrimaryStatus {
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
        }
    }
}

impl MetricsSource for PrimaryAdmin {
    fn render(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let (pause, total) = self.coord.histograms();
            metrics::primary_metrics(&self.report(), &pause, &total)
        })
    }
}

impl AdminHandler for PrimaryAdmin {
    fn events(&self) -> Option<BoxFuture<'_, (Value, tokio::sync::broadcast::Receiver<Value>)>> {
        Some(Box::pin(async move {
            let rx = self.primary.events().subscribe();
            let status = self
                .handle("status".into(), json!({}))
                .await
                .unwrap_or(Value::Null);
            (json!({"event": "status", "status": status}), rx)
        }))
    }

    fn subscribe(&self) -> Option<(Value, tokio::sync::broadcast::Receiver<EpochEvent>)> {
        let events = self.coord.subscribe();
        let first = json!({
            "epoch": self.coord.current().0,
            "committed_epoch": self.coord.committed().0,
        });
        Some((first, events))
    }

    fn handle(&self, cmd: String, req: Value) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            match cmd.as_str() {
                "status" => to_json(self.report()),
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
                "verify" => {
                    let repair = req.get("repair").and_then(Value::as_bool).unwrap_or(false);
                    let mut v = self.repl.verify_with(repair).await?;
                    for p in self.coord.participants() {
                        match p.verify().await {
                            Ok(Value::Null) => {}
                            Ok(r) => {
                                v.participants.insert(p.name().into(), r);
                            }
                            Err(e) => {
                                v.participants
                                    .insert(p.name().into(), json!({ "error": e }));
                            }
                        }
                    }
                    to_json(v)
                }
                other => Err(format!(
                    "unknown command {other:?} (status, checkpoint, verify, set)"
                )),
            }
        })
    }
}
