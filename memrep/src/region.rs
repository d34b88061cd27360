//! A shared-memory region: a file (regular, `/dev/shm`, hugetlbfs) mapped `MAP_SHARED`.
//!
//! Other processes (a QEMU guest, a library writer) write the same file through their own
//! mappings while lockstep reads it, so this module never forms a Rust reference (`&[u8]`) over
//! the mapping: every access is a raw copy (`ptr::copy_nonoverlapping`) between the mapping and a
//! private buffer. A torn copy of a page being written is expected and harmless: dirty tracking
//! reports that page again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::ptr;

use crate::PAGE_SIZE;

/// Why a region could not be opened, mapped or accessed. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("{path}: cannot open: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path}: not a regular file")]
    NotRegular { path: PathBuf },
    #[error("{path}: size is 0")]
    Empty { path: PathBuf },
    #[error("{path}: size {} is not a multiple of the page size ({PAGE_SIZE} bytes)", blkrep::units::size(*.len))]
    Unaligned { path: PathBuf, len: u64 },
    #[error("{path}: has {}, expected {}", blkrep::units::size(*.actual), blkrep::units::size(*.expected))]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path}: cannot set size to {}: {source}", blkrep::units::size(*.len))]
    Resize {
        path: PathBuf,
        len: u64,
        source: io::Error,
    },
    #[error("{path}: mmap of {len} bytes failed: {source}")]
    Mmap {
        path: PathBuf,
        len: u64,
        source: io::Error,
    },
    #[error("{path}: the file was removed while mapped: nothing could map it after a failover")]
    Removed { path: PathBuf },
    #[error("{path}: fstat failed: {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error(
        "{path}: access of {len} bytes at offset {offset} is outside the region of {region} bytes"
    )]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        region: u64,
    },
}

/// A file mapped `MAP_SHARED` for reading and writing; unmapped on drop.
#[derive(Debug)]
pub struct Region {
    file: File,
    ptr: *mut u8,
    len: u64,
    path: PathBuf,
    /// The file takes no `write` (hugetlbfs): `store_page` writes through the mapping.
    map_writes: std::sync::atomic::AtomicBool,
}

// SAFETY: `Region` owns its mapping and file descriptor; the pointer is never used to form Rust
// references, only for raw byte copies (`read_page`, `write_page`, `read_at`, `write_at`) that
// tolerate concurrent writers by design (the memory is shared with other processes anyway).
// Moving the owner to another thread changes nothing about that.
#[allow(unsafe_code)]
unsafe impl Send for Region {}
// SAFETY: as above: every method taking `&self` does raw copies only, so concurrent use from
// several threads is no different from concurrent use by several processes, which the mapping
// already allows. No method hands out a reference into the mapping.
#[allow(unsafe_code)]
unsafe impl Sync for Region {}

