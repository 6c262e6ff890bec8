//! Test harness: real `qbus-broker` and `qbus-tracker` processes on free loopback ports with
//! temp stores (as in `broker/tests/support`), the `Greeter` service the tests call, and the
//! scenarios every invoker must pass.
//!
//! The binaries are the workspace's own, found next to this test's executable: `cargo test
//! --workspace` builds them; after `cargo test -p qbus-rpc` alone, build them first with
//! `cargo build -p qbus-broker -p qbus-tracker -p qbus-cli`.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod greeter;
pub mod plain;
pub mod scenarios;

use std::time::Duration;

use qbus_testkit::process::{broker_command, tracker_command, ServerProcess};

pub use qbus_testkit::process::{binary, KillOnDrop};
pub use qbus_testkit::{free_port, wait_for, wait_for_async};

/// A server child process killed when dropped.
pub struct Process {
    server: ServerProcess,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl Process {
    /// A `qbus-broker` on a free port with a temp store; `tracker` makes it report there.
    pub fn broker(tracker: Option<&str>) -> Process {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let mut cmd = broker_command(&binary("qbus-broker"), port, &dir.path().join("store"));
        if let Some(tracker) = tracker {
            cmd.args(["--tracker", tracker, "--report-interval", "500ms"]);
        }
        Process {
            server: ServerProcess::start("qbus-broker", cmd, port),
            port,
            _dir: Some(dir),
        }
    }

    /// A `qbus-tracker` on a free port, ready at once (no warm-up).
    pub fn tracker() -> Process {
        let port = free_port();
        let cmd = tracker_command(&binary("qbus-tracker"), port, Duration::ZERO);
        Process {
            server: ServerProcess::start("qbus-tracker", cmd, port),
            port,
            _dir: None,
        }
    }

    /// A `qbus-broker` holding the MQ `mq`, which nothing consumes, and a client of it.
    pub async fn broker_with_idle_mq(mq: &str) -> (Process, qbus_client::Broker) {
        let process = Process::broker(None);
        let broker = qbus_client::Broker::connect(&process.addr())
            .await
            .expect("connect to the broker");
        broker
            .create_mq(mq, qbus_client::MqOptions::default())
            .await
            .expect("create the MQ");
        (process, broker)
    }

    pub fn addr(&self) -> String {
        self.server.addr()
    }

    /// SIGKILL: no goodbye.
    pub fn kill9(&mut self) {
        self.server.kill9();
    }
}
