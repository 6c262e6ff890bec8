//! Client behaviour that a broker must show whether it runs as a process or embedded. Each
//! scenario takes a factory that opens a new, independent client connection.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::StreamExt;
use qbus_client::{Broker, Consumer, Delivery, Message, MqOptions, StartAt, Status};
use qbus_testkit::wait_for_async;

pub type Connect = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Broker> + Send>> + Send + Sync>;

/// One test per named scenario, each against a new broker from `fixture`: an async fn of the
/// test file returning what keeps the broker running and the [`Connect`] to it.
#[allow(unused_macros)] // not every test file runs the scenarios
macro_rules! scenario_tests {
    ($fixture:ident: $($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_broker, connect) = $fixture().await;
            $crate::support::scenarios::$name(&connect).await;
        }
    )*};
}
pub(crate) use scenario_tests;

const WAIT: Duration = Duration::from_secs(20);

/// The consumer's next delivery, failing the test after [`WAIT`].
pub async fn next(consumer: &mut qbus_client::Consumer) -> Delivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("no delivery in time")
        .expect("consumer ended")
        .expect("consumer error")
}

async fn produce_numbers(broker: &Broker, mq: &str, n: u32) {
    let producer = broker.producer(mq);
    let mut pending = Vec::new();
    for i in 0..n {
        pending.push(producer.send_async(format!("{i}")).await.expect("queue"));
    }
    for (i, receipt) in pending.into_iter().enumerate() {
        assert_eq!(receipt.await.expect("confirmed").offset, i as u64);
    }
}

/// A consumer of `group` on `mq` fetching up to `batch` messages at a time.
async fn group_consumer(broker: &Broker, mq: &str, group: &str, batch: u32) -> Consumer {
    let builder = broker.consumer(mq).group(group).batch(batch);
    builder.subscribe().await.expect("subscribe")
}

/// Produce, consume, ack: order, tags, keys, receipts and MQ info all line up.
pub async fn round_trip(connect: &Connect) {
    let broker = connect().await;
    broker.create_mq("rt", MqOptions::default()).await.unwrap();
    let receipt = broker
        .producer("rt")
        .send(Message::new("first").with_tag("a").with_key("k1"))
        .await
        .unwrap();
    assert_eq!(receipt.offset, 0);
    let batch = broker
        .producer("rt")
        .send_batch((1..=3).map(|i| Message::new(format!("b{i}")).with_tag("b")))
        .await
        .unwrap();
    assert_eq!((batch.offset, batch.count), (1, 3));
    let mut consumer = broker.consumer("rt").subscribe().await.unwrap();
    let first = next(&mut consumer).await;
    assert_eq!(
        (&first.body[..], first.tag.as_deref(), first.key.as_deref()),
        (&b"first"[..], Some("a"), Some("k1"))
    );
    first.ack().await.unwrap();
    for i in 1..=3 {
        let d = next(&mut consumer).await;
        assert_eq!((d.offset, d.body.clone()), (i, format!("b{i}").into()));
        d.ack().await.unwrap();
    }
    let info = broker.query_mq("rt").await.unwrap();
    assert_eq!(info.depth(), 4);
    assert_eq!(info.groups[0].committed, 4);
    assert_eq!(info.groups[0].lag, 0);

    let mut tagged = broker
        .consumer("rt")
        .group("only-b")
        .tag("b")
        .subscribe()
        .await
        .unwrap();
    let d = next(&mut tagged).await;
    assert_eq!(d.offset, 1, "tag filter skips offset 0");

    let missing = broker.producer("nope").send("x").await.unwrap_err();
    assert_eq!(missing.status(), Some(Status::NotFound));
    let names: Vec<_> = broker
        .list_mqs()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, vec!["rt"]);
    broker.remove_mq("rt").await.unwrap();
    assert_eq!(
        broker.query_mq("rt").await.unwrap_err().status(),
        Some(Status::NotFound)
    );
}

