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

/// A duration flag's value: parsed by [`parse_duration`] and shown the way humantime writes
/// it, so that a default taken from a library constant reads `200ms` in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationArg(pub Duration);

impl FromStr for DurationArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Self)
    }
}

impl fmt::Display for DurationArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

/// A size flag's value: parsed by [`parse_size`], shown with the largest suffix that divides
/// it (`64M`), so that a default taken from a library constant reads well in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeArg(pub u64);

impl FromStr for SizeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_size(s).map(Self)
    }
}

impl fmt::Display for SizeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        match SIZE_UNITS
            .iter()
            .find(|(_, shift)| n != 0 && n.trailing_zeros() >= *shift)
        {
            Some((unit, shift)) => write!(f, "{}{unit}", n >> shift),
            None => write!(f, "{n}"),
        }
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

    #[test]
    fn durations_accepted_before_still_are() {
        assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration(" 1s ").unwrap(), Duration::from_secs(1));
    }

    #[test]
    fn durations_take_hours_and_compounds() {
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1m 30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("1s500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
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
