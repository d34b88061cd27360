//! The two halves of a region together, in one process, over a channel that calls the
//! secondary half directly and can be cut: every committed checkpoint leaves on the
//! secondary exactly the primary's region at the cut, with both trackers, with writers
//! racing the pre-send, across a cut link, and after the secondary restarts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use blkrep::epoch::{
    BoxFuture, Epoch, EpochError, FailoverTarget, Participant, PeerChannel, SecondaryParticipant,
};
use serde_json::Value;

use crate::primary::{MemoryOptions, MemoryParticipant};
use crate::region::Region;
use crate::secondary::MemoryReplica;
use crate::testutil::ShmFile;
use crate::track::scan::ScanTracker;
use crate::track::uffd::UffdTracker;
use crate::track::Tracker;
use crate::PAGE_SIZE;

/// The secondary half behind a link that can be cut.
#[derive(Debug)]
struct Link {
    replica: Arc<MemoryReplica>,
    cut: AtomicBool,
}

impl Link {
    fn new(replica: Arc<MemoryReplica>) -> Arc<Link> {
        Arc::new(Link {
            replica,
            cut: AtomicBool::new(false),
        })
    }
}

impl PeerChannel for Link {
    fn call<'a>(&'a self, message: Vec<u8>) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            if self.cut.load(Ordering::SeqCst) {
                return Err("the link is cut".into());
            }
            self.replica.receive(&message)
        })
    }
}

const PAGES: u64 = 512;

struct Rig {
    _files: (ShmFile, ShmFile),
    primary_region: Arc<Region>,
    secondary_path: std::path::PathBuf,
    p: MemoryParticipant,
    s: Arc<MemoryReplica>,
    link: Arc<Link>,
    epoch: u64,
    /// Writers hold it shared per write; the pause holds it exclusively.
    gate: Arc<RwLock<()>>,
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Uffd,
    Scan,
}

fn opts() -> MemoryOptions {
    MemoryOptions {
        presend: Some(Duration::from_millis(2)),
        ..MemoryOptions::for_region(0)
    }
}

impl Rig {
    async fn new(backend: Backend) -> Rig {
        let pf = ShmFile::new("part-p");
        let sf = ShmFile::new("part-s");
        let primary_region = Arc::new(Region::create(pf.path(), PAGES * PAGE_SIZE as u64).unwrap());
        let sregion = Arc::new(Region::create(sf.path(), PAGES * PAGE_SIZE as u64).unwrap());
        let tracker: Box<dyn Tracker> = match backend {
            Backend::Uffd => Box::new(UffdTracker::register_self(&primary_region).unwrap()),
            Backend::Scan => Box::new(ScanTracker::new(2)),
        };
        let p = MemoryParticipant::new(primary_region.clone(), tracker, "test", opts());
        let s = Arc::new(MemoryReplica::new(p_id(), "memory0", sregion));
        let link = Link::new(s.clone());
        let mut rig = Rig {
            secondary_path: sf.path().to_owned(),
            _files: (pf, sf),
            primary_region,
            p,
            s,
            link,
            epoch: 1,
            gate: Arc::new(RwLock::new(())),
        };
        rig.connect().await;
        rig
    }

    /// A new session at the current epoch.
    async fn connect(&mut self) {
        self.s.resume(self.epoch);
        self.p
            .connected(self.link.clone(), Epoch(self.epoch))
            .await
            .unwrap();
    }

