//! The secondary's disk buffer: originals per epoch, and the secondary's own writes.
//!
//! ```text
//!   reads on the secondary:   local ──▶ originals of the oldest open epoch ──▶ disk
//!   primary write (epoch e):  copy the block's original into originals[e] once, then disk
//!   secondary write:          into local (whole blocks)
//!   commit(n):                drop originals[..=n] and local
//!   failover to checkpoint:   write the view of every buffered block back to the disk
//! ```
//!
//! The disk always holds the primary's latest writes ("speculative write-through"); the
//! buffer holds what is needed to go back to the last committed checkpoint. Originals are
//! kept per epoch, so writes of epoch n+1 can arrive while epoch n is still being committed:
//! for a block touched in several open epochs, the oldest epoch's original is the checkpoint
//! state. Blocks live in memory up to a limit, then in a spill file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// Block size of the buffer in bytes.
pub const BUFFER_BLOCK: u64 = 4096;

#[derive(Debug)]
enum Slot {
    /// The block reads as zeroes (no data kept).
    Zero,
    /// In memory.
    Mem(Box<[u8]>),
    /// In the spill file at this offset.
    Spill(u64),
}

#[derive(Debug)]
struct Spill {
    path: PathBuf,
    file: Option<File>,
    end: u64,
    free: Vec<u64>,
}

/// Sizes, for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BufferStats {
    /// Blocks held (originals of every open epoch, plus local blocks).
    pub blocks: u64,
    /// Bytes of block data in memory.
    pub memory_bytes: u64,
    /// Bytes of block data in the spill file.
    pub spill_bytes: u64,
    /// Open (uncommitted) epochs with originals.
    pub epochs: u64,
    /// Blocks written by the secondary itself since the last commit.
    pub local_blocks: u64,
}

/// Hashes a block number for [`BlockMap`]: one multiplication (Fibonacci hashing) instead
/// of SipHash, which showed in profiles of a sync (a lookup or two per block written). The
/// keys are block numbers below the disk's size, sent by an authenticated primary, so
/// there is no flooding to defend against.
#[derive(Debug, Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n ^ (n >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Block number → where its bytes are kept.
type BlockMap = HashMap<u64, Slot, BuildHasherDefault<BlockHasher>>;

/// Originals per open epoch plus the secondary's own writes.
#[derive(Debug)]
pub struct DiskBuffer {
    originals: BTreeMap<u64, BlockMap>,
    local: BlockMap,
    memory_limit: u64,
    memory: u64,
    spill: Spill,
    spilled: u64,
}

impl DiskBuffer {
    /// An empty buffer keeping up to `memory_limit` bytes in memory, the rest in a file at
    /// `spill_path` (created when first needed, removed when dropped).
    pub fn new(memory_limit: u64, spill_path: PathBuf) -> Self {
        Self {
            originals: BTreeMap::new(),
            local: BlockMap::default(),
            memory_limit,
            memory: 0,
            spill: Spill {
                path: spill_path,
                file: None,
                end: 0,
                free: Vec::new(),
            },
            spilled: 0,
        }
    }

