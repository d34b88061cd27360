//! The primary's persistent dirty bitmap: which 4 MiB extents of the disk may differ from the
//! secondary, kept on disk so that a restarted primary resyncs incrementally instead of
//! comparing every chunk (DRBD's activity log and bitmap in one).
//!
//! ```text
//!  DISK.lockstep-bitmap: two slots, written alternately, each one whole state:
//!   0      4     6      8    16        24          32           36         40     48    64
//!   "LSBM" u16=1 (pad)  seq  tracked   disk size   extent bytes bits bytes (pad)  crc64 (pad)
//!   then one bit per extent (LSB first), up to the slot's end (a multiple of 4 KiB)
//! ```
//!
//! The rules, and why they are safe:
//! * **Mark before writing.** A client's modification of an extent not marked on disk waits
//!   until the mark is durable (one `fdatasync` of this small file). The mark says only "may
//!   differ", so making it durable before the data is the conservative order: a crash between
//!   the two leaves a mark over unchanged data, which the resync's comparison forgets.
//! * **Clear after both copies are durable.** An extent is cleared only when none of its
//!   blocks is dirty or written in an epoch the secondary has not committed (the secondary
//!   flushes its disk before it answers COMMITTED), after the local disk was flushed, and
//!   only when nothing wrote it during the last clearing period, so that hot extents are not
//!   marked again and again (DRBD keeps its hot extents in the activity log for the same
//!   reason).
//! * **`tracked`** names the secondary generation the marks are relative to; it is stored
//!   when a sync completes (the secondary then holds our data at that commit, and every later
//!   write is marked). A restarted primary that finds a valid slot announces it in HELLO, and
//!   a secondary still at that generation takes an incremental resync of the marked extents.
//!   No valid slot (a missing, torn or foreign file, another disk size): `tracked` 0, and the
//!   secondary asks for a checksum sync as before.
//!
//! What it cannot know: writes to the disk by something else while lockstep is not running.
//! Disk locking keeps QEMU out while it runs; after writing the disk by other means, delete
//! this file (the next sync is then a checksum comparison).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use roaring::{RoaringBitmap, RoaringTreemap};

use crate::digest::DIGEST_BLOCK;
use crate::sync::Locked;

/// Bytes per extent: one bit of the bitmap.
pub const EXTENT_BYTES: u64 = 4 << 20;
/// 4 KiB blocks per extent.
pub const EXTENT_BLOCKS: u64 = EXTENT_BYTES / DIGEST_BLOCK;
/// How long an extent must go unwritten before it may be cleared.
pub const CLEAR_PERIOD: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 4] = b"LSBM";
const VERSION: u16 = 1;
const HEADER: usize = 64;
const CRC_AT: usize = 40;

/// Where the bitmap of `disk` lives.
pub fn bitmap_path(disk: &Path) -> PathBuf {
    let mut p = disk.as_os_str().to_owned();
    p.push(".lockstep-bitmap");
    p.into()
}

/// What a slot holds.
#[derive(Debug, Clone, PartialEq)]
struct Slot {
    seq: u64,
    tracked: u64,
    extents: RoaringBitmap,
}

#[derive(Debug, Default)]
struct State {
    /// What the next write of the file will hold.
    wanted: RoaringBitmap,
    tracked: u64,
    /// Bumped at every change of `wanted` or `tracked`.
    version: u64,
    /// The version on disk.
    durable: u64,
    seq: u64,
    /// Modifications in progress per extent: never cleared under one.
    inflight: std::collections::HashMap<u32, u32>,
    /// Extents written since the last clearing pass.
    touched: RoaringBitmap,
    last_clear: Option<Instant>,
    writes: u64,
    cleared: u64,
    /// Why the bitmap cannot be trusted any more (a write of it failed).
    broken: Option<String>,
}

impl State {
    /// Take the extents a modification is in flight in out of `c`.
    fn spare_busy(&self, c: &mut RoaringBitmap) {
        for e in self.inflight.keys() {
            c.remove(*e);
        }
    }
}

