//! The client write path: every modification (write, trim, write-zeroes) goes to the local
//! disk under its block range lock, updates the digest table, and, while replicating, is
//! accounted in the current epoch and queued for the forwarder; a flush is forwarded too.
//!
//! ```text
//!  modify: range lock ─▶ hash covered blocks ─▶ local disk ─▶ hash edge blocks (read back)
//!          ─▶ queue budget ─▶ gate(read): digest table; replicating: account + enqueue,
//!                                                       otherwise: dirty (+ new generation)
//!          ─▶ ack (local: now; received / durable / sync: after the secondary's reply)
//!  ack mode sync: the local disk is wrapped in storage::WriteThrough (Primary::new), so the
//!          local modification is durable too, the promise the forwarded one carries
//!  the local write or a read-back fails ─▶ gate(write): dirty + digest unknown, and the
//!          session ends (link_lost) ─▶ the client's error
//! ```

use tokio::sync::oneshot;

use super::queue::FwdKind;
use super::{Primary, PrimaryMode};
use crate::digest::{self, DIGEST_BLOCK};
use crate::replica::wire::AckMode;
use crate::storage::{check_range, Backend, Extent, IoBuf, IoFuture, Op, Result};

/// Client writes to a range of blocks wait while this is held.
#[derive(Debug)]
pub struct BlockLock<'a>(#[allow(dead_code)] crate::sync::RangeGuard<'a>);

impl Primary {
    /// Lock blocks `first..=last` against client writes (online verify).
    pub async fn lock_blocks(&self, first: u64, last: u64) -> BlockLock<'_> {
        BlockLock(self.locks.lock(first, last).await)
    }

    /// Local modification + hashing + forwarding; the shared path of write/trim/zeroes.
    async fn modify(
        &self,
        op: Op,
        offset: u64,
        len: u64,
        kind: FwdKind,
        local: IoFuture<'_, ()>,
    ) -> Result<()> {
        check_range(op, offset, len, self.local.size(), 1)?;
        if len == 0 {
            return local.await;
        }
        if len > u64::from(u32::MAX) {
            // NBD carries at most 4 GiB - 1 per request; our frontends never send more.
            return Err(crate::storage::StorageError::Config(format!(
                "{op} of {len} bytes is larger than one replicated request may be"
            )));
        }
        let first = offset / DIGEST_BLOCK;
        let last = (offset + len - 1) / DIGEST_BLOCK;
        let _g = self.locks.lock(first, last).await;
        // Durably "may differ" before the disk changes (see replica::bitmap).
        let _mark =
            match self.disk_bitmap() {
                Some(b) => Some(b.mark(first, last).await.map_err(|e| {
                    crate::storage::StorageError::Io {
                        op,
                        path: b.path().into(),
                        offset,
                        len,
                        source: e,
                    }
                })?),
                None => None,
            };
        let (mut hashes, edges) = self.covered_hashes(offset, len, &kind);
        if let Err(e) = local.await {
            self.local_failed(op, offset, first, last, &e.to_string())
                .await;
            return Err(e);
        }
        for b in edges {
            match self.read_block_hash(b).await {
                Ok(h) => hashes.push((b, h)),
                Err(e) => {
                    let what = format!("reading back block {b}: {e}");
                    self.local_failed(op, offset, first, last, &what).await;
                    return Err(e);
                }
            }
        }
        let permit = if self.mode() == PrimaryMode::Replicating {
            self.space
                .clone()
                .acquire_many_owned(self.budget(len))
                .await
                .ok()
        } else {
            None
        };
        let (tx, rx) = oneshot::channel();
        let mut disconnected = false;
        let waits = {
            let _gate = self.gate.read().await;
            for (b, h) in hashes {
                self.digest.set(b, h);
            }
            let mut st = self.st();
            match st.mode {
                PrimaryMode::Paused | PrimaryMode::Unprotected => {
                    st.dirty.insert_range(first..=last);
                    disconnected = !st.bumped;
                    false
                }
                PrimaryMode::Replicating => {
                    st.account(first, last, len);
                    drop(st);
                    self.enqueue(kind, offset, len, Some(tx), permit);
                    if let Some(t) = self.trigger.get() {
                        t.add_bytes(len);
                    }
                    self.opts.ack != AckMode::Local
                }
            }
        };
        drop(_g);
        if disconnected {
            self.note_disconnected_write().await;
        }
        if waits {
            // The local write is done; if the secondary is lost meanwhile, the block is
            // recorded as dirty and the client still succeeds.
            if let Ok(Err(e)) = rx.await {
                tracing::debug!("forwarded write at {offset} failed: {e}");
            }
        }
        Ok(())
    }

    /// A local modification of blocks `first..=last` failed after it was started. The
    /// primary cannot tell how much of it reached the disk: a request that fails may have
    /// been applied in part or in full (a torn write), and a failed read-back of an edge
    /// block follows a write that did succeed. Either way the disk may now hold bytes that
    /// were neither forwarded nor hashed, and a checkpoint committed on top of that would
    /// let a failover silently change data the primary served (with a digest that cannot
    /// tell, the table being stale too). So, in one step under the gate (and still under
    /// the block lock): the blocks become dirty and their digest entries unknown (a digest
    /// comparison cannot forget them; the resync sends and rehashes what the disk holds),
    /// and a replicating session ends, so that no epoch commits before that resync.
    ///
    /// A request that failed before touching the disk (ENOSPC up front, say) looks the
    /// same from here and costs a needless reconnect and resync of its blocks; that is the
    /// price of never committing a checkpoint that may differ from the disk.
    async fn local_failed(&self, op: Op, offset: u64, first: u64, last: u64, err: &str) {
        let reason = format!("local {op} at {offset} failed: {err}");
        let disconnected = {
            let _gate = self.gate.write().await;
            let mut st = self.st();
            st.dirty.insert_range(first..=last);
            st.unknown.insert_range(first..=last);
            match st.mode {
                PrimaryMode::Replicating => {
                    self.stop_replicating(st, &reason);
                    false
                }
                PrimaryMode::Paused | PrimaryMode::Unprotected => {
                    tracing::warn!(%reason, first, last, "recording the blocks as dirty");
                    !st.bumped
                }
            }
        };
        // The disk may have changed while disconnected, as for a write that succeeded.
        if disconnected {
            self.note_disconnected_write().await;
        }
    }

    /// Hashes of blocks the request covers completely; edges are read back afterwards (the
    /// second list).
    fn covered_hashes(&self, offset: u64, len: u64, kind: &FwdKind) -> (Vec<(u64, u64)>, Vec<u64>) {
        let size = self.local.size();
        let first = offset / DIGEST_BLOCK;
        let last = (offset + len - 1) / DIGEST_BLOCK;
        let mut hashes = Vec::with_capacity((last - first + 1) as usize);
        let mut edges = Vec::new();
        for b in first..=last {
            let bstart = b * DIGEST_BLOCK;
            let bend = (bstart + DIGEST_BLOCK).min(size);
            if offset <= bstart && offset + len >= bend {
                let h = match kind {
                    FwdKind::Write { data, .. } => digest::block_hash(
                        b,
                        &data[(bstart - offset) as usize..(bend - offset) as usize],
                    ),
                    _ => digest::zero_block_hash(b),
                };
                hashes.push((b, h));
            } else {
                edges.push(b);
            }
        }
        (hashes, edges)
    }

    /// The hash of block `b` as the local disk holds it now.
    async fn read_block_hash(&self, b: u64) -> Result<u64> {
        let bstart = b * DIGEST_BLOCK;
        let bend = (bstart + DIGEST_BLOCK).min(self.local.size());
        let data = self.local.read_at(bstart, (bend - bstart) as usize).await?;
        Ok(digest::block_hash(b, &data))
    }
}

