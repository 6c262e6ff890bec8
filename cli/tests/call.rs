//! `qbus call`, the command-line caller: JSON arguments in, the JSON result (or the error)
//! out, through a broker MQ and straight to a server.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::Output;

use qbus_client::Broker;
use qbus_rpc::{MqRpcService, RpcServer};
use qbus_testkit::greeter;
use qbus_testkit::process::BrokerProcess;

async fn qbus(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_qbus"))
        .args(args)
        .output()
        .await
        .unwrap()
}

fn stdout(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_calls_print_json() {
    let (processor, _) = greeter::processor("cli");
    let server = RpcServer::bind("127.0.0.1:0", processor).await.unwrap();
    let addr = server.local_addr().to_string();
    let out = qbus(&["call", "--direct", &addr, "Greeter.echo", r#"[4, "four"]"#]).await;
    assert_eq!(stdout(&out), serde_json::json!([4, "four"]));
    // A single value is the only argument; the method's own error is part of the result.
    let out = qbus(&["call", "--direct", &addr, "Greeter.check", r#""""#]).await;
    assert_eq!(
        stdout(&out),
        serde_json::json!({"Err": {"Rejected": {"reason": "empty name"}}})
    );
    // Framework errors go to stderr with a failing status.
    let out = qbus(&["call", "--direct", &addr, "Greeter.nope"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("404") && stderr.contains("\"nope\""),
        "{stderr}"
    );
    let out = qbus(&["call", "--direct", &addr, "no-dot", "[]"]).await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODULE.METHOD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mq_calls_print_json() {
    let broker = BrokerProcess::start(&[]);
    let (processor, _) = greeter::processor("cli");
    let client = Broker::connect(&broker.addr()).await.unwrap();
    let _service = MqRpcService::start(&client, "cli-rpc", processor)
        .await
        .unwrap();
    let out = qbus(&[
        "--broker",
        &broker.addr(),
        "call",
        "--mq",
        "cli-rpc",
        "--compact",
        "Greeter.hello",
        r#"["shell"]"#,
    ])
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#""Hello, shell!""#
    );
    let out = qbus(&[
        "--broker",
        &broker.addr(),
        "call",
        "--mq",
        "nobody",
        "Greeter.hello",
        "[]",
    ])
    .await;
    assert!(String::from_utf8_lossy(&out.stderr).contains("no responders"));
}
