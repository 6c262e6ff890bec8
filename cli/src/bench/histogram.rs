//! Latency samples in microseconds and their percentiles (nearest-rank on the sorted
//! samples: exact, and cheap enough for millions of samples).

use std::time::Duration;

/// Latency samples, one `u32` of microseconds each.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Vec<u32>,
}

/// Percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    pub count: usize,
    pub min: u32,
    pub mean: u32,
    pub p50: u32,
    pub p99: u32,
    pub p999: u32,
    pub max: u32,
}

impl Latencies {
    pub fn with_capacity(capacity: usize) -> Latencies {
        Latencies {
            samples: Vec::with_capacity(capacity),
        }
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self.samples.push(micros);
    }

    /// Adds every sample of `other` (another worker's).
    pub fn merge(&mut self, other: Latencies) {
        self.samples.extend(other.samples);
    }

    pub fn summarize(mut self) -> Summary {
        let samples = &mut self.samples;
        if samples.is_empty() {
            return Summary::default();
        }
        samples.sort_unstable();
        let sum: u64 = samples.iter().map(|&s| u64::from(s)).sum();
        Summary {
            count: samples.len(),
            min: samples[0],
            mean: (sum / samples.len() as u64) as u32,
            p50: percentile(samples, 0.50),
            p99: percentile(samples, 0.99),
            p999: percentile(samples, 0.999),
            max: samples[samples.len() - 1],
        }
    }
}

/// The nearest-rank `q` quantile of `sorted` (not empty).
fn percentile(sorted: &[u32], q: f64) -> u32 {
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut lat = Latencies::default();
        for us in (1..=1000).rev() {
            lat.record(Duration::from_micros(us));
        }
        let s = lat.summarize();
        assert_eq!((s.count, s.min, s.max), (1000, 1, 1000));
        assert_eq!((s.p50, s.p99, s.p999), (500, 990, 999));
        assert_eq!(s.mean, 500);
    }

    #[test]
    fn one_and_none() {
        let mut lat = Latencies::default();
        lat.record(Duration::from_micros(7));
        assert_eq!(lat.summarize().p999, 7);
        assert_eq!(Latencies::default().summarize(), Summary::default());
    }
}
