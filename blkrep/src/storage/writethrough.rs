//! [`WriteThrough`]: every modification is durable before it completes, like a disk without
//! a volatile cache (qemu-nbd's `--cache=writethrough`): writes carry FUA, a trim or
//! write-zeroes is followed by a flush. For `lockstep export --writethrough` and the
//! primary's own disk in ack mode `sync`.

use std::sync::Arc;

use super::{Backend, Extent, IoBuf, IoFuture};

/// Wraps a backend so that every completed modification is durable.
#[derive(Debug)]
pub struct WriteThrough(pub Arc<dyn Backend>);

impl WriteThrough {
    /// A modification, then a flush.
    fn synced<'a>(&'a self, op: IoFuture<'a, ()>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            op.await?;
            self.0.flush().await
        })
    }
}

impl Backend for WriteThrough {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn alignment(&self) -> u32 {
        self.0.alignment()
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.0.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: IoBuf, _fua: bool) -> IoFuture<'_, ()> {
        self.0.write_at(offset, data, true)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.0.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.synced(self.0.discard(offset, len))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        self.synced(self.0.write_zeroes(offset, len, may_unmap))
    }
    fn start_writeback(&self) {
        self.0.start_writeback()
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.0.block_status(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{MemoryBackend, PowerLossDisk};

    #[tokio::test]
    async fn every_completed_modification_survives_a_power_cut() {
        let disk = Arc::new(PowerLossDisk::new(&MemoryBackend::new(1 << 20)));
        let wt = WriteThrough(disk.clone());
        wt.write_at(0, IoBuf::from_slice(&[7; 4096]), false)
            .await
            .unwrap();
        wt.write_at(8192, IoBuf::from_slice(&[7; 4096]), false)
            .await
            .unwrap();
        wt.write_zeroes(8192, 4096, false).await.unwrap();
        for seed in 0..16 {
            let image = disk.cut(seed).snapshot();
            assert!(image[..4096].iter().all(|&b| b == 7), "seed {seed}");
            assert!(image[8192..12288].iter().all(|&b| b == 0), "seed {seed}");
        }
    }
}
