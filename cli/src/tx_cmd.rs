//! `qbus tx ...`: list a broker's open transactions, and commit or roll back one by id
//! (say, one whose producer crashed).

use clap::Subcommand;
use qbus_client::{Broker, Decision, TxInfo};

use crate::error::CliError;
use crate::output::table;

#[derive(Debug, Subcommand)]
pub enum TxCommand {
    /// List the open transactions (and commits not yet applied): id, group, state, age,
    /// checks and messages per MQ
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Commit a transaction: its messages become visible
    Commit {
        /// Transaction id (from `qbus tx list`)
        id: u64,
    },
    /// Roll back a transaction: its messages are discarded
    Rollback {
        /// Transaction id (from `qbus tx list`)
        id: u64,
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
        TxCommand::Commit { id } => {
            let decision = broker.transaction(id)?.commit().await?;
            println!("transaction {id} {}", said(decision, "committed"));
        }
        TxCommand::Rollback { id } => {
            let decision = broker.transaction(id)?.rollback().await?;
            println!("transaction {id} {}", said(decision, "rolled back"));
        }
    }
    Ok(())
}

fn said(decision: Decision, what: &str) -> String {
    match decision {
        Decision::Taken => what.to_owned(),
        Decision::Already => format!("was already {what}"),
    }
}

fn render(list: &[TxInfo]) -> String {
    let mut rows = vec![["ID", "GROUP", "STATE", "AGE", "CHECKS", "MESSAGES"]
        .map(str::to_owned)
        .to_vec()];
    for tx in list {
        let messages: Vec<String> = tx.mqs.iter().map(|(mq, n)| format!("{mq}:{n}")).collect();
        rows.push(vec![
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
