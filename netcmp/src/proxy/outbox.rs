//! A socket written from wherever its bytes are produced: inline, without waking another
//! task, while the socket takes them; by its own task ([`Outbox::run`]) for whatever it did
//! not take. Order is kept: nothing is written inline while older bytes wait.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use socket2::SockRef;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

enum Item {
    Data(Vec<u8>, usize),
    End { reset: bool },
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    /// The writer task is writing an item it took from the queue.
    writing: bool,
    failed: bool,
}

/// How an outbox's writer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// Everything was written and the write side shut down (FIN).
    Fin,
    /// A reset was asked for: linger 0 is set, so closing the socket sends an RST.
    Reset,
    /// A write failed (the peer is gone), or the outbox was dropped from the core.
    Failed,
}

/// See the module documentation.
pub(super) struct Outbox {
    half: OwnedWriteHalf,
    queue: Mutex<Queue>,
    /// Bytes waiting in the queue.
    queued: AtomicUsize,
    wake: Notify,
    /// Woken whenever queued bytes were written (readers waiting for room).
    pub(super) room: Notify,
}

impl Outbox {
    pub(super) fn new(half: OwnedWriteHalf) -> Arc<Outbox> {
        Arc::new(Outbox {
            half,
            queue: Mutex::new(Queue::default()),
            queued: AtomicUsize::new(0),
            wake: Notify::new(),
            room: Notify::new(),
        })
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes not written yet.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Write `data` now as far as the socket takes it; queue the rest for [`Outbox::run`].
    pub(super) fn push(&self, data: Vec<u8>) {
        let mut q = self.queue();
        if q.failed {
            return;
        }
        let mut done = 0;
        if q.items.is_empty() && !q.writing {
            while done < data.len() {
                match self.half.try_write(&data[done..]) {
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        q.failed = true;
                        self.wake.notify_one();
                        return;
                    }
                }
            }
        }
        if done < data.len() {
            self.queued.fetch_add(data.len() - done, Ordering::Relaxed);
            q.items.push_back(Item::Data(data, done));
            self.wake.notify_one();
        }
    }

    /// End the output after what is queued: FIN, or RST when `reset`.
    pub(super) fn finish(&self, reset: bool) {
        self.queue().items.push_back(Item::End { reset });
        self.wake.notify_one();
    }

    /// Write what was queued until an end or a failure.
    pub(super) async fn run(self: Arc<Self>) -> Ended {
        loop {
            let item = {
                let mut q = self.queue();
                if q.failed {
                    return Ended::Failed;
                }
                let item = q.items.pop_front();
                q.writing = item.is_some();
                item
            };
            match item {
                None => self.wake.notified().await,
                Some(Item::Data(data, mut done)) => {
                    while done < data.len() {
                        if self.half.writable().await.is_err() {
                            return self.fail();
                        }
                        match self.half.try_write(&data[done..]) {
                            Ok(n) => {
                                done += n;
                                self.queued.fetch_sub(n, Ordering::Relaxed);
                                self.room.notify_one();
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => return self.fail(),
                        }
                    }
                    self.queue().writing = false;
                }
                Some(Item::End { reset: false }) => {
                    let _ = SockRef::from(self.half.as_ref()).shutdown(std::net::Shutdown::Write);
                    return Ended::Fin;
                }
                Some(Item::End { reset: true }) => {
                    let _ = SockRef::from(self.half.as_ref()).set_linger(Some(Default::default()));
                    return Ended::Reset;
                }
            }
        }
    }

    fn fail(&self) -> Ended {
        self.queue().failed = true;
        Ended::Failed
    }
}
