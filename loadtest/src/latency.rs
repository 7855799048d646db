//! Latency recording: HDR histograms in microseconds, sharded so that thousands of
//! connection tasks on a few threads rarely wait on the same lock.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Shards: a few per core is enough to make contention rare.
const SHARDS: usize = 16;
/// Highest value recorded: 10 minutes in µs (larger values are clamped).
const MAX_US: u64 = 600_000_000;

/// A sharded histogram of microsecond values.
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

/// An empty histogram of 1 µs .. 10 min with 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

impl Latency {
    /// Records `us` from the connection (or task) `idx`.
    pub fn record(&self, idx: usize, us: u64) {
        let mut h = self.shards[idx % SHARDS].lock().expect("histogram lock");
        h.saturating_record(us.clamp(1, MAX_US));
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.shards {
            let h = shard.lock().expect("histogram lock");
            all.add(&*h).expect("same bounds");
        }
        all
    }
}

/// Percentiles in milliseconds, as the report shows them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest value.
    pub max: f64,
    /// How many values were recorded.
    pub count: u64,
}

impl Percentiles {
    /// Percentiles of a µs histogram, in ms.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            count: h.len(),
        }
    }
}

/// A histogram as (value, count) pairs: how worker processes hand theirs to the parent.
pub fn to_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

/// Adds (value, count) pairs to `h`.
pub fn add_pairs(h: &mut Histogram<u64>, pairs: &[(u64, u64)]) {
    for &(value, count) in pairs {
        h.saturating_record_n(value.clamp(1, MAX_US), count);
    }
}
