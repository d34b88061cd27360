//! What the long-running commands (`export`, `primary`, `secondary`) share: the runtime,
//! signal handling and the ublk flags.

use anyhow::Context;
use blkrep::ublk::UblkOptions;
use clap::Args;

/// Block-device flags (ublk) shared by the daemons.
#[derive(Debug, Args)]
pub struct UblkArgs {
    /// Also serve the disk as a block device, /dev/ublkbN (needs the ublk_drv module and a
    /// lockstep built with `--features ublk`).
    #[arg(long)]
    ublk: bool,
    /// ublk device id N (/dev/ublkbN). If a device with this id was left by a killed daemon,
    /// it is recovered: I/O waiting on it continues.
    #[arg(long, requires = "ublk")]
    ublk_id: Option<u32>,
    /// ublk hardware queues (one thread each).
    #[arg(long, default_value_t = UblkOptions::default().queues, requires = "ublk")]
    queues: u16,
    /// ublk requests in flight per queue.
    #[arg(long, default_value_t = UblkOptions::default().depth, requires = "ublk")]
    depth: u16,
}

impl UblkArgs {
    /// The device options if `--ublk` was given; an error before anything starts if this
    /// build cannot serve ublk.
    pub fn options(&self) -> anyhow::Result<Option<UblkOptions>> {
        if !self.ublk {
            return Ok(None);
        }
        blkrep::ublk::built_in()?;
        Ok(Some(UblkOptions {
            id: self.ublk_id,
            queues: self.queues,
            depth: self.depth,
            ..Default::default()
        }))
    }
}

/// The multi-threaded runtime a daemon runs on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    runtime_with(None)
}

/// A multi-threaded runtime with `threads` workers (None: tokio's default, one per CPU).
pub fn runtime_with(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.enable_all().build().context("starting the runtime")
}

/// Wait for SIGINT or SIGTERM; returns which.
pub async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Resolves on SIGINT or SIGTERM (logged); never, if the handlers cannot be installed.
pub async fn shutdown_signal() {
    match wait_for_signal().await {
        Ok(s) => tracing::info!("{s} received"),
        Err(e) => {
            tracing::error!("{e:#}");
            std::future::pending::<()>().await;
        }
    }
}
