//! Parsing Ethernet II frames: at most one 802.1Q tag, then IPv4 (options skipped) or IPv6
//! (hop-by-hop, routing and destination-options headers skipped, at most
//! [`MAX_EXTENSION_HEADERS`]), then TCP (options: MSS, window scale, SACK-permitted, SACK
//! blocks, timestamps), UDP, ICMP or ICMPv6.
//!
//! Every length field is checked against the bytes the frame has: a truncated or malformed
//! frame is an [`FrameError`], never a panic or an out-of-bounds read. Ethernet padding past
//! the IP packet's length is ignored. Checksums are not verified here (see
//! [`super::checksum::verify`]).
//!
//! The parse result holds values and offsets into the frame, not borrowed slices, so it can be
//! kept next to a queued frame and used to rewrite it in place later.
//!
//! **Fragments** are not reassembled: an IPv4 packet with MF set or a nonzero fragment offset,
//! or an IPv6 packet with a fragment header (other than an atomic fragment, offset 0 without
//! M), parses as [`Ip::fragment`] with [`Transport::Other`]. The engine passes such packets
//! through uncompared (see [`super::engine`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::flow::FlowKey;
use crate::stream::TcpFlags;

/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of an 802.1Q tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;
/// The most IPv6 extension headers skipped before the frame is called malformed.
pub const MAX_EXTENSION_HEADERS: usize = 8;

/// TCP header flag bits (the byte at offset 13).
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronize sequence numbers.
    pub const SYN: u8 = 0x02;
    /// Reset the connection.
    pub const RST: u8 = 0x04;
    /// Push.
    pub const PSH: u8 = 0x08;
    /// The acknowledgment number is valid.
    pub const ACK: u8 = 0x10;
    /// The urgent pointer is valid.
    pub const URG: u8 = 0x20;
}

/// Why a frame does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A header or a length field reaches past the end of the frame.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field has a value that cannot be (version, header length, option length...).
    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// A parsed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The 802.1Q tag control information, if the frame had a tag.
    pub vlan: Option<u16>,
    /// The ethertype after the tag.
    pub ethertype: u16,
    /// The IP packet, for IPv4 and IPv6 ethertypes; `None` for anything else (ARP...).
    pub ip: Option<Ip>,
}

/// An IPv4 or IPv6 packet in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ip {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Offset of the IP header in the frame.
    pub header_at: usize,
    /// Offset of the transport header (after IPv4 options or IPv6 extension headers).
    pub l4_at: usize,
    /// Offset just past the IP packet (Ethernet padding excluded).
    pub end: usize,
    /// The transport protocol (IPv6: the last next-header value).
    pub protocol: u8,
    /// An IP fragment: not reassembled, [`Transport::Other`].
    pub fragment: bool,
    /// The transport header.
    pub transport: Transport,
}

/// The transport header of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP.
    Tcp(Tcp),
    /// UDP.
    Udp(Udp),
    /// ICMP or ICMPv6.
    Icmp(Icmp),
    /// Another protocol, or a fragment.
    Other,
}

/// A TCP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcp {
    /// Offset of the TCP header in the frame.
    pub at: usize,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number (meaningful with [`tcp_flags::ACK`]).
    pub ack: u32,
    /// The flag bits ([`tcp_flags`]).
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// Header length in bytes (the data offset), options included.
    pub header_len: usize,
    /// The options this parser knows.
    pub options: TcpOptions,
    /// Offset of the payload in the frame.
    pub payload_at: usize,
    /// Offset just past the payload.
    pub payload_end: usize,
}

/// The TCP options this parser knows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpOptions {
    /// Maximum segment size.
    pub mss: Option<u16>,
    /// Window scale shift.
    pub window_scale: Option<u8>,
    /// SACK permitted.
    pub sack_permitted: bool,
    /// Timestamps.
    pub timestamps: Option<Timestamps>,
    /// SACK blocks (none when the option is absent).
    pub sack: SackBlocks,
}

