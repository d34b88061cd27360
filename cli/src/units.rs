//! Parsing of sizes ("10G", "1.5GiB", "4096"), durations ("250ms", "2s", "1h30m") and the
//! value name of endpoints.
//!
//! Sizes follow qemu-img: K, M, G, T, P, E are binary (powers of 1024), also written KiB,
//! MiB, …; a decimal point is allowed if the result is a whole number of bytes. KB, MB, GB…
//! are refused: they mean powers of 1000 to some tools and powers of 1024 to others.
//! Durations always need a unit (`250ms`, `30s`), except 0: a bare `250` is refused rather
//! than read as seconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The value name of every endpoint flag: endpoints are parsed by [`blkrep::nbd::Endpoint`]'s
/// `FromStr`, one syntax for all of them.
pub const ENDPOINT: &str = "ADDR:PORT|:PORT|unix:PATH|nbd://…";

/// Binary size suffixes, largest first, with their shifts.
const SIZE_UNITS: [(&str, u32); 6] = [
    ("E", 60),
    ("P", 50),
    ("T", 40),
    ("G", 30),
    ("M", 20),
    ("K", 10),
];

/// Parse a byte size: a number (decimals allowed) with an optional binary suffix K, M, G, T,
/// P, E (also KiB, MiB, …; or B for bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty() || frac.contains('.') || frac.len() > 18 {
        return Err(format!(
            "{s:?} is not a size (examples: 4096, 512M, 1.5G, 10GiB)"
        ));
    }
    let suffix = suffix.trim();
    let upper = suffix.to_ascii_uppercase();
    let shift = if upper.is_empty() || upper == "B" {
        0
    } else {
        let unit = upper.strip_suffix("IB").unwrap_or(&upper);
        match SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
            Some((_, shift)) if unit.len() < upper.len() || upper.len() == 1 => *shift,
            _ if upper.len() == 2
                && upper.ends_with('B')
                && SIZE_UNITS.iter().any(|(u, _)| upper.starts_with(u)) =>
            {
                return Err(format!(
                    "{s:?}: {suffix} is ambiguous (1000 or 1024?); write {}{} or {}{}iB for binary units as qemu-img does, or the number of bytes",
                    num,
                    &upper[..1],
                    num,
                    &upper[..1]
                ))
            }
            _ => {
                return Err(format!(
                    "unknown size suffix {suffix:?} in {s:?} (use K, M, G, T, or KiB, MiB, GiB, TiB)"
                ))
            }
        }
    };
    let digits = |d: &str| -> Result<u128, String> {
        if d.is_empty() {
            Ok(0)
        } else {
            d.parse::<u128>().map_err(|_| format!("{s:?} is too large"))
        }
    };
    let scale = 10u128.pow(frac.len() as u32);
    let scaled = digits(whole)?
        .checked_mul(scale)
        .and_then(|w| w.checked_add(digits(frac).ok()?))
        .and_then(|n| n.checked_mul(1u128 << shift))
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if scaled % scale != 0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    u64::try_from(scaled / scale).map_err(|_| format!("{s:?} is too large"))
}

/// Parse a duration: what humantime accepts, a number with a unit (ns, us, ms, s, m, h, d, …;
/// "250ms", "2s", "1.5s"), or several ("1h30m", "1m 30s"); and "0". A bare number other than
/// 0 is refused: 250 might mean seconds or milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        if t.bytes().all(|b| b == b'0' || b == b'.') && t.contains('0') {
            return Ok(Duration::ZERO);
        }
        return Err(format!(
            "{s:?} has no unit: write {t}s for seconds or {t}ms for milliseconds (units: us, ms, s, m, h, d; 0 for none)"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{s:?} is not a duration: {e} (examples: 250ms, 2s, 1h30m; 0 for none)")
    })
}

/// How sizes, durations and endpoints are written, after the flags of the commands that take
/// them.
pub const FORMS_HELP: &str = "\
Sizes: bytes, or a number (decimals allowed) with K, M, G, T: binary units, as qemu-img \
(1.5G = 1610612736 bytes); also KiB, MiB, GiB, TiB. KB, MB, GB are refused as ambiguous.
Durations: a number with a unit, or several: 250ms, 2s, 1.5s, 1h30m (ns, us, ms, s, m, h, d); \
0 for none. A bare number other than 0 is refused.
Endpoints: ADDR:PORT ([::1]:10809 for IPv6), :PORT (every IPv4 address), unix:PATH, \
nbd://ADDR[:PORT] or nbd+unix:///?socket=PATH.";

/// The names `--ack` takes.
pub const ACK_MODES: &[&str] = &["local", "received", "durable", "sync"];
/// The names `failover --to` takes.
pub const FAILOVER_TARGETS: &[&str] = &["checkpoint", "latest"];
/// The names `--on-peer-loss` takes.
pub const PEER_LOSS_POLICIES: &[&str] = &["failover", "wait"];