/// Every group sees every message.
pub async fn two_groups_each_get_everything(connect: &Connect) {
    let broker = connect().await;
    broker
        .create_mq("fanout", MqOptions::default())
        .await
        .unwrap();
    produce_numbers(&broker, "fanout", 500).await;
    for group in ["g1", "g2"] {
        let mut consumer = group_consumer(&broker, "fanout", group, 64).await;
        for i in 0..500u64 {
            let d = next(&mut consumer).await;
            assert_eq!(d.offset, i);
            d.ack().await.unwrap();
        }
    }
}

/// Two consumers of one group split the messages with no duplicate while they ack.
pub async fn one_group_splits_messages(connect: &Connect) {
    let (a, b) = (connect().await, connect().await);
    a.create_mq("split", MqOptions::default()).await.unwrap();
    produce_numbers(&a, "split", 2000).await;
    let mut ca = group_consumer(&a, "split", "workers", 50).await;
    let mut cb = group_consumer(&b, "split", "workers", 50).await;
    let mut seen = HashSet::new();
    let (mut from_a, mut from_b) = (0, 0);
    while seen.len() < 2000 {
        let d = tokio::select! {
            d = ca.next() => { from_a += 1; d }
            d = cb.next() => { from_b += 1; d }
        };
        let d = d.expect("stream ended").expect("consumer error");
        assert!(seen.insert(d.offset), "offset {} delivered twice", d.offset);
        d.ack().await.unwrap();
    }
    assert!(
        from_a > 0 && from_b > 0,
        "both consumers got work: {from_a} / {from_b}"
    );
}

/// Deliveries held by a consumer whose connection closes go to the other consumer at once
/// (long before the ack timeout), marked as a second attempt.
pub async fn closed_consumer_is_redelivered(connect: &Connect) {
    let survivor = connect().await;
    survivor
        .create_mq("redo", MqOptions::default())
        .await
        .unwrap();
    produce_numbers(&survivor, "redo", 10).await;
    let doomed = connect().await;
    let mut held = group_consumer(&doomed, "redo", "w", 10).await;
    let mut taken = HashSet::new();
    for _ in 0..10 {
        taken.insert(next(&mut held).await.offset);
    }
    assert_eq!(taken.len(), 10);
    drop(held);
    drop(doomed); // closes the connection with 10 unacknowledged deliveries
    let mut consumer = group_consumer(&survivor, "redo", "w", 10).await;
    let mut again = HashSet::new();
    while again.len() < 10 {
        let d = next(&mut consumer).await;
        assert!(d.attempt >= 2, "offset {} is a redelivery", d.offset);
        again.insert(d.offset);
        d.ack().await.unwrap();
    }
    assert_eq!(again, taken);
}

/// A consumer dropped with messages prefetched but never handed out gives them back
/// without spending their delivery attempts: with a limit of one delivery they still reach
/// the next consumer instead of the dead-letter MQ. Its connection stays open meanwhile, so
/// only the give-back can release them before the ack timeout.
pub async fn stopped_consumer_gives_back_unseen(connect: &Connect) {
    let broker = connect().await;
    let options = MqOptions {
        max_deliveries: Some(1),
        ..MqOptions::default()
    };
    broker.create_mq("once", options).await.unwrap();
    produce_numbers(&broker, "once", 10).await;
    let quitter = connect().await;
    let mut prefetching = group_consumer(&quitter, "once", "w", 10).await;
    let seen = next(&mut prefetching).await;
    seen.ack().await.unwrap();
    wait_for_async("the other nine to be prefetched", WAIT, || async {
        let info = broker.query_mq("once").await.ok()?;
        let group = info.groups.iter().find(|g| g.name == "w")?;
        (group.in_flight == 9).then_some(())
    })
    .await;
    drop(prefetching);
    let mut consumer = group_consumer(&broker, "once", "w", 10).await;
    let mut rest = HashSet::new();
    while rest.len() < 9 {
        let d = next(&mut consumer).await;
        assert_ne!(d.offset, seen.offset);
        rest.insert(d.offset);
        d.ack().await.unwrap();
    }
    let info = broker.query_mq("once").await.unwrap();
    assert_eq!(info.groups[0].dead_lettered, 0);
    drop(quitter);
}

