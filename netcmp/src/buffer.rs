//! Output buffering (Remus style), for when no secondary replica runs to compare with: the
//! primary's output is held until the checkpoint of the epoch it was produced in commits,
//! so that a client never sees output of a state the secondary could not fail over to.

use std::collections::VecDeque;

use blkrep::epoch::Epoch;

use crate::flow::FlowKey;

/// Why output was not buffered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// Holding it would exceed the memory bound. The output is not held: drop it (TCP
    /// retransmits) and checkpoint soon, which frees the buffer.
    #[error("output buffer full: {held} bytes held, {len} more would pass the bound of {limit}")]
    Full {
        /// Bytes held.
        held: usize,
        /// The output's size.
        len: usize,
        /// The bound.
        limit: usize,
    },
    /// The output's epoch is already committed, or older than output already held.
    #[error("output of {epoch} arrived after {last}")]
    Stale {
        /// The output's epoch.
        epoch: Epoch,
        /// The newest epoch committed or held.
        last: Epoch,
    },
}

/// The primary's output, held per epoch until that epoch commits.
#[derive(Debug)]
pub struct OutputBuffer {
    items: VecDeque<(Epoch, FlowKey, Vec<u8>)>,
    held: usize,
    limit: usize,
    peak: usize,
    /// The newest epoch committed, or held.
    last: Option<Epoch>,
    committed: Option<Epoch>,
}

impl OutputBuffer {
    /// An empty buffer holding at most `max_held_bytes`.
    pub fn new(max_held_bytes: usize) -> OutputBuffer {
        OutputBuffer {
            items: VecDeque::new(),
            held: 0,
            limit: max_held_bytes,
            peak: 0,
            last: None,
            committed: None,
        }
    }

    /// Hold `data`, output of flow `key` produced during `epoch` (not yet committed, and not
    /// older than output already held).
    pub fn push(&mut self, epoch: Epoch, key: FlowKey, data: Vec<u8>) -> Result<(), BufferError> {
        let stale =
            self.committed.is_some_and(|c| epoch <= c) || self.last.is_some_and(|l| epoch < l);
        if stale {
            let last = self.last.max(self.committed).unwrap_or(epoch);
            return Err(BufferError::Stale { epoch, last });
        }
        if self.held + data.len() > self.limit {
            return Err(BufferError::Full {
                held: self.held,
                len: data.len(),
                limit: self.limit,
            });
        }
        self.held += data.len();
        self.peak = self.peak.max(self.held);
        self.last = Some(epoch);
        self.items.push_back((epoch, key, data));
        Ok(())
    }

    /// Checkpoint `epoch` committed: everything of epochs up to it is released, in the order
    /// it was produced.
    pub fn commit(&mut self, epoch: Epoch) -> Vec<(FlowKey, Vec<u8>)> {
        self.committed = self.committed.max(Some(epoch));
        let mut out = Vec::new();
        while self.items.front().is_some_and(|(e, _, _)| *e <= epoch) {
            let (_, key, data) = self.items.pop_front().expect("not empty");
            self.held -= data.len();
            out.push((key, data));
        }
        out
    }

    /// The primary failed: its unreleased output is dropped, never sent. Returns the number
    /// of bytes dropped.
    pub fn fail(&mut self) -> usize {
        let dropped = self.held;
        self.items.clear();
        self.held = 0;
        dropped
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// The most bytes held at once.
    pub fn peak_held_bytes(&self) -> usize {
        self.peak
    }
}