    fn store(&mut self, data: Option<&[u8]>) -> io::Result<Slot> {
        let Some(data) = data else {
            return Ok(Slot::Zero);
        };
        debug_assert_eq!(data.len() as u64, BUFFER_BLOCK);
        if crate::digest::is_zero(data) {
            return Ok(Slot::Zero);
        }
        if self.memory + BUFFER_BLOCK <= self.memory_limit {
            self.memory += BUFFER_BLOCK;
            return Ok(Slot::Mem(data.into()));
        }
        if self.spill.file.is_none() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.spill.path)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("creating spill file {}: {e}", self.spill.path.display()),
                    )
                })?;
            self.spill.file = Some(f);
        }
        let off = self.spill.free.pop().unwrap_or_else(|| {
            let o = self.spill.end;
            self.spill.end += BUFFER_BLOCK;
            o
        });
        let f = self.spill.file.as_ref().expect("spill file open");
        f.write_all_at(data, off)?;
        self.spilled += BUFFER_BLOCK;
        Ok(Slot::Spill(off))
    }

    fn release(&mut self, s: Slot) {
        match s {
            Slot::Zero => {}
            Slot::Mem(_) => self.memory -= BUFFER_BLOCK,
            Slot::Spill(off) => {
                self.spill.free.push(off);
                self.spilled -= BUFFER_BLOCK;
            }
        }
    }

    fn load(&self, s: &Slot) -> io::Result<Vec<u8>> {
        match s {
            Slot::Zero => Ok(vec![0; BUFFER_BLOCK as usize]),
            Slot::Mem(b) => Ok(b.to_vec()),
            Slot::Spill(off) => {
                let mut b = vec![0; BUFFER_BLOCK as usize];
                self.spill
                    .file
                    .as_ref()
                    .expect("spilled block without a spill file")
                    .read_exact_at(&mut b, *off)?;
                Ok(b)
            }
        }
    }

    /// Whether epoch `epoch` already holds the original of `block`.
    pub fn has_original(&self, epoch: u64, block: u64) -> bool {
        self.originals
            .get(&epoch)
            .is_some_and(|m| m.contains_key(&block))
    }

    /// Keep `data` (None: zeroes) as the original of `block` in `epoch`, unless one is kept.
    pub fn put_original(&mut self, epoch: u64, block: u64, data: Option<&[u8]>) -> io::Result<()> {
        if self.has_original(epoch, block) {
            return Ok(());
        }
        let slot = self.store(data)?;
        self.originals.entry(epoch).or_default().insert(block, slot);
        Ok(())
    }

    /// The secondary wrote `data` (one whole block) to `block`.
    pub fn put_local(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        let slot = self.store(Some(data))?;
        if let Some(old) = self.local.insert(block, slot) {
            self.release(old);
        }
        Ok(())
    }

    /// What the secondary sees at `block` if the buffer decides it; None: read the disk.
    pub fn view(&self, block: u64) -> io::Result<Option<Vec<u8>>> {
        if let Some(s) = self.local.get(&block) {
            return self.load(s).map(Some);
        }
        for m in self.originals.values() {
            if let Some(s) = m.get(&block) {
                return self.load(s).map(Some);
            }
        }
        Ok(None)
    }

    /// Whether the buffer decides what the secondary sees at `block`.
    pub fn covers(&self, block: u64) -> bool {
        self.local.contains_key(&block) || self.originals.values().any(|m| m.contains_key(&block))
    }

    /// Epoch `epoch` is committed: drop its originals (and any older ones) and the local
    /// blocks (the secondary restarts from this checkpoint).
    pub fn commit(&mut self, epoch: u64) {
        let keep = self.originals.split_off(&(epoch + 1));
        let gone = std::mem::replace(&mut self.originals, keep);
        for (_, m) in gone {
            for (_, s) in m {
                self.release(s);
            }
        }
        self.drop_local();
        self.shrink_spill();
    }

    /// Every block with an original in an open epoch, sorted: what a roll-back to the last
    /// checkpoint rewrites on the disk.
    pub fn original_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .originals
            .values()
            .flat_map(|m| m.keys())
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The checkpoint content of `block`: its original in the oldest open epoch that has one.
    pub fn oldest_original(&self, block: u64) -> io::Result<Option<Vec<u8>>> {
        match self.originals.values().find_map(|m| m.get(&block)) {
            Some(s) => self.load(s).map(Some),
            None => Ok(None),
        }
    }

    /// Forget every original (they were written back to the disk); the secondary's own
    /// writes stay.
    pub fn drop_originals(&mut self) {
        for (_, m) in std::mem::take(&mut self.originals) {
            for (_, s) in m {
                self.release(s);
            }
        }
        self.shrink_spill();
    }

    /// Forget the secondary's own writes.
    pub fn drop_local(&mut self) {
        for (_, s) in std::mem::take(&mut self.local) {
            self.release(s);
        }
    }

    /// Forget everything (failover to the latest state).
    pub fn clear(&mut self) {
        self.commit(u64::MAX - 1);
        for (_, m) in std::mem::take(&mut self.originals) {
            for (_, s) in m {
                self.release(s);
            }
        }
        self.shrink_spill();
    }

    fn shrink_spill(&mut self) {
        if self.spilled == 0 && self.spill.end > 0 {
            self.spill.free.clear();
            self.spill.end = 0;
            if let Some(f) = &self.spill.file {
                let _ = f.set_len(0);
            }
        }
    }

    /// Every block the buffer decides, sorted: what a failover to the checkpoint rewrites.
    pub fn blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .local
            .keys()
            .chain(self.originals.values().flat_map(|m| m.keys()))
            .copied()
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Sizes for status.
    pub fn stats(&self) -> BufferStats {
        BufferStats {
            blocks: self.local.len() as u64
                + self.originals.values().map(|m| m.len() as u64).sum::<u64>(),
            memory_bytes: self.memory,
            spill_bytes: self.spilled,
            epochs: self.originals.len() as u64,
            local_blocks: self.local.len() as u64,
        }
    }
}