/// The parser of a flag whose values are a library type's names: clap lists them (`[possible
/// values: …]` in `--help`, shell completion) and refuses others; the type parses the rest.
pub fn choice<T>(names: &'static [&'static str]) -> impl clap::builder::TypedValueParser<Value = T>
where
    T: FromStr<Err = String> + Clone + Send + Sync + 'static,
{
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<T>())
}

/// A flag value type around `$inner`: parsed by `$parse`, shown by `$show`, so that a default
/// taken from a library constant (`default_value_t`) reads well in `--help` and parses back.
macro_rules! flag_value {
    ($(#[$doc:meta])* $name:ident($inner:ty), $parse:path, $show:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name(pub $inner);

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                $parse(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&$show(self.0))
            }
        }
    };
}

flag_value!(
    /// A duration flag's value: [`parse_duration`], shown as humantime writes it (`200ms`).
    DurationArg(Duration),
    parse_duration,
    show_duration
);

flag_value!(
    /// A size flag's value: [`parse_size`], shown with the largest suffix that divides it
    /// (`64M`).
    SizeArg(u64),
    parse_size,
    show_size
);

fn show_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn show_size(n: u64) -> String {
    match SIZE_UNITS
        .iter()
        .find(|(_, shift)| n != 0 && n.trailing_zeros() >= *shift)
    {
        Some((unit, shift)) => format!("{}{unit}", n >> shift),
        None => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkrep::replica::secondary::PeerLossPolicy;
    use blkrep::replica::wire::AckMode;
    use blkrep::replica::FailoverTarget;

    /// Every listed name is one the library parses, and back.
    #[test]
    fn choices_are_the_library_s() {
        for n in ACK_MODES {
            assert_eq!(n.parse::<AckMode>().unwrap().name(), *n);
        }
        for n in FAILOVER_TARGETS {
            assert_eq!(n.parse::<FailoverTarget>().unwrap().name(), *n);
        }
        for n in PEER_LOSS_POLICIES {
            n.parse::<PeerLossPolicy>().unwrap();
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("0.5K").unwrap(), 512);
        assert_eq!(parse_size(".5M").unwrap(), 1 << 19);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1E").unwrap(), 1 << 60);
        assert!(parse_size("0.1K").unwrap_err().contains("whole number"));
        assert!(parse_size("10GB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("1kb").unwrap_err().contains("1K or 1KiB"));
        assert!(parse_size("1.2.3M").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("16E").is_err());
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size(" 8M ").unwrap(), 8 << 20);
        assert!(parse_size("10X").is_err());
        assert!(parse_size("10iB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn sizes_print_as_they_parse() {
        for (n, s) in [
            (0, "0"),
            (4097, "4097"),
            (4096, "4K"),
            (64 << 20, "64M"),
            (3 << 30, "3G"),
            (1 << 40, "1T"),
        ] {
            assert_eq!(SizeArg(n).to_string(), s);
            assert_eq!(s.parse::<SizeArg>(), Ok(SizeArg(n)));
        }
    }

    fn accepted(cases: &[(&str, Duration)]) {
        for (s, d) in cases {
            assert_eq!(parse_duration(s).as_ref(), Ok(d), "{s:?}");
        }
    }

    #[test]
    fn durations() {
        let (ms, secs) = (Duration::from_millis, Duration::from_secs);
        accepted(&[
            // Accepted before humantime.
            ("100ms", ms(100)),
            ("2s", secs(2)),
            ("3m", secs(180)),
            ("30s", secs(30)),
            ("0", Duration::ZERO),
            ("0.0", Duration::ZERO),
            (" 1s ", secs(1)),
            // Hours, compounds, fractions, smaller units.
            ("2h", secs(7200)),
            ("1h30m", secs(5400)),
            ("1m 30s", secs(90)),
            ("250ms", ms(250)),
            ("1s500ms", ms(1500)),
            ("1.5s", ms(1500)),
            ("500us", Duration::from_micros(500)),
        ]);
    }

    #[test]
    fn bad_durations_say_why() {
        for s in [
            "",
            "2x",
            "ms",
            "-1s",
            "1h30",
            "99999999999999999999999",
            "250",
            "1.5",
        ] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains(&format!("{s:?}")), "{s:?}: {e}");
        }
        assert!(parse_duration("2x")
            .unwrap_err()
            .contains("unknown time unit"));
        let e = parse_duration("250").unwrap_err();
        assert!(e.contains("250s") && e.contains("250ms"), "{e}");
    }

    #[test]
    fn durations_print_as_they_parse() {
        for (d, s) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(200), "200ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(5400), "1h 30m"),
        ] {
            assert_eq!(DurationArg(d).to_string(), s);
            assert_eq!(s.parse::<DurationArg>(), Ok(DurationArg(d)));
        }
    }
}
