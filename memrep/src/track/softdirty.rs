//! The soft-dirty tracker: the pages another process (QEMU) wrote through its own mapping of
//! the region, from the kernel's soft-dirty bits in `/proc/<pid>/pagemap`, cleared through
//! `/proc/<pid>/clear_refs` — the way CRIU tracks a running process's memory. Nothing is
//! asked of the writer: it only has to map the region's file (`memory-backend-file,share=on`).
//!
//! Soft-dirty bits are cleared for the whole process at once, so a page first written between
//! reading the bits and clearing them would be missed. They are therefore cleared only in a
//! collect made while the writer is stopped ([`Tracker::collect_paused`]: the checkpoint's
//! cut, with the VM stopped over QMP). A collect while it runs reports the pages written
//! since that clear whose content differs from the table (it hashes them), and clears
//! nothing; so pre-send costs follow the pages written in the epoch, and the cut's collect
//! is exact.
//!
//! Limits: the kernel must keep soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`, which Debian's
//! has); reading another process's pagemap needs ptrace rights over it (root, or the same
//! user without YAMA restrictions); and a page whose mapping the kernel drops under memory
//! pressure loses its bit, so the writer's memory must not be reclaimed (QEMU:
//! `-overcommit mem-lock=on`, or hugepages, or enough RAM).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use roaring::RoaringTreemap;

use super::{CollectStats, TrackError, Tracker, TrackerKind};
use crate::digest::{page_hash, PageTable};
use crate::region::Region;
use crate::PAGE_SIZE;

const SOFT_DIRTY: u64 = 1 << 55;
/// Pagemap entries read per call.
const BATCH: usize = 8192;

/// One mapping of the region's file in the writer's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vma {
    start: u64,
    end: u64,
    /// File offset of `start`.
    offset: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub struct SoftDirtyTracker {
    pid: u32,
    vmas: Vec<Vma>,
    pagemap: File,
    clear_refs: File,
}

/// The first process other than this one that maps `path` shared and writable: its pid.
pub fn find_writer(path: &Path) -> Option<u32> {
    let me = std::process::id();
    let want = std::fs::canonicalize(path).ok()?;
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&p| p != me)
        .collect();
    pids.sort_unstable();
    pids.into_iter()
        .find(|&pid| vmas_of(pid, &want).is_ok_and(|v| !v.is_empty()))
}

/// The writable shared mappings of `file` in process `pid`.
fn vmas_of(pid: u32, file: &Path) -> std::io::Result<Vec<Vma>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let name = file.to_string_lossy();
    let mut out = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(2).unwrap_or("").trim_start();
        if path != name || !perms.starts_with("rw") || perms.as_bytes().get(3) != Some(&b's') {
            continue;
        }
        let (Some((s, e)), Ok(offset)) = (range.split_once('-'), u64::from_str_radix(off, 16))
        else {
            continue;
        };
        if let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16)) {
            out.push(Vma { start, end, offset });
        }
    }
    Ok(out)
}

/// Does this kernel keep soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`)? `Ok`, or why not. Maps a
/// small file, touches a page and reads its bit from this process's own pagemap: every page
/// of a new mapping reads soft-dirty where the kernel keeps the bits, none where it does not.
pub fn probe() -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            let path = std::env::temp_dir()
                .join(format!("lockstep-softdirty-probe-{}", std::process::id()));
            let r = (|| -> Result<bool, String> {
                let region =
                    Region::create(&path, PAGE_SIZE as u64 * 2).map_err(|e| e.to_string())?;
                let mut page = Box::new([0u8; PAGE_SIZE]);
                region.read_page(0, &mut page);
                let me = std::process::id();
                let file = std::fs::canonicalize(&path).map_err(|e| e.to_string())?;
                let vmas = vmas_of(me, &file).map_err(|e| e.to_string())?;
                let v = vmas
                    .first()
                    .ok_or("the probe's own mapping is not in /proc/self/maps")?;
                let pagemap = File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
                let mut e = [0u8; 8];
                pagemap
                    .read_exact_at(&mut e, v.start / PAGE_SIZE as u64 * 8)
                    .map_err(|e| e.to_string())?;
                Ok(u64::from_ne_bytes(e) & SOFT_DIRTY != 0)
            })();
            let _ = std::fs::remove_file(&path);
            match r {
                Ok(true) => Ok(()),
                Ok(false) => Err(
                    "this kernel keeps no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY is off)".into(),
                ),
                Err(e) => Err(format!("probing soft-dirty bits: {e}")),
            }
        })
        .clone()
}

