//! Test harness: real `qbus-broker` processes on free loopback ports with temp stores, and
//! the client scenarios that every kind of broker (process or embedded) must pass.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod scenarios;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qbus_client::Broker;

/// Bounded wait used instead of sleeps: polls `check` until it returns `Some`.
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free port on 127.0.0.1 (the OS picks it; the listener is dropped right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A `qbus-broker` child process; killed when dropped.
pub struct BrokerProcess {
    child: Option<Child>,
    pub port: u16,
    pub store: PathBuf,
    extra: Vec<String>,
    _dir: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    /// Starts a broker on a free port with a fresh temp store.
    pub fn start(extra: &[&str]) -> BrokerProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = dir.path().join("store");
        let mut broker = BrokerProcess {
            child: None,
            port: free_port(),
            store,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _dir: Some(dir),
        };
        broker.spawn();
        broker
    }

    /// The command line for this broker (for tests that want to watch it fail).
    pub fn command(port: u16, store: &Path, extra: &[String]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qbus-broker"));
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--store")
            .arg(store)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    }

    fn spawn(&mut self) {
        let child = BrokerProcess::command(self.port, &self.store, &self.extra)
            .spawn()
            .expect("spawn qbus-broker");
        self.child = Some(child);
        let addr = self.addr();
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("qbus-broker exited at start-up: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "broker did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("broker not running")
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("broker not running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "broker ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the broker again on the same port and store.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub async fn client(&self) -> Broker {
        Broker::connect(&self.addr())
            .await
            .expect("connect to broker")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
