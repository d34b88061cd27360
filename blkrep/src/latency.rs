//! Latency samples with percentiles over a sliding window, for status reports, and a
//! cumulative histogram of every sample, for metrics.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency percentiles over a sliding window, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest sample ever.
    pub max: u64,
    /// Samples ever recorded.
    pub samples: u64,
}

/// Latency samples with percentiles over a sliding window.
#[derive(Debug)]
pub struct Latencies {
    window: Vec<u64>,
    next: usize,
    count: u64,
    max: u64,
    /// Samples per bucket of [`BUCKETS_US`] (the last: above every bound).
    buckets: [u64; BUCKETS_US.len() + 1],
    sum_us: u64,
}

/// Upper bounds of the histogram's buckets, in microseconds: 100 µs to 10 s.
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Every sample recorded, by bucket: what a Prometheus histogram exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    /// `(upper bound in µs, samples at or below it)`, cumulative, ascending.
    pub buckets: Vec<(u64, u64)>,
    /// Samples in all.
    pub count: u64,
    /// Their sum, in microseconds.
    pub sum_us: u64,
}

const WINDOW: usize = 4096;

impl Default for Latencies {
    fn default() -> Self {
        Self {
            window: Vec::with_capacity(WINDOW),
            next: 0,
            count: 0,
            max: 0,
            buckets: [0; BUCKETS_US.len() + 1],
            sum_us: 0,
        }
    }
}

impl Latencies {
    /// Record one sample, in microseconds.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if self.window.len() < WINDOW {
            self.window.push(us);
        } else {
            self.window[self.next] = us;
        }
        self.next = (self.next + 1) % WINDOW;
        self.count += 1;
        self.max = self.max.max(us);
        self.sum_us = self.sum_us.saturating_add(us);
        let i = BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i] += 1;
    }

    /// The cumulative histogram of every sample.
    pub fn histogram(&self) -> Histogram {
        let mut acc = 0;
        Histogram {
            buckets: BUCKETS_US
                .iter()
                .zip(self.buckets)
                .map(|(&b, n)| {
                    acc += n;
                    (b, acc)
                })
                .collect(),
            count: self.count,
            sum_us: self.sum_us,
        }
    }

    /// The `p`-th percentile (0..=100) of the window, in microseconds.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.window.is_empty() {
            return 0;
        }
        let mut v = self.window.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * (v.len() as f64)).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// p50, p99 and max, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            p50: self.percentile(50.0),
            p99: self.percentile(99.0),
            max: self.max,
            samples: self.count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_and_counts_every_sample() {
        let mut l = Latencies::default();
        for us in [50, 100, 101, 3_000, 20_000_000] {
            l.record(Duration::from_micros(us));
        }
        let h = l.histogram();
        assert_eq!(h.count, 5);
        assert_eq!(h.sum_us, 50 + 100 + 101 + 3_000 + 20_000_000);
        assert_eq!(h.buckets[0], (100, 2), "le=100 holds 50 and 100");
        assert_eq!(h.buckets[1], (250, 3));
        assert_eq!(h.buckets[5], (5_000, 4));
        assert_eq!(
            *h.buckets.last().unwrap(),
            (10_000_000, 4),
            "20 s is only in +Inf"
        );
    }
}
