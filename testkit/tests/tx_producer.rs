//! The `qbus-tx-producer` helper refuses what it cannot run with a line that says why.
//! (Having an integration test also makes `cargo test --workspace` build the binary with
//! every other one, for the tests that start it.)

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qbus-tx-producer"))
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run qbus-tx-producer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn wrong_arguments_get_the_usage_line() {
    let (ok, err) = run(&["127.0.0.1:1"]);
    assert!(!ok);
    assert!(
        err.contains("usage: qbus-tx-producer ADDR GROUP half|commit"),
        "{err}"
    );
}

#[test]
fn a_broker_that_is_not_there_is_an_error_not_a_hang() {
    let port = qbus_testkit::ports::reserve_port();
    let (ok, err) = run(&[&port.addr(), "g", "half"]);
    assert!(!ok);
    assert!(err.contains("Error:"), "the failure is explained: {err}");
}
