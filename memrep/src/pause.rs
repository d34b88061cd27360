//! Pausing cooperating writers around a checkpoint's cut, over the unix connection each one
//! handed its descriptors over on ([`crate::handoff`]).
//!
//! ```text
//!  lockstep                         writer
//!    P  (pause)            ───▶     finishes the step it is in (memory and disk alike),
//!                          ◀───  p  then waits
//!    ... cut: disk and memory of the same instant ...
//!    R  (resume)           ───▶     goes on
//! ```
//!
//! A checkpoint of memory and disk is one instant of the writer only if the writer stands
//! still at a point where both agree; the writer chooses those points by calling
//! [`WriterLink::pause_point`] between its steps (QEMU's `stop` does the same for a VM: vCPUs
//! leave guest mode and in-flight I/O drains). A writer that has exited needs no pause; one
//! that does not answer within the patience fails the pause, and no checkpoint runs.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use blkrep::epoch::{BoxFuture, GuestHook};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PAUSE: u8 = b'P';
const PAUSED: u8 = b'p';
const RESUME: u8 = b'R';

/// The writer's end: call [`WriterLink::pause_point`] between steps.
#[derive(Debug)]
pub struct WriterLink {
    stream: UnixStream,
}

impl WriterLink {
    /// The connection the hand-over was made on.
    pub fn new(stream: UnixStream) -> WriterLink {
        WriterLink { stream }
    }

    /// If lockstep asked for a pause, say so and wait until it resumes us; returns whether a
    /// pause happened. If lockstep is gone, the writer goes on unpaused.
    pub fn pause_point(&mut self) -> io::Result<bool> {
        self.stream.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        let r = self.stream.read(&mut b);
        self.stream.set_nonblocking(false)?;
        match r {
            Ok(0) => return Ok(false),
            Ok(_) if b[0] == PAUSE => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected byte {:#x} from lockstep", b[0]),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
        self.stream.write_all(&[PAUSED])?;
        self.stream.set_read_timeout(None)?;
        loop {
            match self.stream.read(&mut b)? {
                0 => return Ok(true),
                _ if b[0] == RESUME => return Ok(true),
                _ => {}
            }
        }
    }
}

/// lockstep's end: a guest hook that pauses every writer that handed over.
#[derive(Debug)]
pub struct WriterPause {
    writers: Mutex<Vec<(u32, Option<tokio::net::UnixStream>)>>,
    patience: Duration,
}

impl WriterPause {
    /// No writers yet; a writer that does not answer a pause within `patience` fails it.
    pub fn new(patience: Duration) -> WriterPause {
        WriterPause {
            writers: Mutex::new(Vec::new()),
            patience,
        }
    }

    /// Pause writer `pid` at every checkpoint from now on, over the hand-over connection.
    pub fn add(&self, pid: u32, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let s = tokio::net::UnixStream::from_std(stream)?;
        self.lock().push((pid, Some(s)));
        Ok(())
    }

    /// Writers paused at checkpoints now.
    pub fn writers(&self) -> Vec<u32> {
        self.lock().iter().map(|(p, _)| *p).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u32, Option<tokio::net::UnixStream>)>> {
        self.writers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Take the streams out (the lock is not held across awaits), and put back those whose
    /// writer is still there.
    fn take(&self) -> Vec<(u32, tokio::net::UnixStream)> {
        self.lock()
            .iter_mut()
            .filter_map(|(p, s)| s.take().map(|s| (*p, s)))
            .collect()
    }

    fn put_back(&self, alive: Vec<(u32, tokio::net::UnixStream)>) {
        let mut w = self.lock();
        w.retain(|(_, s)| s.is_some());
        w.extend(alive.into_iter().map(|(p, s)| (p, Some(s))));
    }
}

async fn pause_one(s: &mut tokio::net::UnixStream) -> io::Result<()> {
    s.write_all(&[PAUSE]).await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    if b[0] != PAUSED {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the writer answered {:#x} to a pause", b[0]),
        ));
    }
    Ok(())
}

impl GuestHook for WriterPause {
    fn pause(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut alive = Vec::new();
            let mut failed = None;
            for (pid, mut s) in self.take() {
                match tokio::time::timeout(self.patience, pause_one(&mut s)).await {
                    Ok(Ok(())) => alive.push((pid, s)),
                    // Gone: nothing of it writes any more.
                    Ok(Err(e)) => tracing::info!(pid, "writer left: {e}"),
                    // Not cooperating: let it go (closing the connection resumes it) and
                    // say so; it is not paused at later checkpoints.
                    Err(_) => {
                        failed.get_or_insert(format!(
                            "writer pid {pid} did not pause within {:?}; it is no longer paused at checkpoints",
                            self.patience
                        ));
                    }
                }
            }
            let r = match failed {
                // Let those that did pause go again.
                Some(why) => {
                    for (_, s) in &mut alive {
                        let _ = s.write_all(&[RESUME]).await;
                    }
                    Err(why)
                }
                None => Ok(()),
            };
            self.put_back(alive);
            r
        })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut alive = Vec::new();
            for (pid, mut s) in self.take() {
                match s.write_all(&[RESUME]).await {
                    Ok(()) => alive.push((pid, s)),
                    Err(e) => tracing::info!(pid, "writer left: {e}"),
                }
            }
            self.put_back(alive);
            Ok(())
        })
    }
}
