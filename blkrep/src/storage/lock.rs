//! Disk locking that QEMU understands: OFD byte-range locks on the lock bytes of QEMU's
//! `file` and `host_device` drivers.
//!
//! QEMU describes what an open image may do, and what it lets others do, with four
//! permissions (`BLK_PERM_*` in QEMU 10): bit 0 *consistent read*, bit 1 *write*, bit 2
//! *write unchanged*, bit 3 *resize*. For each permission bit `i` it holds a shared
//! (`F_RDLCK`) open-file-description lock on byte `100 + i` while it has the permission, and
//! on byte `200 + i` while it does **not** let anyone else have it. Before it uses a
//! permission it asks (`F_OFD_GETLK`) whether anybody else holds `200 + i`; before it refuses
//! to share one, whether anybody else holds `100 + i`. Nobody ever takes a write lock, so the
//! locks themselves never block anyone: the *tests* refuse.
//!
//! lockstep takes part under the same rules ([`LockSet`]):
//!
//! | open | holds | shares | bytes held | bytes that must be free elsewhere |
//! |---|---|---|---|---|
//! | writable | consistent read, write, resize | consistent read | 100 101 103 201 202 203 | 101 102 103 200 201 203 |
//! | read-only | consistent read | consistent read, write unchanged | 100 201 203 | 101 103 200 |
//!
//! So while a writable lockstep disk is open, `qemu-io`, `qemu-img` and `qemu-nbd` cannot
//! open it for writing (`Failed to get "write" lock`: byte 201), and QEMU readers that do not
//! share writes cannot open it either (byte 101), nor can readers that do not share resizing
//! (`qemu-nbd -r`: byte 103). `qemu-img info -U` and `qemu-io -r` still read it (so does
//! plain `qemu-img info` in QEMU 10). lockstep in turn refuses a disk that any QEMU process
//! (or another lockstep) writes, or refuses to share with a writer.
//!
//! Like QEMU (`raw_handle_perm_lock`), lockstep takes its bytes first and tests after, so two
//! processes starting at the same moment cannot both miss each other (at worst both refuse).
//! A conflict is tested again for up to a second before the open is refused: a holder killed
//! a moment ago may still be closing its files.
//!
//! OFD locks belong to the open file description, so they last exactly as long as the
//! descriptor a disk is served through (O_DIRECT or not: lockstep never reopens a disk), and
//! die with the process however it ends. Two open
//! file descriptions conflict even inside one process; lockstep opening one file twice itself
//! (tests, or two exports of one file) shares one [`DiskLock`] per inode instead, through a
//! process-wide table, so it never refuses itself.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::sync::Locked;

/// How long a conflict may take to go away before an open is refused. A killed holder's
/// descriptors can outlive its exit by a moment (the kernel finishes its io_uring requests,
/// and closes files they held, in the background), so a daemon restarted at once would
/// otherwise find its predecessor's locks.
const SETTLE: Duration = Duration::from_millis(if cfg!(test) { 100 } else { 1000 });

/// The byte QEMU locks for each permission it holds: `RAW_LOCK_PERM_BASE + bit`.
pub const PERM_BASE: u64 = 100;
/// The byte QEMU locks for each permission it does not share: `RAW_LOCK_SHARED_BASE + bit`.
pub const SHARED_BASE: u64 = 200;

/// `BLK_PERM_CONSISTENT_READ`.
pub const CONSISTENT_READ: u8 = 1 << 0;
/// `BLK_PERM_WRITE`.
pub const WRITE: u8 = 1 << 1;
/// `BLK_PERM_WRITE_UNCHANGED`.
pub const WRITE_UNCHANGED: u8 = 1 << 2;
/// `BLK_PERM_RESIZE`.
pub const RESIZE: u8 = 1 << 3;
const PERM_BITS: u32 = 4;

