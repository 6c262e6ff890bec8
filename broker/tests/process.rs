//! End to end against the real `qbus-broker` binary: the client scenarios, crash recovery
//! with `kill -9`, bad input on the wire, and start-up errors.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use futures_util::StreamExt;
use qbus_client::{Durability, MqOptions};
use support::scenarios::{self, Connect};
use support::BrokerProcess;

fn connect_to(broker: &BrokerProcess) -> Connect {
    let addr = broker.addr();
    Box::new(move || {
        let addr = addr.clone();
        Box::pin(async move { qbus_client::Broker::connect(&addr).await.unwrap() })
    })
}

/// A broker process on a free port and a [`Connect`] to it.
async fn process() -> (BrokerProcess, Connect) {
    let broker = BrokerProcess::start(&[]);
    let connect = connect_to(&broker);
    (broker, connect)
}

scenarios::scenario_tests!(
    process:
    round_trip,
    two_groups_each_get_everything,
    one_group_splits_messages,
    closed_consumer_is_redelivered,
    stopped_consumer_gives_back_unseen,
    removed_group_starts_afresh,
    ack_timeout_and_dead_letters,
    start_at_end,
);

/// 50k confirmed messages, `kill -9`, restart: a new group reads every confirmed message
/// exactly once, in order, intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    const N: usize = 50_000;
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("durable", MqOptions::default())
        .await
        .unwrap();
    let producer = client.producer("durable");
    let confirmed = send_windowed(&producer, N as u64, "message", Durability::Synced).await;
    assert_eq!(confirmed, (0..N as u64).collect::<Vec<_>>());
    drop(client);

    broker.restart(); // SIGKILL, then start on the same store
    let client = broker.client().await;
    assert_eq!(client.query_mq("durable").await.unwrap().depth(), N as u64);
    let mut consumer = client
        .consumer("durable")
        .group("after-crash")
        .batch(1000)
        .subscribe()
        .await
        .unwrap();
    let mut batch = Vec::new();
    let mut expected = 0u64;
    while expected < N as u64 {
        let deliveries = tokio::time::timeout(Duration::from_secs(20), consumer.recv_batch(1000))
            .await
            .expect("deliveries in time")
            .unwrap();
        for d in deliveries {
            assert_eq!(d.offset, expected, "in order, exactly once");
            assert_eq!(d.body, format!("message-{expected}").as_bytes());
            expected += 1;
            batch.push(d);
        }
        qbus_client::Delivery::ack_all(&batch).await.unwrap();
        batch.clear();
    }
    let info = client.query_mq("durable").await.unwrap();
    assert_eq!(info.groups[0].lag, 0);
}

/// A group's acknowledged position survives a crash: nothing acked comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_survive_kill_9() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("acks", MqOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        client.producer("acks").send(format!("{i}")).await.unwrap();
    }
    let mut consumer = client.consumer("acks").batch(1).subscribe().await.unwrap();
    for _ in 0..6 {
        consumer.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    drop(consumer);
    drop(client);
    broker.restart();
    let client = broker.client().await;
    let mut consumer = client.consumer("acks").subscribe().await.unwrap();
    let d = consumer.next().await.unwrap().unwrap();
    assert_eq!(d.offset, 6, "resumes after the last acknowledged message");
}

fn raw_connection(broker: &BrokerProcess) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(broker.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads until the broker closes the connection; returns what it sent.
fn read_until_closed(mut stream: std::net::TcpStream) -> Vec<u8> {
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

/// Garbage and an oversized frame close only the offending connection, with an error
/// frame that says why; other clients carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_that_connection() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("safe", MqOptions::default())
        .await
        .unwrap();

    let mut oversized = raw_connection(&broker);
    oversized
        .write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0])
        .unwrap();
    let reply = read_until_closed(oversized);
    let (frame, _) = qbus_client::protocol::decode(&reply, 1 << 20).expect("an error frame");
    assert_eq!(frame.header.status, 413);
    assert!(frame.header.error.unwrap().contains("exceeds the maximum"));

    let mut garbage = raw_connection(&broker);
    let mut junk = vec![0, 0, 0, 40, 0, 0, 0, 30];
    junk.extend((0..40u8).map(|b| b.wrapping_mul(37)));
    garbage.write_all(&junk).unwrap();
    let reply = read_until_closed(garbage);
    let (frame, _) = qbus_client::protocol::decode(&reply, 1 << 20).expect("an error frame");
    assert_eq!(frame.header.status, 400);

    let mut truncated = raw_connection(&broker);
    truncated.write_all(&[0, 0, 1, 0, 0, 0]).unwrap();
    drop(truncated);

    // An unknown command gets an error reply and the connection stays usable.
    let mut header =
        qbus_client::protocol::Header::request(qbus_client::protocol::Command::Unknown(250), None);
    header.id = 9;
    let mut buf = bytes::BytesMut::new();
    qbus_client::protocol::encode(&qbus_client::protocol::Frame::new(header), &mut buf).unwrap();
    let mut unknown = raw_connection(&broker);
    unknown.write_all(&buf).unwrap();
    let mut reply = vec![0u8; 4096];
    let n = unknown.read(&mut reply).unwrap();
    let (frame, _) = qbus_client::protocol::decode(&reply[..n], 1 << 20).unwrap();
    assert_eq!((frame.header.id, frame.header.status), (9, 501));

    let receipt = client.producer("safe").send("still fine").await.unwrap();
    assert_eq!(receipt.offset, 0);
}

