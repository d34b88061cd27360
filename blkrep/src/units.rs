//! Sizes and durations as people read them in messages: `1 GiB (1073741824 bytes)`,
//! `1.03s`, `250ms`.

use std::borrow::Borrow;
use std::time::Duration;

/// A duration to the millisecond (microseconds below one): `250ms`, `2s`, `1.03s`, `40µs`.
pub fn duration(d: impl Borrow<Duration>) -> String {
    let d = *d.borrow();
    let ms = d.as_millis();
    if ms == 0 && !d.is_zero() {
        format!("{}µs", d.as_micros())
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        let s = format!("{}.{:03}", ms / 1000, ms % 1000);
        format!("{}s", s.trim_end_matches('0'))
    }
}

/// Binary units, smallest first.
const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// `n` bytes in the largest binary unit it reaches (one decimal unless exact), with the
/// exact count in parentheses: `1 GiB (1073741824 bytes)`, `1.5 MiB (1572864 bytes)`,
/// `512 bytes`.
pub fn size(n: u64) -> String {
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut unit = 0;
    while unit + 1 < UNITS.len() && n >> (10 * (unit + 2)) > 0 {
        unit += 1;
    }
    let shift = 10 * (unit + 1);
    let whole = n >> shift;
    let human = if n & ((1u64 << shift) - 1) == 0 {
        format!("{whole} {}", UNITS[unit])
    } else {
        format!("{:.1} {}", n as f64 / (1u64 << shift) as f64, UNITS[unit])
    };
    format!("{human} ({n} bytes)")
}

#[cfg(test)]
mod tests {
    use super::{duration, size};
    use std::time::Duration;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(Duration::from_nanos(1_030_545_033)), "1.03s");
        assert_eq!(duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(duration(Duration::from_millis(250)), "250ms");
        assert_eq!(duration(Duration::from_secs(5)), "5s");
        assert_eq!(duration(Duration::from_micros(40)), "40µs");
        assert_eq!(duration(Duration::ZERO), "0ms");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(size(0), "0 bytes");
        assert_eq!(size(1023), "1023 bytes");
        assert_eq!(size(1024), "1 KiB (1024 bytes)");
        assert_eq!(size(1 << 30), "1 GiB (1073741824 bytes)");
        assert_eq!(size(3 << 19), "1.5 MiB (1572864 bytes)");
        assert_eq!(size(u64::MAX), "16.0 EiB (18446744073709551615 bytes)");
    }
}
