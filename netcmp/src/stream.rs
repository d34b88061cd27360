//! TCP byte-stream comparison for one direction of one flow (the replica's output).
//!
//! Each side (primary, secondary) delivers segments `(seq, flags, payload)` in any order,
//! retransmitted, overlapping, across the 32-bit wrap of sequence numbers, each side with its
//! own initial sequence number. Each side is reassembled into an in-order byte stream (an
//! out-of-order buffer bounded by [`StreamConfig::max_out_of_order`]), and the two streams
//! are compared byte by byte as they advance, whatever the segment boundaries on either
//! side. Stream offsets count payload bytes from the first byte after the SYN (or from the
//! first segment seen, when the SYN was not seen: a flow picked up mid-stream must then start
//! with an in-order segment on each side, or its first bytes are taken for old ones).
//!
//! The out-of-order buffers are bounded by the window; the in-order queues (the primary's
//! unconfirmed bytes, the secondary's bytes ahead of the primary) are bounded by the
//! compare timeout and, across flows, by the [`crate::Comparator`]'s memory budget.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::Event;

/// The TCP flags the comparison cares about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpFlags {
    /// SYN: the segment's sequence number is the initial sequence number; data starts after it.
    pub syn: bool,
    /// FIN: the stream ends after this segment's payload.
    pub fin: bool,
    /// RST: the connection is reset.
    pub rst: bool,
}

impl TcpFlags {
    /// No flags.
    pub const NONE: TcpFlags = TcpFlags {
        syn: false,
        fin: false,
        rst: false,
    };
    /// SYN only.
    pub const SYN: TcpFlags = TcpFlags {
        syn: true,
        fin: false,
        rst: false,
    };
    /// FIN only.
    pub const FIN: TcpFlags = TcpFlags {
        syn: false,
        fin: true,
        rst: false,
    };
    /// RST only.
    pub const RST: TcpFlags = TcpFlags {
        syn: false,
        fin: false,
        rst: true,
    };
}

/// Settings of one stream comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    /// How long the primary's bytes wait for the secondary before they are released anyway.
    pub compare_timeout: Duration,
    /// How far past the next in-order byte a side's segment may reach (bytes) to be buffered;
    /// a segment reaching further is dropped and counted (the sender retransmits it).
    pub max_out_of_order: usize,
}

/// One side's reassembly into an in-order byte stream.
#[derive(Debug, Default)]
struct Reassembly {
    /// The sequence number of stream offset 0, once known.
    base: Option<u32>,
    /// The stream offset of the next in-order byte.
    next: u64,
    /// Segments past `next`, non-overlapping, keyed by stream offset.
    ooo: BTreeMap<u64, Vec<u8>>,
    ooo_bytes: usize,
    /// The stream offset where the stream ends (FIN, or RST on the secondary).
    fin: Option<u64>,
    /// Segments dropped because they reached past the out-of-order window.
    dropped: u64,
}

impl Reassembly {
    /// A side that continues at `next` in the sequence space of `base`.
    fn aligned(base: Option<u32>, next: u64) -> Reassembly {
        Reassembly {
            base,
            next,
            ..Reassembly::default()
        }
    }

    fn ended(&self) -> bool {
        self.fin.is_some_and(|f| self.next >= f)
    }

