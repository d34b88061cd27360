//! # blkrep — lockstep's block layer
//!
//! blkrep serves a disk and (in later milestones) replicates it. Today it holds:
//!
//! ```text
//!    NBD clients (qemu, nbd-client, libnbd, fio)
//!            │  TCP / unix socket
//!     ┌──────▼───────┐          ┌──────────────┐
//!     │  nbd::server │          │  nbd::client │──▶ any NBD server
//!     └──────┬───────┘          └──────────────┘    (our own, qemu-nbd, nbdkit)
//!            │ storage::Backend
//!     ┌──────▼───────────────────────────┐
//!     │ storage: UringFile (io_uring),   │
//!     │ Unaligned (read-modify-write),   │
//!     │ MemoryBackend                    │
//!     └──────────────────────────────────┘
//! ```
//!
//! Where to start reading: [`storage::Backend`] (the I/O seam every other part uses), then
//! [`nbd::codec`] (the pure protocol codec), [`nbd::server`] and [`nbd::client`].

pub mod digest;
pub mod epoch;
pub mod nbd;
pub mod replica;
pub mod storage;
