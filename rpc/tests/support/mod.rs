//! Test harness: real `qbus-broker` and `qbus-tracker` processes (`qbus_testkit::process`),
//! the `Greeter` service the tests call (`qbus_testkit::greeter`), and the scenarios every
//! invoker must pass.
//!
//! The binaries are the workspace's own, found next to this test's executable: `cargo test
//! --workspace` builds them; after `cargo test -p qbus-rpc` alone, build them first with
//! `cargo build -p qbus-broker -p qbus-tracker -p qbus-cli`.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod plain;
pub mod scenarios;

use std::time::Duration;

pub use qbus_testkit::greeter;
pub use qbus_testkit::process::{binary, BrokerProcess, KillOnDrop, TrackerProcess};
pub use qbus_testkit::{wait_for, wait_for_async};

/// A broker with a temp store reporting to `tracker` every 500 ms.
pub fn broker_reporting_to(tracker: &TrackerProcess) -> BrokerProcess {
    BrokerProcess::start(&["--tracker", &tracker.addr(), "--report-interval", "500ms"])
}

/// A tracker ready at once (no warm-up).
pub fn tracker() -> TrackerProcess {
    TrackerProcess::start(Duration::ZERO)
}
