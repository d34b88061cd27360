//! `UringFile`: a regular file or block device driven through io_uring.
//!
//! One engine thread owns the ring. Callers (tokio tasks) push requests onto a shared queue and
//! wake the thread through an eventfd only when it may be asleep; the thread submits everything
//! queued in one `io_uring_enter`, reaps completions and answers each caller on a oneshot
//! channel (the `engine` module). Buffers travel *into* the engine with the request and come
//! back with the answer, so the engine owns every buffer the kernel may touch for as long as
//! the kernel may touch it.

use crate::sync::Locked;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::IoUring;
use tokio::sync::oneshot;

mod engine;

use engine::{run_engine, Engine, Queue, Request, Work};

use super::lock::{DiskLock, LockSet};
use super::{check_range, Backend, Extent, IoBuf, IoFuture, Op, Result, StorageError};

/// How to open a disk.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Regular file or block device.
    pub path: PathBuf,
    /// For a regular file: create it, or grow it, to this size. Refused for block devices.
    pub size: Option<u64>,
    /// Bypass the page cache (O_DIRECT); requests then need sector alignment, which
    /// [`super::open_disk`] supplies with read-modify-write.
    pub direct: bool,
    /// Open read-only.
    pub read_only: bool,
    /// Maximum requests in flight in the kernel.
    pub queue_depth: u32,
    /// Take QEMU-compatible OFD locks (see [`super::lock`]) and refuse a disk that another
    /// process writes; `false` is QEMU's `locking=off`.
    pub lock: bool,
}

impl DiskOptions {
    /// Options for `path` with defaults: buffered, read-write, depth 128, no resizing.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            size: None,
            direct: false,
            read_only: false,
            queue_depth: 128,
            lock: true,
        }
    }
}

/// A file or block device served through io_uring.
#[derive(Debug)]
pub struct UringFile {
    engine: Arc<Engine>,
    thread: Option<JoinHandle<()>>,
    // Keeps the descriptor open for as long as the engine may use it.
    file: File,
    path: PathBuf,
    size: u64,
    align: u32,
    read_only: bool,
    block_device: bool,
    /// Buffered I/O: try the page cache on the caller's thread before using the ring.
    inline: Option<InlinePath>,
    /// The QEMU lock bytes, held while this disk (or another open of the same file in this
    /// process) is open. Dropped after the engine thread has stopped.
    lock: Option<Arc<DiskLock>>,
}

/// The page-cache fast path of a buffered disk.
///
/// io_uring itself first tries a buffered request without blocking and only hands it to a
/// kernel worker thread when it would block; doing that first step on the caller's thread with
/// `RWF_NOWAIT` saves two thread hand-offs per request. Filesystems that cannot write without
/// blocking (ext4 answers EOPNOTSUPP) copy writes into the page cache on the caller's thread,
/// as io_uring's worker thread would, instead of queueing them behind one another on the
/// ring's per-inode worker (io_uring serialises buffered writes to one file). FUA writes,
/// flushes, zeroing, cache misses and every O_DIRECT request go through the ring.
#[derive(Debug)]
struct InlinePath {
    nowait_writes: AtomicBool,
}