impl Drop for DiskBuffer {
    fn drop(&mut self) {
        if self.spill.file.take().is_some() {
            let _ = std::fs::remove_file(&self.spill.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(v: u8) -> Vec<u8> {
        vec![v; BUFFER_BLOCK as usize]
    }

    fn check(limit: u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill");
        let mut b = DiskBuffer::new(limit, path.clone());
        b.put_original(1, 7, Some(&blk(1))).unwrap();
        b.put_original(1, 7, Some(&blk(9))).unwrap(); // once per epoch
        b.put_original(2, 7, Some(&blk(2))).unwrap();
        b.put_original(2, 8, None).unwrap();
        assert_eq!(b.view(7).unwrap(), Some(blk(1)), "oldest epoch wins");
        assert_eq!(b.view(8).unwrap(), Some(blk(0)));
        assert_eq!(b.view(9).unwrap(), None);
        b.put_local(8, &blk(5)).unwrap();
        assert_eq!(b.view(8).unwrap(), Some(blk(5)), "local writes win");
        assert_eq!(b.blocks(), vec![7, 8]);
        b.commit(1);
        assert_eq!(b.view(7).unwrap(), Some(blk(2)));
        assert_eq!(b.view(8).unwrap(), Some(blk(0)), "local dropped at commit");
        assert_eq!(b.stats().epochs, 1);
        b.commit(2);
        assert_eq!(b.stats(), BufferStats::default());
        if limit == 0 {
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        }
        drop(b);
        assert!(!path.exists());
    }

    #[test]
    fn a_roll_back_sees_the_oldest_original_and_keeps_local_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = DiskBuffer::new(1 << 20, dir.path().join("spill"));
        b.put_original(5, 1, Some(&blk(5))).unwrap();
        b.put_original(6, 1, Some(&blk(6))).unwrap();
        b.put_original(6, 2, None).unwrap();
        b.put_local(3, &blk(8)).unwrap();
        assert_eq!(b.original_blocks(), vec![1, 2]);
        assert_eq!(b.oldest_original(1).unwrap(), Some(blk(5)));
        assert_eq!(
            b.oldest_original(2).unwrap(),
            Some(vec![0; BUFFER_BLOCK as usize])
        );
        assert_eq!(
            b.oldest_original(3).unwrap(),
            None,
            "local blocks are no originals"
        );
        b.drop_originals();
        assert_eq!(b.stats().epochs, 0);
        assert_eq!(b.view(3).unwrap(), Some(blk(8)));
        b.commit(9);
        assert_eq!(b.stats(), BufferStats::default());
    }

    #[test]
    fn in_memory() {
        check(1 << 20);
    }

    #[test]
    fn spilled() {
        check(0);
    }
}
