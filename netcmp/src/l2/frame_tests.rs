//! Tests of frame parsing, the builders and checksums: field values, every header variant,
//! error cases, and (proptest) random bytes, truncations and corruptions of valid frames.

use std::net::IpAddr;

use proptest::prelude::*;

use super::build::{self, Endpoints, TcpSegment};
use super::checksum;
use super::frame::{self, parse, tcp_flags, FrameError, Ip, Transport};
use super::rewrite::{rewrite_for_secondary, Offsets};

pub(super) fn ends(src: &str, dst: &str) -> Endpoints {
    Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        vlan: None,
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
    }
}

fn full_tcp<'a>(payload: &'a [u8], sack: &'a [(u32, u32)]) -> TcpSegment<'a> {
    TcpSegment {
        src_port: 80,
        dst_port: 40000,
        seq: 0xfffffff0,
        ack: 12345,
        flags: tcp_flags::ACK | tcp_flags::PSH,
        window: 512,
        mss: Some(1460),
        timestamps: Some((111, 222)),
        sack,
        payload,
    }
}

fn ip_of(f: &[u8]) -> Ip {
    parse(f).unwrap().ip.unwrap()
}

/// Valid frames of every kind, for the property tests.
fn samples() -> Vec<Vec<u8>> {
    let v4 = ends("10.0.0.1", "10.0.0.2");
    let v6 = ends("2001:db8::1", "2001:db8::2");
    let mut tagged = v4;
    tagged.vlan = Some(7);
    let sack = [(1, 2), (3, 4)];
    vec![
        build::tcp_frame(&v4, &full_tcp(b"hello", &sack)),
        build::tcp_frame(&v6, &full_tcp(b"hello world", &sack[..1])),
        build::tcp_frame(&tagged, &full_tcp(b"", &[])),
        build::udp_frame(&v4, 53, 3333, b"answer"),
        build::udp_frame(&v6, 53, 3333, b""),
        build::icmp_echo_frame(&v4, true, 9, 1, b"ping"),
        build::icmp_echo_frame(&v6, false, 9, 1, b"pong"),
        with_hop_by_hop(&build::tcp_frame(&v6, &full_tcp(b"x", &[]))),
        build::arp_request(
            [2; 6],
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ),
    ]
}

/// Insert an 8-byte hop-by-hop options header (PadN) after the IPv6 header.
fn with_hop_by_hop(f: &[u8]) -> Vec<u8> {
    let mut g = f[..54].to_vec();
    let next = g[14 + 6];
    g[14 + 6] = 0;
    let plen = u16::from_be_bytes([g[18], g[19]]) + 8;
    g[18..20].copy_from_slice(&plen.to_be_bytes());
    g.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    g.extend_from_slice(&f[54..]);
    g
}

#[test]
fn tcp_over_ipv4_with_every_option() {
    let sack = [(100, 200), (300, 400)];
    let f = build::tcp_frame(&ends("10.0.0.1", "10.0.0.2"), &full_tcp(b"data", &sack));
    let p = parse(&f).unwrap();
    assert_eq!((p.vlan, p.ethertype), (None, frame::ETHERTYPE_IPV4));
    let ip = p.ip.unwrap();
    assert_eq!(ip.src, "10.0.0.1".parse::<IpAddr>().unwrap());
    assert!(!ip.fragment);
    assert!(checksum::verify(&f, &ip));
    let Transport::Tcp(t) = ip.transport else {
        panic!("not tcp")
    };
    assert_eq!(
        (t.src_port, t.dst_port, t.seq, t.ack),
        (80, 40000, 0xfffffff0, 12345)
    );
    assert!(t.has(tcp_flags::ACK) && !t.has(tcp_flags::SYN));
    assert_eq!(t.window, 512);
    assert_eq!(t.options.mss, Some(1460));
    let ts = t.options.timestamps.unwrap();
    assert_eq!((ts.val, ts.ecr), (111, 222));
    assert_eq!(t.options.sack.as_slice(), &sack);
    assert_eq!(t.payload(&f), b"data");
    assert_eq!(ip.payload(&f), b"data");
    assert_eq!(t.header_len, 20 + 4 + 12 + 20);
    let key = ip.output_key().unwrap();
    assert_eq!(key.src, "10.0.0.1:80".parse().unwrap());
}

