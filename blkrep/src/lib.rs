//! # blkrep — lockstep's block layer
//!
//! blkrep serves a disk and replicates it to a secondary host at checkpoint epochs.
//!
//! ```text
//!    NBD clients (qemu, nbd-client, libnbd, fio)
//!            │  TCP / unix socket
//!     ┌──────▼───────┐                         ┌──────────────┐
//!     │  nbd::server │                         │  nbd::client │──▶ any NBD server
//!     └──────┬───────┘                         └──────▲───────┘
//!            │ storage::Backend                       │ forwarded writes + epoch marks
//!     ┌──────▼───────────────┐   epoch::EpochCoordinator   │
//!     │ replica::Primary     │── cut / prepare / commit ───┘──▶ secondary: replica::Secondary
//!     └──────┬───────────────┘                                  (DiskBuffer, failover)
//!     ┌──────▼───────────────────────────┐
//!     │ storage: UringFile (io_uring),   │
//!     │ Unaligned (read-modify-write),   │
//!     │ MemoryBackend                    │
//!     └──────────────────────────────────┘
//! ```
//!
//! Where to start reading: [`storage::Backend`] (the I/O seam every other part uses), then
//! [`nbd::codec`] (the pure protocol codec), [`nbd::server`] and [`nbd::client`]; for
//! replication [`replica`] (start at [`replica::node`]), [`epoch`] (the participant API that
//! memrep and netcmp implement) and [`digest`].

pub mod auth;
pub mod digest;
pub mod epoch;
pub mod latency;
pub mod nbd;
pub mod replica;
pub mod storage;
pub mod sync;
pub mod tls;
pub mod transport;
pub mod ublk;
pub mod units;

/// The runtime the unit tests run on: two workers, like the machines lockstep is tested on.
#[cfg(test)]
pub(crate) fn test_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}
