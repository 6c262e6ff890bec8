//! HA end to end: real `qbus-tracker` and `qbus-broker` processes on loopback, clients
//! connected with `tracker://`, brokers and trackers killed with `kill -9` while clients
//! work.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qbus_client::ha::HaOptions;
use qbus_client::{ConnectionOptions, Message, MqOptions, Producer};
use support::{
    broker, broker_reporting_every, tracker, tracker_url, wait_for, wait_for_async,
    wait_for_brokers, BrokerProcess, TrackerProcess, REPORT_INTERVAL, WARMUP,
};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(10);

async fn ha_client(trackers: &[&TrackerProcess]) -> qbus_client::Broker {
    qbus_client::Broker::connect(&tracker_url(trackers))
        .await
        .expect("connect through the trackers")
}

/// What a continuous producer saw.
struct Produced {
    /// Bodies the brokers confirmed.
    confirmed: Vec<String>,
    /// Longest time without a confirmation while sending.
    longest_gap: Duration,
    /// Slowest send-to-confirmation.
    slowest: Duration,
}

/// Sends `m<i>` with key `k<i>`, keeping `window` sends unconfirmed, until `stop` fires;
/// every send must be confirmed. `count` follows the confirmations.
async fn produce_until(
    producer: Producer,
    window: usize,
    count: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Produced {
    let mut pending = VecDeque::new();
    let mut produced = Produced {
        confirmed: Vec::new(),
        longest_gap: Duration::ZERO,
        slowest: Duration::ZERO,
    };
    let mut last = Instant::now();
    let mut i = 0u64;
    loop {
        let stopping = stop.is_cancelled();
        if !stopping && pending.len() < window {
            let body = format!("m{i}");
            let message = Message::new(body.clone()).with_key(format!("k{i}"));
            let receipt = producer.send_async(message).await.expect("queue a send");
            pending.push_back((body, Instant::now(), receipt.into_future()));
            i += 1;
            continue;
        }
        let Some((body, sent, receipt)) = pending.pop_front() else {
            return produced;
        };
        receipt
            .await
            .unwrap_or_else(|e| panic!("send of {body} failed: {e}"));
        produced.slowest = produced.slowest.max(sent.elapsed());
        produced.longest_gap = produced.longest_gap.max(last.elapsed());
        last = Instant::now();
        produced.confirmed.push(body);
        count.fetch_add(1, Ordering::Relaxed);
    }
}

async fn wait_count(count: &AtomicU64, at_least: u64) {
    wait_for(&format!("{at_least} confirmed sends"), LIMIT, || {
        (count.load(Ordering::Relaxed) >= at_least).then_some(())
    })
    .await
}

/// Reads `mq` with a fresh group until every body in `expected` arrived; returns how many
/// arrived more than once.
async fn consume_all(client: &qbus_client::Broker, mq: &str, expected: &[String]) -> usize {
    let mut consumer = client
        .consumer(mq)
        .group("audit")
        .subscribe()
        .await
        .unwrap();
    let mut missing: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut ids: HashMap<String, u128> = HashMap::new();
    let deadline = Instant::now() + LIMIT;
    while !missing.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let delivery = match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(delivery)) => delivery.unwrap(),
            _ => panic!(
                "{} confirmed messages never arrived, e.g. {:?}",
                missing.len(),
                missing.iter().next()
            ),
        };
        let body = String::from_utf8(delivery.body.to_vec()).unwrap();
        missing.remove(body.as_str());
        let id = delivery.id.expect("HA sends carry a message id");
        assert_eq!(
            *ids.entry(body.clone()).or_insert(id),
            id,
            "a resent copy of {body} keeps its message id"
        );
        *seen.entry(body).or_default() += 1;
        delivery.ack().await.unwrap();
    }
    seen.values().filter(|&&n| n > 1).map(|n| n - 1).sum()
}

