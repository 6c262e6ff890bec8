//! Transactions over `tracker://`: pinned to one broker, never failed over; a checker
//! registered over `tracker://` answers the checks of every broker, also of one that joins
//! later or restarts, and a broker that joins and refuses it is listed in its status.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::time::Duration;

use qbus_client::ha::HaOptions;
use qbus_client::protocol::Credentials;
use qbus_client::{ClientError, ConnectionOptions, MqOptions, TxOptions, TxState};
use qbus_testkit::process::TxProducerProcess;
use support::{broker, tracker, tracker_url, wait_for_async, wait_for_brokers, BrokerProcess};

const LIMIT: Duration = Duration::from_secs(20);

/// The depth of `mq` on the broker at `addr` alone.
async fn depth_on(addr: &str, mq: &str) -> u64 {
    let one = qbus_client::Broker::connect(addr).await.unwrap();
    one.query_mq(mq).await.unwrap().depth()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_a_tracker_commits_atomically_on_the_one_broker_it_is_pinned_to() {
    let t = tracker();
    let (b1, b2) = (broker(&[&t]), broker(&[&t]));
    let both = [b1.addr(), b2.addr()];
    let client = qbus_client::Broker::connect(&tracker_url(&[&t]))
        .await
        .unwrap();
    wait_for_brokers(&client, None, &both, LIMIT).await;
    for mq in ["orders", "audit"] {
        client.create_mq(mq, MqOptions::default()).await.unwrap();
        wait_for_brokers(&client, Some(mq), &both, LIMIT).await;
    }
    // Several transactions, with and without a group: each lives on one broker.
    for (round, group) in [None, Some("shop"), None, Some("billing")]
        .into_iter()
        .enumerate()
    {
        let options = TxOptions {
            group: group.map(str::to_owned),
            ..TxOptions::default()
        };
        let tx = client.begin(options).await.unwrap();
        let pinned = tx.broker();
        assert!(both.contains(&pinned), "{pinned} is not one of {both:?}");
        let other = both.iter().find(|a| **a != pinned).unwrap();
        let before = (
            depth_on(&pinned, "orders").await,
            depth_on(&pinned, "audit").await,
        );
        for i in 0..3 {
            tx.send("orders", format!("order {round}.{i}"))
                .await
                .unwrap();
        }
        tx.send("audit", format!("audit {round}")).await.unwrap();
        assert_eq!(
            depth_on(&pinned, "orders").await,
            before.0,
            "invisible until commit"
        );
        tx.commit().await.unwrap();
        // A repeated decision goes to the same broker and is harmless there.
        assert_eq!(tx.commit().await.unwrap(), qbus_client::Decision::Already);
        assert_eq!(depth_on(&pinned, "orders").await, before.0 + 3);
        assert_eq!(depth_on(&pinned, "audit").await, before.1 + 1);
        let info = tx.info().await.unwrap();
        assert_eq!(info.id, tx.id());
        // Nothing of it anywhere else: the other broker holds only other rounds' messages.
        let elsewhere = depth_on(other, "orders").await + depth_on(&pinned, "orders").await;
        assert_eq!(elsewhere, 3 * (round as u64 + 1), "round {round}");
    }
    // A group's transactions meet on one broker while the topology holds still.
    let shop = TxOptions {
        group: Some("shop".into()),
        ..TxOptions::default()
    };
    let first = client.begin(shop.clone()).await.unwrap();
    let second = client.begin(shop).await.unwrap();
    assert_eq!(first.broker(), second.broker());
    first.rollback().await.unwrap();
    // By id over tracker://: only with its broker, since ids are unique per broker.
    match client.transaction(second.id()) {
        Err(ClientError::TxNeedsBroker { txn, reason }) => {
            assert_eq!(txn, second.id());
            assert!(reason.contains("transaction_on"), "{reason}");
        }
        other => panic!("expected TxNeedsBroker, got {other:?}"),
    }
    let by_id = client
        .transaction_on(&second.broker(), second.id())
        .unwrap();
    assert_eq!(by_id.broker(), second.broker());
    assert_eq!(
        by_id.rollback().await.unwrap(),
        qbus_client::Decision::Taken
    );
    assert_eq!(
        second.rollback().await.unwrap(),
        qbus_client::Decision::Already
    );
    match client.transaction_on("127.0.0.1:1", second.id()) {
        Err(ClientError::TxBrokerLost { broker, .. }) => assert_eq!(broker, "127.0.0.1:1"),
        other => panic!("expected TxBrokerLost, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_transaction_fails_typed_when_its_broker_dies_and_commits_there_after_it_returns()
{
    let t = tracker();
    let mut brokers = [broker(&[&t]), broker(&[&t])];
    let both: Vec<String> = brokers.iter().map(|b| b.addr()).collect();
    let options = HaOptions::default().with_connection(ConnectionOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(2),
        ..ConnectionOptions::default()
    });
    let client = qbus_client::Broker::connect_ha(&tracker_url(&[&t]), options)
        .await
        .unwrap();
    wait_for_brokers(&client, None, &both, LIMIT).await;
    client
        .create_mq("orders", MqOptions::default())
        .await
        .unwrap();
    wait_for_brokers(&client, Some("orders"), &both, LIMIT).await;

    let tx = client.begin(TxOptions::default()).await.unwrap();
    tx.send("orders", "debit").await.unwrap();
    let pinned = brokers
        .iter_mut()
        .find(|b| b.addr() == tx.broker())
        .unwrap();
    pinned.kill9();
    // Its later requests fail, typed, and are not sent to the other broker.
    let refused = tokio::time::timeout(LIMIT, tx.send("orders", "credit"))
        .await
        .unwrap();
    match refused {
        Err(ClientError::TxBrokerLost { txn, broker, .. }) => {
            assert_eq!((txn, broker), (tx.id(), tx.broker()));
        }
        other => panic!("expected TxBrokerLost, got {other:?}"),
    }
    let other = both.iter().find(|a| **a != tx.broker()).unwrap();
    assert_eq!(depth_on(other, "orders").await, 0);

    // Back (same store, same port): the pending transaction is there, and a decision
    // retried goes to it.
    pinned.restart();
    let committed = support::wait_for_async("the retried commit", LIMIT, || async {
        tx.commit().await.ok()
    })
    .await;
    assert_eq!(committed, qbus_client::Decision::Taken);
    assert_eq!(depth_on(&tx.broker(), "orders").await, 1);
    assert_eq!(depth_on(other, "orders").await, 0);
}

/// A transaction of group `ledger` left undecided on `broker` (its producer, a process
/// connected to that broker alone, killed with `kill -9` after the half): its id there.
fn abandoned_on(broker: &BrokerProcess) -> u64 {
    let mut producer = TxProducerProcess::start(&broker.addr(), "ledger", "half");
    let id = producer.line("txn ").parse().unwrap();
    producer.kill9();
    id
}

/// Waits until transaction `id` of the broker at `addr` is committed and applied; then
/// `orders` and `audit` hold `depth` messages there.
async fn committed_on(addr: &str, id: u64, depth: u64) {
    let one = qbus_client::Broker::connect(addr).await.unwrap();
    let tx = one.transaction(id).unwrap();
    support::wait_for_async(
        &format!("transaction {id} on {addr} committed"),
        LIMIT,
        || async {
            let state = tx.info().await.ok()?.state;
            assert_ne!(state, TxState::RolledBack, "transaction {id} on {addr}");
            let applied = one
                .transactions()
                .await
                .ok()?
                .iter()
                .all(|t| t.txn.id != id);
            (state == TxState::Committed && applied).then_some(())
        },
    )
    .await;
    assert_eq!(depth_on(addr, "orders").await, depth);
    assert_eq!(depth_on(addr, "audit").await, depth);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_over_a_tracker_answers_every_broker_also_one_that_joins_later_or_restarts() {
    let t = tracker();
    let mut first = [broker(&[&t]), broker(&[&t])];
    let client = qbus_client::Broker::connect(&tracker_url(&[&t]))
        .await
        .unwrap();
    let create = |brokers: Vec<String>| {
        let client = client.clone();
        async move {
            wait_for_brokers(&client, None, &brokers, LIMIT).await;
            for mq in ["orders", "audit"] {
                client.create_mq(mq, MqOptions::default()).await.unwrap();
                wait_for_brokers(&client, Some(mq), &brokers, LIMIT).await;
            }
        }
    };
    create(first.iter().map(|b| b.addr()).collect()).await;

    // One producer process of the group, over tracker://, answering every check with commit.
    let checker = TxProducerProcess::start(&tracker_url(&[&t]), "ledger", "commit");
    checker.line("ready");
    // A transaction left undecided on each broker: each is checked there and committed.
    for b in &first {
        let id = abandoned_on(b);
        committed_on(&b.addr(), id, 1).await;
    }

    // A broker that starts after the registration is checked too.
    let late = broker(&[&t]);
    let mut all: Vec<String> = first.iter().map(|b| b.addr()).collect();
    all.push(late.addr());
    create(all).await;
    let id = abandoned_on(&late);
    committed_on(&late.addr(), id, 1).await;

    // And one that restarts (kill -9, same store and port) while the checker lives.
    first[0].kill9();
    first[0].restart();
    let id = abandoned_on(&first[0]);
    committed_on(&first[0].addr(), id, 2).await;
    drop(checker);
}

/// Answers every check with "unknown"; only its registration matters here.
struct Undecided;

impl qbus_client::TransactionChecker for Undecided {
    async fn check(&self, _check: &qbus_client::TxCheck) -> qbus_client::CheckAnswer {
        qbus_client::CheckAnswer::Unknown
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_joins_and_refuses_the_checker_is_listed_in_its_status() {
    let t = tracker();
    let open = broker(&[&t]);
    // The late broker lets this user read, not produce, so it refuses a checker.
    let users = tempfile::NamedTempFile::new().unwrap();
    let secret = qbus_server_kit::auth::hash_secret("r-pw").unwrap();
    std::fs::write(
        users.path(),
        format!("[[users]]\nname = \"reader\"\nsecret = \"{secret}\"\nallow = [\"read *\"]\n"),
    )
    .unwrap();
    let options = HaOptions::default().with_connection(ConnectionOptions {
        credentials: Some(Credentials::password("reader", "r-pw")),
        ..ConnectionOptions::default()
    });
    let client = qbus_client::Broker::connect_ha(&tracker_url(&[&t]), options)
        .await
        .unwrap();
    wait_for_brokers(&client, None, &[open.addr()], LIMIT).await;
    let status = client.register_checker("ledger", Undecided).await.unwrap();
    assert_eq!(status.refusals(), []);

    let interval = format!("{}ms", support::REPORT_INTERVAL.as_millis());
    let config = users.path().to_str().unwrap();
    let strict = BrokerProcess::start(&[
        "--tracker",
        &t.addr(),
        "--report-interval",
        &interval,
        "--config",
        config,
    ]);
    let refusals = wait_for_async("the joining broker's refusal", LIMIT, || {
        let refusals = status.refusals();
        async move { (!refusals.is_empty()).then_some(refusals) }
    })
    .await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(refusals[0].0, strict.addr());
    assert!(refusals[0].1.contains("403"), "{refusals:?}");
    // The open broker still has the checker: nothing about it is listed.
    assert!(refusals.iter().all(|(addr, _)| *addr != open.addr()));
}
