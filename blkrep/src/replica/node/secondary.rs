//! The secondary daemon: serve the replication export and the control protocol on the
//! listen port, the secondary's own view on its export, and its control-socket commands.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use super::{bind, stop_pair, to_json, Ready, SecondaryConfig};
use crate::auth::listen_policy;
use crate::epoch::{BoxFuture, SecondaryParticipant};
use crate::nbd::server::{Description, Export, NbdServer, ServerOptions};
use crate::replica::admin::{self, AdminHandler};
use crate::replica::meta::{meta_path, MetaStore};
use crate::replica::metrics::{self, MetricsSource};
use crate::replica::secondary::{Mode, PeerLossPolicy, Secondary};
use crate::replica::status::{DigestCheck, PeerAuth};
use crate::replica::{FailoverTarget, REPLICA_EXPORT};
use crate::storage::{open_disk, Backend};
use crate::tls;
use crate::ublk;

/// Run a secondary until `shutdown` resolves.
pub async fn run_secondary(
    cfg: SecondaryConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_secondary_with(cfg, Vec::new(), shutdown).await
}

/// [`run_secondary`] with checkpoint participants besides the block layer (memory regions):
/// each commits all-or-nothing with the disk.
pub async fn run_secondary_with(
    cfg: SecondaryConfig,
    others: Vec<Arc<dyn SecondaryParticipant>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    run_secondary_ready(cfg, others, shutdown, Box::new(|_| {})).await
}

/// [`run_secondary_with`], calling `ready` once the node serves: the listen port, the export
/// and the control socket bound (and the ublk device up). Its argument is a one-line status
/// for a service manager (`STATUS=` of sd_notify).
pub async fn run_secondary_ready(
    cfg: SecondaryConfig,
    others: Vec<Arc<dyn SecondaryParticipant>>,
    shutdown: impl Future<Output = ()>,
    ready: Ready,
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
    for p in others {
        sec.add_participant(p)?;
    }
    let sink = sec.replica_sink();
    let mut replica = NbdServer::new(
        vec![Export {
            name: REPLICA_EXPORT.into(),
            description: "lockstep replication target (primary only)".into(),
            backend: sink.clone(),
            read_only: false,
            epochs: Some(sink),
        }],
        // The replication export is the primary's, by name: not listed to clients.
        ServerOptions {
            list_exports: false,
            ..ServerOptions::default()
        },
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
                    description: view_description(sec.clone()),
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
    let admin_task = admin::serve(cfg.control.clone(), handler.clone(), stop_rx.clone())
        .await
        .map_err(|e| e.to_string())?;
    if let Some(addr) = cfg.metrics {
        let (bound, _) = metrics::serve(addr, handler, stop_rx.clone())
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }
    let device = ublk::start_if(&cfg.ublk, sec.view())?;
    let export = cfg
        .export
        .as_ref()
        .map_or("none".into(), |e| e.uri(&cfg.export_name));
    tracing::info!(listen = %cfg.listen, %export, "secondary waiting for a primary");
    ready(format!(
        "secondary: waiting for a primary on {}, export {export}",
        cfg.listen
    ));
    shutdown.await;
    tracing::info!("shutting down");
    ublk::stop_if(device).await;
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = admin_task.await;
    // Writes answered on receipt (ack mode `received`) reach the disk before the flush.
    sec.applied_early().await;
    disk.flush()
        .await
        .map_err(|e| format!("final flush: {e}"))?;
    tracing::info!("secondary stopped");
    Ok(())
}

/// Why a failed-over node runs no checkpoints.
const TOOK_OVER: &str = "this node took over by failover and runs unprotected: there is no secondary to checkpoint with. To protect the disk again, restart this node as `lockstep primary` on its disk with a `lockstep secondary` to replicate to (docs/operations.md, \"Re-protect after a failover\")";

/// The view export's description follows the node's role.
fn view_description(sec: Arc<Secondary>) -> Description {
    Description::live(move || match sec.mode() {
        Mode::Primary => "lockstep primary (failed over; unprotected)".into(),
        _ => "lockstep secondary (running view: last checkpoint plus its own writes)".into(),
    })
}

struct SecondaryAdmin {
    sec: Arc<Secondary>,
    /// How primaries prove themselves on the listen port, for `status`.
    peer_auth: PeerAuth,
}

impl MetricsSource for SecondaryAdmin {
    fn render(&self) -> BoxFuture<'_, String> {
        Box::pin(async move { metrics::secondary_metrics(&self.sec.status()) })
    }
}

