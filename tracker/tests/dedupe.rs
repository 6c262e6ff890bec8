//! Exactly-once produce through an HA handle: a producer whose broker is killed -9 under
//! it sends again everything it is not sure of, with the same dedupe ids; each message is
//! stored once.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qbus_client::{Message, MqOptions};
use support::{broker, tracker, tracker_url, wait_for_brokers};

const LIMIT: Duration = Duration::from_secs(20);

fn message(i: usize) -> Message {
    Message::new(format!("p{i}")).with_dedupe_id(format!("p{i}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_after_a_broker_kill_9_are_stored_once() {
    const KILL_AFTER: usize = 1_000;
    const REPLAYED: usize = 200;
    let t = tracker();
    let mut b = broker(&[&t]);
    let client = qbus_client::Broker::connect(&tracker_url(&[&t]))
        .await
        .unwrap();
    wait_for_brokers(&client, None, &[b.addr()], LIMIT).await;
    let options = MqOptions {
        dedupe_window_ms: Some(600_000),
        ..MqOptions::default()
    };
    client.create_mq("pay", options).await.unwrap();
    wait_for_brokers(&client, Some("pay"), &[b.addr()], LIMIT).await;
    let producer = client.producer("pay");

    // Pipelined sends; the broker dies with 64 of them in flight.
    let mut pending = VecDeque::new();
    let (mut confirmed, mut sent, mut killed) = (0usize, 0usize, false);
    let mut failed = Vec::new();
    loop {
        if !killed && pending.len() < 64 {
            let receipt = producer.send_async(message(sent)).await.unwrap();
            pending.push_back((sent, receipt.into_future()));
            sent += 1;
            continue;
        }
        if !killed && confirmed >= KILL_AFTER {
            b.kill9();
            killed = true;
        }
        let Some((i, receipt)) = pending.pop_front() else {
            break;
        };
        match receipt.await {
            Ok(_) => confirmed += 1,
            Err(_) => failed.push(i),
        }
    }
    assert!(!failed.is_empty(), "the kill left sends unconfirmed");
    b.restart();

    // Not knowing what the dead broker stored, the producer sends again everything from a
    // little before the first failure, with the same dedupe ids.
    let started = Instant::now();
    let (mut repeats, mut stored) = (0, 0);
    let from = failed[0] - REPLAYED;
    for i in from..sent {
        let receipt = loop {
            match producer.send(message(i)).await {
                Ok(receipt) => break receipt,
                Err(e) => {
                    assert!(started.elapsed() < LIMIT, "p{i} never confirmed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        if receipt.duplicate() {
            repeats += 1;
        } else {
            stored += 1;
        }
    }
    assert!(
        repeats >= sent - from - failed.len(),
        "every confirmed one is a repeat ({repeats} of {})",
        sent - from
    );
    assert!(stored <= failed.len());

    let mut consumer = client.consumer("pay").batch(256).subscribe().await.unwrap();
    let mut seen: HashMap<String, u32> = HashMap::new();
    while seen.len() < sent {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .expect("every message within the limit")
            .unwrap()
            .unwrap();
        *seen
            .entry(String::from_utf8(delivery.body.to_vec()).unwrap())
            .or_insert(0) += 1;
        delivery.ack().await.unwrap();
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    assert_eq!(client.query_mq("pay").await.unwrap().depth(), sent as u64);
}
