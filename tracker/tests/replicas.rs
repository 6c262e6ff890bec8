//! Replicas end to end (`docs/replication.md`): real `qbus-tracker` and `qbus-broker`
//! processes; an MQ with `replicas: 2` has each broker's copy followed by the other broker.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use hyper::Method;
use qbus_client::{Ack, Durability, Message, MqInfo, MqOptions, Status};
use qbus_testkit::chromium;
use support::{
    broker, http, tracker, tracker_url, wait_for_async, wait_for_brokers, BrokerProcess,
    TrackerProcess,
};

const LIMIT: Duration = Duration::from_secs(10);

/// Where broker `follower` keeps its copy of `leader`'s `mq` (see `replica/copies.rs`).
fn copy_dir(follower: &BrokerProcess, leader: &BrokerProcess, mq: &str) -> PathBuf {
    let leader_dir = format!("b_{}", leader.addr().replace(':', "_"));
    follower.store().join(".replicas").join(leader_dir).join(mq)
}

/// The segment files of an MQ directory, by name, with their bytes.
fn segments(dir: &Path) -> Vec<(String, Vec<u8>)> {
    read_segments(dir).unwrap()
}

/// [`segments`], or the error of a directory being replaced under the reader.
fn read_segments(dir: &Path) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "log") {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            all.push((name, std::fs::read(&path)?));
        }
    }
    all.sort();
    Ok(all)
}

/// Waits until `broker`'s own `mq` has `n` followers in sync.
async fn wait_in_sync(client: &qbus_client::Broker, mq: &str, n: usize) -> MqInfo {
    wait_for_async(
        &format!("{n} follower(s) of {mq} in sync"),
        LIMIT,
        || async {
            let info = client.query_mq(mq).await.ok()?;
            (info.followers.iter().filter(|f| f.in_sync).count() >= n).then_some(info)
        },
    )
    .await
}

/// A tracker and two brokers reporting to it, and an HA client that sees both.
async fn two_brokers() -> (
    TrackerProcess,
    BrokerProcess,
    BrokerProcess,
    qbus_client::Broker,
) {
    let t = tracker();
    let (a, b) = (broker(&[&t]), broker(&[&t]));
    let ha = qbus_client::Broker::connect(&tracker_url(&[&t]))
        .await
        .unwrap();
    wait_for_brokers(&ha, None, &[a.addr(), b.addr()], LIMIT).await;
    (t, a, b, ha)
}

/// Options of an MQ with a follower for each broker's copy.
fn two_copies() -> MqOptions {
    MqOptions {
        replicas: Some(2),
        ..MqOptions::default()
    }
}

/// Two brokers each following the other: `replicated` receipts come once the follower
/// holds the records, its copy is byte for byte the leader's, and with the follower gone a
/// `replicated` produce fails with `503` naming the cause instead of pretending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_holds_the_leaders_bytes_before_a_replicated_receipt() {
    let (_tracker, a, mut b, ha) = two_brokers().await;
    let options = MqOptions {
        replicas: Some(2),
        min_replicas: Some(1),
        ..MqOptions::default()
    };
    ha.create_mq("orders", options).await.unwrap();
    let (to_a, to_b) = (a.client().await, b.client().await);
    wait_in_sync(&to_a, "orders", 1).await;
    wait_in_sync(&to_b, "orders", 1).await;

    let producer = to_a.producer("orders");
    for i in 0..50u32 {
        let message = Message::new(format!("m{i}")).with_key(format!("k{i}"));
        let receipt = producer.send(message).await.unwrap();
        assert_eq!(receipt.durability, Durability::Replicated);
        // The receipt means the follower holds it: its copy says so at once.
        let copy = to_b
            .query_mq(&format!("orders@{}", a.addr()))
            .await
            .unwrap();
        assert!(copy.next_offset > receipt.offset, "{copy:?}");
    }
    let batch = (0..200).map(|i| Message::new(vec![b'x'; i]));
    let receipt = producer.send_batch(batch).await.unwrap();
    assert_eq!(
        (receipt.count, receipt.durability),
        (200, Durability::Replicated)
    );
    let leader = segments(&a.store().join("orders"));
    let copy = segments(&copy_dir(&b, &a, "orders"));
    assert!(!leader.is_empty());
    assert_eq!(
        leader, copy,
        "the follower's segments are the leader's, byte for byte"
    );
    // A follower's copy is read-only.
    let refused = to_b
        .producer(&format!("orders@{}", a.addr()))
        .send(Message::new("no"))
        .await
        .unwrap_err();
    assert_eq!(refused.status(), Some(Status::Unavailable), "{refused}");
    assert!(refused.to_string().contains("read-only"), "{refused}");

    b.kill9();
    let err = wait_for_async("a replicated produce refused", LIMIT, || async {
        producer.send(Message::new("late")).await.err()
    })
    .await;
    assert_eq!(err.status(), Some(Status::Unavailable), "{err}");
    assert!(err.to_string().contains("follower"), "{err}");
}