    /// Accept a segment; bytes that became in order are appended to `out`.
    fn accept(
        &mut self,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
        window: usize,
        out: &mut Vec<u8>,
    ) {
        let data_seq = if flags.syn { seq.wrapping_add(1) } else { seq };
        let base = *self.base.get_or_insert(data_seq);
        // Sequence numbers are interpreted within 2^31 of the next expected one.
        let next_seq = base.wrapping_add(self.next as u32);
        let start = self.next as i64 + i64::from(data_seq.wrapping_sub(next_seq) as i32);
        let mut end = start + payload.len() as i64;
        if flags.fin && self.fin.is_none() && end >= self.next as i64 {
            self.fin = Some(end as u64);
        }
        if let Some(f) = self.fin {
            end = end.min(f as i64);
        }
        if end <= self.next as i64 {
            return;
        }
        let skip = (self.next as i64 - start).max(0) as usize;
        let start = start.max(self.next as i64) as u64;
        let end = end as u64;
        let data = &payload[skip..skip + (end - start) as usize];
        if start == self.next {
            out.extend_from_slice(data);
            self.next = end;
            self.drain_ooo(out);
        } else if end - self.next > window as u64 {
            self.dropped += 1;
        } else {
            self.insert_ooo(start, data);
        }
    }

    /// Store `data` at `start`, only the parts no stored segment covers yet.
    fn insert_ooo(&mut self, start: u64, data: &[u8]) {
        let end = start + data.len() as u64;
        let covered: Vec<(u64, u64)> = self
            .ooo
            .range(..end)
            .map(|(&s, v)| (s, s + v.len() as u64))
            .filter(|&(_, e)| e > start)
            .collect();
        let mut pos = start;
        for (s, e) in covered {
            if s > pos {
                self.put(pos, &data[(pos - start) as usize..(s - start) as usize]);
            }
            pos = pos.max(e);
        }
        if pos < end {
            self.put(pos, &data[(pos - start) as usize..]);
        }
    }

    fn put(&mut self, at: u64, data: &[u8]) {
        self.ooo_bytes += data.len();
        self.ooo.insert(at, data.to_vec());
    }

    fn drain_ooo(&mut self, out: &mut Vec<u8>) {
        while let Some(entry) = self.ooo.first_entry() {
            let s = *entry.key();
            if s > self.next {
                break;
            }
            let v = entry.remove();
            self.ooo_bytes -= v.len();
            let e = s + v.len() as u64;
            if e > self.next {
                out.extend_from_slice(&v[(self.next - s) as usize..]);
                self.next = e;
            }
        }
    }

    fn clear_ooo(&mut self) {
        self.ooo.clear();
        self.ooo_bytes = 0;
    }
}

/// The comparison of one TCP output stream of the primary with the secondary's.
///
/// Events are appended to the `out` vector each call takes: [`Event::Release`] carries the
/// primary's next stream bytes (both sides produced them identically, or comparison is off),
/// [`Event::Mismatch`] and [`Event::Timeout`] report a divergence once (after which the
/// primary's bytes pass through until [`TcpCompare::resync`]), [`Event::End`] the end of the
/// stream (all of the primary's bytes released).
#[derive(Debug)]
pub struct TcpCompare {
    cfg: StreamConfig,
    primary: Reassembly,
    secondary: Reassembly,
    /// The primary's in-order bytes not yet confirmed by the secondary.
    held: VecDeque<u8>,
    /// When the held bytes became in order: (stream offset after the chunk, time).
    held_times: VecDeque<(u64, Instant)>,
    /// The secondary's in-order bytes not yet compared.
    pending: VecDeque<u8>,
    /// Since when the primary's end of stream waits for the secondary's.
    fin_since: Option<Instant>,
    diverged: bool,
    passthrough: bool,
    ended: bool,
    compared: u64,
}

impl TcpCompare {
    /// A new comparison.
    pub fn new(cfg: StreamConfig) -> TcpCompare {
        TcpCompare {
            cfg,
            primary: Reassembly::default(),
            secondary: Reassembly::default(),
            held: VecDeque::new(),
            held_times: VecDeque::new(),
            pending: VecDeque::new(),
            fin_since: None,
            diverged: false,
            passthrough: false,
            ended: false,
            compared: 0,
        }
    }

    /// A stream that is never compared: the primary's bytes are released in order as they
    /// arrive, the secondary's are ignored.
    pub fn passthrough(cfg: StreamConfig) -> TcpCompare {
        TcpCompare {
            diverged: true,
            passthrough: true,
            ..TcpCompare::new(cfg)
        }
    }