    /// One checkpoint as the coordinator runs it, the writers paused around the cut;
    /// on success the secondary's region is the primary's at the cut. (The writers are
    /// threads, not tasks, and the cut never suspends: holding their gate across it is the
    /// pause.)
    #[allow(clippy::await_holding_lock)]
    async fn checkpoint(&mut self) -> Result<(), String> {
        let e = Epoch(self.epoch);
        for _ in 0..500 {
            if self.p.ready().is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.p.ready()?;
        let at_cut = {
            let _paused = self.gate.write().unwrap();
            self.p.cut(e).await.map_err(|e| e.to_string())?;
            snapshot(&self.primary_region)
        };
        self.epoch += 1;
        let r = async {
            let summary = self.p.prepare(e).await.map_err(|e| e.to_string())?;
            self.s.prepare(e.0, &summary).await
        }
        .await;
        match r {
            Ok(()) => {
                self.s.commit(e.0);
                self.p.commit(e);
                assert!(
                    snapshot(self.s.region()) == at_cut,
                    "the secondary's region after commit {} is not the primary's at the cut",
                    e.0
                );
                assert_eq!(self.s.fold(), fold_of(&at_cut));
                Ok(())
            }
            Err(why) => {
                self.s.abort(e.0, &why);
                self.p.abort(
                    e,
                    &EpochError::PeerLost {
                        epoch: e,
                        reason: why.clone(),
                    },
                );
                Err(why)
            }
        }
    }

    /// Writer threads racing everything, until the returned flag is set.
    fn writers(&self, threads: u64) -> (Arc<AtomicBool>, Vec<std::thread::JoinHandle<u64>>) {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|t| {
                let (stop, gate, region) =
                    (stop.clone(), self.gate.clone(), self.primary_region.clone());
                std::thread::spawn(move || {
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (t + 1);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let page = (x >> 20) % PAGES;
                        let _g = gate.read().unwrap();
                        // Every eighth write zeroes a whole page (a zero page on the wire).
                        let data = if x % 8 == 0 {
                            vec![0u8; PAGE_SIZE]
                        } else {
                            vec![(x >> 8) as u8 | 1; 64]
                        };
                        let off = page * PAGE_SIZE as u64
                            + if data.len() < PAGE_SIZE {
                                (x >> 16) % 64 * 64
                            } else {
                                0
                            };
                        region.write_at(off, &data).unwrap();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        (stop, handles)
    }

    /// The primary half's status, taken when no collect or cut holds its state (a status
    /// request meanwhile gets the last report, marked busy).
    fn status(&self) -> Value {
        for _ in 0..1000 {
            let st = self.p.status();
            if st.get("busy").is_none() {
                return st;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("the primary half stayed busy for a second");
    }
}

fn p_id() -> u16 {
    opts().id
}

fn snapshot(r: &Region) -> Vec<u8> {
    let mut v = vec![0u8; r.len() as usize];
    r.read_at(0, &mut v).unwrap();
    v
}

fn fold_of(bytes: &[u8]) -> u64 {
    let d = bytes
        .chunks(PAGE_SIZE)
        .map(crate::digest::page_hash)
        .collect();
    crate::digest::PageTable::from_digests(d).fold()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn racing_writers_every_commit_is_the_cut(backend: Backend) {
    rt().block_on(async {
        let mut rig = Rig::new(backend).await;
        let (stop, writers) = rig.writers(2);
        for _ in 0..25 {
            rig.checkpoint().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.store(true, Ordering::Relaxed);
        let writes: u64 = writers.into_iter().map(|h| h.join().unwrap()).sum();
        rig.checkpoint().await.unwrap();
        let st = rig.status();
        assert!(writes > 100, "{writes} writes");
        assert!(st["presend_pages"].as_u64().unwrap() > 0, "{st}");
        assert!(st["zero_pages_sent"].as_u64().unwrap() > 0, "{st}");
        assert_eq!(st["cuts"], 26);
    });
}

#[test]
fn uffd_every_commit_is_the_region_at_the_cut() {
    racing_writers_every_commit_is_the_cut(Backend::Uffd);
}

#[test]
fn scan_every_commit_is_the_region_at_the_cut() {
    racing_writers_every_commit_is_the_cut(Backend::Scan);
}

#[test]
fn a_cut_link_aborts_and_the_next_session_resends_what_is_missing() {
    rt().block_on(async {
        let mut rig = Rig::new(Backend::Uffd).await;
        let (stop, writers) = rig.writers(1);
        for _ in 0..3 {
            rig.checkpoint().await.unwrap();
        }
        let committed = snapshot(rig.s.region());
        // The link dies with a page of the next epoch written: that epoch fails (its pages
        // cannot all arrive), and nothing of it lands.
        rig.link.cut.store(true, Ordering::SeqCst);
        rig.primary_region.write_at(0, b"after the cut").unwrap();
        let e = rig.checkpoint().await.unwrap_err();
        assert!(
            e.contains("the link is cut") || e.contains("arrived"),
            "{e}"
        );
        assert!(
            snapshot(rig.s.region()) == committed,
            "an aborted epoch reached the region"
        );
        assert!(rig.p.ready().is_err(), "no checkpoint without a session");
        // Reconnect (a new session has a new connection; the old one stays dead): the
        // primary resends only what the secondary's committed region lacks.
        rig.link = Link::new(rig.s.clone());
        rig.connect().await;
        for _ in 0..3 {
            rig.checkpoint().await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
        rig.checkpoint().await.unwrap();
        let st = rig.status();
        assert_eq!(st["sessions"], 2, "{st}");
        assert!(st["resync_pages"].as_u64().unwrap() < PAGES, "{st}");
    });
}

#[test]
fn a_restarted_secondary_is_resynced_by_digest_not_copied() {
    rt().block_on(async {
        let mut rig = Rig::new(Backend::Uffd).await;
        // Fill the region, commit it.
        for p in 0..PAGES {
            rig.primary_region
                .write_at(p * PAGE_SIZE as u64, &[p as u8 | 1; 128])
                .unwrap();
        }
        rig.checkpoint().await.unwrap();
        let sent =
            |st: &Value| st["cut_pages"].as_u64().unwrap() + st["presend_pages"].as_u64().unwrap();
        let before = rig.status();
        assert!(sent(&before) >= PAGES, "{before}");
        // The secondary restarts (its region file kept), and meanwhile 5 pages change.
        let region = Arc::new(Region::open(&rig.secondary_path).unwrap());
        rig.s = Arc::new(MemoryReplica::new(p_id(), "memory0", region));
        rig.link = Link::new(rig.s.clone());
        for p in [3, 50, 51, 300, 511] {
            rig.primary_region
                .write_at(p * PAGE_SIZE as u64, b"changed")
                .unwrap();
        }
        rig.connect().await;
        rig.checkpoint().await.unwrap();
        let st = rig.status();
        // Only the changed pages cross again (twice at most, if the old session's pre-send
        // sent them before it noticed the restart), not the region.
        let resync =
            st["resync_pages"].as_u64().unwrap() - before["resync_pages"].as_u64().unwrap();
        assert!(resync <= 5, "{st}");
        let again = sent(&st) - sent(&before);
        assert!(
            (5..=10).contains(&again),
            "{again} pages sent after the restart: {st}"
        );
    });
}

#[test]
fn regions_of_different_sizes_are_refused_for_good() {
    rt().block_on(async {
        let pf = ShmFile::new("size-p");
        let sf = ShmFile::new("size-s");
        let pr = Arc::new(Region::create(pf.path(), 8 * PAGE_SIZE as u64).unwrap());
        let sr = Arc::new(Region::create(sf.path(), 9 * PAGE_SIZE as u64).unwrap());
        let p = MemoryParticipant::new(pr, Box::new(ScanTracker::new(1)), "test", opts());
        let s = Arc::new(MemoryReplica::new(p_id(), "memory0", sr));
        let e = p.connected(Link::new(s), Epoch(1)).await.unwrap_err();
        assert!(matches!(e, EpochError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("36864 bytes"), "{e}");
        assert!(p.ready().is_err());
    });
}

#[test]
fn failover_drops_what_is_staged_and_keeps_the_last_commit() {
    rt().block_on(async {
        let mut rig = Rig::new(Backend::Scan).await;
        rig.primary_region.write_at(0, b"committed").unwrap();
        rig.checkpoint().await.unwrap();
        let committed = snapshot(rig.s.region());
        // Epoch 2's pages reach the secondary but its checkpoint never comes.
        rig.primary_region.write_at(4096, b"staged only").unwrap();
        let e = Epoch(rig.epoch);
        rig.p.cut(e).await.unwrap();
        rig.p.prepare(e).await.unwrap();
        assert!(rig.s.status()["staged_pages"].as_u64().unwrap() > 0);
        rig.s
            .failover(FailoverTarget::Checkpoint, e.0 - 1)
            .await
            .unwrap();
        assert!(snapshot(rig.s.region()) == committed);
        assert_eq!(rig.s.status()["staged_pages"], 0);
    });
}

/// How fast the secondary half stages and commits pages (run in release:
/// `cargo test --release -p memrep staging_speed -- --ignored --nocapture`).
#[test]
#[ignore]
fn staging_speed() {
    let sf = ShmFile::new("speed-s");
    let pages = 65536u64;
    let sregion = Arc::new(Region::create(sf.path(), pages * PAGE_SIZE as u64).unwrap());
    let s = MemoryReplica::new(p_id(), "memory0", sregion);
    s.resume(1);
    let mut msgs = Vec::new();
    let mut seq = 0;
    for chunk in 0..pages / crate::wire::MAX_BATCH_PAGES as u64 {
        let mut b = crate::wire::PagesBuilder::new(1);
        for k in 0..crate::wire::MAX_BATCH_PAGES as u64 {
            seq += 1;
            let p = chunk * crate::wire::MAX_BATCH_PAGES as u64 + k;
            b.push(p, seq, Some(&[(p as u8) | 1; PAGE_SIZE]));
        }
        msgs.push(b.finish());
    }
    let t = std::time::Instant::now();
    for m in &msgs {
        s.receive(m).unwrap();
    }
    let staged = t.elapsed();
    let t = std::time::Instant::now();
    s.commit(1);
    let committed = t.elapsed();
    let mb = (pages * PAGE_SIZE as u64) as f64 / 1e6;
    println!(
        "staging {:.0} MB/s, commit {:.0} MB/s ({} pages)",
        mb / staged.as_secs_f64(),
        mb / committed.as_secs_f64(),
        pages
    );
}
