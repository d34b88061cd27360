//! Internet checksums (RFC 1071): full computation, with the TCP/UDP/ICMPv6 pseudo-header for
//! IPv4 and IPv6, and the incremental update of RFC 1624 (equation 3) for rewriting a field
//! without summing the whole segment again.
//!
//! Sums are kept in a `u64` and folded at the end, so no input a frame can hold overflows.

use std::net::IpAddr;

use super::frame::{Ip, Transport, IPPROTO_ICMP, IPPROTO_ICMPV6};

/// The one's-complement sum of `data` (16-bit big-endian words, an odd last byte padded with
/// zero) added to `initial`, not folded.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Fold a sum to 16 bits and complement it: the checksum field's value.
pub fn finish(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The sum of the pseudo-header of TCP, UDP and ICMPv6 (RFC 793 for IPv4, RFC 8200 §8.1 for
/// IPv6): both addresses, the protocol and the upper-layer length.
pub fn pseudo_header_sum(src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> u64 {
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => sum(&d.octets(), sum(&s.octets(), 0)),
        (s, d) => sum(&ip_octets(d), sum(&ip_octets(s), 0)),
    };
    acc += u64::from(protocol);
    acc += len as u64;
    acc
}

fn ip_octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// The checksum of a TCP or UDP segment (or an ICMPv6 message) with its pseudo-header.
/// Computed over `segment` as given: zero the checksum field first to compute the value to
/// store; a segment with a correct checksum in place gives 0.
pub fn transport_checksum(src: IpAddr, dst: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    finish(sum(
        segment,
        pseudo_header_sum(src, dst, protocol, segment.len()),
    ))
}

/// The checksum of an IPv4 header or an ICMPv4 message (no pseudo-header); as for
/// [`transport_checksum`], 0 over data with a correct checksum in place.
pub fn plain_checksum(data: &[u8]) -> u16 {
    finish(sum(data, 0))
}

/// RFC 1624 equation 3: the new checksum after the bytes `old` of the checksummed data were
/// replaced by `new`. Both must have the same even length and start at an even offset from
/// the start of the checksummed data (the TCP or UDP header, or the pseudo-header for an
/// address): widen an odd-aligned field to its enclosing words first.
///
/// # Panics
///
/// If the lengths differ or are odd (a caller's bug, not something a frame can cause).
pub fn adjust(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    assert!(old.len() == new.len() && old.len() % 2 == 0);
    let mut acc = u64::from(!checksum);
    for w in old.chunks_exact(2) {
        acc += u64::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    finish(sum(new, acc))
}

/// [`adjust`] for a UDP checksum: 0 (IPv4: no checksum) stays 0, and a computed 0 is sent as
/// 0xffff (RFC 768).
pub fn adjust_udp(checksum: u16, old: &[u8], new: &[u8]) -> u16 {
    if checksum == 0 {
        return 0;
    }
    match adjust(checksum, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// Where the transport checksum field of `ip`'s packet is, and the protocol number that goes
/// into its pseudo-header (`None`: no pseudo-header, ICMPv4).
fn transport_field(ip: &Ip) -> Option<(usize, Option<u8>)> {
    match ip.transport {
        Transport::Tcp(_) => Some((ip.l4_at + 16, Some(ip.protocol))),
        Transport::Udp(_) => Some((ip.l4_at + 6, Some(ip.protocol))),
        Transport::Icmp(_) if ip.protocol == IPPROTO_ICMPV6 => {
            Some((ip.l4_at + 2, Some(IPPROTO_ICMPV6)))
        }
        Transport::Icmp(_) if ip.protocol == IPPROTO_ICMP => Some((ip.l4_at + 2, None)),
        _ => None,
    }
}

/// Recompute, in place, the checksums of a parsed frame: the IPv4 header's and the TCP, UDP or
/// ICMP checksum (a UDP checksum computed as 0 is stored as 0xffff).
pub fn fill(frame: &mut [u8], ip: &Ip) {
    if ip.src.is_ipv4() {
        let h = &mut frame[ip.header_at..ip.l4_at];
        h[10..12].fill(0);
        let c = plain_checksum(h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
    }
    if let Some((at, pseudo)) = transport_field(ip) {
        frame[at..at + 2].fill(0);
        let seg = &frame[ip.l4_at..ip.l4_end()];
        let mut c = match pseudo {
            Some(p) => transport_checksum(ip.src, ip.dst, p, seg),
            None => plain_checksum(seg),
        };
        if c == 0 && matches!(ip.transport, Transport::Udp(_)) {
            c = 0xffff;
        }
        frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
}

/// Whether the checksums of a parsed frame are correct (the IPv4 header's, and the TCP, UDP or
/// ICMP checksum; a UDP checksum of 0 over IPv4 means none and is accepted).
pub fn verify(frame: &[u8], ip: &Ip) -> bool {
    if ip.src.is_ipv4() && plain_checksum(&frame[ip.header_at..ip.l4_at]) != 0 {
        return false;
    }
    let Some((at, pseudo)) = transport_field(ip) else {
        return true;
    };
    if ip.src.is_ipv4() && matches!(ip.transport, Transport::Udp(_)) && frame[at..at + 2] == [0, 0]
    {
        return true;
    }
    let seg = &frame[ip.l4_at..ip.l4_end()];
    match pseudo {
        Some(p) => transport_checksum(ip.src, ip.dst, p, seg) == 0,
        None => plain_checksum(seg) == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the sum of these words is ddf2 (folded), so the checksum is 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(plain_checksum(&data), !0xddf2);
        // An odd length pads with zero.
        assert_eq!(plain_checksum(&[0x12]), !0x1200);
    }

    #[test]
    fn udp_zero_is_kept_and_zero_result_becomes_ffff() {
        assert_eq!(adjust_udp(0, &[0, 1], &[0, 2]), 0);
        // !0x0001 + !0x0000 + 0x0001 folds to 0xffff: the plain result is 0.
        assert_eq!(adjust(0x0001, &[0x00, 0x00], &[0x00, 0x01]), 0);
        assert_eq!(adjust_udp(0x0001, &[0x00, 0x00], &[0x00, 0x01]), 0xffff);
    }

    proptest! {
        /// Incremental update equals a full recompute, for any data and any even-aligned
        /// replaced range.
        #[test]
        fn incremental_equals_full(
            mut data in proptest::collection::vec(any::<u8>(), 2..200),
            at in any::<usize>(),
            len in 1usize..8,
            fill in proptest::collection::vec(any::<u8>(), 16),
        ) {
            let words = data.len() / 2;
            let start = (at % words) * 2;
            let end = (start + 2 * len).min(words * 2);
            let before = plain_checksum(&data);
            let old = data[start..end].to_vec();
            data[start..end].copy_from_slice(&fill[..end - start]);
            let after = plain_checksum(&data);
            let inc = adjust(before, &old, &data[start..end]);
            // 0x0000 and 0xffff are the same number in one's complement; RFC 1624 avoids -0
            // except when the sum is really zero.
            prop_assert!(inc == after || (inc == 0xffff && after == 0) || (inc == 0 && after == 0xffff));
            let mut check = data.clone();
            check.extend_from_slice(&inc.to_be_bytes());
            if data.len() % 2 == 0 {
                prop_assert!(matches!(plain_checksum(&check), 0 | 0xffff));
            }
        }
    }
}