/// The timestamps option (RFC 7323).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamps {
    /// The sender's timestamp.
    pub val: u32,
    /// The echoed timestamp (meaningful with ACK).
    pub ecr: u32,
    /// Offset of `val` in the frame (`ecr` follows it).
    pub at: usize,
}

/// The SACK blocks of a segment (RFC 2018), at most four.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SackBlocks {
    /// Offset of the first block's left edge in the frame (each block is 8 bytes).
    pub at: usize,
    /// How many of `blocks` are used.
    pub len: usize,
    /// (left edge, right edge) pairs.
    pub blocks: [(u32, u32); 4],
}

impl SackBlocks {
    /// The used blocks.
    pub fn as_slice(&self) -> &[(u32, u32)] {
        &self.blocks[..self.len]
    }
}

/// A UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// The UDP length field (header included).
    pub length: usize,
    /// Offset of the payload in the frame.
    pub payload_at: usize,
    /// Offset just past the payload.
    pub payload_end: usize,
}

/// An ICMP or ICMPv6 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icmp {
    /// Type.
    pub icmp_type: u8,
    /// Code.
    pub code: u8,
    /// The identifier of an echo request or reply.
    pub echo_id: Option<u16>,
}

impl Tcp {
    /// Whether all of `flags` ([`tcp_flags`]) are set.
    pub fn has(&self, flags: u8) -> bool {
        self.flags & flags == flags
    }

    /// The flags the comparator takes.
    pub fn compare_flags(&self) -> TcpFlags {
        TcpFlags {
            syn: self.has(tcp_flags::SYN),
            fin: self.has(tcp_flags::FIN),
            rst: self.has(tcp_flags::RST),
        }
    }

    /// The payload in `frame` (the frame this was parsed from).
    pub fn payload<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        &frame[self.payload_at..self.payload_end]
    }
}

impl Ip {
    /// Offset just past the transport segment: the UDP length for UDP, else the packet's end.
    pub fn l4_end(&self) -> usize {
        match self.transport {
            Transport::Udp(u) => u.payload_end,
            _ => self.end,
        }
    }

    /// The flow this packet belongs to as a replica's output (source: the replica, destination:
    /// the client); `None` for fragments and other protocols.
    pub fn output_key(&self) -> Option<FlowKey> {
        let (s, d) = (self.src, self.dst);
        match self.transport {
            Transport::Tcp(t) => Some(FlowKey::tcp(
                SocketAddr::new(s, t.src_port),
                SocketAddr::new(d, t.dst_port),
            )),
            Transport::Udp(u) => Some(FlowKey::udp(
                SocketAddr::new(s, u.src_port),
                SocketAddr::new(d, u.dst_port),
            )),
            Transport::Icmp(i) => Some(FlowKey::icmp(s, d, i.echo_id.unwrap_or(0))),
            Transport::Other => None,
        }
    }

