//! Memory MQs against the real `qbus-broker` binary: receipts say `memory`, groups, acks,
//! redelivery and tag filters work as on disk, a restart (kill -9 or graceful) brings the
//! MQ back empty, and a slow group loses the oldest messages beyond the ring's limits,
//! counted, while the broker's memory stays bounded.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use qbus_client::{ClientError, Durability, Message, MqOptions};
use qbus_testkit::wait_for_async;
use support::BrokerProcess;

fn memory(max_messages: Option<u64>) -> MqOptions {
    MqOptions {
        memory: Some(true),
        memory_max_messages: max_messages,
        ack_timeout_ms: Some(300),
        ..MqOptions::default()
    }
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_receipts_groups_acks_redelivery_and_tags() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    let info = client.create_mq("events", memory(None)).await.unwrap();
    assert_eq!(info.options.memory, Some(true));
    assert_eq!(info.segments, 0);

    let producer = client.producer("events");
    for i in 0..10 {
        let tag = if i % 2 == 0 { "even" } else { "odd" };
        let receipt = producer
            .send(Message::new(format!("e{i}")).with_tag(tag))
            .await
            .unwrap();
        assert_eq!(receipt.durability, Durability::Memory);
        assert_eq!(receipt.offset, i);
    }

    // Every group sees every message; a tag filter sees its own.
    let mut all = client
        .consumer("events")
        .group("all")
        .long_poll(Duration::from_millis(200))
        .subscribe()
        .await
        .unwrap();
    let mut even = client
        .consumer("events")
        .group("even")
        .tag("even")
        .long_poll(Duration::from_millis(200))
        .subscribe()
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(all.next().await.unwrap().unwrap());
    }
    let offsets: Vec<u64> = got.iter().map(|d| d.offset).collect();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>());
    let mut evens = Vec::new();
    for _ in 0..5 {
        let delivery = even.next().await.unwrap().unwrap();
        evens.push(delivery.offset);
        delivery.ack().await.unwrap();
    }
    assert_eq!(evens, [0, 2, 4, 6, 8]);

    // Acked ones are done; a nacked one comes back at once, an unacked one after the
    // ack timeout, each as attempt 2.
    for delivery in &got[2..] {
        delivery.ack().await.unwrap();
    }
    got[0].nack().await.unwrap();
    let again = tokio::time::timeout(Duration::from_secs(5), all.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((again.offset, again.attempt), (0, 2));
    again.ack().await.unwrap();
    let late = tokio::time::timeout(Duration::from_secs(5), all.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (late.offset, late.attempt),
        (1, 2),
        "redelivered after the timeout"
    );
    late.ack().await.unwrap();

    let info = wait_for_async("acks settle", Duration::from_secs(5), || async {
        let info = client.query_mq("events").await.ok()?;
        let all = info.groups.iter().find(|g| g.name == "all")?;
        (all.committed == 10).then_some(info)
    })
    .await;
    let group = info.groups.iter().find(|g| g.name == "all").unwrap();
    assert_eq!((group.in_flight, group.dropped), (0, 0));

    // Delayed messages need the disk: refused, clearly.
    let refused = producer
        .send(Message::new("later").with_delay(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("memory MQ"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_the_messages_and_brings_the_mq_back_empty() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client.create_mq("fast", memory(None)).await.unwrap();
    client
        .create_mq("kept", MqOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        client
            .producer("fast")
            .send(Message::new(format!("m{i}")))
            .await
            .unwrap();
        let receipt = client
            .producer("kept")
            .send(Message::new(format!("k{i}")))
            .await
            .unwrap();
        assert_ne!(receipt.durability, Durability::Memory);
    }
    let mut consumer = client
        .consumer("fast")
        .group("g")
        .subscribe()
        .await
        .unwrap();
    consumer.next().await.unwrap().unwrap().ack().await.unwrap();
    drop(consumer);
    drop(client);

    for graceful in [false, true] {
        if graceful {
            assert!(broker.terminate().success());
        }
        broker.restart();
        let client = broker.client().await;
        let fast = client.query_mq("fast").await.unwrap();
        assert_eq!(fast.options.memory, Some(true), "the MQ comes back");
        assert_eq!((fast.first_offset, fast.next_offset), (0, 0), "empty");
        assert!(fast.groups.is_empty(), "its groups were in memory too");
        let kept = client.query_mq("kept").await.unwrap();
        assert_eq!(kept.next_offset, 5, "a plain MQ keeps its messages");

        let receipt = client
            .producer("fast")
            .send(Message::new("after"))
            .await
            .unwrap();
        assert_eq!(
            (receipt.offset, receipt.durability),
            (0, Durability::Memory)
        );
        let mut consumer = client
            .consumer("fast")
            .group("g")
            .subscribe()
            .await
            .unwrap();
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(&delivery.body[..], b"after");
        delivery.ack().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_group_loses_the_oldest_counted_and_memory_stays_bounded() {
    const KEEP: u64 = 1_000;
    const SENT: u64 = 40_000;
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client.create_mq("ticks", memory(Some(KEEP))).await.unwrap();
    let producer = client.producer("ticks");
    producer.send(Message::new("first")).await.unwrap();
    let slow_client = broker.client().await;
    let mut slow = slow_client
        .consumer("ticks")
        .group("slow")
        .batch(1)
        .long_poll(Duration::from_millis(200))
        .subscribe()
        .await
        .unwrap();
    let first = slow.next().await.unwrap().unwrap();
    assert_eq!(first.offset, 0);
    first.ack().await.unwrap();
    // Gone while the flood passes, its connection closed: what it had out is released.
    drop(slow);
    drop(slow_client);
    wait_for_async("the slow consumer gone", Duration::from_secs(5), || async {
        let info = client.query_mq("ticks").await.ok()?;
        let slow = info.groups.iter().find(|g| g.name == "slow")?;
        (slow.consumers == 0 && slow.in_flight == 0).then_some(())
    })
    .await;

    let before = rss_kib(broker.pid());
    let body = vec![b'x'; 1024];
    for _ in 0..SENT / 100 {
        let batch = (0..100).map(|_| Message::new(body.clone()));
        producer.send_batch(batch).await.unwrap();
    }
    let grown = rss_kib(broker.pid()).saturating_sub(before);
    // 40 MB went through; the ring holds about 1 MB of them.
    assert!(grown < 24 * 1024, "broker grew by {grown} KiB");

    let info = client.query_mq("ticks").await.unwrap();
    assert_eq!(info.next_offset, SENT + 1);
    assert!(info.depth() <= KEEP, "ring holds {}", info.depth());
    let oldest = info.first_offset;

    // The slow group comes back, is told what it lost, and goes on from the oldest kept.
    let mut slow = client
        .consumer("ticks")
        .group("slow")
        .long_poll(Duration::from_millis(200))
        .subscribe()
        .await
        .unwrap();
    let mut lost = 0;
    let next_offset = loop {
        match tokio::time::timeout(Duration::from_secs(5), slow.next())
            .await
            .unwrap()
            .unwrap()
        {
            Err(ClientError::RecordsLost { first, end, .. }) => lost += end - first,
            Ok(delivery) if delivery.offset >= oldest => break delivery.offset,
            Ok(delivery) => panic!("offset {} is older than the ring", delivery.offset),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(next_offset, oldest);
    // What it had fetched ahead and released is found gone at its redelivery: counted
    // there, the rest reported as one range.
    assert!(
        lost > 0 && lost < oldest,
        "{lost} of {oldest} reported lost"
    );

    let info = client.query_mq("ticks").await.unwrap();
    let group = info.groups.iter().find(|g| g.name == "slow").unwrap();
    assert_eq!(
        group.dropped,
        oldest - 1,
        "every offset from 1 to the oldest kept"
    );
    assert!(oldest >= SENT - KEEP);
    assert_eq!(info.dropped, group.dropped);
    let metrics = qbus_testkit::http::Http::connect(&broker.addr())
        .await
        .get("/metrics")
        .await
        .text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("qbus_messages_dropped_total") && l.contains("ticks"))
        .unwrap_or_else(|| panic!("no dropped counter in {metrics}"));
    assert!(line.ends_with(&format!(" {}", group.dropped)), "{line}");
}
