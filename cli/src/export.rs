//! `lockstep export`: serve disks over NBD.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use blkrep::nbd::{Endpoint, Export, Listener, NbdServer, ServerOptions, DEFAULT_ENDPOINT};
use blkrep::storage::{open_disk, DiskOptions};
use clap::Args;
use tokio::sync::watch;

use crate::daemon::UblkArgs;
use crate::units::{parse_size, ENDPOINT};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Disk to serve: a regular file or a block device. Repeat to serve several exports.
    #[arg(long, required = true)]
    disk: Vec<PathBuf>,
    /// Create the file, or grow it, to this size (e.g. 10G). Applies to every --disk.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Where clients connect: an endpoint (forms below).
    #[arg(long, value_name = ENDPOINT, default_value = DEFAULT_ENDPOINT)]
    listen: Endpoint,
    /// Export name; repeat once per --disk. Defaults to the file name without extension. The
    /// first export also answers to the empty name.
    #[arg(long)]
    name: Vec<String>,
    /// Serve read-only.
    #[arg(long)]
    read_only: bool,
    /// Bypass the host page cache (O_DIRECT); odd-sized requests use read-modify-write.
    #[arg(long)]
    direct: bool,
    /// Every write is durable before it completes (FUA; a flush after a trim or zeroing),
    /// as qemu-nbd's --cache=writethrough: the unreplicated peer of `primary --ack sync`.
    #[arg(long)]
    writethrough: bool,
    /// Do not take QEMU-compatible locks on the disk, nor refuse one that another process
    /// (a QEMU VM, qemu-nbd, qemu-img, another lockstep) holds: QEMU's locking=off.
    #[arg(long)]
    no_lock: bool,
    #[command(flatten)]
    ublk: UblkArgs,
    /// With --tls-cert: clients must start TLS (NBD_OPT_STARTTLS) before anything else.
    #[command(flatten)]
    tls: crate::secure::TlsArgs,
    /// Demand a client certificate that chains to --tls-ca.
    #[arg(long, requires = "tls_ca")]
    tls_verify_peer: bool,
    #[command(flatten)]
    service: crate::service::ServiceArgs,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let service = crate::service::Service::new(&a.service)?;
    let r = serve(a, &service);
    service.finish();
    r
}

fn serve(a: ExportArgs, service: &crate::service::Service) -> anyhow::Result<()> {
    let ublk = a.ublk.options()?;
    if ublk.is_some() && a.disk.len() != 1 {
        bail!("--ublk serves one disk: give exactly one --disk");
    }
    if !a.name.is_empty() && a.name.len() != a.disk.len() {
        bail!(
            "give one --name per --disk ({} names for {} disks)",
            a.name.len(),
            a.disk.len()
        );
    }
    let mut exports = Vec::new();
    let mut paths = Vec::new();
    for (i, path) in a.disk.iter().enumerate() {
        let mut o = DiskOptions::new(path);
        o.size = a.size;
        o.direct = a.direct;
        o.read_only = a.read_only;
        o.lock = !a.no_lock;
        let mut backend =
            open_disk(&o).with_context(|| format!("cannot open {}", path.display()))?;
        if a.writethrough {
            backend = Arc::new(blkrep::storage::WriteThrough(backend));
        }
        let name = a.name.get(i).cloned().unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        paths.push(path.clone());
        exports.push(Export {
            name,
            // NBD_OPT_LIST and NBD_INFO_DESCRIPTION show it to every client: not the path.
            description: "lockstep export".into(),
            backend,
            read_only: a.read_only,
            epochs: None,
        });
    }
    let starttls = a
        .tls
        .files()
        .map(|f| blkrep::tls::acceptor(&f, a.tls_verify_peer))
        .transpose()?;
    service.runtime()?.block_on(async move {
        let listener = Listener::bind(&a.listen).await?;
        let mut server = NbdServer::new(exports.clone(), ServerOptions::default())?;
        if let Some(t) = starttls {
            tracing::info!(
                verify_peer = a.tls_verify_peer,
                "TLS required (NBD_OPT_STARTTLS)"
            );
            server = server.with_starttls(t);
        }
        let server = Arc::new(server);
        for (e, path) in exports.iter().zip(&paths) {
            tracing::info!(
                "serving {}, {}{}, as {}",
                path.display(),
                blkrep::units::size(e.backend.size()),
                if e.read_only { ", read-only" } else { "" },
                listener.local_endpoint().uri(&e.name)
            );
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let serving = tokio::spawn(server.clone().serve(listener, stop_rx));
        let device = blkrep::ublk::start_if(&ublk, exports[0].backend.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        let signal = crate::service::signals()?;
        service.ready(&format!(
            "serving {} export(s) on {}",
            exports.len(),
            a.listen
        ));
        let signal = signal.await;
        crate::service::stopping("stopping: finishing requests, flushing");
        tracing::info!("{signal}: finishing requests in flight, flushing, exiting");
        blkrep::ublk::stop_if(device).await;
        let _ = stop_tx.send(true);
        serving.await.context("server task")?;
        for (e, path) in exports.iter().zip(&paths) {
            e.backend
                .flush()
                .await
                .with_context(|| format!("flushing {}", path.display()))?;
        }
        tracing::info!("flushed; bye");
        Ok(())
    })
}
