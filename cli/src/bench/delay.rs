//! `qbus bench delay`: delayed delivery at scale. Starts its own `qbus-broker` (loopback, temp
//! store), schedules COUNT messages due from DELAY after the start, spread evenly over
//! SPREAD, and consumes them with one group as they come due.
//!
//! Reports the produce rate, the broker's resident memory (from `/proc/<pid>/status`)
//! before and with every message pending, and each message's lateness (the time of its
//! first delivery minus the due time it carries in its body). With `--kill-restarts N` the
//! broker is killed with SIGKILL N times while the messages come due, and restarted at once
//! on its store: every message must still come, none early (it fails otherwise). It prints
//! a summary and one line: `RESULT system=qbus scenario=delay size=.. count=.. window=..
//! msgs_per_s=.. rss_idle_kb=.. rss_pending_kb=.. late_p50_ms=.. late_p99_ms=..
//! late_max_ms=.. early=.. kills=.. redelivered=..`.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use clap::Args;
use qbus_client::{Broker, Delivery, Message, MqOptions};

use super::cluster::{child_command, free_port, listening, spawn};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct DelayBench {
    /// Delayed messages to schedule
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Milliseconds from the start until the first message is due
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    delay_ms: u64,
    /// Milliseconds over which the due times are spread evenly
    #[arg(long, default_value_t = 5_000, value_name = "MS")]
    spread_ms: u64,
    /// Payload bytes per message (at least 16: the due time and the message's number)
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(16..))]
    size: u64,
    /// Sends awaiting confirmation at once
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Only schedule and measure memory, without waiting for the messages to come due (for
    /// delays of days)
    #[arg(long)]
    schedule_only: bool,
    /// Kill the broker (SIGKILL) this many times, evenly over the due times, restarting it
    /// at once on the same store
    #[arg(long, default_value_t = 0, value_name = "N")]
    kill_restarts: u32,
    /// Directory holding qbus-broker [default: the one holding qbus]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

const MQ: &str = "delay-bench";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A broker child process on a temp store, killed and removed on drop.
struct BrokerChild {
    child: Child,
    dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
}

impl BrokerChild {
    fn start(bin_dir: &Path, dir: PathBuf, port: u16) -> Result<BrokerChild, CliError> {
        let child = spawn(broker_command(bin_dir, &dir, port), "qbus-broker", bin_dir)?;
        Ok(BrokerChild {
            child,
            dir,
            port,
            bin_dir: bin_dir.to_owned(),
        })
    }

    /// SIGKILL, then a new broker on the same port and store, listening.
    async fn kill_and_restart(&mut self) -> Result<(), CliError> {
        self.child.kill()?;
        self.child.wait()?;
        let command = broker_command(&self.bin_dir, &self.dir, self.port);
        self.child = spawn(command, "qbus-broker", &self.bin_dir)?;
        listening(self.port).await
    }
}

fn broker_command(bin_dir: &Path, dir: &Path, port: u16) -> Command {
    let mut command = child_command(&bin_dir.join("qbus-broker"));
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--store")
        .arg(dir.join("store"));
    command
}

impl Drop for BrokerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The broker's resident set size in kB (`VmRSS`).
fn rss_kb(pid: u32) -> Result<u64, CliError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| CliError::Failed(format!("no VmRSS in /proc/{pid}/status")))
}