fn sys(what: &'static str) -> impl FnOnce(std::io::Error) -> TrackError {
    move |source| TrackError::Sys { what, source }
}

impl SoftDirtyTracker {
    /// Track process `pid`'s writes to `region` (which it must map). Nothing is cleared
    /// here (the writer may be running): until the first paused collect, pages the process
    /// wrote since it started (or since its last clear) count as dirty, and those whose
    /// content equals the table are filtered out by their hash.
    pub fn attach(pid: u32, region: &Region) -> Result<SoftDirtyTracker, TrackError> {
        probe().map_err(TrackError::Unsupported)?;
        let file: PathBuf = std::fs::canonicalize(region.path()).map_err(sys("canonicalize"))?;
        let vmas = vmas_of(pid, &file).map_err(|_| TrackError::WriterGone { pid })?;
        let covered: u64 = vmas.iter().map(|v| v.end - v.start).sum();
        if vmas.is_empty() || covered < region.len() {
            return Err(TrackError::Mismatch(format!(
                "process {pid} maps {covered} of the {} bytes of {} shared and writable",
                region.len(),
                file.display()
            )));
        }
        let pagemap =
            File::open(format!("/proc/{pid}/pagemap")).map_err(sys("open /proc/PID/pagemap"))?;
        let clear_refs = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/clear_refs"))
            .map_err(sys("open /proc/PID/clear_refs"))?;
        Ok(SoftDirtyTracker {
            pid,
            vmas,
            pagemap,
            clear_refs,
        })
    }

    /// The tracked process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn gone(&self, e: std::io::Error) -> TrackError {
        if e.raw_os_error() == Some(libc::ESRCH)
            || !Path::new(&format!("/proc/{}", self.pid)).exists()
        {
            TrackError::WriterGone { pid: self.pid }
        } else {
            TrackError::Sys {
                what: "read /proc/PID/pagemap",
                source: e,
            }
        }
    }

    /// Pages (region page numbers) whose soft-dirty bit is set.
    fn soft_dirty(&self, pages: u64, out: &mut RoaringTreemap) -> Result<(), TrackError> {
        let mut buf = vec![0u8; BATCH * 8];
        for v in &self.vmas {
            let first = v.offset / PAGE_SIZE as u64;
            let n = ((v.end - v.start) / PAGE_SIZE as u64).min(pages.saturating_sub(first));
            let mut done = 0u64;
            while done < n {
                let k = (n - done).min(BATCH as u64) as usize;
                let at = (v.start / PAGE_SIZE as u64 + done) * 8;
                let got = self
                    .pagemap
                    .read_at(&mut buf[..k * 8], at)
                    .map_err(|e| self.gone(e))?;
                if got < k * 8 {
                    return Err(TrackError::WriterGone { pid: self.pid });
                }
                for (i, e) in buf[..k * 8].chunks_exact(8).enumerate() {
                    let entry = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                    if entry & SOFT_DIRTY != 0 {
                        out.insert(first + done + i as u64);
                    }
                }
                done += k as u64;
            }
        }
        Ok(())
    }

    fn collect_inner(
        &mut self,
        region: &Region,
        table: &PageTable,
        out: &mut RoaringTreemap,
        clear: bool,
    ) -> Result<CollectStats, TrackError> {
        let t0 = Instant::now();
        region.check()?;
        let mut dirty = RoaringTreemap::new();
        self.soft_dirty(region.pages(), &mut dirty)?;
        if clear {
            // The writer is stopped: nothing is written between the read above and this.
            self.clear_refs.write_all(b"4").map_err(|e| self.gone(e))?;
        }
        let mut page = Box::new([0u8; PAGE_SIZE]);
        let mut added = 0;
        for p in dirty {
            region.load_page(p, &mut page);
            if page_hash(&page[..]) != table.get(p) && out.insert(p) {
                added += 1;
            }
        }
        Ok(CollectStats {
            pages: added,
            elapsed: t0.elapsed(),
        })
    }
}

impl Tracker for SoftDirtyTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::SoftDirty
    }

    fn collect(
        &mut self,
        region: &Region,
        table: &PageTable,
        out: &mut RoaringTreemap,
    ) -> Result<CollectStats, TrackError> {
        self.collect_inner(region, table, out, false)
    }

    fn collect_paused(
        &mut self,
        region: &Region,
        table: &PageTable,
        out: &mut RoaringTreemap,
    ) -> Result<CollectStats, TrackError> {
        self.collect_inner(region, table, out, true)
    }
}
