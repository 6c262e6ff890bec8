//! `qbus bench tx-producer` (hidden): one transactional producer of `qbus bench txfaults`,
//! a process of its own so that the scenario can `kill -9` it in the middle of a
//! transaction and start it again.
//!
//! It runs transactions of 1 to 10 messages over the scenario's MQs, each fated at random
//! to be committed, rolled back or abandoned, and writes what it decides to its record (a
//! file, each line synced before the decision is sent): that record is its "local
//! database", from which its checker answers the broker's checks, also for the
//! transactions of the incarnation before it, and from which the scenario computes what
//! the consumers must see. Until its standard input closes it starts new transactions;
//! then it finishes the one it is in, prints `idle` and goes on answering checks until
//! killed.
//!
//! The record's lines: `intent N COUNT`, `begun N TXN`, `commit N`, `rollback N`, and
//! `overridden N` when a commit found the transaction rolled back by the broker's policy.
//!
//! Lines on standard output: `ready` (checker registered), `abandon N STAGE` (transaction
//! `N` is abandoned at `STAGE`: the scenario kills it now), `idle`.
//!
//! Each message has key `P:N`, dedupe id `txf:P:N:I` and body `P:N:I:COUNT`. A send that
//! fails on the connection (the broker was killed) is sent again with the same dedupe id
//! once the broker is back, so each message is in its transaction once.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use qbus_client::protocol::Status;
use qbus_client::{
    Broker, CheckAnswer, ClientError, Message, Transaction, TransactionChecker, TxCheck, TxOptions,
};
use tokio::io::AsyncReadExt;

use crate::error::CliError;

#[derive(Debug, Args)]
pub struct TxProducer {
    /// This producer's number (its producer group is `txf-P`)
    #[arg(long)]
    pub index: u32,
    /// Its record of what it decided (created if missing, appended to)
    #[arg(long, value_name = "FILE")]
    pub record: PathBuf,
    /// The MQs its transactions send to, comma-separated
    #[arg(long, value_delimiter = ',', required = true)]
    pub mqs: Vec<String>,
    /// Seed of its random choices (an incarnation adds its first transaction number)
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Per cent of transactions abandoned (the rest are committed 2 to 1 over rolled back)
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=100))]
    pub abandon_percent: u64,
    /// Transaction timeout before the first check, ms
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Time between checks, ms
    #[arg(long, default_value_t = 200)]
    pub check_interval_ms: u64,
    /// Checks before the broker rolls back
    #[arg(long, default_value_t = 20)]
    pub max_checks: u32,
}

/// How long a request is retried while the broker is unreachable (it is killed and
/// restarted by the scenario, each time for about a second).
const RETRY_FOR: Duration = Duration::from_secs(30);
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// The dedupe id of message `i` of transaction `n` of producer `p`.
pub fn dedupe_id(p: u32, n: u64, i: u32) -> String {
    format!("txf:{p}:{n}:{i}")
}

/// What the record says of one transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fate {
    /// Its messages.
    pub count: u32,
    /// The broker's id for it, once its begin was answered.
    pub txn: Option<u64>,
    /// What the producer decided (and then sent, unless it was killed first).
    pub decided: Option<Decided>,
    /// The commit found it rolled back (the broker's policy was faster).
    pub overridden: bool,
}

/// A decision of the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    Commit,
    Rollback,
}

/// A producer's record, as the scenario and the producer's next incarnation read it.
#[derive(Debug, Default)]
pub struct Record {
    /// Per transaction number (every one begun, or about to be).
    pub fates: HashMap<u64, Fate>,
}

impl Record {
    /// Reads the record at `path` (empty if there is none). A line that does not parse
    /// (none should: each is one `write`) is skipped.
    pub fn read(path: &Path) -> std::io::Result<Record> {
        let mut record = Record::default();
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(record),
            Err(e) => return Err(e),
        };
        for line in BufReader::new(file).lines() {
            let line = line?;
            let mut words = line.split_whitespace();
            let (Some(what), Some(Ok(n))) = (words.next(), words.next().map(str::parse)) else {
                continue;
            };
            let fate = record.fates.entry(n).or_default();
            match what {
                "intent" => fate.count = words.next().and_then(|c| c.parse().ok()).unwrap_or(0),
                "begun" => fate.txn = words.next().and_then(|t| t.parse().ok()),
                "commit" => fate.decided = Some(Decided::Commit),
                "rollback" => fate.decided = Some(Decided::Rollback),
                "overridden" => fate.overridden = true,
                _ => {}
            }
        }
        Ok(record)
    }

    /// The number of the next transaction.
    fn next(&self) -> u64 {
        self.fates.keys().max().map_or(0, |n| n + 1)
    }
}

