//! Test harness: real `qbus-broker` and `qbus-tracker` processes on free loopback ports with
//! temp stores (as in `broker/tests/support`), the `Greeter` service the tests call, and the
//! scenarios every invoker must pass.
//!
//! The binaries are the workspace's own, found next to this test's executable: `cargo test
//! --workspace` builds them; after `cargo test -p qbus-rpc` alone, build them first with
//! `cargo build -p qbus-broker -p qbus-tracker -p qbus-cli`.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod greeter;
pub mod plain;
pub mod scenarios;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A free port on 127.0.0.1 (the OS picks it; the listener is dropped right away).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// A workspace binary next to this test executable (`target/<profile>/<name>`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p qbus-broker -p qbus-tracker -p qbus-cli` \
         (cargo test --workspace does)",
        path.display()
    );
    path
}

/// A child process killed when dropped.
pub struct Process {
    child: Option<Child>,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl Process {
    fn spawn(mut cmd: Command, port: u16, dir: Option<tempfile::TempDir>) -> Process {
        let child = cmd
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn server process");
        let mut process = Process {
            child: Some(child),
            port,
            _dir: dir,
        };
        let addr = process.addr();
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(Ok(Some(status))) = process.child.as_mut().map(Child::try_wait) {
                panic!("server process exited at start-up: {status}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        process
    }

    /// A `qbus-broker` on a free port with a temp store; `tracker` makes it report there.
    pub fn broker(tracker: Option<&str>) -> Process {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut cmd = Command::new(binary("qbus-broker"));
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--store")
            .arg(dir.path().join("store"));
        if let Some(tracker) = tracker {
            cmd.args(["--tracker", tracker, "--report-interval", "500ms"]);
        }
        Process::spawn(cmd, port, Some(dir))
    }

    /// A `qbus-tracker` on a free port, ready at once (no warm-up).
    pub fn tracker() -> Process {
        let port = free_port();
        let mut cmd = Command::new(binary("qbus-tracker"));
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--warmup", "0s"]);
        Process::spawn(cmd, port, None)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills a child when dropped (for processes a test starts itself).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
