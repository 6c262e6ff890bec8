//! `qbus bench txfaults`: transactions through faults, black box (issue 13's check). Starts
//! one `qbus-broker` on loopback (temp store) with three MQs, and `--producers`
//! transactional producers, each a process of its own (`qbus bench tx-producer`, see
//! `tx_producer.rs`) with its own producer group, checker and record of what it decided.
//! Each runs transactions of 1 to 10 messages over the three MQs, each committed, rolled
//! back or abandoned at a random point (the producer says so and this kills it with
//! `kill -9`, then starts it again: its checker answers the broker's checks of its
//! predecessor's transactions from the record). Meanwhile the broker is killed with
//! `kill -9` `--broker-kills` times, each time restarted after `--outage` seconds, and one
//! consumer group reads each MQ throughout.
//!
//! After `--duration` seconds the producers finish the transaction they are in; once the
//! broker lists no open transaction the consumers read until they have every message that
//! should be visible (or nothing new came for `--drain` seconds). What should be visible
//! is every message of every transaction whose record says `commit` (also those abandoned
//! after the commit was recorded but before it was sent: the check-back commits them), and
//! nothing else. It fails unless: every such message was delivered; no message of another
//! transaction was (rolled back, abandoned and rolled back, or never recorded); so every
//! transaction was all or nothing; no message (dedupe id) is stored at two offsets; no
//! transaction is left open; the broker was killed as often as asked.
//!
//! One machine-readable line: `RESULT system=qbus scenario=txfaults transactions=..
//! committed=.. rolled_back=.. abandoned=.. abandoned_committed=.. overridden=..
//! producer_kills=.. broker_kills=.. expected=.. delivered=.. redelivered=.. missing=..
//! partial=.. unwanted=.. duplicates=.. left_open=..`.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::StreamExt;
use qbus_client::{Broker, MqOptions};
use tokio::sync::mpsc;

use super::args::secs;
use super::cluster::{child_command, Cluster, ClusterArgs, Shape, WAIT};
use super::tx_producer::{Decided, Record};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct TxFaultsBench {
    /// Seconds the producers start new transactions
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    duration: f64,
    /// Times the broker is killed (`kill -9`), evenly spread over the duration
    #[arg(long, default_value_t = 3)]
    broker_kills: u32,
    /// Seconds the killed broker stays down
    #[arg(long, default_value_t = 1.0, value_name = "SECS")]
    outage: f64,
    /// Producer processes, each with its own producer group
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    producers: u32,
    /// Per cent of transactions abandoned
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(0..=100))]
    abandon_percent: u64,
    /// Transaction timeout before the first check, ms
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Time between checks, ms
    #[arg(long, default_value_t = 200)]
    check_interval_ms: u64,
    /// Checks before the broker rolls back
    #[arg(long, default_value_t = 20)]
    max_checks: u32,
    /// Most seconds the consumers read on without a new message at the end
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    drain: f64,
    /// Seed of the producers' random choices
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    cluster: ClusterArgs,
}

const MQS: [&str; 3] = ["txf-a", "txf-b", "txf-c"];
const GROUP: &str = "txfaults";
/// The one broker.
const BROKER: usize = 0;

pub async fn run(args: TxFaultsBench) -> Result<(), CliError> {
    let duration = secs("--duration", args.duration)?;
    let outage = secs("--outage", args.outage)?;
    let drain = secs("--drain", args.drain)?;
    let shape = Shape {
        name: "txfaults",
        trackers: 0,
        brokers: 1,
        report_interval: "1s",
    };
    let mut cluster = Cluster::start(&args.cluster, shape).await?;
    let records = cluster.dir().join("records");
    std::fs::create_dir_all(&records)?;
    let mut producers = Producers {
        args: &args,
        broker: cluster.addr(BROKER),
        records,
        running: Vec::new(),
        kills: 0,
    };
    let outcome = measure(&args, duration, outage, drain, &mut cluster, &mut producers).await;
    producers.stop();
    cluster.stop();
    outcome
}

/// The producer processes, by index.
struct Producers<'a> {
    args: &'a TxFaultsBench,
    broker: String,
    records: PathBuf,
    /// Each one's process and its standard input (closed to have it finish).
    running: Vec<(Child, Option<ChildStdin>)>,
    /// Producers killed (each abandoning a transaction).
    kills: u64,
}

