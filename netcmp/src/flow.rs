//! Flow keys (IPv4 and IPv6) and the passthrough list.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// The transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP: compared as a byte stream ([`crate::stream`]).
    Tcp,
    /// UDP: compared per packet ([`crate::packet`]).
    Udp,
    /// ICMP or ICMPv6: compared per packet; the "port" is the echo identifier (or 0).
    Icmp,
}

/// One direction of one flow: the replica's output from `src` (the service) to `dst` (the
/// client). IPv4 and IPv6 addresses both work; for ICMP both ports hold the echo identifier
/// or 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Protocol.
    pub proto: Proto,
    /// The replica's end (source of the output).
    pub src: SocketAddr,
    /// The client's end.
    pub dst: SocketAddr,
}

impl FlowKey {
    /// A TCP flow from `src` to `dst`.
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> FlowKey {
        FlowKey {
            proto: Proto::Tcp,
            src,
            dst,
        }
    }

    /// A UDP flow from `src` to `dst`.
    pub fn udp(src: SocketAddr, dst: SocketAddr) -> FlowKey {
        FlowKey {
            proto: Proto::Udp,
            src,
            dst,
        }
    }

    /// An ICMP flow between two addresses; `id` is the echo identifier (0 for other types).
    pub fn icmp(src: IpAddr, dst: IpAddr, id: u16) -> FlowKey {
        FlowKey {
            proto: Proto::Icmp,
            src: SocketAddr::new(src, id),
            dst: SocketAddr::new(dst, id),
        }
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} -> {}", self.proto, self.src, self.dst)
    }
}

/// One passthrough rule: flows it matches are released without comparing (a service whose
/// output never matches, such as a clock). Every field that is set must match; `port` and
/// `addr` match either end of the flow (and, when both are set, the same end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PassRule {
    /// Only this protocol (any when `None`).
    pub proto: Option<Proto>,
    /// This port at either end.
    pub port: Option<u16>,
    /// This address at either end.
    pub addr: Option<IpAddr>,
}

impl PassRule {
    /// Whether this rule matches `key`. A rule with no field set matches nothing.
    pub fn matches(&self, key: &FlowKey) -> bool {
        if self.port.is_none() && self.addr.is_none() {
            return false;
        }
        if self.proto.is_some_and(|p| p != key.proto) {
            return false;
        }
        let end = |a: &SocketAddr| {
            self.port.is_none_or(|p| p == a.port()) && self.addr.is_none_or(|ip| ip == a.ip())
        };
        end(&key.src) || end(&key.dst)
    }
}

/// The passthrough list: a flow that any rule matches is never compared.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Passthrough {
    /// The rules.
    pub rules: Vec<PassRule>,
}

impl Passthrough {
    /// Whether `key` is passed through.
    pub fn matches(&self, key: &FlowKey) -> bool {
        self.rules.iter().any(|r| r.matches(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn rules_match_either_end_and_both_families() {
        let ntp = PassRule {
            proto: Some(Proto::Udp),
            port: Some(123),
            addr: None,
        };
        let host = PassRule {
            addr: Some("2001:db8::7".parse().unwrap()),
            ..PassRule::default()
        };
        let list = Passthrough {
            rules: vec![ntp, host],
        };
        assert!(list.matches(&FlowKey::udp(sa("10.0.0.1:123"), sa("10.0.0.9:5000"))));
        assert!(list.matches(&FlowKey::udp(sa("10.0.0.1:5000"), sa("10.0.0.9:123"))));
        assert!(!list.matches(&FlowKey::tcp(sa("10.0.0.1:123"), sa("10.0.0.9:5000"))));
        assert!(list.matches(&FlowKey::tcp(
            sa("[2001:db8::1]:80"),
            sa("[2001:db8::7]:4000")
        )));
        assert!(!list.matches(&FlowKey::tcp(
            sa("[2001:db8::1]:80"),
            sa("[2001:db8::8]:4000")
        )));
        assert!(!PassRule::default().matches(&FlowKey::icmp(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            7
        )));
    }

    #[test]
    fn port_and_addr_must_be_the_same_end() {
        let rule = PassRule {
            proto: None,
            port: Some(80),
            addr: Some("10.0.0.1".parse().unwrap()),
        };
        assert!(rule.matches(&FlowKey::tcp(sa("10.0.0.1:80"), sa("10.0.0.2:9"))));
        assert!(rule.matches(&FlowKey::tcp(sa("10.0.0.2:9"), sa("10.0.0.1:80"))));
        assert!(!rule.matches(&FlowKey::tcp(sa("10.0.0.1:9"), sa("10.0.0.2:80"))));
    }
}