/// What another process holding one byte means, worded for an error message.
fn meaning(byte: u64) -> &'static str {
    match byte {
        100 => "reads it",
        101 => "writes it",
        102 => "writes (unchanged data to) it",
        103 => "may resize it",
        200 => "does not let others read it",
        201 => "does not let others write it",
        202 => "does not let others write (even unchanged data to) it",
        203 => "does not let others resize it",
        _ => "holds a lock on it",
    }
}

/// Permissions held and shared, as QEMU counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockSet {
    /// `BLK_PERM_*` bits this open uses.
    pub perm: u8,
    /// `BLK_PERM_*` bits it lets other processes use.
    pub shared: u8,
}

impl LockSet {
    /// Nothing used, everything shared: no bytes held.
    pub const NONE: Self = Self {
        perm: 0,
        shared: 0xf,
    };

    /// A writer that lets others only read: what `qemu-img`/`qemu-nbd` hold on a writable
    /// image (consistent read, write, resize: lockstep grows a file it is given `--size`
    /// for), sharing less than a QEMU VM's drive does (no "unchanged" writers either: every
    /// write to a replicated disk must be lockstep's).
    pub fn writer() -> Self {
        Self {
            perm: CONSISTENT_READ | WRITE | RESIZE,
            shared: CONSISTENT_READ,
        }
    }

    /// A reader that needs the content to hold still (like `qemu-img` opening read-only).
    pub fn reader() -> Self {
        Self {
            perm: CONSISTENT_READ,
            shared: CONSISTENT_READ | WRITE_UNCHANGED,
        }
    }

    /// What an open doing both needs: every permission of either, sharing only what both do.
    pub fn union(self, other: Self) -> Self {
        Self {
            perm: self.perm | other.perm,
            shared: self.shared & other.shared,
        }
    }

    /// The bytes this set holds, ascending: `100 + i` for each permission used, `200 + i` for
    /// each one not shared.
    pub fn held_bytes(&self) -> Vec<u64> {
        let bits = |mask: u8, base: u64| {
            (0..PERM_BITS)
                .filter(move |i| mask & (1 << i) != 0)
                .map(move |i| base + u64::from(i))
        };
        bits(self.perm, PERM_BASE)
            .chain(bits(!self.shared, SHARED_BASE))
            .collect()
    }

    /// The bytes nobody else may hold, ascending: `200 + i` for each permission used (someone
    /// refuses to share it), `100 + i` for each one not shared (someone uses it).
    pub fn conflict_bytes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = (0..PERM_BITS)
            .flat_map(|i| {
                let bit = 1u8 << i;
                let i = u64::from(i);
                let used = (self.perm & bit != 0).then_some(SHARED_BASE + i);
                let kept = (self.shared & bit == 0).then_some(PERM_BASE + i);
                [used, kept]
            })
            .flatten()
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether `self` already holds and refuses everything `want` does.
    pub fn covers(&self, want: Self) -> bool {
        self.union(want) == *self
    }
}

/// Apply (`F_RDLCK`), release (`F_UNLCK`) or test (`F_WRLCK`, with `F_OFD_GETLK`) one byte.
fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: u64) -> io::Result<libc::flock> {
    // SAFETY: an all-zero flock is a valid value (l_pid must be 0 for OFD commands).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: fcntl with an OFD lock command reads and (GETLK) writes the flock we pass, on
    // a descriptor the caller keeps open for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

/// The bytes of `bytes` that another open file description holds (or `Err` if locking is not
/// supported here).
pub fn held_elsewhere(file: &File, bytes: &[u64]) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for &b in bytes {
        let fl = ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK, b)?;
        if i32::from(fl.l_type) != libc::F_UNLCK {
            out.push(b);
        }
    }
    Ok(out)
}

/// Take a shared lock on each byte; on failure, the byte and the error.
fn apply(file: &File, bytes: &[u64]) -> Result<(), (u64, io::Error)> {
    for &b in bytes {
        ofd(file, libc::F_OFD_SETLK, libc::F_RDLCK, b).map_err(|e| (b, e))?;
    }
    Ok(())
}

