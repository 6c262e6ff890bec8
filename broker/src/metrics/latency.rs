//! A latency histogram with fixed buckets (the commit thread's fsyncs), read in the layout
//! Prometheus exports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// Upper bounds (seconds) of the fsync latency buckets: 100 µs (a fast NVMe flush) to 2.5 s
/// (a stalled disk), roughly ×2.5 apart.
pub const FSYNC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A latency histogram with fixed buckets, exported in the Prometheus layout.
#[derive(Debug)]
pub struct LatencyHistogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

/// A reading of a [`LatencyHistogram`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistogramReading {
    /// Upper bound of each bucket in seconds, then `None` for `+Inf`, with the number of
    /// observations at or below it (cumulative, as Prometheus wants).
    pub buckets: Vec<(Option<f64>, u64)>,
    /// Sum of all observations in seconds.
    pub sum_seconds: f64,
    /// Number of observations.
    pub count: u64,
}

impl LatencyHistogram {
    /// An empty histogram with the given bucket upper bounds (ascending, in seconds).
    pub fn new(bounds: &'static [f64]) -> LatencyHistogram {
        LatencyHistogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn read(&self) -> HistogramReading {
        let mut cumulative = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (self.bounds.get(i).copied(), cumulative)
            })
            .collect();
        HistogramReading {
            buckets,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            // The +Inf bucket, not `count`: both are read without a lock, and Prometheus
            // requires `_count` to equal the +Inf bucket.
            count: cumulative,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = LatencyHistogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(1)); // on the bound: counts as <= 0.001
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(3));
        let r = h.read();
        assert_eq!(
            r.buckets,
            vec![(Some(0.001), 2), (Some(0.01), 3), (None, 4)]
        );
        assert_eq!(r.count, 4);
        assert!((r.sum_seconds - 3.0065).abs() < 1e-9);
    }
}
