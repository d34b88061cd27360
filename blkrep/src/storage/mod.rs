//! Storage backends: where the bytes of a disk live.
//!
//! Every backend implements [`Backend`], a small asynchronous byte-addressed interface:
//!
//! ```text
//!           NBD server / ublk frontend / replication engine
//!                              │  Backend
//!          ┌───────────────────┼─────────────────────┐
//!    MemoryBackend      Unaligned<UringFile>     UringFile
//!    (tests, models)    (O_DIRECT: read-modify-    (buffered file or
//!                        write for odd requests)    block device, io_uring)
//! ```
//!
//! A backend states the alignment it needs ([`Backend::alignment`]); callers that accept
//! arbitrary byte ranges wrap it in [`Unaligned`], which does read-modify-write at the edges.
//! [`open_disk`] builds the right stack from a path and options.
//!
//! [`UringFile::open`] locks the file as QEMU does ([`lock`]: OFD locks on QEMU's lock bytes,
//! 100 + permission used and 200 + permission not shared): a writable disk keeps QEMU and
//! other locksteps from writing or resizing it, and an open fails with
//! [`StorageError::InUse`] when another process already writes the file or will not share it
//! with a writer. [`DiskOptions::lock`] `= false` is QEMU's `locking=off`.
//!
//! [`WriteThrough`] makes every modification durable before it completes (no volatile cache).
//!
//! For tests, [`Faulty`] wraps any backend to fail or delay requests by rule, and
//! [`PowerLossDisk`] forgets unflushed writes on a power cut.

mod buf;
mod faulty;
pub mod lock;
mod memory;
mod powerloss;
mod unaligned;
mod uring;
mod writethrough;

#[cfg(test)]
pub(crate) mod suite;

pub use buf::{keep_large_buffers_in_heap, IoBuf, IO_ALIGN};
pub use faulty::{Effect, FaultCounts, Faulty, Rule, RuleId};
pub use memory::MemoryBackend;
pub use powerloss::PowerLossDisk;
pub use unaligned::Unaligned;
pub use uring::{DiskOptions, UringFile};
pub use writethrough::WriteThrough;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

/// The kind of operation an error happened in, for error context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush (fdatasync).
    Flush,
    /// Discard (punch a hole).
    Discard,
    /// Write zeroes.
    WriteZeroes,
    /// Allocation status query.
    BlockStatus,
    /// Opening or sizing the disk.
    Open,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
            Op::BlockStatus => "block-status",
            Op::Open => "open",
        };
        f.write_str(s)
    }
}

/// Errors from a storage backend. Each carries what was being done, and where.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The request reaches past the end of the disk.
    #[error("{op} of {len} bytes at offset {offset} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Operation.
        op: Op,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The request does not meet the backend's alignment.
    #[error("{op} of {len} bytes at offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        /// Operation.
        op: Op,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// Required alignment.
        align: u32,
    },
    /// The operating system reported an error.
    #[error("{op} of {len} bytes at offset {offset} on {path}: {source}")]
    Io {
        /// Operation.
        op: Op,
        /// Disk path (or a description for non-file backends).
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backend refuses writes.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The backend's I/O engine has stopped (shut down or crashed).
    #[error("the I/O engine for {path} has stopped")]
    EngineStopped {
        /// Disk path.
        path: PathBuf,
    },
    /// Configuration is wrong (missing file without size, bad size, ...).
    #[error("{0}")]
    Config(String),
    /// The disk does not take this request in its current state (e.g. a secondary that has
    /// failed over refuses forwarded writes).
    #[error("{0}")]
    Unavailable(String),
    /// Another process uses the disk in a way that excludes this open (QEMU's lock bytes;
    /// see [`lock`]), or its locks could not be taken.
    #[error("{0}")]
    InUse(String),
}

impl StorageError {
    /// The closest POSIX errno, for protocol boundaries (NBD error codes, ublk results).
    pub fn errno(&self) -> i32 {
        match self {
            StorageError::OutOfRange {
                op: Op::Write | Op::WriteZeroes,
                ..
            } => libc::ENOSPC,
            StorageError::OutOfRange { .. } | StorageError::Misaligned { .. } => libc::EINVAL,
            StorageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            StorageError::ReadOnly => libc::EPERM,
            StorageError::EngineStopped { .. } => libc::ESHUTDOWN,
            StorageError::Config(_) => libc::EINVAL,
            StorageError::Unavailable(_) => libc::ESHUTDOWN,
            StorageError::InUse(_) => libc::EBUSY,
        }
    }
}