/// A record with a broken checksum is refused, and nothing of the batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_produce_is_refused() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client.create_mq("crc", MqOptions::default()).await.unwrap();
    let mut body = bytes::BytesMut::new();
    qbus_client::protocol::record::encode_record(&mut body, 0, 0, None, None, b"good").unwrap();
    qbus_client::protocol::record::encode_record(&mut body, 0, 0, None, None, b"bad").unwrap();
    let last = body.len() - 1;
    body[last] ^= 1;
    let mut header = qbus_client::protocol::Header::request(
        qbus_client::protocol::Command::Produce,
        Some("crc"),
    );
    header.count = Some(2);
    let conn = qbus_client::Connection::new(
        qbus_client::link::TcpConnector::new(broker.addr(), 1 << 20),
        Default::default(),
    );
    let err = conn
        .request(qbus_client::protocol::Frame::with_body(
            header,
            body.freeze(),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(qbus_client::Status::BadRequest));
    assert_eq!(client.query_mq("crc").await.unwrap().depth(), 0);
}

/// A second broker on the same store exits with a clear error; so does a port in use.
#[test]
fn start_up_errors_are_one_clear_line() {
    let broker = BrokerProcess::start(&[]);
    let other_port = qbus_testkit::reserve_port();
    let out = BrokerProcess::command(other_port.get(), broker.store(), &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is in use by another broker"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let out = BrokerProcess::command(broker.port(), dir.path(), &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");

    let out = BrokerProcess::command(other_port.get(), dir.path(), &["--fsync", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid setting fsync"), "{stderr}");
}

/// SIGTERM stops the broker cleanly (exit 0) and keeps every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly() {
    let mut broker = BrokerProcess::start(&["--fsync", "never"]);
    let client = broker.client().await;
    client
        .create_mq("term", MqOptions::default())
        .await
        .unwrap();
    for i in 0..100 {
        let receipt = client.producer("term").send(format!("{i}")).await.unwrap();
        assert_eq!(receipt.durability, Durability::Written);
    }
    let status = broker.terminate();
    assert!(status.success(), "exit status {status}");
    broker.restart();
    let client = broker.client().await;
    assert_eq!(client.query_mq("term").await.unwrap().depth(), 100);
    let mut consumer = client.consumer("term").subscribe().await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < 100 {
        seen.insert(consumer.next().await.unwrap().unwrap().offset);
    }
}

/// Records and acks of a `sync: false` MQ, which the session writes itself instead of the
/// commit thread, are in the files once acknowledged: a kill -9 keeps them all, in the
/// order they were sent, and the group's acknowledged cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_false_writes_survive_kill_9_in_order() {
    const N: u64 = 5_000;
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    let fast = MqOptions {
        sync: Some(false),
        ..MqOptions::default()
    };
    client.create_mq("fast", fast).await.unwrap();
    let producer = client.producer("fast");
    let offsets = send_windowed(&producer, N, "m", Durability::Written).await;
    assert_eq!(
        offsets,
        (0..N).collect::<Vec<_>>(),
        "stored in the order sent"
    );
    let mut consumer = client
        .consumer("fast")
        .group("g")
        .batch(100)
        .subscribe()
        .await
        .unwrap();
    let mut acked = 0;
    while acked < N / 2 {
        let deliveries = tokio::time::timeout(Duration::from_secs(20), consumer.recv_batch(100))
            .await
            .expect("deliveries in time")
            .unwrap();
        qbus_client::Delivery::ack_all(&deliveries).await.unwrap();
        acked += deliveries.len() as u64;
    }
    drop(consumer);
    drop(client);

    broker.restart(); // SIGKILL, then start on the same store
    let client = broker.client().await;
    let info = client.query_mq("fast").await.unwrap();
    assert_eq!(info.depth(), N);
    let group = info.groups.iter().find(|g| g.name == "g").unwrap();
    assert!(group.committed >= acked, "{} < {acked}", group.committed);
    let mut consumer = client
        .consumer("fast")
        .group("after-crash")
        .batch(1000)
        .subscribe()
        .await
        .unwrap();
    let mut expected = 0u64;
    while expected < N {
        let deliveries = tokio::time::timeout(Duration::from_secs(20), consumer.recv_batch(1000))
            .await
            .expect("deliveries in time")
            .unwrap();
        for d in deliveries {
            assert_eq!(d.offset, expected, "in order, exactly once");
            assert_eq!(d.body, format!("m-{expected}").as_bytes());
            expected += 1;
        }
    }
}

