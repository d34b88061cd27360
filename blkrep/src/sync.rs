//! Small concurrency helpers shared by the storage, NBD and replication layers.
//!
//! - [`Locked`]: take a `std::sync::Mutex` even if a panicking thread poisoned it. Every
//!   mutex here guards plain bookkeeping that stays consistent between statements, so a
//!   poisoned lock is still safe to use; one panic must not take the daemon down with it.
//! - [`BlockRangeLock`]: serialise writers whose block ranges overlap.
//! - [`GroupSync`]: one flush at a time, shared by every caller that arrived before it began.
//! - [`BoxFuture`]: the boxed future that object-safe async traits return.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};

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

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.locked();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.lock.released.notify_waiters();
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
