//! Packet mode: netcmp between a client-side L2 port and the two replicas' L2 ports (the
//! primary VM's NIC, the secondary VM's NIC), all carrying raw Ethernet frames.
//!
//! - [`frame`] parses Ethernet II frames (one optional 802.1Q tag; IPv4 with options, IPv6 with
//!   extension headers; TCP with its options, UDP, ICMP/ICMPv6), bounding every length field
//!   against the frame. [`checksum`] computes Internet checksums in full and incrementally
//!   (RFC 1624); [`build`] makes frames with correct checksums (for tests).
//! - [`rewrite`] shifts the client's ACK numbers, SACK edges and echoed timestamps into the
//!   secondary's spaces (its TCP stack picked its own ISN and timestamp base), as QEMU's
//!   filter-rewriter does, queueing client frames until the offset is known.
//! - [`engine`] is the whole packet mode as a synchronous state machine ([`PacketEngine`]):
//!   frames in, [`Out`] values out, time as an argument. It feeds the replicas' output to the
//!   [`Comparator`](crate::Comparator) and releases the primary's own frames, unmodified and in
//!   order, as the comparator confirms their bytes.
//!
//! Nothing here does I/O; a frontend reads the ports, calls the engine and sends what it
//! returns. No `unsafe`.
#![warn(missing_docs)]

pub mod build;
pub mod checksum;
pub mod engine;
pub mod frame;
mod held;
mod lru;
pub mod rewrite;

#[cfg(test)]
mod engine_props;
#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod frame_tests;
#[cfg(test)]
mod rewrite_tests;

pub use engine::{EngineConfig, EngineStats, Out, PacketEngine, PortStats};
pub use frame::{parse, Frame, FrameError, Ip, Tcp, Transport};
pub use rewrite::{Offsets, Replica, RewriteConfig, RewriteStats, RewriteTable};