/// A leader killed with `kill -9`: its backlog is read from its follower's copy
/// (`orders@LEADER`), from where the group's cursor had reached on the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_backlog_is_read_from_its_follower() {
    let (_tracker, mut a, b, ha) = two_brokers().await;
    let options = two_copies();
    ha.create_mq("jobs", options).await.unwrap();
    let (to_a, to_b) = (a.client().await, b.client().await);
    wait_in_sync(&to_a, "jobs", 1).await;
    let producer = to_a.producer("jobs");
    let batch = (0..100).map(|i| Message::new(format!("j{i}")));
    let receipt = producer.send_batch(batch).await.unwrap();
    assert_eq!(receipt.durability, Durability::Replicated);

    // 30 consumed and acknowledged on the leader.
    let mut consumer = to_a
        .consumer("jobs")
        .group("workers")
        .subscribe()
        .await
        .unwrap();
    for i in 0..30 {
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(delivery.body, format!("j{i}").as_bytes());
        delivery.ack().await.unwrap();
    }
    drop(consumer);
    let copy_name = format!("jobs@{}", a.addr());
    wait_for_async("the group's cursor on the follower", LIMIT, || async {
        let info = to_b.query_mq(&copy_name).await.ok()?;
        let group = info.groups.iter().find(|g| g.name == "workers")?;
        (group.committed == 30).then_some(())
    })
    .await;

    a.kill9();
    let mut consumer = to_b
        .consumer(&copy_name)
        .group("workers")
        .subscribe()
        .await
        .unwrap();
    for i in 30..100 {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .expect("the backlog goes on from the follower")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.body, format!("j{i}").as_bytes());
        delivery.ack().await.unwrap();
    }
}

/// A `tracker://` consumer keeps draining a killed leader's backlog from its follower
/// without being told anything, and once the leader is back it takes the acks made on the
/// follower: nothing confirmed is lost, and what was acknowledged meanwhile is not
/// delivered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_consumer_reads_a_dead_leader_from_its_follower_and_the_leader_takes_the_acks() {
    let (_tracker, mut a, b, ha) = two_brokers().await;
    let options = two_copies();
    ha.create_mq("tasks", options).await.unwrap();
    let to_a = a.client().await;
    wait_in_sync(&to_a, "tasks", 1).await;
    let batch = (0..60).map(|i| Message::new(format!("t{i}")));
    let receipt = to_a.producer("tasks").send_batch(batch).await.unwrap();
    assert_eq!(receipt.durability, Durability::Replicated);

    a.kill9();
    wait_for_brokers(&ha, Some("tasks"), &[b.addr()], LIMIT).await;
    let mut consumer = ha.consumer("tasks").group("g").subscribe().await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 60 {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of a's 60 records read", seen.len()))
            .unwrap()
            .unwrap();
        seen.insert(String::from_utf8(delivery.body.to_vec()).unwrap());
        delivery.ack().await.unwrap();
    }
    drop(consumer);

    a.restart();
    let to_a = a.client().await;
    wait_for_async("a takes the acks made on its follower", LIMIT, || async {
        let info = to_a.query_mq("tasks").await.ok()?;
        let group = info.groups.iter().find(|g| g.name == "g")?;
        (group.committed == 60).then_some(())
    })
    .await;
    let mut consumer = to_a.consumer("tasks").group("g").subscribe().await.unwrap();
    let again = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(
        again.is_err(),
        "acknowledged on the follower, delivered again: {again:?}"
    );
}

