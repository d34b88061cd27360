//! Whole-disk digests that can be kept up to date write by write.
//!
//! The digest of a disk is the wrapping sum, over its 4 KiB blocks, of a per-block hash: the
//! block's crc64 mixed with its index through a non-linear finaliser (so that swapping two
//! blocks, or the linearity of CRCs, cannot cancel out). A sum can be updated in O(1) when one
//! block changes (subtract the old hash, add the new one), so the primary knows the digest of
//! its disk at every checkpoint without reading the disk; the secondary recomputes it from
//! its image to prove, after a failover, that it holds exactly the checkpointed state.
//!
//! It detects accidents (lost, torn, misplaced or stale blocks), not adversaries. A last
//! partial block is hashed as if padded with zeroes.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::{Backend, Result, StorageError};

/// Block size of the digest, in bytes.
pub const DIGEST_BLOCK: u64 = 4096;

fn crc64(data: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(data);
    d.sum64()
}

/// The splitmix64 finaliser: a bijective, thoroughly non-linear mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash of one block from its crc64.
fn block_hash_from_crc(index: u64, crc: u64) -> u64 {
    mix(crc ^ mix(index.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Hash of block `index` holding `data` (at most one block; shorter data is zero-padded).
pub fn block_hash(index: u64, data: &[u8]) -> u64 {
    debug_assert!(data.len() as u64 <= DIGEST_BLOCK);
    if data.len() as u64 == DIGEST_BLOCK {
        block_hash_from_crc(index, crc64(data))
    } else {
        let mut b = vec![0u8; DIGEST_BLOCK as usize];
        b[..data.len()].copy_from_slice(data);
        block_hash_from_crc(index, crc64(&b))
    }
}

fn zero_crc() -> u64 {
    static ZERO: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| crc64(&[0u8; DIGEST_BLOCK as usize]))
}

/// Hash of block `index` when it holds zeroes.
pub fn zero_block_hash(index: u64) -> u64 {
    block_hash_from_crc(index, zero_crc())
}

/// Number of digest blocks in a disk of `size` bytes.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(DIGEST_BLOCK)
}

/// Per-block hashes of a disk and their running sum.
#[derive(Debug)]
pub struct DigestTable {
    hashes: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl DigestTable {
    /// The table of a disk whose blocks are all zero.
    pub fn zeroed(size: u64) -> Self {
        let n = blocks(size);
        let mut sum = 0u64;
        let hashes = (0..n)
            .map(|i| {
                let h = zero_block_hash(i);
                sum = sum.wrapping_add(h);
                AtomicU64::new(h)
            })
            .collect();
        Self {
            hashes,
            sum: AtomicU64::new(sum),
        }
    }

    /// Read the whole disk and build its table (holes are not read).
    pub async fn scan(disk: &dyn Backend) -> Result<Self> {
        let t = Self::zeroed(disk.size());
        for_each_block(disk, |i, h| t.set(i, h)).await?;
        Ok(t)
    }

    /// Set block `index`'s hash.
    pub fn set(&self, index: u64, hash: u64) {
        if let Some(slot) = self.hashes.get(index as usize) {
            let old = slot.swap(hash, Ordering::AcqRel);
            self.sum.fetch_add(hash.wrapping_sub(old), Ordering::AcqRel);
        }
    }

    /// Block `index`'s hash (the zero hash past the end).
    pub fn get(&self, index: u64) -> u64 {
        self.hashes
            .get(index as usize)
            .map(|h| h.load(Ordering::Acquire))
            .unwrap_or_else(|| zero_block_hash(index))
    }

    /// The digest of unit `unit` (blocks `unit * unit_blocks ..`, clipped to the disk): the
    /// wrapping sum of its blocks' hashes, as [`unit_sums`] computes it from a disk. A unit
    /// wholly past the end (even one whose first block does not fit in a u64) sums to 0.
    pub fn unit_sum(&self, unit: u64, unit_blocks: u64) -> u64 {
        let Some((first, end)) = unit_span(unit, unit_blocks, self.len()) else {
            return 0;
        };
        (first..end).fold(0u64, |s, b| s.wrapping_add(self.get(b)))
    }

    /// The digest of the whole disk.
    pub fn sum(&self) -> u64 {
        self.sum.load(Ordering::Acquire)
    }

    /// Number of blocks.
    pub fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Whether the disk has no blocks.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// Blocks `first..end` of unit `unit`, clipped to a disk of `nblocks` blocks; None when the
/// unit lies wholly past the end. Units come from the peer, so nothing here may overflow.
fn unit_span(unit: u64, unit_blocks: u64, nblocks: u64) -> Option<(u64, u64)> {
    let first = unit.checked_mul(unit_blocks)?;
    if first >= nblocks {
        return None;
    }
    Some((first, first.saturating_add(unit_blocks).min(nblocks)))
}

/// Why a SUMS request cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum SumsError {
    /// A unit of zero blocks.
    #[error("units of 0 blocks")]
    EmptyUnit,
    /// A unit that starts at or past the end of the disk.
    #[error("unit {unit} of {unit_blocks} blocks lies wholly past the end of the disk ({blocks} blocks)")]
    PastEnd {
        /// The unit.
        unit: u64,
        /// Blocks per unit.
        unit_blocks: u64,
        /// Blocks in the disk.
        blocks: u64,
    },
    /// Reading the disk failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Check that every unit in `units` starts inside a disk of `nblocks` blocks: cheap (only the
/// largest unit is looked at), so the secondary can refuse a request before doing any work.
pub fn check_units(
    units: &roaring::RoaringTreemap,
    unit_blocks: u64,
    nblocks: u64,
) -> std::result::Result<(), SumsError> {
    if unit_blocks == 0 {
        return Err(SumsError::EmptyUnit);
    }
    match units.max() {
        Some(unit) if unit_span(unit, unit_blocks, nblocks).is_none() => Err(SumsError::PastEnd {
            unit,
            unit_blocks,
            blocks: nblocks,
        }),
        _ => Ok(()),
    }
}

/// Call `f(index, hash)` for every block of `disk` that is not a known hole, reading in large
/// chunks. Blocks in holes keep their zero hash and are skipped.
async fn for_each_block(disk: &dyn Backend, f: impl FnMut(u64, u64)) -> Result<()> {
    hash_blocks(disk, 0, blocks(disk.size()), f).await
}

/// Call `f(index, hash)` once for every block in `first..end` that may hold data (holes are
/// neither read nor reported), reading at most 4 MiB at a time.
async fn hash_blocks(
    disk: &dyn Backend,
    first: u64,
    end: u64,
    mut f: impl FnMut(u64, u64),
) -> Result<()> {
    const CHUNK: u64 = 4 << 20;
    let size = disk.size();
    let off = first * DIGEST_BLOCK;
    let len = (end * DIGEST_BLOCK).min(size).saturating_sub(off);
    // A block shared by two data ranges is hashed once.
    let mut next = first;
    for (o, l) in crate::storage::data_ranges(disk, off, len).await? {
        let mut b = (o / DIGEST_BLOCK).max(next);
        let stop = (o + l).div_ceil(DIGEST_BLOCK);
        while b < stop {
            let start = b * DIGEST_BLOCK;
            let piece_end = (start + CHUNK).min(stop * DIGEST_BLOCK).min(size);
            let buf = disk.read_at(start, (piece_end - start) as usize).await?;
            for (k, chunk) in buf.chunks(DIGEST_BLOCK as usize).enumerate() {
                f(b + k as u64, block_hash(b + k as u64, chunk));
            }
            b += (piece_end - start).div_ceil(DIGEST_BLOCK);
        }
        next = stop;
    }
    Ok(())
}

/// Does `data` hold only zero bytes? Compares eight bytes at a time, 64 bytes per step
/// (a byte-by-byte scan showed in profiles: every original of a sparse disk is zeroes).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// The digest of each unit in `units` (unit `u` = blocks `u * unit_blocks ..`, clipped to the
/// disk), in the bitmap's order, read from `disk`; holes are not read. What the secondary
/// answers to a SUMS request, and what [`DigestTable::unit_sum`] computes from memory. A unit
/// wholly past the end of the disk is an error (checked before anything is read).
pub async fn unit_sums(
    disk: &dyn Backend,
    units: &roaring::RoaringTreemap,
    unit_blocks: u64,
) -> std::result::Result<Vec<u64>, SumsError> {
    const RUN: u64 = 4 << 20;
    let nblocks = blocks(disk.size());
    check_units(units, unit_blocks, nblocks)?;
    // Every unit starts inside the disk from here on, so `unit * unit_blocks < nblocks` and
    // the products below cannot overflow; they are checked anyway.
    let span = |u: u64| unit_span(u, unit_blocks, nblocks).unwrap_or((nblocks, nblocks));
    let mut out = Vec::with_capacity(units.len() as usize);
    let mut it = units.iter().peekable();
    while let Some(u) = it.next() {
        // A run of consecutive units, at most RUN bytes.
        let mut last = u;
        while let Some(&n) = it.peek() {
            let run_bytes = (n - u + 1)
                .saturating_mul(unit_blocks)
                .saturating_mul(DIGEST_BLOCK);
            if n != last + 1 || run_bytes > RUN {
                break;
            }
            last = n;
            it.next();
        }
        let first_block = span(u).0;
        let end_block = span(last).1;
        let mut hashes: Vec<u64> = (first_block..end_block).map(zero_block_hash).collect();
        hash_blocks(disk, first_block, end_block, |b, h| {
            hashes[(b - first_block) as usize] = h
        })
        .await?;
        for unit in u..=last {
            let (a, b) = span(unit);
            let sum = hashes[(a - first_block) as usize..(b - first_block) as usize]
                .iter()
                .fold(0u64, |s, h| s.wrapping_add(*h));
            out.push(sum);
        }
    }
    Ok(out)
}

/// The digest of a whole disk.
pub async fn disk_digest(disk: &dyn Backend) -> Result<u64> {
    let mut sum = (0..blocks(disk.size())).fold(0u64, |s, i| s.wrapping_add(zero_block_hash(i)));
    let zero = |i| zero_block_hash(i);
    for_each_block(disk, |i, h| {
        sum = sum.wrapping_sub(zero(i)).wrapping_add(h);
    })
    .await?;
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{IoBuf, MemoryBackend};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn table_follows_writes_and_matches_a_scan() {
        rt().block_on(async {
            let size = 64 * 4096 + 100;
            let disk = MemoryBackend::new(size);
            let t = DigestTable::zeroed(size);
            assert_eq!(t.sum(), disk_digest(&disk).await.unwrap());
            for (i, off) in [0u64, 4096 * 7, 4096 * 64].into_iter().enumerate() {
                let len = (4096u64).min(size - off) as usize;
                let data = vec![i as u8 + 1; len];
                disk.write_at(off, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                t.set(off / 4096, block_hash(off / 4096, &data));
            }
            assert_eq!(t.sum(), disk_digest(&disk).await.unwrap());
            assert_eq!(t.sum(), DigestTable::scan(&disk).await.unwrap().sum());
        });
    }

    #[test]
    fn unit_sums_match_the_table() {
        rt().block_on(async {
            let size = 100 * 4096 + 512;
            let disk = MemoryBackend::new(size);
            let t = DigestTable::zeroed(size);
            for b in [0u64, 3, 17, 18, 64, 100] {
                let off = b * 4096;
                let len = 4096u64.min(size - off) as usize;
                let data = vec![b as u8 + 1; len];
                disk.write_at(off, IoBuf::from_slice(&data), false)
                    .await
                    .unwrap();
                t.set(b, block_hash(b, &data));
            }
            for unit_blocks in [1u64, 3, 16] {
                let units: roaring::RoaringTreemap = (0..blocks(size).div_ceil(unit_blocks))
                    .filter(|u| u % 3 != 1)
                    .collect();
                let sums = unit_sums(&disk, &units, unit_blocks).await.unwrap();
                let want: Vec<u64> = units.iter().map(|u| t.unit_sum(u, unit_blocks)).collect();
                assert_eq!(sums, want, "unit of {unit_blocks} blocks");
            }
        });
    }

    #[test]
    fn hostile_units_are_refused_without_panicking() {
        rt().block_on(async {
            let size = 10 * 4096 + 1;
            let disk = MemoryBackend::new(size);
            let t = DigestTable::zeroed(size);
            let n = blocks(size);
            for unit_blocks in [1u64, 3, 1 << 16, u64::from(u32::MAX), u64::MAX] {
                for unit in [u64::MAX, u64::MAX / 2, 1 << 48, n, n.div_ceil(unit_blocks)] {
                    if unit.checked_mul(unit_blocks).is_some_and(|f| f < n) {
                        continue;
                    }
                    assert_eq!(t.unit_sum(unit, unit_blocks), 0);
                    let units: roaring::RoaringTreemap = [0, unit].into_iter().collect();
                    let e = unit_sums(&disk, &units, unit_blocks).await.unwrap_err();
                    assert!(
                        matches!(e, SumsError::PastEnd { unit: u, .. } if u == unit),
                        "{e}"
                    );
                    assert!(check_units(&units, unit_blocks, n).is_err());
                }
            }
            let units: roaring::RoaringTreemap = [0u64].into_iter().collect();
            assert!(matches!(
                unit_sums(&disk, &units, 0).await,
                Err(SumsError::EmptyUnit)
            ));
            // The last unit, partly past the end, is fine; so is a huge unit starting at 0.
            for unit_blocks in [3u64, 1 << 16, u64::MAX] {
                let last = (n - 1) / unit_blocks;
                let units: roaring::RoaringTreemap = [0, last].into_iter().collect();
                let sums = unit_sums(&disk, &units, unit_blocks).await.unwrap();
                let want: Vec<u64> = units.iter().map(|u| t.unit_sum(u, unit_blocks)).collect();
                assert_eq!(sums, want);
            }
            // An empty disk has no units at all.
            let empty = MemoryBackend::new(0);
            let units: roaring::RoaringTreemap = [0u64].into_iter().collect();
            assert!(unit_sums(&empty, &units, 1).await.is_err());
        });
    }

    #[test]
    fn swapped_blocks_change_the_digest() {
        rt().block_on(async {
            let a = MemoryBackend::new(8192);
            let b = MemoryBackend::new(8192);
            a.write_at(0, IoBuf::from_slice(&[1; 4096]), false)
                .await
                .unwrap();
            a.write_at(4096, IoBuf::from_slice(&[2; 4096]), false)
                .await
                .unwrap();
            b.write_at(0, IoBuf::from_slice(&[2; 4096]), false)
                .await
                .unwrap();
            b.write_at(4096, IoBuf::from_slice(&[1; 4096]), false)
                .await
                .unwrap();
            assert_ne!(
                disk_digest(&a).await.unwrap(),
                disk_digest(&b).await.unwrap()
            );
        });
    }
}
