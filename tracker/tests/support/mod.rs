//! Test harness: real `qbus-tracker` and `qbus-broker` processes (`qbus_testkit::process`)
//! set up as these tests want them; helpers to query trackers over HTTP and to wait for
//! events with a bounded timeout instead of sleeping.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

use std::time::Duration;

use hyper::Method;

pub use qbus_testkit::process::{BrokerProcess, TrackerProcess};
pub use qbus_testkit::{wait_for, wait_for_async};

/// Report interval of the brokers in these tests: short, so leases and warm-ups are short.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// Warm-up of the trackers in these tests: longer than one report interval.
pub const WARMUP: Duration = Duration::from_millis(500);

/// A whole HTTP response.
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request without a body on a fresh connection, the way `curl` does it; the whole
/// exchange is bounded by 5 s.
pub async fn http(port: u16, method: Method, path: &str) -> HttpReply {
    let addr = format!("127.0.0.1:{port}");
    let exchange = qbus_testkit::http::once(&addr, method, path, &[], "");
    let reply = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| panic!("no reply to {path} within 5 s"));
    HttpReply {
        status: reply.status.as_u16(),
        content_type: reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: reply.text(),
    }
}

/// A tracker with the test warm-up.
pub fn tracker() -> TrackerProcess {
    TrackerProcess::start(WARMUP)
}

/// A broker with a fresh temp store, reporting to `trackers` every [`REPORT_INTERVAL`].
pub fn broker(trackers: &[&TrackerProcess]) -> BrokerProcess {
    broker_reporting_every(trackers, REPORT_INTERVAL)
}

/// A broker with a fresh temp store, reporting to `trackers` every `interval`.
pub fn broker_reporting_every(trackers: &[&TrackerProcess], interval: Duration) -> BrokerProcess {
    let trackers: Vec<String> = trackers.iter().map(|t| t.addr()).collect();
    let interval = format!("{}ms", interval.as_millis());
    BrokerProcess::start(&[
        "--tracker",
        &trackers.join(","),
        "--report-interval",
        &interval,
    ])
}

/// `tracker://` address of `trackers`.
pub fn tracker_url(trackers: &[&TrackerProcess]) -> String {
    let list: Vec<String> = trackers.iter().map(|t| t.addr()).collect();
    format!("tracker://{}", list.join(","))
}

/// Waits until an HA handle's topology lists exactly `addrs` as brokers holding `mq` (or as
/// brokers at all when `mq` is `None`).
pub async fn wait_for_brokers(
    client: &qbus_client::Broker,
    mq: Option<&str>,
    addrs: &[String],
    limit: Duration,
) {
    let mut want: Vec<String> = addrs.to_vec();
    want.sort();
    let what = format!("brokers {want:?} holding {mq:?}");
    wait_for(&what, limit, || {
        let topology = client.topology().expect("an HA handle");
        let mut have: Vec<String> = match mq {
            Some(mq) => topology
                .holders(mq)
                .iter()
                .map(|c| c.addr.to_string())
                .collect(),
            None => topology.brokers().map(|b| b.addr.clone()).collect(),
        };
        have.sort();
        (have == want).then_some(())
    })
    .await
}
