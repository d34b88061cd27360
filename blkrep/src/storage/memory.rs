//! An in-memory disk, for tests and models. Any alignment, any size that fits in memory.

use crate::sync::Locked;
use std::sync::{Arc, Mutex};

use super::{check_range, Backend, IoBuf, IoFuture, Op, Result};

/// A disk held in a `Vec<u8>`. Cloning shares the same bytes.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    bytes: Arc<Mutex<Vec<u8>>>,
    align: u32,
}

impl MemoryBackend {
    /// A zero-filled disk of `size` bytes that accepts any byte range.
    pub fn new(size: u64) -> Self {
        Self::with_alignment(size, 1)
    }

    /// A zero-filled disk that insists on `align`-byte aligned requests (to test wrappers).
    pub fn with_alignment(size: u64, align: u32) -> Self {
        let size = usize::try_from(size).expect("memory disk larger than address space");
        Self {
            bytes: Arc::new(Mutex::new(vec![0; size])),
            align: align.max(1),
        }
    }

    /// A copy of the whole disk.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Replace the content from byte 0 with `data` (no larger than the disk).
    pub fn load(&self, data: &[u8]) {
        self.load_at(0, data);
    }

    /// Overwrite the bytes at `offset` with `data`, without alignment checks.
    pub fn load_at(&self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.lock()[o..o + data.len()].copy_from_slice(data);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the bytes half-updated in a way that
        // matters more than the panic itself; keep serving.
        self.bytes.locked()
    }

    fn fill(&self, op: Op, offset: u64, len: u64, data: Option<&[u8]>) -> Result<()> {
        check_range(op, offset, len, self.size(), self.align)?;
        let mut bytes = self.lock();
        let range = offset as usize..(offset + len) as usize;
        match data {
            Some(d) => bytes[range].copy_from_slice(d),
            None => bytes[range].fill(0),
        }
        Ok(())
    }
}

impl Backend for MemoryBackend {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn alignment(&self) -> u32 {
        self.align
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_range(Op::Read, offset, len as u64, self.size(), self.align)?;
            let bytes = self.lock();
            Ok(IoBuf::from_slice(
                &bytes[offset as usize..offset as usize + len],
            ))
        })
    }

    fn write_at(&self, offset: u64, data: IoBuf, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(Op::Write, offset, data.len() as u64, Some(&data)) })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(Op::Discard, offset, len, None) })
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move { self.fill(Op::WriteZeroes, offset, len, None) })
    }
}
