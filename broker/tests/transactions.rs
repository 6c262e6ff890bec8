//! Transactions (protocol 4) against the real `qbus-broker` binary: a commit makes every
//! message visible at once, a rollback leaves nothing, decisions are idempotent and never
//! touch another transaction, pending ones survive `kill -9` with their deadlines, one
//! left undecided is rolled back after its checks, and a producer of its group that
//! registered a checker (a restarted one, also across a broker restart) decides it when
//! the broker asks, also when the producer is a process killed with `kill -9` after the
//! half and started again.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use qbus_client::{
    Broker, CheckAnswer, ClientError, Decision, Message, Status, TransactionChecker, TxCheck,
    TxInfo, TxOptions, TxState,
};
use qbus_testkit::process::TxProducerProcess as ProducerProcess;
use support::BrokerProcess;

async fn depth(client: &Broker, mq: &str) -> u64 {
    client.query_mq(mq).await.unwrap().depth()
}

fn status(e: ClientError) -> Status {
    match e {
        ClientError::Server { status, .. } => status,
        other => panic!("expected a broker status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_shows_every_message_at_once_and_a_rollback_leaves_nothing() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    for mq in ["orders", "audit"] {
        client.create_mq(mq, Default::default()).await.unwrap();
    }
    let tx = client.begin(TxOptions::default()).await.unwrap();
    for i in 0..10 {
        tx.send("orders", format!("order {i}")).await.unwrap();
    }
    tx.send_batch("audit", (0..3).map(|i| Message::new(format!("audit {i}"))))
        .await
        .unwrap();
    assert_eq!(depth(&client, "orders").await, 0, "halves are in no MQ");
    let info = tx.info().await.unwrap();
    assert_eq!(info.state, TxState::Pending);
    assert_eq!(info.mqs, [("orders".into(), 10), ("audit".into(), 3)]);

    // A watcher polling in a loop sees 0 or 10, never a part.
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, done) = (broker.client().await, done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                seen.push(depth(&client, "orders").await);
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(tx.commit().await.unwrap(), Decision::Taken);
    assert_eq!(depth(&client, "orders").await, 10);
    assert_eq!(depth(&client, "audit").await, 3);
    done.store(true, Ordering::Relaxed);
    let seen = watcher.await.unwrap();
    assert!(seen.iter().all(|&d| d == 0 || d == 10), "{seen:?}");

    // Idempotent; the other decision is a conflict naming the state.
    assert_eq!(tx.commit().await.unwrap(), Decision::Already);
    let refused = tx.rollback().await.unwrap_err().to_string();
    assert!(
        refused.contains("409") && refused.contains("committed"),
        "{refused}"
    );

    let gone = client.begin(TxOptions::default()).await.unwrap();
    assert!(gone.id() > tx.id());
    gone.send("orders", "never").await.unwrap();
    assert_eq!(gone.rollback().await.unwrap(), Decision::Taken);
    assert_eq!(gone.rollback().await.unwrap(), Decision::Already);
    assert_eq!(status(gone.commit().await.unwrap_err()), Status::Conflict);
    assert_eq!(
        status(gone.send("orders", "late").await.unwrap_err()),
        Status::Conflict
    );
    assert_eq!(depth(&client, "orders").await, 10);

    // Unknown ids and MQs are refused clearly.
    let unknown = client.transaction(u64::MAX - 1).unwrap();
    assert_eq!(
        status(unknown.commit().await.unwrap_err()),
        Status::NotFound
    );
    let open = client.begin(TxOptions::default()).await.unwrap();
    assert_eq!(
        status(open.send("no-such-mq", "x").await.unwrap_err()),
        Status::NotFound
    );
    open.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_commit_of_an_old_transaction_changes_nothing_in_a_new_one() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("orders", Default::default())
        .await
        .unwrap();
    let old = client.begin(TxOptions::default()).await.unwrap();
    old.send("orders", "old").await.unwrap();
    old.commit().await.unwrap();
    let new = client.begin(TxOptions::default()).await.unwrap();
    new.send("orders", "new").await.unwrap();
    // A late retry of the old commit, as from a producer that timed out and retried.
    assert_eq!(old.commit().await.unwrap(), Decision::Already);
    assert_eq!(depth(&client, "orders").await, 1);
    assert_eq!(new.info().await.unwrap().state, TxState::Pending);
    new.rollback().await.unwrap();
    assert_eq!(old.commit().await.unwrap(), Decision::Already);
    assert_eq!(depth(&client, "orders").await, 1);
}

/// Found by `qbus bench txfaults`: a send whose reply was lost to a broker `kill -9`,
/// sent again after the restart with the same dedupe id, was stored twice and committed
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_repeated_with_its_dedupe_id_after_a_restart_is_in_the_transaction_once() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("orders", Default::default())
        .await
        .unwrap();
    let tx = client.begin(TxOptions::default()).await.unwrap();
    let id = tx.id();
    let message = |i: u32| Message::new(format!("order {i}")).with_dedupe_id(format!("order-{i}"));
    tx.send("orders", message(0)).await.unwrap();
    drop((tx, client));
    broker.restart();
    let client = broker.client().await;
    let tx = client.transaction(id).unwrap();
    // The retry of the first send, then one batch repeating it and adding another.
    tx.send("orders", message(0)).await.unwrap();
    tx.send_batch("orders", [message(0), message(1), message(1)])
        .await
        .unwrap();
    assert_eq!(tx.info().await.unwrap().mqs, [("orders".into(), 2)]);
    tx.commit().await.unwrap();
    assert_eq!(depth(&client, "orders").await, 2);

    // A repeat inside the first request that carries an id, with nothing before it.
    let tx = client.begin(TxOptions::default()).await.unwrap();
    tx.send_batch("orders", [message(2), message(2)])
        .await
        .unwrap();
    assert_eq!(tx.info().await.unwrap().mqs, [("orders".into(), 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_dedupe_id_is_checked_against_the_mq_window_and_kept_for_later_sends() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("payments", Default::default())
        .await
        .unwrap();
    let producer = client.producer("payments");
    let message = |id: &str| Message::new(format!("pay {id}")).with_dedupe_id(id);
    assert_eq!(producer.send(message("p1")).await.unwrap().offset, 0);

    // A plain produce stored p1 already: the commit stores only p2.
    let tx = client.begin(TxOptions::default()).await.unwrap();
    tx.send_batch("payments", [message("p1"), message("p2")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(depth(&client, "payments").await, 2);

    // Another transaction repeating p2 stores nothing; one without ids is unaffected.
    let tx = client.begin(TxOptions::default()).await.unwrap();
    tx.send("payments", message("p2")).await.unwrap();
    tx.send("payments", Message::new("no id")).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(depth(&client, "payments").await, 3);

    // The committed p2 kept its id: a plain retry of it gets p2's offset back.
    let retry = producer.send(message("p2")).await.unwrap();
    assert!(retry.duplicate(), "{retry:?}");
    assert_eq!(retry.offsets, [1]);
    let mut audit = client
        .consumer("payments")
        .group("audit")
        .subscribe()
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), audit.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        bodies.push(String::from_utf8(delivery.body.to_vec()).unwrap());
    }
    assert_eq!(bodies, ["pay p1", "pay p2", "no id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_transactions_survive_kill_9_and_commit_exactly_once_after_it() {
    let mut broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("orders", Default::default())
        .await
        .unwrap();
    let options = TxOptions {
        group: Some("billing".into()),
        timeout_ms: Some(600_000),
        ..TxOptions::default()
    };
    let tx = client.begin(options).await.unwrap();
    tx.send_batch("orders", (0..3).map(|i| Message::new(format!("m{i}"))))
        .await
        .unwrap();
    let decided = client.begin(TxOptions::default()).await.unwrap();
    decided.rollback().await.unwrap();
    let id = tx.id();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop((tx, decided, client));

    broker.restart();
    let client = broker.client().await;
    let pending = client.transactions().await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    let info = &pending[0].txn;
    assert_eq!(
        (info.id, info.state, info.group.as_deref()),
        (id, TxState::Pending, Some("billing"))
    );
    assert!(
        info.age_ms >= 100,
        "its age (and deadline) counts from its begin: {info:?}"
    );
    assert_eq!(info.mqs, [("orders".into(), 3)]);
    assert_eq!(depth(&client, "orders").await, 0);
    // Ids are never reused after a restart.
    let next = client.begin(TxOptions::default()).await.unwrap();
    assert!(next.id() > id + 1);
    next.rollback().await.unwrap();

    let tx = client.transaction(id).unwrap();
    assert_eq!(tx.commit().await.unwrap(), Decision::Taken);
    assert_eq!(depth(&client, "orders").await, 3);
    drop(client);
    broker.restart();
    let client = broker.client().await;
    assert_eq!(depth(&client, "orders").await, 3, "applied once");
    let tx = client.transaction(id).unwrap();
    assert_eq!(tx.commit().await.unwrap(), Decision::Already);
    assert_eq!(status(tx.rollback().await.unwrap_err()), Status::Conflict);
    assert!(client.transactions().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecided_transaction_is_rolled_back_after_its_checks() {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    client
        .create_mq("orders", Default::default())
        .await
        .unwrap();
    let options = TxOptions {
        timeout_ms: Some(300),
        check_interval_ms: Some(200),
        max_checks: Some(2),
        ..TxOptions::default()
    };
    // Before the begin: a loaded machine may take long over the requests below, and the
    // deadline runs from the begin.
    let start = std::time::Instant::now();
    let tx = client.begin(options).await.unwrap();
    tx.send("orders", "abandoned").await.unwrap();
    let forever = client
        .begin(TxOptions {
            timeout_ms: Some(600_000),
            ..TxOptions::default()
        })
        .await
        .unwrap();
    let mut last = None;
    for _ in 0..100 {
        let info = tx.info().await.unwrap();
        if info.state != TxState::Pending {
            last = Some(info);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = last.expect("resolved within 5 s");
    assert_eq!((info.state, info.checks), (TxState::RolledBack, 2));
    // Its timeout (300 ms) and two intervals (200 ms each) after it began.
    assert!(
        start.elapsed() >= Duration::from_millis(700),
        "not before its checks"
    );
    assert_eq!(depth(&client, "orders").await, 0);
    assert_eq!(status(tx.commit().await.unwrap_err()), Status::Conflict);
    assert_eq!(forever.info().await.unwrap().state, TxState::Pending);
}

/// Answers `Unknown` to the first `unknown` checks, then `answer`; counts the checks and
/// keeps the last one.
struct Checker {
    unknown: u32,
    answer: CheckAnswer,
    asked: Arc<AtomicU32>,
    last: Arc<std::sync::Mutex<Option<TxCheck>>>,
}

impl Checker {
    fn new(unknown: u32, answer: CheckAnswer) -> Checker {
        Checker {
            unknown,
            answer,
            asked: Arc::default(),
            last: Arc::default(),
        }
    }
}

impl TransactionChecker for Checker {
    async fn check(&self, check: &TxCheck) -> CheckAnswer {
        *self.last.lock().unwrap() = Some(check.clone());
        if self.asked.fetch_add(1, Ordering::SeqCst) < self.unknown {
            CheckAnswer::Unknown
        } else {
            self.answer
        }
    }
}

/// A transaction of group `billing` with two keyed messages, begun by a producer that then
/// went away without deciding it; its id.
async fn abandoned(broker: &BrokerProcess, timeout_ms: u64, max_checks: u32) -> u64 {
    let producer = broker.client().await;
    let options = TxOptions {
        group: Some("billing".into()),
        timeout_ms: Some(timeout_ms),
        check_interval_ms: Some(200),
        max_checks: Some(max_checks),
        ..TxOptions::default()
    };
    let tx = producer.begin(options).await.unwrap();
    tx.send("orders", Message::new("debit").with_key("order-7"))
        .await
        .unwrap();
    tx.send("audit", Message::new("order 7 paid").with_key("order-7"))
        .await
        .unwrap();
    tx.id()
}

/// Transaction `id` once it is decided and, if committed, applied (within 10 s).
async fn decided(client: &Broker, id: u64) -> TxInfo {
    let tx = client.transaction(id).unwrap();
    for _ in 0..200 {
        let info = tx.info().await.unwrap();
        // The listing holds commits until their messages are in their MQs.
        let open = client.transactions().await.unwrap();
        if info.state != TxState::Pending && open.iter().all(|t| t.txn.id != id) {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("transaction {id} still undecided after 10 s");
}

async fn with_orders_and_audit() -> (BrokerProcess, Broker) {
    let broker = BrokerProcess::start(&[]);
    let client = broker.client().await;
    for mq in ["orders", "audit"] {
        client.create_mq(mq, Default::default()).await.unwrap();
    }
    (broker, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_producer_commits_its_predecessors_transaction_when_checked() {
    let (broker, client) = with_orders_and_audit().await;
    let id = abandoned(&broker, 300, 10).await;

    // The restarted producer: its checker does not know at first, then commits.
    let successor = broker.client().await;
    let checker = Checker::new(1, CheckAnswer::Commit);
    let (asked, last) = (checker.asked.clone(), checker.last.clone());
    successor
        .register_checker("billing", checker)
        .await
        .unwrap();
    // A checker of another group is never asked about it.
    let other = Checker::new(0, CheckAnswer::Rollback);
    let other_asked = other.asked.clone();
    successor.register_checker("shipping", other).await.unwrap();

    let info = decided(&client, id).await;
    assert_eq!(info.state, TxState::Committed);
    // (More than 2 only when a loaded machine answers slower than the check interval.)
    assert!(
        asked.load(Ordering::SeqCst) >= 2,
        "asked again after `unknown`"
    );
    assert!(
        (2..10).contains(&info.checks),
        "decided by the checker: {info:?}"
    );
    assert_eq!(other_asked.load(Ordering::SeqCst), 0);
    let check = last.lock().unwrap().clone().unwrap();
    assert_eq!(check.txn.id, id);
    assert_eq!(check.txn.group.as_deref(), Some("billing"));
    assert_eq!(check.txn.mqs, [("orders".into(), 1), ("audit".into(), 1)]);
    let keys: Vec<_> = check
        .messages
        .iter()
        .map(|m| (m.mq.as_str(), m.key.as_deref()))
        .collect();
    assert_eq!(
        keys,
        [("orders", Some("order-7")), ("audit", Some("order-7"))]
    );
    assert_eq!(depth(&client, "orders").await, 1);
    assert_eq!(depth(&client, "audit").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_process_killed_9_after_the_half_resolves_the_check_back_when_restarted() {
    let (broker, client) = with_orders_and_audit().await;
    let mut first = ProducerProcess::start(&broker.addr(), "ledger", "half");
    let id: u64 = first.line("txn ").parse().unwrap();
    first.kill9();
    // Undecided and invisible while no producer of its group is there.
    let tx = client.transaction(id).unwrap();
    assert_eq!(tx.info().await.unwrap().state, TxState::Pending);
    assert_eq!(depth(&client, "orders").await, 0);

    // The same producer group started again: the broker asks it, it commits.
    let restarted = ProducerProcess::start(&broker.addr(), "ledger", "commit");
    restarted.line("ready");
    assert_eq!(restarted.line("checked "), id.to_string());
    let info = decided(&client, id).await;
    assert_eq!(info.state, TxState::Committed);
    assert_eq!(depth(&client, "orders").await, 1);
    assert_eq!(depth(&client, "audit").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_answering_rollback_leaves_nothing() {
    let (broker, client) = with_orders_and_audit().await;
    let successor = broker.client().await;
    let checker = Checker::new(0, CheckAnswer::Rollback);
    let asked = checker.asked.clone();
    successor
        .register_checker("billing", checker)
        .await
        .unwrap();
    let id = abandoned(&broker, 300, 10).await;
    let info = decided(&client, id).await;
    assert_eq!(info.state, TxState::RolledBack);
    assert!(
        (1..10).contains(&info.checks),
        "decided by the checker: {info:?}"
    );
    assert!(asked.load(Ordering::SeqCst) >= 1);
    assert_eq!(depth(&client, "orders").await, 0);
    assert_eq!(depth(&client, "audit").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_registers_again_after_the_broker_restarts() {
    let (mut broker, _) = with_orders_and_audit().await;
    let id = abandoned(&broker, 2_000, 10).await;
    let successor = broker.client().await;
    let checker = Checker::new(0, CheckAnswer::Commit);
    let asked = checker.asked.clone();
    // Registered before the restart: the broker that checks is the restarted one.
    successor
        .register_checker("billing", checker)
        .await
        .unwrap();
    broker.restart();
    let client = broker.client().await;
    let before = client.transaction(id).unwrap().info().await.unwrap();
    assert_eq!(before.state, TxState::Pending, "decided after the restart");
    let info = decided(&client, id).await;
    assert_eq!(info.state, TxState::Committed);
    assert!(asked.load(Ordering::SeqCst) >= 1);
    assert_eq!(depth(&client, "orders").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checker_that_goes_away_is_asked_no_more_and_the_policy_applies() {
    let (broker, client) = with_orders_and_audit().await;
    let id = abandoned(&broker, 300, 3).await;
    let gone = broker.client().await;
    gone.register_checker("billing", Checker::new(u32::MAX, CheckAnswer::Commit))
        .await
        .unwrap();
    drop(gone);
    let info = decided(&client, id).await;
    assert_eq!((info.state, info.checks), (TxState::RolledBack, 3));
    assert_eq!(depth(&client, "orders").await, 0);
}

/// A `TxCheck` is a protocol 4 push: a connection that said protocol 3 cannot register
/// for one (a clear `400`) and is never sent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_3_connection_is_refused_as_a_checker_and_never_checked() {
    use futures_util::StreamExt;
    use qbus_wire::protocol::{Command, Frame, Header};

    let (broker, client) = with_orders_and_audit().await;
    let mut link = support::raw_link(&broker.addr(), 3, "a version 3 client").await;
    let mut ready = Header::request(Command::TxCheckerReady, None);
    ready.id = 2;
    ready.group = Some("billing".into());
    link.tx.send(Frame::new(ready)).await.unwrap();
    let refused = support::reply_to(&mut link, 2).await.header;
    support::assert_needs_protocol(&refused, 4);

    let id = abandoned(&broker, 300, 2).await;
    assert_eq!(decided(&client, id).await.state, TxState::RolledBack);
    // Whatever the link got meanwhile (nothing is expected), none of it is a check.
    while let Ok(Some(frame)) =
        tokio::time::timeout(Duration::from_millis(100), link.rx.next()).await
    {
        assert_ne!(frame.unwrap().header.cmd, Command::TxCheck);
    }
}
