//! The primary's frames held per flow until the comparator confirms them (see
//! [`super::engine`]), and the TCP stream position each frame is tagged with.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::flow::{FlowKey, Proto};
use crate::stream::TcpFlags;

/// What each held frame counts against the budget besides its bytes.
pub const HELD_FRAME_OVERHEAD: usize = 64;

/// The held frames of all flows together.
#[derive(Debug, Default)]
pub(super) struct Totals {
    /// Frame bytes plus [`HELD_FRAME_OVERHEAD`] per frame.
    pub(super) bytes: usize,
    pub(super) frames: usize,
}

#[derive(Debug)]
struct Held {
    frame: Vec<u8>,
    /// TCP: released once the flow's releases reach this stream offset.
    until: u64,
    since: Instant,
}

/// The primary's stream position of a TCP flow, as the comparator counts it.
#[derive(Debug, Default)]
pub(super) struct TcpPos {
    /// The sequence number of stream offset 0.
    pub(super) base: Option<u32>,
    /// The furthest stream offset the primary's payload reached.
    hi: u64,
    /// Stream bytes the comparator released.
    pub(super) released: u64,
}

impl TcpPos {
    /// The sequence number of the first byte not released yet, once the base is known: at
    /// or before the comparator's in-order position (so a segment there never reaches past
    /// anything it holds).
    pub(super) fn released_seq(&self) -> Option<u32> {
        Some(self.base?.wrapping_add(self.released as u32))
    }

    /// The offset a primary segment's frame waits for: where its payload ends, as the
    /// comparator's reassembly places it (the base is the first segment's, after a SYN;
    /// sequence numbers are read within 2^31 of the current position); without payload, the
    /// furthest offset reached; with FIN or RST, never (the flow's end releases it).
    pub(super) fn tag(&mut self, seq: u32, flags: TcpFlags, len: usize) -> u64 {
        let data_seq = if flags.syn { seq.wrapping_add(1) } else { seq };
        let base = *self.base.get_or_insert(data_seq);
        let hi_seq = base.wrapping_add(self.hi as u32);
        let start = self.hi as i64 + i64::from(data_seq.wrapping_sub(hi_seq) as i32);
        let end = (start + len as i64).max(0) as u64;
        if len > 0 {
            self.hi = self.hi.max(end);
        }
        if flags.fin || flags.rst {
            u64::MAX
        } else if len == 0 {
            self.hi
        } else {
            end
        }
    }
}

/// One flow's held frames and position.
#[derive(Debug)]
pub(super) struct FlowState {
    /// `Some` for TCP flows.
    pub(super) tcp: Option<TcpPos>,
    frames: VecDeque<Held>,
    /// UDP/ICMP: comparator releases still to come for frames already released unconfirmed.
    skip: usize,
    /// The comparator ended the flow (TCP).
    pub(super) ended: bool,
    /// TCP: the rewrite table's generation of the connection whose SYN started this
    /// comparison, if one did.
    pub(super) connection: Option<u64>,
    /// TCP, per side (primary, secondary): the sequence number just past the first FIN fed.
    fin_seq: [Option<u32>; 2],
    /// The last time the comparator had input for the flow.
    pub(super) last_input: Instant,
}

impl FlowState {
    pub(super) fn new(key: &FlowKey, now: Instant) -> FlowState {
        FlowState {
            tcp: (key.proto == Proto::Tcp).then(TcpPos::default),
            frames: VecDeque::new(),
            skip: 0,
            ended: false,
            connection: None,
            fin_seq: [None; 2],
            last_input: now,
        }
    }

    /// Whether a TCP segment of `side` (0: primary, 1: secondary) starts past the end of a
    /// FIN that side already sent; such a segment is not given to the comparator. (Its
    /// reassembly fails on one that starts past a FIN it has not reached in order yet; a
    /// correct sender never sends one.) Notes the side's first FIN.
    pub(super) fn past_fin(&mut self, side: usize, seq: u32, flags: TcpFlags, len: usize) -> bool {
        let data_seq = if flags.syn { seq.wrapping_add(1) } else { seq };
        if let Some(fin) = self.fin_seq[side] {
            if data_seq.wrapping_sub(fin) as i32 > 0 {
                return true;
            }
        }
        if flags.fin && self.fin_seq[side].is_none() {
            self.fin_seq[side] = Some(data_seq.wrapping_add(len as u32));
        }
        false
    }

    /// A checkpoint committed: the comparator restarts the secondary's side.
    pub(super) fn resync(&mut self) {
        self.fin_seq[1] = None;
    }

    pub(super) fn push(&mut self, frame: Vec<u8>, until: u64, since: Instant, t: &mut Totals) {
        t.bytes += frame.len() + HELD_FRAME_OVERHEAD;
        t.frames += 1;
        self.frames.push_back(Held {
            frame,
            until,
            since,
        });
    }

    fn pop(&mut self, t: &mut Totals) -> Option<Vec<u8>> {
        let h = self.frames.pop_front()?;
        t.bytes -= h.frame.len() + HELD_FRAME_OVERHEAD;
        t.frames -= 1;
        Some(h.frame)
    }