/// A leader whose store is lost (killed, store deleted, started again empty under the same
/// id) restores its MQ from its follower's copy before taking produce: the same records at
/// the same offsets, its group's cursor, and replicated produce again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_store_restores_from_its_follower() {
    let (_tracker, mut a, b, ha) = two_brokers().await;
    let options = two_copies();
    ha.create_mq("ledger", options).await.unwrap();
    let to_a = a.client().await;
    wait_in_sync(&to_a, "ledger", 1).await;
    let batch = (0..80).map(|i| Message::new(format!("l{i}")));
    let receipt = to_a.producer("ledger").send_batch(batch).await.unwrap();
    assert_eq!(receipt.durability, Durability::Replicated);
    let mut consumer = to_a
        .consumer("ledger")
        .group("g")
        .subscribe()
        .await
        .unwrap();
    for _ in 0..20 {
        consumer.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    drop(consumer);
    let (to_b, copy_name) = (b.client().await, format!("ledger@{}", a.addr()));
    wait_for_async("the cursor on the follower", LIMIT, || async {
        let info = to_b.query_mq(&copy_name).await.ok()?;
        (info.groups.iter().find(|g| g.name == "g")?.committed == 20).then_some(())
    })
    .await;
    let before = segments(&a.store().join("ledger"));

    a.kill9();
    std::fs::remove_dir_all(a.store()).unwrap();
    a.restart();
    let to_a = a.client().await;
    let info = wait_for_async("a restores ledger", LIMIT, || async {
        let info = to_a.query_mq("ledger").await.ok()?;
        (info.next_offset == 80 && info.groups.iter().any(|g| g.committed == 20)).then_some(info)
    })
    .await;
    assert_eq!(info.first_offset, 0);
    assert_eq!(
        segments(&a.store().join("ledger")),
        before,
        "the same bytes back"
    );

    let mut consumer = to_a
        .consumer("ledger")
        .group("g")
        .subscribe()
        .await
        .unwrap();
    let next = consumer.next().await.unwrap().unwrap();
    assert_eq!((next.offset, &next.body[..]), (20, &b"l20"[..]));
    drop(consumer);
    wait_in_sync(&to_a, "ledger", 1).await;
    let receipt = to_a
        .producer("ledger")
        .send(Message::new("after"))
        .await
        .unwrap();
    assert_eq!(
        (receipt.offset, receipt.durability),
        (80, Durability::Replicated)
    );
}

/// A leader that is never coming back: `adopt` makes its follower's copy an ordinary MQ of
/// the follower's own, with the same records and cursor, taking produce from where the copy
/// ended. Delayed records are copied byte for byte, due copies included; a copy runs no
/// timer of its own (its leader fires them), and once adopted the MQ fires what the dead
/// leader had not, without firing again what it had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leaders_copy_is_adopted_by_its_follower() {
    let (_tracker, mut a, b, ha) = two_brokers().await;
    let options = two_copies();
    // On a only: b holds no "audit" of its own, only its copy of a's.
    let to_a = a.client().await;
    to_a.create_mq("audit", options.clone()).await.unwrap();
    to_a.create_mq("later", options).await.unwrap();
    wait_in_sync(&to_a, "audit", 1).await;
    wait_in_sync(&to_a, "later", 1).await;
    let delayed = to_a.producer("later");
    let now = Message::new("now").with_ttl(Duration::from_secs(600));
    assert_eq!(delayed.send(now).await.unwrap().offset, 0);
    let late = Message::new("late").with_delay(Duration::from_secs(6));
    assert_eq!(delayed.send(late).await.unwrap().offset, 1);
    let soon = Message::new("soon").with_delay(Duration::from_millis(200));
    assert_eq!(delayed.send(soon).await.unwrap().offset, 2);
    let batch = (0..40).map(|i| Message::new(format!("x{i}")));
    to_a.producer("audit").send_batch(batch).await.unwrap();
    let mut consumer = to_a.consumer("audit").group("g").subscribe().await.unwrap();
    for _ in 0..10 {
        consumer.next().await.unwrap().unwrap().ack().await.unwrap();
    }
    drop(consumer);
    let (to_b, copy_name) = (b.client().await, format!("audit@{}", a.addr()));
    wait_for_async("the cursor on the follower", LIMIT, || async {
        let info = to_b.query_mq(&copy_name).await.ok()?;
        (info.groups.iter().find(|g| g.name == "g")?.committed == 10).then_some(())
    })
    .await;
    // "soon" fired on the leader (its due copy at offset 3) and the follower pulled that.
    let later_copy = format!("later@{}", a.addr());
    wait_for_async("the due copy on the follower", LIMIT, || async {
        let info = to_b.query_mq(&later_copy).await.ok()?;
        (info.next_offset == 4).then_some(())
    })
    .await;
    let leader = to_a.query_mq("later").await.unwrap();
    assert_eq!(leader.next_offset, 4, "\"late\" still waits");
    assert_eq!(
        segments(&a.store().join("later")),
        segments(&copy_dir(&b, &a, "later")),
        "delay and TTL fields copied byte for byte"
    );
    assert!(
        !copy_dir(&b, &a, "later").join("timer").exists(),
        "a copy keeps no timer index: it fires nothing"
    );

    a.kill9();
    wait_for_brokers(&ha, None, &[b.addr()], LIMIT).await;
    let adopted = ha.adopt_copy("audit", &a.addr()).await.unwrap();
    assert_eq!((adopted.name.as_str(), adopted.next_offset), ("audit", 40));
    assert!(to_b.query_mq(&copy_name).await.is_err(), "the copy is gone");
    // No broker left to follow it: produce asks for this broker's disk only.
    let receipt = to_b
        .producer("audit")
        .with_ack(Ack::Local)
        .send(Message::new("new"))
        .await
        .unwrap();
    assert_eq!(
        (receipt.offset, receipt.durability),
        (40, Durability::Synced)
    );
    let mut consumer = to_b.consumer("audit").group("g").subscribe().await.unwrap();
    let next = consumer.next().await.unwrap().unwrap();
    assert_eq!((next.offset, &next.body[..]), (10, &b"x10"[..]));
    // Adopting again, or over an MQ of the broker's own, is refused.
    let again = to_b.adopt_copy("audit", &a.addr()).await.unwrap_err();
    assert_eq!(again.status(), Some(Status::Conflict), "{again}");

    ha.adopt_copy("later", &a.addr()).await.unwrap();
    let mut consumer = to_b.consumer("later").group("g").subscribe().await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .expect("the adopted MQ delivers")
            .unwrap()
            .unwrap();
        let body = String::from_utf8_lossy(&delivery.body).into_owned();
        got.push((delivery.offset, body));
        delivery.ack().await.unwrap();
    }
    // "late" fired once, by the adopted MQ, right after the copy's end: had "soon" been
    // fired again, its second copy (due at once) would stand at offset 4.
    let want = [(0, "now"), (3, "soon"), (4, "late")].map(|(o, b)| (o, b.to_owned()));
    assert_eq!(got, want);
}