/// 2 trackers, 3 brokers: a producer keeps sending (confirmed, 8 in flight) while one broker
/// is `kill -9`ed. Every send is confirmed, the gap stays short, and after the broker
/// restarts every confirmed message is consumable, duplicates at most the in-flight window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_rides_through_a_broker_kill_without_losing_messages() {
    const WINDOW: usize = 8;
    let (t1, t2) = (tracker(), tracker());
    let mut brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&t1, &t2])).collect();
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    let client = ha_client(&[&t1, &t2]).await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    client
        .create_mq("orders", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&client, Some("orders"), &addrs, LIMIT).await;

    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producing = tokio::spawn(produce_until(
        client.producer("orders"),
        WINDOW,
        count.clone(),
        stop.clone(),
    ));
    wait_count(&count, 300).await;
    brokers[1].kill9();
    let killed_at = count.load(Ordering::Relaxed);
    wait_count(&count, killed_at + 300).await;
    stop.cancel();
    let produced = producing.await.unwrap();

    brokers[1].restart();
    wait_for_brokers(&client, Some("orders"), &addrs, LIMIT).await;
    let duplicates = consume_all(&client, "orders", &produced.confirmed).await;
    eprintln!(
        "{} confirmed, longest gap {:?}, slowest send {:?}, {duplicates} duplicates",
        produced.confirmed.len(),
        produced.longest_gap,
        produced.slowest
    );
    assert!(
        duplicates <= WINDOW,
        "{duplicates} duplicates, more than the {WINDOW} in flight"
    );
    assert!(
        produced.longest_gap < Duration::from_secs(1),
        "gap {:?}",
        produced.longest_gap
    );
}

/// Both trackers killed: producers and consumers go on with the cached topology; a broker
/// killed meanwhile is avoided once it fails; restarted trackers have the topology back
/// within a report interval and the client then forgets the dead broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_topology_outlives_every_tracker() {
    let (mut t1, mut t2) = (tracker(), tracker());
    let mut brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&t1, &t2])).collect();
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    let client = ha_client(&[&t1, &t2]).await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    client
        .create_mq("jobs", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&client, Some("jobs"), &addrs, LIMIT).await;
    let mut consumer = client.consumer("jobs").subscribe().await.unwrap();

    t1.kill9();
    t2.kill9();
    wait_for("both trackers lost", LIMIT, || {
        let status = client.ha_status().unwrap();
        status.trackers.iter().all(|t| !t.connected).then_some(())
    })
    .await;
    let producer = client.producer("jobs");
    for i in 0..30 {
        producer.send(format!("before-{i}")).await.unwrap();
    }
    receive(&mut consumer, 30).await;

    brokers[2].kill9();
    let started = Instant::now();
    for i in 0..30 {
        producer.send(format!("after-{i}")).await.unwrap();
    }
    let took = started.elapsed();
    let status = client.ha_status().unwrap();
    assert_eq!(
        status.unreachable,
        [addrs[2].clone()],
        "the killed broker is avoided"
    );
    assert_eq!(
        client.topology().unwrap().len(),
        3,
        "the cache is all the client has"
    );
    assert!(took < Duration::from_secs(2), "30 sends took {took:?}");
    receive(&mut consumer, 30).await;

    t1.restart();
    t2.restart();
    let restarted = Instant::now();
    let mut live = vec![addrs[0].clone(), addrs[1].clone()];
    live.sort();
    for tracker in [&t1, &t2] {
        wait_for_async(
            "a restarted tracker to list the live brokers",
            LIMIT,
            || async {
                let mut seen = tracker.broker_addrs().await;
                seen.sort();
                (seen == live).then_some(())
            },
        )
        .await;
    }
    let back = restarted.elapsed();
    eprintln!("trackers had the topology back {back:?} after restarting");
    // One report interval, plus the broker's reconnection and this poll (with room for a
    // loaded machine).
    assert!(back < REPORT_INTERVAL * 4, "{back:?}");
    wait_for_brokers(&client, None, &live, LIMIT).await;
}

