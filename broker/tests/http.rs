//! HTTP on the broker port, against the real `qbus-broker` binary: the messaging API by
//! plain URLs, long polls, JSON errors, slow clients cut off, the binary protocol sharing
//! the port, `/metrics` in the Prometheus text format, and the monitor page in headless
//! Chromium.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use hyper::{Method, StatusCode};
use qbus_client::{Message, MqOptions};
use qbus_testkit::http::{once, Http, Reply};
use qbus_testkit::{chromium, prometheus, wait_for_async};
use serde_json::Value;
use support::BrokerProcess;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

/// Polls `check` until it yields a value, for at most [`WAIT`].
async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_async(what, WAIT, check).await
}

async fn group_stats(addr: &str, mq: &str, group: &str) -> Option<Value> {
    let stats = once(addr, Method::GET, "/api/stats", &[], Bytes::new())
        .await
        .json();
    stats["mqs"].as_array()?.iter().find(|m| m["name"] == mq)?["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == group)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_consume_ack_over_plain_urls() {
    let broker = BrokerProcess::start(&[]);
    let mut http = Http::connect(&broker.addr()).await;

    let created = http
        .send(Method::PUT, "/mq/orders", &[], r#"{"max_deliveries": 5}"#)
        .await;
    assert_eq!(created.status, 200, "{}", created.text());
    assert_eq!(created.json()["options"]["max_deliveries"], 5);

    let receipt = http.post("/mq/orders?tag=eu&key=k-1", "first order").await;
    assert_eq!(receipt.status, 200, "{}", receipt.text());
    let receipt = receipt.json();
    assert_eq!(
        (
            &receipt["offset"],
            &receipt["count"],
            &receipt["durability"]
        ),
        (&Value::from(0), &Value::from(1), &Value::from("synced"))
    );
    assert_eq!(
        http.post("/mq/orders", "second order").await.json()["offset"],
        1
    );

    let first = http.post("/mq/orders/next?group=billing", "").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.text(), "first order");
    assert_eq!(first.header("content-type"), "application/octet-stream");
    for (name, value) in [
        ("mq", "orders"),
        ("group", "billing"),
        ("offset", "0"),
        ("attempt", "1"),
        ("token", "0:1"),
        ("tag", "eu"),
        ("key", "k-1"),
    ] {
        assert_eq!(first.header(name), value, "header {name}");
    }
    assert!(first.header("timestamp").parse::<u64>().unwrap() > 0);

    let acked = http
        .post("/mq/orders/ack?group=billing&token=0:1", "")
        .await;
    assert_eq!(acked.status, 200, "{}", acked.text());
    assert_eq!(acked.json()["acked"], 1);
    assert_eq!(acked.json()["durability"], "synced");
    let again = http
        .post("/mq/orders/ack?group=billing&token=0:1", "")
        .await;
    assert_eq!(again.json()["acked"], 0, "an ack counts once");

    // A nacked message comes straight back with the next attempt.
    let second = http.post("/mq/orders/next?group=billing", "").await;
    assert_eq!(
        (second.text(), second.header("token")),
        ("second order".into(), "1:1")
    );
    let released = http
        .post("/mq/orders/nack?group=billing&token=1:1", "")
        .await;
    assert_eq!(released.json()["released"], 1);
    let redelivered = http.post("/mq/orders/next?group=billing", "").await;
    assert_eq!(redelivered.header("token"), "1:2");

    let info = http.get("/mq/orders").await.json();
    assert_eq!(info["depth"], 2);
    assert_eq!(info["groups"][0]["name"], "billing");
    assert_eq!(info["groups"][0]["committed"], 1);
    assert_eq!(info["groups"][0]["in_flight"], 1);

    // The binary protocol sees what HTTP produced.
    let client = broker.client().await;
    assert_eq!(client.query_mq("orders").await.unwrap().depth(), 2);

    let all = http.get("/mq").await.json();
    assert_eq!(all.as_array().map(Vec::len), Some(1));
    assert_eq!(all[0]["name"], "orders");
    let removed = http.send(Method::DELETE, "/mq/orders", &[], "").await;
    assert_eq!(removed.json()["removed"], "orders");
    assert_eq!(http.get("/mq/orders").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_a_message_arrives() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let mut http = Http::connect(&addr).await;
    assert_eq!(
        http.send(Method::PUT, "/mq/events", &[], "").await.status,
        200
    );

    // Nothing there: the wait runs to its end and says so with 204.
    let started = Instant::now();
    let empty = http
        .post("/mq/events/next?group=idle&timeout=300", "")
        .await;
    assert_eq!(empty.status, 204);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // A 15 s long poll, answered by a message produced while it waits.
    let poll_addr = addr.clone();
    let poller = tokio::spawn(async move {
        once(
            &poll_addr,
            Method::POST,
            "/mq/events/next?group=waiter&timeout=15000",
            &[],
            Bytes::new(),
        )
        .await
    });
    until("the long poll to be waiting", || async {
        let group = group_stats(&addr, "events", "waiter").await?;
        (group["consumers"] == 1).then_some(())
    })
    .await;
    let client = broker.client().await;
    let produced_at = Instant::now();
    client.producer("events").send("wake up").await.unwrap();
    let reply = tokio::time::timeout(WAIT, poller)
        .await
        .expect("the long poll answered before its timeout")
        .unwrap();
    assert_eq!(
        (reply.status, reply.text()),
        (StatusCode::OK, "wake up".into())
    );
    assert!(
        produced_at.elapsed() < Duration::from_secs(5),
        "the long poll took {:?} after the message arrived",
        produced_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_the_protocol_status_codes() {
    let broker = BrokerProcess::start(&["--max-frame", "64KiB"]);
    let addr = broker.addr();
    let put = once(&addr, Method::PUT, "/mq/small", &[], "").await;
    assert_eq!(put.status, 200);

    // max-frame less 512 bytes of frame header and 28 of record header.
    let limit = 64 * 1024 - 512 - 28;
    let fits = once(&addr, Method::POST, "/mq/small", &[], vec![b'x'; limit]).await;
    assert_eq!(fits.status, 200, "{}", fits.text());

    let cases: Vec<(u16, Reply, &str)> = vec![
        (
            404,
            once(&addr, Method::POST, "/mq/ghost", &[], "x").await,
            "MQ \"ghost\" does not exist",
        ),
        (
            400,
            once(&addr, Method::POST, "/mq/small/ack?token=zero", &[], "").await,
            "not offset:attempt",
        ),
        (
            404,
            once(
                &addr,
                Method::POST,
                "/mq/small/ack?group=nobody&token=0:1",
                &[],
                "",
            )
            .await,
            "no consumer group \"nobody\"",
        ),
        (
            404,
            once(&addr, Method::DELETE, "/mq/small/groups/nobody", &[], "").await,
            "no consumer group \"nobody\"",
        ),
        (
            400,
            once(&addr, Method::POST, "/mq/small/next?timeout=soon", &[], "").await,
            "timeout \"soon\"",
        ),
        (
            400,
            once(&addr, Method::PUT, "/mq/.hidden", &[], "").await,
            "invalid MQ name",
        ),
        (
            400,
            once(&addr, Method::PUT, "/mq/opts", &[], "{not json").await,
            "bad MQ options",
        ),
        (
            413,
            once(&addr, Method::POST, "/mq/small", &[], vec![b'x'; limit + 1]).await,
            "exceeds the limit",
        ),
        (
            404,
            once(&addr, Method::GET, "/nowhere", &[], "").await,
            "no route for GET /nowhere",
        ),
        (
            405,
            once(&addr, Method::DELETE, "/metrics", &[], "").await,
            "not allowed",
        ),
    ];
    for (code, reply, says) in cases {
        assert_eq!(reply.status.as_u16(), code, "{says}: {}", reply.text());
        assert_eq!(reply.header("content-type"), "application/json");
        let body = reply.json();
        assert_eq!(body["status"], code, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(says),
            "{code}: {error:?} should say {says:?}"
        );
    }

    // The largest message HTTP accepts still fits a binary fetch reply.
    let client = broker.client().await;
    let mut consumer = client.consumer("small").subscribe().await.unwrap();
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("delivery in time")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.body.len(), limit);
}

/// Reads until the peer closes; fails the test if it stays open past [`WAIT`].
async fn read_until_closed(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(WAIT, stream.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "the broker kept a stalled connection open");
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_http_clients_are_cut_off() {
    let broker = BrokerProcess::start(&["--http-timeout", "1s"]);
    let addr = broker.addr();
    assert_eq!(
        once(&addr, Method::PUT, "/mq/slow", &[], "").await.status,
        200
    );

    // A request head that never ends.
    let mut head = TcpStream::connect(&addr).await.unwrap();
    head.write_all(b"GET /api/stats HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    read_until_closed(&mut head).await;
    assert!(started.elapsed() >= Duration::from_millis(900));

    // A body that stops halfway gets a 408 and the connection closes.
    let mut body = TcpStream::connect(&addr).await.unwrap();
    body.write_all(b"POST /mq/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let reply = read_until_closed(&mut body).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("http-timeout"), "{reply}");

    // An idle keep-alive connection is closed after its request.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /mq/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let reply = read_until_closed(&mut idle).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // None of it got in the way of a well-behaved client.
    let stats = once(&addr, Method::GET, "/api/stats", &[], "").await;
    assert_eq!(stats.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_protocol_shares_the_port_with_http() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let mut browsers = Vec::new();
    for _ in 0..3 {
        let mut http = Http::connect(&addr).await;
        assert_eq!(http.get("/api/stats").await.status, 200);
        browsers.push(http);
    }
    assert_eq!(
        once(&addr, Method::PUT, "/mq/shared", &[], "").await.status,
        200
    );
    let poll_addr = addr.clone();
    let http_side = tokio::spawn(async move {
        once(
            &poll_addr,
            Method::POST,
            "/mq/shared/next?group=http-side&timeout=15000",
            &[],
            Bytes::new(),
        )
        .await
    });

    let client = broker.client().await;
    let receipt = client
        .producer("shared")
        .send(Message::new("from binary").with_tag("b"))
        .await
        .unwrap();
    assert_eq!(receipt.offset, 0);
    let mut consumer = client
        .consumer("shared")
        .group("binary-side")
        .subscribe()
        .await
        .unwrap();
    let delivery = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("binary delivery in time")
        .unwrap()
        .unwrap();
    assert_eq!(&delivery.body[..], b"from binary");
    delivery.ack().await.unwrap();

    let reply = tokio::time::timeout(WAIT, http_side)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (reply.text(), reply.header("tag")),
        ("from binary".into(), "b")
    );
    for http in &mut browsers {
        let stats = http.get("/api/stats").await.json();
        assert!(stats["broker"]["connections"]["binary"].as_u64() >= Some(1));
        assert!(stats["broker"]["connections"]["http"].as_u64() >= Some(3));
    }
    assert_eq!(
        client.query_mq("shared").await.unwrap().groups.len(),
        2,
        "both groups are known to the binary side"
    );
}

/// The broker's `/metrics` parsed strictly (see [`prometheus::parse`]). Returns each series
/// (`name{labels}`) with its value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    prometheus::parse(text, prometheus::ALL_KINDS)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let scrape = || async {
        let reply = once(&addr, Method::GET, "/metrics", &[], "").await;
        assert_eq!(reply.status, 200);
        assert!(reply
            .header("content-type")
            .starts_with("text/plain; version=0.0.4"));
        parse_prometheus(&reply.text())
    };
    let metric = |series: &BTreeMap<String, f64>, key: &str| -> f64 {
        *series
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {series:#?}"))
    };
    let mut http = Http::connect(&addr).await;
    let created = http
        .send(Method::PUT, "/mq/metered", &[], r#"{"max_deliveries": 2}"#)
        .await;
    assert_eq!(created.status, 200);
    let before = scrape().await;
    assert_eq!(
        metric(&before, "qbus_messages_in_total{mq=\"metered\"}"),
        0.0
    );

    for i in 0..3 {
        assert_eq!(
            http.post("/mq/metered", format!("http-{i}")).await.status,
            200
        );
    }
    let client = broker.client().await;
    client
        .producer("metered")
        .send_batch((0..2).map(|i| Message::new(format!("binary-{i}"))))
        .await
        .unwrap();

    // One acked, one nacked until it is dead-lettered (max_deliveries 2).
    let next = "/mq/metered/next?group=g";
    let first = http.post(next, "").await;
    let token = first.header("token").to_owned();
    http.post(&format!("/mq/metered/ack?group=g&token={token}"), "")
        .await;
    let second = http.post(next, "").await;
    assert_eq!(second.header("token"), "1:1");
    http.post("/mq/metered/nack?group=g&token=1:1", "").await;
    let again = http.post(next, "").await;
    assert_eq!(again.header("token"), "1:2");
    http.post("/mq/metered/nack?group=g&token=1:2", "").await;
    let after_dead = http.post(next, "").await;
    assert_eq!(after_dead.header("offset"), "2", "offset 1 went to the DLQ");

    let after = scrape().await;
    let m = |key: &str| metric(&after, key);
    assert_eq!(m("qbus_messages_in_total{mq=\"metered\"}"), 5.0);
    assert!(m("qbus_bytes_in_total{mq=\"metered\"}") >= 5.0 * 28.0);
    assert_eq!(m("qbus_messages_out_total{mq=\"metered\"}"), 4.0);
    assert!(m("qbus_bytes_out_total{mq=\"metered\"}") > 0.0);
    assert_eq!(m("qbus_messages_acked_total{mq=\"metered\"}"), 1.0);
    assert_eq!(m("qbus_mq_depth{mq=\"metered\"}"), 5.0);
    assert_eq!(
        m("qbus_redeliveries_total{mq=\"metered\",group=\"g\"}"),
        1.0
    );
    assert_eq!(
        m("qbus_dead_letters_total{mq=\"metered\",group=\"g\"}"),
        1.0
    );
    assert_eq!(m("qbus_messages_in_total{mq=\"metered.DLQ\"}"), 1.0);
    assert_eq!(m("qbus_group_in_flight{mq=\"metered\",group=\"g\"}"), 1.0);
    assert!(m("qbus_fsync_seconds_count") > metric(&before, "qbus_fsync_seconds_count"));
    assert!(m("qbus_connections{protocol=\"binary\"}") >= 1.0);
    assert!(m("qbus_connections_accepted_total{protocol=\"http\"}") >= 3.0);
    assert!(m("qbus_http_requests_total") > metric(&before, "qbus_http_requests_total"));
    let build = format!(
        "qbus_build_info{{version=\"0.1.0\",protocol=\"{}\"}}",
        qbus_wire::protocol::PROTOCOL_VERSION
    );
    assert_eq!(m(&build), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_json_and_page_describe_the_broker() {
    let broker = BrokerProcess::start(&["--fsync", "interval:50"]);
    let addr = broker.addr();
    let page = once(&addr, Method::GET, "/", &[], "").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.header("content-type"), "text/html; charset=utf-8");
    assert!(page.text().contains("/api/stats"));

    let client = broker.client().await;
    client
        .create_mq("described", MqOptions::default())
        .await
        .unwrap();
    client.producer("described").send("x").await.unwrap();
    let stats = once(&addr, Method::GET, "/api/stats", &[], "").await.json();
    let b = &stats["broker"];
    assert_eq!(b["address"], addr.as_str());
    assert_eq!(b["fsync_policy"], "interval:50");
    assert_eq!(b["store"], broker.store().display().to_string());
    assert_eq!(b["connections"]["binary"], 1);
    assert!(b["store_bytes"].as_u64() > Some(0));
    assert_eq!(stats["mqs"][0]["name"], "described");
    assert_eq!(stats["mqs"][0]["depth"], 1);
    assert_eq!(stats["mqs"][0]["traffic"]["messages_in"], 1);
}

/// The browser window for the monitor page, in pixels.
const WINDOW: (u32, u32) = (1280, 800);

/// Runs headless Chromium on `url` with `action` (`--dump-dom`) in a [`WINDOW`]; returns its
/// standard output.
async fn run_chromium(url: &str, action: &str) -> String {
    chromium::run_chromium(url, action, WINDOW).await
}

/// The table row of `mq` in a dumped DOM.
fn mq_row<'a>(dom: &'a str, mq: &str) -> &'a str {
    row(dom, &format!("<tr data-mq=\"{mq}\""))
}

/// The table row of a dumped DOM that starts with `open`.
fn row<'a>(dom: &'a str, open: &str) -> &'a str {
    let start = dom
        .find(open)
        .unwrap_or_else(|| panic!("no {open} in the page:\n{dom}"));
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// The row of pending transaction `id` in a dumped DOM.
fn txn_row(dom: &str, id: u64) -> &str {
    row(dom, &format!("<tr data-txn=\"{id}\""))
}

/// The value of the first attribute `name` in `html`.
fn attribute<'a>(html: &'a str, name: &str) -> &'a str {
    let start = html
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {html}"))
        + name.len()
        + 2;
    let len = html[start..].find('"').unwrap_or(0);
    &html[start..start + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_page_in_headless_chromium() {
    let broker = BrokerProcess::start(&[]);
    let addr = broker.addr();
    let url = format!("http://{addr}/");
    let mut http = Http::connect(&addr).await;
    assert_eq!(
        http.send(Method::PUT, "/mq/browser-orders", &[], "")
            .await
            .status,
        200
    );
    for i in 0..3 {
        http.post("/mq/browser-orders", format!("order {i}")).await;
    }
    // A pending transaction of two messages, checked every 100 ms (nobody answers) and
    // never resolved by policy during the test.
    let client = qbus_client::Broker::connect(&addr).await.unwrap();
    let tx = client
        .begin(qbus_client::TxOptions {
            group: Some("shop".into()),
            timeout_ms: Some(100),
            check_interval_ms: Some(100),
            max_checks: Some(100_000),
            ..Default::default()
        })
        .await
        .unwrap();
    tx.send("browser-orders", "debit").await.unwrap();
    tx.send("browser-orders", "credit").await.unwrap();
    until("the transaction to be checked", || async {
        (tx.info().await.ok()?.checks >= 1).then_some(())
    })
    .await;

    let dom = run_chromium(&url, "--dump-dom").await;
    let row = mq_row(&dom, "browser-orders");
    assert!(row.contains("data-depth=\"3\""), "depth 3 expected: {row}");
    assert!(dom.contains(&addr), "the page names the broker address");
    assert!(
        row.contains("data-pending-txns=\"1\""),
        "one pending transaction for the MQ: {row}"
    );
    let txn_row = txn_row(&dom, tx.id());
    let checks: u32 = attribute(txn_row, "data-checks").parse().unwrap();
    assert!(checks >= 1, "its checks are shown: {txn_row}");
    for shown in ["shop", "browser-orders × 2", "pending"] {
        assert!(txn_row.contains(shown), "{shown:?} expected: {txn_row}");
    }
    tx.commit().await.unwrap();

    // A new connection: the broker closes keep-alive connections idle for its
    // `http-timeout`, which a slow Chromium start can outlast.
    let mut http = Http::connect(&addr).await;
    for i in 3..7 {
        http.post("/mq/browser-orders", format!("order {i}")).await;
    }
    // On a connection of its own, which closes: the group is left without consumers.
    let next = "/mq/browser-orders/next?group=viewers";
    let consumed = once(&addr, Method::POST, next, &[], "").await;
    assert_eq!(consumed.status, 200);
    until("the HTTP consumer to leave", || async {
        let group = group_stats(&addr, "browser-orders", "viewers").await?;
        (group["consumers"] == 0).then_some(())
    })
    .await;
    let dom = run_chromium(&url, "--dump-dom").await;
    let row = mq_row(&dom, "browser-orders");
    assert!(
        row.contains("data-depth=\"9\""),
        "depth 9 (with the committed two) expected: {row}"
    );
    assert!(
        row.contains("data-pending-txns=\"0\""),
        "no pending transaction after the commit: {row}"
    );
    assert!(
        !dom.contains("<tr data-txn="),
        "the committed one left the table"
    );
    assert!(
        row.contains("data-group=\"viewers\""),
        "group chip expected: {row}"
    );
    assert!(
        row.contains("data-remove-group=\"viewers\""),
        "a group without consumers can be removed from the page: {row}"
    );

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("monitor.png");
    chromium::screenshot(&url, &shot, WINDOW).await;
}