/// The record file, written line by line, each synced, and what it holds.
struct Journal {
    file: Arc<Mutex<File>>,
    record: Arc<Mutex<Record>>,
}

impl Journal {
    /// Appends `line` about transaction `n`, synced, then applies `change` to the record.
    async fn note(
        &self,
        line: String,
        n: u64,
        change: impl FnOnce(&mut Fate),
    ) -> Result<(), CliError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
            file.write_all(format!("{line}\n").as_bytes())?;
            file.sync_data()
        })
        .await
        .map_err(|e| CliError::Failed(format!("writing the record: {e}")))??;
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        change(record.fates.entry(n).or_default());
        Ok(())
    }
}

/// Answers checks from the record: what was decided; for a transaction this incarnation is
/// still working on, unknown; for an undecided one of an incarnation before (abandoned),
/// roll back when its number is even and unknown when odd (so that the broker's policy
/// rolls it back after the checks).
#[derive(Clone)]
struct FromRecord {
    producer: u32,
    record: Arc<Mutex<Record>>,
    /// The transaction this incarnation is in, if any (`u64::MAX`: none).
    current: Arc<AtomicU64>,
}

impl TransactionChecker for FromRecord {
    async fn check(&self, check: &TxCheck) -> CheckAnswer {
        let record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let by_key = check
            .messages
            .first()
            .and_then(|m| m.key.as_deref())
            .and_then(|key| key.strip_prefix(&format!("{}:", self.producer)))
            .and_then(|n| n.parse::<u64>().ok());
        let by_id = || {
            record
                .fates
                .iter()
                .find(|(_, f)| f.txn == Some(check.txn.id))
                .map(|(n, _)| *n)
        };
        // Begun without a record of it (killed before it was written): nothing of it was
        // decided, nothing is lost by rolling back.
        let Some(n) = by_key.or_else(by_id) else {
            return CheckAnswer::Rollback;
        };
        match record.fates.get(&n).and_then(|f| f.decided) {
            Some(Decided::Commit) => CheckAnswer::Commit,
            Some(Decided::Rollback) => CheckAnswer::Rollback,
            None if self.current.load(Ordering::Relaxed) == n => CheckAnswer::Unknown,
            None if n % 2 == 0 => CheckAnswer::Rollback,
            None => CheckAnswer::Unknown,
        }
    }
}

/// Where a transaction is abandoned.
#[derive(Debug, Clone, Copy)]
enum Stage {
    /// After this many of its sends.
    Sends(u32),
    /// After its commit was recorded, before it was sent: the check-back must commit it.
    Committed,
    /// After its rollback was recorded, before it was sent.
    RolledBack,
}

/// The plan of one transaction.
struct Plan {
    /// The MQ of each message.
    mqs: Vec<usize>,
    decision: Decided,
    abandon: Option<Stage>,
}

/// A small deterministic generator (SplitMix64): the plans need no more.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }

    fn plan(&mut self, mqs: usize, abandon_percent: u64) -> Plan {
        let count = 1 + self.below(10) as usize;
        let mqs = (0..count)
            .map(|_| self.below(mqs as u64) as usize)
            .collect();
        let decision = if self.below(3) < 2 {
            Decided::Commit
        } else {
            Decided::Rollback
        };
        let abandon = (self.below(100) < abandon_percent).then(|| match self.below(3) {
            0 => Stage::Sends(self.below(count as u64 + 1) as u32),
            1 => Stage::Committed,
            _ => Stage::RolledBack,
        });
        Plan {
            mqs,
            decision,
            abandon,
        }
    }
}

/// One line on standard output, flushed at once (the scenario reads it through a pipe).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Runs `attempt` until it succeeds or fails other than on the connection, for up to
/// [`RETRY_FOR`].
async fn retrying<T, F, Fut>(mut attempt: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Err(e) if e.is_transport() && start.elapsed() < RETRY_FOR => {
                tokio::time::sleep(RETRY_EVERY).await;
            }
            done => return done,
        }
    }
}

