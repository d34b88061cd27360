//! `IoBuf`: an owned, page-aligned byte buffer that can be handed to the kernel.
//!
//! io_uring needs a buffer that stays put until the completion arrives, and O_DIRECT needs it
//! aligned to the device's logical block size. `IoBuf` is both: heap memory aligned to
//! [`IO_ALIGN`], with a movable window (`start..start+len`) so that a read-modify-write can
//! return a sub-range without copying. A buffer is written only while it has one holder;
//! [`IoBuf::share`] gives a second, read-only handle to the same bytes (the primary writes a
//! client's payload to its disk and forwards it to the secondary from one buffer).

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

/// Alignment of every `IoBuf` allocation; enough for O_DIRECT on any common device.
pub const IO_ALIGN: usize = 4096;

/// An aligned, fixed-capacity byte buffer.
pub struct IoBuf {
    mem: Arc<Alloc>,
    start: usize,
    len: usize,
}

/// The allocation behind one or more [`IoBuf`] handles.
struct Alloc {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: the allocation is plain memory; it is written only through a handle that is its
// only holder (`IoBuf::as_mut_ptr` checks), and read through any number of handles.
unsafe impl Send for Alloc {}
// SAFETY: as above: concurrent access is read-only.
unsafe impl Sync for Alloc {}

impl Drop for Alloc {
    fn drop(&mut self) {
        if self.cap != 0 {
            let layout = Layout::from_size_align(self.cap, IO_ALIGN).expect("IoBuf layout");
            // SAFETY: allocated in `IoBuf::alloc` with this very layout, freed exactly once
            // (when the last handle goes).
            unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) }
        }
    }
}

impl IoBuf {
    /// An allocation of `len` bytes, zero-filled or not.
    ///
    /// # Safety
    /// With `zero` false the bytes are uninitialised: the caller must write all `len` of
    /// them through raw pointers before the buffer is read, dereferenced or handed out.
    unsafe fn alloc(len: usize, zero: bool) -> Self {
        if len == 0 {
            return Self {
                mem: Arc::new(Alloc {
                    ptr: NonNull::dangling(),
                    cap: 0,
                }),
                start: 0,
                len: 0,
            };
        }
        let cap = len.div_ceil(IO_ALIGN) * IO_ALIGN;
        let layout = Layout::from_size_align(cap, IO_ALIGN).expect("IoBuf layout");
        // SAFETY: layout has non-zero size (cap >= IO_ALIGN).
        let raw = unsafe {
            if zero {
                alloc::alloc_zeroed(layout)
            } else {
                alloc::alloc(layout)
            }
        };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        if !zero && cap > len {
            // The padding past the window is never exposed; zero it anyway, so that no
            // path can ever see stale heap bytes.
            // SAFETY: len..cap lies inside the allocation just made.
            unsafe { std::ptr::write_bytes(raw.add(len), 0, cap - len) };
        }
        Self {
            mem: Arc::new(Alloc { ptr, cap }),
            start: 0,
            len,
        }
    }

    /// A second handle to the same bytes, without copying them. Neither handle can be
    /// written through while both exist ([`IoBuf::as_mut_ptr`] panics).
    pub fn share(&self) -> Self {
        Self {
            mem: self.mem.clone(),
            start: self.start,
            len: self.len,
        }
    }

    /// A zero-filled buffer of `len` bytes.
    pub fn zeroed(len: usize) -> Self {
        // SAFETY: zero-filled: every byte is initialised.
        unsafe { Self::alloc(len, true) }
    }

    /// A buffer of `len` bytes for the kernel to fill (a read), not zero-filled first.
    ///
    /// # Safety
    /// The caller must have every one of the `len` bytes written (by the kernel, through
    /// [`IoBuf::as_mut_ptr`]) before the contents are read or the buffer leaves its hands,
    /// and drop it otherwise.
    pub(crate) unsafe fn for_read(len: usize) -> Self {
        // SAFETY: the caller's obligation above.
        unsafe { Self::alloc(len, false) }
    }

    /// A buffer holding a copy of `data` (written once, not zero-filled first).
    pub fn from_slice(data: &[u8]) -> Self {
        // SAFETY: every one of the `len` bytes is written by the copy below before the
        // buffer is returned; the source cannot overlap a fresh allocation.
        unsafe {
            let mut b = Self::alloc(data.len(), false);
            if !data.is_empty() {
                std::ptr::copy_nonoverlapping(data.as_ptr(), b.as_mut_ptr(), data.len());
            }
            b
        }
    }