/// A follower killed while its leader goes on (`Ack::Local` produces) catches up from where
/// its copy ended once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_catches_up() {
    let (_tracker, a, mut b, _) = two_brokers().await;
    let to_a = a.client().await;
    let options = two_copies();
    to_a.create_mq("feed", options).await.unwrap();
    wait_in_sync(&to_a, "feed", 1).await;
    let producer = to_a.producer("feed");
    producer
        .send_batch((0..30).map(|i| Message::new(format!("f{i}"))))
        .await
        .unwrap();

    b.kill9();
    let local = producer.clone().with_ack(Ack::Local);
    for i in 30..100 {
        local.send(Message::new(format!("f{i}"))).await.unwrap();
    }
    b.restart();
    let to_b = b.client().await;
    let copy_name = format!("feed@{}", a.addr());
    wait_for_async("the follower caught up", LIMIT, || async {
        let copy = to_b.query_mq(&copy_name).await.ok()?;
        (copy.next_offset == 100).then_some(())
    })
    .await;
    assert_eq!(
        segments(&a.store().join("feed")),
        segments(&copy_dir(&b, &a, "feed"))
    );
    wait_in_sync(&to_a, "feed", 1).await;
    let receipt = producer.send(Message::new("f100")).await.unwrap();
    assert_eq!(
        (receipt.offset, receipt.durability),
        (100, Durability::Replicated)
    );
}

/// A hung leader (SIGSTOP): once the trackers drop it, a `tracker://` consumer reads its
/// backlog from the follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_leaders_backlog_is_read_from_its_follower() {
    let (_tracker, a, b, ha) = two_brokers().await;
    let to_a = a.client().await;
    let options = two_copies();
    to_a.create_mq("mail", options).await.unwrap();
    wait_in_sync(&to_a, "mail", 1).await;
    to_a.producer("mail")
        .send_batch((0..25).map(|i| Message::new(format!("e{i}"))))
        .await
        .unwrap();

    a.freeze();
    wait_for_brokers(&ha, None, &[b.addr()], LIMIT).await;
    let mut consumer = ha.consumer("mail").group("g").subscribe().await.unwrap();
    for i in 0..25 {
        let delivery = tokio::time::timeout(LIMIT, consumer.next())
            .await
            .expect("the hung leader's backlog comes from its follower")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.body, format!("e{i}").as_bytes());
        delivery.ack().await.unwrap();
    }
    a.thaw();
}

