//! Applying the primary's forwarded writes: copy-before-write of the originals into the
//! [`DiskBuffer`](crate::replica::buffer::DiskBuffer), then write-through to the disk, counted
//! per epoch so that the checkpoint can be checked against the primary's summary.
//!
//! ```text
//!  NBD "replica" export ─▶ ReplicaSink::connect ─▶ ReplicaConn (bound to a session token)
//!      write / trim / zeroes ─▶ Secondary::admit_forwarded: fence check ─▶ range lock
//!            ─▶ preserve(originals of epoch n) ─▶ apply to disk ─▶ count (or poison epoch n)
//!            ─▶ answer
//!      ack mode received, no FUA: answer right after the range lock; the rest runs as a
//!            task of its own, holding the lock (and the barrier) until it is applied
//!      flush ─▶ wait for what was answered early ─▶ flush the disk (or the failure)
//!      epoch mark n+1 ─▶ Secondary::begin_epoch: later writes belong to epoch n+1
//! ```
//!
//! A write answered early that then fails poisons its epoch, exactly as one that failed
//! before its answer: that checkpoint cannot commit (the primary resyncs), and the next
//! FLUSH fails. What was answered early is applied before any FLUSH, checkpoint, failover,
//! RESUME or GOODBYE completes, and a read of the same blocks waits for it (range lock).

use std::sync::Arc;
use std::time::Duration;

use super::{blocks_of, spill_error, Mode, Secondary};
use crate::nbd::server::EpochSink;
use crate::replica::buffer::BUFFER_BLOCK;
use crate::replica::wire::AckMode;
use crate::storage::{check_range, Backend, Extent, IoBuf, IoFuture, Op, Result, StorageError};
use crate::sync::{BoxFuture, OwnedRangeGuard};

/// A forwarded modification admitted into its epoch: it holds the barrier (shared) and the
/// range lock of its blocks until it has been applied and counted.
pub(super) struct Admitted {
    epoch: u64,
    first: u64,
    last: u64,
    /// The session's ack mode is `received`: answer before applying.
    early: bool,
    _barrier: tokio::sync::OwnedRwLockReadGuard<()>,
    _range: OwnedRangeGuard,
}

impl Secondary {
    /// Copy the originals of blocks `first..=last` into `epoch` where not yet kept. The
    /// caller holds the range lock.
    pub(super) async fn preserve(
        &self,
        epoch: u64,
        first: u64,
        last: u64,
        probe_holes: bool,
    ) -> Result<()> {
        let size = self.disk.size();
        let mut b = first;
        while b <= last {
            // A run of blocks whose original is missing, at most 1 MiB.
            let start = {
                let i = self.inner();
                while b <= last && i.buffer.has_original(epoch, b) {
                    b += 1;
                }
                if b > last {
                    break;
                }
                let start = b;
                while b <= last && b - start < 256 && !i.buffer.has_original(epoch, b) {
                    b += 1;
                }
                start
            };
            let off = start * BUFFER_BLOCK;
            let end = (b * BUFFER_BLOCK).min(size);
            let len = end - off;
            // Large ranges (trims and zeroing above all) often cover unallocated space: keep
            // "zero" markers for those instead of reading zeroes. Small runs are just read,
            // which is cheaper than asking.
            let all_zero = (probe_holes || b - start >= 16) && {
                let ext = self.disk.block_status(off, len).await?;
                ext.first().is_some_and(|e: &Extent| e.zero && e.len >= len)
            };
            if all_zero {
                let mut i = self.inner();
                for k in start..b {
                    i.buffer
                        .put_original(epoch, k, None)
                        .map_err(|e| spill_error(off, len, e))?;
                }
                continue;
            }
            let data = self.disk.read_at(off, len as usize).await?;
            let mut i = self.inner();
            for (k, chunk) in data.chunks(BUFFER_BLOCK as usize).enumerate() {
                let mut full;
                let block: &[u8] = if chunk.len() as u64 == BUFFER_BLOCK {
                    chunk
                } else {
                    full = vec![0u8; BUFFER_BLOCK as usize];
                    full[..chunk.len()].copy_from_slice(chunk);
                    &full
                };
                i.buffer
                    .put_original(epoch, start + k as u64, Some(block))
                    .map_err(|e| spill_error(off, len, e))?;
            }
        }
        Ok(())
    }

