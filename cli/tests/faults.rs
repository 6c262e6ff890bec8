//! The black-box multi-fault run of replicas (`qbus bench faults`, `docs/replication.md`)
//! with short timings: two real trackers and three real brokers, `replicas: 2` at
//! `replicated`, four `tracker://` producers and a consumer group; one broker killed and
//! its store deleted, restarted empty; another one frozen. The scenario checks its own
//! outcome (and fails otherwise); this test runs it on reserved ports and reads its
//! RESULT line as well.

mod support;

use std::time::Duration;

use qbus_testkit::ports::reserve_port;
use qbus_testkit::process::built_binary;
use support::BenchRun;

/// The run takes about 20 s plus the restore; a loaded machine may take longer.
const LIMIT: Duration = Duration::from_secs(150);

#[test]
fn no_confirmed_message_is_lost_through_a_lost_store_and_a_hung_broker() {
    let broker = built_binary("qbus-broker", "qbus-broker");
    built_binary("qbus-tracker", "qbus-tracker");
    let bin_dir = broker.parent().expect("target dir").to_path_buf();
    let ports: Vec<_> = (0..5).map(|_| reserve_port()).collect();
    let ports: Vec<String> = ports.iter().map(|p| p.get().to_string()).collect();
    let run = BenchRun::run(
        &[
            "faults",
            "--kill-after",
            "3",
            "--pause",
            "1.5",
            "--outage",
            "5",
            "--freeze-after",
            "1",
            "--freeze",
            "4",
            "--tail",
            "1.5",
            "--drain",
            "20",
            "--rate",
            "600",
            "--in-flight",
            "16",
            "--report-interval",
            "300ms",
            "--ports",
            &ports.join(","),
        ],
        &bin_dir,
        LIMIT,
    );
    let (field, stdout) = (|key| run.field(key), &run.stdout);
    assert_eq!(field("lost"), 0, "{stdout}");
    assert!(field("confirmed") > 1000, "{stdout}");
    // The killed broker had unread records, all read from its follower while it was down.
    assert!(field("outage_backlog") > 0, "{stdout}");
    assert_eq!(
        field("outage_copy_read"),
        field("outage_copy_end"),
        "{stdout}"
    );
    assert!(field("outage_delivered") > 0, "{stdout}");
    assert!(field("duplicates") <= field("duplicate_bound"), "{stdout}");
}