    /// A primary segment arrived at `now`.
    pub fn primary(
        &mut self,
        seq: u32,
        flags: TcpFlags,
        payload: &[u8],
        now: Instant,
        out: &mut Vec<Event>,
    ) {
        if self.ended {
            return;
        }
        let mut fresh = Vec::new();
        self.primary
            .accept(seq, flags, payload, self.cfg.max_out_of_order, &mut fresh);
        if flags.rst {
            self.release_held(out);
            release(fresh, out);
            self.end(true, out);
            return;
        }
        if self.diverged {
            release(fresh, out);
            if self.primary.ended() {
                self.end(false, out);
            }
            return;
        }
        if !fresh.is_empty() {
            self.held.extend(fresh);
            self.held_times.push_back((self.primary.next, now));
        }
        if self.primary.ended() && self.fin_since.is_none() {
            self.fin_since = Some(now);
        }
        self.compare(out);
    }

    /// A secondary segment arrived. Ignored while diverged (until [`TcpCompare::resync`]).
    pub fn secondary(&mut self, seq: u32, flags: TcpFlags, payload: &[u8], out: &mut Vec<Event>) {
        if self.ended || self.diverged {
            return;
        }
        let mut fresh = Vec::new();
        self.secondary
            .accept(seq, flags, payload, self.cfg.max_out_of_order, &mut fresh);
        if flags.rst && self.secondary.fin.is_none() {
            // The secondary's stream ends here; whatever the primary sends past it diverges.
            self.secondary.fin = Some(self.secondary.next);
        }
        self.pending.extend(fresh);
        self.compare(out);
    }

