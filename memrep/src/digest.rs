//! Per-page digests and the digest table of a region.
//!
//! [`page_hash`] is a fast non-cryptographic 64-bit hash of one page; it finds changed pages
//! (the scan tracker) and lets primary and secondary compare regions. It is not a defence
//! against an adversary who chooses page contents.
//!
//! Measured on this project's build host (AMD EPYC, x86_64, 2 cores shared with other work,
//! default target features; `cargo test --release -p memrep --lib hash_speed -- --ignored
//! --nocapture`; 4 KiB pages of a 64 MiB buffer, best of 5 passes; three runs):
//!
//! | function                      | GB/s             |
//! |-------------------------------|------------------|
//! | `xxh3_64` (xxhash-rust 0.8)   | 15.5, 20.2, 21.2 |
//! | `crc64fast` 1.1 (CRC-64)      | 11.0, 13.3, 13.8 |
//! | [`is_zero`] (all-zero pages)  | 35.1, 63.5, 73.4 |
//!
//! `xxh3_64` is about 1.5x faster than crc64fast, so [`page_hash`] uses it.
//!
//! [`PageTable`] holds one digest per page plus a *fold*: the wrapping sum over all pages of
//! [`mix`]`(i, d_i)`. The fold is kept up to date in O(1) per [`PageTable::set`], so two sides
//! can compare whole regions by exchanging 8 bytes; [`mix`] makes it depend on page positions
//! (swapping two pages changes it).

use std::ops::Range;
use std::sync::OnceLock;

use crate::region::Region;
use crate::PAGE_SIZE;

/// 64-bit hash of a page (xxh3_64, seed 0).
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

pub use blkrep::digest::is_zero;

/// `page_hash` of a page of zeros, computed once.
pub fn zero_hash() -> u64 {
    static Z: OnceLock<u64> = OnceLock::new();
    *Z.get_or_init(|| page_hash(&[0u8; PAGE_SIZE]))
}

/// Position-dependent mixing of page index `i` and digest `d` for the fold (a splitmix64
/// finaliser over `d` combined with an odd multiple of `i`).
pub fn mix(i: u64, d: u64) -> u64 {
    let mut z = d ^ i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Split `0..n` into at most `parts` contiguous ranges of nearly equal length.
pub fn split(n: u64, parts: usize) -> Vec<Range<u64>> {
    let parts = (parts.max(1) as u64).min(n.max(1));
    let base = n / parts;
    let extra = n % parts;
    let mut out = Vec::with_capacity(parts as usize);
    let mut start = 0;
    for k in 0..parts {
        let len = base + u64::from(k < extra);
        out.push(start..start + len);
        start += len;
    }
    out
}

/// Default worker count: the machine's available parallelism.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// One digest per page of a region, and their position-mixed fold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    digests: Vec<u64>,
    fold: u64,
}

impl PageTable {
    /// Hash every page of `region` with `threads` workers (at least one).
    pub fn hash_region(region: &Region, threads: usize) -> PageTable {
        let pages = region.pages();
        let mut digests = vec![0u64; pages as usize];
        let ranges = split(pages, threads);
        std::thread::scope(|s| {
            let mut rest: &mut [u64] = &mut digests;
            for r in ranges {
                let (mine, tail) = rest.split_at_mut((r.end - r.start) as usize);
                rest = tail;
                s.spawn(move || {
                    let mut buf = Box::new([0u8; PAGE_SIZE]);
                    for (slot, i) in mine.iter_mut().zip(r) {
                        region.load_page(i, &mut buf);
                        *slot = page_hash(&buf[..]);
                    }
                });
            }
        });
        PageTable::from_digests(digests)
    }