impl Backend for Primary {
    fn size(&self) -> u64 {
        self.local.size()
    }
    fn alignment(&self) -> u32 {
        1
    }
    fn read_at(&self, offset: u64, len: usize) -> IoFuture<'_, IoBuf> {
        self.local.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: IoBuf, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            // The forward queue reads the same bytes the local write does: no copy.
            let copy = data.share();
            self.modify(
                Op::Write,
                offset,
                len,
                FwdKind::Write { data: copy, fua },
                self.local.write_at(offset, data, fua),
            )
            .await
        })
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.local.flush().await?;
            let (tx, rx) = oneshot::channel();
            let wait = {
                let _gate = self.gate.read().await;
                if self.mode() == PrimaryMode::Replicating {
                    self.enqueue_marker(FwdKind::Flush, tx);
                    self.opts.ack != AckMode::Local
                } else {
                    false
                }
            };
            if wait {
                // The client's flush promises what its ack mode promises for writes: with
                // `received` and `durable` that the secondary has the data on stable storage
                // too, so it completes when the secondary's flush did. If the secondary fails
                // it (or the forwarder stops first), the primary leaves `replicating` before
                // the flush completes: every block of the uncommitted epochs is then in the
                // dirty bitmap for the resync, and the local flush is all the client gets, as
                // for a write made while the link is down. (link_lost does nothing if the
                // forwarder got there first.)
                match rx.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        self.link_lost(&format!("the secondary failed a flush: {e}"))
                            .await
                    }
                    Err(_) => {
                        self.link_lost("forwarding stopped before the secondary's flush completed")
                            .await
                    }
                }
            }
            Ok(())
        })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        Box::pin(self.modify(
            Op::Discard,
            offset,
            len,
            FwdKind::Trim,
            self.local.discard(offset, len),
        ))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        Box::pin(self.modify(
            Op::WriteZeroes,
            offset,
            len,
            FwdKind::Zeroes { may_unmap },
            self.local.write_zeroes(offset, len, may_unmap),
        ))
    }
    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, Vec<Extent>> {
        self.local.block_status(offset, len)
    }
}
