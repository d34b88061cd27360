//! Output buffering (Remus style), for when no secondary replica runs to compare with: the
//! primary's output is held until a checkpoint of a state at least as new as the one that
//! produced it commits, so that a client never sees output of a state the secondary could
//! not fail over to.
//!
//! Output is stamped with the time it was received ([`blkrep::epoch::monotonic_ns`]); a
//! commit reports when the guest was asked to pause for it
//! ([`blkrep::epoch::EpochEvent::Committed`]), and everything received before that moment
//! was produced before it, so it is released. Time, not an epoch number, is what the two
//! processes share: an epoch number learned from the primary would arrive late and tag
//! output produced after a cut with the epoch before it.

use std::collections::VecDeque;

use crate::flow::FlowKey;

/// Why output was not buffered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BufferError {
    /// Holding it would exceed the memory bound. The output is not held: stop reading the
    /// primary (or drop a frame, which TCP retransmits) until a commit frees the buffer.
    #[error("output buffer full: {held} bytes held, {len} more would pass the bound of {limit}")]
    Full {
        /// Bytes held.
        held: usize,
        /// The output's size.
        len: usize,
        /// The bound.
        limit: usize,
    },
    /// The output is stamped before a commit already seen, or before output already held.
    #[error("output stamped {stamp} arrived after {last}")]
    Stale {
        /// The output's stamp.
        stamp: u64,
        /// The newest stamp committed or held.
        last: u64,
    },
}

/// One piece of held output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes (a stream's next bytes, or one whole frame or datagram).
    Data(Vec<u8>),
    /// The flow's output ended (TCP FIN, or RST when `reset`).
    End {
        /// RST rather than FIN.
        reset: bool,
    },
}

impl Output {
    fn len(&self) -> usize {
        match self {
            Output::Data(d) => d.len(),
            Output::End { .. } => 0,
        }
    }
}

