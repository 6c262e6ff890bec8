//! Exactly-once produce by dedupe id, against the real `qbus-broker` binary: repeats within
//! the window are answered with the first offset and stored nowhere, also after `kill -9`,
//! and are stored again once the window has passed.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qbus_client::{Broker, Message, MqOptions, Receipt};
use support::BrokerProcess;

fn with_id(body: &str, id: &str) -> Message {
    Message::new(body.to_owned()).with_dedupe_id(id)
}

async fn create(client: &Broker, mq: &str, window_ms: u64) {
    let options = MqOptions {
        dedupe_window_ms: Some(window_ms),
        ..MqOptions::default()
    };
    client.create_mq(mq, options).await.unwrap();
}

/// Every body of `mq`, read by a new group, with how often each came.
async fn bodies(client: &Broker, mq: &str, group: &str, expect: usize) -> HashMap<String, u32> {
    let mut consumer = client
        .consumer(mq)
        .group(group)
        .batch(100)
        .subscribe()
        .await
        .unwrap();
    let mut seen = HashMap::new();
    for _ in 0..expect {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        *seen
            .entry(String::from_utf8(delivery.body.to_vec()).unwrap())
            .or_insert(0) += 1;
        delivery.ack().await.unwrap();
    }
    seen
}

fn assert_duplicate(receipt: &Receipt, offsets: &[u64]) {
    assert!(receipt.duplicate(), "{receipt:?} should be a duplicate");
    assert_eq!(receipt.offsets, offsets);
    assert_eq!(receipt.offset, offsets[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_dedupe_id_stores_nothing_and_returns_the_first_offset_also_after_kill_9() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    create(&client, "orders", 600_000).await;
    let producer = client.producer("orders");
    for (i, id) in ["d1", "d2", "d3"].into_iter().enumerate() {
        let receipt = producer
            .send(with_id(&format!("order {id}"), id))
            .await
            .unwrap();
        assert_eq!(
            (receipt.offset, receipt.count, receipt.duplicate()),
            (i as u64, 1, false)
        );
    }
    let plain = producer.send("no id").await.unwrap();
    assert_eq!((plain.offset, plain.duplicate()), (3, false));

    // A repeat: the first one's offset, nothing stored.
    let again = producer.send(with_id("order d2", "d2")).await.unwrap();
    assert_duplicate(&again, &[1]);
    assert_eq!(again.count, 0);
    // A batch of repeats and a new one: only the new one is stored.
    let batch = vec![
        with_id("order d3", "d3"),
        with_id("order d4", "d4"),
        with_id("order d1", "d1"),
    ];
    let mixed = producer.send_batch(batch).await.unwrap();
    assert_duplicate(&mixed, &[2, 4, 0]);
    assert_eq!(mixed.count, 1);
    // Sends of one id racing each other on several connections: one is stored, every one
    // of them is told the same offset.
    let racers: Vec<Broker> = futures_util::future::join_all((0..4).map(|_| broker.client())).await;
    let sends = racers.iter().flat_map(|racer| {
        (0..8).map(move |_| async move {
            racer
                .producer("orders")
                .send(with_id("order race", "race"))
                .await
                .unwrap()
        })
    });
    let receipts = futures_util::future::join_all(sends).await;
    let stored: Vec<&Receipt> = receipts.iter().filter(|r| !r.duplicate()).collect();
    assert_eq!(stored.len(), 1, "exactly one send stored it: {receipts:?}");
    let offset = stored[0].offset;
    assert!(receipts.iter().all(|r| r.offset == offset), "{receipts:?}");
    assert_eq!(client.query_mq("orders").await.unwrap().depth(), 6);
    drop((producer, client, racers));

    // The window survives a kill -9: the table comes back from the log.
    broker.restart();
    let client = broker.client().await;
    let producer = client.producer("orders");
    assert_duplicate(
        &producer.send(with_id("order d2", "d2")).await.unwrap(),
        &[1],
    );
    assert_duplicate(
        &producer.send(with_id("order race", "race")).await.unwrap(),
        &[offset],
    );
    let fresh = producer.send(with_id("order d5", "d5")).await.unwrap();
    assert_eq!((fresh.offset, fresh.duplicate()), (6, false));

    let seen = bodies(&client, "orders", "readers", 7).await;
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(seen.values().all(|&n| n == 1), "each stored once: {seen:?}");
    let info = client.query_mq("orders").await.unwrap();
    assert_eq!(info.depth(), 7);

    // Counted where a user looks.
    let mut http = qbus_testkit::http::Http::connect(&broker.addr()).await;
    let metrics = http.get("/metrics").await.text();
    assert!(
        metrics.contains("qbus_messages_duplicate_total{mq=\"orders\"} 2"),
        "two repeats since the restart:\n{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedupe_id_is_stored_again_once_the_window_has_passed_also_after_a_restart() {
    const WINDOW: Duration = Duration::from_millis(400);
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    create(&client, "short", WINDOW.as_millis() as u64).await;
    let producer = client.producer("short");
    let first = producer.send(with_id("one", "x")).await.unwrap();
    let stored_at = Instant::now();
    assert_eq!((first.offset, first.duplicate()), (0, false));
    assert_duplicate(&producer.send(with_id("one", "x")).await.unwrap(), &[0]);

    // Resend until it is stored again; that must not happen before the window passed.
    let stored_again = loop {
        let receipt = producer.send(with_id("one", "x")).await.unwrap();
        if !receipt.duplicate() {
            break receipt;
        }
        assert!(
            stored_at.elapsed() < Duration::from_secs(10),
            "never stored again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        stored_at.elapsed() >= WINDOW,
        "stored again within the window"
    );
    assert_eq!(stored_again.offset, 1);
    drop((producer, client));

    // After a restart, an id whose window passed before it is not brought back...
    broker.restart();
    let client = broker.client().await;
    let producer = client.producer("short");
    tokio::time::sleep(WINDOW).await;
    let after = producer.send(with_id("one", "x")).await.unwrap();
    assert_eq!((after.offset, after.duplicate()), (2, false));
    // ...and one within it is.
    assert_duplicate(&producer.send(with_id("one", "x")).await.unwrap(), &[2]);

    // A window of 0 turns deduplication off.
    create(&client, "off", 0).await;
    let off = client.producer("off");
    for offset in 0..2 {
        let receipt = off.send(with_id("same", "same")).await.unwrap();
        assert_eq!((receipt.offset, receipt.duplicate()), (offset, false));
    }
}

/// Fetches from `mq` as a peer of protocol `protocol` on a raw connection; returns the
/// records' bytes.
fn fetch_as(broker: &BrokerProcess, protocol: u32, mq: &str) -> Vec<u8> {
    use qbus_client::protocol::{decode, encode, Command, Frame, Header, ServerInfo};
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(broker.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let info = ServerInfo {
        protocol,
        ..ServerInfo::default()
    };
    let mut hello = Header::request(Command::Hello, None);
    hello.id = 1;
    let mut fetch = Header::request(Command::Fetch, Some(mq));
    (fetch.id, fetch.count, fetch.group) = (2, Some(10), Some(format!("v{protocol}")));
    let mut buf = bytes::BytesMut::new();
    let hello_body = rmp_serde::to_vec_named(&info).unwrap();
    encode(&Frame::with_body(hello, hello_body.into()), &mut buf).unwrap();
    encode(&Frame::new(fetch), &mut buf).unwrap();
    stream.write_all(&buf).unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "the broker closed the connection");
        got.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Ok((frame, used)) = decode(&got[at..], 1 << 20) {
            at += used;
            if frame.header.id == 2 {
                assert_eq!(frame.header.status, 200, "{:?}", frame.header.error);
                return frame.body.to_vec();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dedupe_ids_over_http_and_to_older_consumers() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    create(&client, "web", 600_000).await;
    let mut http = qbus_testkit::http::Http::connect(&broker.addr()).await;
    let first = http.post("/mq/web?dedupe-id=pay-1", "debit").await.json();
    assert_eq!(first["offset"], 0);
    assert!(first.get("duplicate").is_none(), "{first}");
    let again = http.post("/mq/web?dedupe-id=pay-1", "debit").await.json();
    assert_eq!(
        (again["offset"].as_u64(), again["duplicate"].as_bool()),
        (Some(0), Some(true))
    );
    assert_eq!(again["count"], 0);
    let next = http.post("/mq/web/next?group=g", "").await;
    assert_eq!(next.header("dedupe-id"), "pay-1");
    assert_eq!(client.query_mq("web").await.unwrap().depth(), 1);

    // A consumer older than protocol 3 refuses a record flag it does not know: it gets the
    // record without its dedupe id; a version 3 one gets it whole.
    use qbus_client::protocol::record::{parse_record, RECORD_FLAG_DEDUPE};
    for (protocol, has_id) in [(1, false), (2, false), (3, true)] {
        let body = fetch_as(&broker, protocol, "web");
        let record = parse_record(&body).unwrap();
        assert_eq!((record.body, record.offset), (&b"debit"[..], 0));
        assert_eq!(record.dedupe_id.is_some(), has_id, "protocol {protocol}");
        assert_eq!(
            body[24] & RECORD_FLAG_DEDUPE != 0,
            has_id,
            "protocol {protocol}"
        );
    }
}

/// A delayed message with a dedupe id: repeats before and after it came due (and after a
/// `kill -9`) are answered with the original's offset; the broker's due copy, which keeps
/// the id, is no repeat of it and is delivered once, at its time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_with_a_dedupe_id_is_delivered_once_at_its_time() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    create(&client, "later", 600_000).await;
    let producer = client.producer("later");
    let due = qbus_wire::now_ms() + 1_500;
    let delayed = || with_id("remind", "r-1").with_deliver_at(due);
    let first = producer.send(delayed()).await.unwrap();
    assert_eq!((first.offset, first.duplicate()), (0, false));
    assert_duplicate(&producer.send(delayed()).await.unwrap(), &[0]);

    let mut readers = client
        .consumer("later")
        .group("g")
        .subscribe()
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), readers.next())
        .await
        .expect("delivered within 10 s")
        .unwrap()
        .unwrap();
    let got_at = qbus_wire::now_ms();
    assert!(got_at >= due, "delivered {} ms early", due - got_at);
    assert_eq!(
        (&delivery.body[..], delivery.delayed_from),
        (&b"remind"[..], Some(0))
    );
    delivery.ack().await.unwrap();
    // The copy keeps the id for its consumers.
    let mut http = qbus_testkit::http::Http::connect(&broker.addr()).await;
    let copy = http.post("/mq/later/next?group=web", "").await;
    assert_eq!(
        (copy.header("dedupe-id"), copy.header("delayed-from")),
        ("r-1", "0")
    );
    // After it came due, and after a restart that rebuilds the table from the log (where
    // the copy carries the id too), a repeat is still the original's.
    assert_duplicate(&producer.send(delayed()).await.unwrap(), &[0]);
    drop((producer, readers, client, http));
    broker.restart();
    let client = broker.client().await;
    let producer = client.producer("later");
    assert_duplicate(&producer.send(delayed()).await.unwrap(), &[0]);
    let mut readers = client
        .consumer("later")
        .group("g")
        .subscribe()
        .await
        .unwrap();
    let again = tokio::time::timeout(Duration::from_millis(1_000), readers.next()).await;
    assert!(again.is_err(), "delivered once: {again:?}");
    assert_eq!(client.query_mq("later").await.unwrap().depth(), 2);
}