/// Receives and acks `n` distinct messages.
async fn receive(consumer: &mut qbus_client::Consumer, n: usize) {
    let mut received = HashSet::new();
    while received.len() < n {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} messages arrived", received.len()))
            .unwrap()
            .unwrap();
        delivery.ack().await.unwrap();
        received.insert(delivery.body);
    }
}

/// A broker that joins is used by running producers within 3 s, and a consumer started
/// before it joined reads its messages too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_broker_gets_traffic_within_3s() {
    let tracker = tracker();
    let first: Vec<BrokerProcess> = (0..2).map(|_| broker(&[&tracker])).collect();
    let addrs: Vec<String> = first.iter().map(BrokerProcess::addr).collect();
    let client = ha_client(&[&tracker]).await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    client
        .create_mq("events", MqOptions::default())
        .await
        .unwrap();
    let mut consumer = client.consumer("events").subscribe().await.unwrap();

    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producing = tokio::spawn(produce_until(
        client.producer("events"),
        4,
        count.clone(),
        stop.clone(),
    ));
    wait_count(&count, 50).await;

    let joined = Instant::now();
    let newcomer = broker(&[&tracker]);
    let direct = newcomer.client().await;
    direct
        .create_mq("events", MqOptions::default())
        .await
        .unwrap();
    wait_for_async(
        "the new broker to store a message",
        Duration::from_secs(3),
        || async { (direct.query_mq("events").await.unwrap().depth() > 0).then_some(()) },
    )
    .await;
    let used = joined.elapsed();
    stop.cancel();
    let produced = producing.await.unwrap();
    eprintln!("new broker stored its first message {used:?} after it started");

    let mut missing: HashSet<String> = produced.confirmed.into_iter().collect();
    while !missing.is_empty() {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} messages never arrived", missing.len()))
            .unwrap()
            .unwrap();
        missing.remove(std::str::from_utf8(&delivery.body).unwrap());
        delivery.ack().await.unwrap();
    }
}

/// A broker that reports to only one of two trackers is still used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_known_to_one_tracker_is_used() {
    let (t1, t2) = (tracker(), tracker());
    let both = broker(&[&t1, &t2]);
    let one = broker(&[&t2]);
    let client = ha_client(&[&t1, &t2]).await;
    wait_for_brokers(&client, None, &[both.addr(), one.addr()], LIMIT).await;
    assert!(!t1.broker_addrs().await.contains(&one.addr()));

    client
        .create_mq("split", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&client, Some("split"), &[both.addr(), one.addr()], LIMIT).await;
    let producer = client.producer("split");
    for i in 0..20 {
        producer.send(format!("{i}")).await.unwrap();
    }
    let depth = one.client().await.query_mq("split").await.unwrap().depth();
    assert_eq!(depth, 10, "round-robin over both brokers");
}

/// The only tracker restarts empty: clients never lose a live broker, not even while it
/// warms up, and it rebuilds its view from the brokers' next reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_empty_tracker_makes_no_client_forget_live_brokers() {
    let mut tracker = tracker();
    let brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&tracker])).collect();
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    let client = ha_client(&[&tracker]).await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;

    let mut watch = client.watch_topology().unwrap();
    let fewest = Arc::new(AtomicU64::new(u64::MAX));
    let watching = {
        let fewest = fewest.clone();
        tokio::spawn(async move {
            loop {
                let brokers = watch.borrow_and_update().len() as u64;
                fewest.fetch_min(brokers, Ordering::Relaxed);
                if watch.changed().await.is_err() {
                    return;
                }
            }
        })
    };

    tracker.restart();
    let first = tracker.query().await;
    assert!(
        !first.ready,
        "a restarted tracker says it is still warming up"
    );
    wait_for_async(
        "the tracker to be ready with 3 brokers",
        WARMUP + LIMIT,
        || async {
            let view = tracker.query().await;
            (view.ready && view.brokers.len() == 3).then_some(())
        },
    )
    .await;
    wait_for("the client to resubscribe", LIMIT, || {
        client.ha_status().unwrap().trackers[0]
            .connected
            .then_some(())
    })
    .await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    watching.abort();
    assert_eq!(
        fewest.load(Ordering::Relaxed),
        3,
        "the client forgot a live broker"
    );
}