impl Producers<'_> {
    fn record(&self, p: u32) -> PathBuf {
        self.records.join(format!("producer-{p}"))
    }

    /// Starts producer `p`, its output lines going to `lines`; `finish`: with its standard
    /// input closed at once (it finishes what it is in, then idles).
    fn spawn(
        &self,
        p: u32,
        lines: &mpsc::Sender<(u32, String)>,
        finish: bool,
    ) -> Result<(Child, Option<ChildStdin>), CliError> {
        let args = self.args;
        let mut command = child_command(&std::env::current_exe()?);
        command
            .args(["--broker", &self.broker, "bench", "tx-producer"])
            .args(["--index", &p.to_string(), "--mqs", &MQS.join(",")])
            .arg("--record")
            .arg(self.record(p))
            .args(["--seed", &args.seed.to_string()])
            .args(["--abandon-percent", &args.abandon_percent.to_string()])
            .args(["--timeout-ms", &args.timeout_ms.to_string()])
            .args(["--check-interval-ms", &args.check_interval_ms.to_string()])
            .args(["--max-checks", &args.max_checks.to_string()])
            .env("QBUS_LOG", "error")
            .stdin(if finish {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped());
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| CliError::Failed("a producer without its standard output".into()))?;
        let lines = lines.clone();
        // A thread of its own: the pipe is read with blocking reads.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.blocking_send((p, line)).is_err() {
                    break;
                }
            }
        });
        Ok((child, stdin))
    }

    /// Kills producer `p` (`kill -9`) and starts it again.
    fn kill_and_restart(
        &mut self,
        p: u32,
        lines: &mpsc::Sender<(u32, String)>,
        finish: bool,
    ) -> Result<(), CliError> {
        let (child, _) = &mut self.running[p as usize];
        child.kill()?;
        child.wait()?;
        self.kills += 1;
        self.running[p as usize] = self.spawn(p, lines, finish)?;
        Ok(())
    }

    /// Closes every producer's standard input: each finishes its transaction and idles.
    fn finish(&mut self) {
        for (_, stdin) in &mut self.running {
            stdin.take();
        }
    }

    fn stop(&mut self) {
        for (child, _) in &mut self.running {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.running.clear();
    }
}

/// One delivered message: producer, transaction number, index in it.
type MessageId = (u32, u64, u32);

/// What the consumers saw.
#[derive(Default)]
struct Seen {
    /// Per message, the distinct places (MQ, offset) it was delivered from.
    places: HashMap<MessageId, HashSet<(usize, u64)>>,
    delivered: u64,
    /// Deliveries of a place delivered before (after a broker restart).
    redelivered: u64,
    /// Bodies that are not `P:N:I:COUNT`.
    unreadable: u64,
}