/// The followers of broker `leader`'s `mq` in the tracker's `/topology` JSON.
async fn reported_followers(
    tracker: &TrackerProcess,
    leader: &BrokerProcess,
    mq: &str,
) -> Vec<serde_json::Value> {
    let topology = http(tracker.port(), Method::GET, "/topology").await.json();
    let node = topology["brokers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|node| node["id"] == leader.addr().as_str());
    let mq = node
        .and_then(|node| node["mqs"].as_array())
        .into_iter()
        .flatten()
        .find(|m| m["name"] == mq);
    mq.and_then(|mq| mq["followers"].as_array().cloned())
        .unwrap_or_default()
}

/// The `<tr data-mq="MQ"` row of `mq` in a dumped DOM, from `start` on.
fn page_row<'a>(dom: &'a str, start: &str, mq: &str) -> &'a str {
    let from = dom
        .find(start)
        .unwrap_or_else(|| panic!("no {start} in the page:\n{dom}"));
    let dom = &dom[from..];
    let row = dom
        .find(&format!("<tr data-mq=\"{mq}\""))
        .unwrap_or_else(|| panic!("no row of {mq} in the page:\n{dom}"));
    let end = dom[row..].find("</tr>").map_or(dom.len(), |e| row + e);
    &dom[row..end]
}

/// A leader's view of its followers (lag in records and bytes, in sync or not) reaches
/// `QueryMq`, the trackers' topology and both monitor pages: a stopped follower falls
/// behind by exactly the records produced meanwhile, and is in sync again with no lag once
/// it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_lag_and_sync_are_shown_in_the_topology_and_both_pages() {
    let (t, a, b, _ha) = two_brokers().await;
    let to_a = a.client().await;
    to_a.create_mq("shown", two_copies()).await.unwrap();
    wait_in_sync(&to_a, "shown", 1).await;

    b.freeze();
    let body = vec![b'x'; 1_000];
    to_a.producer("shown")
        .with_ack(Ack::Local)
        .send_batch((0..10).map(|_| Message::new(body.clone())))
        .await
        .unwrap();
    let info = to_a.query_mq("shown").await.unwrap();
    let follower = &info.followers[0];
    assert_eq!(
        (follower.id.as_str(), follower.lag),
        (b.addr().as_str(), 10),
        "{info:?}"
    );
    assert!(
        (10_000..10_000 + 4_096 + 2_000).contains(&follower.lag_bytes),
        "ten 1000-byte records behind: {follower:?}"
    );
    let reported = wait_for_async("the lag reported to the tracker", LIMIT, || async {
        let followers = reported_followers(&t, &a, "shown").await;
        (followers.first()?["lag"] == 10).then_some(followers)
    })
    .await;
    assert_eq!(reported[0]["id"], b.addr().as_str());
    assert_eq!(reported[0]["lag_bytes"], follower.lag_bytes);

    let chip = format!("data-follower=\"{}\"", b.addr());
    let dom =
        chromium::run_chromium(&format!("http://{}/", t.addr()), "--dump-dom", (1400, 900)).await;
    let row = page_row(
        &dom,
        &format!("<section data-node=\"{}\"", a.addr()),
        "shown",
    );
    assert!(
        row.contains(&chip) && row.contains("lag 10 ·"),
        "tracker page: {row}"
    );
    let dom =
        chromium::run_chromium(&format!("http://{}/", a.addr()), "--dump-dom", (1400, 900)).await;
    let row = page_row(&dom, "<tbody id=\"mqs\"", "shown");
    assert!(
        row.contains(&chip) && row.contains("lag 10 ·"),
        "broker page: {row}"
    );

    b.thaw();
    // (It may still count as in sync for a few seconds from before it stopped: wait for
    // the lag to go.)
    wait_for_async("the follower caught up, no lag", LIMIT, || async {
        let info = to_a.query_mq("shown").await.ok()?;
        let f = info.followers.first()?;
        (f.in_sync && f.lag == 0 && f.lag_bytes == 0).then_some(())
    })
    .await;
    wait_for_async("the tracker shows it in sync", LIMIT, || async {
        let followers = reported_followers(&t, &a, "shown").await;
        let f = followers.first()?;
        (f["in_sync"] == true && f["lag"] == 0 && f["lag_bytes"] == 0).then_some(())
    })
    .await;
}

