//! Issue 13's independent check with short timings (`qbus bench txfaults`): a real broker,
//! four transactional producer processes with checkers, each committing, rolling back or
//! abandoning transactions (killed with `kill -9` and restarted, resolved by check-back)
//! while the broker is killed with `kill -9` three times. The scenario checks its own
//! outcome (and fails otherwise); this test runs it on a reserved port and reads its
//! RESULT line as well.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qbus_testkit::ports::reserve_port;
use qbus_testkit::process::built_binary;

/// The run takes about 15 s; a loaded machine may take longer.
const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn consumers_see_exactly_the_committed_transactions_through_producer_and_broker_kills() {
    let broker = built_binary("qbus-broker", "qbus-broker");
    let bin_dir = broker.parent().expect("target dir").to_path_buf();
    let port = reserve_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_qbus"))
        .args(["bench", "txfaults", "--duration", "8", "--outage", "0.5"])
        .args(["--drain", "10", "--ports", &port.get().to_string()])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .env("QBUS_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qbus bench txfaults");
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("qbus bench txfaults took over {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line: {stdout}"));
    let field = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {line}"))
    };
    for zero in ["missing", "partial", "unwanted", "duplicates", "left_open"] {
        assert_eq!(field(zero), 0, "{zero}: {stdout}");
    }
    assert_eq!(field("broker_kills"), 3, "{stdout}");
    assert_eq!(
        field("expected"),
        field("delivered") - field("redelivered"),
        "{stdout}"
    );
    // Every path was taken: commits, rollbacks, abandons, and abandons after the commit
    // was decided (committed by the check-back).
    assert!(field("committed") > 10, "{stdout}");
    assert!(field("rolled_back") > 10, "{stdout}");
    assert!(field("abandoned") > 5, "{stdout}");
    assert!(field("abandoned_committed") > 0, "{stdout}");
}
