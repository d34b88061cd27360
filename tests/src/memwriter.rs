//! The memory writer's pattern, shared by the writer process (`lockstep-memwriter`) and the
//! tests that check its region after a failover.
//!
//! Step `c` (from 1) writes [`PAGES_PER_STEP`] pages chosen from `c`, each filled from
//! `(c, page)`, then the header page 0 with `c`, then (with a disk) the disk's block 0 with
//! `c`, and only then reaches a pause point. So at every pause the region is exactly
//! [`expected_region`]`(pages, c)` and the disk's block 0 holds `c`: a checkpoint taken at a
//! pause has the same counter in memory and on disk.

/// Pages written per step besides the header.
pub const PAGES_PER_STEP: u64 = 8;
/// The header page's and the disk block's marker.
pub const MAGIC: &[u8; 8] = b"LSMEMCTR";
/// Page size.
pub const PAGE: usize = 4096;

/// The pages step `c` writes, in a region of `pages` pages (page 0 is the header).
pub fn step_pages(c: u64, pages: u64) -> impl Iterator<Item = u64> {
    (0..PAGES_PER_STEP).map(move |j| {
        1 + (c
            .wrapping_mul(2_654_435_761)
            .wrapping_add(j.wrapping_mul(40_503)))
            % (pages - 1)
    })
}

/// What step `c` writes to `page`. Every tenth step writes zeros to its first page (zero
/// pages cross as a flag).
pub fn fill_page(c: u64, page: u64, j: u64, out: &mut [u8]) {
    if c % 10 == 0 && j == 0 {
        out.fill(0);
        return;
    }
    out[..8].copy_from_slice(&c.to_le_bytes());
    out[8..16].copy_from_slice(&page.to_le_bytes());
    let b = (c as u8) ^ (page as u8) ^ 0x5a;
    out[16..].fill(b);
}

/// The header page / disk block of counter `c`.
pub fn header(c: u64, out: &mut [u8]) {
    out.fill(0);
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&c.to_le_bytes());
}

/// The counter in a header page or disk block (None: no header there).
pub fn read_header(b: &[u8]) -> Option<u64> {
    (b.len() >= 16 && &b[..8] == MAGIC).then(|| u64::from_le_bytes(b[8..16].try_into().unwrap()))
}

/// The whole region after steps 1..=c, from a region of zeros.
pub fn expected_region(pages: u64, c: u64) -> Vec<u8> {
    let mut last = vec![None; pages as usize];
    for s in 1..=c {
        for (j, p) in step_pages(s, pages).enumerate() {
            last[p as usize] = Some((s, j as u64));
        }
    }
    let mut r = vec![0u8; pages as usize * PAGE];
    for (p, l) in last.iter().enumerate() {
        if let Some((s, j)) = l {
            fill_page(*s, p as u64, *j, &mut r[p * PAGE..(p + 1) * PAGE]);
        }
    }
    if c > 0 {
        header(c, &mut r[..PAGE]);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_replays() {
        let pages = 64;
        let mut r = vec![0u8; pages as usize * PAGE];
        for c in 1..=50 {
            for (j, p) in step_pages(c, pages).enumerate() {
                let p = p as usize;
                fill_page(c, p as u64, j as u64, &mut r[p * PAGE..(p + 1) * PAGE]);
            }
            header(c, &mut r[..PAGE]);
            assert_eq!(r, expected_region(pages, c));
        }
        assert_eq!(read_header(&r), Some(50));
    }
}