/// No tracker answers: a clear error within the bounded wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_tracker_is_a_clear_error() {
    // Held for the whole test, so no other test's server listens there.
    let reserved = qbus_testkit::reserve_port();
    let port = reserved.get();
    let options = HaOptions::default().with_first_topology(Duration::from_millis(300));
    let started = Instant::now();
    let err = qbus_client::Broker::connect_ha(&format!("tracker://127.0.0.1:{port}"), options)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(text.contains("no tracker sent a topology"), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
}

/// `create_on(2)` puts an MQ on two of three brokers, the same two for the same name, and a
/// key sticks to one broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_on_some_brokers_and_keys_stick() {
    let tracker = tracker();
    let brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&tracker])).collect();
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    let url = tracker_url(&[&tracker]);
    let client = qbus_client::Broker::connect_ha(&url, HaOptions::default().with_create_on(2))
        .await
        .unwrap();
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    client
        .create_mq("pairs", MqOptions::default())
        .await
        .unwrap();
    let holders: Vec<String> = client
        .topology()
        .unwrap()
        .holders("pairs")
        .iter()
        .map(|c| c.addr.to_string())
        .collect();
    assert_eq!(holders.len(), 2, "{holders:?}");
    let again = qbus_client::Broker::connect_ha(&url, HaOptions::default().with_create_on(2))
        .await
        .unwrap();
    again
        .create_mq("pairs", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&again, Some("pairs"), &holders, LIMIT).await;

    let producer = client.producer("pairs");
    for i in 0..20 {
        producer
            .send(Message::new(format!("{i}")).with_key("customer-1"))
            .await
            .unwrap();
    }
    let info = client.query_mq("pairs").await.unwrap();
    assert_eq!(info.depth(), 20);
    let mut depths = Vec::new();
    for broker in brokers.iter().filter(|b| holders.contains(&b.addr())) {
        depths.push(
            broker
                .client()
                .await
                .query_mq("pairs")
                .await
                .unwrap()
                .depth(),
        );
    }
    depths.sort_unstable();
    assert_eq!(depths, [0, 20], "one key, one broker");
}

