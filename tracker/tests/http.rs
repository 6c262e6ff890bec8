//! HTTP on the tracker port, against a real `qbus-tracker` process with two real
//! `qbus-broker` processes reporting to it (and a DirectRPC node registered over the binary
//! protocol): `/api/stats` as JSON, `/metrics` in the Prometheus text format with counters
//! that move, and the monitor page in headless Chromium.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;
use qbus_client::protocol::{Command, Frame, Header};
use qbus_client::topology::{NodeKind, NodeState};
use qbus_client::{Connection, ConnectionOptions, MqOptions};
use qbus_testkit::{chromium, prometheus};
use serde_json::Value;
use support::{broker, http, wait_for_async, TrackerProcess, REPORT_INTERVAL};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// Registers a DirectRPC node offering `services` at `tracker`, the way an `RpcServer` with
/// trackers does; it stays listed while the returned connection is open.
async fn register_rpc_node(tracker: &TrackerProcess, addr: &str, services: &[&str]) -> Connection {
    let connection = Connection::new(
        qbus_client::link::TcpConnector::new(tracker.addr(), 1 << 20),
        ConnectionOptions::default(),
    );
    let state = NodeState {
        id: addr.into(),
        addr: addr.into(),
        kind: NodeKind::RpcServer,
        epoch: 1,
        seq: 1,
        // Long enough that the lease outlives the test without further reports.
        report_interval_ms: 60_000,
        services: services.iter().map(|s| s.to_string()).collect(),
        ..NodeState::default()
    };
    let report = Frame::with_body(
        Header::request(Command::Report, None),
        rmp_serde::to_vec_named(&state).unwrap().into(),
    );
    connection.request(report).await.unwrap();
    connection
}

/// `/api/stats` once it satisfies `done`.
async fn stats_when(port: u16, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_for_async(what, WAIT, || async {
        let stats = http(port, Method::GET, "/api/stats").await.json();
        done(&stats).then_some(stats)
    })
    .await
}

/// The node `id` in a stats snapshot.
fn node<'a>(stats: &'a Value, id: &str) -> Option<&'a Value> {
    stats["brokers"].as_array()?.iter().find(|n| n["id"] == id)
}

