//! `Unaligned<B>`: accept any byte range on a backend that needs aligned requests.
//!
//! Reads widen to the enclosing aligned range and return a window of it. Writes and zeroing
//! whose edges fall inside a block read that block, patch it and write it back
//! (read-modify-write). Two writes touching the same block must not interleave their
//! read-modify-write cycles, so every write takes a lock on the blocks it covers
//! ([`crate::sync::BlockRangeLock`]); reads take none (NBD leaves concurrent read/write order undefined).

use super::{check_range, Backend, Extent, IoBuf, IoFuture, Op, Result, StorageError};
use crate::sync::BlockRangeLock;

/// Byte-granular access to a block-aligned backend.
#[derive(Debug)]
pub struct Unaligned<B> {
    inner: B,
    align: u64,
    locks: BlockRangeLock,
}

enum Patch<'a> {
    Data(&'a [u8]),
    Zero,
}

impl<B: Backend> Unaligned<B> {
    /// Wrap `inner`; its [`Backend::alignment`] decides the block size.
    pub fn new(inner: B) -> Self {
        let align = u64::from(inner.alignment().max(1));
        Self {
            inner,
            align,
            locks: BlockRangeLock::default(),
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn down(&self, x: u64) -> u64 {
        x - x % self.align
    }

    fn up(&self, x: u64) -> u64 {
        x.div_ceil(self.align) * self.align
    }

    /// Read-modify-write of the single block at `block_start`, patching `offset..offset+len`.
    async fn patch_block(
        &self,
        block_start: u64,
        offset: u64,
        len: u64,
        patch: Patch<'_>,
    ) -> Result<()> {
        let mut block = self.inner.read_at(block_start, self.align as usize).await?;
        let at = (offset - block_start) as usize;
        let dst = &mut block[at..at + len as usize];
        match patch {
            Patch::Data(d) => dst.copy_from_slice(d),
            Patch::Zero => dst.fill(0),
        }
        self.inner.write_at(block_start, block, false).await
    }

    /// Apply `patch` over `offset..offset+len`: edges by read-modify-write, the aligned middle
    /// by `middle`.
    async fn write_range<'a, F>(
        &'a self,
        op: Op,
        offset: u64,
        len: u64,
        data: Option<IoBuf>,
        fua: bool,
        middle: F,
    ) -> Result<()>
    where
        F: FnOnce(u64, u64, Option<IoBuf>) -> IoFuture<'a, ()>,
    {
        check_range(op, offset, len, self.inner.size(), 1)?;
        if self.inner.read_only() {
            return Err(StorageError::ReadOnly);
        }
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let (a0, a1) = (self.down(offset), self.up(end));
        let _guard = self
            .locks
            .lock(a0 / self.align, (a1 - 1) / self.align)
            .await;
        if offset % self.align == 0 && len % self.align == 0 {
            return middle(offset, len, data).await;
        }
        let slice = |from: u64, to: u64| {
            data.as_ref()
                .map(|d| &d[(from - offset) as usize..(to - offset) as usize])
        };
        let (mut mid_start, mut mid_end) = (offset, end);
        if offset != a0 {
            let head_end = end.min(a0 + self.align);
            self.patch_block(
                a0,
                offset,
                head_end - offset,
                slice(offset, head_end).map_or(Patch::Zero, Patch::Data),
            )
            .await?;
            mid_start = head_end;
        }
        let tail_start = self.down(end);
        if end % self.align != 0 && tail_start >= mid_start && mid_start < end {
            self.patch_block(
                tail_start,
                tail_start,
                end - tail_start,
                slice(tail_start, end).map_or(Patch::Zero, Patch::Data),
            )
            .await?;
            mid_end = tail_start;
        }
        if mid_end > mid_start {
            let b = slice(mid_start, mid_end).map(IoBuf::from_slice);
            middle(mid_start, mid_end - mid_start, b).await?;
        }
        if fua {
            self.inner.flush().await?;
        }
        Ok(())
    }
}
impl<B: Backend> Backend for Unaligned<B> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn start_writeback(&self) {
        self.inner.start_writeback()
    }

    fn alignment(&self) -> u32 {
        1
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_range(Op::Read, offset, len as u64, self.inner.size(), 1)?;
            let (a0, a1) = (self.down(offset), self.up(offset + len as u64));
            if a0 == offset && a1 == offset + len as u64 {
                return self.inner.read_at(offset, len).await;
            }
            let mut buf = self.inner.read_at(a0, (a1 - a0) as usize).await?;
            buf.narrow((offset - a0) as usize, len);
            Ok(buf)
        })
    }

    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            self.write_range(Op::Write, offset, len, Some(data), fua, |at, _n, d| {
                self.inner.write_at(at, d.expect("write carries data"), fua)
            })
            .await
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        // Discard leaves zeroes everywhere in lockstep, so partial blocks are zeroed.
        Box::pin(
            self.write_range(Op::Discard, offset, len, None, false, |at, n, _| {
                self.inner.discard(at, n)
            }),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.write_range(
            Op::WriteZeroes,
            offset,
            len,
            None,
            false,
            move |at, n, _| self.inner.write_zeroes(at, n, may_unmap),
        ))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
}
