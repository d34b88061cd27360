//! Whole daemons: a primary node and a secondary node, from configuration to shutdown.
//!
//! The CLI parses flags into [`PrimaryConfig`] / [`SecondaryConfig`] and calls
//! [`run_primary`] / [`run_secondary`] with a future that resolves on SIGINT/SIGTERM
//! (the `_ready` variants also call a [`Ready`] hook once the node serves).
//! `primary.rs` and `secondary.rs` hold each daemon and its control-socket commands.

mod primary;
mod secondary;

pub use primary::{run_primary, run_primary_ready, run_primary_with};
pub use secondary::{run_secondary, run_secondary_ready, run_secondary_with};

/// Called once when a daemon serves (its ports and control socket bound; a primary also
/// replicating), with a one-line status: the CLI's readiness notification and pid file.
pub type Ready = Box<dyn FnOnce(String) + Send>;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::primary::{Primary, PrimaryOptions};
use super::secondary::{PeerLossPolicy, SecondaryOptions};
use super::wire::AckMode;
use crate::auth::PeerKey;
use crate::epoch::CoordinatorOptions;
use crate::storage::{Backend, DiskOptions};
use crate::tls::TlsFiles;
use crate::transport::{Endpoint, Listener};
use crate::ublk::UblkOptions;

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
    /// Where Prometheus scrapes this node's metrics (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
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
    /// Where Prometheus scrapes this node's metrics (`--metrics`).
    pub metrics: Option<std::net::SocketAddr>,
}

fn stop_pair() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn bind(ep: &Endpoint) -> Result<Listener, String> {
    Listener::bind(ep)
        .await
        .map_err(|e| format!("listening on {ep}: {e}"))
}

/// A typed report as the JSON the control socket answers with.
fn to_json(t: impl serde::Serialize) -> Result<Value, String> {
    serde_json::to_value(t).map_err(|e| e.to_string())
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