/// The persistent extent bitmap of one primary disk.
#[derive(Debug)]
pub struct DiskBitmap {
    path: PathBuf,
    file: Arc<File>,
    disk_size: u64,
    slot_bytes: u64,
    st: Mutex<State>,
    /// One write of the file at a time; later marks ride on it.
    writer: tokio::sync::Mutex<()>,
}

/// Extents covering blocks `first..=last`.
fn extents_of(first: u64, last: u64) -> std::ops::RangeInclusive<u32> {
    let f = (first / EXTENT_BLOCKS).min(u64::from(u32::MAX)) as u32;
    let l = (last / EXTENT_BLOCKS).min(u64::from(u32::MAX)) as u32;
    f..=l
}

/// The extents holding any of `blocks`.
pub fn extents_of_blocks(blocks: &RoaringTreemap) -> RoaringBitmap {
    let mut out = RoaringBitmap::new();
    let mut last = u64::MAX;
    for b in blocks.iter() {
        let e = b / EXTENT_BLOCKS;
        if e != last {
            out.insert(e.min(u64::from(u32::MAX)) as u32);
            last = e;
        }
    }
    out
}

impl DiskBitmap {
    /// Open (or create) the bitmap of a disk of `disk_size` bytes at `path`, and read the
    /// newest valid slot: the extents it marks and the generation they are relative to
    /// (`tracked` 0 when there is no valid slot).
    pub fn open(path: &Path, disk_size: u64) -> std::io::Result<(Arc<Self>, u64, RoaringBitmap)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let extents = disk_size.div_ceil(EXTENT_BYTES);
        let bits = extents.div_ceil(8);
        let slot_bytes = (HEADER as u64 + bits).div_ceil(4096) * 4096;
        let found = [0, 1]
            .into_iter()
            .filter_map(|i| read_slot(&file, i * slot_bytes, slot_bytes, disk_size))
            .max_by_key(|s| s.seq);
        let (seq, tracked, marked) = match found {
            Some(s) => (s.seq, s.tracked, s.extents),
            None => (0, 0, RoaringBitmap::new()),
        };
        let me = Arc::new(Self {
            path: path.into(),
            file: Arc::new(file),
            disk_size,
            slot_bytes,
            st: Mutex::new(State {
                wanted: marked.clone(),
                tracked,
                seq,
                ..Default::default()
            }),
            writer: tokio::sync::Mutex::new(()),
        });
        Ok((me, tracked, marked))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks of `extents`, clipped to the disk.
    pub fn blocks_of(&self, extents: &RoaringBitmap) -> RoaringTreemap {
        let n = self.disk_size.div_ceil(DIGEST_BLOCK);
        let mut out = RoaringTreemap::new();
        for e in extents.iter() {
            let a = u64::from(e) * EXTENT_BLOCKS;
            let b = (a + EXTENT_BLOCKS).min(n);
            if a < b {
                out.insert_range(a..b);
            }
        }
        out
    }

    /// Before modifying blocks `first..=last`: mark their extents durably. Returns the guard
    /// that keeps them from being cleared until the modification is accounted for.
    pub async fn mark(self: &Arc<Self>, first: u64, last: u64) -> std::io::Result<MarkGuard> {
        let range = extents_of(first, last);
        let need = {
            let mut st = self.st.locked();
            if let Some(why) = &st.broken {
                return Err(std::io::Error::other(why.clone()));
            }
            let mut changed = false;
            for e in range.clone() {
                *st.inflight.entry(e).or_default() += 1;
                st.touched.insert(e);
                changed |= st.wanted.insert(e);
            }
            if changed {
                st.version += 1;
            }
            st.version
        };
        let guard = MarkGuard {
            bitmap: self.clone(),
            range,
        };
        self.persist(need).await?;
        Ok(guard)
    }

