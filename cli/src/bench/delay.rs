//! `qbus bench delay`: delayed delivery at scale. Starts its own `qbus-broker` (loopback, temp
//! store), schedules COUNT messages due from DELAY after the start, spread evenly over
//! SPREAD, and consumes them with one group as they come due.
//!
//! Reports the produce rate, the broker's resident memory (from `/proc/<pid>/status`)
//! before and with every message pending, and each delivery's lateness (receipt time minus
//! the due time the message carries in its body). It prints a summary and one line:
//! `RESULT system=qbus scenario=delay size=.. count=.. window=.. msgs_per_s=.. rss_idle_kb=..
//! rss_pending_kb=.. late_p50_ms=.. late_p99_ms=.. late_max_ms=.. early=..`.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use clap::Args;
use qbus_client::{Broker, Delivery, Message, MqOptions};

use super::failover::{free_port, listening, spawn};
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
    /// Payload bytes per message (at least 8: the due time)
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(8..))]
    size: u64,
    /// Sends awaiting confirmation at once
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Only schedule and measure memory, without waiting for the messages to come due (for
    /// delays of days)
    #[arg(long)]
    schedule_only: bool,
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
    let port = free_port()?;
    let mut command = Command::new(bin_dir.join("qbus-broker"));
    command
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--store")
        .arg(dir.join("store"));
    let broker = BrokerChild {
        child: spawn(command, "qbus-broker", &bin_dir)?,
        dir,
        port,
    };
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
    let (late, early) = receiving
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
    println!("  lateness, ms: p50 {p50} p99 {p99} max {max}; early: {early}");
    println!(
        "RESULT system=qbus scenario=delay size={} count={count} window={} msgs_per_s={rate:.0} \
         rss_idle_kb={rss_idle} rss_pending_kb={rss_pending} late_p50_ms={p50} late_p99_ms={p99} \
         late_max_ms={max} early={early}",
        args.size, args.in_flight
    );
    drop(broker);
    Ok(())
}

/// Receives `count` deliveries; returns their lateness in ms, sorted, and how many came
/// before their time.
async fn receive(
    mut consumer: qbus_client::Consumer,
    count: u64,
) -> Result<(Vec<u64>, u64), CliError> {
    let mut late = Vec::with_capacity(count as usize);
    let mut early = 0;
    while (late.len() as u64) < count {
        let batch: Vec<Delivery> =
            tokio::time::timeout(Duration::from_secs(60), consumer.recv_batch(1024))
                .await
                .map_err(|_| CliError::Failed("no delivery for 60 s".into()))??;
        let now = now_ms();
        for delivery in &batch {
            let due = delivery
                .body
                .get(..8)
                .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()));
            if now < due {
                early += 1;
            }
            late.push(now.saturating_sub(due));
        }
        Delivery::ack_all(&batch).await?;
    }
    late.sort_unstable();
    Ok((late, early))
}
