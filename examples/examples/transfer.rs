//! A money transfer that is never half published: debit an account in a local "database"
//! (a file), and publish the transfer to two MQs in one transaction that is committed only
//! once the debit is durable. The producer "crashes" between its debit and its commit (it
//! stops without deciding); the broker restarts; the restarted producer registers a
//! checker for its producer group, and when the predecessor's transaction times out the
//! broker asks it: it looks in its own database whether the debit happened and answers
//! commit. Consumers see both messages or none, never one without the other.
//!
//! ```text
//! cargo run -p qbus-examples --example transfer
//! ```

use std::path::Path;
use std::time::Duration;

use qbus_broker::{Config, EmbeddedBroker};
use qbus_client::{CheckAnswer, MqOptions, TransactionChecker, TxCheck, TxOptions, TxState};

/// The producer's local database: one line `txn <id> debited <amount>` per debit.
fn debited(db: &Path, txn: u64) -> bool {
    std::fs::read_to_string(db)
        .unwrap_or_default()
        .lines()
        .any(|line| line.starts_with(&format!("txn {txn} ")))
}

fn debit(db: &Path, txn: u64, amount: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(db)?;
    writeln!(file, "txn {txn} debited {amount}")?;
    // The debit must be durable before the transfer may be published.
    file.sync_all()
}

/// How a producer of group `transfers` answers the broker's checks of its group's
/// undecided transactions (its predecessor's): by its own database.
struct Ledger {
    db: std::path::PathBuf,
}

impl TransactionChecker for Ledger {
    async fn check(&self, check: &TxCheck) -> CheckAnswer {
        let id = check.txn.id;
        if debited(&self.db, id) {
            println!("transaction {id}: the broker asked; the debit is in the database: commit");
            CheckAnswer::Commit
        } else {
            println!("transaction {id}: the broker asked; no debit in the database: roll back");
            CheckAnswer::Rollback
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("qbus-transfer-{}", std::process::id()));
    let (store, db) = (dir.join("store"), dir.join("accounts.db"));
    std::fs::create_dir_all(&dir)?;
    let embedded = EmbeddedBroker::start(Config::with_store(&store)).await?;
    let broker = embedded.broker();
    for mq in ["ledger", "notifications"] {
        broker.create_mq(mq, MqOptions::default()).await?;
    }

    // The first producer: a whole transfer, then one it never decides.
    let options = TxOptions {
        group: Some("transfers".into()),
        // Short for the demo (the default is 6 s, as RocketMQ's).
        timeout_ms: Some(1_000),
        check_interval_ms: Some(500),
        ..TxOptions::default()
    };
    let whole = broker.begin(options.clone()).await?;
    whole.send("ledger", "alice -> bob: 30").await?;
    whole
        .send("notifications", "bob, you got 30 from alice")
        .await?;
    debit(&db, whole.id(), 30)?;
    whole.commit().await?;
    println!("transaction {}: debited and committed", whole.id());

    let tx = broker.begin(options).await?;
    let abandoned = tx.id();
    tx.send("ledger", "alice -> carol: 20").await?;
    tx.send("notifications", "carol, you got 20 from alice")
        .await?;
    debit(&db, tx.id(), 20)?;
    println!(
        "transaction {}: debited, then the producer crashed",
        tx.id()
    );
    let info = broker.query_mq("ledger").await?;
    println!(
        "ledger holds {} message(s): the open transaction's is invisible",
        info.depth()
    );
    // Every handle shares the embedded broker: let go of them, so the store is free.
    drop((whole, tx, broker));
    embedded.shutdown().await;

    // The broker restarts; the open transaction comes back open. The restarted producer
    // registers its checker and the broker asks it once the timeout has passed.
    let embedded = EmbeddedBroker::start(Config::with_store(&store)).await?;
    let broker = embedded.broker();
    broker
        .register_checker("transfers", Ledger { db: db.clone() })
        .await?;
    let pending = broker.transaction(abandoned)?;
    for _ in 0..100 {
        if pending.info().await?.state != TxState::Pending {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ledger, notes) = (
        broker.query_mq("ledger").await?.depth(),
        broker.query_mq("notifications").await?.depth(),
    );
    println!("ledger holds {ledger}, notifications {notes}: every transfer, whole");
    assert_eq!((ledger, notes), (2, 2));
    assert!(broker.transactions().await?.is_empty());
    drop((pending, broker));
    tokio::time::timeout(Duration::from_secs(10), embedded.shutdown()).await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