fn ioctl_u64(fd: RawFd, req: libc::c_ulong) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the ioctls used here (BLKGETSIZE64) write one u64 through the pointer.
    let r = unsafe { libc::ioctl(fd, req as _, &mut v as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctls used here (BLKSSZGET) write one c_int through the pointer.
    let r = unsafe { libc::ioctl(fd, req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v as u32)
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

impl UringFile {
    /// Open (and for regular files with `size`, create or grow) a disk.
    pub fn open(opts: &DiskOptions) -> Result<Self> {
        let path = opts.path.clone();
        let open_err = |source: io::Error| StorageError::Io {
            op: Op::Open,
            path: path.clone(),
            offset: 0,
            len: 0,
            source,
        };
        let meta = std::fs::metadata(&path);
        let block_device = matches!(&meta, Ok(m) if m.file_type().is_block_device());
        match (&meta, opts.size) {
            (Err(e), None) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StorageError::Config(format!(
                    "{} does not exist; pass --size to create it",
                    path.display()
                )))
            }
            (Err(e), Some(_)) if e.kind() != io::ErrorKind::NotFound => {
                return Err(open_err(io::Error::new(e.kind(), e.to_string())))
            }
            (Ok(_), Some(_)) if block_device => {
                return Err(StorageError::Config(format!(
                    "{} is a block device; its size is fixed, do not pass --size",
                    path.display()
                )))
            }
            (Ok(m), _) if !block_device && !m.is_file() => {
                return Err(StorageError::Config(format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                )))
            }
            _ => {}
        }
        if opts.read_only && opts.size.is_some() && meta.is_err() {
            return Err(StorageError::Config(format!(
                "{} does not exist and cannot be created read-only",
                path.display()
            )));
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.size.is_some() && !opts.read_only {
            oo.create(true);
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let file = oo.open(&path).map_err(open_err)?;
        let fd = file.as_raw_fd();
        let cur = if block_device {
            ioctl_u64(fd, BLKGETSIZE64).map_err(open_err)?
        } else {
            file.metadata().map_err(open_err)?.len()
        };
        // Locked before anything changes, growing included (QEMU's "resize").
        let lock = if opts.lock {
            let want = if opts.read_only {
                LockSet::reader()
            } else {
                LockSet::writer()
            };
            let lock = DiskLock::acquire(&file, want)
                .map_err(|e| StorageError::InUse(e.message(&path)))?;
            Some(lock)
        } else {
            None
        };
        let size = if block_device {
            cur
        } else {
            match opts.size {
                Some(want) if want < cur => {
                    return Err(StorageError::Config(format!(
                    "{} is {cur} bytes, larger than --size {want}; lockstep never shrinks a disk",
                    path.display()
                )))
                }
                Some(want) if want > cur => {
                    if opts.read_only {
                        return Err(StorageError::Config(format!(
                            "{} cannot be grown read-only",
                            path.display()
                        )));
                    }
                    file.set_len(want).map_err(open_err)?;
                    want
                }
                _ => cur,
            }
        };
        let align = if !opts.direct {
            1
        } else if block_device {
            ioctl_int(fd, BLKSSZGET).map_err(open_err)?.max(512)
        } else {
            4096
        };
        // SAFETY: eventfd() returns a new descriptor or -1; we take ownership of it at once.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        // SAFETY: efd is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        let depth = opts.queue_depth.clamp(1, 4096);
        let ring = IoUring::builder()
            .build((depth + 1).next_power_of_two())
            .map_err(open_err)?;
        let engine = Arc::new(Engine {
            queue: Mutex::new(Queue::default()),
            awake: AtomicBool::new(true),
            eventfd,
        });
        let thread_engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name(format!(
                "uring:{}",
                path.file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default()
            ))
            .spawn(move || run_engine(ring, fd, depth as usize, &thread_engine))
            .map_err(open_err)?;
        Ok(Self {
            engine,
            thread: Some(thread),
            file,
            path,
            size,
            align,
            read_only: opts.read_only,
            block_device,
            inline: (!opts.direct).then(|| InlinePath {
                nowait_writes: AtomicBool::new(true),
            }),
            lock,
        })
    }

    /// Read from the page cache without blocking, if everything is there.
    fn read_inline(&self, offset: u64, buf: &mut IoBuf) -> Option<io::Result<()>> {
        self.inline.as_ref()?;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec covers `buf`, which we borrow mutably for the duration of the call.
        let n = unsafe {
            libc::preadv2(
                self.file.as_raw_fd(),
                &iov,
                1,
                offset as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n == buf.len() as isize {
            return Some(Ok(()));
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINTR)
            ) {
                return Some(Err(e));
            }
        }
        // Partly cached, or would block: the ring does the whole request.
        None
    }

    /// Write into the page cache on this thread when that cannot stall it for long.
    fn write_inline(&self, offset: u64, buf: &IoBuf, fua: bool) -> Option<io::Result<()>> {
        let inline = self.inline.as_ref()?;
        if fua {
            return None;
        }
        let fd = self.file.as_raw_fd();
        let write = |at: usize, flags: libc::c_int| {
            let iov = libc::iovec {
                iov_base: buf[at..].as_ptr() as *mut libc::c_void,
                iov_len: buf.len() - at,
            };
            // SAFETY: the iovec covers the unwritten tail of `buf`, which we borrow for the call;
            // the kernel only reads from it.
            unsafe { libc::pwritev2(fd, &iov, 1, (offset + at as u64) as libc::off_t, flags) }
        };
        if inline.nowait_writes.load(Ordering::Relaxed) {
            let n = write(0, libc::RWF_NOWAIT);
            if n == buf.len() as isize {
                return Some(Ok(()));
            }
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EOPNOTSUPP) if n < 0 => {
                    inline.nowait_writes.store(false, Ordering::Relaxed)
                }
                _ if n < 0 => return None,
                // A short non-blocking write: let the ring finish the request (rewriting the
                // same bytes is harmless).
                _ => return None,
            }
        }
        let mut done = 0;
        while done < buf.len() {
            match write(done, 0) {
                n if n > 0 => done += n as usize,
                0 => {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "short write: the disk ended early",
                    )))
                }
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Some(Err(e));
                    }
                }
            }
        }
        Some(Ok(()))
    }

    fn io_error(&self, op: Op, offset: u64, len: u64, source: io::Error) -> StorageError {
        StorageError::Io {
            op,
            path: self.path.clone(),
            offset,
            len,
            source,
        }
    }

    /// The path this disk was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The QEMU permissions this disk holds on its file (`None`: opened with `lock` off).
    pub fn lock_set(&self) -> Option<LockSet> {
        self.lock.as_ref().map(|l| l.set())
    }

    async fn call(&self, op: Op, offset: u64, len: u64, work: Work) -> Result<Option<IoBuf>> {
        let (tx, rx) = oneshot::channel();
        let stopped = || StorageError::EngineStopped {
            path: self.path.clone(),
        };
        self.engine
            .submit(Request {
                work,
                offset,
                reply: tx,
            })
            .map_err(|_| stopped())?;
        match rx.await {
            Ok(Ok(buf)) => Ok(buf),
            Ok(Err(source)) => Err(StorageError::Io {
                op,
                path: self.path.clone(),
                offset,
                len,
                source,
            }),
            Err(_) => Err(stopped()),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        Ok(())
    }

    /// Zero a range: deallocate when allowed, else zero in place, else write zero buffers.
    async fn zero_range(&self, op: Op, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_range(op, offset, len, self.size, self.align)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let unsupported = |e: &StorageError| matches!(e, StorageError::Io { source, .. } if source.raw_os_error() == Some(libc::EOPNOTSUPP));
        // Deallocate if allowed, else zero in place (files only); each may be unsupported.
        let modes = [
            (may_unmap, libc::FALLOC_FL_PUNCH_HOLE),
            (!self.block_device, libc::FALLOC_FL_ZERO_RANGE),
        ];
        for (_, mode) in modes.into_iter().filter(|(wanted, _)| *wanted) {
            let mode = mode | libc::FALLOC_FL_KEEP_SIZE;
            match self
                .call(op, offset, len, Work::Fallocate { len, mode })
                .await
            {
                Err(e) if unsupported(&e) => {}
                r => return r.map(drop),
            }
        }
        const CHUNK: u64 = 1 << 20;
        let mut at = offset;
        while at < offset + len {
            let n = CHUNK.min(offset + len - at);
            self.call(
                op,
                at,
                n,
                Work::Write {
                    buf: IoBuf::zeroed(n as usize),
                    fua: false,
                },
            )
            .await?;
            at += n;
        }
        Ok(())
    }
}

