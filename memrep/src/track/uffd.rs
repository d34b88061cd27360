//! The uffd tracker: userfaultfd asynchronous write-protect + `PAGEMAP_SCAN`.
//!
//! Setup (done by [`UffdTracker::register_self`] for this process, or by the writer with
//! [`crate::handoff::WriterRegistration::register`]): a userfaultfd with the features
//! `UFFD_FEATURE_WP_ASYNC` (the kernel resolves write-protect faults itself, marking the page
//! written, without a handler thread), `UFFD_FEATURE_WP_UNPOPULATED` (pages not yet populated are
//! protected too) and `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (the feature that announces
//! write-protect support for shmem and hugetlbfs mappings, which is what regions are; 6.18
//! registers shmem without it, but it has existed since 5.19, so asking costs nothing);
//! `UFFDIO_REGISTER` in `UFFDIO_REGISTER_MODE_WP` over the mapping; `UFFDIO_WRITEPROTECT` over
//! it, so nothing counts as written yet.
//!
//! With a hand-over, the tracker scans the *writer's* addresses; the caller maps the same file
//! itself (`Region::open(&handover.path)`) to read pages, and `collect` checks that its length
//! equals the handed-over range.
//!
//! Collect: `ioctl(pagemap_fd, PAGEMAP_SCAN)` with `PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`
//! and `category_mask = return_mask = PAGE_IS_WRITTEN` returns the written ranges and
//! write-protects them again in the same page-table walk, so a write that lands after the scan
//! passed a page marks it written for the next collect. The scan resumes from `walk_end` until
//! the whole range is covered. On hugetlbfs ranges come in huge-page units; they are reported as
//! the 4 KiB page indices they cover.
//!
//! The ABI below is defined here (the build host's headers may predate it) from the kernel's
//! `include/uapi/linux/userfaultfd.h` and `include/uapi/linux/fs.h` (Linux 6.7+). Note that
//! `PAGE_IS_WRITTEN` is bit 1 (bit 5 is `PAGE_IS_PFNZERO`); the tests check the values by
//! behaviour.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use roaring::RoaringTreemap;

use super::{CollectStats, TrackError, Tracker, TrackerKind};
use crate::digest::PageTable;
use crate::handoff::Handover;
use crate::region::Region;
use crate::PAGE_SIZE;

/// Kernel ABI: ioctl numbers, flags and structures.
#[allow(unsafe_code)]
pub(crate) mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const fn iowr(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
        // _IOC(_IOC_READ|_IOC_WRITE, type, nr, size) for x86/arm/riscv: dir in bits 30-31,
        // size in bits 16-29, type in bits 8-15, number in bits 0-7.
        ((3 << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32) as libc::c_ulong
    }

    pub const UFFD_API: u64 = 0xAA;
    pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
    pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct UffdioWriteprotect {
        pub range: UffdioRange,
        pub mode: u64,
    }

    pub const UFFDIO_API: libc::c_ulong = iowr(0xAA, 0x3F, size_of::<UffdioApi>());
    pub const UFFDIO_REGISTER: libc::c_ulong = iowr(0xAA, 0x00, size_of::<UffdioRegister>());
    pub const UFFDIO_WRITEPROTECT: libc::c_ulong =
        iowr(0xAA, 0x06, size_of::<UffdioWriteprotect>());

    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }
    #[repr(C)]
    #[derive(Debug, Default)]
    pub struct PmScanArg {
        pub size: u64,
        pub flags: u64,
        pub start: u64,
        pub end: u64,
        pub walk_end: u64,
        pub vec: u64,
        pub vec_len: u64,
        pub max_pages: u64,
        pub category_inverted: u64,
        pub category_mask: u64,
        pub category_anyof_mask: u64,
        pub return_mask: u64,
    }
    pub const PAGEMAP_SCAN: libc::c_ulong = iowr(b'f', 16, size_of::<PmScanArg>());

    // The values the kernel headers give (checked by hand against include/uapi):
    const _: () = assert!(size_of::<PmScanArg>() == 96);
    const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);
    const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
    const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
    const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);

    /// `ioctl(fd, req, arg)` with a pointer to a `repr(C)` struct; the result or errno.
    ///
    /// # Safety
    /// `T` must be the structure the kernel expects for `req`.
    pub unsafe fn ioctl<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T) -> io::Result<i64> {
        // SAFETY: `arg` is a valid, exclusive pointer to a `T` for the call; the caller
        // guarantees `T` matches `req`, so the kernel reads/writes only within it.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(i64::from(r))
        }
    }

    /// `userfaultfd(O_CLOEXEC | O_NONBLOCK)`, retrying with `UFFD_USER_MODE_ONLY` when the
    /// kernel allows only that to this user.
    pub fn userfaultfd() -> io::Result<OwnedFd> {
        let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
        for flags in [base, base | UFFD_USER_MODE_ONLY] {
            // SAFETY: the userfaultfd syscall takes only flags and returns a new descriptor.
            let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if r >= 0 {
                // SAFETY: `r` is a fresh descriptor that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(r as i32) });
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EPERM) || flags != base {
                return Err(e);
            }
        }
        unreachable!("the loop returns")
    }

    /// Features this kernel offers (UFFDIO_API with none requested on a throwaway uffd).
    pub fn available_features() -> io::Result<u64> {
        let fd = userfaultfd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
        unsafe { ioctl(&fd, UFFDIO_API, &mut api) }?;
        Ok(api.features)
    }
}