#[test]
fn vlan_tag_and_ethernet_padding() {
    let mut e = ends("10.0.0.1", "10.0.0.2");
    e.vlan = Some(0x2005);
    let mut f = build::udp_frame(&e, 1, 2, b"x");
    f.extend_from_slice(&[0; 20]);
    let p = parse(&f).unwrap();
    assert_eq!(p.vlan, Some(0x2005));
    let ip = p.ip.unwrap();
    assert_eq!(ip.end, f.len() - 20);
    assert_eq!(ip.payload(&f), b"x");
    assert!(checksum::verify(&f, &ip));
}

#[test]
fn ipv6_extension_headers_and_fragments() {
    let e = ends("2001:db8::1", "2001:db8::2");
    let f = with_hop_by_hop(&build::tcp_frame(&e, &full_tcp(b"abc", &[])));
    let ip = ip_of(&f);
    assert_eq!((ip.protocol, ip.l4_at), (frame::IPPROTO_TCP, 14 + 48));
    assert_eq!(ip.payload(&f), b"abc");
    assert!(checksum::verify(&f, &ip));
    // A fragment header: offset 0 with M set is a fragment; offset 0 without M is atomic.
    let mut g = f.clone();
    g[14 + 6] = 44;
    g[14 + 42..14 + 44].copy_from_slice(&1u16.to_be_bytes());
    let ip = ip_of(&g);
    assert!(ip.fragment);
    assert_eq!(ip.transport, Transport::Other);
    assert_eq!(ip.output_key(), None);
    g[14 + 42..14 + 44].copy_from_slice(&0u16.to_be_bytes());
    let ip = ip_of(&g);
    assert!(!ip.fragment && matches!(ip.transport, Transport::Tcp(_)));
    // Too many extension headers.
    let mut h = build::udp_frame(&e, 1, 2, &[0; 80]);
    h[20] = 60;
    for k in 0..10 {
        h[54 + 8 * k] = 60;
        h[55 + 8 * k] = 0;
    }
    assert_eq!(
        parse(&h),
        Err(FrameError::Malformed("too many ipv6 extension headers"))
    );
}

#[test]
fn ipv4_options_fragments_and_icmp() {
    let e = ends("10.0.0.1", "10.0.0.2");
    let f = build::udp_frame(&e, 5, 6, b"payload");
    // Insert 4 bytes of options (NOP NOP NOP EOL): IHL 6.
    let mut g = f[..34].to_vec();
    g.extend_from_slice(&[1, 1, 1, 0]);
    g.extend_from_slice(&f[34..]);
    g[14] = 0x46;
    let total = u16::from_be_bytes([g[16], g[17]]) + 4;
    g[16..18].copy_from_slice(&total.to_be_bytes());
    let ip = ip_of(&g);
    assert_eq!(ip.l4_at, 14 + 24);
    assert_eq!(ip.payload(&g), b"payload");
    checksum::fill(&mut g, &ip);
    assert!(checksum::verify(&g, &ip));
    // More fragments.
    let mut h = f.clone();
    h[20] |= 0x20;
    assert!(ip_of(&h).fragment);
    let mut h = f;
    h[21] = 1;
    assert!(ip_of(&h).fragment);
    // ICMP echo identifiers; other ICMP types have none.
    let ping = build::icmp_echo_frame(&e, true, 0x4242, 7, b"x");
    let ip = ip_of(&ping);
    assert!(checksum::verify(&ping, &ip));
    assert_eq!(ip.output_key().unwrap().src.port(), 0x4242);
    let mut unreach = ping.clone();
    unreach[34] = 3;
    let Transport::Icmp(i) = ip_of(&unreach).transport else {
        panic!()
    };
    assert_eq!((i.icmp_type, i.echo_id), (3, None));
    let pong6 = build::icmp_echo_frame(&ends("::1", "::2"), false, 5, 1, b"y");
    let ip = ip_of(&pong6);
    assert!(checksum::verify(&pong6, &ip));
    assert_eq!(ip.payload(&pong6).len(), 9);
}

#[test]
fn non_ip_frames() {
    let arp = build::arp_request(
        [2; 6],
        "10.0.0.1".parse().unwrap(),
        "10.0.0.9".parse().unwrap(),
    );
    let p = parse(&arp).unwrap();
    assert_eq!((p.ethertype, p.ip), (frame::ETHERTYPE_ARP, None));
    assert!(parse(&arp[..13]).is_err());
}

