//! The ublk frontend: serve a [`Backend`](crate::storage::Backend) as `/dev/ublkbN`.
//!
//! ```text
//!  kernel ublk_drv ──io_uring cmds──▶ queue thread (libublk, one per hw queue)
//!                                        │ request: copy payload, spawn on tokio
//!                                        ▼
//!                                  Backend (the same one the NBD export serves:
//!                                  a plain disk, a replicating Primary, a SecondaryView)
//!                                        │ completion: (tag, result, data) + eventfd
//!                                        ▼
//!  kernel ◀──commit cmd── queue thread (woken by a multishot poll on the eventfd)
//! ```
//!
//! The eventfd is watched by a one-shot poll on the queue's own ring, re-armed at every wake.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY` (and `..._REISSUE` where the kernel has
//! it): when the daemon dies the device stays, its I/O waits, and a new daemon given the same
//! device id reattaches and finishes (or reissues) what was in flight. Writes are idempotent,
//! so reissue is safe.
//!
//! Flush requests carry no range (`start_sector` may be anything): only reads, writes,
//! discards and zeroing are bounds-checked.
//!
//! The frontend is a cargo feature, `ublk`, off by default: libublk generates its kernel
//! bindings with bindgen, which needs libclang when lockstep is built. A build without the
//! feature has the same API; every call that would touch a device fails with
//! [`UblkFrontendError::NotBuilt`], which says how to get a build that has it.

/// The ublk control device.
pub const UBLK_CONTROL: &str = "/dev/ublk-control";

/// How to create (or recover) a device.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// Device id: None lets the kernel choose; with Some(id), a device of that id left by a
    /// dead daemon is recovered.
    pub id: Option<u32>,
    /// Hardware queues (one thread each).
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Largest request in bytes.
    pub max_io_bytes: u32,
}

impl Default for UblkOptions {
    fn default() -> Self {
        Self {
            id: None,
            queues: 1,
            depth: 128,
            max_io_bytes: 512 << 10,
        }
    }
}

/// Why a ublk device could not be served.
#[derive(Debug, thiserror::Error)]
pub enum UblkFrontendError {
    /// No ublk driver.
    #[error("ublk is not available: {UBLK_CONTROL} is missing. Load the driver (`modprobe ublk_drv`); the kernel needs CONFIG_BLK_DEV_UBLK (Linux 6.0 or later)")]
    NoDriver,
    /// A feature lockstep needs is missing.
    #[error("the ublk driver lacks {0}; lockstep needs it (upgrade the kernel)")]
    MissingFeature(&'static str),
    /// A libublk or kernel call failed.
    #[error("ublk: {what}: {detail}")]
    Ublk {
        /// What was being done.
        what: &'static str,
        /// The error.
        detail: String,
    },
    /// Other setup failures.
    #[error("ublk: {0}")]
    Setup(String),
    /// This lockstep was built without the `ublk` feature.
    #[error("this lockstep was built without ublk support (/dev/ublkbN). Rebuild with the `ublk` feature: `cargo build --release --features ublk` (its bindings are generated at build time and need libclang: `apt-get install libclang1-14`)")]
    NotBuilt,
}

/// Whether this build has the ublk frontend; the error says how to get one that has.
pub fn built_in() -> Result<(), UblkFrontendError> {
    if cfg!(feature = "ublk") {
        Ok(())
    } else {
        Err(UblkFrontendError::NotBuilt)
    }
}

#[cfg(feature = "ublk")]
mod driver;
#[cfg(feature = "ublk")]
pub use driver::{delete, probe, start, UblkDevice, UblkFeatures};

#[cfg(not(feature = "ublk"))]
mod absent;
#[cfg(not(feature = "ublk"))]
pub use absent::{delete, start, UblkDevice};

/// Start a ublk device over `backend` if asked to.
pub fn start_if(
    opts: &Option<UblkOptions>,
    backend: std::sync::Arc<dyn crate::storage::Backend>,
) -> Result<Option<UblkDevice>, String> {
    let Some(o) = opts else { return Ok(None) };
    // Starting the device issues I/O (partition scan) that runs on this runtime: wait for it
    // without holding up a worker.
    let handle = tokio::runtime::Handle::current();
    let dev =
        tokio::task::block_in_place(|| start(backend, handle, o)).map_err(|e| e.to_string())?;
    tracing::info!(device = %dev.path(), "block device ready");
    Ok(Some(dev))
}

/// Stop and delete a ublk device (its requests in flight finish first).
pub async fn stop_if(dev: Option<UblkDevice>) {
    if let Some(d) = dev {
        let path = d.path();
        match tokio::task::spawn_blocking(move || d.stop()).await {
            Ok(Ok(())) => tracing::info!(device = %path, "block device removed"),
            Ok(Err(e)) => tracing::warn!(device = %path, "removing the block device: {e}"),
            Err(e) => tracing::warn!(device = %path, "removing the block device: {e}"),
        }
    }
}
