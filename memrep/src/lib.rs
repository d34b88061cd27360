//! # memrep — memory checkpoints for lockstep
//!
//! **Status:** built: regions, digests, dirty tracking, the writer hand-over and pause, the
//! epoch participant on the primary ([`primary::MemoryParticipant`]) and its secondary half
//! ([`secondary::MemoryReplica`]), their messages ([`wire`]), resync by digest and verify.
//! The `lockstep` daemons use them for `--memory`; `docs/architecture.md` has the picture.
//!
//! What it is for: a participant in blkrep's checkpoint epochs that replicates a shared-memory
//! region (a file in `/dev/shm`, a memfd, QEMU guest RAM created with
//! `memory-backend-file,share=on`) from the primary to the secondary.
//!
//! ```text
//!  primary                                     secondary
//!  region ──dirty tracking──▶ page stream ──▶ RAM cache (staged)
//!   (uffd-wp + PAGEMAP_SCAN,                     │ applied only when
//!    or per-page xxh3 scan)                      ▼ checkpoint n commits
//!                                              region
//! ```
//!
//! Dirty pages cross in epoch batches, zero pages travel as a flag, and pages may be pre-sent
//! between checkpoints to shorten the pause. memrep depends on blkrep only for its `epoch`
//! coordination API.
//!
//! ## Modules
//!
//! - [`region`]: [`region::Region`], a file (regular, `/dev/shm`, hugetlbfs) mapped `MAP_SHARED`.
//!   All access is by raw copies (never a `&[u8]` over memory others write), which is why it is
//!   `Send + Sync`. Page unit everywhere: [`PAGE_SIZE`] (4 KiB), also on hugetlbfs.
//! - [`digest`]: [`digest::page_hash`] (xxh3_64), [`digest::is_zero`], and
//!   [`digest::PageTable`], one digest per page plus a position-mixed fold of them all.
//! - [`track`]: the [`track::Tracker`] trait, which reports the pages that may have changed since
//!   the previous collect, with two backends: [`track::uffd::UffdTracker`] (userfaultfd
//!   asynchronous write-protect + the `PAGEMAP_SCAN` ioctl, kernel 6.7+; cost proportional to the
//!   pages written) and [`track::scan::ScanTracker`] (hash every page and compare with the table;
//!   works everywhere, cost proportional to the region). [`track::probe_uffd`] says whether the
//!   first is usable.
//! - [`primary`], [`secondary`], [`wire`]: the two halves of a region's participant in the
//!   checkpoint epochs and their messages: pre-send between checkpoints, the pause's copy,
//!   RAM staging on the secondary, commit all-or-nothing with the disk, resync by digest.
//! - [`device`]: a QEMU VM's device state as a participant (QMP `migrate` to a file with
//!   `x-ignore-shared` in the cut; durable per epoch on the secondary), and
//!   [`track::softdirty::SoftDirtyTracker`], which tracks the VM's RAM through QEMU's
//!   soft-dirty bits.
//! - [`pause`]: cooperating writers stand still around the cut ([`pause::WriterPause`] is a
//!   `GuestHook`; the writer calls [`pause::WriterLink::pause_point`] between its steps).
//! - [`handoff`]: a cooperating writer in another process registers its mapping with userfaultfd
//!   and passes the userfaultfd and its `/proc/self/pagemap` to lockstep over a unix socket
//!   (`SCM_RIGHTS`); [`track::uffd::UffdTracker::from_handover`] then tracks its writes.
//!
//! `unsafe` is denied crate-wide and allowed only on the items that make syscalls (`mmap`,
//! `ioctl`, `sendmsg`/`recvmsg`) or copy through the raw mapping; each block states why it is
//! sound.
#![deny(unsafe_code)]

pub mod device;
pub mod digest;
pub mod handoff;
pub mod pause;
pub mod primary;
pub mod region;
pub mod secondary;
pub mod track;
pub mod wire;

/// The page unit of memrep: page index `i` covers bytes `[i * 4096, (i + 1) * 4096)`.
pub const PAGE_SIZE: usize = 4096;

#[cfg(test)]
pub(crate) mod testutil;

#[cfg(test)]
mod tests;