pub async fn run(args: DelayBench) -> Result<(), CliError> {
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| CliError::Usage("cannot tell where qbus lives; use --bin-dir".into()))?,
    };
    let dir = std::env::temp_dir().join(format!("qbus-bench-delay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut broker = BrokerChild::start(&bin_dir, dir, free_port()?)?;
    listening(broker.port).await?;
    let pid = broker.child.id();
    let client = Broker::connect(&format!("127.0.0.1:{}", broker.port)).await?;
    client.create_mq(MQ, MqOptions::default()).await?;
    let rss_idle = rss_kb(pid)?;

    // Subscribed first, so deliveries are timed from the moment they come due.
    let consumer = client
        .consumer(MQ)
        .group("bench")
        .batch(1024)
        .subscribe()
        .await?;
    let count = args.count;
    let receiving = (!args.schedule_only).then(|| tokio::spawn(receive(consumer, count)));

    let start_ms = now_ms();
    let first_due = start_ms + args.delay_ms;
    let producer = client.producer(MQ);
    let started = Instant::now();
    let mut window = VecDeque::new();
    for i in 0..count {
        let due = first_due + i * args.spread_ms / count.max(1);
        let mut body = BytesMut::with_capacity(args.size as usize);
        body.put_u64(due);
        body.put_u64(i);
        body.resize(args.size as usize, b'x');
        let message = Message::new(body.freeze()).with_deliver_at(due);
        window.push_back(producer.send_async(message).await?.into_future());
        if window.len() >= args.in_flight as usize {
            if let Some(receipt) = window.pop_front() {
                receipt.await?;
            }
        }
    }
    while let Some(receipt) = window.pop_front() {
        receipt.await?;
    }
    let produce_time = started.elapsed();
    let last_sent = now_ms();
    // The timer indexes behind the log: give it the moment it needs to count them all.
    let mut pending = 0;
    for _ in 0..200 {
        pending = client.query_mq(MQ).await?.delayed;
        if pending + (now_ms().saturating_sub(first_due) * count / args.spread_ms.max(1)) >= count
            || now_ms() >= first_due
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_pending = rss_kb(pid)?;
    let rate = count as f64 / produce_time.as_secs_f64().max(1e-9);
    if last_sent > first_due {
        println!(
            "  note: producing took longer than --delay-ms; the first {} ms of messages were due before all were sent",
            last_sent - first_due
        );
    }
    let Some(receiving) = receiving else {
        println!(
            "delay: {count} delayed messages of {} B, due over {} ms from +{} ms",
            args.size, args.spread_ms, args.delay_ms
        );
        println!(
            "  produce: {rate:.0} msgs/s ({:.2} s)",
            produce_time.as_secs_f64()
        );
        println!(
            "  broker RSS: {} MiB idle, {} MiB with {pending} pending",
            rss_idle / 1024,
            rss_pending / 1024
        );
        println!(
            "RESULT system=qbus scenario=delay size={} count={count} window={} msgs_per_s={rate:.0} \
             rss_idle_kb={rss_idle} rss_pending_kb={rss_pending}",
            args.size, args.in_flight
        );
        return Ok(());
    };
    // Kills evenly over the due times, each once its moment has come.
    let spread = first_due.max(now_ms())..first_due + args.spread_ms;
    for k in 1..=u64::from(args.kill_restarts) {
        let at =
            spread.start + (spread.end - spread.start) * k / (u64::from(args.kill_restarts) + 1);
        tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await;
        broker.kill_and_restart().await?;
        println!(
            "  killed the broker (SIGKILL) at +{} ms and restarted it",
            now_ms() - start_ms
        );
    }
    let Received {
        late,
        early,
        redelivered,
    } = receiving
        .await
        .map_err(|e| CliError::Failed(format!("consumer task failed: {e}")))??;
    let pct = |q: f64| late[((q * late.len() as f64).ceil() as usize).clamp(1, late.len()) - 1];
    let (p50, p99, max) = (pct(0.50), pct(0.99), late[late.len() - 1]);
    println!(
        "delay: {count} delayed messages of {} B, due over {} ms from +{} ms",
        args.size, args.spread_ms, args.delay_ms
    );
    println!(
        "  produce: {rate:.0} msgs/s ({:.2} s), {} in flight",
        produce_time.as_secs_f64(),
        args.in_flight
    );
    println!(
        "  broker RSS: {} MiB idle, {} MiB with {pending} pending",
        rss_idle / 1024,
        rss_pending / 1024
    );
    println!(
        "  lateness of first deliveries, ms: p50 {p50} p99 {p99} max {max}; early: {early}; \
         delivered again after a kill: {redelivered}"
    );
    println!(
        "RESULT system=qbus scenario=delay size={} count={count} window={} msgs_per_s={rate:.0} \
         rss_idle_kb={rss_idle} rss_pending_kb={rss_pending} late_p50_ms={p50} late_p99_ms={p99} \
         late_max_ms={max} early={early} kills={} redelivered={redelivered}",
        args.size, args.in_flight, args.kill_restarts
    );
    drop(broker);
    if early > 0 {
        return Err(CliError::Failed(format!(
            "{early} messages came before their time"
        )));
    }
    Ok(())
}

/// What the consumer saw.
struct Received {
    /// Lateness of each message's first delivery, ms, sorted.
    late: Vec<u64>,
    /// Deliveries before their time.
    early: u64,
    /// Deliveries of a message already delivered (after a kill, its ack may have been lost).
    redelivered: u64,
}

/// Receives until each of the `count` messages came at least once.
async fn receive(mut consumer: qbus_client::Consumer, count: u64) -> Result<Received, CliError> {
    let mut seen = vec![false; count as usize];
    let mut received = Received {
        late: Vec::with_capacity(count as usize),
        early: 0,
        redelivered: 0,
    };
    while (received.late.len() as u64) < count {
        let missing = count - received.late.len() as u64;
        let batch: Vec<Delivery> =
            tokio::time::timeout(Duration::from_secs(60), consumer.recv_batch(1024))
                .await
                .map_err(|_| {
                    CliError::Failed(format!(
                        "no delivery for 60 s; {missing} messages never came"
                    ))
                })??;
        let now = now_ms();
        for delivery in &batch {
            let field = |at: usize| {
                delivery
                    .body
                    .get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
            };
            let (Some(due), Some(number)) = (field(0), field(8)) else {
                return Err(CliError::Failed(
                    "a delivery without due time and number".into(),
                ));
            };
            if now < due {
                received.early += 1;
            }
            match seen.get_mut(number as usize) {
                Some(seen) if !*seen => {
                    *seen = true;
                    received.late.push(now.saturating_sub(due));
                }
                Some(_) => received.redelivered += 1,
                None => return Err(CliError::Failed(format!("a delivery numbered {number}"))),
            }
        }
        // Acks lost to a kill are redelivered, and counted so.
        let _ = Delivery::ack_all(&batch).await;
    }
    received.late.sort_unstable();
    Ok(received)
}
