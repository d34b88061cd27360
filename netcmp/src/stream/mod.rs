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
        out: &mut VecDeque<u8>,
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
        // Nothing new: all of it is old, or it lies past the end of the stream.
        if end <= self.next as i64 || end <= start {
            return;
        }
        let skip = (self.next as i64 - start).max(0) as usize;
        let start = start.max(self.next as i64) as u64;
        let end = end as u64;
        let data = &payload[skip..skip + (end - start) as usize];
        if start == self.next {
            out.extend(data);
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

    fn drain_ooo(&mut self, out: &mut VecDeque<u8>) {
        while let Some(entry) = self.ooo.first_entry() {
            let s = *entry.key();
            if s > self.next {
                break;
            }
            let v = entry.remove();
            self.ooo_bytes -= v.len();
            let e = s + v.len() as u64;
            if e > self.next {
                out.extend(&v[(self.next - s) as usize..]);
                self.next = e;
            }
        }
    }

    fn clear_ooo(&mut self) {
        self.ooo.clear();
        self.ooo_bytes = 0;
    }
}

/// How many of the first `n` bytes of `a` and `b` are equal: memcmp over the deques'
/// contiguous pieces, a byte loop only inside the piece that differs.
fn common_prefix(a: &VecDeque<u8>, b: &VecDeque<u8>, n: usize) -> usize {
    let (a0, a1) = a.as_slices();
    let (b0, b1) = b.as_slices();
    let (mut a_parts, mut b_parts) = ([a0, a1].into_iter(), [b0, b1].into_iter());
    let (mut x, mut y): (&[u8], &[u8]) = (&[], &[]);
    let mut done = 0;
    while done < n {
        if x.is_empty() {
            x = a_parts.next().unwrap_or(&[]);
        }
        if y.is_empty() {
            y = b_parts.next().unwrap_or(&[]);
        }
        let k = x.len().min(y.len()).min(n - done);
        if k == 0 {
            break;
        }
        if x[..k] != y[..k] {
            return done
                + x[..k]
                    .iter()
                    .zip(&y[..k])
                    .take_while(|(p, q)| p == q)
                    .count();
        }
        done += k;
        x = &x[k..];
        y = &y[k..];
    }
    done
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
        // In-order bytes go straight to the held queue (one copy).
        let before = self.held.len();
        self.primary.accept(
            seq,
            flags,
            payload,
            self.cfg.max_out_of_order,
            &mut self.held,
        );
        if flags.rst {
            self.release_held(out);
            self.end(true, out);
            return;
        }
        if self.diverged {
            self.release_held(out);
            if self.primary.ended() {
                self.end(false, out);
            }
            return;
        }
        if self.held.len() > before {
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
        self.secondary.accept(
            seq,
            flags,
            payload,
            self.cfg.max_out_of_order,
            &mut self.pending,
        );
        if flags.rst && self.secondary.fin.is_none() {
            // The secondary's stream ends here; whatever the primary sends past it diverges.
            self.secondary.fin = Some(self.secondary.next);
        }
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

    /// The primary's in-order bytes waiting for the secondary's, and the secondary's waiting
    /// for the primary's: a frontend that can slow either side (a proxy) reads no more from
    /// the side that is ahead while its backlog is large, instead of letting the memory
    /// budget release it unconfirmed.
    pub fn backlog(&self) -> (usize, usize) {
        (self.held.len(), self.pending.len())
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
        let same = common_prefix(&self.held, &self.pending, n);
        if same > 0 {
            self.pending.drain(..same);
            let mut bytes = Vec::with_capacity(same);
            let (a, b) = self.held.as_slices();
            bytes.extend_from_slice(&a[..same.min(a.len())]);
            bytes.extend_from_slice(&b[..same - same.min(a.len())]);
            self.held.drain(..same);
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
            out.push(Event::Release(Vec::from(std::mem::take(&mut self.held))));
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

#[cfg(test)]
mod tests;