    /// Check the compare timeout: if the oldest held byte (or the primary's held end of
    /// stream) waited `compare_timeout` or longer, the held bytes are released and
    /// [`Event::Timeout`] is reported.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Event>) {
        if self.ended || self.diverged {
            return;
        }
        let oldest = self.held_times.front().map(|&(_, t)| t).or(self.fin_since);
        if let Some(t) = oldest {
            if now.saturating_duration_since(t) >= self.cfg.compare_timeout {
                let offset = self.held_start();
                self.diverge(Event::Timeout { offset }, out);
            }
        }
    }

    /// Restart comparison after a checkpoint committed: the secondary is now a copy of the
    /// primary, TCP state included, so from here on its sequence numbers are the primary's
    /// and its next byte is compared with the primary's next byte. The primary's held bytes
    /// are released (the secondary, a copy of a state that already produced them, will not
    /// produce them again) and whatever the secondary had queued is dropped.
    pub fn resync(&mut self, out: &mut Vec<Event>) {
        if self.ended {
            return;
        }
        self.release_held(out);
        if self.primary.ended() {
            self.end(false, out);
            return;
        }
        self.secondary = Reassembly::aligned(self.primary.base, self.primary.next);
        self.pending.clear();
        self.fin_since = None;
        self.diverged = self.passthrough;
    }

    /// Give up on comparing to free memory: release the primary's held bytes, drop both
    /// sides' out-of-order segments (the senders retransmit them) and the secondary's queue,
    /// and pass the primary's bytes through until [`TcpCompare::resync`]. Returns whether the
    /// stream was being compared (a divergence the caller should checkpoint).
    pub fn shed(&mut self, out: &mut Vec<Event>) -> bool {
        let was = !self.diverged && !self.ended;
        self.release_held(out);
        self.pending.clear();
        self.primary.clear_ooo();
        self.secondary.clear_ooo();
        self.diverged = true;
        if !self.ended && self.primary.ended() {
            self.end(false, out);
        }
        was
    }

    /// Bytes this comparison holds in memory: the primary's unconfirmed bytes, the
    /// secondary's uncompared bytes, and both out-of-order buffers.
    pub fn held_bytes(&self) -> usize {
        self.held.len() + self.pending.len() + self.primary.ooo_bytes + self.secondary.ooo_bytes
    }

    /// When the oldest byte held for the client arrived.
    pub fn oldest_held(&self) -> Option<Instant> {
        self.held_times.front().map(|&(_, t)| t).or(self.fin_since)
    }

    /// Bytes found identical on both sides so far.
    pub fn compared(&self) -> u64 {
        self.compared
    }

    /// Segments dropped (both sides) because they reached past the out-of-order window.
    pub fn dropped_segments(&self) -> u64 {
        self.primary.dropped + self.secondary.dropped
    }

    /// Whether comparison is off (after a divergence, or a passthrough stream).
    pub fn diverged(&self) -> bool {
        self.diverged
    }

    /// Whether the stream ended ([`Event::End`] was reported).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The stream offset of the first held byte of the primary.
    fn held_start(&self) -> u64 {
        self.primary.next - self.held.len() as u64
    }

    fn compare(&mut self, out: &mut Vec<Event>) {
        let n = self.held.len().min(self.pending.len());
        let same = self
            .held
            .iter()
            .zip(self.pending.iter())
            .take_while(|(a, b)| a == b)
            .count();
        if same > 0 {
            self.pending.drain(..same);
            let bytes: Vec<u8> = self.held.drain(..same).collect();
            self.compared += same as u64;
            let start = self.held_start();
            while self.held_times.front().is_some_and(|&(e, _)| e <= start) {
                self.held_times.pop_front();
            }
            out.push(Event::Release(bytes));
        }
        if same < n {
            let offset = self.held_start();
            self.diverge(Event::Mismatch { offset }, out);
            return;
        }
        let p_end = self.primary.ended();
        let s_end = self.secondary.ended();
        if !self.held.is_empty() && s_end {
            // The secondary's stream ended where the primary's goes on.
            let offset = self.held_start();
            self.diverge(Event::Mismatch { offset }, out);
        } else if !self.pending.is_empty() && p_end {
            // The primary's stream ended where the secondary's goes on.
            let offset = self.primary.next;
            self.diverge(Event::Mismatch { offset }, out);
        } else if self.held.is_empty() && self.pending.is_empty() && p_end && s_end {
            self.end(false, out);
        }
    }

    fn diverge(&mut self, why: Event, out: &mut Vec<Event>) {
        out.push(why);
        self.release_held(out);
        self.pending.clear();
        self.secondary.clear_ooo();
        self.diverged = true;
        if self.primary.ended() {
            self.end(false, out);
        }
    }

    fn release_held(&mut self, out: &mut Vec<Event>) {
        self.held_times.clear();
        self.fin_since = None;
        if !self.held.is_empty() {
            out.push(Event::Release(self.held.drain(..).collect()));
        }
    }

    fn end(&mut self, reset: bool, out: &mut Vec<Event>) {
        self.ended = true;
        self.held_times.clear();
        self.pending.clear();
        self.primary.clear_ooo();
        self.secondary.clear_ooo();
        out.push(Event::End { reset });
    }
}