    /// Make at least version `need` of the state durable.
    async fn persist(&self, need: u64) -> std::io::Result<()> {
        if self.st.locked().durable >= need {
            return Ok(());
        }
        let _w = self.writer.lock().await;
        let (slot, version) = {
            let mut st = self.st.locked();
            if st.durable >= need {
                return Ok(());
            }
            st.seq += 1;
            (
                Slot {
                    seq: st.seq,
                    tracked: st.tracked,
                    extents: st.wanted.clone(),
                },
                st.version,
            )
        };
        let bytes = encode_slot(&slot, self.disk_size, self.slot_bytes);
        let at = (slot.seq % 2) * self.slot_bytes;
        let file = self.file.clone();
        let r = tokio::task::spawn_blocking(move || {
            file.write_all_at(&bytes, at)?;
            file.sync_data()
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        let mut st = self.st.locked();
        match r {
            Ok(()) => {
                st.durable = st.durable.max(version);
                st.writes += 1;
                Ok(())
            }
            Err(e) => {
                let why = format!("writing the dirty bitmap {}: {e}", self.path.display());
                tracing::error!("{why}");
                st.broken = Some(why.clone());
                Err(std::io::Error::other(why))
            }
        }
    }

    /// A sync completed: the secondary now holds generation `tracked`, and the marks are
    /// relative to it.
    pub async fn set_tracked(&self, tracked: u64) -> std::io::Result<()> {
        let need = {
            let mut st = self.st.locked();
            if st.tracked == tracked {
                return Ok(());
            }
            st.tracked = tracked;
            st.version += 1;
            st.version
        };
        self.persist(need).await
    }

    /// Whether a clearing pass is due.
    pub fn clear_due(&self) -> bool {
        let st = self.st.locked();
        st.broken.is_none() && st.last_clear.is_none_or(|t| t.elapsed() >= CLEAR_PERIOD)
    }

    /// Clear the extents outside `needed` (those holding dirty blocks or blocks of
    /// uncommitted epochs) that nothing wrote during the last [`CLEAR_PERIOD`], after
    /// `flush` made the local disk durable. At most once per period; returns the number of
    /// extents cleared.
    pub async fn clear_unneeded<F>(&self, needed: RoaringBitmap, flush: F) -> std::io::Result<u64>
    where
        F: std::future::Future<Output = crate::storage::Result<()>>,
    {
        let candidates = {
            let mut st = self.st.locked();
            if st.last_clear.is_some_and(|t| t.elapsed() < CLEAR_PERIOD) {
                return Ok(0);
            }
            st.last_clear = Some(Instant::now());
            let touched = std::mem::take(&mut st.touched);
            let mut c = &st.wanted - &needed;
            c -= touched;
            st.spare_busy(&mut c);
            c
        };
        if candidates.is_empty() {
            return Ok(0);
        }
        flush
            .await
            .map_err(|e| std::io::Error::other(format!("flushing before clearing: {e}")))?;
        let need = {
            let mut st = self.st.locked();
            // Anything marked since the candidates were chosen stays.
            let mut c = candidates;
            c -= &st.touched;
            st.spare_busy(&mut c);
            let n = c.len();
            st.wanted -= c;
            st.version += 1;
            st.cleared += n;
            (st.version, n)
        };
        self.persist(need.0).await?;
        Ok(need.1)
    }

    /// Status: extents marked, file writes, extents cleared.
    pub fn stats(&self) -> BitmapStats {
        let st = self.st.locked();
        BitmapStats {
            path: self.path.display().to_string(),
            marked_extents: st.wanted.len(),
            extent_bytes: EXTENT_BYTES,
            tracked_generation: format!("{:016x}", st.tracked),
            writes: st.writes,
            cleared_extents: st.cleared,
            broken: st.broken.clone(),
        }
    }
}

/// The persistent bitmap in `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BitmapStats {
    /// The file.
    pub path: String,
    /// Extents marked as possibly different from the secondary.
    pub marked_extents: u64,
    /// Bytes per extent.
    pub extent_bytes: u64,
    /// The secondary generation the marks are relative to (0: none; a checksum sync next).
    pub tracked_generation: String,
    /// Writes of the file so far.
    pub writes: u64,
    /// Extents cleared so far.
    pub cleared_extents: u64,
    /// Why the bitmap is no longer written, if a write of it failed.
    pub broken: Option<String>,
}

/// Keeps the extents of one modification from being cleared until it is accounted for in the
/// primary's state (dirty, or an open epoch).
#[derive(Debug)]
pub struct MarkGuard {
    bitmap: Arc<DiskBitmap>,
    range: std::ops::RangeInclusive<u32>,
}

impl Drop for MarkGuard {
    fn drop(&mut self) {
        let mut st = self.bitmap.st.locked();
        for e in self.range.clone() {
            if let Some(n) = st.inflight.get_mut(&e) {
                *n -= 1;
                if *n == 0 {
                    st.inflight.remove(&e);
                }
            }
        }
    }
}

fn encode_slot(s: &Slot, disk_size: u64, slot_bytes: u64) -> Vec<u8> {
    let extents = disk_size.div_ceil(EXTENT_BYTES);
    let bits = extents.div_ceil(8) as usize;
    let mut b = vec![0u8; slot_bytes as usize];
    b[0..4].copy_from_slice(MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_be_bytes());
    b[8..16].copy_from_slice(&s.seq.to_be_bytes());
    b[16..24].copy_from_slice(&s.tracked.to_be_bytes());
    b[24..32].copy_from_slice(&disk_size.to_be_bytes());
    b[32..36].copy_from_slice(&(EXTENT_BYTES as u32).to_be_bytes());
    b[36..40].copy_from_slice(&(bits as u32).to_be_bytes());
    for e in s.extents.iter() {
        if u64::from(e) < extents {
            b[HEADER + (e / 8) as usize] |= 1 << (e % 8);
        }
    }
    let crc = slot_crc(&b[..HEADER + bits]);
    b[CRC_AT..CRC_AT + 8].copy_from_slice(&crc.to_be_bytes());
    b
}

/// crc64 over a slot's header (its crc field as zero) and bits.
fn slot_crc(b: &[u8]) -> u64 {
    let mut d = crc64fast::Digest::new();
    d.write(&b[..CRC_AT]);
    d.write(&[0; 8]);
    d.write(&b[CRC_AT + 8..]);
    d.sum64()
}

/// The slot at `at`, if it is whole and describes a disk of `disk_size` bytes.
fn read_slot(f: &File, at: u64, slot_bytes: u64, disk_size: u64) -> Option<Slot> {
    let mut b = vec![0u8; slot_bytes as usize];
    f.read_exact_at(&mut b, at).ok()?;
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let extents = disk_size.div_ceil(EXTENT_BYTES);
    let bits = extents.div_ceil(8) as usize;
    if &b[0..4] != MAGIC
        || u16::from_be_bytes([b[4], b[5]]) != VERSION
        || u64_at(24) != disk_size
        || u64::from(u32_at(32)) != EXTENT_BYTES
        || u32_at(36) as usize != bits
        || HEADER + bits > b.len()
        || u64_at(CRC_AT) != slot_crc(&b[..HEADER + bits])
    {
        return None;
    }
    let mut set = RoaringBitmap::new();
    for (i, byte) in b[HEADER..HEADER + bits].iter().enumerate() {
        for k in 0..8 {
            let e = (i * 8 + k) as u64;
            if byte & (1 << k) != 0 && e < extents {
                set.insert(e as u32);
            }
        }
    }
    Some(Slot {
        seq: u64_at(8),
        tracked: u64_at(16),
        extents: set,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 100 * EXTENT_BYTES + 12345;

    fn rt() -> tokio::runtime::Runtime {
        crate::test_runtime()
    }

    #[test]
    fn marks_survive_a_reopen_and_a_torn_slot_falls_back_to_the_other() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("d.lockstep-bitmap");
            let (bm, tracked, marked) = DiskBitmap::open(&p, SIZE).unwrap();
            assert_eq!((tracked, marked.len()), (0, 0));
            bm.set_tracked(77).await.unwrap();
            drop(bm.mark(0, 0).await.unwrap());
            // The last extent, clipped to the disk.
            let last_block = SIZE.div_ceil(DIGEST_BLOCK) - 1;
            drop(bm.mark(last_block, last_block).await.unwrap());
            let writes = bm.stats().writes;
            // Marking a marked extent costs no write.
            drop(bm.mark(1, 2).await.unwrap());
            assert_eq!(bm.stats().writes, writes);
            drop(bm);
            let (bm, tracked, marked) = DiskBitmap::open(&p, SIZE).unwrap();
            assert_eq!(tracked, 77);
            assert_eq!(marked.iter().collect::<Vec<_>>(), vec![0, 100]);
            let blocks = bm.blocks_of(&marked);
            assert_eq!(blocks.len(), EXTENT_BLOCKS + 4, "clipped: {blocks:?}");
            // Tear the newest slot: the older one is read.
            let seq = bm.st.locked().seq;
            drop(bm);
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let slot_bytes = (HEADER as u64 + 101u64.div_ceil(8)).div_ceil(4096) * 4096;
            f.write_all_at(b"xx", (seq % 2) * slot_bytes + 70).unwrap();
            let (_, tracked, marked) = DiskBitmap::open(&p, SIZE).unwrap();
            assert_eq!(tracked, 77);
            assert_eq!(marked.iter().collect::<Vec<_>>(), vec![0], "the older slot");
            // Another disk size: nothing is trusted.
            let (_, tracked, marked) = DiskBitmap::open(&p, SIZE * 2).unwrap();
            assert_eq!((tracked, marked.len()), (0, 0));
        });
    }

