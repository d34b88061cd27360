//! A region's secondary half: pages of epoch `n` wait in a RAM cache and reach the region only
//! when checkpoint `n` commits, together with the disk.
//!
//! ```text
//!  PAGES(n, pages)      ─▶ staged[n][page] = (seq, digest, data)   later seq wins
//!  prepare(n, summary)  ─▶ every page of n arrived?  committed digests + staged == summary?
//!                          region file still whole?
//!  commit(n)            ─▶ copy staged ≤ n into the region, update the digest table
//!  resume(e) / failover ─▶ drop everything staged (the region holds the last commit)
//! ```
//!
//! The digest table of the committed region is built once at start (hashing the region) and
//! kept up to date at every commit, so the check in `prepare` costs only the staged pages, and
//! DIGESTS answers from memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use blkrep::epoch::{BoxFuture, EpochSummary, FailoverTarget, SecondaryParticipant};
use serde_json::json;

use crate::digest::{default_threads, mix, page_hash, zero_hash, PageTable};
use crate::region::Region;
use crate::wire::{self, Message};
use crate::PAGE_SIZE;

/// One staged page.
#[derive(Debug)]
struct Staged {
    seq: u64,
    digest: u64,
    /// None: a page of zeros.
    data: Option<Box<[u8; PAGE_SIZE]>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pages staged per uncommitted epoch.
    staged: Staging,
    /// Entries received per uncommitted epoch (a page staged twice counts twice).
    received: BTreeMap<u64, u64>,
    /// Bytes of page data staged.
    staged_bytes: u64,
    committed: u64,
    commits: u64,
    pages_applied: u64,
    bytes_received: u64,
    last_error: Option<String>,
}

/// A region's secondary half, registered with `Secondary::add_participant`.
pub struct MemoryReplica {
    id: u16,
    name: String,
    region: Arc<Region>,
    /// Digests of the committed region.
    table: Mutex<PageTable>,
    /// Its fold, readable while a commit holds the table.
    fold: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
    /// The most bytes of page data staged at once: two copies of the region.
    max_staged: u64,
}

impl std::fmt::Debug for MemoryReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryReplica")
            .field("name", &self.name)
            .field("region", &self.region.path())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Pages staged per epoch.
type Staging = BTreeMap<u64, HashMap<u64, Staged>>;

/// The newest staged version of every page staged for `epoch` or earlier.
fn merged(staged: &Staging, epoch: u64) -> HashMap<u64, &Staged> {
    let mut out: HashMap<u64, &Staged> = HashMap::new();
    for (_, pages) in staged.range(..=epoch) {
        for (&p, s) in pages {
            match out.get(&p) {
                Some(o) if o.seq >= s.seq => {}
                _ => {
                    out.insert(p, s);
                }
            }
        }
    }
    out
}

