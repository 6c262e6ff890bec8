//! Counters of what the tracker has done since it started, read by `GET /api/stats` and
//! `GET /metrics`. Relaxed atomics: each counter is read on its own, never together with
//! another as one consistent value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The tracker's counters; one per [`Table`](crate::table::Table).
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    reports: AtomicU64,
    pushed: AtomicU64,
    http_requests: AtomicU64,
}

impl Metrics {
    /// All counters at zero, the uptime starting now.
    pub fn new() -> Metrics {
        Metrics {
            started: Instant::now(),
            reports: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            http_requests: AtomicU64::new(0),
        }
    }

    /// Time since the tracker started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts a `Report` frame received, whether or not it was accepted.
    pub fn report_received(&self) {
        self.reports.fetch_add(1, Ordering::Relaxed);
    }

    /// `Report` frames received since the start.
    pub fn reports_received(&self) -> u64 {
        self.reports.load(Ordering::Relaxed)
    }

    /// Counts a `TopologyUpdate` frame queued to a subscriber.
    pub fn update_pushed(&self) {
        self.pushed.fetch_add(1, Ordering::Relaxed);
    }

    /// `TopologyUpdate` frames queued to subscribers since the start.
    pub fn updates_pushed(&self) -> u64 {
        self.pushed.load(Ordering::Relaxed)
    }

    /// Counts an HTTP request.
    pub fn http_request(&self) {
        self.http_requests.fetch_add(1, Ordering::Relaxed);
    }

    /// HTTP requests served since the start.
    pub fn http_requests(&self) -> u64 {
        self.http_requests.load(Ordering::Relaxed)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
