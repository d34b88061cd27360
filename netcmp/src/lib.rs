//! # netcmp — packet comparison for lockstep
//!
//! **Status: not built yet.** This crate holds its documentation only; its issue comes after the
//! block layer's replication (see `docs/architecture.md`).
//!
//! What it will be: client input is mirrored to the primary and the secondary replica, and their
//! outputs are compared per connection (TCP as a byte stream across segment boundaries, UDP and
//! ICMP per packet).
//!
//! ```text
//!  client ──▶ netcmp ──mirror──▶ primary   ──output──┐
//!               │      └───────▶ secondary ──output──┤ compare
//!               ◀──── released when both agree ──────┘ diverging/overdue ⇒ checkpoint
//! ```
//!
//! Identical output is released as the secondary confirms it; diverging or overdue output
//! triggers a checkpoint through blkrep's `epoch` API.
#![forbid(unsafe_code)]