    /// Exactly `len` bytes read from `rd` (an NBD write's payload), received straight into
    /// the buffer without zero-filling it first. An error (or EOF) before `len` bytes
    /// drops the partial buffer.
    pub async fn read_from<R>(rd: &mut R, len: usize) -> std::io::Result<Self>
    where
        R: tokio::io::AsyncRead + Unpin + ?Sized,
    {
        use tokio::io::AsyncReadExt;
        // SAFETY: `Fill` writes only through `chunk_mut`'s raw window and the buffer is
        // returned only once all `len` bytes were written (`filled == len`).
        let buf = unsafe { Self::alloc(len, false) };
        let mut fill = Fill { buf, filled: 0 };
        while fill.filled < len {
            if rd.read_buf(&mut fill).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(fill.buf)
    }

    /// Number of visible bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the window is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Narrow the visible window to `offset..offset+len` of the current window, without copying.
    ///
    /// # Panics
    /// If the new window does not lie inside the current one.
    pub fn narrow(&mut self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "IoBuf::narrow out of range"
        );
        self.start += offset;
        self.len = len;
    }

    /// Pointer to the first visible byte, for handing to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        // SAFETY: start <= cap, so the result stays inside (or one past) the allocation.
        unsafe { self.mem.ptr.as_ptr().add(self.start) }
    }

    /// Mutable pointer to the first visible byte, for handing to the kernel.
    ///
    /// # Panics
    /// If another handle to the bytes exists ([`IoBuf::share`]): shared bytes are read-only.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        assert!(
            Arc::get_mut(&mut self.mem).is_some(),
            "IoBuf: writing to a buffer that is shared"
        );
        // SAFETY: as in `as_ptr`; this handle is the allocation's only holder.
        unsafe { self.mem.ptr.as_ptr().add(self.start) }
    }
}

/// An [`IoBuf`] being received into: `filled` bytes of it are initialised.
struct Fill {
    buf: IoBuf,
    filled: usize,
}

// SAFETY: `chunk_mut` hands out exactly the unfilled part of the allocation, and
// `advance_mut` only counts bytes the reader reported as written there.
unsafe impl bytes::BufMut for Fill {
    fn remaining_mut(&self) -> usize {
        self.buf.len - self.filled
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.remaining_mut(), "advanced past the buffer");
        self.filled += cnt;
    }

    fn chunk_mut(&mut self) -> &mut bytes::buf::UninitSlice {
        let rest = self.buf.len - self.filled;
        // SAFETY: filled..len lies inside the allocation; UninitSlice never reads it.
        unsafe {
            bytes::buf::UninitSlice::from_raw_parts_mut(
                self.buf.as_mut_ptr().add(self.filled),
                rest,
            )
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: start+len <= cap, the memory is initialised (every constructor writes it)
        // and kept alive by this handle; it is written only through an unshared handle, so
        // nothing writes it while this borrow lasts.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        let len = self.len;
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> Self {
        Self::from_slice(self)
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len)
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// Keep large I/O buffers (up to 64 MiB) in the heap instead of a fresh mapping per
/// allocation: glibc would otherwise map, fault in, zero and unmap every 1 MiB payload
/// buffer. Call once at daemon start.
pub fn keep_large_buffers_in_heap() {
    // SAFETY: mallopt only changes allocator thresholds; it takes plain integers and is safe
    // to call at any time (glibc serialises it with the arena locks).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_is_read_only_until_it_is_alone() {
        let mut a = IoBuf::from_slice(&[5; 5000]);
        let b = a.share();
        assert_eq!(a.as_ptr(), b.as_ptr(), "no copy");
        assert_eq!(&b[..], &[5; 5000][..]);
        let write = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a[0] = 1;
        }));
        assert!(write.is_err(), "writing a shared buffer must panic");
        drop(b);
        a[0] = 1;
        assert_eq!(a[0], 1);
        // A clone is a copy, never a share.
        let mut c = a.clone();
        c[1] = 2;
        assert_eq!(a[1], 5);
    }

    #[test]
    fn aligned_and_zeroed() {
        let b = IoBuf::zeroed(5000);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(b.len(), 5000);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn narrow_is_a_window() {
        let mut b = IoBuf::from_slice(&[1, 2, 3, 4, 5]);
        b.narrow(1, 3);
        assert_eq!(&*b, &[2, 3, 4]);
        b.narrow(2, 1);
        assert_eq!(&*b, &[4]);
        let empty = IoBuf::zeroed(0);
        assert!(empty.is_empty());
    }

    #[test]
    fn read_from_fills_exactly_from_partial_reads_and_refuses_a_short_stream() {
        crate::test_runtime().block_on(async {
            let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
            // A reader that returns at most 7 bytes at a time.
            let (mut a, mut b) = tokio::io::duplex(7);
            let d = data.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                a.write_all(&d).await.unwrap();
            });
            let buf = IoBuf::read_from(&mut b, 9_000).await.unwrap();
            assert_eq!(&buf[..], &data[..9_000]);
            let e = IoBuf::read_from(&mut b, 2_000).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
            let empty = IoBuf::read_from(&mut b, 0).await.unwrap();
            assert!(empty.is_empty());
            let c = IoBuf::from_slice(&data[..5]);
            assert_eq!(&c[..], &data[..5]);
            assert_eq!(IoBuf::from_slice(&[]).len(), 0);
        });
    }
}
