//! Per-packet comparison for one UDP or ICMP flow: the primary's and the secondary's
//! payloads are queued and compared in order, whole packet with whole packet.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Event;

/// The comparison of one flow's packets. Events are those of [`crate::stream::TcpCompare`],
/// with packet numbers for offsets: [`Event::Release`] carries one whole primary packet,
/// [`Event::Mismatch`] and [`Event::Timeout`] the number (from 0, counting the primary's
/// packets of this flow) of the first packet that differs or waited too long.
#[derive(Debug)]
pub struct PacketCompare {
    timeout: Duration,
    /// The primary's packets waiting for the secondary's, with their arrival times.
    held: VecDeque<(Vec<u8>, Instant)>,
    /// The secondary's packets waiting for the primary's.
    pending: VecDeque<Vec<u8>>,
    bytes: usize,
    /// The number of the first held primary packet.
    next_index: u64,
    diverged: bool,
    passthrough: bool,
    compared: u64,
}

impl PacketCompare {
    /// A new comparison with the given compare timeout.
    pub fn new(compare_timeout: Duration) -> PacketCompare {
        PacketCompare {
            timeout: compare_timeout,
            held: VecDeque::new(),
            pending: VecDeque::new(),
            bytes: 0,
            next_index: 0,
            diverged: false,
            passthrough: false,
            compared: 0,
        }
    }

    /// A flow that is never compared: the primary's packets are released as they come.
    pub fn passthrough() -> PacketCompare {
        PacketCompare {
            diverged: true,
            passthrough: true,
            ..PacketCompare::new(Duration::ZERO)
        }
    }

    /// A primary packet arrived at `now`.
    pub fn primary(&mut self, payload: &[u8], now: Instant, out: &mut Vec<Event>) {
        if self.diverged {
            self.next_index += 1;
            out.push(Event::Release(payload.to_vec()));
            return;
        }
        self.bytes += cost(payload);
        self.held.push_back((payload.to_vec(), now));
        self.compare(out);
    }

    /// A secondary packet arrived. Ignored while diverged.
    pub fn secondary(&mut self, payload: &[u8], out: &mut Vec<Event>) {
        if self.diverged {
            return;
        }
        self.bytes += cost(payload);
        self.pending.push_back(payload.to_vec());
        self.compare(out);
    }

    /// Report [`Event::Timeout`] (and release what is held) if the oldest held packet waited
    /// `compare_timeout` or longer.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Event>) {
        if self.diverged {
            return;
        }
        if let Some(&(_, t)) = self.held.front() {
            if now.saturating_duration_since(t) >= self.timeout {
                out.push(Event::Timeout {
                    offset: self.next_index,
                });
                self.shed(out);
            }
        }
    }

    /// Restart comparison after a checkpoint committed: held primary packets are released,
    /// the secondary's queue dropped, and the next packets of both sides are compared.
    pub fn resync(&mut self, out: &mut Vec<Event>) {
        self.release_held(out);
        self.pending.clear();
        self.bytes = 0;
        self.diverged = self.passthrough;
    }

    /// Release the held packets, drop the secondary's, and pass the primary's through until
    /// [`PacketCompare::resync`]. Returns whether the flow was being compared.
    pub fn shed(&mut self, out: &mut Vec<Event>) -> bool {
        let was = !self.diverged;
        self.release_held(out);
        self.pending.clear();
        self.bytes = 0;
        self.diverged = true;
        was
    }

    /// Payload bytes held (both queues), an empty packet counting as one byte.
    pub fn held_bytes(&self) -> usize {
        self.bytes
    }

    /// When the oldest held primary packet arrived.
    pub fn oldest_held(&self) -> Option<Instant> {
        self.held.front().map(|&(_, t)| t)
    }

    /// Payload bytes found identical on both sides so far.
    pub fn compared(&self) -> u64 {
        self.compared
    }

    /// Whether comparison is off (after a divergence, or a passthrough flow).
    pub fn diverged(&self) -> bool {
        self.diverged
    }

    fn compare(&mut self, out: &mut Vec<Event>) {
        while !self.held.is_empty() && !self.pending.is_empty() {
            let same = self.held[0].0 == self.pending[0];
            if !same {
                out.push(Event::Mismatch {
                    offset: self.next_index,
                });
                self.shed(out);
                return;
            }
            let (p, _) = self.held.pop_front().expect("not empty");
            let s = self.pending.pop_front().expect("not empty");
            self.bytes -= cost(&p) + cost(&s);
            self.compared += p.len() as u64;
            self.next_index += 1;
            out.push(Event::Release(p));
        }
    }

    fn release_held(&mut self, out: &mut Vec<Event>) {
        for (p, _) in self.held.drain(..) {
            self.next_index += 1;
            out.push(Event::Release(p));
        }
    }
}

