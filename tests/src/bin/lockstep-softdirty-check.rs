//! Checks memrep's soft-dirty tracker against a real writer process, on a kernel that keeps
//! soft-dirty bits (Debian's; tests/guest.rs runs this in the guest, since the host kernel may
//! not have them).
//!
//! `lockstep-softdirty-check` creates a region file, starts itself as a writer child
//! (`lockstep-softdirty-check child PATH`) that maps the file shared and writes the pages it
//! is told to on stdin, and attaches the tracker to the child. Rounds of random writes follow,
//! with collects while the writer runs and paused collects while it waits (stopped with
//! SIGSTOP, like a VM stopped for a cut). After every paused collect, every page whose
//! content differs from the table must have been reported: nothing is missed. Prints
//! `softdirty-ok` and exits 0, or says what was missed and exits 1.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use memrep::digest::{page_hash, PageTable};
use memrep::region::Region;
use memrep::track::softdirty::{probe, SoftDirtyTracker};
use memrep::track::Tracker;
use memrep::PAGE_SIZE;
use roaring::RoaringTreemap;

const PAGES: u64 = 1024;

fn child(path: &str) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("region file");
    let len = PAGES as usize * PAGE_SIZE;
    // SAFETY: a fresh shared mapping of a file of `len` bytes that this process keeps open;
    // only this function touches it, through `base` within `len`.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED, "mmap");
    let out = std::io::stdout();
    writeln!(out.lock(), "mapped").unwrap();
    for line in std::io::stdin().lock().lines() {
        let line = line.expect("stdin");
        // "w PAGE VALUE": write VALUE at the start of PAGE, through the mapping.
        let mut it = line.split_whitespace();
        if it.next() != Some("w") {
            break;
        }
        let page: usize = it.next().unwrap().parse().unwrap();
        let value: u8 = it.next().unwrap().parse().unwrap();
        assert!(page < PAGES as usize);
        // SAFETY: `page * PAGE_SIZE` is inside the mapping (checked above).
        unsafe { *(base as *mut u8).add(page * PAGE_SIZE) = value };
        writeln!(out.lock(), "ok").unwrap();
    }
}

/// A small deterministic generator (no dependency for one test program).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(&args[2]);
    }
    if let Err(e) = probe() {
        eprintln!("soft-dirty unsupported here: {e}");
        std::process::exit(2);
    }
    let path = std::env::temp_dir().join(format!("softdirty-check-{}", std::process::id()));
    let region = Region::create(&path, PAGES * PAGE_SIZE as u64).expect("region");
    let mut kid = Command::new(std::env::current_exe().unwrap())
        .args(["child", path.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("child");
    let pid = kid.id();
    let mut to = kid.stdin.take().unwrap();
    let mut from = BufReader::new(kid.stdout.take().unwrap());
    let mut line = String::new();
    from.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "mapped");
    let mut table = PageTable::hash_region(&region, 1);
    let mut t = SoftDirtyTracker::attach(pid, &region).expect("attach");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut page = Box::new([0u8; PAGE_SIZE]);
    let mut missed = 0;
    let stop = |sig| {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as i32, sig) };
    };
    for round in 0..40 {
        // Writes while "running", with running collects in between.
        let writes = 1 + rng.next() % 40;
        let mut out = RoaringTreemap::new();
        for k in 0..writes {
            let p = rng.next() % PAGES;
            let v = (rng.next() % 255 + 1) as u8;
            writeln!(to, "w {p} {v}").unwrap();
            line.clear();
            from.read_line(&mut line).unwrap();
            if k % 7 == 0 {
                t.collect(&region, &table, &mut out).expect("collect");
                // The caller's part: read what was reported, store its hash.
                for q in out.iter() {
                    region.read_page(q, &mut page);
                    table.set(q, page_hash(&page[..]));
                }
                out.clear();
            }
        }
        // The cut: the writer stopped, a paused collect, then the check.
        stop(libc::SIGSTOP);
        t.collect_paused(&region, &table, &mut out)
            .expect("collect_paused");
        for q in out.iter() {
            region.read_page(q, &mut page);
            table.set(q, page_hash(&page[..]));
        }
        for q in 0..PAGES {
            region.read_page(q, &mut page);
            if page_hash(&page[..]) != table.get(q) {
                eprintln!("round {round}: page {q} changed but was never reported");
                missed += 1;
            }
        }
        stop(libc::SIGCONT);
    }
    drop(to);
    let _ = kid.wait();
    let _ = std::fs::remove_file(&path);
    if missed > 0 {
        eprintln!("{missed} changed pages missed");
        std::process::exit(1);
    }
    println!("softdirty-ok");
}
