//! A remote export as a storage [`Backend`]: requests larger than the server takes are cut
//! into pieces, and NBD errors become [`StorageError`]s with the errno they carry.

use super::NbdClient;
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::storage::{self, Backend, Extent, IoBuf, IoFuture, Op, StorageError};

/// A storage error for a failed NBD request.
fn to_storage(op: Op, offset: u64, len: u64, e: NbdError) -> StorageError {
    let errno = match &e {
        NbdError::Request { errno, .. } => *errno as i32,
        NbdError::Closed { .. } => libc::ESHUTDOWN,
        NbdError::Timeout(_) => libc::ETIMEDOUT,
        _ => libc::EIO,
    };
    StorageError::Io {
        op,
        path: "nbd".into(),
        offset,
        len,
        source: std::io::Error::new(
            std::io::Error::from_raw_os_error(errno).kind(),
            e.to_string(),
        ),
    }
}

impl NbdClient {
    /// Refuse a request beyond the export or not aligned to its minimum block size.
    fn in_range(&self, op: Op, offset: u64, len: u64) -> Result<(), StorageError> {
        storage::check_range(op, offset, len, self.info.size, self.info.min_block)
    }

    /// `offset..offset + len` in pieces the server takes.
    fn chunks(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
        let max = u64::from(self.info.max_payload.min(32 << 20));
        let end = offset + len;
        (0..)
            .map(move |i| offset + i * max)
            .take_while(move |&o| o < end)
            .map(move |o| (o, (end - o).min(max) as u32))
    }
}

impl Backend for NbdClient {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn alignment(&self) -> u32 {
        self.info.min_block
    }

    fn read_only(&self) -> bool {
        self.has(FLAG_READ_ONLY)
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            self.in_range(Op::Read, offset, len as u64)?;
            if len as u64 <= u64::from(self.info.max_payload) {
                return self
                    .read(offset, len as u32)
                    .await
                    .map_err(|e| to_storage(Op::Read, offset, len as u64, e));
            }
            let mut out = IoBuf::zeroed(len);
            for (o, n) in self.chunks(offset, len as u64) {
                let b = self
                    .read(o, n)
                    .await
                    .map_err(|e| to_storage(Op::Read, o, n.into(), e))?;
                let at = (o - offset) as usize;
                out[at..at + n as usize].copy_from_slice(&b);
            }
            Ok(out)
        })
    }

    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.in_range(Op::Write, offset, data.len() as u64)?;
            if self.read_only() {
                return Err(StorageError::ReadOnly);
            }
            for (o, n) in self.chunks(offset, data.len() as u64) {
                let at = (o - offset) as usize;
                self.write(o, &data[at..at + n as usize], fua)
                    .await
                    .map_err(|e| to_storage(Op::Write, o, n.into(), e))?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.flush()
                .await
                .map_err(|e| to_storage(Op::Flush, 0, 0, e))
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.in_range(Op::Discard, offset, len)?;
            for (o, n) in self.chunks(offset, len) {
                self.trim(o, n, false)
                    .await
                    .map_err(|e| to_storage(Op::Discard, o, n.into(), e))?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.in_range(Op::WriteZeroes, offset, len)?;
            for (o, n) in self.chunks(offset, len) {
                self.write_zeroes(o, n, may_unmap, false)
                    .await
                    .map_err(|e| to_storage(Op::WriteZeroes, o, n.into(), e))?;
            }
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            storage::check_range(Op::BlockStatus, offset, len, self.info.size, 1)?;
            if self.info.base_allocation.is_none() || len == 0 {
                return Ok(vec![Extent {
                    len,
                    hole: false,
                    zero: false,
                }]);
            }
            let n = len.min(u64::from(u32::MAX - 4095)) as u32;
            let d = self
                .block_status(offset, n)
                .await
                .map_err(|e| to_storage(Op::BlockStatus, offset, len, e))?;
            Ok(d.into_iter()
                .map(|(l, f)| Extent {
                    len: l.into(),
                    hole: f & STATE_HOLE != 0,
                    zero: f & STATE_ZERO != 0,
                })
                .collect())
        })
    }
}