/// The depth of `mq` on node `id` in a stats snapshot.
fn depth(stats: &Value, id: &str, mq: &str) -> Option<u64> {
    node(stats, id)?["mqs"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == mq)?["depth"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_lists_the_brokers_with_report_age_and_the_services() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    let (a, b) = (broker(&[&tracker]), broker(&[&tracker]));
    let _rpc = register_rpc_node(&tracker, "127.0.0.1:1", &["calc"]).await;
    a.client()
        .await
        .create_mq("jobs", MqOptions::default())
        .await
        .unwrap();
    let stats = stats_when(tracker.port(), "both brokers and the MQ", |s| {
        node(s, &b.addr()).is_some() && depth(s, &a.addr(), "jobs").is_some()
    })
    .await;

    let t = &stats["tracker"];
    assert_eq!(t["address"], tracker.addr().as_str());
    assert_eq!(t["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(t["ready"], true);
    assert_eq!(t["lease_reports"], 3);
    assert!(t["uptime_ms"].as_u64() > Some(0));
    assert!(t["reports_received"].as_u64() >= Some(3), "{t}");
    assert!(t["seq"].as_u64() >= Some(3), "{t}");

    let lease = 3 * REPORT_INTERVAL.as_millis() as u64;
    for broker in [&a, &b] {
        let n = node(&stats, &broker.addr()).unwrap();
        assert_eq!(n["addr"], broker.addr().as_str());
        assert_eq!(n["kind"], "broker");
        assert_eq!(n["report_interval_ms"], REPORT_INTERVAL.as_millis() as u64);
        let age = n["report_age_ms"].as_u64().unwrap();
        let left = n["lease_left_ms"].as_u64().unwrap();
        assert!(
            age < lease && left <= lease,
            "age {age} ms, lease left {left} ms"
        );
    }
    assert_eq!(node(&stats, &a.addr()).unwrap()["mqs"][0]["name"], "jobs");
    assert_eq!(node(&stats, "127.0.0.1:1").unwrap()["kind"], "rpc");
    assert_eq!(
        stats["services"],
        serde_json::json!([{"name": "calc", "providers": ["127.0.0.1:1"]}])
    );

    // Brokers repeat an unchanged report every interval, and each repeat renews the report
    // time: the age falls back instead of growing until the lease runs out.
    let age = |s: &Value| node(s, &a.addr()).and_then(|n| n["report_age_ms"].as_u64());
    let oldest = std::cell::Cell::new(age(&stats).unwrap());
    stats_when(tracker.port(), "a repeated report to renew the age", |s| {
        let now = age(s).unwrap();
        let renewed = now < oldest.get();
        oldest.set(now);
        renewed
    })
    .await;

    let wrong = http(tracker.port(), Method::POST, "/api/stats").await;
    assert_eq!(wrong.status, 405, "{}", wrong.body);
    let missing = http(tracker.port(), Method::GET, "/api/nothing").await;
    assert_eq!(missing.status, 404, "{}", missing.body);
}

/// The tracker's `/metrics` parsed strictly (see [`prometheus::parse`]): it has counters and
/// gauges only. Returns each series (`name{labels}`) with its value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    prometheus::parse(text, &["counter", "gauge"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    let (a, b) = (broker(&[&tracker]), broker(&[&tracker]));
    // A subscriber, so changes are pushed somewhere.
    let client = qbus_client::Broker::connect(&support::tracker_url(&[&tracker]))
        .await
        .unwrap();
    support::wait_for_brokers(&client, None, &[a.addr(), b.addr()], WAIT).await;
    // Listed once the reply arrives: the tracker records a report before answering it.
    let _rpc = register_rpc_node(&tracker, "127.0.0.1:1", &["calc"]).await;

    let scrape = || async {
        let reply = http(tracker.port(), Method::GET, "/metrics").await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reply.content_type,
            "text/plain; version=0.0.4; charset=utf-8"
        );
        parse_prometheus(&reply.body)
    };
    let metric = |series: &BTreeMap<String, f64>, key: &str| -> f64 {
        *series
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {series:#?}"))
    };
    let before = scrape().await;
    let m = |key: &str| metric(&before, key);
    assert_eq!(m("qbus_tracker_nodes{kind=\"broker\"}"), 2.0);
    assert_eq!(m("qbus_tracker_nodes{kind=\"rpc\"}"), 1.0);
    // The client, and each broker following the topology for replicas.
    assert_eq!(m("qbus_tracker_subscribers"), 3.0);
    assert_eq!(m("qbus_tracker_ready"), 1.0);
    assert_eq!(
        m(&format!(
            "qbus_tracker_build_info{{version=\"{}\",protocol=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            qbus_client::protocol::PROTOCOL_VERSION
        )),
        1.0
    );
    let lease = 3.0 * REPORT_INTERVAL.as_secs_f64();
    for broker in [&a, &b] {
        let age = m(&format!(
            "qbus_tracker_report_age_seconds{{node=\"{}\",kind=\"broker\"}}",
            broker.addr()
        ));
        assert!((0.0..lease).contains(&age), "report age {age} s");
    }
    assert!(m("qbus_tracker_updates_pushed_total") >= 1.0);

    // A new MQ is a change: the broker reports it, the tracker publishes it and pushes it to
    // the subscriber; meanwhile the periodic reports keep arriving.
    a.client()
        .await
        .create_mq("metered", MqOptions::default())
        .await
        .unwrap();
    let counters = [
        "qbus_tracker_reports_total",
        "qbus_tracker_topology_changes_total",
        "qbus_tracker_updates_pushed_total",
        "qbus_tracker_http_requests_total",
    ];
    let after = wait_for_async("every counter to move", WAIT, || async {
        let now = scrape().await;
        counters
            .iter()
            .all(|c| metric(&now, c) > metric(&before, c))
            .then_some(now)
    })
    .await;
    wait_for_async("the subscriber to see the MQ", WAIT, || async {
        (!client.topology().unwrap().holders("metered").is_empty()).then_some(())
    })
    .await;
    for c in counters {
        eprintln!("{c}: {} -> {}", metric(&before, c), metric(&after, c));
    }
}

/// The browser window for the monitor page, in pixels.
const WINDOW: (u32, u32) = (1280, 1000);

/// Runs headless Chromium on `url` with `action` (`--dump-dom`) in a [`WINDOW`]; returns its
/// standard output.
async fn run_chromium(url: &str, action: &str) -> String {
    chromium::run_chromium(url, action, WINDOW).await
}

/// The part of a dumped DOM from the start of `marker` to the next `end`.
fn element<'a>(dom: &'a str, marker: &str, end: &str) -> &'a str {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page:\n{dom}"));
    let stop = dom[start..].find(end).map_or(dom.len(), |e| start + e);
    &dom[start..stop]
}