impl AdminHandler for SecondaryAdmin {
    fn events(&self) -> Option<BoxFuture<'_, (Value, tokio::sync::broadcast::Receiver<Value>)>> {
        Some(Box::pin(async move {
            let rx = self.sec.events().subscribe();
            let status = self
                .handle("status".into(), json!({}))
                .await
                .unwrap_or(Value::Null);
            (json!({"event": "status", "status": status}), rx)
        }))
    }

    fn handle(&self, cmd: String, req: Value) -> BoxFuture<'_, Result<Value, String>> {
        Box::pin(async move {
            match cmd.as_str() {
                "status" => {
                    let mut st = self.sec.status();
                    let mut auth = self.peer_auth.clone();
                    if st.role == "primary" {
                        // Nothing fails over any more.
                        auth.risks.retain(|r| !r.starts_with(ON_PEER_LOSS_RISK));
                    }
                    st.peer_auth = Some(auth);
                    to_json(st)
                }
                "failover" => {
                    let to: FailoverTarget = req
                        .get("to")
                        .and_then(Value::as_str)
                        .unwrap_or("checkpoint")
                        .parse()?;
                    let force = req.get("force").and_then(Value::as_bool) == Some(true);
                    let report = self.sec.take_over(to, force).await?;
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
                    if self.sec.mode() != Mode::Primary {
                        return Err("online verify runs on the primary (lockstep verify --control PRIMARY.sock); on a secondary, verify compares a failed-over disk with its checkpoint digest".into());
                    }
                    if req.get("repair").and_then(Value::as_bool) == Some(true) {
                        return Err("--repair needs a replicating primary: this node has failed over and has no peer to repair".into());
                    }
                    let (image, checkpoint) = self.sec.verify_checkpoint().await?;
                    let st = self.sec.status();
                    let f = st.failover.as_ref();
                    to_json(DigestCheck {
                        image_digest: format!("{image:016x}"),
                        checkpoint_digest: checkpoint.map(|c| format!("{c:016x}")),
                        committed_epoch: st.committed_epoch,
                        comparable: f.is_some_and(|f| f.comparable) && st.dirty_blocks == 0,
                        written_blocks: st.dirty_blocks,
                    })
                }
                "checkpoint" if self.sec.mode() == Mode::Primary => Err(TOOK_OVER.into()),
                "checkpoint" => Err("checkpoints are run by the primary (lockstep checkpoint --control PRIMARY.sock)".into()),
                "set" => Err("settings are the primary's (lockstep set --control PRIMARY.sock)".into()),
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
        if sec.mode() == Mode::Replicating {
            let d = disk.clone();
            let _ = tokio::task::spawn_blocking(move || d.start_writeback()).await;
        }
    }
}

/// How the risk of automatic failover begins (not shown once the node failed over).
const ON_PEER_LOSS_RISK: &str = "--on-peer-loss failover";

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
        risks.push(concat!(
            "--on-peer-loss failover",
            " cannot tell a dead primary from a cut link: if the primary is alive, this makes two writable nodes; prefer fencing or a cluster manager's quorum"
        ));
    }
    PeerAuth {
        psk: cfg.key.is_some(),
        tls: cfg.tls.is_some(),
        risks: risks.into_iter().map(Into::into).collect(),
    }
}
