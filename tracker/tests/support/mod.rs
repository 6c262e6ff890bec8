//! Test harness: real `qbus-tracker` and `qbus-broker` processes on free loopback ports with
//! temp stores, killed by PID; helpers to query trackers (binary protocol and HTTP) and to
//! wait for events with a bounded timeout instead of sleeping.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use hyper::Method;
use qbus_client::ha::query_tracker;
use qbus_client::topology::TopologyUpdate;
use qbus_testkit::process::{broker_command, built_binary, tracker_command, ServerProcess};

pub use qbus_testkit::{free_port, wait_for, wait_for_async};

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

/// A `qbus-tracker` process.
pub struct Tracker {
    proc: ServerProcess,
    pub port: u16,
    warmup: Duration,
}

impl Tracker {
    /// Starts a tracker on a free port with the test warm-up.
    pub fn start() -> Tracker {
        Tracker::with_warmup(WARMUP)
    }

    pub fn with_warmup(warmup: Duration) -> Tracker {
        let port = free_port();
        Tracker {
            proc: Tracker::spawn(port, warmup),
            port,
            warmup,
        }
    }

    fn spawn(port: u16, warmup: Duration) -> ServerProcess {
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_qbus-tracker"));
        ServerProcess::start("qbus-tracker", tracker_command(&binary, port, warmup), port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// Starts it again, empty, on the same port.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.proc = Tracker::spawn(self.port, self.warmup);
    }

    /// The tracker's own view, by a one-shot `QueryTopology`.
    pub async fn query(&self) -> TopologyUpdate {
        query_tracker(&self.addr(), Default::default())
            .await
            .expect("query the tracker")
    }

    /// Addresses of the brokers the tracker lists.
    pub async fn broker_addrs(&self) -> Vec<String> {
        self.query()
            .await
            .brokers
            .into_iter()
            .map(|b| b.addr)
            .collect()
    }
}

/// A `qbus-broker` process reporting to trackers.
pub struct Broker {
    proc: ServerProcess,
    pub port: u16,
    store: PathBuf,
    trackers: Vec<String>,
    interval: Duration,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a broker on a free port with a fresh temp store, reporting to `trackers` every
    /// [`REPORT_INTERVAL`].
    pub fn start(trackers: &[&Tracker]) -> Broker {
        Broker::with_interval(trackers, REPORT_INTERVAL)
    }

    pub fn with_interval(trackers: &[&Tracker], interval: Duration) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        let port = free_port();
        let trackers: Vec<String> = trackers.iter().map(|t| t.addr()).collect();
        Broker {
            proc: Broker::spawn(port, &store, &trackers, interval),
            port,
            store,
            trackers,
            interval,
            _dir: dir,
        }
    }

    fn spawn(
        port: u16,
        store: &std::path::Path,
        trackers: &[String],
        interval: Duration,
    ) -> ServerProcess {
        // qbus-broker belongs to another package, so cargo does not build it for these tests.
        let binary = built_binary("qbus-broker", "qbus-broker");
        let mut cmd: Command = broker_command(&binary, port, store);
        cmd.args(["--tracker", &trackers.join(",")])
            .args(["--report-interval", &format!("{}ms", interval.as_millis())]);
        ServerProcess::start("qbus-broker", cmd, port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        self.proc.kill9();
    }

    /// SIGSTOP: the process (and its reports) freeze with its connections open.
    pub fn freeze(&self) {
        self.proc.signal("-STOP");
    }

    /// SIGCONT after [`Broker::freeze`].
    pub fn thaw(&self) {
        self.proc.signal("-CONT");
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.proc.kill9();
        self.proc = Broker::spawn(self.port, &self.store, &self.trackers, self.interval);
    }

    /// A client of this broker alone.
    pub async fn direct(&self) -> qbus_client::Broker {
        qbus_client::Broker::connect(&self.addr())
            .await
            .expect("connect to the broker")
    }
}

/// `tracker://` address of `trackers`.
pub fn tracker_url(trackers: &[&Tracker]) -> String {
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