/// A group is removed only once no consumer is attached; its name then starts afresh.
pub async fn removed_group_starts_afresh(connect: &Connect) {
    let broker = connect().await;
    broker
        .create_mq("regroup", MqOptions::default())
        .await
        .unwrap();
    produce_numbers(&broker, "regroup", 3).await;
    let reader = connect().await;
    let mut consumer = group_consumer(&reader, "regroup", "g", 16).await;
    let first = next(&mut consumer).await;
    assert_eq!(first.offset, 0);
    first.ack().await.unwrap();
    let refused = broker.remove_group("regroup", "g").await.unwrap_err();
    assert_eq!(refused.status(), Some(Status::Conflict), "{refused}");

    drop(consumer);
    drop(reader); // the connection closes: its consumer is gone at once
    wait_for_async("the group to be removed", WAIT, || async {
        match broker.remove_group("regroup", "g").await {
            Ok(()) => Some(()),
            Err(e) if e.status() == Some(Status::Conflict) => None,
            Err(e) => panic!("removal failed: {e}"),
        }
    })
    .await;
    let info = broker.query_mq("regroup").await.unwrap();
    assert!(info.groups.iter().all(|g| g.name != "g"), "{info:?}");
    let again = broker.remove_group("regroup", "g").await.unwrap_err();
    assert_eq!(again.status(), Some(Status::NotFound), "{again}");

    let mut fresh = group_consumer(&broker, "regroup", "g", 16).await;
    let restart = next(&mut fresh).await;
    assert_eq!(restart.offset, 0, "a removed group's name starts over");
}

/// An unacknowledged delivery comes back after the ack timeout; too many attempts send it
/// to the dead-letter MQ.
pub async fn ack_timeout_and_dead_letters(connect: &Connect) {
    let broker = connect().await;
    let options = MqOptions {
        ack_timeout_ms: Some(300),
        max_deliveries: Some(2),
        ..MqOptions::default()
    };
    broker.create_mq("slow", options).await.unwrap();
    broker.producer("slow").send("poison").await.unwrap();
    let mut consumer = broker.consumer("slow").subscribe().await.unwrap();
    let first = next(&mut consumer).await;
    let second = next(&mut consumer).await; // not acked: redelivered after 300 ms
    assert_eq!((first.offset, first.attempt), (0, 1));
    assert_eq!((second.offset, second.attempt), (0, 2));
    second.ack().await.unwrap(); // a late ack of the current attempt still counts...
    first.ack().await.unwrap(); // ...a stale one is ignored without error

    broker.producer("slow").send("never acked").await.unwrap();
    let _one = next(&mut consumer).await;
    let _two = next(&mut consumer).await;
    wait_for_async("the message to reach the dead-letter MQ", WAIT, || async {
        let info = broker.query_mq("slow.DLQ").await.ok()?;
        (info.depth() == 1).then_some(())
    })
    .await;
    let mut dead = broker.consumer("slow.DLQ").subscribe().await.unwrap();
    assert_eq!(&next(&mut dead).await.body[..], b"never acked");
}

/// A group can start at the end, ignoring what is already stored.
pub async fn start_at_end(connect: &Connect) {
    let broker = connect().await;
    broker
        .create_mq("late", MqOptions::default())
        .await
        .unwrap();
    produce_numbers(&broker, "late", 5).await;
    let mut consumer = broker
        .consumer("late")
        .group("new")
        .start(StartAt::Latest)
        .subscribe()
        .await
        .unwrap();
    // The group is created by its first fetch; wait until it exists before producing.
    wait_for_async("the group to be created", WAIT, || async {
        let info = broker.query_mq("late").await.unwrap();
        info.groups.iter().any(|g| g.name == "new").then_some(())
    })
    .await;
    broker.producer("late").send("fresh").await.unwrap();
    let d = next(&mut consumer).await;
    assert_eq!((d.offset, &d.body[..]), (5, &b"fresh"[..]));
}
