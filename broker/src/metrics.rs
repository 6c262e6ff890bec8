//! Counters behind the monitor page, `/api/stats` and `/metrics`.
//!
//! Each is a plain atomic bumped with one relaxed add where the event happens (a produce, a
//! fetch, an fsync) and only read when someone looks, so counting costs the hot path almost
//! nothing and needs no lock. Relaxed ordering is enough: readers want totals, not a
//! consistent cut across counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::rates::RateHistory;

/// Messages and bytes that went through one MQ since the broker started.
#[derive(Debug, Default)]
pub struct MqCounters {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    acked: AtomicU64,
}

/// A reading of [`MqCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MqTraffic {
    /// Records accepted for appending.
    pub messages_in: u64,
    /// Bytes of those records (record format, headers included).
    pub bytes_in: u64,
    /// Records delivered to consumers, redeliveries included.
    pub messages_out: u64,
    /// Bytes of those records.
    pub bytes_out: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
}

impl MqCounters {
    /// Counts records accepted for appending.
    pub fn produced(&self, messages: u64, bytes: u64) {
        self.messages_in.fetch_add(messages, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts records handed to a consumer.
    pub fn delivered(&self, messages: u64, bytes: u64) {
        self.messages_out.fetch_add(messages, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts acknowledged deliveries.
    pub fn acked(&self, messages: u64) {
        self.acked.fetch_add(messages, Ordering::Relaxed);
    }

    /// The current totals.
    pub fn read(&self) -> MqTraffic {
        MqTraffic {
            messages_in: self.messages_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
        }
    }
}

/// The protocol a client connection speaks; the label of the connection metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Binary frames (TCP or the embedded broker's in-process links).
    Binary,
    /// HTTP/1.1 on the same port.
    Http,
}

impl Protocol {
    /// Every protocol, in label order.
    pub const ALL: [Protocol; 2] = [Protocol::Binary, Protocol::Http];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Binary => "binary",
            Protocol::Http => "http",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Broker-wide counters: connections, HTTP requests, and the MQs' recent rates.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    open: [AtomicU64; 2],
    accepted: [AtomicU64; 2],
    http_requests: AtomicU64,
    rates: RateHistory,
}

impl BrokerMetrics {
    /// Per-second rates of every MQ over the last minutes.
    pub fn rates(&self) -> &RateHistory {
        &self.rates
    }

    /// Counts a new connection; it stays counted as open until the guard drops.
    pub fn connection(self: &Arc<Self>, protocol: Protocol) -> OpenConnection {
        self.accepted[protocol.index()].fetch_add(1, Ordering::Relaxed);
        self.open[protocol.index()].fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            metrics: self.clone(),
            protocol,
        }
    }

    /// Connections open now.
    pub fn open(&self, protocol: Protocol) -> u64 {
        self.open[protocol.index()].load(Ordering::Relaxed)
    }

    /// Connections accepted since the start.
    pub fn accepted(&self, protocol: Protocol) -> u64 {
        self.accepted[protocol.index()].load(Ordering::Relaxed)
    }

    /// Counts one HTTP request.
    pub fn http_request(&self) {
        self.http_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// HTTP requests served since the start.
    pub fn http_requests(&self) -> u64 {
        self.http_requests.load(Ordering::Relaxed)
    }
}

/// Keeps one connection counted as open; dropping it (however the connection ends) uncounts it.
#[derive(Debug)]
pub struct OpenConnection {
    metrics: Arc<BrokerMetrics>,
    protocol: Protocol,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.metrics.open[self.protocol.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

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

    #[test]
    fn open_connections_are_uncounted_on_drop() {
        let m = Arc::new(BrokerMetrics::default());
        let a = m.connection(Protocol::Http);
        let b = m.connection(Protocol::Http);
        let c = m.connection(Protocol::Binary);
        drop(a);
        assert_eq!((m.open(Protocol::Http), m.open(Protocol::Binary)), (1, 1));
        drop((b, c));
        assert_eq!((m.open(Protocol::Http), m.accepted(Protocol::Http)), (0, 2));
    }

    #[test]
    fn mq_counters_add_up() {
        let c = MqCounters::default();
        c.produced(3, 300);
        c.delivered(2, 200);
        c.delivered(1, 100);
        c.acked(2);
        assert_eq!(
            c.read(),
            MqTraffic {
                messages_in: 3,
                bytes_in: 300,
                messages_out: 3,
                bytes_out: 300,
                acked: 2
            }
        );
    }
}
