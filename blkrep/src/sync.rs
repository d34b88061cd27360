//! Small concurrency helpers shared by the storage, NBD and replication layers.
//!
//! - [`Locked`]: take a `std::sync::Mutex` even if a panicking thread poisoned it. Every
//!   mutex here guards plain bookkeeping that stays consistent between statements, so a
//!   poisoned lock is still safe to use; one panic must not take the daemon down with it.
//! - [`BlockRangeLock`]: serialise writers whose block ranges overlap.
//! - [`Unfinished`]: work answered before it finished, and a wait for all of it.
//! - [`GroupSync`]: one flush at a time, shared by every caller that arrived before it began.
//! - [`BoxFuture`]: the boxed future that object-safe async traits return.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Lock a mutex, ignoring poison (see the module docs for why that is sound here).
pub trait Locked<T> {
    /// The guard, whether or not an earlier holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serialises writers whose block ranges overlap.
#[derive(Debug, Default)]
pub struct BlockRangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// Releases its range when dropped.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a BlockRangeLock,
    range: (u64, u64),
}

impl BlockRangeLock {
    /// Wait until no held range overlaps `[first, last]`, then hold it.
    pub async fn lock(&self, first: u64, last: u64) -> RangeGuard<'_> {
        loop {
            let notified = {
                let mut held = self.held.locked();
                if !held.iter().any(|&(a, b)| a <= last && first <= b) {
                    held.push((first, last));
                    return RangeGuard {
                        lock: self,
                        range: (first, last),
                    };
                }
                // Registered before the mutex is released, so a release cannot slip between.
                self.released.notified()
            };
            notified.await;
        }
    }
}

impl BlockRangeLock {
    /// [`BlockRangeLock::lock`], with a guard that owns its lock (for a task of its own).
    pub async fn lock_owned(self: &Arc<Self>, first: u64, last: u64) -> OwnedRangeGuard {
        let g = self.lock(first, last).await;
        let range = g.range;
        std::mem::forget(g);
        OwnedRangeGuard {
            lock: self.clone(),
            range,
        }
    }

    fn release(&self, range: (u64, u64)) {
        let mut held = self.held.locked();
        if let Some(i) = held.iter().position(|&r| r == range) {
            held.swap_remove(i);
        }
        drop(held);
        self.released.notify_waiters();
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.lock.release(self.range);
    }
}

/// A [`RangeGuard`] that owns its lock.
#[derive(Debug)]
pub struct OwnedRangeGuard {
    lock: Arc<BlockRangeLock>,
    range: (u64, u64),
}

impl Drop for OwnedRangeGuard {
    fn drop(&mut self) {
        self.lock.release(self.range);
    }
}

/// Work that was answered before it finished (a write acknowledged on receipt and applied
/// afterwards): each item holds a ticket until it is done, and [`Unfinished::drain`] waits
/// for every item that started before the call (not for later ones, so a steady stream of
/// new work cannot hold it back).
#[derive(Debug, Default)]
pub struct Unfinished {
    /// The next ticket's number, and the numbers of the tickets still held.
    state: Mutex<(u64, BTreeSet<u64>)>,
    done: Notify,
}

/// Held while one item of [`Unfinished`] work runs; dropping it (even by a panic) ends it.
#[derive(Debug)]
pub struct UnfinishedTicket {
    of: Arc<Unfinished>,
    n: u64,
}

impl Unfinished {
    /// Start an item.
    pub fn start(self: &Arc<Self>) -> UnfinishedTicket {
        let mut s = self.state.locked();
        let n = s.0;
        s.0 += 1;
        s.1.insert(n);
        UnfinishedTicket {
            of: self.clone(),
            n,
        }
    }

    /// Items not finished yet.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state.locked().1.len()
    }

    /// Whether every item has finished.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Return once every item started before this call has finished.
    pub async fn drain(&self) {
        let upto = self.state.locked().0;
        loop {
            let notified = {
                let s = self.state.locked();
                if s.1.first().is_none_or(|&n| n >= upto) {
                    return;
                }
                // Created under the mutex, so a finish cannot slip between check and wait.
                self.done.notified()
            };
            notified.await;
        }
    }
}

impl Drop for UnfinishedTicket {
    fn drop(&mut self) {
        self.of.state.locked().1.remove(&self.n);
        self.of.done.notify_waiters();
    }
}

/// One flush at a time, shared by every caller that arrived before it started.
#[derive(Debug, Default)]
pub struct GroupSync {
    state: Mutex<SyncState>,
    done: Notify,
}

#[derive(Debug, Default)]
struct SyncState {
    started: u64,
    done: u64,
    running: bool,
}

impl GroupSync {
    /// Return once a flush that started after this call has completed.
    ///
    /// `flush` starts one flush (of a disk, say); it is called only by the caller that
    /// runs the next flush, and its error is returned to that caller alone, while the
    /// callers waiting on it try again.
    pub async fn run<E, F, Fut>(&self, flush: F) -> Result<(), E>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let need = self.state.locked().started + 1;
        loop {
            // Either we run the next flush (Ok(gen)) or wait for the running one (Err).
            let step = {
                let mut s = self.state.locked();
                if s.done >= need {
                    return Ok(());
                }
                if s.running {
                    Err(self.done.notified())
                } else {
                    s.running = true;
                    s.started += 1;
                    Ok(s.started)
                }
            };
            match step {
                Err(notified) => notified.await,
                Ok(gen) => {
                    let r = flush().await;
                    {
                        let mut s = self.state.locked();
                        s.running = false;
                        if r.is_ok() {
                            s.done = gen;
                        }
                    }
                    self.done.notify_waiters();
                    r?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let l = std::sync::Arc::new(BlockRangeLock::default());
        let g = l.lock(0, 9).await;
        let _other = l.lock(10, 20).await; // disjoint: immediate
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(5, 5).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "an overlapping range must wait");
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("released range is taken")
            .unwrap();
    }

    #[tokio::test]
    async fn an_owned_guard_holds_its_range_until_dropped() {
        let l = Arc::new(BlockRangeLock::default());
        let g = l.lock_owned(3, 4).await;
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(4, 8).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "an overlapping range must wait");
        tokio::spawn(async move { drop(g) }).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("released range is taken")
            .unwrap();
    }

    #[tokio::test]
    async fn drain_waits_for_earlier_work_only() {
        let u = Arc::new(Unfinished::default());
        let first = u.start();
        let u2 = u.clone();
        let drain = tokio::spawn(async move { u2.drain().await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // Work started after the drain began does not hold it back.
        let later = u.start();
        assert!(!drain.is_finished(), "drain must wait for the earlier item");
        assert_eq!(u.len(), 2);
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), drain)
            .await
            .expect("drain ends once the earlier item is done")
            .unwrap();
        assert_eq!(u.len(), 1);
        drop(later);
        assert!(u.is_empty());
        u.drain().await;
    }

    #[tokio::test]
    async fn group_sync_runs_the_flush_it_is_given() {
        let flushes = std::sync::atomic::AtomicU32::new(0);
        let sync = GroupSync::default();
        let flush = || async {
            flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok::<(), &str>(())
        };
        sync.run(flush).await.unwrap();
        sync.run(flush).await.unwrap();
        assert_eq!(flushes.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(sync.run(|| async { Err("failed") }).await, Err("failed"));
    }

    #[test]
    fn a_poisoned_mutex_is_still_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.lock().is_err());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
    }
}