impl MemoryReplica {
    /// The secondary half of participant `id` over `region`; hashes the region once.
    pub fn new(id: u16, name: impl Into<String>, region: Arc<Region>) -> MemoryReplica {
        let table = PageTable::hash_region(&region, default_threads());
        MemoryReplica {
            id,
            name: name.into(),
            // Two epochs at most are staged (the one being committed and the next one's
            // pre-send), each at most the region, plus a message in flight.
            max_staged: region
                .len()
                .saturating_mul(2)
                .saturating_add((wire::MAX_BATCH_PAGES * PAGE_SIZE) as u64),
            region,
            fold: std::sync::atomic::AtomicU64::new(table.fold()),
            table: Mutex::new(table),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The region.
    pub fn region(&self) -> &Arc<Region> {
        &self.region
    }

    /// Digest fold of the committed region.
    pub fn fold(&self) -> u64 {
        self.fold.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stage(&self, epoch: u64, entries: Vec<wire::Entry<'_>>) -> Result<(), String> {
        let mut i = lock(&self.inner);
        if epoch <= i.committed {
            return Err(format!(
                "pages for epoch {epoch}, which is committed already (at {})",
                i.committed
            ));
        }
        let n = entries.len() as u64;
        let incoming =
            entries.iter().filter(|e| e.data.is_some()).count() as u64 * PAGE_SIZE as u64;
        // Pages staged again in the same epoch replace their earlier version.
        let replaced = i.staged.get(&epoch).map_or(0, |m| {
            entries
                .iter()
                .filter(|e| e.data.is_some() && m.get(&e.page).is_some_and(|s| s.data.is_some()))
                .count() as u64
                * PAGE_SIZE as u64
        });
        if (i.staged_bytes + incoming).saturating_sub(replaced) > self.max_staged {
            return Err(format!(
                "the staging cache is full ({} bytes staged, at most {})",
                i.staged_bytes, self.max_staged
            ));
        }
        let mut added = 0u64;
        let mut freed = 0u64;
        let map = i.staged.entry(epoch).or_default();
        for e in entries {
            if map.get(&e.page).is_some_and(|s| s.seq >= e.seq) {
                continue;
            }
            let (digest, data) = match e.data {
                Some(d) => {
                    let mut b = Box::new([0u8; PAGE_SIZE]);
                    b.copy_from_slice(d);
                    added += PAGE_SIZE as u64;
                    (page_hash(d), Some(b))
                }
                None => (zero_hash(), None),
            };
            let old = map.insert(
                e.page,
                Staged {
                    seq: e.seq,
                    digest,
                    data,
                },
            );
            if old.is_some_and(|o| o.data.is_some()) {
                freed += PAGE_SIZE as u64;
            }
        }
        i.staged_bytes = i.staged_bytes + added - freed;
        i.bytes_received += incoming;
        *i.received.entry(epoch).or_default() += n;
        Ok(())
    }

    /// Checkpoint `epoch` commits: copy every page staged for it (or earlier) into the
    /// region, newest version of each, and update the digest table. The staged pages are
    /// taken out first, so that messages of the next epoch and status requests do not wait
    /// for the copy.
    fn apply(&self, epoch: u64) {
        let done = {
            let mut i = lock(&self.inner);
            let later = i.staged.split_off(&(epoch + 1));
            let later_received = i.received.split_off(&(epoch + 1));
            i.received = later_received;
            std::mem::replace(&mut i.staged, later)
        };
        let zero = [0u8; PAGE_SIZE];
        let mut applied = 0u64;
        let mut failed = None;
        let mut table = lock(&self.table);
        for (p, s) in merged(&done, epoch) {
            if let Err(e) = self
                .region
                .store_page(p, s.data.as_deref().unwrap_or(&zero))
            {
                // The commit cannot fail any more (every participant prepared); the page
                // stays as it was and verify will find it.
                tracing::error!(region = %self.region.path().display(), page = p, "applying a committed page: {e}");
                failed = Some(format!("applying page {p}: {e}"));
            }
            table.set(p, s.digest);
            applied += 1;
        }
        self.fold
            .store(table.fold(), std::sync::atomic::Ordering::Relaxed);
        drop(table);
        let mut i = lock(&self.inner);
        if failed.is_some() {
            i.last_error = failed;
        }
        i.staged_bytes = i
            .staged
            .values()
            .flat_map(|m| m.values())
            .filter(|s| s.data.is_some())
            .count() as u64
            * PAGE_SIZE as u64;
        i.committed = epoch;
        i.commits += 1;
        i.pages_applied += applied;
    }

    fn check(&self, epoch: u64, summary: &EpochSummary) -> Result<(), String> {
        self.region.check_linked().map_err(|e| e.to_string())?;
        let i = lock(&self.inner);
        let got = i.received.get(&epoch).copied().unwrap_or(0);
        if got != summary.items {
            return Err(format!(
                "{got} of the {} pages of epoch {epoch} arrived",
                summary.items
            ));
        }
        let table = lock(&self.table);
        let mut fold = table.fold();
        for (p, s) in merged(&i.staged, epoch) {
            fold = fold
                .wrapping_sub(mix(p, table.get(p)))
                .wrapping_add(mix(p, s.digest));
        }
        if fold != summary.digest {
            return Err(format!(
                "region digest {fold:016x} after epoch {epoch} differs from the primary's {:016x}",
                summary.digest
            ));
        }
        Ok(())
    }
}

impl SecondaryParticipant for MemoryReplica {
    fn id(&self) -> u16 {
        self.id
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn resume(&self, epoch: u64) {
        let mut i = lock(&self.inner);
        i.staged.clear();
        i.received.clear();
        i.staged_bytes = 0;
        tracing::debug!(region = %self.region.path().display(), epoch, "memory session resumed");
    }

    fn receive(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let pages = self.region.pages();
        let r = match wire::decode(message, pages)? {
            Message::Hello {
                version,
                page_size,
                pages: theirs,
            } => {
                if version != wire::VERSION || page_size as usize != PAGE_SIZE {
                    Err(format!(
                        "memrep message version {version} with {page_size}-byte pages (this node: version {} with {PAGE_SIZE})",
                        wire::VERSION
                    ))
                } else {
                    if theirs != pages {
                        tracing::error!(
                            region = %self.region.path().display(),
                            ours = self.region.len(),
                            theirs = theirs * PAGE_SIZE as u64,
                            "memory region sizes differ"
                        );
                    }
                    // The primary compares the sizes and refuses for good.
                    Ok(wire::hello_answer(pages, self.fold()))
                }
            }
            Message::Digests { first, count } => {
                let t = lock(&self.table);
                Ok(wire::digests_answer(
                    &t.digests()[first as usize..(first + u64::from(count)) as usize],
                ))
            }
            Message::Verify { first, count } => {
                // The region as it is (a commit cannot run meanwhile): what verify compares.
                let _t = lock(&self.table);
                let mut page = Box::new([0u8; PAGE_SIZE]);
                let d: Vec<u64> = crate::primary::heavy(|| {
                    (first..first + u64::from(count))
                        .map(|p| {
                            self.region.load_page(p, &mut page);
                            page_hash(&page[..])
                        })
                        .collect()
                });
                Ok(wire::digests_answer(&d))
            }
            Message::Pages { epoch, entries } => self.stage(epoch, entries).map(|()| Vec::new()),
        };
        if let Err(e) = &r {
            lock(&self.inner).last_error = Some(e.clone());
        }
        r
    }

    fn prepare<'a>(
        &'a self,
        epoch: u64,
        summary: &'a EpochSummary,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let r = self.check(epoch, summary);
            if let Err(e) = &r {
                lock(&self.inner).last_error = Some(e.clone());
            }
            r
        })
    }

    fn commit(&self, epoch: u64) {
        crate::primary::heavy(|| self.apply(epoch));
    }

    fn abort(&self, epoch: u64, reason: &str) {
        tracing::debug!(region = %self.region.path().display(), epoch, reason, "memory checkpoint aborted");
    }

    fn failover(
        &self,
        _target: FailoverTarget,
        committed: u64,
    ) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            // Whatever the target, memory is the last checkpoint's: pages staged since are
            // part of an epoch that never committed.
            {
                let mut i = lock(&self.inner);
                i.staged.clear();
                i.received.clear();
                i.staged_bytes = 0;
                i.committed = committed;
            }
            self.region
                .sync()
                .map_err(|e| format!("msync {}: {e}", self.region.path().display()))?;
            tracing::info!(region = %self.region.path().display(), epoch = committed, "memory region holds the committed checkpoint");
            Ok(())
        })
    }

    fn status(&self) -> serde_json::Value {
        let i = lock(&self.inner);
        json!({
            "region": self.region.path(),
            "bytes": self.region.len(),
            "committed_epoch": i.committed,
            "commits": i.commits,
            "pages_applied": i.pages_applied,
            "bytes_received": i.bytes_received,
            "staged_pages": i.staged.values().map(|m| m.len() as u64).sum::<u64>(),
            "staged_bytes": i.staged_bytes,
            "digest": format!("{:016x}", self.fold()),
            "last_error": i.last_error,
        })
    }
}