/// An MQ removed on its leader: the follower deletes its copy once it has been stale for
/// 30 report intervals (6 s here) and the leader has been up as long, while the copy of
/// an MQ still there stays; the trackers' topology stops listing the removed copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_an_mq_removed_on_its_leader_is_deleted() {
    let (t, a, b, _ha) = two_brokers().await;
    let to_a = a.client().await;
    for mq in ["gone", "kept"] {
        to_a.create_mq(mq, two_copies()).await.unwrap();
        wait_in_sync(&to_a, mq, 1).await;
        to_a.producer(mq).send(Message::new("x")).await.unwrap();
    }
    let (gone, kept) = (copy_dir(&b, &a, "gone"), copy_dir(&b, &a, "kept"));
    assert!(gone.is_dir() && kept.is_dir());

    to_a.remove_mq("gone").await.unwrap();
    // Nothing of it is left, not even the renamed directory being deleted.
    let leader_dir = gone.parent().unwrap().to_owned();
    wait_for_async(
        "the removed MQ's copy deleted",
        Duration::from_secs(20),
        || async {
            let left = leader_dir
                .read_dir()
                .unwrap()
                .any(|e| e.unwrap().file_name().to_string_lossy().contains("gone"));
            (!left).then_some(())
        },
    )
    .await;
    assert!(kept.is_dir(), "the copy of an MQ still on its leader stays");
    wait_for_async("the topology lists only the kept copy", LIMIT, || async {
        let topology = http(t.port(), Method::GET, "/topology").await.json();
        let node = topology["brokers"]
            .as_array()?
            .iter()
            .find(|node| node["id"] == b.addr().as_str())?
            .clone();
        let copies: Vec<String> = node["copies"]
            .as_array()?
            .iter()
            .map(|c| c["mq"].as_str().unwrap_or("").to_owned())
            .collect();
        (copies == ["kept"]).then_some(())
    })
    .await;
    // The kept copy is still followed.
    to_a.producer("kept").send(Message::new("y")).await.unwrap();
}

/// The power-loss model for a leader whose follower copied ahead of its fsync: the
/// leader's last records never reached its disk (its segment cut back while it is down),
/// and it writes other records at those offsets after it restarts. The follower, which
/// holds the lost ones, must not keep them under the new ones: it learns from the
/// leader's epochs where the old epoch ended and copies afresh, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_holding_records_its_leader_lost_copies_the_leader_again() {
    let (_tracker, mut a, b, _) = two_brokers().await;
    let to_a = a.client().await;
    to_a.create_mq("feed", two_copies()).await.unwrap();
    wait_in_sync(&to_a, "feed", 1).await;
    let producer = to_a.producer("feed");
    producer
        .send_batch((0..10).map(|i| Message::new(format!("kept {i}"))))
        .await
        .unwrap();
    let segment = a.store().join("feed").join(format!("{:020}.log", 0));
    let kept_len = std::fs::metadata(&segment).unwrap().len();
    producer
        .send_batch((10..20).map(|i| Message::new(format!("lost {i}"))))
        .await
        .unwrap();
    let to_b = b.client().await;
    let copy_name = format!("feed@{}", a.addr());
    wait_for_async("the follower holds all 20", LIMIT, || async {
        let copy = to_b.query_mq(&copy_name).await.ok()?;
        (copy.next_offset == 20).then_some(())
    })
    .await;

    a.kill9();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(kept_len).unwrap();
    drop(file);
    a.restart();
    let to_a = a.client().await;
    assert_eq!(to_a.query_mq("feed").await.unwrap().next_offset, 10);
    let producer = to_a.producer("feed").with_ack(Ack::Local);
    producer
        .send_batch((10..15).map(|i| Message::new(format!("new {i}"))))
        .await
        .unwrap();

    let leader_dir = a.store().join("feed");
    let copy_dir = copy_dir(&b, &a, "feed");
    wait_for_async("the follower's copy is the leader's again", LIMIT, || {
        let same = matches!(
            (read_segments(&leader_dir), read_segments(&copy_dir)),
            (Ok(leader), Ok(copy)) if leader == copy
        );
        async move { same.then_some(()) }
    })
    .await;
    let copy = to_b.query_mq(&copy_name).await.unwrap();
    assert_eq!(copy.next_offset, 15, "{copy:?}");
}
