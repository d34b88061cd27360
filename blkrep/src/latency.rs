//! Latency samples with percentiles over a sliding window, for status reports.

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
}

const WINDOW: usize = 4096;

impl Default for Latencies {
    fn default() -> Self {
        Self {
            window: Vec::with_capacity(WINDOW),
            next: 0,
            count: 0,
            max: 0,
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
