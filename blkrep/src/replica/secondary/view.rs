//! The secondary's own view (COLO's running secondary): local clients read the disk as it
//! is plus their own writes, which go into the disk buffer and never touch the disk until a
//! failover; after failover the view is the disk itself.

use std::sync::Arc;

use super::{blocks_of, spill_error, Mode, Secondary};
use crate::replica::buffer::BUFFER_BLOCK;
use crate::storage::{check_range, Backend, IoBuf, IoFuture, Op, Result};
use crate::sync::Locked;

impl Secondary {
    pub(super) async fn view_read(&self, offset: u64, len: usize) -> Result<IoBuf> {
        check_range(Op::Read, offset, len as u64, self.disk.size(), 1)?;
        let _b = self.barrier.read().await;
        if self.mode() == Mode::Primary || len == 0 {
            return self.disk.read_at(offset, len).await;
        }
        let (first, last) = blocks_of(offset, len as u64);
        let _g = self.locks.lock(first, last).await;
        let mut buf = self.disk.read_at(offset, len).await?;
        let i = self.inner();
        for b in first..=last {
            if let Some(data) = i
                .buffer
                .view(b)
                .map_err(|e| spill_error(offset, len as u64, e))?
            {
                let bstart = b * BUFFER_BLOCK;
                let from = offset.max(bstart);
                let to = (offset + len as u64).min(bstart + BUFFER_BLOCK);
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - bstart) as usize..(to - bstart) as usize]);
            }
        }
        Ok(buf)
    }

    /// A write on the secondary itself: into the buffer while replicating, to the disk (and
    /// the dirty bitmap) after failover. `data` None writes zeroes.
    pub(super) async fn view_write(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        data: Option<IoBuf>,
        fua: bool,
    ) -> Result<()> {
        check_range(op, offset, len, self.disk.size(), 1)?;
        let _b = self.barrier.read().await;
        let (first, last) = blocks_of(offset, len);
        if self.mode() == Mode::Primary {
            let r = match (op, data) {
                (Op::Write, Some(d)) => self.disk.write_at(offset, d, fua).await,
                (Op::Discard, _) => self.disk.discard(offset, len).await,
                _ => self.disk.write_zeroes(offset, len, true).await,
            };
            if r.is_ok() && len > 0 {
                self.dirty.locked().insert_range(first..=last);
            }
            return r;
        }
        if len == 0 {
            return Ok(());
        }
        let _g = self.locks.lock(first, last).await;
        let size = self.disk.size();
        for b in first..=last {
            let bstart = b * BUFFER_BLOCK;
            let blen = BUFFER_BLOCK.min(size - bstart);
            let view = self
                .inner()
                .buffer
                .view(b)
                .map_err(|e| spill_error(bstart, blen, e))?;
            let mut block = match view {
                Some(v) => v,
                None => {
                    let mut v = self.disk.read_at(bstart, blen as usize).await?.to_vec();
                    v.resize(BUFFER_BLOCK as usize, 0);
                    v
                }
            };
            let from = offset.max(bstart);
            let to = (offset + len).min(bstart + BUFFER_BLOCK);
            let dst = &mut block[(from - bstart) as usize..(to - bstart) as usize];
            match &data {
                Some(d) => {
                    dst.copy_from_slice(&d[(from - offset) as usize..(to - offset) as usize])
                }
                None => dst.fill(0),
            }
            let mut i = self.inner();
            i.buffer
                .put_local(b, &block)
                .map_err(|e| spill_error(bstart, blen, e))?;
            i.local_writes += 1;
        }
        Ok(())
    }
}

/// What clients of the secondary's `--export` see.
#[derive(Debug)]
pub struct SecondaryView(pub(super) Arc<Secondary>);

impl Backend for SecondaryView {
    fn size(&self) -> u64 {
        self.0.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(self.0.view_read(offset, len))
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        let len = data.len() as u64;
        Box::pin(self.0.view_write(Op::Write, offset, len, Some(data), fua))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.0.disk.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.0.view_write(Op::Discard, offset, len, None, false))
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.0.view_write(Op::WriteZeroes, offset, len, None, false))
    }
}
