//! # memrep — memory checkpoints for lockstep
//!
//! **Status: not built yet.** This crate holds its documentation only; its issue comes after the
//! block layer's replication (see `docs/architecture.md`).
//!
//! What it will be: a participant in blkrep's checkpoint epochs that replicates a shared-memory
//! region (a file in `/dev/shm`, a memfd, QEMU guest RAM created with
//! `memory-backend-file,share=on`) from the primary to the secondary.
//!
//! ```text
//!  primary                                     secondary
//!  region ──dirty tracking──▶ page stream ──▶ RAM cache (staged)
//!   (uffd-wp + PAGEMAP_SCAN,                     │ applied only when
//!    or per-page crc64)                          ▼ checkpoint n commits
//!                                              region
//! ```
//!
//! Dirty pages cross in epoch batches, zero pages travel as a flag, and pages may be pre-sent
//! between checkpoints to shorten the pause. memrep depends on blkrep only for its `epoch`
//! coordination API.
#![forbid(unsafe_code)]