    /// The comparator released `len` bytes (TCP) or one packet (UDP/ICMP): the frames that
    /// became releasable.
    pub(super) fn released(&mut self, len: usize, t: &mut Totals) -> Vec<Vec<u8>> {
        match self.tcp.as_mut() {
            Some(pos) => {
                pos.released += len as u64;
                self.covered(t)
            }
            None if self.skip > 0 => {
                self.skip -= 1;
                Vec::new()
            }
            None => self.pop(t).into_iter().collect(),
        }
    }

    /// TCP: the head frames the releases so far cover.
    pub(super) fn covered(&mut self, t: &mut Totals) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        if let Some(released) = self.tcp.as_ref().map(|p| p.released) {
            while self.frames.front().is_some_and(|h| h.until <= released) {
                out.extend(self.pop(t));
            }
        }
        out
    }

    /// The comparator ended the flow: everything held goes.
    pub(super) fn end(&mut self, t: &mut Totals) -> Vec<Vec<u8>> {
        self.ended = true;
        std::iter::from_fn(|| self.pop(t)).collect()
    }

    /// Release everything unconfirmed (UDP/ICMP: the comparator's releases of these packets,
    /// still to come, are skipped).
    pub(super) fn take_unconfirmed(&mut self, t: &mut Totals) -> Vec<Vec<u8>> {
        let all: Vec<Vec<u8>> = std::iter::from_fn(|| self.pop(t)).collect();
        if self.tcp.is_none() {
            self.skip += all.len();
        }
        all
    }

    /// Release unconfirmed the head frames held `hold` or longer.
    pub(super) fn take_expired(
        &mut self,
        now: Instant,
        hold: Duration,
        t: &mut Totals,
    ) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self
            .frames
            .front()
            .is_some_and(|h| now.saturating_duration_since(h.since) >= hold)
        {
            out.extend(self.pop(t));
        }
        if self.tcp.is_none() {
            self.skip += out.len();
        }
        out
    }

    /// When the oldest held frame arrived.
    pub(super) fn oldest(&self) -> Option<Instant> {
        self.frames.front().map(|h| h.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_comparators_stream_offsets() {
        let mut p = TcpPos::default();
        assert_eq!(p.tag(u32::MAX - 1, TcpFlags::SYN, 0), 0);
        assert_eq!(p.tag(u32::MAX, TcpFlags::NONE, 10), 10);
        assert_eq!(
            p.tag(u32::MAX, TcpFlags::NONE, 0),
            10,
            "pure ACK: where the stream is"
        );
        assert_eq!(
            p.tag(19, TcpFlags::NONE, 5),
            25,
            "out of order, across the wrap"
        );
        assert_eq!(p.tag(9, TcpFlags::NONE, 10), 20);
        assert_eq!(p.tag(3, TcpFlags::NONE, 2), 6, "a retransmission");
        assert_eq!(p.tag(24, TcpFlags::FIN, 0), u64::MAX);
        assert_eq!(
            p.tag(u32::MAX - 100, TcpFlags::NONE, 10),
            0,
            "before the start"
        );
    }

    #[test]
    fn segments_past_a_fin_are_recognized() {
        let key = FlowKey::tcp("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        let mut st = FlowState::new(&key, Instant::now());
        assert!(!st.past_fin(1, u32::MAX - 2, TcpFlags::FIN, 2));
        assert!(
            !st.past_fin(1, u32::MAX - 2, TcpFlags::NONE, 5),
            "may reach past it"
        );
        assert!(
            !st.past_fin(1, u32::MAX, TcpFlags::FIN, 0),
            "a second FIN is not noted"
        );
        assert!(st.past_fin(1, 0, TcpFlags::NONE, 1));
        assert!(!st.past_fin(0, 0, TcpFlags::NONE, 1), "the other side");
        st.resync();
        assert!(!st.past_fin(1, 0, TcpFlags::NONE, 1));
    }

    #[test]
    fn packets_released_unconfirmed_skip_their_later_releases() {
        let t0 = Instant::now();
        let key = FlowKey::udp("10.0.0.1:1".parse().unwrap(), "10.0.0.2:2".parse().unwrap());
        let mut st = FlowState::new(&key, t0);
        let mut t = Totals::default();
        for n in 0..3u8 {
            st.push(vec![n; 10], 0, t0, &mut t);
        }
        assert_eq!((t.frames, t.bytes), (3, 3 * (10 + HELD_FRAME_OVERHEAD)));
        assert_eq!(st.released(10, &mut t), vec![vec![0; 10]]);
        assert_eq!(st.take_expired(t0, Duration::ZERO, &mut t).len(), 2);
        st.push(vec![3; 10], 0, t0, &mut t);
        assert!(st.released(10, &mut t).is_empty());
        assert!(st.released(10, &mut t).is_empty());
        assert_eq!(st.released(10, &mut t), vec![vec![3; 10]]);
        assert_eq!((t.frames, t.bytes), (0, 0));
    }
}