/// Result alias for storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// A boxed future returned by backend operations.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// One run of the disk with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// The run is a hole (unallocated).
    pub hole: bool,
    /// The run reads as zeroes.
    pub zero: bool,
}

/// The byte ranges of `offset .. offset + len` that may hold data (not known holes), in
/// order, as `(offset, len)`. A backend whose block status covers nothing is taken to hold
/// data everywhere. Large ranges are asked about 1 GiB at a time.
pub async fn data_ranges(disk: &dyn Backend, offset: u64, len: u64) -> Result<Vec<(u64, u64)>> {
    let end = offset + len;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |o: u64, l: u64| match out.last_mut() {
        Some((po, pl)) if *po + *pl == o => *pl += l,
        _ => out.push((o, l)),
    };
    let mut off = offset;
    while off < end {
        let step = (end - off).min(1 << 30);
        let mut pos = off;
        for e in disk.block_status(off, step).await? {
            let l = e.len.min(off + step - pos);
            if l == 0 {
                break;
            }
            if !(e.hole && e.zero) {
                push(pos, l);
            }
            pos += l;
        }
        if pos == off {
            push(off, step);
            pos = off + step;
        }
        off = pos;
    }
    Ok(out)
}

/// A disk: a fixed-size array of bytes with asynchronous I/O.
///
/// Offsets and lengths must be multiples of [`Backend::alignment`] and lie within
/// [`Backend::size`]; backends check both and return [`StorageError`] otherwise.
///
/// Returned futures do nothing until polled: the replication layer creates a write's future
/// first and polls it only after it has preserved the blocks the write will change.
pub trait Backend: Send + Sync + fmt::Debug + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Alignment (bytes) that offsets and lengths of every request must meet; 1 for any.
    fn alignment(&self) -> u32;
    /// Whether the backend refuses writes.
    fn read_only(&self) -> bool {
        false
    }
    /// Read `len` bytes at `offset`.
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf>;
    /// Write `data` at `offset`; with `fua`, the data is durable when the future completes.
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()>;
    /// Make every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Discard a range: its content becomes unspecified (in practice zeroes).
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()>;
    /// Make a range read as zeroes; with `may_unmap`, space may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()>;
    /// Start writing cached data back to stable storage, without waiting for it, so that
    /// the next flush has less to do. A hint: durability still comes only from `flush`. May
    /// block briefly (a full device queue): call it off the async threads.
    fn start_writeback(&self) {}
    /// Allocation status from `offset` for up to `len` bytes (at least one extent).
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        let _ = offset;
        Box::pin(async move {
            Ok(vec![Extent {
                len,
                hole: false,
                zero: false,
            }])
        })
    }
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn alignment(&self) -> u32 {
        (**self).alignment()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        (**self).read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        (**self).write_at(offset, data, fua)
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        (**self).write_zeroes(offset, len, may_unmap)
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        (**self).block_status(offset, len)
    }
    fn start_writeback(&self) {
        (**self).start_writeback()
    }
}

/// Check that `offset..offset+len` lies within a disk of `size` bytes and meets `align`.
pub fn check_range(op: Op, offset: u64, len: u64, size: u64, align: u32) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => {}
        _ => {
            return Err(StorageError::OutOfRange {
                op,
                offset,
                len,
                size,
            })
        }
    }
    let a = u64::from(align.max(1));
    if offset % a != 0 || len % a != 0 {
        return Err(StorageError::Misaligned {
            op,
            offset,
            len,
            align,
        });
    }
    Ok(())
}

/// Open a disk (regular file or block device) for serving arbitrary byte ranges.
///
/// Returns the io_uring engine, wrapped in [`Unaligned`] when the options need aligned I/O
/// (O_DIRECT), so the result always accepts any offset and length.
pub fn open_disk(opts: &DiskOptions) -> Result<Arc<dyn Backend>> {
    let file = UringFile::open(opts)?;
    if file.alignment() > 1 {
        Ok(Arc::new(Unaligned::new(file)))
    } else {
        Ok(Arc::new(file))
    }
}
