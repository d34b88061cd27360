//! Sizes as people read them in messages: `1 GiB (1073741824 bytes)`.

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
    use super::size;

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
