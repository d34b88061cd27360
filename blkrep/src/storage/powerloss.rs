//! A disk that can lose power: what was written but not flushed may vanish, as from a
//! volatile write cache. For crash-consistency tests (raft-engine's file-system seam, nbdkit's
//! error filter): run a node on it, [`PowerLossDisk::cut`] at any moment, restart the node on
//! what survived.
//!
//! ```text
//!   write ──▶ cache (what reads see) ──┐ pending ops, in order
//!   flush ──────────────────────────────┴──▶ durable image
//!   cut   ──▶ durable image + any subset of the pending ops (a cache that wrote some of
//!             them back on its own)
//! ```

use crate::sync::Locked;
use std::sync::Mutex;

use super::{Backend, IoBuf, IoFuture, MemoryBackend, Result};

#[derive(Debug)]
enum Pending {
    Write(u64, IoBuf),
    Zero(u64, u64),
}

/// A [`MemoryBackend`] behind a volatile write cache.
#[derive(Debug)]
pub struct PowerLossDisk {
    cache: MemoryBackend,
    durable: MemoryBackend,
    pending: Mutex<Vec<Pending>>,
}

impl PowerLossDisk {
    /// A disk whose durable and visible content is `image`'s.
    pub fn new(image: &MemoryBackend) -> Self {
        let copy = |m: &MemoryBackend| {
            let c = MemoryBackend::new(m.size());
            c.load(&m.snapshot());
            c
        };
        Self {
            cache: copy(image),
            durable: copy(image),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// What reads see now.
    pub fn visible(&self) -> Vec<u8> {
        self.cache.snapshot()
    }

    /// Cut the power: the image a restart finds. Each write not yet flushed survives or not
    /// by `seed`'s coin, as a cache writing back in any order would leave it.
    pub fn cut(&self, seed: u64) -> MemoryBackend {
        let out = MemoryBackend::new(self.durable.size());
        out.load(&self.durable.snapshot());
        for (i, p) in self.lock().iter().enumerate() {
            // splitmix64 of (seed, i): an independent coin per pending op.
            let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            if (z ^ (z >> 31)) & 1 == 0 {
                continue;
            }
            match p {
                Pending::Write(off, d) => out.load_at(*off, d),
                Pending::Zero(off, len) => out.load_at(*off, &vec![0; *len as usize]),
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.locked()
    }

    async fn persist(&self, p: Pending) -> Result<()> {
        match p {
            Pending::Write(off, d) => self.durable.write_at(off, d, false).await,
            Pending::Zero(off, len) => self.durable.write_zeroes(off, len, false).await,
        }
    }
}

impl Backend for PowerLossDisk {
    fn size(&self) -> u64 {
        self.cache.size()
    }

    fn alignment(&self) -> u32 {
        1
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.cache.read_at(offset, len)
    }

    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.cache
                .write_at(offset, IoBuf::from_slice(&data), false)
                .await?;
            let p = Pending::Write(offset, data);
            if fua {
                self.persist(p).await
            } else {
                self.lock().push(p);
                Ok(())
            }
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let done = std::mem::take(&mut *self.lock());
            for p in done {
                self.persist(p).await?;
            }
            Ok(())
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.cache.write_zeroes(offset, len, false).await?;
            self.lock().push(Pending::Zero(offset, len));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_flushed_and_fua_writes_are_sure_to_survive() {
        let d = PowerLossDisk::new(&MemoryBackend::new(16384));
        d.write_at(0, IoBuf::from_slice(&[1; 4096]), false)
            .await
            .unwrap();
        d.flush().await.unwrap();
        d.write_at(4096, IoBuf::from_slice(&[2; 4096]), true)
            .await
            .unwrap();
        d.write_at(8192, IoBuf::from_slice(&[3; 4096]), false)
            .await
            .unwrap();
        assert_eq!(d.visible()[8192], 3);
        let mut lost = 0;
        for seed in 0..16 {
            let img = d.cut(seed).snapshot();
            assert_eq!((img[0], img[4096]), (1, 2));
            lost += usize::from(img[8192] == 0);
        }
        assert!(
            lost > 0 && lost < 16,
            "the unflushed write always or never survived"
        );
    }
}
