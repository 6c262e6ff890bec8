//! Store faults against the real `qbus-broker` binary: what a crash or a full disk leaves in
//! the store directory, and names that collide with the store's own files. (Power loss and
//! injected EIO/ENOSPC at random points run in-process on a simulated disk:
//! `queue::crash_tests` in the broker's unit tests; see `docs/durability.md`.)

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use qbus_client::{ClientError, MqOptions, Status};
use qbus_wire::protocol::record::records;
use qbus_wire::protocol::{Command, Frame, Header, ServerInfo};
use support::BrokerProcess;

/// A creation or removal a crash interrupted leaves a dot-directory the next start deletes;
/// the MQs beside it are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_interrupted_creates_and_removals_are_deleted_at_start() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("kept", MqOptions::default())
        .await
        .unwrap();
    client.producer("kept").send("one").await.unwrap();
    drop(client);
    broker.kill9();

    let store = broker.store().to_owned();
    for leftover in [".creating-half", ".removing-gone"] {
        let dir = store.join(leftover);
        std::fs::create_dir_all(dir.join("groups")).unwrap();
        std::fs::write(dir.join("00000000000000000000.log"), b"torn").unwrap();
    }
    broker.restart();
    let client = broker.client().await;
    let names: Vec<String> = client
        .list_mqs()
        .await
        .unwrap()
        .into_iter()
        .map(|mq| mq.name)
        .collect();
    assert_eq!(names, ["kept"]);
    assert_eq!(client.query_mq("kept").await.unwrap().depth(), 1);
    for leftover in [".creating-half", ".removing-gone"] {
        assert!(!store.join(leftover).exists(), "{leftover} was not deleted");
    }
    // The interrupted name can be created for real now.
    client
        .create_mq("half", MqOptions::default())
        .await
        .unwrap();
    client.producer("half").send("x").await.unwrap();
}

/// `LOCK` is the store's lock file: as an MQ name it gets a clear 400, not a 500 from the
/// file system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mq_named_like_the_lock_file_is_refused() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    let err = client
        .create_mq("LOCK", MqOptions::default())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(Status::BadRequest), "{err}");
    assert!(err.to_string().contains("reserved"), "{err}");
    // Other names are unaffected, and the broker still holds its lock.
    client
        .create_mq("lock", MqOptions::default())
        .await
        .unwrap();
    assert!(broker.store().join("LOCK").is_file());
}

/// A removed MQ stays removed after a crash: its directory is renamed away (durably)
/// before its files are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_mq_stays_removed_after_kill_9() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    let options = MqOptions {
        max_deliveries: Some(3),
        ..MqOptions::default()
    };
    client.create_mq("doomed", options.clone()).await.unwrap();
    client.create_mq("stays", options).await.unwrap();
    client.producer("doomed").send("x").await.unwrap();
    client.remove_mq("doomed").await.unwrap();
    drop(client);
    broker.restart();
    let client = broker.client().await;
    let err = client.query_mq("doomed").await.unwrap_err();
    assert_eq!(err.status(), Some(Status::NotFound), "{err}");
    let stays = client.query_mq("stays").await.unwrap();
    assert_eq!(stays.options.max_deliveries, Some(3), "options survive");
}

