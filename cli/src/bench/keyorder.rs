//! `qbus bench keyorder`: a key-ordered group against a plain one, and the order check.
//!
//! Fills two MQs of the running broker (`--broker`) with the same COUNT messages over KEYS
//! keys, one plain and one `ordered_by_key`, then drains each with CONSUMERS consumer
//! processes (`qbus bench keyorder-consume`, each on its own connection) of one group. Every
//! consumer appends what it handled to one shared log (`O_APPEND`, one write per fetch, before
//! it acks), so the log's order is the order in which the group handed messages out. With
//! `--kill-consumers N` the ordered run SIGKILLs a consumer N times, evenly over the run, and
//! starts a new one in its place.
//!
//! The check, per key of the ordered MQ: messages come in log order, the next one never before
//! the previous one was handled, a message again only when it was the last one handed out (a
//! redelivery after a kill), none missing. It fails otherwise. It prints a summary and one line:
//! `RESULT system=qbus scenario=keyorder count=.. keys=.. consumers=.. plain_msgs_per_s=..
//! ordered_msgs_per_s=.. kills=.. redelivered=.. order_violations=..`.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_client::{Broker, Delivery, Message, MqOptions};
use qbus_wire::now_ms;

use super::cluster::child_command;
use super::consume::ACK_WINDOW;
use crate::error::CliError;
use crate::tls::TlsArgs;

#[derive(Debug, Args)]
pub struct KeyOrderBench {
    /// Messages per MQ
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Distinct keys, message i has key i mod KEYS
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Consumer processes of the group
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    consumers: u32,
    /// Most messages per fetch
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// SIGKILL a consumer of the ordered run this many times (a new one takes its place)
    #[arg(long, default_value_t = 0, value_name = "N")]
    kill_consumers: u32,
    /// Skip the plain group's run
    #[arg(long)]
    ordered_only: bool,
}

/// `qbus bench keyorder-consume`: one consumer of the benchmark (started by it).
#[derive(Debug, Args)]
pub struct KeyOrderConsume {
    #[arg(long)]
    mq: String,
    #[arg(long)]
    group: String,
    #[arg(long)]
    log: PathBuf,
    #[arg(long)]
    batch: u32,
}

/// One handled message in the shared log: key, sequence number within the key, attempt.
const ENTRY: usize = 20;

/// How long a run may go without any progress before it is called stuck (past the ack
/// timeout a killed consumer's deliveries need at worst, see [`ACK_TIMEOUT_MS`]).
const STALL: Duration = Duration::from_secs(30);

/// The MQs' ack timeout: a killed consumer's connection closes at once and its deliveries
/// come back then, so this only bounds the odd case of a close the broker never sees.
const ACK_TIMEOUT_MS: u64 = 5_000;

