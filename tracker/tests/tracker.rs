//! The tracker on its own, against real `qbus-tracker` and `qbus-broker` processes: brokers
//! are dropped when their connection closes and when they miss their lease, changes reach
//! it within 100 ms, it answers `GET /topology` as JSON, and bad input does not hurt it.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hyper::Method;
use qbus_client::MqOptions;
use support::{
    broker, broker_reporting_every, http, wait_for, wait_for_async, TrackerProcess, REPORT_INTERVAL,
};

/// Polls the tracker until `done` holds for its broker list; returns how long it took.
async fn until(
    tracker: &TrackerProcess,
    what: &str,
    limit: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Duration {
    let start = Instant::now();
    wait_for_async(what, limit, || async {
        done(&tracker.broker_addrs().await).then_some(())
    })
    .await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_are_dropped_on_close_at_once_and_on_silence_after_their_lease() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    let interval = Duration::from_millis(300);
    let mut killed = broker_reporting_every(&[&tracker], interval);
    let frozen = broker_reporting_every(&[&tracker], interval);
    let (k, f) = (killed.addr(), frozen.addr());
    until(&tracker, "both brokers", Duration::from_secs(5), |b| {
        b.contains(&k) && b.contains(&f)
    })
    .await;

    killed.kill9();
    let closed = until(
        &tracker,
        "the killed broker to go",
        Duration::from_secs(5),
        |b| !b.contains(&k),
    )
    .await;
    assert!(
        closed < interval,
        "dropped after {closed:?}: by its lease, not at the close"
    );

    frozen.freeze();
    let silent = until(
        &tracker,
        "the frozen broker to go",
        Duration::from_secs(5),
        |b| !b.contains(&f),
    )
    .await;
    frozen.thaw();
    eprintln!(
        "dropped {closed:?} after kill -9, {silent:?} after SIGSTOP (lease 3 x {interval:?})"
    );
    // Its last report may have come up to an interval before the freeze.
    assert!(
        silent >= interval,
        "dropped after {silent:?}: before its lease ran out"
    );
    until(
        &tracker,
        "the thawed broker to report again",
        Duration::from_secs(5),
        |b| b.contains(&f),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_reach_subscribers_within_100ms() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    // A long interval: only change reports can explain a quick update.
    let broker = broker_reporting_every(&[&tracker], Duration::from_secs(10));
    let client = qbus_client::Broker::connect(&support::tracker_url(&[&tracker]))
        .await
        .unwrap();
    support::wait_for_brokers(&client, None, &[broker.addr()], Duration::from_secs(5)).await;
    let direct = broker.client().await;

    let created = Instant::now();
    direct
        .create_mq("news", MqOptions::default())
        .await
        .unwrap();
    wait_for("the new MQ in the topology", Duration::from_secs(5), || {
        (!client.topology().unwrap().holders("news").is_empty()).then_some(())
    })
    .await;
    let mq_seen = created.elapsed();

    let joined = Instant::now();
    let _consumer = direct
        .consumer("news")
        .group("readers")
        .subscribe()
        .await
        .unwrap();
    wait_for(
        "the consumer in the topology",
        Duration::from_secs(5),
        || {
            let topology = client.topology().unwrap();
            let state = topology.brokers().next()?.mq("news")?.clone();
            state
                .groups
                .iter()
                .any(|g| g.name == "readers" && g.consumers == 1)
                .then_some(())
        },
    )
    .await;
    let consumer_seen = joined.elapsed();
    eprintln!("client saw the new MQ after {mq_seen:?}, the new consumer after {consumer_seen:?}");
    // The broker reports within 100 ms; the rest is the tracker's push and this poll.
    assert!(mq_seen < Duration::from_millis(300), "{mq_seen:?}");
    assert!(
        consumer_seen < Duration::from_millis(300),
        "{consumer_seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_is_served_as_json_over_http() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    let broker = broker(&[&tracker]);
    broker
        .client()
        .await
        .create_mq("jobs", MqOptions::default())
        .await
        .unwrap();
    let addr = broker.addr();
    until(&tracker, "the broker", Duration::from_secs(5), |b| {
        b.contains(&addr)
    })
    .await;
    let response = wait_for_async("the MQ at the tracker", Duration::from_secs(5), || async {
        let response = http(tracker.port(), Method::GET, "/topology").await;
        response.body.contains("\"jobs\"").then_some(response)
    })
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.content_type, "application/json");
    let topology = response.json();
    assert_eq!(topology["ready"], true);
    let brokers = topology["brokers"].as_array().expect("a list of brokers");
    assert_eq!(brokers.len(), 1);
    assert_eq!(brokers[0]["addr"], addr.as_str());
    assert_eq!(brokers[0]["kind"], "broker");
    assert_eq!(brokers[0]["mqs"][0]["name"], "jobs");
    assert_eq!(
        brokers[0]["report_interval_ms"],
        REPORT_INTERVAL.as_millis() as u64
    );

    assert_eq!(
        http(tracker.port(), Method::GET, "/nothing").await.status,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_the_tracker_keeps_serving() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    // A length prefix far over the frame limit.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", tracker.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&[0x20, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert!(!reply.is_empty(), "an error frame before the close");
    let (frame, _) = qbus_client::protocol::decode(&reply, 1 << 20).unwrap();
    assert_eq!(frame.header.status, 413);

    // A report without an identity, and a broker command, over a real connection.
    let connection = qbus_client::Connection::new(
        qbus_client::link::TcpConnector::new(tracker.addr(), 1 << 20),
        qbus_client::ConnectionOptions::default(),
    );
    let report = qbus_client::protocol::Frame::with_body(
        qbus_client::protocol::Header::request(qbus_client::protocol::Command::Report, None),
        rmp_serde::to_vec_named(&qbus_client::topology::NodeState::default())
            .unwrap()
            .into(),
    );
    let err = connection.request(report).await.unwrap_err();
    assert_eq!(err.status(), Some(qbus_client::Status::BadRequest), "{err}");
    let produce = qbus_client::protocol::Frame::new(qbus_client::protocol::Header::request(
        qbus_client::protocol::Command::Produce,
        Some("x"),
    ));
    let err = connection.request(produce).await.unwrap_err();
    assert_eq!(
        err.status(),
        Some(qbus_client::Status::UnknownCommand),
        "{err}"
    );
    assert!(err.to_string().contains("tracker"), "{err}");

    assert!(tracker.query().await.brokers.is_empty(), "still answering");
}
