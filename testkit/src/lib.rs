//! The harness the qbus crates' tests share (a dev-dependency only):
//!
//! - [`ports`]: loopback ports that parallel tests never share ([`reserve_port`]).
//! - [`wait_for`], [`wait_for_async`]: bounded waits instead of sleeps.
//! - [`process`]: the workspace's server binaries as child processes on reserved loopback
//!   ports, killed when dropped: [`BrokerProcess`](process::BrokerProcess) and
//!   [`TrackerProcess`](process::TrackerProcess).
//! - [`greeter`]: the RPC service the tests call (`#[service] trait Greeter`), with a probe.
//! - [`http`]: an HTTP/1.1 client connection, as `curl` would use it.
//! - [`prometheus`]: a strict parser of the Prometheus text format.
//! - [`tls`]: a certificate authority made in the test (rcgen), its PEM files and the
//!   SDK's TLS settings for it.
//! - [`chromium`]: headless Chromium to load a monitor page.

#![allow(clippy::unwrap_used)] // a harness fails loudly by design

pub mod chromium;
pub mod greeter;
pub mod http;
pub mod ports;
pub mod process;
pub mod prometheus;
pub mod tls;

pub use ports::reserve_port;

use std::future::Future;
use std::time::{Duration, Instant};

/// How often the waits poll.
const POLL: Duration = Duration::from_millis(10);

/// Polls `check` every 10 ms until it returns `Some`, failing the test after `limit`.
pub async fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the future `check` makes every 10 ms until it yields `Some`, failing the test after
/// `limit`.
pub async fn wait_for_async<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}