fn release(bytes: Vec<u8>, out: &mut Vec<Event>) {
    if !bytes.is_empty() {
        out.push(Event::Release(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    /// A comparison and everything it reported.
    struct Run {
        c: TcpCompare,
        events: Vec<Event>,
        t0: Instant,
    }

    impl Run {
        fn new(window: usize) -> Run {
            Run {
                c: TcpCompare::new(StreamConfig {
                    compare_timeout: 100 * MS,
                    max_out_of_order: window,
                }),
                events: Vec::new(),
                t0: Instant::now(),
            }
        }
        fn p(&mut self, seq: u32, flags: TcpFlags, data: &[u8]) {
            let now = self.t0;
            self.p_at(seq, flags, data, now);
        }
        fn p_at(&mut self, seq: u32, flags: TcpFlags, data: &[u8], now: Instant) {
            self.c.primary(seq, flags, data, now, &mut self.events);
            self.check_held();
        }
        fn s(&mut self, seq: u32, flags: TcpFlags, data: &[u8]) {
            self.c.secondary(seq, flags, data, &mut self.events);
            self.check_held();
        }
        fn check_held(&self) {
            // Each of the four buffers is bounded: in-order queues by what was sent, the
            // out-of-order buffers by the window.
            let w = self.c.cfg.max_out_of_order;
            assert!(self.c.primary.ooo_bytes <= w && self.c.secondary.ooo_bytes <= w);
        }
        fn released(&self) -> Vec<u8> {
            let mut r = Vec::new();
            for e in &self.events {
                if let Event::Release(b) = e {
                    r.extend_from_slice(b);
                }
            }
            r
        }
        fn divergences(&self) -> Vec<Event> {
            self.events
                .iter()
                .filter(|e| matches!(e, Event::Mismatch { .. } | Event::Timeout { .. }))
                .cloned()
                .collect()
        }
        fn ends(&self) -> Vec<Event> {
            self.events
                .iter()
                .filter(|e| matches!(e, Event::End { .. }))
                .cloned()
                .collect()
        }
        /// Bytes released before the first divergence.
        fn released_before_divergence(&self) -> usize {
            let mut n = 0;
            for e in &self.events {
                match e {
                    Event::Release(b) => n += b.len(),
                    Event::Mismatch { .. } | Event::Timeout { .. } => break,
                    Event::End { .. } => {}
                }
            }
            n
        }
    }

    /// One segment of a side: (sequence number, flags, payload).
    type Seg = (u32, TcpFlags, Vec<u8>);

    /// `data` as one side sends it: a SYN at `isn`, the payload cut at `cuts`, retransmitted
    /// ranges `extra` (start, len), a FIN, all reordered by `jitter` (each segment moves
    /// up to that many places); the SYN goes first.
    fn side(
        data: &[u8],
        isn: u32,
        cuts: &[usize],
        extra: &[(usize, usize)],
        jitter: &[usize],
    ) -> Vec<Seg> {
        let seq = |off: usize| isn.wrapping_add(1).wrapping_add(off as u32);
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (data.len() + 1)).collect();
        bounds.push(0);
        bounds.push(data.len());
        bounds.sort_unstable();
        bounds.dedup();
        let mut segs: Vec<Seg> = bounds
            .windows(2)
            .map(|w| (seq(w[0]), TcpFlags::NONE, data[w[0]..w[1]].to_vec()))
            .collect();
        for &(s, l) in extra {
            if data.is_empty() {
                break;
            }
            let s = s % data.len();
            let e = (s + l).min(data.len());
            segs.push((seq(s), TcpFlags::NONE, data[s..e].to_vec()));
        }
        segs.push((seq(data.len()), TcpFlags::FIN, Vec::new()));
        let mut keyed: Vec<(usize, Seg)> = segs
            .into_iter()
            .enumerate()
            .map(|(i, s)| (i + jitter.get(i).copied().unwrap_or(0), s))
            .collect();
        keyed.sort_by_key(|(k, _)| *k);
        let mut out = vec![(isn, TcpFlags::SYN, Vec::new())];
        out.extend(keyed.into_iter().map(|(_, s)| s));
        out
    }

    /// Feed both sides, interleaved by `order` (true: primary next).
    fn feed(run: &mut Run, p: Vec<Seg>, s: Vec<Seg>, order: &[bool]) {
        let (mut p, mut s) = (p.into_iter().peekable(), s.into_iter().peekable());
        let mut i = 0;
        while p.peek().is_some() || s.peek().is_some() {
            let primary = match (p.peek().is_some(), s.peek().is_some()) {
                (true, true) => order.get(i).copied().unwrap_or(i % 2 == 0),
                (pp, _) => pp,
            };
            i += 1;
            if primary {
                let (seq, f, d) = p.next().unwrap();
                run.p(seq, f, &d);
            } else {
                let (seq, f, d) = s.next().unwrap();
                run.s(seq, f, &d);
            }
        }
    }

    fn isn() -> impl Strategy<Value = u32> {
        prop_oneof![any::<u32>(), (u32::MAX - 3000)..=u32::MAX]
    }

    proptest! {
        /// The same stream, cut, retransmitted and reordered differently on each side, with
        /// different ISNs (near the wrap too), compares equal and releases exactly the stream.
        #[test]
        fn same_stream_any_segmentation(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            p_isn in isn(), s_isn in isn(),
            p_cuts in proptest::collection::vec(any::<usize>(), 0..40),
            s_cuts in proptest::collection::vec(any::<usize>(), 0..40),
            p_extra in proptest::collection::vec((any::<usize>(), 0usize..700), 0..8),
            s_extra in proptest::collection::vec((any::<usize>(), 0usize..700), 0..8),
            p_jit in proptest::collection::vec(0usize..4, 0..60),
            s_jit in proptest::collection::vec(0usize..4, 0..60),
            order in proptest::collection::vec(any::<bool>(), 0..120),
        ) {
            let mut run = Run::new(1 << 20);
            let p = side(&data, p_isn, &p_cuts, &p_extra, &p_jit);
            let s = side(&data, s_isn, &s_cuts, &s_extra, &s_jit);
            feed(&mut run, p, s, &order);
            prop_assert_eq!(run.divergences(), vec![]);
            prop_assert_eq!(run.released(), data.clone());
            prop_assert_eq!(run.ends(), vec![Event::End { reset: false }]);
            prop_assert_eq!(run.events.last(), Some(&Event::End { reset: false }));
            prop_assert_eq!(run.c.compared(), data.len() as u64);
            prop_assert_eq!(run.c.held_bytes(), 0);
        }

        /// A one-byte difference anywhere is reported at exactly its offset, nothing past it
        /// is released before, and all of the primary's stream is released in the end.
        #[test]
        fn one_byte_difference_found_at_its_offset(
            data in proptest::collection::vec(any::<u8>(), 1..3000),
            at in any::<usize>(), flip in 1u8..=255,
            p_isn in isn(), s_isn in isn(),
            p_cuts in proptest::collection::vec(any::<usize>(), 0..40),
            s_cuts in proptest::collection::vec(any::<usize>(), 0..40),
            p_jit in proptest::collection::vec(0usize..4, 0..60),
            s_jit in proptest::collection::vec(0usize..4, 0..60),
            order in proptest::collection::vec(any::<bool>(), 0..120),
        ) {
            let at = at % data.len();
            let mut other = data.clone();
            other[at] ^= flip;
            let mut run = Run::new(1 << 20);
            let p = side(&data, p_isn, &p_cuts, &[], &p_jit);
            let s = side(&other, s_isn, &s_cuts, &[], &s_jit);
            feed(&mut run, p, s, &order);
            prop_assert_eq!(run.divergences(), vec![Event::Mismatch { offset: at as u64 }]);
            prop_assert!(run.released_before_divergence() <= at);
            prop_assert_eq!(run.released(), data.clone());
            prop_assert_eq!(run.ends(), vec![Event::End { reset: false }]);
        }
    }

    #[test]
    fn segments_beyond_the_window_are_dropped_and_counted() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let mut run = Run::new(300);
        run.p(99, TcpFlags::SYN, &[]);
        run.s(5, TcpFlags::SYN, &[]);
        // Everything but the first 100 bytes, in reverse: segments reaching past 300 bytes
        // ahead are dropped.
        for off in (100..1000).step_by(100).rev() {
            run.p(100 + off as u32, TcpFlags::NONE, &data[off..off + 100]);
        }
        assert_eq!(run.c.dropped_segments(), 7);
        assert_eq!(run.c.primary.ooo_bytes, 200);
        assert!(run.released().is_empty());
        // The missing start arrives, then the sender retransmits the rest in order.
        run.p(100, TcpFlags::NONE, &data[..100]);
        assert_eq!(run.c.held.len(), 300);
        for off in (300..1000).step_by(100) {
            run.p(100 + off as u32, TcpFlags::NONE, &data[off..off + 100]);
        }
        run.s(6, TcpFlags::NONE, &data);
        assert_eq!(run.released(), data);
        assert_eq!(run.divergences(), vec![]);
        assert_eq!(run.c.held_bytes(), 0);
    }

    #[test]
    fn overlapping_retransmissions_in_the_out_of_order_buffer_are_held_once() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut run = Run::new(1000);
        run.p(0, TcpFlags::NONE, &data[..10]);
        run.p(30, TcpFlags::NONE, &data[30..50]);
        run.p(20, TcpFlags::NONE, &data[20..60]);
        run.p(25, TcpFlags::NONE, &data[25..35]);
        run.p(40, TcpFlags::NONE, &data[40..80]);
        assert_eq!(run.c.primary.ooo_bytes, 60);
        run.p(5, TcpFlags::NONE, &data[5..30]);
        run.p(0, TcpFlags::NONE, &data[..100]);
        assert_eq!(run.c.held.len(), 100);
        assert_eq!(run.c.primary.ooo_bytes, 0);
        run.s(1_000_000, TcpFlags::NONE, &data);
        assert_eq!(run.released(), data);
    }

    #[test]
    fn fin_early_on_the_secondary_is_a_mismatch() {
        let mut run = Run::new(1000);
        run.s(500, TcpFlags::FIN, b"0123456789");
        run.p(7, TcpFlags::NONE, b"0123456789abcde");
        assert_eq!(run.divergences(), vec![Event::Mismatch { offset: 10 }]);
        assert_eq!(run.released(), b"0123456789abcde");
        run.p(22, TcpFlags::FIN, b"f");
        assert_eq!(run.released(), b"0123456789abcdef");
        assert_eq!(run.ends(), vec![Event::End { reset: false }]);
    }

    #[test]
    fn fin_early_on_the_primary_is_a_mismatch() {
        let mut run = Run::new(1000);
        run.p(7, TcpFlags::FIN, b"0123456789");
        assert!(run.released().is_empty());
        run.s(500, TcpFlags::NONE, b"0123456789");
        assert_eq!(run.released(), b"0123456789");
        assert!(run.ends().is_empty());
        run.s(510, TcpFlags::NONE, b"x");
        assert_eq!(run.divergences(), vec![Event::Mismatch { offset: 10 }]);
        assert_eq!(run.ends(), vec![Event::End { reset: false }]);
    }

    #[test]
    fn primary_fin_waits_for_the_secondary_and_times_out() {
        let mut run = Run::new(1000);
        run.p(7, TcpFlags::FIN, b"abc");
        run.s(9, TcpFlags::NONE, b"abc");
        assert_eq!(run.released(), b"abc");
        assert!(run.ends().is_empty());
        let t = run.t0 + 100 * MS;
        run.c.poll(t, &mut run.events);
        assert_eq!(run.divergences(), vec![Event::Timeout { offset: 3 }]);
        assert_eq!(run.ends(), vec![Event::End { reset: false }]);
    }

    #[test]
    fn rst_releases_and_ends() {
        let mut run = Run::new(1000);
        run.p(1, TcpFlags::NONE, b"hello ");
        run.s(2, TcpFlags::NONE, b"he");
        run.p(7, TcpFlags::RST, b"world");
        assert_eq!(run.released(), b"hello world");
        assert_eq!(run.ends(), vec![Event::End { reset: true }]);
        assert_eq!(run.divergences(), vec![]);
        run.p(12, TcpFlags::NONE, b"more");
        run.s(4, TcpFlags::NONE, b"llo");
        assert_eq!(run.released(), b"hello world");
        assert_eq!(run.c.held_bytes(), 0);
    }

    #[test]
    fn secondary_rst_ends_its_stream() {
        let mut run = Run::new(1000);
        run.s(2, TcpFlags::NONE, b"ab");
        run.s(4, TcpFlags::RST, b"");
        run.p(1, TcpFlags::NONE, b"abc");
        assert_eq!(run.divergences(), vec![Event::Mismatch { offset: 2 }]);
        assert_eq!(run.released(), b"abc");
    }

    #[test]
    fn timeout_releases_then_passes_through_until_resync() {
        let mut run = Run::new(1000);
        let t0 = run.t0;
        run.p_at(1000, TcpFlags::NONE, b"abc", t0);
        run.p_at(1003, TcpFlags::NONE, b"def", t0 + 60 * MS);
        run.c.poll(t0 + 99 * MS, &mut run.events);
        assert!(run.events.is_empty());
        run.c.poll(t0 + 100 * MS, &mut run.events);
        assert_eq!(run.divergences(), vec![Event::Timeout { offset: 0 }]);
        assert_eq!(run.released(), b"abcdef");
        // Diverged: the primary passes through, the secondary is ignored, no second timeout.
        run.p_at(1006, TcpFlags::NONE, b"g", t0 + 200 * MS);
        run.s(77, TcpFlags::NONE, b"zzzz");
        run.c.poll(t0 + 900 * MS, &mut run.events);
        assert_eq!(run.released(), b"abcdefg");
        assert_eq!(run.divergences().len(), 1);
        // After the checkpoint the secondary uses the primary's sequence numbers.
        run.c.resync(&mut run.events);
        assert!(!run.c.diverged());
        run.p_at(1007, TcpFlags::NONE, b"hij", t0 + 1000 * MS);
        assert_eq!(run.released(), b"abcdefg");
        run.s(1005, TcpFlags::NONE, b"fgh");
        assert_eq!(run.released(), b"abcdefgh");
        run.s(1008, TcpFlags::NONE, b"iX");
        assert_eq!(run.released(), b"abcdefghij");
        assert_eq!(run.divergences()[1], Event::Mismatch { offset: 9 });
    }

    #[test]
    fn resync_releases_held_bytes_and_drops_the_secondary_queue() {
        // The primary's sequence numbers wrap; the secondary runs ahead of it.
        let mut run = Run::new(1000);
        run.p(u32::MAX - 1, TcpFlags::NONE, b"ab");
        run.s(40, TcpFlags::NONE, b"abcdef");
        assert_eq!(run.c.pending.len(), 4);
        run.p(0, TcpFlags::NONE, b"c");
        run.c.resync(&mut run.events);
        assert_eq!(run.c.held_bytes(), 0);
        assert_eq!(run.released(), b"abc");
        run.p(1, TcpFlags::NONE, b"de");
        run.s(1, TcpFlags::NONE, b"de");
        assert_eq!(run.released(), b"abcde");
        assert_eq!(run.divergences(), vec![]);
    }

    #[test]
    fn passthrough_releases_in_order_without_the_secondary() {
        let mut c = TcpCompare::passthrough(StreamConfig {
            compare_timeout: MS,
            max_out_of_order: 100,
        });
        let mut ev = Vec::new();
        let t = Instant::now();
        c.primary(10, TcpFlags::SYN, b"", t, &mut ev);
        c.primary(14, TcpFlags::NONE, b"def", t, &mut ev);
        c.primary(11, TcpFlags::NONE, b"abc", t, &mut ev);
        c.resync(&mut ev);
        c.poll(t + Duration::from_secs(1), &mut ev);
        assert_eq!(ev, vec![Event::Release(b"abcdef".to_vec())]);
    }
}
