//! Tests of the TCP stream comparison.

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

proptest! {
    /// The prefix comparison over the deques' two pieces agrees with a byte loop, wherever
    /// the pieces are split.
    #[test]
    fn common_prefix_matches_a_byte_loop(
        data in proptest::collection::vec(0u8..3, 0..300),
        rot_a in 0usize..300,
        rot_b in 0usize..300,
        flip in proptest::option::of(0usize..300),
    ) {
        let deque = |rot: usize, d: &[u8]| {
            // Rotating makes the deque wrap: two non-empty slices.
            let mut q: VecDeque<u8> = VecDeque::with_capacity(d.len() + 1);
            for _ in 0..rot.min(d.len()) {
                q.push_back(0);
            }
            for _ in 0..rot.min(d.len()) {
                q.pop_front();
            }
            q.extend(d.iter().copied());
            q
        };
        let mut other = data.clone();
        if let Some(i) = flip {
            if i < other.len() {
                other[i] ^= 1;
            }
        }
        let (a, b) = (deque(rot_a, &data), deque(rot_b, &other));
        let want = data.iter().zip(&other).take_while(|(x, y)| x == y).count();
        prop_assert_eq!(super::common_prefix(&a, &b, data.len()), want);
    }
}

/// A segment starting past a FIN that is not in order yet (a crafted frame) is ignored, not
/// a crash.
#[test]
fn a_segment_past_an_early_fin_is_ignored() {
    let mut c = TcpCompare::new(StreamConfig {
        compare_timeout: Duration::from_secs(1),
        max_out_of_order: 1 << 16,
    });
    let t = Instant::now();
    let mut ev = Vec::new();
    c.primary(100, TcpFlags::NONE, b"ab", t, &mut ev);
    c.primary(110, TcpFlags::FIN, b"xy", t, &mut ev);
    c.primary(120, TcpFlags::NONE, b"zz", t, &mut ev);
    c.secondary(7, TcpFlags::NONE, b"ab", &mut ev);
    c.secondary(17, TcpFlags::FIN, b"xy", &mut ev);
    c.secondary(27, TcpFlags::NONE, b"zz", &mut ev);
    assert_eq!(ev, vec![Event::Release(b"ab".to_vec())]);
    assert_eq!(
        c.held_bytes(),
        4,
        "both sides' segments up to the FIN wait in order"
    );
}
