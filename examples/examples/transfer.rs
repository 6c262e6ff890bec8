//! A money transfer that is never half published: debit an account in a local "database"
//! (a file), and publish the transfer to two MQs in one transaction that is committed only
//! once the debit is durable. The producer "crashes" between its debit and its commit (it
//! stops without deciding); the broker restarts; the restarted producer finds its
//! predecessor's open transaction, asks its own database whether the debit happened, and
//! commits it. Consumers see both messages or none, never one without the other.
//!
//! ```text
//! cargo run -p qbus-examples --example transfer
//! ```

use std::path::Path;
use std::time::Duration;

use qbus_broker::{Config, EmbeddedBroker};
use qbus_client::{Broker, MqOptions, TxOptions, TxState};

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

/// What a producer of group `transfers` does at start: decide every open transaction of
/// its group (its predecessor's) by its own database.
async fn resolve_leftovers(broker: &Broker, db: &Path) -> Result<(), Box<dyn std::error::Error>> {
    for tx in broker.transactions().await? {
        if tx.group.as_deref() != Some("transfers") || tx.state != TxState::Pending {
            continue;
        }
        let handle = broker.transaction(tx.id)?;
        if debited(db, tx.id) {
            handle.commit().await?;
            println!(
                "transaction {}: the debit is in the database: committed",
                tx.id
            );
        } else {
            handle.rollback().await?;
            println!(
                "transaction {}: no debit in the database: rolled back",
                tx.id
            );
        }
    }
    Ok(())
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
        timeout_ms: Some(60_000),
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

    // The broker restarts; the open transaction comes back open.
    let embedded = EmbeddedBroker::start(Config::with_store(&store)).await?;
    let broker = embedded.broker();
    resolve_leftovers(&broker, &db).await?;
    let (ledger, notes) = (
        broker.query_mq("ledger").await?.depth(),
        broker.query_mq("notifications").await?.depth(),
    );
    println!("ledger holds {ledger}, notifications {notes}: every transfer, whole");
    assert_eq!((ledger, notes), (2, 2));
    assert!(broker.transactions().await?.is_empty());
    drop(broker);
    tokio::time::timeout(Duration::from_secs(10), embedded.shutdown()).await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