    /// The comparator's payload of this packet: TCP and UDP payload, the whole ICMP message.
    pub fn payload<'a>(&self, frame: &'a [u8]) -> &'a [u8] {
        match self.transport {
            Transport::Tcp(t) => t.payload(frame),
            Transport::Udp(u) => &frame[u.payload_at..u.payload_end],
            Transport::Icmp(_) => &frame[self.l4_at..self.end],
            Transport::Other => &frame[self.l4_at..self.end],
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parse a frame. Non-IP ethertypes parse with `ip: None`.
pub fn parse(frame: &[u8]) -> Result<Frame, FrameError> {
    if frame.len() < 14 {
        return Err(FrameError::Truncated("ethernet header"));
    }
    let (vlan, ethertype, l3) = match be16(frame, 12) {
        ETHERTYPE_VLAN => {
            if frame.len() < 18 {
                return Err(FrameError::Truncated("802.1Q tag"));
            }
            (Some(be16(frame, 14)), be16(frame, 16), 18)
        }
        t => (None, t, 14),
    };
    let ip = match ethertype {
        ETHERTYPE_IPV4 => Some(parse_ipv4(frame, l3)?),
        ETHERTYPE_IPV6 => Some(parse_ipv6(frame, l3)?),
        _ => None,
    };
    Ok(Frame {
        vlan,
        ethertype,
        ip,
    })
}

fn parse_ipv4(f: &[u8], at: usize) -> Result<Ip, FrameError> {
    let b = &f[at..];
    if b.len() < 20 {
        return Err(FrameError::Truncated("ipv4 header"));
    }
    if b[0] >> 4 != 4 {
        return Err(FrameError::Malformed("ipv4 version"));
    }
    let ihl = usize::from(b[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(FrameError::Malformed("ipv4 header length"));
    }
    let total = usize::from(be16(b, 2));
    if total < ihl {
        return Err(FrameError::Malformed("ipv4 total length"));
    }
    if total > b.len() {
        return Err(FrameError::Truncated("ipv4 packet"));
    }
    let frag = be16(b, 6);
    let fragment = frag & 0x2000 != 0 || frag & 0x1fff != 0;
    let src = IpAddr::V4(Ipv4Addr::new(b[12], b[13], b[14], b[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(b[16], b[17], b[18], b[19]));
    finish_ip(f, src, dst, at, at + ihl, at + total, b[9], fragment)
}

fn parse_ipv6(f: &[u8], at: usize) -> Result<Ip, FrameError> {
    let b = &f[at..];
    if b.len() < 40 {
        return Err(FrameError::Truncated("ipv6 header"));
    }
    if b[0] >> 4 != 6 {
        return Err(FrameError::Malformed("ipv6 version"));
    }
    let end = at + 40 + usize::from(be16(b, 4));
    if end > f.len() {
        return Err(FrameError::Truncated("ipv6 packet"));
    }
    let octets = |o: usize| -> Ipv6Addr {
        let mut a = [0u8; 16];
        a.copy_from_slice(&b[o..o + 16]);
        Ipv6Addr::from(a)
    };
    let (src, dst) = (IpAddr::V6(octets(8)), IpAddr::V6(octets(24)));
    let mut next = b[6];
    let mut pos = at + 40;
    let mut fragment = false;
    let mut skipped = 0;
    loop {
        match next {
            // Hop-by-hop, routing, destination options: (length + 1) * 8 bytes.
            0 | 43 | 60 => {
                if pos + 2 > end {
                    return Err(FrameError::Truncated("ipv6 extension header"));
                }
                let len = (usize::from(f[pos + 1]) + 1) * 8;
                if pos + len > end {
                    return Err(FrameError::Truncated("ipv6 extension header"));
                }
                next = f[pos];
                pos += len;
            }
            // Fragment: 8 bytes; an atomic fragment (offset 0, no M) is a whole packet.
            44 => {
                if pos + 8 > end {
                    return Err(FrameError::Truncated("ipv6 fragment header"));
                }
                let off_m = be16(f, pos + 2);
                next = f[pos];
                pos += 8;
                if off_m & 0xfff9 != 0 {
                    fragment = true;
                    break;
                }
            }
            _ => break,
        }
        skipped += 1;
        if skipped > MAX_EXTENSION_HEADERS {
            return Err(FrameError::Malformed("too many ipv6 extension headers"));
        }
    }
    finish_ip(f, src, dst, at, pos, end, next, fragment)
}

#[allow(clippy::too_many_arguments)]
fn finish_ip(
    f: &[u8],
    src: IpAddr,
    dst: IpAddr,
    header_at: usize,
    l4_at: usize,
    end: usize,
    protocol: u8,
    fragment: bool,
) -> Result<Ip, FrameError> {
    let seg = &f[l4_at..end];
    let v6 = src.is_ipv6();
    let transport = match protocol {
        _ if fragment => Transport::Other,
        IPPROTO_TCP => Transport::Tcp(parse_tcp(f, l4_at, end)?),
        IPPROTO_UDP => {
            if seg.len() < 8 {
                return Err(FrameError::Truncated("udp header"));
            }
            let length = usize::from(be16(seg, 4));
            if length < 8 {
                return Err(FrameError::Malformed("udp length"));
            }
            if length > seg.len() {
                return Err(FrameError::Truncated("udp datagram"));
            }
            Transport::Udp(Udp {
                src_port: be16(seg, 0),
                dst_port: be16(seg, 2),
                length,
                payload_at: l4_at + 8,
                payload_end: l4_at + length,
            })
        }
        IPPROTO_ICMP if !v6 => Transport::Icmp(parse_icmp(seg, &[0, 8])?),
        IPPROTO_ICMPV6 if v6 => Transport::Icmp(parse_icmp(seg, &[128, 129])?),
        _ => Transport::Other,
    };
    Ok(Ip {
        src,
        dst,
        header_at,
        l4_at,
        end,
        protocol,
        fragment,
        transport,
    })
}

fn parse_icmp(seg: &[u8], echo_types: &[u8]) -> Result<Icmp, FrameError> {
    if seg.len() < 4 {
        return Err(FrameError::Truncated("icmp header"));
    }
    let echo_id = if echo_types.contains(&seg[0]) {
        if seg.len() < 8 {
            return Err(FrameError::Truncated("icmp echo header"));
        }
        Some(be16(seg, 4))
    } else {
        None
    };
    Ok(Icmp {
        icmp_type: seg[0],
        code: seg[1],
        echo_id,
    })
}

fn parse_tcp(f: &[u8], at: usize, end: usize) -> Result<Tcp, FrameError> {
    if end - at < 20 {
        return Err(FrameError::Truncated("tcp header"));
    }
    let header_len = usize::from(f[at + 12] >> 4) * 4;
    if header_len < 20 {
        return Err(FrameError::Malformed("tcp data offset"));
    }
    if at + header_len > end {
        return Err(FrameError::Truncated("tcp options"));
    }
    Ok(Tcp {
        at,
        src_port: be16(f, at),
        dst_port: be16(f, at + 2),
        seq: be32(f, at + 4),
        ack: be32(f, at + 8),
        flags: f[at + 13],
        window: be16(f, at + 14),
        header_len,
        options: parse_tcp_options(f, at + 20, at + header_len)?,
        payload_at: at + header_len,
        payload_end: end,
    })
}

/// Parse the options in `f[start..end]`. The options netcmp rewrites (SACK, timestamps) must
/// be well formed and appear at most once; unknown options are skipped by their length.
fn parse_tcp_options(f: &[u8], start: usize, end: usize) -> Result<TcpOptions, FrameError> {
    let mut o = TcpOptions::default();
    let mut i = start;
    while i < end {
        match f[i] {
            0 => break,
            1 => i += 1,
            kind => {
                if i + 2 > end {
                    return Err(FrameError::Malformed("tcp option length"));
                }
                let len = usize::from(f[i + 1]);
                if len < 2 || i + len > end {
                    return Err(FrameError::Malformed("tcp option length"));
                }
                match (kind, len) {
                    (2, 4) => o.mss = Some(be16(f, i + 2)),
                    (3, 3) => o.window_scale = Some(f[i + 2]),
                    (4, 2) => o.sack_permitted = true,
                    (5, _) => {
                        let n = (len - 2) / 8;
                        if (len - 2) % 8 != 0 || n == 0 || n > 4 || o.sack.len != 0 {
                            return Err(FrameError::Malformed("tcp sack option"));
                        }
                        o.sack.at = i + 2;
                        o.sack.len = n;
                        for k in 0..n {
                            let b = i + 2 + 8 * k;
                            o.sack.blocks[k] = (be32(f, b), be32(f, b + 4));
                        }
                    }
                    (8, 10) if o.timestamps.is_none() => {
                        o.timestamps = Some(Timestamps {
                            val: be32(f, i + 2),
                            ecr: be32(f, i + 6),
                            at: i + 2,
                        })
                    }
                    (8, _) => return Err(FrameError::Malformed("tcp timestamps option")),
                    _ => {}
                }
                i += len;
            }
        }
    }
    Ok(o)
}
