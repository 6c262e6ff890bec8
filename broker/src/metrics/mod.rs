//! Counters behind the monitor page, `/api/stats` and `/metrics`.
//!
//! Each is a plain atomic bumped with one relaxed add where the event happens (a produce, a
//! fetch, an fsync) and only read when someone looks, so counting costs the hot path almost
//! nothing and needs no lock. Relaxed ordering is enough: readers want totals, not a
//! consistent cut across counters.
//!
//! - this file: broker-wide counters, connections by [`Protocol`].
//! - [`traffic`]: messages and bytes through one MQ.
//! - [`latency`]: the fsync latency histogram.
//! - [`rates`]: every MQ's per-second rates over the last two minutes.

pub mod latency;
pub mod rates;
pub mod traffic;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use self::latency::{HistogramReading, LatencyHistogram, FSYNC_BUCKETS};
use self::rates::RateHistory;
pub use self::traffic::{MqCounters, MqTraffic};

/// The protocol a client connection speaks; the label of the connection metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Binary frames (TCP or the embedded broker's in-process links).
    Binary,
    /// HTTP/1.1 on the same port.
    Http,
    /// The zbus 7.x protocol on the same port.
    Zbus,
}

impl Protocol {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Binary => "binary",
            Protocol::Http => "http",
            Protocol::Zbus => "zbus",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Broker-wide counters: connections, HTTP requests, and the MQs' recent rates.
#[derive(Debug, Default)]
pub struct BrokerMetrics {
    open: [AtomicU64; 3],
    accepted: [AtomicU64; 3],
    http_requests: AtomicU64,
    /// Requests refused by the permission check, by protocol: 401 then 403.
    denied: [[AtomicU64; 2]; 3],
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

    /// Counts a request refused with status `code` (401 or 403; anything else counts as
    /// 403).
    pub fn denied(&self, protocol: Protocol, code: u16) {
        let slot = usize::from(code != 401);
        self.denied[protocol.index()][slot].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests refused since the start over `protocol`: (401s, 403s).
    pub fn denials(&self, protocol: Protocol) -> (u64, u64) {
        let [unauthenticated, forbidden] = &self.denied[protocol.index()];
        (
            unauthenticated.load(Ordering::Relaxed),
            forbidden.load(Ordering::Relaxed),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