/// The row of `mq` in the section of broker `addr`.
fn mq_row<'a>(dom: &'a str, addr: &str, mq: &str) -> &'a str {
    let section = element(dom, &format!("<section data-node=\"{addr}\""), "</section>");
    element(section, &format!("<tr data-mq=\"{mq}\""), "</tr>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracker_page_in_headless_chromium() {
    let tracker = TrackerProcess::start(Duration::ZERO);
    let (a, b) = (broker(&[&tracker]), broker(&[&tracker]));
    let _rpc = register_rpc_node(&tracker, "127.0.0.1:1", &["calc", "inventory"]).await;
    let (direct_a, direct_b) = (a.client().await, b.client().await);
    for direct in [&direct_a, &direct_b] {
        direct
            .create_mq("browser-orders", MqOptions::default())
            .await
            .unwrap();
    }
    for i in 0..3 {
        direct_a
            .producer("browser-orders")
            .send(format!("order {i}"))
            .await
            .unwrap();
    }
    direct_b
        .producer("browser-orders")
        .send("order b")
        .await
        .unwrap();
    // Brokers report fresh depths every interval; the page can only show what the tracker
    // holds.
    stats_when(tracker.port(), "depths 3 and 1 at the tracker", |s| {
        depth(s, &a.addr(), "browser-orders") == Some(3)
            && depth(s, &b.addr(), "browser-orders") == Some(1)
    })
    .await;

    let url = format!("http://{}/", tracker.addr());
    let dom = run_chromium(&url, "--dump-dom").await;
    let row = mq_row(&dom, &a.addr(), "browser-orders");
    assert!(row.contains("data-depth=\"3\""), "depth 3 expected: {row}");
    let row = mq_row(&dom, &b.addr(), "browser-orders");
    assert!(row.contains("data-depth=\"1\""), "depth 1 expected: {row}");
    assert!(dom.contains("data-age=\""), "report ages shown");
    assert!(dom.contains(&tracker.addr()), "the page names the tracker");
    assert!(
        element(&dom, "<tr data-service=\"calc\"", "</tr>").contains("127.0.0.1:1"),
        "the DirectRPC service with its provider"
    );

    for i in 3..7 {
        direct_a
            .producer("browser-orders")
            .send(format!("order {i}"))
            .await
            .unwrap();
    }
    let _viewer = direct_a
        .consumer("browser-orders")
        .group("viewers")
        .subscribe()
        .await
        .unwrap();
    stats_when(
        tracker.port(),
        "depth 7 and the group at the tracker",
        |s| {
            let groups = node(s, &a.addr()).and_then(|n| {
                n["mqs"]
                    .as_array()?
                    .iter()
                    .find(|m| m["name"] == "browser-orders")
                    .map(|m| m["groups"].to_string())
            });
            depth(s, &a.addr(), "browser-orders") == Some(7)
                && groups.is_some_and(|g| g.contains("\"viewers\""))
        },
    )
    .await;
    let dom = run_chromium(&url, "--dump-dom").await;
    let row = mq_row(&dom, &a.addr(), "browser-orders");
    assert!(row.contains("data-depth=\"7\""), "depth 7 expected: {row}");
    assert!(
        row.contains("data-group=\"viewers\""),
        "group chip expected: {row}"
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tracker.png");
    chromium::screenshot(&url, &shot, WINDOW).await;
}