/// A running producer (`window` in flight) on 3 brokers, one of them then frozen with
/// SIGSTOP; returns what it saw, the frozen broker's address and how long until this client
/// stopped using it. The caller thaws the broker.
async fn produce_through_a_freeze(
    client: &qbus_client::Broker,
    brokers: &[BrokerProcess],
    window: usize,
) -> (Produced, String, Duration) {
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    wait_for_brokers(client, None, &addrs, LIMIT).await;
    client
        .create_mq("orders", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(client, Some("orders"), &addrs, LIMIT).await;
    let count = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let producing = tokio::spawn(produce_until(
        client.producer("orders"),
        window,
        count.clone(),
        stop.clone(),
    ));
    wait_count(&count, 300).await;
    brokers[1].freeze();
    let frozen = Instant::now();
    // Out of use: marked down by this client, or dropped from the topology.
    wait_for("the frozen broker out of use", LIMIT, || {
        let down = client.ha_status().unwrap().unreachable == [addrs[1].clone()];
        let topology = client.topology().unwrap();
        let listed = topology
            .holders("orders")
            .iter()
            .any(|c| *c.addr == addrs[1]);
        (down || !listed).then_some(())
    })
    .await;
    let marked_down = frozen.elapsed();
    let frozen_at = count.load(Ordering::Relaxed);
    wait_count(&count, frozen_at + 300).await;
    stop.cancel();
    (producing.await.unwrap(), addrs[1].clone(), marked_down)
}

/// SIGSTOP of a broker (a paused VM, a stuck process) under a `tracker://` producer. Its
/// reports come every 5 s, so its lease at the tracker outlives the test and only the
/// client's own liveness check can notice: the broker is marked down within 2 s (about
/// 1 s measured), no send waits 2 s, every confirmed message is there once it thaws, and
/// duplicates (the sends in doubt) are at most the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_broker_is_routed_around_within_2s() {
    const WINDOW: usize = 8;
    let t = tracker();
    let slow_reports = Duration::from_secs(5);
    let brokers: Vec<BrokerProcess> = (0..3)
        .map(|_| broker_reporting_every(&[&t], slow_reports))
        .collect();
    let client = ha_client(&[&t]).await;
    let (produced, frozen, marked_down) = produce_through_a_freeze(&client, &brokers, WINDOW).await;
    let holders = client.topology().unwrap().holders("orders").len();
    brokers[1].thaw();
    let duplicates = consume_all(&client, "orders", &produced.confirmed).await;
    eprintln!(
        "{} confirmed, {frozen} marked down after {marked_down:?}, longest gap {:?}, \
         slowest send {:?}, {duplicates} duplicates",
        produced.confirmed.len(),
        produced.longest_gap,
        produced.slowest
    );
    assert_eq!(holders, 3, "the tracker still listed the frozen broker");
    assert!(marked_down < Duration::from_secs(2), "{marked_down:?}");
    assert!(
        produced.slowest < Duration::from_secs(2),
        "{:?}",
        produced.slowest
    );
    assert!(duplicates <= WINDOW, "{duplicates} duplicates");
}

/// The trackers drop a frozen broker when its lease ends (reports every 200 ms) before a
/// client with a slow heartbeat (30 s) would notice its silence: the sends waiting on it
/// are sent elsewhere as soon as it leaves the topology.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_to_a_broker_the_trackers_dropped_fail_over() {
    const WINDOW: usize = 8;
    let t = tracker();
    let brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&t])).collect();
    let slow = ConnectionOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(30),
        heartbeat: Duration::from_secs(30),
        credentials: None,
    };
    let options = HaOptions::default().with_connection(slow);
    let client = qbus_client::Broker::connect_ha(&tracker_url(&[&t]), options)
        .await
        .unwrap();
    let (produced, frozen, dropped) = produce_through_a_freeze(&client, &brokers, WINDOW).await;
    let down = client.ha_status().unwrap().unreachable;
    brokers[1].thaw();
    let duplicates = consume_all(&client, "orders", &produced.confirmed).await;
    eprintln!(
        "{} confirmed, {frozen} dropped after {dropped:?}, slowest send {:?}, \
         {duplicates} duplicates",
        produced.confirmed.len(),
        produced.slowest
    );
    assert!(down.is_empty(), "not this client's silence check: {down:?}");
    assert!(
        produced.slowest < Duration::from_secs(2),
        "{:?}",
        produced.slowest
    );
    assert!(duplicates <= WINDOW, "{duplicates} duplicates");
}