    /// A table from known digests (e.g. received from the other side).
    pub fn from_digests(digests: Vec<u64>) -> PageTable {
        let fold = digests
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &d)| acc.wrapping_add(mix(i as u64, d)));
        PageTable { digests, fold }
    }

    /// Number of pages.
    pub fn len(&self) -> u64 {
        self.digests.len() as u64
    }

    /// True for a table of no pages.
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Digest of page `i`. Panics if out of range.
    pub fn get(&self, i: u64) -> u64 {
        self.digests[i as usize]
    }

    /// Store digest `d` for page `i`, updating the fold. Panics if out of range.
    pub fn set(&mut self, i: u64, d: u64) {
        let slot = &mut self.digests[i as usize];
        self.fold = self
            .fold
            .wrapping_sub(mix(i, *slot))
            .wrapping_add(mix(i, d));
        *slot = d;
    }

    /// Wrapping sum of `mix(i, d_i)` over all pages.
    pub fn fold(&self) -> u64 {
        self.fold
    }

    /// All digests, indexed by page.
    pub fn digests(&self) -> &[u64] {
        &self.digests
    }

    /// The digests split into at most `parts` contiguous chunks, each with its first page index
    /// (for parallel comparison by the scan tracker).
    pub fn chunks(&self, parts: usize) -> Vec<(u64, &[u64])> {
        split(self.len(), parts)
            .into_iter()
            .map(|r| (r.start, &self.digests[r.start as usize..r.end as usize]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::ShmFile;
    use std::time::Instant;

    #[test]
    fn zero_detection() {
        let mut p = [0u8; PAGE_SIZE];
        assert!(is_zero(&p));
        assert_eq!(page_hash(&p), zero_hash());
        for at in [0, 7, 63, 64, 2048, PAGE_SIZE - 1] {
            p[at] = 1;
            assert!(!is_zero(&p), "byte {at}");
            p[at] = 0;
        }
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]));
        assert!(is_zero(&[]));
    }

    #[test]
    fn fold_is_incremental_and_positional() {
        let mut t = PageTable::from_digests(vec![1, 2, 3, 4]);
        t.set(2, 99);
        assert_eq!(t.fold(), PageTable::from_digests(vec![1, 2, 99, 4]).fold());
        t.set(2, 3);
        assert_eq!(t.fold(), PageTable::from_digests(vec![1, 2, 3, 4]).fold());
        assert_ne!(t.fold(), PageTable::from_digests(vec![2, 1, 3, 4]).fold());
        assert_eq!(t.get(3), 4);
        assert_eq!(t.len(), 4);
    }

    #[test]
    fn split_covers_everything() {
        for n in [0u64, 1, 5, 1000] {
            for parts in [0usize, 1, 3, 8] {
                let r = split(n, parts);
                assert_eq!(r.first().map(|r| r.start), Some(0));
                assert_eq!(r.last().map(|r| r.end), Some(n));
                assert!(r.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }

    #[test]
    fn hash_region_matches_serial() {
        let f = ShmFile::new("digest");
        let r = Region::create(f.path(), 37 * PAGE_SIZE as u64).unwrap();
        for i in (0..37).step_by(3) {
            r.write_page(i, &[i as u8 + 1; PAGE_SIZE]);
        }
        let serial = PageTable::hash_region(&r, 1);
        for threads in [2, 5, 64] {
            assert_eq!(PageTable::hash_region(&r, threads), serial);
        }
        assert_eq!(serial.get(1), zero_hash());
        assert_eq!(serial.get(3), page_hash(&[4u8; PAGE_SIZE]));
        let chunks = serial.chunks(4);
        assert_eq!(chunks.iter().map(|c| c.1.len()).sum::<usize>(), 37);
    }

    /// Throughput of the candidate page hashes and of `is_zero`. Run in release:
    /// `cargo test --release -p memrep hash_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn hash_speed() {
        let n = 16 * 1024;
        let mut buf = vec![0u8; n * PAGE_SIZE];
        let mut x = 0x1234_5678_9abc_def0u64;
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_ne_bytes());
        }
        let gbs = |name: &str, f: &dyn Fn(&[u8]) -> u64, data: &[u8]| {
            let mut best = f64::MAX;
            let mut acc = 0u64;
            for _ in 0..5 {
                let t = Instant::now();
                for p in data.chunks_exact(PAGE_SIZE) {
                    acc = acc.wrapping_add(f(p));
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{name}: {:.1} GB/s (acc {acc:x})",
                data.len() as f64 / best / 1e9
            );
        };
        gbs("xxh3_64", &|p| xxhash_rust::xxh3::xxh3_64(p), &buf);
        gbs(
            "crc64fast",
            &|p| {
                let mut d = crc64fast::Digest::new();
                d.write(p);
                d.sum64()
            },
            &buf,
        );
        let zeros = vec![0u8; n * PAGE_SIZE];
        gbs("is_zero", &|p| u64::from(is_zero(p)), &zeros);
    }
}