pub async fn run(args: TxProducer, broker: &str) -> Result<(), CliError> {
    let record = Record::read(&args.record)?;
    let first = record.next();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.record)?;
    let journal = Journal {
        file: Arc::new(Mutex::new(file)),
        record: Arc::new(Mutex::new(record)),
    };
    let current = Arc::new(AtomicU64::new(u64::MAX));
    let group = format!("txf-{}", args.index);
    // The broker may be down (killed by the scenario) when this starts.
    let client = retrying(|| Broker::connect(broker)).await?;
    let checker = FromRecord {
        producer: args.index,
        record: journal.record.clone(),
        current: current.clone(),
    };
    retrying(|| client.register_checker(&group, checker.clone())).await?;
    say("ready");

    let stopping = Arc::new(AtomicBool::new(false));
    tokio::spawn({
        let stopping = stopping.clone();
        async move {
            let mut sink = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
            stopping.store(true, Ordering::Relaxed);
        }
    });
    let mut dice = Dice(args.seed.wrapping_mul(1_000_003).wrapping_add(first));
    let options = TxOptions {
        group: Some(group),
        timeout_ms: Some(args.timeout_ms),
        check_interval_ms: Some(args.check_interval_ms),
        max_checks: Some(args.max_checks),
        ..TxOptions::default()
    };
    let mut n = first;
    while !stopping.load(Ordering::Relaxed) {
        let plan = dice.plan(args.mqs.len(), args.abandon_percent);
        current.store(n, Ordering::Relaxed);
        one(&args, &client, &journal, &options, n, &plan).await?;
        current.store(u64::MAX, Ordering::Relaxed);
        n += 1;
    }
    say("idle");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Abandons transaction `n` at `stage` when the plan says so: says so and waits for the
/// scenario's `kill -9`.
async fn abandon_at(plan: &Plan, stage: impl Fn(&Stage) -> bool, n: u64) {
    let Some(at) = plan.abandon.filter(|s| stage(s)) else {
        return;
    };
    say(&format!("abandon {n} {at:?}"));
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Transaction `n` from begin to its decision (or its abandonment).
async fn one(
    args: &TxProducer,
    client: &Broker,
    journal: &Journal,
    options: &TxOptions,
    n: u64,
    plan: &Plan,
) -> Result<(), CliError> {
    let p = args.index;
    let count = plan.mqs.len() as u32;
    journal
        .note(format!("intent {n} {count}"), n, |f| f.count = count)
        .await?;
    let tx: Transaction = retrying(|| client.begin(options.clone())).await?;
    let id = tx.id();
    journal
        .note(format!("begun {n} {id}"), n, |f| f.txn = Some(id))
        .await?;
    let mut decision = plan.decision;
    for (i, &mq) in plan.mqs.iter().enumerate() {
        let i = i as u32;
        abandon_at(plan, |s| matches!(s, Stage::Sends(k) if *k == i), n).await;
        let message = || {
            Message::new(format!("{p}:{n}:{i}:{count}"))
                .with_key(format!("{p}:{n}"))
                .with_dedupe_id(dedupe_id(p, n, i))
        };
        if let Err(e) = retrying(|| tx.send(&args.mqs[mq], message())).await {
            // The broker decided it meanwhile (its checks ran out while it was down), or
            // it is unreachable for long: nothing to commit.
            tracing::info!(txn = id, error = %e, "a send failed; rolling back");
            decision = Decided::Rollback;
            break;
        }
    }
    abandon_at(plan, |s| matches!(s, Stage::Sends(k) if *k == count), n).await;
    match decision {
        Decided::Commit => {
            journal
                .note(format!("commit {n}"), n, |f| {
                    f.decided = Some(Decided::Commit)
                })
                .await?;
            abandon_at(plan, |s| matches!(s, Stage::Committed), n).await;
            match retrying(|| tx.commit()).await {
                Ok(_) => {}
                Err(e) if e.status() == Some(Status::Conflict) => {
                    journal
                        .note(format!("overridden {n}"), n, |f| f.overridden = true)
                        .await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Decided::Rollback => {
            journal
                .note(format!("rollback {n}"), n, |f| {
                    f.decided = Some(Decided::Rollback)
                })
                .await?;
            abandon_at(plan, |s| matches!(s, Stage::RolledBack), n).await;
            // A transaction the broker no longer knows or rolled back itself is as good.
            match retrying(|| tx.rollback()).await {
                Ok(_) => {}
                Err(e) if !e.is_transport() => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