/// An HA consumer holding deliveries from every broker when one is `kill -9`ed: acking
/// them all, those of the killed broker fail with a transport error (reported, not
/// fatal), the others succeed, and once the broker is back exactly the unconfirmed ones
/// are delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ha_consumer_gets_its_unconfirmed_acks_back_after_a_broker_kill() {
    const MESSAGES: usize = 60;
    let t = tracker();
    let mut brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&t])).collect();
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    let client = ha_client(&[&t]).await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    client
        .create_mq("tasks", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&client, Some("tasks"), &addrs, LIMIT).await;
    let producer = client.producer("tasks");
    for i in 0..MESSAGES {
        // Keys spread the messages over the three brokers.
        let message = Message::new(format!("t{i}")).with_key(format!("k{i}"));
        producer.send(message).await.unwrap();
    }
    let mut consumer = client.consumer("tasks").subscribe().await.unwrap();
    let mut held = Vec::new();
    while held.len() < MESSAGES {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {MESSAGES} messages arrived", held.len()))
            .unwrap()
            .unwrap();
        held.push(delivery);
    }

    brokers[1].kill9();
    let mut unconfirmed = HashSet::new();
    for delivery in &held {
        if let Err(e) = delivery.ack().await {
            assert!(e.is_transport(), "not a lost connection: {e}");
            unconfirmed.insert(delivery.body.clone());
        }
    }
    let lost = unconfirmed.len();
    assert!(0 < lost && lost < MESSAGES, "{lost} acks not confirmed");

    brokers[1].restart();
    let mut again = HashSet::new();
    while again.len() < lost {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {lost} unconfirmed came back", again.len()))
            .unwrap()
            .unwrap();
        delivery.ack().await.unwrap();
        again.insert(delivery.body);
    }
    eprintln!("{lost} of {MESSAGES} acks lost with the broker, all delivered again");
    assert_eq!(again, unconfirmed, "exactly the unconfirmed ones come back");
}

/// `qbus consume --count` through `tracker://` while a broker is killed and restarted: it
/// exits 0 with every message printed once. Its stdout is not read until after the kill,
/// so it stalls, usually holding deliveries of the killed broker; their acks are then lost
/// (reported on stderr, not fatal) and what the restarted broker delivers again is not
/// printed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qbus_consume_through_trackers_survives_a_broker_kill() {
    const MESSAGES: usize = 2000;
    let t = tracker();
    let mut brokers: Vec<BrokerProcess> = (0..3).map(|_| broker(&[&t])).collect();
    let addrs: Vec<String> = brokers.iter().map(BrokerProcess::addr).collect();
    let client = ha_client(&[&t]).await;
    wait_for_brokers(&client, None, &addrs, LIMIT).await;
    client
        .create_mq("logs", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&client, Some("logs"), &addrs, LIMIT).await;
    let producer = client.producer("logs");
    // 2000 lines of 300 bytes: far more than a pipe holds, so the consumer stalls early.
    let bodies: Vec<String> = (0..MESSAGES).map(|i| format!("{i:0>300}")).collect();
    for chunk in bodies.chunks(100) {
        let batch = chunk.iter().map(|b| Message::new(b.clone()));
        producer.send_batch(batch).await.unwrap();
    }

    let qbus = qbus_testkit::process::built_binary("qbus-cli", "qbus");
    let mut child = std::process::Command::new(qbus)
        .args(["--broker", &tracker_url(&[&t]), "consume", "logs"])
        .args(["--count", &MESSAGES.to_string(), "--timeout", "20"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let first = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).map(|_| (line, stdout))
    });
    let (first, stdout) = tokio::time::timeout(LIMIT, first)
        .await
        .expect("a first line within 10 s")
        .unwrap()
        .unwrap();
    brokers[1].restart();
    let rest = tokio::task::spawn_blocking(move || {
        let lines: Vec<String> = std::io::BufRead::lines(stdout)
            .collect::<Result<_, _>>()
            .unwrap();
        let output = child.wait_with_output().unwrap();
        (lines, output)
    });
    let (mut lines, output) = tokio::time::timeout(Duration::from_secs(40), rest)
        .await
        .expect("qbus consume to end within 40 s")
        .unwrap();
    lines.push(first.trim_end().to_owned());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let printed: HashSet<&str> = lines.iter().map(String::as_str).collect();
    let missing = bodies
        .iter()
        .filter(|b| !printed.contains(b.as_str()))
        .count();
    eprintln!(
        "{} lines, {} distinct, {missing} missing; stderr:\n{stderr}",
        lines.len(),
        printed.len()
    );
    assert!(output.status.success(), "qbus consume failed: {stderr}");
    assert_eq!(missing, 0, "messages never printed");
    assert_eq!(lines.len(), MESSAGES, "a redelivery is not printed twice");
}