async fn measure(
    args: &TxFaultsBench,
    duration: Duration,
    outage: Duration,
    drain: Duration,
    cluster: &mut Cluster,
    producers: &mut Producers<'_>,
) -> Result<(), CliError> {
    let addr = cluster.addr(BROKER);
    let admin = Broker::connect(&addr).await?;
    for mq in MQS {
        admin.create_mq(mq, MqOptions::default()).await?;
    }
    println!(
        "txfaults: 1 broker, MQs {MQS:?}; {} producers for {duration:?}, {}% abandoned; broker killed {} times, {outage:?} each",
        args.producers, args.abandon_percent, args.broker_kills
    );
    let (lines_to, mut lines) = mpsc::channel(1024);
    for p in 0..args.producers {
        let started = producers.spawn(p, &lines_to, false)?;
        producers.running.push(started);
    }
    let mut ready = HashSet::new();
    let waiting = Instant::now();
    while ready.len() < args.producers as usize {
        let line = tokio::time::timeout(WAIT.saturating_sub(waiting.elapsed()), lines.recv())
            .await
            .map_err(|_| {
                CliError::Failed("the producers did not all register their checkers".into())
            })?;
        match line {
            Some((p, line)) if line == "ready" => {
                ready.insert(p);
            }
            Some(_) => {}
            None => return Err(CliError::Failed("the producers' output closed".into())),
        }
    }

    let seen = Arc::new(Mutex::new(Seen::default()));
    let consuming = Arc::new(AtomicBool::new(true));
    let mut consumers = Vec::new();
    for (m, mq) in MQS.iter().enumerate() {
        consumers.push(tokio::spawn(consume(
            Broker::connect(&addr).await?,
            mq,
            m,
            seen.clone(),
            consuming.clone(),
        )));
    }

    let started = Instant::now();
    let kills_at: Vec<Duration> = (1..=args.broker_kills)
        .map(|k| duration.mul_f64(f64::from(k) / f64::from(args.broker_kills + 1)))
        .collect();
    let mut broker_kills = 0usize;
    let mut abandoned: Vec<(u32, u64, String)> = Vec::new();
    let mut idle = HashSet::new();
    let mut finishing = false;
    // The producers' last transactions may wait out a broker restart and their retries.
    let finish_limit = duration + Duration::from_secs(60);
    loop {
        if finishing && idle.len() == args.producers as usize && broker_kills == kills_at.len() {
            break;
        }
        if started.elapsed() > finish_limit {
            return Err(CliError::Failed(format!(
                "the producers did not finish within {finish_limit:?} ({} of {} idle)",
                idle.len(),
                args.producers
            )));
        }
        let next_kill = kills_at.get(broker_kills).map(|at| started + *at);
        tokio::select! {
            line = lines.recv() => {
                let Some((p, line)) = line else {
                    return Err(CliError::Failed("the producers' output closed".into()));
                };
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("abandon") => {
                        let n = words.next().and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
                        abandoned.push((p, n, words.next().unwrap_or("").to_owned()));
                        producers.kill_and_restart(p, &lines_to, finishing)?;
                    }
                    Some("idle") => {
                        idle.insert(p);
                    }
                    _ => {}
                }
            }
            () = sleep_until(next_kill) => {
                cluster.kill(BROKER)?;
                broker_kills += 1;
                println!("  {:.1?}: broker killed ({broker_kills} of {})", started.elapsed(), kills_at.len());
                tokio::time::sleep(outage).await;
                cluster.restart(BROKER).await?;
                println!("  {:.1?}: broker restarted", started.elapsed());
            }
            () = tokio::time::sleep(duration.saturating_sub(started.elapsed())), if !finishing => {
                finishing = true;
                producers.finish();
                println!("  {:.1?}: producers finishing", started.elapsed());
            }
        }
    }

    // The abandoned transactions are decided by their checks (or the policy).
    let settle = Duration::from_millis(
        args.timeout_ms + args.check_interval_ms * u64::from(args.max_checks + 2),
    ) + Duration::from_secs(10);
    let settling = Instant::now();
    let left_open = loop {
        let open = match admin.transactions().await {
            Ok(list) => list.len(),
            Err(e) if e.is_transport() => usize::MAX,
            Err(e) => return Err(e.into()),
        };
        if open == 0 || settling.elapsed() > settle {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "  {:.1?}: {left_open} transactions open on the broker",
        started.elapsed()
    );
    producers.stop();

    let mut expected: HashMap<(u32, u64), u32> = HashMap::new();
    let mut fates = HashMap::new();
    for p in 0..args.producers {
        let record = Record::read(&producers.record(p))?;
        for (n, fate) in record.fates {
            if fate.decided == Some(Decided::Commit) && !fate.overridden {
                expected.insert((p, n), fate.count);
            }
            fates.insert((p, n), fate);
        }
    }
    let expected_messages: u64 = expected.values().map(|&c| u64::from(c)).sum();
    // Read until every expected message came, or nothing new came for `drain`.
    let mut last = (0, Instant::now());
    loop {
        let (have, delivered) = {
            let seen = lock(&seen);
            let have = expected
                .iter()
                .flat_map(|(&(p, n), &c)| (0..c).map(move |i| (p, n, i)))
                .filter(|id| seen.places.contains_key(id))
                .count() as u64;
            (have, seen.delivered)
        };
        if have == expected_messages {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() > drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A short look for anything that should not come, after the last expected one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    consuming.store(false, Ordering::Relaxed);
    for consumer in consumers {
        consumer
            .await
            .map_err(|e| CliError::Failed(format!("consumer: {e}")))??;
    }

    let seen = lock(&seen);
    let verdict = Verdict::of(&expected, &seen);
    let committed = expected.len();
    let overridden = fates.values().filter(|f| f.overridden).count();
    let rolled_back = fates.len() - committed;
    let abandoned_committed = abandoned
        .iter()
        .filter(|(p, n, _)| expected.contains_key(&(*p, *n)))
        .count();
    println!(
        "  {} transactions: {committed} committed ({abandoned_committed} of them abandoned after the decision), \
         {rolled_back} rolled back or never decided ({overridden} commits too late); {} abandoned, {} producer kills",
        fates.len(),
        abandoned.len(),
        producers.kills
    );
    println!(
        "  {expected_messages} messages expected, {} delivered ({} again from the same offset): \
         {} missing, {} partial transactions, {} unwanted messages, {} duplicates, {} unreadable",
        seen.delivered,
        seen.redelivered,
        verdict.missing,
        verdict.partial,
        verdict.unwanted,
        verdict.duplicates,
        seen.unreadable
    );
    println!(
        "RESULT system=qbus scenario=txfaults transactions={} committed={committed} rolled_back={rolled_back} \
         abandoned={} abandoned_committed={abandoned_committed} overridden={overridden} producer_kills={} \
         broker_kills={broker_kills} expected={expected_messages} delivered={} redelivered={} missing={} \
         partial={} unwanted={} duplicates={} left_open={left_open}",
        fates.len(),
        abandoned.len(),
        producers.kills,
        seen.delivered,
        seen.redelivered,
        verdict.missing,
        verdict.partial,
        verdict.unwanted,
        verdict.duplicates
    );
    let mut wrong = verdict.wrongs;
    if seen.unreadable > 0 {
        wrong.push(format!(
            "{} messages had unreadable bodies",
            seen.unreadable
        ));
    }
    if left_open > 0 {
        wrong.push(format!(
            "{left_open} transactions still open {settle:?} after the producers finished"
        ));
    }
    if broker_kills != kills_at.len() {
        wrong.push(format!(
            "the broker was killed {broker_kills} times, not {}",
            kills_at.len()
        ));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(wrong.join("; ")))
    }
}

/// Sleeps until `at`, or for ever when there is none.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the consumers saw, against what the records say they should.
#[derive(Debug, Default)]
struct Verdict {
    /// Messages of committed transactions never delivered.
    missing: u64,
    /// Transactions of which some messages were delivered and some not.
    partial: u64,
    /// Messages delivered of transactions not committed.
    unwanted: u64,
    /// Stored copies beyond the first of a message (one dedupe id at several offsets).
    duplicates: u64,
    /// Each kind of failure found, in words (with a few examples).
    wrongs: Vec<String>,
}

impl Verdict {
    /// `expected`: the message count of each committed transaction.
    fn of(expected: &HashMap<(u32, u64), u32>, seen: &Seen) -> Verdict {
        let mut verdict = Verdict::default();
        let mut per_txn: HashMap<(u32, u64), u32> = HashMap::new();
        let (mut unwanted, mut duplicated) = (Vec::new(), Vec::new());
        for (&(p, n, i), places) in &seen.places {
            *per_txn.entry((p, n)).or_default() += 1;
            if places.len() > 1 {
                verdict.duplicates += places.len() as u64 - 1;
                duplicated.push(format!("{p}:{n}:{i} at {places:?}"));
            }
            if expected.get(&(p, n)).is_none_or(|&c| i >= c) {
                verdict.unwanted += 1;
                unwanted.push(format!("{p}:{n}:{i}"));
            }
        }
        let mut partial = Vec::new();
        for (&(p, n), &count) in expected {
            let have = per_txn.get(&(p, n)).copied().unwrap_or(0).min(count);
            verdict.missing += u64::from(count - have);
            if have > 0 && have < count {
                verdict.partial += 1;
                partial.push(format!("{p}:{n} ({have} of {count})"));
            }
        }
        let examples = |list: &mut Vec<String>| {
            list.sort();
            list.truncate(5);
            list.join(", ")
        };
        if verdict.missing > 0 {
            verdict.wrongs.push(format!(
                "{} messages of committed transactions were never delivered",
                verdict.missing
            ));
        }
        if verdict.partial > 0 {
            verdict.wrongs.push(format!(
                "{} committed transactions were delivered in part (e.g. {})",
                verdict.partial,
                examples(&mut partial)
            ));
        }
        if verdict.unwanted > 0 {
            verdict.wrongs.push(format!(
                "{} messages of transactions not committed were delivered (e.g. {})",
                verdict.unwanted,
                examples(&mut unwanted)
            ));
        }
        if verdict.duplicates > 0 {
            verdict.wrongs.push(format!(
                "{} messages were stored more than once (e.g. {})",
                verdict.duplicates,
                examples(&mut duplicated)
            ));
        }
        verdict
    }
}

/// Consumer group [`GROUP`] on `mq` (the `m`th): records every delivery while `consuming`,
/// subscribing again whenever the broker went away.
async fn consume(
    client: Broker,
    mq: &str,
    m: usize,
    seen: Arc<Mutex<Seen>>,
    consuming: Arc<AtomicBool>,
) -> Result<(), CliError> {
    while consuming.load(Ordering::Relaxed) {
        let subscribed = client
            .consumer(mq)
            .group(GROUP)
            .batch(256)
            .auto_ack(true)
            .subscribe()
            .await;
        let mut consumer = match subscribed {
            Ok(consumer) => consumer,
            Err(e) if e.is_transport() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        while consuming.load(Ordering::Relaxed) {
            let next = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await;
            let delivery = match next {
                Ok(Some(Ok(delivery))) => delivery,
                Ok(Some(Err(_)) | None) => break,
                Err(_) => continue,
            };
            let mut seen = lock(&seen);
            seen.delivered += 1;
            let Some(id) = message_id(&delivery.body) else {
                seen.unreadable += 1;
                continue;
            };
            if !seen
                .places
                .entry(id)
                .or_default()
                .insert((m, delivery.offset))
            {
                seen.redelivered += 1;
            }
        }
    }
    Ok(())
}

/// `(producer, transaction, index)` from a body `P:N:I:COUNT`.
fn message_id(body: &[u8]) -> Option<MessageId> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.split(':');
    let p = parts.next()?.parse().ok()?;
    let n = parts.next()?.parse().ok()?;
    let i = parts.next()?.parse().ok()?;
    Some((p, n, i))
}