/// An MQ created with `sync: false` is acknowledged once written, while other MQs of the
/// same broker still wait for the fsync; both keep their messages across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_mq_sync_option() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    let fast = MqOptions {
        sync: Some(false),
        ..MqOptions::default()
    };
    client.create_mq("fast", fast).await.unwrap();
    client
        .create_mq("safe", MqOptions::default())
        .await
        .unwrap();
    let info = client.query_mq("fast").await.unwrap();
    assert_eq!(info.options.sync, Some(false));
    for _ in 0..10 {
        let fast = client.producer("fast").send("f").await.unwrap();
        let safe = client.producer("safe").send("s").await.unwrap();
        assert_eq!(fast.durability, Durability::Written);
        assert_eq!(safe.durability, Durability::Synced);
    }
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let client = broker.client().await;
    assert_eq!(client.query_mq("fast").await.unwrap().depth(), 10);
    assert_eq!(
        client.query_mq("fast").await.unwrap().options.sync,
        Some(false)
    );
}

/// A consumer keeps working across a broker restart: its fetch loop reconnects and the
/// group resumes where it was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_survives_a_broker_restart() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("steady", MqOptions::default())
        .await
        .unwrap();
    client.producer("steady").send("before").await.unwrap();
    let mut consumer = client.consumer("steady").subscribe().await.unwrap();
    let first = scenarios::next(&mut consumer).await;
    assert_eq!(&first.body[..], b"before");
    first.ack().await.unwrap();

    broker.restart(); // kill -9, same port and store
    let producer = broker.client().await.producer("steady");
    producer.send("after").await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("the consumer resumed after the restart")
        .unwrap()
        .unwrap();
    assert_eq!((next.offset, &next.body[..]), (1, &b"after"[..]));
    next.ack().await.unwrap();
}

/// A removed group stays removed across a restart: its cursor file is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_group_stays_removed_after_restart() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("gone", MqOptions::default())
        .await
        .unwrap();
    client.producer("gone").send("x").await.unwrap();
    let reader = broker.client().await;
    let mut consumer = reader
        .consumer("gone")
        .group("old")
        .subscribe()
        .await
        .unwrap();
    let only = scenarios::next(&mut consumer).await;
    only.ack().await.unwrap();
    drop((consumer, reader));
    qbus_testkit::wait_for_async(
        "the group to be removed",
        Duration::from_secs(20),
        || async { client.remove_group("gone", "old").await.ok() },
    )
    .await;

    broker.restart(); // kill -9, same port and store
    let info = broker.client().await.query_mq("gone").await.unwrap();
    assert!(info.groups.is_empty(), "{:?}", info.groups);
}

/// Sends `PREFIX-0` .. `PREFIX-{n-1}` with 256 in flight; returns their offsets in send
/// order, asserting `durability` on each receipt awaited while the window was full.
async fn send_windowed(
    producer: &qbus_client::Producer,
    n: u64,
    prefix: &str,
    durability: Durability,
) -> Vec<u64> {
    let mut window = std::collections::VecDeque::new();
    let mut offsets = Vec::new();
    for i in 0..n {
        window.push_back(producer.send_async(format!("{prefix}-{i}")).await.unwrap());
        if window.len() >= 256 {
            let receipt = window.pop_front().unwrap().await.unwrap();
            assert_eq!(receipt.durability, durability);
            offsets.push(receipt.offset);
        }
    }
    while let Some(pending) = window.pop_front() {
        offsets.push(pending.await.unwrap().offset);
    }
    offsets
}
