//! The engine thread: the ring, the queue callers push requests onto, and the loop that
//! submits them, retries short transfers and answers each caller.

use crate::sync::Locked;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use crate::storage::IoBuf;

/// What the engine answers: the buffer back (for reads and writes) or nothing.
pub(super) type Answer = io::Result<Option<IoBuf>>;

#[derive(Debug)]
pub(super) enum Work {
    Read { buf: IoBuf },
    Write { buf: IoBuf, fua: bool },
    Fsync,
    Fallocate { len: u64, mode: i32 },
}

#[derive(Debug)]
pub(super) struct Request {
    pub(super) work: Work,
    pub(super) offset: u64,
    pub(super) reply: oneshot::Sender<Answer>,
}

/// State shared between callers and the engine thread.
#[derive(Debug)]
pub(super) struct Engine {
    pub(super) queue: Mutex<Queue>,
    /// False while the engine thread may be blocked in `io_uring_enter`.
    pub(super) awake: AtomicBool,
    pub(super) eventfd: OwnedFd,
}

#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) requests: Vec<Request>,
    pub(super) stopping: bool,
}

impl Engine {
    pub(super) fn submit(&self, req: Request) -> std::result::Result<(), Request> {
        {
            let mut q = self.queue.locked();
            if q.stopping {
                return Err(req);
            }
            q.requests.push(req);
        }
        self.wake();
        Ok(())
    }

    pub(super) fn wake(&self) {
        if !self.awake.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
            let r =
                unsafe { libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
            debug_assert!(r == 8 || io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock);
        }
    }
}