/// The primary's output, held in the order received until a commit makes it safe.
#[derive(Debug)]
pub struct OutputBuffer {
    items: VecDeque<(u64, FlowKey, Output)>,
    held: usize,
    limit: usize,
    peak: usize,
    /// The newest stamp held.
    last: Option<u64>,
    /// Output stamped before this was released.
    released_before: u64,
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
            released_before: 0,
        }
    }

    /// Hold `out`, output of flow `key` received at `stamp` (not before a commit already
    /// seen, nor before output already held).
    pub fn push(&mut self, stamp: u64, key: FlowKey, out: Output) -> Result<(), BufferError> {
        if stamp < self.released_before || self.last.is_some_and(|l| stamp < l) {
            let last = self.last.unwrap_or(0).max(self.released_before);
            return Err(BufferError::Stale { stamp, last });
        }
        if self.held + out.len() > self.limit {
            return Err(BufferError::Full {
                held: self.held,
                len: out.len(),
                limit: self.limit,
            });
        }
        self.held += out.len();
        self.peak = self.peak.max(self.held);
        self.last = Some(stamp);
        self.items.push_back((stamp, key, out));
        Ok(())
    }

    /// A checkpoint of the state as of `paused_at` committed: everything received before it
    /// is released, in the order received.
    pub fn commit(&mut self, paused_at: u64) -> Vec<(FlowKey, Output)> {
        self.released_before = self.released_before.max(paused_at);
        let mut out = Vec::new();
        while self
            .items
            .front()
            .is_some_and(|(s, _, _)| *s < self.released_before)
        {
            let (_, key, item) = self.items.pop_front().expect("not empty");
            self.held -= item.len();
            out.push((key, item));
        }
        out
    }

    /// The primary failed: its unreleased output is dropped, never sent. Returns the flows
    /// that lost output (each once, in order) and the number of bytes dropped.
    pub fn fail(&mut self) -> (Vec<FlowKey>, usize) {
        let dropped = self.held;
        let mut flows: Vec<FlowKey> = Vec::new();
        for (_, key, _) in self.items.drain(..) {
            if !flows.contains(&key) {
                flows.push(key);
            }
        }
        self.held = 0;
        (flows, dropped)
    }

    /// Whether output of `key` is held.
    pub fn holds(&self, key: &FlowKey) -> bool {
        self.items.iter().any(|(_, k, _)| k == key)
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held
    }

    /// Whether the buffer is at its bound.
    pub fn is_full(&self) -> bool {
        self.held >= self.limit
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

    fn data(d: &[u8]) -> Output {
        Output::Data(d.to_vec())
    }

    #[test]
    fn commit_releases_what_came_before_the_pause_in_order_and_fail_drops() {
        let mut b = OutputBuffer::new(100);
        b.push(10, key(1), data(b"a")).unwrap();
        b.push(10, key(2), data(b"b")).unwrap();
        b.push(20, key(1), data(b"c")).unwrap();
        b.push(30, key(1), Output::End { reset: false }).unwrap();
        assert!(
            b.commit(10).is_empty(),
            "stamped at the pause: not before it"
        );
        assert_eq!(
            b.commit(11),
            vec![(key(1), data(b"a")), (key(2), data(b"b"))]
        );
        assert_eq!(
            b.push(5, key(1), data(b"late")),
            Err(BufferError::Stale { stamp: 5, last: 30 })
        );
        assert!(b.holds(&key(1)) && !b.holds(&key(2)));
        assert_eq!(b.held_bytes(), 1);
        assert_eq!(b.fail(), (vec![key(1)], 1));
        assert!(b.commit(100).is_empty());
        assert_eq!(b.held_bytes(), 0);
    }

    #[test]
    fn full_buffer_refuses() {
        let mut b = OutputBuffer::new(10);
        b.push(1, key(1), Output::Data(vec![0; 8])).unwrap();
        assert_eq!(
            b.push(1, key(1), Output::Data(vec![0; 3])),
            Err(BufferError::Full {
                held: 8,
                len: 3,
                limit: 10
            })
        );
        b.push(1, key(1), Output::Data(vec![0; 2])).unwrap();
        assert!(b.is_full());
        assert_eq!(b.commit(2).len(), 2);
        b.push(2, key(1), Output::Data(vec![0; 10])).unwrap();
        assert_eq!(b.peak_held_bytes(), 10);
    }

    proptest! {
        /// Random output over time and commits: nothing is released before a commit of a
        /// later pause, everything is released in the order received, within the bound, and
        /// a failure drops exactly what is unreleased.
        #[test]
        fn released_only_after_commit_and_in_order(
            ops in proptest::collection::vec((0u8..4, 1usize..40), 1..200),
            limit in 1usize..300,
        ) {
            let mut b = OutputBuffer::new(limit);
            let mut now = 1u64;
            let mut committed = 0u64;
            let mut pushed: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut released: Vec<Vec<u8>> = Vec::new();
            for (i, (op, len)) in ops.into_iter().enumerate() {
                match op {
                    0 | 1 => {
                        let d = vec![i as u8; len];
                        if b.push(now, key(1), Output::Data(d.clone())).is_ok() {
                            pushed.push((now, d));
                        }
                    }
                    2 => now += 1,
                    _ => {
                        // A pause at or before now.
                        let c = committed.max(now - (len as u64 % 2));
                        committed = c;
                        for (_, item) in b.commit(c) {
                            let Output::Data(d) = item else { unreachable!() };
                            released.push(d);
                        }
                        now = now.max(c);
                    }
                }
                prop_assert!(b.held_bytes() <= limit);
            }
            let expect: Vec<Vec<u8>> = pushed
                .iter()
                .filter(|(s, _)| *s < committed)
                .map(|(_, d)| d.clone())
                .collect();
            prop_assert_eq!(&released, &expect);
            let unreleased: usize = pushed
                .iter()
                .filter(|(s, _)| *s >= committed)
                .map(|(_, d)| d.len())
                .sum();
            prop_assert_eq!(b.fail().1, unreleased);
        }
    }
}