impl Region {
    /// Map an existing file (regular file, `/dev/shm`, hugetlbfs) of a non-zero size that is a
    /// multiple of [`PAGE_SIZE`].
    pub fn open(path: &Path) -> Result<Region, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| RegionError::Open {
                path: path.to_owned(),
                source,
            })?;
        let len = check_file(&file, path)?;
        Self::map(file, path, len)
    }

    /// Create a file of `len` bytes and map it, or open an existing one, which must have exactly
    /// `len` bytes.
    pub fn create(path: &Path, len: u64) -> Result<Region, RegionError> {
        check_len(path, len)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|source| RegionError::Open {
                path: path.to_owned(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| RegionError::Stat {
            path: path.to_owned(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(RegionError::NotRegular {
                path: path.to_owned(),
            });
        }
        if meta.len() == 0 {
            file.set_len(len).map_err(|source| RegionError::Resize {
                path: path.to_owned(),
                len,
                source,
            })?;
        }
        let actual = check_file(&file, path)?;
        if actual != len {
            return Err(RegionError::SizeMismatch {
                path: path.to_owned(),
                expected: len,
                actual,
            });
        }
        Self::map(file, path, len)
    }

    #[allow(unsafe_code)]
    fn map(file: File, path: &Path, len: u64) -> Result<Region, RegionError> {
        let mmap_err = |source| RegionError::Mmap {
            path: path.to_owned(),
            len,
            source,
        };
        let size = usize::try_from(len)
            .map_err(|_| mmap_err(io::Error::from_raw_os_error(libc::ENOMEM)))?;
        // SAFETY: a fresh mapping at an address the kernel chooses (no existing memory is
        // replaced); the fd is valid for the duration of the call; the result is checked.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(mmap_err(io::Error::last_os_error()));
        }
        Ok(Region {
            file,
            ptr: p.cast(),
            len,
            path: path.to_owned(),
            map_writes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false: a region has at least one page. (For clippy's `len_without_is_empty`.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of [`PAGE_SIZE`] pages.
    pub fn pages(&self) -> u64 {
        self.len / PAGE_SIZE as u64
    }

    /// The file this region maps.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing file (for `fstat`, `lseek(SEEK_DATA)`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Start of the mapping. Writers in this process may write through it (the uffd tracker
    /// registered with [`crate::track::uffd::UffdTracker::register_self`] sees those writes);
    /// never turn it into a reference.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Read page `i` through the file (`pread`), not the mapping: a file cut short since it
    /// was mapped yields zeros past its end instead of a SIGBUS. What lockstep itself reads
    /// (to send, to hash) goes this way; the file and the mapping share their pages.
    pub fn load_page(&self, i: u64, dst: &mut [u8; PAGE_SIZE]) {
        use std::os::unix::fs::FileExt;
        assert!(
            i < self.pages(),
            "page {i} out of range ({} pages)",
            self.pages()
        );
        let mut done = 0;
        while done < PAGE_SIZE {
            match self
                .file
                .read_at(&mut dst[done..], i * PAGE_SIZE as u64 + done as u64)
            {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        dst[done..].fill(0);
    }

    /// Write page `i` through the file (`pwrite`), not the mapping (the secondary applying a
    /// checkpoint): a file cut short since is extended rather than faulting. Files that take
    /// no `write` (hugetlbfs answers EINVAL) are written through the mapping instead, after a
    /// size check.
    pub fn store_page(&self, i: u64, src: &[u8; PAGE_SIZE]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        assert!(
            i < self.pages(),
            "page {i} out of range ({} pages)",
            self.pages()
        );
        if !self.map_writes.load(Ordering::Relaxed) {
            match self.file.write_all_at(src, i * PAGE_SIZE as u64) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.map_writes.store(true, Ordering::Relaxed)
                }
                r => return r,
            }
        }
        self.check().map_err(io::Error::other)?;
        self.copy_in(i * PAGE_SIZE as u64, src);
        Ok(())
    }

    /// Copy page `i` into `dst`. A concurrent writer may tear the copy; tracking reports the page
    /// again. Panics if `i` is out of range.
    pub fn read_page(&self, i: u64, dst: &mut [u8; PAGE_SIZE]) {
        assert!(
            i < self.pages(),
            "page {i} out of range ({} pages)",
            self.pages()
        );
        self.copy_out(i * PAGE_SIZE as u64, dst);
    }

    /// Copy `src` into page `i`. Panics if `i` is out of range.
    pub fn write_page(&self, i: u64, src: &[u8; PAGE_SIZE]) {
        assert!(
            i < self.pages(),
            "page {i} out of range ({} pages)",
            self.pages()
        );
        self.copy_in(i * PAGE_SIZE as u64, src);
    }

    /// Copy `data` to byte `offset`; an error if it does not fit.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RegionError> {
        self.bounds(offset, data.len())?;
        self.copy_in(offset, data);
        Ok(())
    }

    /// Copy bytes from `offset` into `dst`; an error if the range does not fit.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<(), RegionError> {
        self.bounds(offset, dst.len())?;
        self.copy_out(offset, dst);
        Ok(())
    }

    fn bounds(&self, offset: u64, len: usize) -> Result<(), RegionError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RegionError::OutOfRange {
                path: self.path.clone(),
                offset,
                len: len as u64,
                region: self.len,
            }),
        }
    }

    #[allow(unsafe_code)]
    fn copy_out(&self, offset: u64, dst: &mut [u8]) {
        debug_assert!(offset + dst.len() as u64 <= self.len);
        // SAFETY: the caller checked `offset + dst.len() <= len`, so the source lies inside the
        // live mapping; `dst` is a private buffer that cannot overlap a mapping we own. The
        // mapping may be written concurrently: we copy raw bytes and never form a reference.
        unsafe {
            ptr::copy_nonoverlapping(self.ptr.add(offset as usize), dst.as_mut_ptr(), dst.len());
        }
    }

    #[allow(unsafe_code)]
    fn copy_in(&self, offset: u64, src: &[u8]) {
        debug_assert!(offset + src.len() as u64 <= self.len);
        // SAFETY: as in `copy_out`, with the destination inside the mapping and the source a
        // private buffer.
        unsafe {
            ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset as usize), src.len());
        }
    }

    /// Is the backing file still a regular file of `len` bytes? Touching a mapping beyond a
    /// truncated file's end raises SIGBUS, so callers check before a long pass.
    pub fn check(&self) -> Result<(), RegionError> {
        let actual = check_file(&self.file, &self.path)?;
        if actual != self.len {
            return Err(RegionError::SizeMismatch {
                path: self.path.clone(),
                expected: self.len,
                actual,
            });
        }
        Ok(())
    }

    /// [`Region::check`], and the file still has a name: a copy that must outlive this
    /// process (the secondary's, mapped by whatever takes over after a failover) is useless
    /// once unlinked.
    pub fn check_linked(&self) -> Result<(), RegionError> {
        self.check()?;
        if self.file.metadata().map(|m| m.nlink()).unwrap_or(0) == 0 {
            return Err(RegionError::Removed {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    /// `msync(MS_SYNC)` the whole mapping.
    #[allow(unsafe_code)]
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len as usize, libc::MS_SYNC) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Page ranges `[start, end)` that hold data according to `lseek(SEEK_DATA/SEEK_HOLE)`;
    /// pages outside them are holes, which read as zeros. If the file system does not report
    /// holes, the whole region is one range.
    pub fn data_pages(&self) -> Vec<std::ops::Range<u64>> {
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: u64 = 0;
        while pos < self.len {
            let Some(data) = seek(fd, pos, libc::SEEK_DATA) else {
                // ENXIO: no data after pos. Any other error: be safe, report everything left.
                if io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                    out.push(pos / PAGE_SIZE as u64..self.pages());
                }
                break;
            };
            if data >= self.len {
                break;
            }
            let hole = seek(fd, data, libc::SEEK_HOLE)
                .unwrap_or(self.len)
                .min(self.len);
            let start = data / PAGE_SIZE as u64;
            let end = hole.div_ceil(PAGE_SIZE as u64);
            if hole <= data {
                out.push(start..self.pages());
                break;
            }
            out.push(start..end);
            pos = end * PAGE_SIZE as u64;
        }
        out
    }
}

#[allow(unsafe_code)]
fn seek(fd: i32, pos: u64, whence: i32) -> Option<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

fn check_file(file: &File, path: &Path) -> Result<u64, RegionError> {
    let meta = file.metadata().map_err(|source| RegionError::Stat {
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if !ft.is_file() || ft.is_block_device() || ft.is_char_device() {
        return Err(RegionError::NotRegular {
            path: path.to_owned(),
        });
    }
    let len = meta.size();
    check_len(path, len)?;
    Ok(len)
}

/// A region's size: not 0, and whole pages.
fn check_len(path: &Path, len: u64) -> Result<(), RegionError> {
    if len == 0 {
        return Err(RegionError::Empty {
            path: path.to_owned(),
        });
    }
    if len % PAGE_SIZE as u64 != 0 {
        return Err(RegionError::Unaligned {
            path: path.to_owned(),
            len,
        });
    }
    Ok(())
}

impl Drop for Region {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value created; no references into it exist
        // (none are ever handed out) and after drop nothing uses `ptr`.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::ShmFile;

    #[test]
    fn open_errors_name_the_path() {
        let missing = ShmFile::new("missing");
        let e = Region::open(missing.path()).unwrap_err();
        assert!(matches!(e, RegionError::Open { .. }), "{e}");
        assert!(e.to_string().contains(&*missing.path().to_string_lossy()));

        let f = ShmFile::new("empty");
        std::fs::write(f.path(), b"").unwrap();
        let e = Region::open(f.path()).unwrap_err();
        assert!(matches!(e, RegionError::Empty { .. }), "{e}");
        assert!(e.to_string().contains(&*f.path().to_string_lossy()));

        std::fs::write(f.path(), [1u8; 100]).unwrap();
        let e = Region::open(f.path()).unwrap_err();
        assert!(matches!(e, RegionError::Unaligned { len: 100, .. }), "{e}");

        let e = Region::open(Path::new("/dev/shm")).unwrap_err();
        assert!(
            matches!(e, RegionError::Open { .. } | RegionError::NotRegular { .. }),
            "{e}"
        );
        let e = Region::open(Path::new("/dev/null")).unwrap_err();
        assert!(matches!(e, RegionError::NotRegular { .. }), "{e}");
    }

    #[test]
    fn create_read_write_check() {
        let f = ShmFile::new("rw");
        let r = Region::create(f.path(), 4 * PAGE_SIZE as u64).unwrap();
        assert_eq!(r.pages(), 4);
        assert_eq!(r.len(), 16384);
        assert_eq!(r.path(), f.path());
        let mut page = [7u8; PAGE_SIZE];
        r.write_page(2, &page);
        page = [0; PAGE_SIZE];
        r.read_page(2, &mut page);
        assert!(page.iter().all(|&b| b == 7));
        r.write_at(10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        r.read_at(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(matches!(
            r.write_at(16380, b"hello"),
            Err(RegionError::OutOfRange { .. })
        ));
        assert!(r.read_at(u64::MAX, &mut buf).is_err());
        r.check().unwrap();
        r.sync().unwrap();

        // Same size: reopens; other size: refused.
        let again = Region::create(f.path(), 4 * PAGE_SIZE as u64).unwrap();
        again.read_at(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let e = Region::create(f.path(), 8 * PAGE_SIZE as u64).unwrap_err();
        assert!(matches!(e, RegionError::SizeMismatch { .. }), "{e}");

        // Truncation is noticed.
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap()
            .set_len(PAGE_SIZE as u64)
            .unwrap();
        let e = r.check().unwrap_err();
        assert!(
            matches!(e, RegionError::SizeMismatch { actual: 4096, .. }),
            "{e}"
        );
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn read_page_out_of_range_panics() {
        let f = ShmFile::new("oor");
        let r = Region::create(f.path(), PAGE_SIZE as u64).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        r.read_page(1, &mut page);
    }

    #[test]
    fn data_pages_sees_holes() {
        let f = ShmFile::new("holes");
        let r = Region::create(f.path(), 1024 * PAGE_SIZE as u64).unwrap();
        assert!(r.data_pages().is_empty());
        r.write_page(5, &[1; PAGE_SIZE]);
        r.write_page(700, &[1; PAGE_SIZE]);
        let d = r.data_pages();
        let all: Vec<u64> = d.into_iter().flatten().collect();
        assert!(all.contains(&5) && all.contains(&700), "{all:?}");
        assert!(all.len() < 64, "{all:?}");
    }
}
