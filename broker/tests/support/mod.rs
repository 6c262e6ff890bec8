//! Test harness: real `qbus-broker` processes on free loopback ports with temp stores, and
//! the client scenarios that every kind of broker (process or embedded) must pass.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::Command;

use qbus_client::Broker;
use qbus_testkit::process::{broker_command, ServerProcess};

pub use qbus_testkit::{free_port, wait_for};

/// A `qbus-broker` child process; killed when dropped.
pub struct BrokerProcess {
    process: Option<ServerProcess>,
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
            process: None,
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
        let binary = Path::new(env!("CARGO_BIN_EXE_qbus-broker"));
        let mut cmd = broker_command(binary, port, store);
        cmd.args(extra);
        cmd
    }

    fn spawn(&mut self) {
        let command = BrokerProcess::command(self.port, &self.store, &self.extra);
        self.process = Some(ServerProcess::start("qbus-broker", command, self.port));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.as_ref().expect("broker not running").pid()
    }

    /// SIGKILL: no flush, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill9();
        }
    }

    /// SIGTERM, and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut process = self.process.take().expect("broker not running");
        process.terminate()
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
