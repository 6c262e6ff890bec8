//! `qbus tx ...`: list a broker's open transactions, and commit or roll back one by id
//! (say, one whose producer crashed).

use clap::Subcommand;
use qbus_client::{Broker, BrokerTx, Decision, Transaction};

use crate::error::CliError;
use crate::output::table;

#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// List the open transactions (and commits not yet applied): broker, id, group, state,
    /// age, checks and messages per MQ (over `tracker://`, those of every live broker)
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Commit a transaction: its messages become visible
    Commit {
        /// Transaction id (from `qbus tx list`)
        id: u64,
        /// The broker it is on (`HOST:PORT`, what `Transaction::broker()` returned):
        /// needed with `--broker tracker://...`, where ids are unique per broker only
        #[arg(long, value_name = "HOST:PORT")]
        on: Option<String>,
    },
    /// Roll back a transaction: its messages are discarded
    Rollback {
        /// Transaction id (from `qbus tx list`)
        id: u64,
        /// The broker it is on (`HOST:PORT`, what `Transaction::broker()` returned):
        /// needed with `--broker tracker://...`, where ids are unique per broker only
        #[arg(long, value_name = "HOST:PORT")]
        on: Option<String>,
    },
}

pub async fn run(broker: &Broker, cmd: TxCommand) -> Result<(), CliError> {
    match cmd {
        TxCommand::List { json } => {
            let list = broker.transactions().await?;
            if json {
                let text = serde_json::to_string_pretty(&list)
                    .map_err(|e| CliError::Failed(format!("encoding JSON: {e}")))?;
                println!("{text}");
            } else {
                print!("{}", render(&list));
            }
        }
        TxCommand::Commit { id, on } => {
            let decision = attach(broker, id, on.as_deref())?.commit().await?;
            println!("transaction {id} {}", said(decision, "committed"));
        }
        TxCommand::Rollback { id, on } => {
            let decision = attach(broker, id, on.as_deref())?.rollback().await?;
            println!("transaction {id} {}", said(decision, "rolled back"));
        }
    }
    Ok(())
}

/// Transaction `id`, of the broker `on` when given.
fn attach(broker: &Broker, id: u64, on: Option<&str>) -> Result<Transaction, CliError> {
    Ok(match on {
        Some(on) => broker.transaction_on(on, id)?,
        None => broker.transaction(id)?,
    })
}

fn said(decision: Decision, what: &str) -> String {
    match decision {
        Decision::Taken => what.to_owned(),
        Decision::Already => format!("was already {what}"),
    }
}

fn render(list: &[BrokerTx]) -> String {
    let mut rows = vec![[
        "BROKER", "ID", "GROUP", "STATE", "AGE", "CHECKS", "MESSAGES",
    ]
    .map(str::to_owned)
    .to_vec()];
    for BrokerTx { broker, txn: tx } in list {
        let messages: Vec<String> = tx.mqs.iter().map(|(mq, n)| format!("{mq}:{n}")).collect();
        rows.push(vec![
            broker.clone(),
            tx.id.to_string(),
            tx.group.clone().unwrap_or_else(|| "-".into()),
            tx.state.to_string(),
            format!("{:.1}s", tx.age_ms as f64 / 1000.0),
            tx.checks.to_string(),
            messages.join(" "),
        ]);
    }
    table(&rows)
}
