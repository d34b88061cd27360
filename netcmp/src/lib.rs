//! # netcmp — output comparison and output buffering for lockstep
//!
//! Built: the comparator core, the output-buffering core, the stream proxy ([`proxy`], the
//! L4 frontend, behind `lockstep netcmp`), the packet mode ([`l2`], its engine, and
//! [`packet_mode`], its frontend on TAP interfaces and QEMU `-netdev stream` sockets, behind
//! `lockstep netcmp --packet`) and the epoch link ([`link`]). No core does I/O or keeps a
//! clock: packets come in as calls, time as an
//! [`Instant`](std::time::Instant) argument, and what to do comes back as values, so the
//! cores are tested deterministically; the frontends carry out what they return.
//!
//! Client input is mirrored to the primary and the secondary replica, and their outputs are
//! compared per flow:
//!
//! ```text
//!  client ──▶ netcmp ──mirror──▶ primary   ──output──┐
//!               │      └───────▶ secondary ──output──┤ compare
//!               ◀──── released when both agree ──────┘ diverging/overdue ⇒ checkpoint
//! ```
//!
//! - [`Comparator`] ([`table`]) keeps one comparison per [`FlowKey`] (IPv4 or IPv6; TCP, UDP,
//!   ICMP) and returns [`Action`]s: release the primary's output, request a checkpoint (once,
//!   with a [`Reason`]), a flow ended. Its memory is bounded by bytes held
//!   ([`Config::max_held_bytes`]), not by a number of flows: past the bound, the flows
//!   holding the oldest output release it unconfirmed and a checkpoint is requested.
//! - TCP output is compared as a byte stream in sequence order ([`stream::TcpCompare`]), so
//!   the two replicas may cut it into segments differently. Each side has its own initial
//!   sequence number, out-of-order and retransmitted segments are reassembled before they
//!   are compared (QEMU 10's colo-compare also compares payload by offset, but eagerly: a
//!   primary segment that arrives out of order is a mismatch there), and the sequence
//!   numbers may wrap.
//! - UDP and ICMP output is compared per packet ([`packet::PacketCompare`]).
//! - Identical output is released as the secondary confirms it; diverging output, or output
//!   the secondary has not matched within [`Config::compare_timeout`], is released and a
//!   checkpoint requested; the flow's output then passes through uncompared until
//!   [`Comparator::resync_all`] (after the checkpoint committed) restarts comparison.
//! - Flows matching the [`Passthrough`] list (a clock service, say) are never compared.
//! - [`OutputBuffer`] ([`buffer`]) is the mode without a secondary to compare with (Remus
//!   style): output is held until a checkpoint of a state at least as new commits (decided
//!   by `CLOCK_MONOTONIC` stamps, [`blkrep::epoch::monotonic_ns`]), and dropped if the
//!   primary fails.
//! - [`Proxy`] ([`proxy`]): clients connect to netcmp, which connects to a primary and a
//!   secondary instance of the service, mirrors the input and compares the replies; without
//!   a secondary it buffers. [`EpochLink`] ([`link`]) requests checkpoints from the primary
//!   daemon and follows its commits over its control socket.
//! - [`PacketProxy`] ([`packet_mode`]): three L2 ports (`tap:NAME`, `unix:PATH`) carrying
//!   Ethernet frames — the clients' side and the two replicas' NICs — around the
//!   [`l2::PacketEngine`], which mirrors the client's frames (its ACKs shifted into the
//!   secondary's sequence space), compares the replicas' output and releases the primary's own
//!   frames as the secondary confirms them. A committed checkpoint zeroes the shifts: the
//!   secondary is then a copy of the primary, TCP stack included.
//!
//! The crate's only `unsafe` is the TAP ioctl and its registration with tokio
//! (`packet_mode::tap`); everything else is safe code (`#![deny(unsafe_code)]`).
// The only `unsafe` is the TAP ioctl (`packet_mode::tap`), allowed there alone.
#![deny(unsafe_code)]

pub mod buffer;
pub mod flow;
pub mod l2;
pub mod link;
pub mod packet;
pub mod packet_mode;
pub mod proxy;
pub mod stream;
pub mod table;

pub use buffer::{BufferError, Output, OutputBuffer};
pub use flow::{FlowKey, PassRule, Passthrough, Proto};
pub use link::{EpochLink, LinkEvent, LinkStatus};
pub use packet_mode::{PacketConfig, PacketHandle, PacketProxy, PacketStatus, PortSpec};
pub use proxy::{Proxy, ProxyConfig, ProxyHandle, ProxyStatus};
pub use stream::TcpFlags;
pub use table::{Action, Comparator, Config, Reason, Stats};

/// What one flow's comparison reports ([`stream::TcpCompare`], [`packet::PacketCompare`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Release these bytes of the primary's output (TCP: the next bytes of the stream, in
    /// order; UDP/ICMP: one whole packet).
    Release(Vec<u8>),
    /// The outputs differ first at `offset` (TCP: stream offset; UDP/ICMP: packet number). The
    /// held output is released after this event and comparison stops until resync.
    Mismatch {
        /// Where.
        offset: u64,
    },
    /// The output at `offset` waited longer than the compare timeout; as for a mismatch.
    Timeout {
        /// Where.
        offset: u64,
    },
    /// The primary's stream ended (FIN, or RST when `reset`) and all of it was released.
    End {
        /// RST rather than FIN.
        reset: bool,
    },
}