fn release(file: &File, bytes: &[u64]) {
    for &b in bytes {
        let _ = ofd(file, libc::F_OFD_SETLK, libc::F_UNLCK, b);
    }
}

/// The processes (other than this one) with an OFD lock on the file `(dev, ino)`, as
/// `name (pid N)`: best effort, among the processes we may inspect. Only `/proc/PID/fdinfo`
/// is read (its `lock:` lines name the file as `MAJ:MIN:INO`): nothing here stats another
/// process's files, which could hang on a dead network filesystem.
pub fn holders(dev: u64, ino: u64) -> Vec<String> {
    let id = format!(
        " {:02x}:{:02x}:{ino} ",
        libc::major(dev as libc::dev_t),
        libc::minor(dev as libc::dev_t)
    );
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        let locks = |fd: std::fs::DirEntry| {
            std::fs::read_to_string(fd.path()).is_ok_and(|info| {
                info.lines()
                    .any(|l| l.starts_with("lock:") && l.contains("OFDLCK") && l.contains(&id))
            })
        };
        if pid != me && fds.flatten().any(locks) {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("{} (pid {pid})", comm.trim()));
            if out.len() == 4 {
                break;
            }
        }
    }
    out
}

/// Why a disk cannot be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds these bytes; the processes found holding locks on the file.
    InUse(Vec<u64>, Vec<String>),
    /// The filesystem or kernel refused the lock calls.
    Os(io::Error),
}

impl LockError {
    /// The message for the operator, naming the disk, what holds it and the way out.
    pub fn message(&self, path: &Path) -> String {
        match self {
            LockError::InUse(bytes, holders) => {
                let list = bytes
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                let by = if holders.is_empty() {
                    String::new()
                } else {
                    format!(" by {}", holders.join(", "))
                };
                format!(
                    "disk {} is in use by another process that {} (a QEMU VM, qemu-nbd, \
                     qemu-img/qemu-io, or another lockstep): QEMU lock byte{} {list} held{by}; \
                     stop that process, or pass --no-lock if you are sure nothing else writes it",
                    path.display(),
                    meaning(bytes[0]),
                    if bytes.len() > 1 { "s" } else { "" },
                )
            }
            LockError::Os(e) => format!(
                "cannot lock disk {} against other users ({e}); pass --no-lock to open it \
                 without locking",
                path.display()
            ),
        }
    }
}

/// The QEMU lock bytes one disk file holds, on one open file description, for as long as any
/// disk opened from the file in this process is open.
#[derive(Debug)]
pub struct DiskLock {
    /// A duplicate of the descriptor of the first open: keeps its description, and so the
    /// locks, alive.
    file: File,
    set: Mutex<LockSet>,
}

type Table = HashMap<(u64, u64), Weak<DiskLock>>;

fn table() -> &'static Mutex<Table> {
    static TABLE: std::sync::OnceLock<Mutex<Table>> = std::sync::OnceLock::new();
    TABLE.get_or_init(Default::default)
}

impl DiskLock {
    /// Take `want` on the file `file` is open on, or join this process's lock on it (adding
    /// any bytes `want` needs beyond it). Locks first and tests after, as QEMU does, so two
    /// processes starting at once cannot both miss each other.
    pub fn acquire(file: &File, want: LockSet) -> Result<Arc<DiskLock>, LockError> {
        let meta = file.metadata().map_err(LockError::Os)?;
        let key = (meta.dev(), meta.ino());
        // Entries die with their last disk (a `DiskLock` has no drop of its own: dropping
        // one here, under the table's mutex, must not need that mutex).
        let mut table = table().locked();
        table.retain(|_, w| w.strong_count() > 0);
        if let Some(lock) = table.get(&key).and_then(Weak::upgrade) {
            let mut set = lock.set.locked();
            if !set.covers(want) {
                let new = set.union(want);
                lock.take(*set, new)?;
                *set = new;
            }
            drop(set);
            return Ok(lock);
        }
        let lock = Arc::new(DiskLock {
            file: file.try_clone().map_err(LockError::Os)?,
            set: Mutex::new(want),
        });
        lock.take(LockSet::NONE, want)?;
        table.insert(key, Arc::downgrade(&lock));
        Ok(lock)
    }

