//! The `qbus` binary end to end, against a broker served over TCP on a free loopback port.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::io::Write;
use std::process::{Command, Output, Stdio};

use qbus_broker::{bind, run, Settings};
use tokio_util::sync::CancellationToken;

/// A broker on 127.0.0.1 with a temp store, served by its own runtime thread.
struct TestBroker {
    addr: String,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    fn start() -> TestBroker {
        let dir = tempfile::tempdir().unwrap();
        let config = Settings {
            bind: Some("127.0.0.1".into()),
            port: Some(0),
            store: Some(dir.path().join("store")),
            ..Settings::default()
        }
        .resolve()
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(bind(&config)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let thread = std::thread::spawn(move || {
            runtime.block_on(run(listener, config, stop)).unwrap();
        });
        TestBroker {
            addr,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn qbus(&self, args: &[&str]) -> Output {
        self.qbus_with_stdin(args, None)
    }

    fn qbus_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qbus"))
            .arg("--broker")
            .arg(&self.addr)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "expected success, got {:?}\nstdout: {}\nstderr: {}",
        output.status,
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Fails with exit status 1 and a single `qbus: ...` line on stderr; returns that line.
#[track_caller]
fn fails(output: Output) -> String {
    assert_eq!(output.status.code(), Some(1), "stdout: {}", stdout(&output));
    let err = stderr(&output);
    assert!(err.starts_with("qbus: "), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    err
}

#[test]
fn mq_lifecycle() {
    let broker = TestBroker::start();
    let created = ok(broker.qbus(&[
        "mq",
        "create",
        "orders",
        "--ack-timeout-ms",
        "5000",
        "--max-deliveries",
        "3",
        "--dead-letter",
        "orders.dead",
    ]));
    assert!(created.starts_with("created orders"), "{created}");
    let again = ok(broker.qbus(&["mq", "create", "orders", "--max-deliveries", "3"]));
    assert!(again.starts_with("exists orders"), "{again}");
    let conflict = fails(broker.qbus(&["mq", "create", "orders", "--max-deliveries", "4"]));
    assert!(conflict.contains("max-deliveries"), "{conflict}");

    ok(broker.qbus(&["produce", "orders", "a", "b"]));
    let list = ok(broker.qbus(&["mq", "list"]));
    let row: Vec<&str> = list.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!((row[0], row[1]), ("orders", "2"), "{list}");
    let json = ok(broker.qbus(&["mq", "list", "--json"]));
    assert!(json.contains(r#""name":"orders""#) && json.contains(r#""depth":2"#));

    ok(broker.qbus(&["consume", "orders", "--group", "billing", "--count", "1"]));
    let info = ok(broker.qbus(&["mq", "info", "orders"]));
    for expected in [
        "depth:    2",
        "max_deliveries=3",
        "dead_letter=orders.dead",
        "billing",
    ] {
        assert!(info.contains(expected), "{expected:?} missing from\n{info}");
    }
    let info_json = ok(broker.qbus(&["mq", "info", "orders", "--json"]));
    assert!(info_json.contains(r#""committed":1"#), "{info_json}");

    assert_eq!(
        ok(broker.qbus(&["mq", "remove", "orders"])),
        "removed orders\n"
    );
    fails(broker.qbus(&["mq", "info", "orders"]));
    fails(broker.qbus(&["mq", "remove", "orders"]));
}

#[test]
fn produce_and_consume() {
    let broker = TestBroker::start();
    ok(broker.qbus(&["mq", "create", "q"]));
    let receipts = ok(broker.qbus(&["produce", "q", "one", "two words"]));
    assert_eq!(
        receipts,
        "offset=0 durability=synced\noffset=1 durability=synced\n"
    );
    let summary = ok(broker.qbus_with_stdin(&["produce", "q", "--quiet"], Some("three\r\nfour\n")));
    assert_eq!(summary, "sent 2 messages\n");

    let got = ok(broker.qbus(&["consume", "q", "--count", "4"]));
    assert_eq!(got, "one\ntwo words\nthree\nfour\n");
    let info = ok(broker.qbus(&["mq", "info", "q", "--json"]));
    assert!(info.contains(r#""committed":4"#), "acks confirmed: {info}");

    // Nothing left: a bounded wait fails with the count reached.
    let err = fails(broker.qbus(&["consume", "q", "--count", "1", "--timeout", "0.3"]));
    assert!(err.contains("received 0 of 1"), "{err}");
    // Without --count, running out of time is a normal end.
    assert_eq!(ok(broker.qbus(&["consume", "q", "--timeout", "0.3"])), "");
    // Another group sees everything again, and a tag filter applies.
    ok(broker.qbus(&["produce", "q", "--tag", "eu", "tagged"]));
    let eu = ok(broker.qbus(&["consume", "q", "-g", "eu", "--tag", "eu", "-n", "1"]));
    assert_eq!(eu, "tagged\n");
}

#[test]
fn produce_with_delay_and_ttl() {
    let broker = TestBroker::start();
    let created = ok(broker.qbus(&["mq", "create", "later", "--ttl", "1h"]));
    assert!(created.contains("ttl=3600000ms expired=drop"), "{created}");
    let sent = std::time::Instant::now();
    ok(broker.qbus(&["produce", "later", "soon", "--delay", "1s", "--ttl", "10m"]));
    ok(broker.qbus(&["produce", "later", "now"]));
    let info = ok(broker.qbus(&["mq", "info", "later"]));
    assert!(info.contains("ttl=3600000ms"), "{info}");
    let got = ok(broker.qbus(&["consume", "later", "--count", "2", "--timeout", "10"]));
    assert_eq!(got, "now\nsoon\n");
    assert!(
        sent.elapsed() >= std::time::Duration::from_secs(1),
        "not before its time"
    );
    let bad = broker.qbus(&["produce", "later", "x", "--delay", "soon"]);
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("duration"), "{}", stderr(&bad));
}

#[test]
fn failures_are_one_line_and_exit_1() {
    let broker = TestBroker::start();
    let err = fails(broker.qbus(&["produce", "missing", "x"]));
    assert!(err.contains("not found"), "{err}");
    fails(broker.qbus(&["consume", "missing", "--count", "1"]));
    let out = Command::new(env!("CARGO_BIN_EXE_qbus"))
        .args([
            "--broker",
            "127.0.0.1:1",
            "--connect-timeout",
            "0.2",
            "mq",
            "list",
        ])
        .output()
        .unwrap();
    let err = fails(out);
    assert!(err.contains("cannot connect"), "{err}");
}

#[test]
fn bench_prints_result_lines() {
    let broker = TestBroker::start();
    let produce = ok(broker.qbus(&[
        "bench",
        "produce",
        "--count",
        "2000",
        "--warmup",
        "100",
        "--in-flight",
        "32",
    ]));
    let line = produce.lines().find(|l| l.starts_with("RESULT ")).unwrap();
    let keys: Vec<&str> = line
        .split_whitespace()
        .skip(1)
        .map(|kv| kv.split_once('=').unwrap().0)
        .collect();
    assert_eq!(
        keys,
        [
            "system",
            "scenario",
            "size",
            "count",
            "window",
            "msgs_per_s",
            "mb_per_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "batch",
            "durability"
        ]
    );
    assert!(line.starts_with(
        "RESULT system=qbus scenario=produce size=16 count=2000 window=32 msgs_per_s="
    ));
    assert!(line.ends_with("batch=1 durability=synced"), "{line}");

    let batched = ok(broker.qbus(&["bench", "produce", "--count", "1000", "--batch", "10"]));
    assert!(batched.contains(" batch=10 "), "{batched}");

    let consume = ok(broker.qbus(&["bench", "consume", "--count", "5000", "--batch", "128"]));
    let line = consume.lines().find(|l| l.starts_with("RESULT ")).unwrap();
    assert!(
        line.starts_with("RESULT system=qbus scenario=consume size=16 count=5000 window=128 "),
        "{line}"
    );
}

#[test]
fn bench_keyorder_checks_the_order_per_key_through_consumer_kills() {
    let broker = TestBroker::start();
    let out = ok(broker.qbus(&[
        "bench",
        "keyorder",
        "--count",
        "20000",
        "--keys",
        "50",
        "--batch",
        "64",
        "--kill-consumers",
        "3",
    ]));
    let line = out.lines().find(|l| l.starts_with("RESULT ")).unwrap();
    assert!(
        line.starts_with("RESULT system=qbus scenario=keyorder count=20000 keys=50 consumers=4 "),
        "{line}"
    );
    assert!(line.contains(" kills=3 "), "{line}");
    assert!(line.ends_with(" order_violations=0"), "{line}");
}

#[test]
fn tx_list_commit_and_rollback() {
    let broker = TestBroker::start();
    ok(broker.qbus(&["mq", "create", "orders"]));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (first, second) = runtime.block_on(async {
        let client = qbus_client::Broker::connect(&broker.addr).await.unwrap();
        let options = qbus_client::TxOptions {
            group: Some("billing".into()),
            timeout_ms: Some(600_000),
            ..Default::default()
        };
        let first = client.begin(options.clone()).await.unwrap();
        first.send("orders", "debit").await.unwrap();
        let second = client.begin(options).await.unwrap();
        second.send("orders", "credit").await.unwrap();
        (first.id(), second.id())
    });
    let listed = ok(broker.qbus(&["tx", "list"]));
    assert!(
        listed.contains("billing") && listed.contains("orders:1"),
        "{listed}"
    );
    assert!(
        listed.contains(&first.to_string()) && listed.contains("pending"),
        "{listed}"
    );
    let committed = ok(broker.qbus(&["tx", "commit", &first.to_string()]));
    assert_eq!(committed, format!("transaction {first} committed\n"));
    let again = ok(broker.qbus(&["tx", "commit", &first.to_string()]));
    assert_eq!(
        again,
        format!("transaction {first} was already committed\n")
    );
    // With its broker named (as over tracker://): this one, or refused for another.
    let on = ok(broker.qbus(&["tx", "commit", &first.to_string(), "--on", &broker.addr]));
    assert_eq!(on, format!("transaction {first} was already committed\n"));
    let elsewhere =
        fails(broker.qbus(&["tx", "commit", &first.to_string(), "--on", "127.0.0.1:1"]));
    assert!(elsewhere.contains("connect to 127.0.0.1:1"), "{elsewhere}");
    let rolled = ok(broker.qbus(&["tx", "rollback", &second.to_string()]));
    assert_eq!(rolled, format!("transaction {second} rolled back\n"));
    let refused = broker.qbus(&["tx", "commit", &second.to_string()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("rolled back"));
    let json = ok(broker.qbus(&["tx", "list", "--json"]));
    assert_eq!(json.trim(), "[]");
    let got = ok(broker.qbus(&["consume", "orders", "--count", "1"]));
    assert_eq!(got, "debit\n");
}