/// What a held packet counts against the memory budget: its payload, at least one byte, so
/// that empty packets cannot pile up uncounted.
fn cost(payload: &[u8]) -> usize {
    payload.len().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn equal_packets_release_in_order() {
        let t = Instant::now();
        let mut c = PacketCompare::new(10 * MS);
        let mut ev = Vec::new();
        c.primary(b"one", t, &mut ev);
        c.primary(b"two", t, &mut ev);
        assert!(ev.is_empty());
        c.secondary(b"one", &mut ev);
        assert_eq!(ev, vec![Event::Release(b"one".to_vec())]);
        c.secondary(b"two", &mut ev);
        c.secondary(b"three", &mut ev);
        c.primary(b"three", t, &mut ev);
        assert_eq!(
            ev,
            vec![
                Event::Release(b"one".to_vec()),
                Event::Release(b"two".to_vec()),
                Event::Release(b"three".to_vec())
            ]
        );
        assert_eq!(c.held_bytes(), 0);
        assert_eq!(c.compared(), 11);
    }

    #[test]
    fn different_packet_is_a_mismatch_at_its_number() {
        let t = Instant::now();
        let mut c = PacketCompare::new(10 * MS);
        let mut ev = Vec::new();
        c.primary(b"a", t, &mut ev);
        c.secondary(b"a", &mut ev);
        c.primary(b"b", t, &mut ev);
        c.primary(b"c", t, &mut ev);
        c.secondary(b"B", &mut ev);
        assert_eq!(
            ev,
            vec![
                Event::Release(b"a".to_vec()),
                Event::Mismatch { offset: 1 },
                Event::Release(b"b".to_vec()),
                Event::Release(b"c".to_vec())
            ]
        );
        assert!(c.diverged());
        ev.clear();
        c.primary(b"d", t, &mut ev);
        c.secondary(b"d", &mut ev);
        assert_eq!(ev, vec![Event::Release(b"d".to_vec())]);
        c.resync(&mut ev);
        c.primary(b"e", t, &mut ev);
        assert_eq!(ev.len(), 1);
        c.secondary(b"e", &mut ev);
        assert_eq!(ev[1], Event::Release(b"e".to_vec()));
    }

    #[test]
    fn missing_secondary_packet_times_out() {
        let t = Instant::now();
        let mut c = PacketCompare::new(10 * MS);
        let mut ev = Vec::new();
        c.primary(b"ping", t, &mut ev);
        c.poll(t + 9 * MS, &mut ev);
        assert!(ev.is_empty());
        c.poll(t + 10 * MS, &mut ev);
        assert_eq!(
            ev,
            vec![
                Event::Timeout { offset: 0 },
                Event::Release(b"ping".to_vec())
            ]
        );
        c.poll(t + 100 * MS, &mut ev);
        assert_eq!(ev.len(), 2);
    }

    #[test]
    fn extra_secondary_packet_is_a_mismatch() {
        let t = Instant::now();
        let mut c = PacketCompare::new(10 * MS);
        let mut ev = Vec::new();
        c.secondary(b"spurious", &mut ev);
        c.primary(b"reply", t, &mut ev);
        assert_eq!(
            ev,
            vec![
                Event::Mismatch { offset: 0 },
                Event::Release(b"reply".to_vec())
            ]
        );
    }
}
