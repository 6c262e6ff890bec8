//! Test harness: real `qbus-tracker` and `qbus-broker` processes on free loopback ports with
//! temp stores, killed by PID; helpers to query trackers (binary protocol and HTTP) and to
//! wait for events with a bounded timeout instead of sleeping.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use qbus_client::ha::query_tracker;
use qbus_client::topology::TopologyUpdate;

/// Report interval of the brokers in these tests: short, so leases and warm-ups are short.
pub const REPORT_INTERVAL: Duration = Duration::from_millis(200);
/// Warm-up of the trackers in these tests: longer than one report interval.
pub const WARMUP: Duration = Duration::from_millis(500);

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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the future `check` makes every 10 ms until it yields `Some`, failing the test after
/// `limit`.
pub async fn wait_for_async<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

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
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("127.0.0.1:{port}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("a response");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.into_body().collect().await.expect("the body");
        HttpReply {
            status,
            content_type,
            body: String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        }
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| panic!("no reply to {path} within 5 s"))
}

/// A free port on 127.0.0.1 (the OS picks it; the listener is dropped right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// The `qbus-broker` binary, built once per test run: it belongs to another package, so
/// cargo does not build it for this one's tests.
fn broker_binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let tracker = PathBuf::from(env!("CARGO_BIN_EXE_qbus-tracker"));
        let dir = tracker.parent().expect("binary directory");
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        let mut build = Command::new(env!("CARGO"));
        build.args([
            "build",
            "--quiet",
            "-p",
            "qbus-broker",
            "--bin",
            "qbus-broker",
            "--manifest-path",
            manifest,
        ]);
        if profile == "release" {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build for qbus-broker");
        assert!(status.success(), "building qbus-broker failed");
        dir.join("qbus-broker")
    })
}

/// A child process that is killed when dropped.
struct Proc {
    child: Option<Child>,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, mut command: Command, port: u16) -> Proc {
        command.env("RUST_LOG", "warn").stdin(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut proc = Proc {
            child: Some(child),
            name,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Ok(Some(status))) = proc.child.as_mut().map(|c| c.try_wait()) {
                panic!("{name} exited at start-up: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{name} did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        proc
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("not running")
    }

    /// SIGKILL, and reaps the process.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(
            status.success(),
            "kill {signal} {} ({})",
            self.pid(),
            self.name
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `qbus-tracker` process.
pub struct Tracker {
    proc: Proc,
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

    fn spawn(port: u16, warmup: Duration) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qbus-tracker"));
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--warmup", &format!("{}ms", warmup.as_millis())]);
        Proc::spawn("qbus-tracker", cmd, port)
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
    proc: Proc,
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

    fn spawn(port: u16, store: &std::path::Path, trackers: &[String], interval: Duration) -> Proc {
        let mut cmd = Command::new(broker_binary());
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--store")
            .arg(store)
            .args(["--tracker", &trackers.join(",")])
            .args(["--report-interval", &format!("{}ms", interval.as_millis())]);
        Proc::spawn("qbus-broker", cmd, port)
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