    /// Move from holding `old` to holding `new` (a superset), or back to `old` on a conflict.
    fn take(&self, old: LockSet, new: LockSet) -> Result<(), LockError> {
        let had = old.held_bytes();
        let added: Vec<u64> = new
            .held_bytes()
            .into_iter()
            .filter(|b| !had.contains(b))
            .collect();
        let undo = |e| {
            release(&self.file, &added);
            e
        };
        let in_use = |busy| {
            let who = self.file.metadata();
            let who = who.map(|m| holders(m.dev(), m.ino()));
            LockError::InUse(busy, who.unwrap_or_default())
        };
        match apply(&self.file, &added) {
            Ok(()) => {}
            // Somebody holds an exclusive lock on it (QEMU never does; some other tool).
            Err((b, e)) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                return Err(undo(in_use(vec![b])))
            }
            Err((_, e)) => return Err(undo(LockError::Os(e))),
        }
        let settle = Instant::now() + SETTLE;
        loop {
            let busy = held_elsewhere(&self.file, &new.conflict_bytes())
                .map_err(|e| undo(LockError::Os(e)))?;
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= settle {
                return Err(undo(in_use(busy)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What this lock holds now.
    pub fn set(&self) -> LockSet {
        *self.set.locked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{DiskOptions, UringFile};

    const ALL: [u64; 8] = [100, 101, 102, 103, 200, 201, 202, 203];

    /// Whether one set's held bytes trip the other's test, either way round.
    fn clash(a: LockSet, b: LockSet) -> bool {
        let hits = |x: LockSet, y: LockSet| {
            x.held_bytes()
                .iter()
                .any(|h| y.conflict_bytes().contains(h))
        };
        hits(a, b) || hits(b, a)
    }

    #[test]
    fn lock_bytes_are_qemus() {
        assert_eq!(
            LockSet::writer().held_bytes(),
            [100, 101, 103, 201, 202, 203]
        );
        assert_eq!(
            LockSet::writer().conflict_bytes(),
            [101, 102, 103, 200, 201, 203]
        );
        assert_eq!(LockSet::reader().held_bytes(), [100, 201, 203]);
        assert_eq!(LockSet::reader().conflict_bytes(), [101, 103, 200]);
        assert!(LockSet::NONE.held_bytes().is_empty());
        // What QEMU 10 was seen to hold (/proc/locks): qemu-io on a raw file read-write
        // (consistent read + write, shares everything) and read-only, qemu-nbd read-write
        // (also refuses resizers) and read-only.
        let all = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;
        let qemu_io = LockSet {
            perm: CONSISTENT_READ | WRITE,
            shared: all,
        };
        let qemu_io_r = LockSet {
            perm: CONSISTENT_READ,
            shared: all,
        };
        let qemu_nbd = LockSet {
            perm: CONSISTENT_READ | WRITE,
            shared: all & !RESIZE,
        };
        let qemu_nbd_r = LockSet {
            perm: CONSISTENT_READ,
            shared: all & !RESIZE,
        };
        assert_eq!(qemu_io.held_bytes(), [100, 101]);
        assert_eq!(qemu_nbd.held_bytes(), [100, 101, 203]);
        assert!(clash(LockSet::writer(), qemu_io));
        assert!(clash(LockSet::writer(), qemu_nbd));
        assert!(clash(LockSet::writer(), qemu_nbd_r));
        assert!(!clash(LockSet::writer(), qemu_io_r));
        assert!(clash(LockSet::writer(), LockSet::writer()));
        assert!(clash(LockSet::writer(), LockSet::reader()));
        assert!(!clash(LockSet::reader(), LockSet::reader()));
        assert!(!clash(LockSet::reader(), qemu_io_r));
        assert!(clash(LockSet::reader(), qemu_io));
        assert!(LockSet::writer().covers(LockSet::reader()));
        assert!(!LockSet::reader().covers(LockSet::writer()));
        assert_eq!(
            LockSet::reader().union(LockSet::writer()),
            LockSet::writer()
        );
    }

    /// Another open file description holding `bytes`, as a QEMU process would.
    fn foreign(path: &Path, bytes: &[u64]) -> File {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        apply(&f, bytes).unwrap();
        f
    }

    fn disk(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("d.img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        p
    }

    #[test]
    fn a_disk_another_process_writes_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = disk(dir.path());
        let other = foreign(&p, &[100, 101]);
        let e = UringFile::open(&DiskOptions::new(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(
            e.contains("writes it") && e.contains("byte 101 held"),
            "{e}"
        );
        assert!(e.contains("--no-lock"), "{e}");
        // The refused open left nothing behind.
        let probe = File::open(&p).unwrap();
        assert_eq!(held_elsewhere(&probe, &ALL).unwrap(), [100, 101]);
        let mut ro = DiskOptions::new(&p);
        ro.read_only = true;
        assert!(UringFile::open(&ro).is_err());
        // locking=off.
        let mut off = DiskOptions::new(&p);
        off.lock = false;
        let d = UringFile::open(&off).unwrap();
        assert_eq!(d.lock_set(), None);
        drop(d);
        // A QEMU VM's writable drive: 100, 101 held, 201 (not sharing writes).
        drop(other);
        let vm = foreign(&p, &[100, 101, 201]);
        let e = UringFile::open(&DiskOptions::new(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes 101, 201 held"), "{e}");
        drop(vm);
        // A reader that lets others write does not stop lockstep writing.
        let reader = foreign(&p, &[100]);
        drop(UringFile::open(&DiskOptions::new(&p)).unwrap());
        drop(reader);
        // An exclusive lock on a byte lockstep takes (no QEMU does that) refuses it too.
        let x = foreign(&p, &[]);
        ofd(&x, libc::F_OFD_SETLK, libc::F_WRLCK, 202).unwrap();
        let e = UringFile::open(&DiskOptions::new(&p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("byte 202 held"), "{e}");
        drop(x);
        drop(UringFile::open(&DiskOptions::new(&p)).unwrap());
    }

    #[test]
    fn locks_live_with_the_disk_and_one_process_never_refuses_itself() {
        let dir = tempfile::tempdir().unwrap();
        let p = disk(dir.path());
        let probe = File::open(&p).unwrap();
        let mut ro = DiskOptions::new(&p);
        ro.read_only = true;
        let r = UringFile::open(&ro).unwrap();
        assert_eq!(held_elsewhere(&probe, &ALL).unwrap(), [100, 201, 203]);
        // A writer in the same process joins and widens the lock the reader took.
        let mut direct = DiskOptions::new(&p);
        direct.direct = true;
        let w = UringFile::open(&direct).unwrap();
        let w2 = UringFile::open(&DiskOptions::new(&p)).unwrap();
        assert_eq!(w.lock_set(), Some(LockSet::writer()));
        assert_eq!(r.lock_set(), Some(LockSet::writer()));
        let held = LockSet::writer().held_bytes();
        assert_eq!(held_elsewhere(&probe, &ALL).unwrap(), held);
        // Another process is refused...
        let other = foreign(&p, &[]);
        assert_eq!(
            held_elsewhere(&other, &LockSet::writer().conflict_bytes()).unwrap(),
            [101, 103, 201, 203]
        );
        drop(other);
        // ...until the last disk on the file closes, whichever order they close in.
        drop(r);
        drop(w);
        assert_eq!(held_elsewhere(&probe, &ALL).unwrap(), held);
        drop(w2);
        assert!(held_elsewhere(&probe, &ALL).unwrap().is_empty());
        // And the file opens again.
        drop(UringFile::open(&DiskOptions::new(&p)).unwrap());
    }
}