    /// Admit one forwarded modification: fence check, its epoch, its range lock.
    async fn admit_forwarded(&self, token: u64, op: Op, offset: u64, len: u64) -> Result<Admitted> {
        check_range(op, offset, len, self.disk.size(), 1)?;
        let barrier = self.barrier.clone().read_owned().await;
        let (epoch, early) = {
            let i = self.inner();
            if i.token != token {
                return Err(StorageError::Unavailable(FENCED.into()));
            }
            if i.mode != Mode::Replicating {
                return Err(StorageError::Unavailable(format!(
                    "this secondary is {}: forwarded writes are refused",
                    i.mode.name()
                )));
            }
            (i.current, i.ack == AckMode::Received)
        };
        let (first, last) = blocks_of(offset, len);
        let range = self.locks.lock_owned(first, last).await;
        Ok(Admitted {
            epoch,
            first,
            last,
            early,
            _barrier: barrier,
            _range: range,
        })
    }

    /// An admitted modification: preserve originals, apply, account.
    async fn apply_admitted(
        &self,
        a: &Admitted,
        op: Op,
        len: u64,
        apply: IoFuture<'_, ()>,
    ) -> Result<()> {
        let r = async {
            if len > 0 {
                self.preserve(a.epoch, a.first, a.last, op != Op::Write)
                    .await?;
            }
            apply.await
        }
        .await;
        let mut i = self.inner();
        match &r {
            Ok(()) => {
                let c = i.counts.entry(a.epoch).or_default();
                c.items += 1;
                c.bytes += len;
                i.forwarded_writes += 1;
                i.forwarded_bytes += len;
            }
            Err(e) => {
                // The epoch can no longer be committed: its data is incomplete.
                i.poisoned.entry(a.epoch).or_insert_with(|| e.to_string());
            }
        }
        r
    }

    /// One forwarded modification, answered once applied; in ack mode `received` (unless
    /// `durable_now`: a FUA write) answered once admitted, and applied by a task of its own.
    async fn forwarded(
        self: &Arc<Self>,
        token: u64,
        op: Op,
        offset: u64,
        len: u64,
        durable_now: bool,
        apply: IoFuture<'static, ()>,
    ) -> Result<()> {
        let a = self.admit_forwarded(token, op, offset, len).await?;
        if !a.early || durable_now {
            return self.apply_admitted(&a, op, len, apply).await;
        }
        let ticket = self.early.start();
        let sec = self.clone();
        tokio::spawn(async move {
            if let Err(e) = sec.apply_admitted(&a, op, len, apply).await {
                tracing::warn!(
                    epoch = a.epoch,
                    offset,
                    len,
                    "a {op} answered on receipt failed here: {e}"
                );
            }
            drop(a);
            drop(ticket);
        });
        Ok(())
    }

    /// Wait until every forwarded write answered on receipt so far is applied (before a
    /// checkpoint's flush, at shutdown).
    pub async fn applied_early(&self) {
        self.early.drain().await;
    }