    #[test]
    fn clearing_spares_needed_hot_and_inflight_extents() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("d.lockstep-bitmap");
            let (bm, _, _) = DiskBitmap::open(&p, SIZE).unwrap();
            for e in 0..4u64 {
                drop(bm.mark(e * EXTENT_BLOCKS, e * EXTENT_BLOCKS).await.unwrap());
            }
            let held = bm.mark(3 * EXTENT_BLOCKS, 3 * EXTENT_BLOCKS).await.unwrap();
            let ok = || async { Ok(()) };
            // Everything was touched in this period: nothing is cleared yet.
            assert_eq!(
                bm.clear_unneeded(RoaringBitmap::new(), ok()).await.unwrap(),
                0
            );
            // The next pass is due after the period; make it due now.
            bm.st.locked().last_clear = Some(Instant::now() - CLEAR_PERIOD);
            drop(bm.mark(2 * EXTENT_BLOCKS, 2 * EXTENT_BLOCKS).await.unwrap()); // hot again
            let needed: RoaringBitmap = [1].into_iter().collect();
            assert_eq!(bm.clear_unneeded(needed, ok()).await.unwrap(), 1);
            let left: Vec<u32> = bm.st.locked().wanted.iter().collect();
            assert_eq!(
                left,
                vec![1, 2, 3],
                "0 cleared; 1 needed, 2 hot, 3 in flight"
            );
            drop(held);
            let (_, _, marked) = DiskBitmap::open(&p, SIZE).unwrap();
            assert_eq!(marked.iter().collect::<Vec<_>>(), vec![1, 2, 3]);
            // A failed flush clears nothing.
            bm.st.locked().last_clear = Some(Instant::now() - CLEAR_PERIOD);
            let bad = || async { Err(crate::storage::StorageError::Config("no".into())) };
            assert!(bm
                .clear_unneeded(RoaringBitmap::new(), bad())
                .await
                .is_err());
            assert_eq!(bm.st.locked().wanted.len(), 3);
        });
    }
}
