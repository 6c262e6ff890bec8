//! Test harness: real `qbus-broker` processes (`qbus_testkit::process::BrokerProcess`), and
//! the client scenarios that every kind of broker (process or embedded) must pass.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod scenarios;

pub use qbus_testkit::process::BrokerProcess;
pub use qbus_testkit::wait_for;
