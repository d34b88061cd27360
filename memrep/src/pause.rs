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

/// One writer lockstep pauses.
#[derive(Debug)]
struct Writer {
    pid: u32,
    stream: tokio::net::UnixStream,
    /// Paused by the pause in progress: only such writers are sent a resume.
    paused: bool,
}

/// lockstep's end: a guest hook that pauses every writer that handed over.
#[derive(Debug)]
pub struct WriterPause {
    writers: tokio::sync::Mutex<Vec<Writer>>,
    patience: Duration,
}

impl WriterPause {
    /// No writers yet; a writer that does not answer a pause within `patience` fails it.
    pub fn new(patience: Duration) -> WriterPause {
        WriterPause {
            writers: tokio::sync::Mutex::new(Vec::new()),
            patience,
        }
    }

    /// Pause writer `pid` at every checkpoint from now on, over the hand-over connection.
    /// Called from a blocking thread (it waits for a pause in progress to end, so that a
    /// writer joining mid-checkpoint is not sent the resume of a pause it never saw).
    pub fn add(&self, pid: u32, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        self.writers.blocking_lock().push(Writer {
            pid,
            stream,
            paused: false,
        });
        Ok(())
    }

    /// Writers paused at checkpoints now.
    pub async fn writers(&self) -> Vec<u32> {
        self.writers.lock().await.iter().map(|w| w.pid).collect()
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
            let mut all = self.writers.lock().await;
            let mut failed = None;
            let mut keep = Vec::new();
            for mut w in all.drain(..) {
                match tokio::time::timeout(self.patience, pause_one(&mut w.stream)).await {
                    Ok(Ok(())) => {
                        w.paused = true;
                        keep.push(w);
                    }
                    // Gone: nothing of it writes any more.
                    Ok(Err(e)) => tracing::info!(pid = w.pid, "writer left: {e}"),
                    // Not cooperating: let it go (closing the connection resumes it) and
                    // say so; it is not paused at later checkpoints.
                    Err(_) => {
                        failed.get_or_insert(format!(
                            "writer pid {} did not pause within {:?}; it is no longer paused at checkpoints",
                            w.pid, self.patience
                        ));
                    }
                }
            }
            *all = keep;
            match failed {
                // Let those that did pause go again.
                Some(why) => {
                    resume_all(&mut all).await;
                    Err(why)
                }
                None => Ok(()),
            }
        })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            resume_all(&mut *self.writers.lock().await).await;
            Ok(())
        })
    }
}

/// Resume the writers the last pause paused; drop those that are gone.
async fn resume_all(all: &mut Vec<Writer>) {
    let mut keep = Vec::new();
    for mut w in all.drain(..) {
        if !std::mem::take(&mut w.paused) {
            keep.push(w);
            continue;
        }
        match w.stream.write_all(&[RESUME]).await {
            Ok(()) => keep.push(w),
            Err(e) => tracing::info!(pid = w.pid, "writer left: {e}"),
        }
    }
    *all = keep;
}