    /// Wait until every forwarded write answered on receipt so far is applied; then fail if
    /// one of the running session's writes failed here (its epoch cannot commit).
    pub(super) async fn applied(&self) -> Result<()> {
        self.applied_early().await;
        let i = self.inner();
        match i.poisoned.iter().next() {
            Some((epoch, e)) => Err(StorageError::Unavailable(format!(
                "a forwarded write of epoch {epoch} failed here: {e}"
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn begin_epoch(&self, token: u64, epoch: u64) -> std::result::Result<(), String> {
        let mut i = self.inner();
        if i.token != token {
            return Err(FENCED.into());
        }
        if i.mode != Mode::Replicating {
            return Err(format!("epoch mark while {}", i.mode.name()));
        }
        if epoch != i.current + 1 {
            return Err(format!(
                "epoch mark for {epoch} while receiving epoch {}",
                i.current
            ));
        }
        i.current = epoch;
        Ok(())
    }
}

/// The export the primary forwards to: copy-before-write, then write-through. Each NBD
/// connection gets its own [`ReplicaConn`], bound to the session it was opened in.
#[derive(Debug)]
pub struct ReplicaSink(pub(super) Arc<Secondary>);

impl ReplicaSink {
    fn conn(&self) -> ReplicaConn {
        ReplicaConn {
            sec: self.0.clone(),
            token: self.0.inner().token,
        }
    }
}

impl EpochSink for ReplicaSink {
    fn begin_epoch(&self, _epoch: u64, _drain: Duration) -> std::result::Result<(), String> {
        Err(no_session().to_string())
    }
    fn connect(&self, session: Option<u64>) -> Option<(Arc<dyn Backend>, Arc<dyn EpochSink>)> {
        let mut c = self.conn();
        if let Some(token) = session {
            c.token = token;
        }
        let c = Arc::new(c);
        Some((c.clone(), c))
    }
}

/// One replication connection: requests count only while the session it was opened in
/// lasts.
#[derive(Debug)]
pub struct ReplicaConn {
    sec: Arc<Secondary>,
    token: u64,
}

impl EpochSink for ReplicaConn {
    fn begin_epoch(&self, epoch: u64, drain: Duration) -> std::result::Result<(), String> {
        self.sec.inner().mark_drain.record(drain);
        self.sec.begin_epoch(self.token, epoch)
    }
    fn participant(
        &self,
        id: u16,
        message: Vec<u8>,
    ) -> BoxFuture<'_, std::result::Result<Vec<u8>, String>> {
        Box::pin(self.sec.participant_message(self.token, id, message))
    }
}

/// The export's own backend only describes the disk: replication requests go through the
/// [`ReplicaConn`] the server opens for each connection ([`EpochSink::connect`]), so a write
/// without one is refused rather than applied outside any session.
impl Backend for ReplicaSink {
    fn size(&self) -> u64 {
        self.0.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.0.disk.read_at(offset, len)
    }
    fn write_at(&self, _offset: u64, _data: IoBuf, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async { Err(no_session()) })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.0.flush_disk())
    }
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Err(no_session()) })
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(async { Err(no_session()) })
    }
}

/// Why a request of a fenced-off replication connection is refused.
const FENCED: &str = "this replication connection belongs to an interrupted session";

fn no_session() -> StorageError {
    StorageError::Unavailable("a replication write outside any connection's session".into())
}

impl Backend for ReplicaConn {
    fn size(&self) -> u64 {
        self.sec.disk.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.sec.disk.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        let s = self.sec.clone();
        let len = data.len() as u64;
        let apply = Box::pin(async move {
            s.disk.write_at(offset, data, false).await?;
            if fua {
                s.flush_disk().await?;
            }
            Ok(())
        });
        Box::pin(
            self.sec
                .forwarded(self.token, Op::Write, offset, len, fua, apply),
        )
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.sec.applied().await?;
            self.sec.flush_disk().await
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        let s = self.sec.clone();
        let apply = Box::pin(async move { s.disk.discard(offset, len).await });
        Box::pin(
            self.sec
                .forwarded(self.token, Op::Discard, offset, len, false, apply),
        )
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        let s = self.sec.clone();
        let apply = Box::pin(async move { s.disk.write_zeroes(offset, len, may_unmap).await });
        Box::pin(
            self.sec
                .forwarded(self.token, Op::WriteZeroes, offset, len, false, apply),
        )
    }
}