/// Complete the pending eventfd read before the ring (and the buffer it writes to) go away.
pub(super) fn drain_wake_read(ring: &mut IoUring, engine: &Engine, need_rearm: bool) {
    if need_rearm {
        return;
    }
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    unsafe { libc::write(engine.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    for _ in 0..100 {
        if ring.submit_and_wait(1).is_err() {
            continue;
        }
        if ring.completion().any(|c| c.user_data() == WAKE_TOKEN) {
            return;
        }
    }
}

/// One request inside the kernel, and how much of it is done.
pub(super) struct InFlight {
    req: Request,
    done: u64,
}

pub(super) const WAKE_TOKEN: u64 = u64::MAX;

pub(super) fn sqe_for(fd: RawFd, f: &mut InFlight) -> squeue::Entry {
    let fd = types::Fd(fd);
    let at = f.req.offset + f.done;
    let done = f.done as usize;
    match &mut f.req.work {
        Work::Read { buf } => {
            let rest = (buf.len() - done) as u32;
            // SAFETY: the pointer stays within `buf`, which the engine keeps until completion.
            opcode::Read::new(fd, unsafe { buf.as_mut_ptr().add(done) }, rest)
                .offset(at)
                .build()
        }
        Work::Write { buf, fua } => {
            let rest = (buf.len() - done) as u32;
            let flags = if *fua { libc::RWF_DSYNC } else { 0 };
            // SAFETY: as for reads; the kernel only reads from the buffer.
            opcode::Write::new(fd, unsafe { buf.as_ptr().add(done) }, rest)
                .offset(at)
                .rw_flags(flags)
                .build()
        }
        Work::Fsync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Work::Fallocate { len, mode } => opcode::Fallocate::new(fd, *len)
            .offset(f.req.offset)
            .mode(*mode)
            .build(),
    }
}

pub(super) fn total_len(w: &Work) -> u64 {
    match w {
        Work::Read { buf } | Work::Write { buf, .. } => buf.len() as u64,
        Work::Fsync | Work::Fallocate { .. } => 0,
    }
}

pub(super) fn run_engine(mut ring: IoUring, fd: RawFd, depth: usize, engine: &Engine) {
    let mut slots: Vec<Option<InFlight>> = (0..depth).map(|_| None).collect();
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut waiting: VecDeque<Request> = VecDeque::new();
    let mut wake_buf = [0u8; 8];
    let efd = engine.eventfd.as_raw_fd();
    let wake_sqe = |buf: &mut [u8; 8]| {
        opcode::Read::new(types::Fd(efd), buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE_TOKEN)
    };
    let mut need_rearm = true;
    let mut in_flight = 0usize;
    loop {
        let stopping = {
            let mut q = engine.queue.locked();
            waiting.extend(q.requests.drain(..));
            q.stopping
        };
        {
            let mut sq = ring.submission();
            if need_rearm {
                // SAFETY: wake_buf lives on this thread's stack for the whole loop, which
                // outlives every submission (we only leave the loop with nothing in flight
                // but this read, and the ring is dropped, cancelling it, before wake_buf).
                if unsafe { sq.push(&wake_sqe(&mut wake_buf)) }.is_ok() {
                    need_rearm = false;
                }
            }
            while let Some(slot) = free.last().copied() {
                let Some(req) = waiting.pop_front() else {
                    break;
                };
                let mut f = InFlight { req, done: 0 };
                let sqe = sqe_for(fd, &mut f).user_data(slot as u64);
                // SAFETY: the buffer the entry points into is owned by `f`, stored in
                // `slots[slot]` until its completion is reaped below.
                if unsafe { sq.push(&sqe) }.is_err() {
                    waiting.push_front(f.req);
                    break;
                }
                free.pop();
                slots[slot] = Some(f);
                in_flight += 1;
            }
        }
        if stopping && in_flight == 0 && waiting.is_empty() {
            drain_wake_read(&mut ring, engine, need_rearm);
            return;
        }
        // Announce that we may sleep, then look once more so no request is stranded.
        engine.awake.store(false, Ordering::SeqCst);
        let more = !engine.queue.locked().requests.is_empty();
        let want = if more || (stopping && in_flight == 0) {
            0
        } else {
            1
        };
        if more {
            engine.awake.store(true, Ordering::SeqCst);
        }
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                tracing::error!("io_uring_enter failed: {e}; failing all requests");
                for f in slots.iter_mut().filter_map(Option::take) {
                    let _ = f
                        .req
                        .reply
                        .send(Err(io::Error::new(e.kind(), e.to_string())));
                }
                for r in waiting.drain(..) {
                    let _ = r.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
                }
                return;
            }
        }
        engine.awake.store(true, Ordering::SeqCst);
        let mut resubmit = Vec::new();
        for cqe in ring.completion() {
            let token = cqe.user_data();
            if token == WAKE_TOKEN {
                need_rearm = true;
                continue;
            }
            let slot = token as usize;
            let res = cqe.result();
            let mut f = slots[slot].take().expect("completion for an empty slot");
            let total = total_len(&f.req.work);
            let answer = if res == -libc::EINTR || res == -libc::EAGAIN {
                None
            } else if res < 0 {
                Some(Err(io::Error::from_raw_os_error(-res)))
            } else if total > 0 && res == 0 {
                Some(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "short transfer: the disk ended early",
                )))
            } else {
                f.done += res as u64;
                (f.done >= total).then_some(Ok(()))
            };
            match answer {
                None => resubmit.push((slot, f)),
                Some(r) => {
                    let buf = match f.req.work {
                        Work::Read { buf } | Work::Write { buf, .. } => Some(buf),
                        _ => None,
                    };
                    let _ = f.req.reply.send(r.map(|()| buf));
                    free.push(slot);
                    in_flight -= 1;
                }
            }
        }
        // Partial transfers and interrupted requests continue where they stopped.
        for (slot, mut f) in resubmit {
            let sqe = sqe_for(fd, &mut f).user_data(slot as u64);
            slots[slot] = Some(f);
            // SAFETY: as above; the slot keeps the buffer alive until completion. The ring has
            // room: this slot's previous entry has completed.
            while unsafe { ring.submission().push(&sqe) }.is_err() {
                let _ = ring.submit();
            }
        }
    }
}
