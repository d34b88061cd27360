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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(port: u16) -> FlowKey {
        FlowKey::udp(
            "[2001:db8::1]:53".parse().unwrap(),
            std::net::SocketAddr::new("2001:db8::2".parse().unwrap(), port),
        )
    }

    #[test]
    fn commit_releases_its_epochs_in_order_and_fail_drops() {
        let mut b = OutputBuffer::new(100);
        b.push(Epoch(1), key(1), b"a".to_vec()).unwrap();
        b.push(Epoch(1), key(2), b"b".to_vec()).unwrap();
        b.push(Epoch(2), key(1), b"c".to_vec()).unwrap();
        b.push(Epoch(3), key(1), b"d".to_vec()).unwrap();
        assert!(b.commit(Epoch(0)).is_empty());
        assert_eq!(
            b.commit(Epoch(1)),
            vec![(key(1), b"a".to_vec()), (key(2), b"b".to_vec())]
        );
        assert_eq!(
            b.push(Epoch(1), key(1), b"late".to_vec()),
            Err(BufferError::Stale {
                epoch: Epoch(1),
                last: Epoch(3)
            })
        );
        assert_eq!(b.held_bytes(), 2);
        assert_eq!(b.fail(), 2);
        assert!(b.commit(Epoch(3)).is_empty());
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn full_buffer_refuses() {
        let mut b = OutputBuffer::new(10);
        b.push(Epoch(1), key(1), vec![0; 8]).unwrap();
        assert_eq!(
            b.push(Epoch(1), key(1), vec![0; 3]),
            Err(BufferError::Full {
                held: 8,
                len: 3,
                limit: 10
            })
        );
        b.push(Epoch(1), key(1), vec![0; 2]).unwrap();
        assert_eq!(b.commit(Epoch(1)).len(), 2);
        b.push(Epoch(2), key(1), vec![0; 10]).unwrap();
        assert_eq!(b.peak_held_bytes(), 10);
    }

    proptest! {
        /// Random output over epochs and commits: nothing is released before its epoch
        /// commits, everything is released in the order produced, within the bound, and a
        /// failure drops exactly what is unreleased.
        #[test]
        fn released_only_after_commit_and_in_order(
            ops in proptest::collection::vec((0u8..4, 1usize..40), 1..200),
            limit in 1usize..300,
        ) {
            let mut b = OutputBuffer::new(limit);
            let mut epoch = 1u64;
            let mut committed = 0u64;
            let mut pushed: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut released: Vec<Vec<u8>> = Vec::new();
            for (i, (op, len)) in ops.into_iter().enumerate() {
                match op {
                    0 | 1 => {
                        let data = vec![i as u8; len];
                        if b.push(Epoch(epoch), key(1), data.clone()).is_ok() {
                            pushed.push((epoch, data));
                        }
                    }
                    2 => epoch += 1,
                    _ => {
                        // Commit some epoch not newer than the current one.
                        let c = committed.max(epoch - (len as u64 % 2));
                        committed = c;
                        for (_, d) in b.commit(Epoch(c)) {
                            released.push(d);
                        }
                        epoch = epoch.max(c + 1);
                    }
                }
                prop_assert!(b.held_bytes() <= limit);
            }
            let expect: Vec<Vec<u8>> = pushed
                .iter()
                .filter(|(e, _)| *e <= committed)
                .map(|(_, d)| d.clone())
                .collect();
            prop_assert_eq!(&released, &expect);
            let unreleased: usize = pushed
                .iter()
                .filter(|(e, _)| *e > committed)
                .map(|(_, d)| d.len())
                .sum();
            prop_assert_eq!(b.fail(), unreleased);
        }
    }
}
