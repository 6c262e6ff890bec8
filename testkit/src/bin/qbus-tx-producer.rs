//! A transactional producer as a process of its own, for tests that kill it with `kill -9`
//! in the middle of a transaction and start it again.
//!
//! ```text
//! qbus-tx-producer ADDR GROUP half     begins a transaction of GROUP (timeout 300 ms,
//!                                      checked every 200 ms), sends one message to
//!                                      `orders` and one to `audit`, prints `txn ID`, then
//!                                      waits, undecided, until killed
//! qbus-tx-producer ADDR GROUP commit   answers the checks of GROUP with commit, printing
//!                                      `ready` once registered and `checked ID` per check
//! ```

use std::io::Write;
use std::time::Duration;

use qbus_client::{Broker, CheckAnswer, Message, TransactionChecker, TxCheck, TxOptions};

struct Commit;

impl TransactionChecker for Commit {
    async fn check(&self, check: &TxCheck) -> CheckAnswer {
        say(&format!("checked {}", check.txn.id));
        CheckAnswer::Commit
    }
}

/// One line on standard output, flushed at once (the test reads it through a pipe).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, group, mode] = args.as_slice() else {
        return Err("usage: qbus-tx-producer ADDR GROUP half|commit".into());
    };
    let broker = Broker::connect(addr).await?;
    match mode.as_str() {
        "half" => {
            let options = TxOptions {
                group: Some(group.clone()),
                timeout_ms: Some(300),
                check_interval_ms: Some(200),
                max_checks: Some(50),
                ..TxOptions::default()
            };
            let tx = broker.begin(options).await?;
            tx.send("orders", Message::new("debit").with_key("order-7"))
                .await?;
            tx.send("audit", Message::new("order 7 paid").with_key("order-7"))
                .await?;
            say(&format!("txn {}", tx.id()));
        }
        "commit" => {
            broker.register_checker(group, Commit).await?;
            say("ready");
        }
        other => return Err(format!("unknown mode {other:?}: half or commit").into()),
    }
    // Until killed: the half stays undecided, the checker keeps answering.
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