#[test]
fn malformed_headers() {
    let f = build::tcp_frame(&ends("10.0.0.1", "10.0.0.2"), &full_tcp(b"abc", &[(1, 2)]));
    let bad = |at: usize, v: u8| {
        let mut g = f.clone();
        g[at] = v;
        parse(&g)
    };
    assert_eq!(bad(14, 0x65), Err(FrameError::Malformed("ipv4 version")));
    assert_eq!(
        bad(14, 0x44),
        Err(FrameError::Malformed("ipv4 header length"))
    );
    assert_eq!(bad(16, 0xff), Err(FrameError::Truncated("ipv4 packet")));
    assert_eq!(
        bad(34 + 12, 0x40),
        Err(FrameError::Malformed("tcp data offset"))
    );
    assert_eq!(
        bad(34 + 12, 0xf0),
        Err(FrameError::Truncated("tcp options"))
    );
    // The SACK option (after MSS 4 and NOP NOP TS 12, NOP NOP): its length byte.
    let sack_len = 34 + 20 + 4 + 12 + 3;
    assert_eq!(f[sack_len - 1], 5);
    assert_eq!(
        bad(sack_len, 11),
        Err(FrameError::Malformed("tcp option length"))
    );
    assert_eq!(
        bad(sack_len, 2),
        Err(FrameError::Malformed("tcp sack option"))
    );
    assert_eq!(
        bad(sack_len, 0),
        Err(FrameError::Malformed("tcp option length"))
    );
    assert_eq!(
        bad(34 + 20 + 4 + 3, 9),
        Err(FrameError::Malformed("tcp timestamps option"))
    );
    let u = build::udp_frame(&ends("10.0.0.1", "10.0.0.2"), 1, 2, b"abc");
    let mut g = u.clone();
    g[34 + 5] = 4;
    assert_eq!(parse(&g), Err(FrameError::Malformed("udp length")));
    g[34 + 5] = 200;
    assert_eq!(parse(&g), Err(FrameError::Truncated("udp datagram")));
}

/// Every offset a successful parse returns lies inside the frame, and what uses them
/// (payload slices, checksum verification, rewriting) does not panic.
fn check_parse(f: &[u8]) -> Result<(), TestCaseError> {
    let Ok(p) = parse(f) else {
        return Ok(());
    };
    let Some(ip) = p.ip else {
        return Ok(());
    };
    prop_assert!(ip.header_at <= ip.l4_at && ip.l4_at <= ip.end && ip.end <= f.len());
    let _ = ip.payload(f);
    let _ = ip.output_key();
    let _ = checksum::verify(f, &ip);
    if let Transport::Tcp(t) = ip.transport {
        prop_assert!(t.at + t.header_len == t.payload_at && t.payload_at <= t.payload_end);
        prop_assert!(t.payload_end <= f.len());
        let s = t.options.sack;
        prop_assert!(s.len <= 4 && (s.len == 0 || s.at + 8 * s.len <= t.payload_at));
        if let Some(ts) = t.options.timestamps {
            prop_assert!(ts.at + 8 <= t.payload_at);
        }
        let mut g = f.to_vec();
        rewrite_for_secondary(&mut g, &t, Offsets { seq: 77, ts: 5 });
        let again = parse(&g).unwrap().ip.unwrap();
        let Transport::Tcp(u) = again.transport else {
            panic!("still tcp")
        };
        if t.has(tcp_flags::ACK) {
            prop_assert_eq!(u.ack, t.ack.wrapping_add(77));
        }
    }
    let mut g = f.to_vec();
    checksum::fill(&mut g, &ip);
    prop_assert!(checksum::verify(&g, &ip));
    Ok(())
}

proptest! {
    #[test]
    fn random_bytes_never_panic(f in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_parse(&f)?;
    }

    #[test]
    fn random_bytes_after_valid_headers_never_panic(
        which in 0usize..9,
        cut in 14usize..80,
        tail in proptest::collection::vec(any::<u8>(), 0..120),
    ) {
        let mut f = samples()[which].clone();
        f.truncate(cut.min(f.len()));
        f.extend_from_slice(&tail);
        check_parse(&f)?;
    }

    #[test]
    fn truncations_and_corruptions_never_panic(
        which in 0usize..9,
        cut in any::<usize>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
    ) {
        let sample = &samples()[which];
        for len in 0..=sample.len() {
            check_parse(&sample[..len])?;
        }
        let mut f = sample.clone();
        for (at, v) in flips {
            let n = f.len();
            f[at % n] = v;
        }
        check_parse(&f)?;
        check_parse(&f[..cut % (f.len() + 1)])?;
    }
}

#[test]
fn samples_parse_with_valid_checksums() {
    for f in samples() {
        let p = parse(&f).unwrap();
        if let Some(ip) = p.ip {
            assert!(checksum::verify(&f, &ip), "{ip:?}");
        }
    }
}
