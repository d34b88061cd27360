//! Frame builders for tests (this crate's and a frontend's): TCP, UDP, ICMP echo and ARP
//! frames with correct lengths and checksums, over IPv4 or IPv6, with or without an 802.1Q
//! tag.

use std::net::{IpAddr, Ipv4Addr};

use super::checksum;
use super::frame::{
    parse, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
};

/// The link and network ends of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// Source MAC address.
    pub src_mac: [u8; 6],
    /// Destination MAC address.
    pub dst_mac: [u8; 6],
    /// An 802.1Q tag control information to add, if any.
    pub vlan: Option<u16>,
    /// Source address.
    pub src: IpAddr,
    /// Destination address (the same family as `src`).
    pub dst: IpAddr,
}

impl Endpoints {
    /// The same ends the other way round (MACs and addresses swapped).
    pub fn reversed(&self) -> Endpoints {
        Endpoints {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            vlan: self.vlan,
            src: self.dst,
            dst: self.src,
        }
    }
}

/// A TCP segment to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSegment<'a> {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Flags ([`super::frame::tcp_flags`]).
    pub flags: u8,
    /// Window.
    pub window: u16,
    /// The MSS option.
    pub mss: Option<u16>,
    /// The timestamps option (TSval, TSecr).
    pub timestamps: Option<(u32, u32)>,
    /// SACK blocks (at most 4, and what fits in 40 bytes of options with the others).
    pub sack: &'a [(u32, u32)],
    /// Payload.
    pub payload: &'a [u8],
}

impl Default for TcpSegment<'_> {
    fn default() -> Self {
        TcpSegment {
            src_port: 0,
            dst_port: 0,
            seq: 0,
            ack: 0,
            flags: 0,
            window: 65535,
            mss: None,
            timestamps: None,
            sack: &[],
            payload: &[],
        }
    }
}

/// An Ethernet II frame around `payload`.
pub fn ethernet_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    if let Some(tci) = vlan {
        f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IP packet (IPv4 without options, TTL 64, DF; or IPv6, hop limit 64) carrying `l4`, in a
/// frame, with every checksum filled in.
///
/// # Panics
///
/// If the addresses are of different families or the packet is too long for its length field.
pub fn ip_frame(ep: &Endpoints, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = Vec::with_capacity(40 + l4.len());
    let ethertype = match (ep.src, ep.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(20 + l4.len()).expect("ipv4 packet too long");
            ip.extend_from_slice(&[0x45, 0]);
            ip.extend_from_slice(&total.to_be_bytes());
            ip.extend_from_slice(&[0, 0, 0x40, 0, 64, protocol, 0, 0]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ETHERTYPE_IPV4
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let len = u16::try_from(l4.len()).expect("ipv6 payload too long");
            ip.extend_from_slice(&[0x60, 0, 0, 0]);
            ip.extend_from_slice(&len.to_be_bytes());
            ip.extend_from_slice(&[protocol, 64]);
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            ETHERTYPE_IPV6
        }
        _ => panic!("mixed address families"),
    };
    ip.extend_from_slice(l4);
    let mut f = ethernet_frame(ep.dst_mac, ep.src_mac, ep.vlan, ethertype, &ip);
    let parsed = parse(&f).expect("a built frame parses");
    checksum::fill(&mut f, &parsed.ip.expect("an ip frame"));
    f
}

/// A TCP frame.
///
/// # Panics
///
/// If the options do not fit in 40 bytes, or as for [`ip_frame`].
pub fn tcp_frame(ep: &Endpoints, seg: &TcpSegment<'_>) -> Vec<u8> {
    let mut opts = Vec::new();
    if let Some(mss) = seg.mss {
        opts.extend_from_slice(&[2, 4]);
        opts.extend_from_slice(&mss.to_be_bytes());
    }
    if let Some((val, ecr)) = seg.timestamps {
        opts.extend_from_slice(&[1, 1, 8, 10]);
        opts.extend_from_slice(&val.to_be_bytes());
        opts.extend_from_slice(&ecr.to_be_bytes());
    }
    if !seg.sack.is_empty() {
        assert!(seg.sack.len() <= 4, "at most 4 sack blocks");
        opts.extend_from_slice(&[1, 1, 5, 2 + 8 * seg.sack.len() as u8]);
        for (l, r) in seg.sack {
            opts.extend_from_slice(&l.to_be_bytes());
            opts.extend_from_slice(&r.to_be_bytes());
        }
    }
    while opts.len() % 4 != 0 {
        opts.push(0);
    }
    assert!(opts.len() <= 40, "tcp options longer than 40 bytes");
    let mut t = Vec::with_capacity(20 + opts.len() + seg.payload.len());
    t.extend_from_slice(&seg.src_port.to_be_bytes());
    t.extend_from_slice(&seg.dst_port.to_be_bytes());
    t.extend_from_slice(&seg.seq.to_be_bytes());
    t.extend_from_slice(&seg.ack.to_be_bytes());
    t.push((((20 + opts.len()) / 4) << 4) as u8);
    t.push(seg.flags);
    t.extend_from_slice(&seg.window.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(seg.payload);
    ip_frame(ep, IPPROTO_TCP, &t)
}

/// A UDP frame.
///
/// # Panics
///
/// As for [`ip_frame`].
pub fn udp_frame(ep: &Endpoints, src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + payload.len()).expect("udp datagram too long");
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    ip_frame(ep, IPPROTO_UDP, &u)
}

/// An ICMP (IPv4) or ICMPv6 (IPv6) echo request or reply.
///
/// # Panics
///
/// As for [`ip_frame`].
pub fn icmp_echo_frame(ep: &Endpoints, request: bool, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let (protocol, icmp_type) = match (ep.src.is_ipv6(), request) {
        (false, true) => (IPPROTO_ICMP, 8),
        (false, false) => (IPPROTO_ICMP, 0),
        (true, true) => (IPPROTO_ICMPV6, 128),
        (true, false) => (IPPROTO_ICMPV6, 129),
    };
    let mut m = vec![icmp_type, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    ip_frame(ep, protocol, &m)
}

/// An ARP request (Ethernet, IPv4) broadcast from `src_mac`.
pub fn arp_request(src_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
    a.extend_from_slice(&src_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    ethernet_frame([0xff; 6], src_mac, None, ETHERTYPE_ARP, &a)
}
