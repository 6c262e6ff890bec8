//! Delayed delivery and TTL against the real `qbus-broker` binary: delayed messages stay
//! invisible until due across `kill -9`, come at once when due while the broker was down,
//! expired ones are dropped or dead-lettered, and protocol 2 clients get plain records.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qbus_client::{Consumer, Delivery, Message, MqOptions};
use qbus_wire::now_ms;
use support::BrokerProcess;

/// The next delivery within `limit`, or `None`.
async fn next_within(consumer: &mut Consumer, limit: Duration) -> Option<Delivery> {
    match tokio::time::timeout(limit, consumer.next()).await {
        Ok(Some(delivery)) => Some(delivery.unwrap()),
        Ok(None) => panic!("consumer ended"),
        Err(_) => None,
    }
}

async fn consumer(broker: &qbus_client::Broker, mq: &str, group: &str) -> Consumer {
    broker.consumer(mq).group(group).subscribe().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_invisible_until_due_across_kill_9() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("later", MqOptions::default())
        .await
        .unwrap();
    let producer = client.producer("later");
    let due = now_ms() + 2_000;
    let receipt = producer
        .send(Message::new("delayed").with_deliver_at(due))
        .await
        .unwrap();
    assert_eq!(receipt.durability, qbus_client::Durability::Synced);
    producer.send("plain").await.unwrap();

    let mut readers = consumer(&client, "later", "readers").await;
    let plain = next_within(&mut readers, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&plain.body[..], b"plain", "later records are not held up");
    plain.ack().await.unwrap();
    qbus_testkit::wait_for_async("the timer to note it", Duration::from_secs(5), || async {
        (client.query_mq("later").await.unwrap().delayed == 1).then_some(())
    })
    .await;
    // Nothing before its time (less a margin for this machine's scheduling).
    let early = next_within(&mut readers, Duration::from_millis(500)).await;
    assert!(early.is_none(), "delivered early: {early:?}");
    drop((readers, producer, client));

    broker.restart(); // kill -9 with the message pending, then start again
    let client = broker.client().await;
    let mut readers = consumer(&client, "later", "readers").await;
    let mut fresh = consumer(&client, "later", "created-after").await;
    let wait = Duration::from_millis(due.saturating_sub(now_ms()) + 5_000);
    let delayed = next_within(&mut readers, wait).await.expect("delivered");
    let got_at = now_ms();
    assert_eq!(&delayed.body[..], b"delayed");
    assert!(got_at >= due, "delivered {} ms early", due - got_at);
    assert!(got_at < due + 1_500, "delivered {} ms late", got_at - due);
    assert_eq!(delayed.attempt, 1, "a delayed message is no redelivery");
    assert_eq!(delayed.delayed_from, Some(receipt.offset));
    delayed.ack().await.unwrap();
    // A group created after the message was sent sees it too, as every group does.
    let bodies: Vec<_> = [
        next_within(&mut fresh, Duration::from_secs(5))
            .await
            .unwrap(),
        next_within(&mut fresh, Duration::from_secs(5))
            .await
            .unwrap(),
    ]
    .iter()
    .map(|d| String::from_utf8_lossy(&d.body).into_owned())
    .collect();
    assert_eq!(bodies, ["plain", "delayed"]);
    assert!(
        next_within(&mut readers, Duration::from_millis(300))
            .await
            .is_none(),
        "once"
    );
    qbus_testkit::wait_for_async("nothing pending", Duration::from_secs(5), || async {
        (client.query_mq("later").await.unwrap().delayed == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_due_while_the_broker_was_down_come_at_once_and_once() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("backlog", MqOptions::default())
        .await
        .unwrap();
    let producer = client.producer("backlog");
    let due = now_ms() + 500;
    for i in 0..50 {
        producer
            .send(Message::new(format!("m{i}")).with_deliver_at(due + i))
            .await
            .unwrap();
    }
    drop((producer, client));
    broker.kill9();
    tokio::time::sleep(Duration::from_millis(due.saturating_sub(now_ms()) + 300)).await;
    let restarted = Instant::now();
    broker.restart();
    let client = broker.client().await;
    let mut readers = consumer(&client, "backlog", "readers").await;
    let mut seen = HashMap::new();
    while seen.len() < 50 {
        let d = next_within(&mut readers, Duration::from_secs(5))
            .await
            .expect("all 50");
        *seen.entry(d.body.clone()).or_insert(0) += 1;
        d.ack().await.unwrap();
    }
    assert!(
        restarted.elapsed() < Duration::from_secs(5),
        "took {:?} after the restart",
        restarted.elapsed()
    );
    assert!(next_within(&mut readers, Duration::from_millis(500))
        .await
        .is_none());
    assert!(seen.values().all(|&n| n == 1), "each once: {seen:?}");

    // And after one more crash nothing comes twice: the timer learned what it fired.
    drop((readers, client));
    broker.restart();
    let client = broker.client().await;
    let info = client.query_mq("backlog").await.unwrap();
    assert_eq!(
        (info.next_offset, info.delayed),
        (100, 0),
        "50 stored, 50 copies"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dropped_or_dead_lettered() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    let short = MqOptions {
        ttl_ms: Some(300),
        ..MqOptions::default()
    };
    client.create_mq("fleeting", short).await.unwrap();
    let to_dlq = MqOptions {
        expired_to_dead_letter: Some(true),
        ..MqOptions::default()
    };
    client.create_mq("kept", to_dlq).await.unwrap();

    client.producer("fleeting").send("stale").await.unwrap();
    let kept = client.producer("kept");
    kept.send(Message::new("stale").with_ttl(Duration::from_millis(300)))
        .await
        .unwrap();
    kept.send(Message::new("fresh").with_ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.producer("fleeting").send("fresh").await.unwrap();

    for mq in ["fleeting", "kept"] {
        let mut readers = consumer(&client, mq, "readers").await;
        let d = next_within(&mut readers, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            &d.body[..],
            b"fresh",
            "{mq}: the expired one is never delivered"
        );
        d.ack().await.unwrap();
        assert!(next_within(&mut readers, Duration::from_millis(300))
            .await
            .is_none());
        assert_eq!(client.query_mq(mq).await.unwrap().expired, 1, "{mq}");
    }
    let mut dead = consumer(&client, "kept.DLQ", "readers").await;
    let d = next_within(&mut dead, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&d.body[..], b"stale");
    assert_eq!(
        d.expires_at, None,
        "it does not expire again in the dead-letter MQ"
    );
    assert!(
        client.query_mq("fleeting.DLQ").await.is_err(),
        "dropped, not moved"
    );

    let mut http = qbus_testkit::http::Http::connect(&broker.addr()).await;
    let metrics = http.get("/metrics").await.text();
    assert!(
        metrics.contains("qbus_messages_expired_total{mq=\"kept\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_redelivery_is_not_delivered_again() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("retry", MqOptions::default())
        .await
        .unwrap();
    client
        .producer("retry")
        .send(Message::new("short-lived").with_ttl(Duration::from_millis(700)))
        .await
        .unwrap();
    let mut readers = consumer(&client, "retry", "readers").await;
    let first = next_within(&mut readers, Duration::from_secs(5))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    first.nack().await.unwrap();
    assert!(next_within(&mut readers, Duration::from_millis(500))
        .await
        .is_none());
    assert_eq!(client.query_mq("retry").await.unwrap().expired, 1);
    let info = client.query_mq("retry").await.unwrap();
    assert_eq!(info.groups[0].committed, 1, "settled, nothing waits for it");
}

/// A protocol 2 client never gets the protocol 3 record fields it would refuse: the
/// broker sends it those records without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_2_clients_get_records_without_the_new_fields() {
    use qbus_wire::protocol::record::{records, RECORD_FLAGS_V3};
    use qbus_wire::protocol::{Command, Frame, Header, ServerInfo};

    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("mixed", MqOptions::default())
        .await
        .unwrap();
    let producer = client.producer("mixed");
    producer
        .send(Message::new("soon").with_delay(Duration::from_millis(200)))
        .await
        .unwrap();
    producer
        .send(Message::new("expiring").with_ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    let stream = tokio::net::TcpStream::connect(broker.addr()).await.unwrap();
    let mut link = qbus_wire::link::tcp_link(stream, 1 << 24);
    let hello = rmp_serde::to_vec_named(&ServerInfo {
        protocol: 2,
        version: "a version 2 client".into(),
        max_frame: 0,
        credentials: None,
        identity: None,
    })
    .unwrap();
    link.tx
        .send(Frame::with_body(
            Header::request(Command::Hello, None),
            hello.into(),
        ))
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for id in 1..20 {
        let reply = tokio::time::timeout(Duration::from_secs(10), link.rx.next())
            .await
            .expect("a reply in time")
            .expect("the connection stays open")
            .unwrap();
        assert_eq!(reply.header.status, 200, "{:?}", reply.header);
        let mut at = 0;
        let body = if reply.header.cmd == Command::Fetch {
            reply.body.clone()
        } else {
            Default::default()
        };
        for record in records(&body) {
            let record = record.unwrap();
            assert_eq!(reply.body[at + 24] & RECORD_FLAGS_V3, 0, "no new flag bits");
            assert_eq!((record.deliver_at, record.expires_at), (None, None));
            bodies.push(String::from_utf8_lossy(record.body).into_owned());
            at += record.size;
        }
        if bodies.len() >= 2 {
            break;
        }
        let mut fetch = Header::request(Command::Fetch, Some("mixed"));
        fetch.id = id;
        fetch.count = Some(10);
        fetch.timeout_ms = Some(1000);
        link.tx.send(Frame::new(fetch)).await.unwrap();
    }
    assert_eq!(bodies, ["expiring", "soon"]);
    // A follower's pull hands out records byte for byte, new fields and all: refused to a
    // connection that said protocol 2.
    let mut pull = Header::request(Command::ReplicaRead, Some("mixed"));
    pull.id = 100;
    pull.group = Some("a-follower".into());
    pull.offset = Some(0);
    link.tx.send(Frame::new(pull)).await.unwrap();
    let refused = support::reply_to(&mut link, 100).await.header;
    support::assert_needs_protocol(&refused, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_produce_takes_delay_and_ttl() {
    use hyper::Method;
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client.create_mq("web", MqOptions::default()).await.unwrap();
    let mut http = qbus_testkit::http::Http::connect(&broker.addr()).await;
    let sent = Instant::now();
    let headers = [("delay", "700ms"), ("ttl", "10m")];
    let receipt = http.send(Method::POST, "/mq/web", &headers, "later").await;
    assert_eq!(receipt.status, 200, "{}", receipt.text());
    let bad = http
        .send(Method::POST, "/mq/web", &[("delay", "soon")], "x")
        .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let early = http
        .send(Method::POST, "/mq/web/next?timeout=300", &[], "")
        .await;
    assert_eq!(early.status, 204, "not before its time");
    let got = http
        .send(Method::POST, "/mq/web/next?timeout=5000", &[], "")
        .await;
    assert_eq!((got.status.as_u16(), got.text()), (200, "later".into()));
    assert!(sent.elapsed() >= Duration::from_millis(700));
    assert_eq!(got.header("delayed-from"), "0");
    assert!(!got.header("expires-at").is_empty());
}