/// The features memrep requests.
const FEATURES: [(u64, &str); 3] = [
    (sys::UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
    (
        sys::UFFD_FEATURE_WP_UNPOPULATED,
        "UFFD_FEATURE_WP_UNPOPULATED",
    ),
    (
        sys::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    ),
];

fn sys_err(what: &'static str) -> impl FnOnce(io::Error) -> TrackError {
    move |source| TrackError::Sys { what, source }
}

/// Create a userfaultfd with the async write-protect features, register `addr..addr+len` in
/// write-protect mode and write-protect it all. Shared with the writer side of the hand-over.
#[allow(unsafe_code)]
pub(crate) fn arm(addr: *mut u8, len: usize) -> Result<OwnedFd, TrackError> {
    if addr as usize % PAGE_SIZE != 0 || len == 0 || len % PAGE_SIZE != 0 {
        return Err(TrackError::Mismatch(format!(
            "range {addr:p}+{len} is not a non-empty page-aligned range"
        )));
    }
    let uffd = sys::userfaultfd().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => TrackError::Unsupported("kernel has no userfaultfd".into()),
        Some(libc::EPERM) => TrackError::Unsupported(format!(
            "userfaultfd not permitted ({e}; see /proc/sys/vm/unprivileged_userfaultfd)"
        )),
        _ => TrackError::Sys {
            what: "userfaultfd",
            source: e,
        },
    })?;
    let wanted: u64 = FEATURES.iter().map(|f| f.0).sum();
    let mut api = sys::UffdioApi {
        api: sys::UFFD_API,
        features: wanted,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
    if let Err(e) = unsafe { sys::ioctl(&uffd, sys::UFFDIO_API, &mut api) } {
        let have = sys::available_features().unwrap_or(0);
        let missing: Vec<&str> = FEATURES
            .iter()
            .filter(|f| have & f.0 == 0)
            .map(|f| f.1)
            .collect();
        return Err(if missing.is_empty() {
            TrackError::Sys {
                what: "UFFDIO_API",
                source: e,
            }
        } else {
            TrackError::Unsupported(format!("kernel lacks {}", missing.join(", ")))
        });
    }
    if api.features & wanted != wanted {
        let missing: Vec<&str> = FEATURES
            .iter()
            .filter(|f| api.features & f.0 == 0)
            .map(|f| f.1)
            .collect();
        return Err(TrackError::Unsupported(format!(
            "kernel lacks {}",
            missing.join(", ")
        )));
    }
    let range = sys::UffdioRange {
        start: addr as u64,
        len: len as u64,
    };
    let mut reg = sys::UffdioRegister {
        range,
        mode: sys::UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`; registering only changes how
    // faults in this range are handled (asynchronously, by the kernel).
    unsafe { sys::ioctl(&uffd, sys::UFFDIO_REGISTER, &mut reg) }
        .map_err(sys_err("UFFDIO_REGISTER (mode WP)"))?;
    let mut wp = sys::UffdioWriteprotect {
        range,
        mode: sys::UFFDIO_WRITEPROTECT_MODE_WP,
    };
    // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
    unsafe { sys::ioctl(&uffd, sys::UFFDIO_WRITEPROTECT, &mut wp) }
        .map_err(sys_err("UFFDIO_WRITEPROTECT"))?;
    Ok(uffd)
}

/// Tracks writes to a range registered with a userfaultfd in async write-protect mode.
#[derive(Debug)]
pub struct UffdTracker {
    /// Kept open: closing the last reference to the uffd would unregister the range.
    _uffd: OwnedFd,
    pagemap: File,
    /// Writer's address range, in its own address space.
    start: u64,
    len: u64,
    /// The writer process, when it is another one (hand-over), to notice its exit.
    writer: Option<(u32, OwnedFd)>,
    buf: Vec<sys::PageRegion>,
}

impl UffdTracker {
    /// Track writes made in this process through `region.as_ptr()`.
    pub fn register_self(region: &Region) -> Result<UffdTracker, TrackError> {
        let uffd = arm(region.as_ptr(), region.len() as usize)?;
        let pagemap =
            File::open("/proc/self/pagemap").map_err(sys_err("open /proc/self/pagemap"))?;
        Ok(UffdTracker::new(
            uffd,
            pagemap,
            region.as_ptr() as u64,
            region.len(),
            None,
        ))
    }

    /// Track a writer process's range with the descriptors it handed over.
    #[allow(unsafe_code)]
    pub fn from_handover(h: Handover) -> Result<UffdTracker, TrackError> {
        if h.addr % PAGE_SIZE as u64 != 0 || h.len == 0 || h.len % PAGE_SIZE as u64 != 0 {
            return Err(TrackError::Mismatch(format!(
                "hand-over range {:#x}+{} is not page aligned",
                h.addr, h.len
            )));
        }
        // A pidfd notices the writer's exit; opened now, while it waits for our answer, so the
        // pid cannot have been reused yet.
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let r = unsafe { libc::syscall(libc::SYS_pidfd_open, h.pid as libc::pid_t, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::ESRCH) {
                TrackError::WriterGone { pid: h.pid }
            } else {
                TrackError::Sys {
                    what: "pidfd_open",
                    source: e,
                }
            });
        }
        // SAFETY: `r` is a fresh descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        Ok(UffdTracker::new(
            h.uffd,
            File::from(h.pagemap),
            h.addr,
            h.len,
            Some((h.pid, pidfd)),
        ))
    }

    fn new(
        uffd: OwnedFd,
        pagemap: File,
        start: u64,
        len: u64,
        writer: Option<(u32, OwnedFd)>,
    ) -> UffdTracker {
        UffdTracker {
            _uffd: uffd,
            pagemap,
            start,
            len,
            writer,
            buf: vec![sys::PageRegion::default(); 1024],
        }
    }

    #[allow(unsafe_code)]
    fn writer_exited(&self) -> bool {
        let Some((_, pidfd)) = &self.writer else {
            return false;
        };
        let mut p = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
    }

    fn gone(&self) -> TrackError {
        TrackError::WriterGone {
            pid: self.writer.as_ref().map_or(std::process::id(), |w| w.0),
        }
    }

    /// One `PAGEMAP_SCAN` from `start`; returns the filled regions' count and `walk_end`.
    #[allow(unsafe_code)]
    fn scan_once(&mut self, start: u64, end: u64) -> Result<(usize, u64), TrackError> {
        let mut arg = sys::PmScanArg {
            size: size_of::<sys::PmScanArg>() as u64,
            flags: sys::PM_SCAN_WP_MATCHING | sys::PM_SCAN_CHECK_WPASYNC,
            start,
            end,
            walk_end: 0,
            vec: self.buf.as_mut_ptr() as u64,
            vec_len: self.buf.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: sys::PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: sys::PAGE_IS_WRITTEN,
        };
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg`; `vec` points to `vec_len` writable
        // `struct page_region`s that stay alive (and unaliased: `&mut self`) during the call.
        let n =
            unsafe { sys::ioctl(&self.pagemap, sys::PAGEMAP_SCAN, &mut arg) }.map_err(
                |e| match e.raw_os_error() {
                    Some(libc::ESRCH) => self.gone(),
                    Some(libc::ENOTTY) | Some(libc::EINVAL) if start == self.start => {
                        TrackError::Unsupported(format!("PAGEMAP_SCAN: {e}"))
                    }
                    Some(libc::EPERM) => TrackError::Mismatch(format!(
                        "PAGEMAP_SCAN found pages of {:#x}+{} without async write-protect: {e}",
                        self.start, self.len
                    )),
                    _ => TrackError::Sys {
                        what: "PAGEMAP_SCAN",
                        source: e,
                    },
                },
            )?;
        Ok((n as usize, arg.walk_end))
    }
}

