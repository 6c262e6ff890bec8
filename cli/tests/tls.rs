//! `qbus` against a TLS broker: `--ca` (or `QBUS_CA`) with a `tls://` address produces and
//! consumes; without the CA the command fails and says what is missing.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Output;

use qbus_testkit::process::BrokerProcess;
use qbus_testkit::tls::TestCa;

async fn qbus(args: &[&str], env: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qbus"))
        .args(args)
        .env_remove("QBUS_CA")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap()
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn produce_and_consume_with_a_ca_file() {
    let ca = TestCa::new("qbus test CA");
    let args = ca.issue("broker").server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = BrokerProcess::start(&args);
    let addr = format!("tls://{}", broker.addr());
    let ca_file = ca.ca().display().to_string();
    let with_ca = ["--broker", &addr, "--ca", &ca_file];
    ok(&qbus(&[&with_ca[..], &["mq", "create", "orders"]].concat(), &[]).await);
    ok(&qbus(
        &[&with_ca[..], &["produce", "orders", "sealed"]].concat(),
        &[],
    )
    .await);
    // The CA from the environment, as scripts set it.
    let consume = ["--broker", &addr, "consume", "orders", "--count", "1"];
    let out = qbus(&consume, &[("QBUS_CA", &ca_file)]).await;
    assert_eq!(ok(&out).trim(), "sealed");
    let out = qbus(&["--broker", &addr, "mq", "list"], &[]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("QBUS_CA"), "{stderr}");
}
