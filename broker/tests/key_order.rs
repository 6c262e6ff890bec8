//! Key-ordered groups against the real `qbus-broker` binary: four consumers of one group
//! with random ack delays, one of them going away mid-run, and every key's messages still
//! handled one at a time, in order.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qbus_client::{Message, MqOptions};
use support::BrokerProcess;

const KEYS: usize = 16;
const PER_KEY: usize = 40;

/// What a consumer saw: (key, seq, consumer, received, ack sent).
type Seen = Arc<Mutex<Vec<(usize, usize, usize, Instant, Instant)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_messages_go_one_at_a_time_in_order_across_consumers() {
    let broker = BrokerProcess::start(&[]);
    let admin = broker.client().await;
    let options = MqOptions {
        ordered_by_key: Some(true),
        ..MqOptions::default()
    };
    admin.create_mq("orders", options).await.unwrap();
    let producer = admin.producer("orders");
    let mut pending = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            let message = Message::new(format!("{key}:{seq}")).with_key(format!("k{key}"));
            pending.push(producer.send_async(message).await.unwrap());
        }
    }
    producer.send(Message::new("no key")).await.unwrap();
    for receipt in pending {
        receipt.await.unwrap();
    }

    let seen: Seen = Arc::default();
    let acked_total = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for id in 0..4usize {
        let (seen, acked_total, addr) = (seen.clone(), acked_total.clone(), broker.addr());
        tasks.push(tokio::spawn(async move {
            let client = qbus_client::Broker::connect(&addr).await.unwrap();
            let mut consumer = client
                .consumer("orders")
                .group("workers")
                .batch(8)
                .subscribe()
                .await
                .unwrap();
            let mut rng = 0x9e37_79b9_u64.wrapping_mul(id as u64 + 1);
            let mut handled = 0;
            loop {
                let Ok(Some(delivery)) =
                    tokio::time::timeout(Duration::from_millis(1500), consumer.next()).await
                else {
                    return handled;
                };
                let delivery = delivery.unwrap();
                let received = Instant::now();
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                tokio::time::sleep(Duration::from_micros(rng % 3_000)).await;
                if id == 0 && handled == 40 {
                    // Goes away holding this one unacknowledged (and more fetched).
                    drop(consumer);
                    drop(client);
                    return handled;
                }
                let text = String::from_utf8_lossy(&delivery.body).into_owned();
                if let Some((key, seq)) = text.split_once(':') {
                    let (key, seq) = (key.parse().unwrap(), seq.parse().unwrap());
                    let ack_sent = Instant::now();
                    delivery.ack().await.unwrap();
                    seen.lock()
                        .unwrap()
                        .push((key, seq, id, received, ack_sent));
                } else {
                    delivery.ack().await.unwrap();
                }
                handled += 1;
                acked_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    let mut handled = Vec::new();
    for task in tasks {
        handled.push(task.await.unwrap());
    }
    assert_eq!(
        acked_total.load(std::sync::atomic::Ordering::Relaxed),
        KEYS * PER_KEY + 1,
        "every message acked once ({handled:?})"
    );
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut by_key: BTreeMap<usize, Vec<(usize, usize, Instant, Instant)>> = BTreeMap::new();
    for &(key, seq, id, received, ack_sent) in seen.iter() {
        by_key
            .entry(key)
            .or_default()
            .push((seq, id, received, ack_sent));
    }
    let mut consumers_of_keys = HashSet::new();
    for (key, mut handled) in by_key {
        handled.sort_by_key(|&(seq, ..)| seq);
        let seqs: Vec<usize> = handled.iter().map(|&(seq, ..)| seq).collect();
        assert_eq!(
            seqs,
            (0..PER_KEY).collect::<Vec<_>>(),
            "key {key}: each once"
        );
        for pair in handled.windows(2) {
            let ((a, _, _, a_acked), (b, _, b_received, _)) = (pair[0], pair[1]);
            assert!(
                b_received >= a_acked,
                "key {key}: {b} was handed out before {a} was acknowledged"
            );
        }
        consumers_of_keys.extend(handled.iter().map(|&(_, id, ..)| (key, id)));
    }
    for id in 1..4 {
        let keys = consumers_of_keys.iter().filter(|&&(_, c)| c == id).count();
        assert!(keys > 1, "consumer {id} handled {keys} keys: keys spread");
    }
    let info = admin.query_mq("orders").await.unwrap();
    assert_eq!(info.groups[0].lag, 0);
}