/// A damaged length field in the middle of a segment costs that one record: after a
/// restart, a consumer gets every other record, in order, and reaches the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_past_a_damaged_record_to_the_end() {
    const N: u64 = 500;
    const DAMAGED: u64 = 200;
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("damaged", MqOptions::default())
        .await
        .unwrap();
    let producer = client.producer("damaged");
    let mut pending = Vec::new();
    for i in 0..N {
        pending.push(producer.send_async(format!("message-{i}")).await.unwrap());
    }
    for receipt in pending {
        receipt.await.unwrap();
    }
    drop((producer, client));
    broker.kill9();

    let segment = broker
        .store()
        .join("damaged")
        .join("00000000000000000000.log");
    let mut raw = std::fs::read(&segment).unwrap();
    let mut at = 0usize;
    for _ in 0..DAMAGED {
        let len = u32::from_be_bytes(raw[at..at + 4].try_into().unwrap());
        at += 4 + len as usize;
    }
    raw[at + 3] ^= 0x04; // the record's length is now wrong
    std::fs::write(&segment, &raw).unwrap();

    broker.restart();
    let client = broker.client().await;
    let mut consumer = client
        .consumer("damaged")
        .group("reader")
        .batch(100)
        .subscribe()
        .await
        .unwrap();
    let want: Vec<u64> = (0..N).filter(|&o| o != DAMAGED).collect();
    let (mut got, mut notices) = (Vec::new(), Vec::new());
    while got.len() < want.len() {
        let batch = tokio::time::timeout(Duration::from_secs(20), consumer.recv_batch(100))
            .await
            .expect("deliveries in time");
        let batch = match batch {
            Err(ClientError::RecordsLost {
                mq,
                first,
                end,
                detail,
            }) => {
                notices.push((mq, first, end, got.len()));
                assert!(detail.contains("00000000000000000000.log"), "{detail}");
                continue;
            }
            other => other.unwrap(),
        };
        for d in &batch {
            assert_eq!(d.body, format!("message-{}", d.offset).as_bytes());
            got.push(d.offset);
        }
        qbus_client::Delivery::ack_all(&batch).await.unwrap();
    }
    assert_eq!(got, want);
    let told = [("damaged".to_owned(), DAMAGED, DAMAGED + 1, DAMAGED as usize)];
    assert_eq!(
        notices, told,
        "one notice, in order, naming the lost offsets"
    );
    let info = client.query_mq("damaged").await.unwrap();
    assert_eq!(info.groups[0].lag, 0, "the group reached the end");

    // `qbus consume` says so on stderr and reads on to the end.
    let qbus = qbus_testkit::process::built_binary("qbus-cli", "qbus");
    let count = (N - 1).to_string();
    let args = [
        "--broker",
        &broker.addr(),
        "consume",
        "damaged",
        "--group",
        "cli",
    ];
    let out = tokio::process::Command::new(qbus)
        .args(args)
        .args(["--count", &count, "--timeout", "20"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        want.len()
    );
    assert!(stderr.contains("offsets 200..201 are lost"), "{stderr}");

    // A version 1 client is never sent the version 2 field: it reads past the damage as
    // it always did.
    let stream = tokio::net::TcpStream::connect(broker.addr()).await.unwrap();
    let mut link = qbus_wire::link::tcp_link(stream, 1 << 24);
    let hello = ServerInfo {
        protocol: 1,
        version: "a version 1 client".into(),
        max_frame: 0,
        ..ServerInfo::default()
    };
    let hello = rmp_serde::to_vec_named(&hello).unwrap();
    let request = Header::request(Command::Hello, None);
    link.tx
        .send(Frame::with_body(request, hello.into()))
        .await
        .unwrap();
    let mut offsets = Vec::new();
    for id in 1.. {
        let reply = tokio::time::timeout(Duration::from_secs(20), link.rx.next())
            .await
            .expect("a reply in time")
            .expect("the connection stays open")
            .unwrap();
        assert_eq!(reply.header.status, 200, "{:?}", reply.header);
        assert_eq!((reply.header.lost, reply.header.error), (None, None));
        if reply.header.cmd == Command::Fetch {
            for record in records(&reply.body) {
                offsets.push(record.unwrap().offset);
            }
        }
        if offsets.len() >= want.len() {
            break;
        }
        let mut fetch = Header::request(Command::Fetch, Some("damaged"));
        fetch.id = id;
        fetch.group = Some("v1".into());
        fetch.count = Some(1000);
        fetch.timeout_ms = Some(1000);
        link.tx.send(Frame::new(fetch)).await.unwrap();
    }
    assert_eq!(offsets, want);
}
