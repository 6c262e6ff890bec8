//! Issue 13's independent check with short timings (`qbus bench txfaults`): a real broker,
//! four transactional producer processes with checkers, each committing, rolling back or
//! abandoning transactions (killed with `kill -9` and restarted, resolved by check-back)
//! while the broker is killed with `kill -9` three times. The scenario checks its own
//! outcome (and fails otherwise); this test runs it on a reserved port and reads its
//! RESULT line as well.

mod support;

use std::time::Duration;

use qbus_testkit::ports::reserve_port;
use qbus_testkit::process::built_binary;
use support::BenchRun;

/// The run takes about 15 s; a loaded machine may take longer.
const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn consumers_see_exactly_the_committed_transactions_through_producer_and_broker_kills() {
    let broker = built_binary("qbus-broker", "qbus-broker");
    let bin_dir = broker.parent().expect("target dir").to_path_buf();
    let port = reserve_port();
    let port = port.get().to_string();
    let run = BenchRun::run(
        &[
            "txfaults",
            "--duration",
            "8",
            "--outage",
            "0.5",
            "--drain",
            "10",
            "--ports",
            &port,
        ],
        &bin_dir,
        LIMIT,
    );
    let (field, stdout) = (|key| run.field(key), &run.stdout);
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