impl Tracker for UffdTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Uffd
    }

    fn collect(
        &mut self,
        region: &Region,
        _table: &PageTable,
        out: &mut RoaringTreemap,
    ) -> Result<CollectStats, TrackError> {
        let t0 = Instant::now();
        if region.len() != self.len {
            return Err(TrackError::Mismatch(format!(
                "region {} has {} bytes, tracked range {}",
                region.path().display(),
                region.len(),
                self.len
            )));
        }
        let end = self.start + self.len;
        let mut pos = self.start;
        let mut pages = 0;
        while pos < end {
            let (n, walk_end) = self.scan_once(pos, end)?;
            for r in &self.buf[..n] {
                pages += out.insert_range(page_indices(r.start, r.end, self.start, end));
            }
            if walk_end <= pos {
                return Err(TrackError::Mismatch(format!(
                    "PAGEMAP_SCAN made no progress at {pos:#x} (walk_end {walk_end:#x})"
                )));
            }
            pos = walk_end;
        }
        if self.writer_exited() {
            return Err(self.gone());
        }
        Ok(CollectStats {
            pages,
            elapsed: t0.elapsed(),
        })
    }
}

/// The 4 KiB page indices, relative to `base`, that the address range `start..end` reported by
/// `PAGEMAP_SCAN` covers, clipped to `base..limit`. Huge-page ranges (hugetlbfs: 2 MiB units)
/// become all the 4 KiB pages inside them; a partial page counts as a whole one.
fn page_indices(start: u64, end: u64, base: u64, limit: u64) -> std::ops::Range<u64> {
    let a = start.clamp(base, limit) - base;
    let b = end.clamp(base, limit) - base;
    a / PAGE_SIZE as u64..b.div_ceil(PAGE_SIZE as u64)
}