impl Drop for UringFile {
    fn drop(&mut self) {
        self.engine.queue.locked().stopping = true;
        self.engine.awake.store(false, Ordering::SeqCst);
        self.engine.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Backend for UringFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn start_writeback(&self) {
        // O_DIRECT and block devices keep no page cache of ours worth pushing.
        if self.inline.is_none() || self.block_device {
            return;
        }
        // SAFETY: sync_file_range(2) on a descriptor this struct owns and keeps open; offset
        // 0 and length 0 mean "to the end of the file"; no memory is passed.
        unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }

    fn alignment(&self) -> u32 {
        self.align
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        Box::pin(async move {
            check_range(Op::Read, offset, len as u64, self.size, self.align)?;
            if len == 0 {
                return Ok(IoBuf::zeroed(0));
            }
            // SAFETY: handed only to the kernel, and returned only once a read filled all
            // of it: the inline read answers only when it read `len` bytes, the ring only
            // once the whole request was transferred (it retries short ones and fails at
            // EOF), and on an error the buffer is dropped.
            let mut buf = unsafe { IoBuf::for_read(len) };
            match self.read_inline(offset, &mut buf) {
                Some(Ok(())) => return Ok(buf),
                Some(Err(e)) => return Err(self.io_error(Op::Read, offset, len as u64, e)),
                None => {}
            }
            let out = self
                .call(Op::Read, offset, len as u64, Work::Read { buf })
                .await?;
            Ok(out.expect("engine returns the read buffer"))
        })
    }

    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            check_range(Op::Write, offset, len, self.size, self.align)?;
            self.check_writable()?;
            if len == 0 {
                return Ok(());
            }
            if let Some(r) = self.write_inline(offset, &data, fua) {
                return r.map_err(|e| self.io_error(Op::Write, offset, len, e));
            }
            self.call(Op::Write, offset, len, Work::Write { buf: data, fua })
                .await
                .map(drop)
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.read_only {
                return Ok(());
            }
            self.call(Op::Flush, 0, 0, Work::Fsync).await.map(drop)
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.zero_range(Op::Discard, offset, len, true))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.zero_range(Op::WriteZeroes, offset, len, may_unmap))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            check_range(Op::BlockStatus, offset, len, self.size, 1)?;
            if self.block_device || len == 0 {
                return Ok(vec![Extent {
                    len: len.max(1).min(self.size - offset),
                    hole: false,
                    zero: false,
                }]);
            }
            let fd = self.file.as_raw_fd();
            let end = offset + len;
            let seek = |whence: i32, at: u64| -> Option<u64> {
                // SAFETY: lseek on a descriptor we own; it touches no memory of ours.
                let r = unsafe { libc::lseek(fd, at as libc::off_t, whence) };
                (r >= 0).then_some(r as u64)
            };
            let mut out = Vec::new();
            let mut at = offset;
            while at < end && out.len() < 1024 {
                // SEEK_DATA fails with ENXIO past the last data: the rest is a hole.
                let data = seek(libc::SEEK_DATA, at).unwrap_or(self.size).min(end);
                if data > at {
                    out.push(Extent {
                        len: data - at,
                        hole: true,
                        zero: true,
                    });
                    at = data;
                    continue;
                }
                let hole = seek(libc::SEEK_HOLE, at).unwrap_or(self.size).min(end);
                if hole <= at {
                    // The file changed under us; report the rest as data.
                    out.push(Extent {
                        len: end - at,
                        hole: false,
                        zero: false,
                    });
                    break;
                }
                out.push(Extent {
                    len: hole - at,
                    hole: false,
                    zero: false,
                });
                at = hole;
            }
            Ok(out)
        })
    }
}
