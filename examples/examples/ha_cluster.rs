//! High availability in one process: two trackers and three brokers on loopback, a producer
//! and a consumer connected with `tracker://...`, and broker #2 stopped and restarted while
//! messages flow. The producer never sees an error and the consumer gets every message.
//!
//! ```text
//! cargo run -p qbus-examples --example ha_cluster
//! ```
//!
//! The same cluster as processes: `qbus-tracker --port 16666`, `qbus-tracker --port 16667`,
//! and three `qbus-broker --port 1555N --store ./storeN --tracker 127.0.0.1:16666,127.0.0.1:16667`;
//! clients then use `tracker://127.0.0.1:16666,127.0.0.1:16667`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt;
use qbus_broker::Settings;
use qbus_client::{Broker, Message, MqOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One in-process broker, reporting to the trackers.
struct Node {
    port: u16,
    store: PathBuf,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Node {
    async fn start(port: u16, store: &Path, trackers: &str) -> Result<Node, Error> {
        let config = Settings {
            bind: Some("127.0.0.1".into()),
            port: Some(port),
            store: Some(store.to_owned()),
            tracker: Some(trackers.into()),
            report_interval: Some("500ms".into()),
            ..Settings::default()
        }
        .resolve()?;
        let listener = qbus_broker::bind(&config).await?;
        let port = listener.local_addr()?.port();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                if let Err(e) = qbus_broker::run(listener, config, stop).await {
                    eprintln!("broker on port {port} failed: {e}");
                }
            }
        });
        Ok(Node {
            port,
            store: store.to_owned(),
            stop,
            task,
        })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Waits until the client's topology has `n` brokers holding `mq` (or at all).
async fn until_brokers(client: &Broker, mq: Option<&str>, n: usize) -> Result<(), Error> {
    let mut watch = client.watch_topology().ok_or("not an HA handle")?;
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let count = {
                let topology = watch.borrow_and_update();
                match mq {
                    Some(mq) => topology.holders(mq).len(),
                    None => topology.len(),
                }
            };
            if count == n || watch.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .map_err(|_| format!("the topology did not reach {n} brokers"))?;
    Ok(())
}

fn lock<T>(set: &Mutex<T>) -> MutexGuard<'_, T> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn produce(client: &Broker, from: usize, to: usize) -> Result<(), Error> {
    let producer = client.producer("orders");
    for i in from..to {
        let message = Message::new(format!("order #{i}")).with_key(format!("customer-{}", i % 7));
        producer.send(message).await?;
    }
    println!("produced orders #{from}..#{}", to - 1);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let root = std::env::temp_dir().join(format!("qbus-ha-cluster-{}", std::process::id()));

    // Two trackers; they share nothing.
    let mut tracker_addrs = Vec::new();
    let trackers_stop = CancellationToken::new();
    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tracker_addrs.push(format!("127.0.0.1:{port}"));
        tokio::spawn(qbus_tracker::run(
            listener,
            qbus_tracker::Config::local(port),
            trackers_stop.clone(),
        ));
    }
    let trackers = tracker_addrs.join(",");
    println!("trackers on {trackers}");

    // Three brokers reporting to both.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let node = Node::start(0, &root.join(format!("broker-{i}")), &trackers).await?;
        println!("broker #{} on 127.0.0.1:{}", i + 1, node.port);
        nodes.push(node);
    }

    let client = Broker::connect(&format!("tracker://{trackers}")).await?;
    until_brokers(&client, None, 3).await?;
    client.create_mq("orders", MqOptions::default()).await?;
    until_brokers(&client, Some("orders"), 3).await?;
    println!("MQ orders created on all 3 brokers");

    // Orders are counted when they arrive, not when their ack is confirmed: an ack sent
    // to broker #2 as it stops is in doubt (it may have been recorded, and then the order
    // does not come again), and a redelivered order is counted once.
    let received = Arc::new(Mutex::new(HashSet::new()));
    let mut consumer = client
        .consumer("orders")
        .group("shipping")
        .subscribe()
        .await?;
    let counting = received.clone();
    let consuming = tokio::spawn(async move {
        while let Some(delivery) = consumer.next().await {
            let Ok(delivery) = delivery else { break };
            lock(&counting).insert(delivery.body.clone());
            if let Err(e) = delivery.ack().await {
                eprintln!("ack of offset {} in doubt: {e}", delivery.offset);
            }
        }
    });

    produce(&client, 0, 30).await?;

    let stopped = nodes.remove(1);
    let (port, store) = (stopped.port, stopped.store.clone());
    stopped.stop().await;
    println!("broker #2 stopped");
    until_brokers(&client, Some("orders"), 2).await?;
    println!("the trackers dropped it; its customers' orders now go to the other two");
    produce(&client, 30, 60).await?;

    nodes.insert(1, Node::start(port, &store, &trackers).await?);
    until_brokers(&client, Some("orders"), 3).await?;
    println!("broker #2 restarted on the same port and store and is back in the topology");
    produce(&client, 60, 90).await?;

    tokio::time::timeout(Duration::from_secs(20), async {
        while lock(&received).len() < 90 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| format!("only {} of 90 orders arrived", lock(&received).len()))?;
    println!("the consumer got all 90 orders; the producer saw no error");

    consuming.abort();
    drop(client);
    for node in nodes {
        node.stop().await;
    }
    trackers_stop.cancel();
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