/// See [`super::probe_uffd`].
pub(crate) fn probe() -> Result<(), TrackError> {
    let path = std::path::PathBuf::from(format!(
        "/dev/shm/memrep-probe-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let result = (|| {
        let region = Region::create(&path, 16 * PAGE_SIZE as u64)?;
        let _ = std::fs::remove_file(&path);
        let table = PageTable::hash_region(&region, 1);
        let mut t = UffdTracker::register_self(&region)?;
        let mut out = RoaringTreemap::new();
        t.collect(&region, &table, &mut out)?;
        if !out.is_empty() {
            return Err(TrackError::Mismatch(format!(
                "fresh registration reports written pages {out:?}"
            )));
        }
        region.write_at(3 * PAGE_SIZE as u64 + 5, b"probe")?;
        t.collect(&region, &table, &mut out)?;
        if out.iter().collect::<Vec<_>>() != [3] {
            return Err(TrackError::Unsupported(format!(
                "PAGEMAP_SCAN reported {out:?} after a write to page 3"
            )));
        }
        out.clear();
        t.collect(&region, &table, &mut out)?;
        if !out.is_empty() {
            return Err(TrackError::Unsupported(format!(
                "PAGEMAP_SCAN did not write-protect again: {out:?}"
            )));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    result
}

#[cfg(test)]
mod tests {
    use super::page_indices;

    #[test]
    fn huge_page_ranges_become_4k_indices() {
        const M2: u64 = 2 << 20;
        let base = 0x7f00_0000_0000;
        let limit = base + 8 * M2;
        assert_eq!(page_indices(base, base + 4096, base, limit), 0..1);
        assert_eq!(
            page_indices(base + M2, base + 3 * M2, base, limit),
            512..1536
        );
        // Clipped to the tracked range on both sides.
        assert_eq!(page_indices(base - M2, base + M2, base, limit), 0..512);
        assert_eq!(
            page_indices(limit - M2, limit + M2, base, limit),
            3584..4096
        );
        // A partial page counts whole.
        assert_eq!(page_indices(base + 100, base + 4097, base, limit), 0..2);
    }
}