pub(super) async fn run(
    broker: &Broker,
    address: &str,
    tls: &TlsArgs,
    args: KeyOrderBench,
) -> Result<(), CliError> {
    if args.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    let tag = format!("{}-{}", std::process::id(), now_ms());
    let runs: &[bool] = if args.ordered_only {
        &[true]
    } else {
        &[false, true]
    };
    let (mut plain, mut ordered) = (None, None);
    for &is_ordered in runs {
        let mq = format!(
            "keyorder-{}-{tag}",
            if is_ordered { "ordered" } else { "plain" }
        );
        let options = MqOptions {
            ordered_by_key: is_ordered.then_some(true),
            ack_timeout_ms: Some(ACK_TIMEOUT_MS),
            ..MqOptions::default()
        };
        broker.create_mq(&mq, options).await?;
        fill(broker, &mq, &args).await?;
        let kills = if is_ordered { args.kill_consumers } else { 0 };
        let outcome = drain(address, tls, &mq, &args, is_ordered, kills).await;
        broker.remove_mq(&mq).await?;
        let outcome = outcome?;
        println!(
            "keyorder: {} group, {} messages over {} keys, {} consumers: {:.3} s, {:.0} msgs/s, \
             {} redelivered, {} kills, {} order violations",
            if is_ordered { "ordered" } else { "plain" },
            args.count,
            args.keys,
            args.consumers,
            outcome.elapsed.as_secs_f64(),
            outcome.rate,
            outcome.check.redelivered,
            outcome.kills,
            outcome.check.violations
        );
        if is_ordered {
            ordered = Some(outcome);
        } else {
            plain = Some(outcome);
        }
    }
    let ordered = ordered.ok_or_else(|| CliError::Failed("no ordered run".into()))?;
    println!(
        "RESULT system=qbus scenario=keyorder count={} keys={} consumers={} plain_msgs_per_s={:.0} \
         ordered_msgs_per_s={:.0} kills={} redelivered={} order_violations={}",
        args.count,
        args.keys,
        args.consumers,
        plain.map_or(0.0, |p| p.rate),
        ordered.rate,
        ordered.kills,
        ordered.check.redelivered,
        ordered.check.violations
    );
    if ordered.check.violations > 0 {
        return Err(CliError::Failed(format!(
            "key order broken {} times; first: {}",
            ordered.check.violations,
            ordered.check.first_violation.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Message `i`: key `k{i mod keys}`, body the key's number and `i / keys` (its sequence
/// number within the key), both little-endian u64.
async fn fill(broker: &Broker, mq: &str, args: &KeyOrderBench) -> Result<(), CliError> {
    let producer = broker.producer(mq);
    let mut pending = std::collections::VecDeque::new();
    for i in 0..args.count {
        let (key, seq) = (i % args.keys, i / args.keys);
        let mut body = BytesMut::with_capacity(16);
        body.put_u64_le(key);
        body.put_u64_le(seq);
        let message = Message::new(body.freeze()).with_key(format!("k{key}"));
        pending.push_back(producer.send_async(message).await?);
        if pending.len() >= 8192 {
            if let Some(receipt) = pending.pop_front() {
                receipt.await?;
            }
        }
    }
    for receipt in pending {
        receipt.await?;
    }
    Ok(())
}

struct Outcome {
    elapsed: Duration,
    rate: f64,
    kills: u32,
    check: Check,
}

/// Runs the consumer processes until every message is in the log, killing `kills` of them
/// on the way, and checks the log.
async fn drain(
    address: &str,
    tls: &TlsArgs,
    mq: &str,
    args: &KeyOrderBench,
    ordered: bool,
    kills: u32,
) -> Result<Outcome, CliError> {
    let dir = std::env::temp_dir().join(format!("qbus-keyorder-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join(format!("{mq}.log"));
    std::fs::File::create(&log)?;
    let spawn = || -> Result<Consumer, CliError> {
        let exe = std::env::current_exe()?;
        let child = child_command(&exe)
            .args(["--broker", address])
            .args(tls.child_args())
            .args([
                "bench",
                "keyorder-consume",
                "--mq",
                mq,
                "--group",
                "keyorder",
            ])
            .arg("--log")
            .arg(&log)
            .args(["--batch", &args.batch.to_string()])
            .env("QBUS_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Consumer(child))
    };
    let mut consumers = (0..args.consumers)
        .map(|_| spawn())
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let mut check = Check::new(ordered, args.keys, args.count);
    let mut reader = LogReader::open(&log)?;
    let (mut killed, mut last_progress, mut last_handled) = (0u32, Instant::now(), 0u64);
    while check.handled < args.count {
        tokio::time::sleep(Duration::from_millis(5)).await;
        reader.read_into(&mut check)?;
        if check.handled != last_handled {
            (last_handled, last_progress) = (check.handled, Instant::now());
        }
        if last_progress.elapsed() > STALL {
            return Err(CliError::Failed(format!(
                "no progress for {STALL:?}: {} of {} messages handled",
                check.handled, args.count
            )));
        }
        let due = args.count * u64::from(killed + 1) / u64::from(kills + 1);
        if killed < kills && check.handled >= due {
            let victim = killed as usize % consumers.len();
            consumers[victim] = spawn()?; // the old one is killed as it is dropped
            killed += 1;
        }
        if let Some(status) = consumers
            .iter_mut()
            .find_map(|c| c.0.try_wait().ok().flatten())
        {
            return Err(CliError::Failed(format!(
                "a consumer process ended ({status}) with {} of {} messages handled",
                check.handled, args.count
            )));
        }
    }
    let elapsed = started.elapsed();
    drop(consumers);
    reader.read_into(&mut check)?;
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_dir(&dir);
    Ok(Outcome {
        elapsed,
        rate: args.count as f64 / elapsed.as_secs_f64().max(1e-9),
        kills: killed,
        check,
    })
}

/// A consumer process, SIGKILLed when dropped.
struct Consumer(Child);

impl Drop for Consumer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads the whole entries appended to the log since the last read.
struct LogReader {
    file: std::fs::File,
    partial: Vec<u8>,
}

impl LogReader {
    fn open(path: &Path) -> Result<LogReader, CliError> {
        Ok(LogReader {
            file: std::fs::File::open(path)?,
            partial: Vec::new(),
        })
    }

    fn read_into(&mut self, check: &mut Check) -> Result<(), CliError> {
        self.file.read_to_end(&mut self.partial)?;
        let whole = self.partial.len() / ENTRY * ENTRY;
        for entry in self.partial[..whole].chunks_exact(ENTRY) {
            let word = |at: usize| {
                let mut le = [0u8; 8];
                le.copy_from_slice(&entry[at..at + 8]);
                u64::from_le_bytes(le)
            };
            check.see(word(0), word(8));
        }
        self.partial.drain(..whole);
        Ok(())
    }
}

/// Which messages the log holds (once or more) and, for an ordered group, per key the
/// sequence number expected next and what came out of order.
struct Check {
    ordered: bool,
    keys: u64,
    seen: Vec<u64>,
    next: Vec<u64>,
    handled: u64,
    redelivered: u64,
    violations: u64,
    first_violation: Option<String>,
}

impl Check {
    fn new(ordered: bool, keys: u64, count: u64) -> Check {
        Check {
            ordered,
            keys,
            seen: vec![0; count.div_ceil(64) as usize],
            next: vec![0; keys as usize],
            handled: 0,
            redelivered: 0,
            violations: 0,
            first_violation: None,
        }
    }

    /// Takes the log's next entry: key `key`'s message `seq`.
    fn see(&mut self, key: u64, seq: u64) {
        let index = seq * self.keys + key;
        let (Some(word), Some(next)) = (
            self.seen.get_mut((index / 64) as usize),
            self.next.get_mut(key as usize),
        ) else {
            self.violation(format!(
                "a message the benchmark did not send: key {key}, {seq}"
            ));
            return;
        };
        let bit = 1u64 << (index % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.handled += 1;
        } else {
            self.redelivered += 1;
        }
        if !self.ordered {
            return;
        }
        if seq == *next {
            *next += 1;
        } else if seq > *next {
            let what = format!("key {key}: message {seq} handed out before message {next}");
            self.violation(what);
        } else if seq + 1 != *next {
            let what = format!("key {key}: message {seq} again after message {}", *next - 1);
            self.violation(what);
        }
    }

    fn violation(&mut self, what: String) {
        self.violations += 1;
        self.first_violation.get_or_insert(what);
    }
}

/// `qbus bench keyorder-consume`: consumes until killed; each fetch's messages go into the
/// log in one append, then are acked.
pub(super) async fn consume(broker: &Broker, args: KeyOrderConsume) -> Result<(), CliError> {
    let mut log = OpenOptions::new().append(true).open(&args.log)?;
    let mut consumer = broker
        .consumer(&args.mq)
        .group(args.group)
        .batch(args.batch)
        .subscribe()
        .await?;
    let mut acks = FuturesUnordered::new();
    let mut unacked = 0usize;
    let mut entries = Vec::new();
    loop {
        tokio::select! {
            biased;
            Some(ack) = acks.next(), if !acks.is_empty() => {
                unacked -= ack?;
            }
            batch = consumer.recv_batch(args.batch as usize), if unacked < ACK_WINDOW => {
                let batch = batch?;
                if batch.is_empty() {
                    return Ok(());
                }
                entries.clear();
                for delivery in &batch {
                    let body = delivery.body.get(..16).ok_or_else(|| {
                        CliError::Failed(format!("message {} is not the benchmark's", delivery.offset))
                    })?;
                    entries.extend_from_slice(body);
                    entries.extend_from_slice(&delivery.attempt.to_le_bytes());
                }
                // One small append per fetch, before the ack that lets the next of a key go:
                // a bench-only cost, the same in both runs.
                log.write_all(&entries)?;
                unacked += batch.len();
                acks.push(async move { Delivery::ack_all(&batch).await.map(|()| batch.len()) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Check;

    #[test]
    fn the_check_allows_a_redelivery_of_the_last_and_nothing_else_out_of_order() {
        let mut check = Check::new(true, 2, 6);
        for (key, seq) in [(0, 0), (1, 0), (0, 1), (0, 1), (1, 1), (0, 2), (1, 2)] {
            check.see(key, seq);
        }
        assert_eq!(
            (check.handled, check.redelivered, check.violations),
            (6, 1, 0)
        );

        let mut plain = Check::new(false, 1, 3);
        for seq in [2, 0, 1] {
            plain.see(0, seq);
        }
        assert_eq!((plain.handled, plain.violations), (3, 0));

        let mut skipped = Check::new(true, 1, 3);
        for seq in [0, 2, 1] {
            skipped.see(0, seq);
        }
        assert_eq!((skipped.handled, skipped.violations), (3, 1));
        assert!(skipped
            .first_violation
            .unwrap()
            .contains("before message 1"));
    }
}
