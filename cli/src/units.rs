//! Parsing of sizes ("10G", "512MiB", "4096"), durations ("250ms", "2s", "1h30m") and the
//! value name of endpoints.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The value name of every endpoint flag: endpoints are parsed by [`blkrep::nbd::Endpoint`]'s
/// `FromStr`, one syntax for all of them.
pub const ENDPOINT: &str = "ADDR:PORT|unix:PATH";

/// Binary size suffixes, largest first, with their shifts.
const SIZE_UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];

/// Parse a byte size with an optional binary suffix: K, M, G, T (with or without "iB"/"B").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 512M, 10G)"))?;
    let suffix = suffix.trim().to_ascii_uppercase();
    let unit = suffix
        .strip_suffix("IB")
        .or_else(|| suffix.strip_suffix('B'))
        .unwrap_or(&suffix);
    let shift = match SIZE_UNITS.iter().find(|(u, _)| *u == unit) {
        Some((_, shift)) => *shift,
        None if unit.is_empty() && !suffix.ends_with("IB") => 0,
        None => {
            return Err(format!(
                "unknown size suffix {suffix:?} in {s:?} (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Parse a duration: a plain number of seconds ("0", "30"), or what humantime accepts: a
/// number with a unit (ns, us, ms, s, m, h, d, ...; "250ms", "2s"), or several ("1h30m",
/// "1m 30s").
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map(Duration::from_secs)
            .map_err(|_| format!("{s:?} is too large"));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("{s:?} is not a duration: {e} (examples: 250ms, 2s, 1h30m; 0 for none)")
    })
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("1kb").unwrap(), 1024);
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
            ("30", secs(30)),
            ("0", Duration::ZERO),
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
        for s in ["", "2x", "ms", "-1s", "1h30", "99999999999999999999999"] {
            let e = parse_duration(s).expect_err(s);
            assert!(e.contains(&format!("{s:?}")), "{s:?}: {e}");
        }
        assert!(parse_duration("2x")
            .unwrap_err()
            .contains("unknown time unit"));
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
