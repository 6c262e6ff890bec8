//! `qbus bench failover`: the failover gap. Starts its own cluster on loopback (one
//! `qbus-tracker`, `--brokers` `qbus-broker`s with temp stores), produces confirmed
//! messages through an HA handle with `--in-flight` sends outstanding, `kill -9`s one broker
//! part-way, restarts it, then reads everything back to check that no confirmed message was
//! lost and to count duplicates (sends retried after their broker stored them but died
//! before confirming).
//!
//! It prints a summary and one machine-readable line:
//! `RESULT system=qbus scenario=failover size=.. count=.. window=.. msgs_per_s=..
//! p50_us=.. p99_us=.. p999_us=.. max_us=.. kill_p99_us=.. kill_max_us=.. gap_us=..
//! lost=.. duplicates=..`, where `kill_*` are the latencies of the sends started from
//! 0.5 s before the kill to 1.5 s after it, and `gap_us` the longest time without a
//! confirmation.

use std::collections::{HashMap, VecDeque};
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use qbus_client::ha::HaOptions;
use qbus_client::{Broker, Message, MqOptions};

use super::args::secs;
use super::cluster::{wait_until, Cluster, ClusterArgs, Shape, WAIT};
use super::histogram::Latencies;
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct FailoverBench {
    /// Brokers in the cluster; one of them is killed
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=9))]
    brokers: u32,
    /// Seconds of producing in all
    #[arg(long, default_value_t = 8.0, value_name = "SECS")]
    duration: f64,
    /// Seconds after the start of producing when a broker gets SIGKILL
    #[arg(long, default_value_t = 3.0, value_name = "SECS")]
    kill_after: f64,
    /// Payload bytes per message
    #[arg(long, default_value_t = 128)]
    size: usize,
    /// Sends awaiting confirmation at once
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// How often the brokers report to the tracker, e.g. 500ms
    #[arg(long, default_value = "500ms", value_name = "DURATION")]
    report_interval: String,
    #[command(flatten)]
    cluster: ClusterArgs,
}

const MQ: &str = "failover-bench";

pub async fn run(args: FailoverBench) -> Result<(), CliError> {
    let duration = secs("--duration", args.duration)?;
    let kill_after = secs("--kill-after", args.kill_after)?;
    if kill_after >= duration {
        return Err(CliError::Usage(
            "--kill-after must be less than --duration".into(),
        ));
    }
    let shape = Shape {
        name: "failover",
        trackers: 1,
        brokers: args.brokers as usize,
        report_interval: &args.report_interval,
    };
    let mut cluster = Cluster::start(&args.cluster, shape).await?;
    let outcome = measure(&args, &mut cluster, duration, kill_after).await;
    cluster.stop();
    outcome
}

async fn measure(
    args: &FailoverBench,
    cluster: &mut Cluster,
    duration: Duration,
    kill_after: Duration,
) -> Result<(), CliError> {
    let client = Broker::connect_ha(&cluster.tracker_url(), HaOptions::default()).await?;
    wait_until("every broker in the topology", || {
        client.topology().is_some_and(|t| t.len() == cluster.len())
    })
    .await?;
    client.create_mq(MQ, MqOptions::default()).await?;
    wait_until("the MQ on every broker", || {
        client
            .topology()
            .is_some_and(|t| t.holders(MQ).len() == cluster.len())
    })
    .await?;
    println!(
        "failover: {} brokers, {} B messages, {} in flight, broker #2 killed after {kill_after:?} of {duration:?}",
        cluster.len(),
        args.size,
        args.in_flight
    );

    let producer = client.producer(MQ);
    let payload = Bytes::from(vec![b'x'; args.size]);
    let window = args.in_flight as usize;
    let mut pending = VecDeque::with_capacity(window);
    let mut sends: Vec<(Duration, Duration)> = Vec::new();
    let mut confirmed: Vec<u64> = Vec::new();
    let started = Instant::now();
    let mut last_confirmed = started;
    let mut gap = Duration::ZERO;
    let mut killed_at = None;
    let mut next = 0u64;
    loop {
        let now = started.elapsed();
        if killed_at.is_none() && now >= kill_after {
            cluster.kill(1)?;
            killed_at = Some(now);
        }
        if now < duration && pending.len() < window {
            let message = Message::new(payload.clone()).with_key(next.to_string());
            let receipt = producer.send_async(message).await?;
            pending.push_back((next, now, receipt.into_future()));
            next += 1;
            continue;
        }
        let Some((key, sent, receipt)) = pending.pop_front() else {
            break;
        };
        receipt.await?;
        let at = Instant::now();
        gap = gap.max(at - last_confirmed);
        last_confirmed = at;
        sends.push((sent, started.elapsed() - sent));
        confirmed.push(key);
    }
    let elapsed = started.elapsed();
    let killed_at = killed_at.unwrap_or(kill_after);

    cluster.restart(1).await?;
    wait_until("the restarted broker in the topology", || {
        client
            .topology()
            .is_some_and(|t| t.holders(MQ).len() == cluster.len())
    })
    .await?;
    let (lost, duplicates) = read_back(&client, &confirmed).await?;

    let mut all = Latencies::with_capacity(sends.len());
    let mut around = Latencies::default();
    let from = killed_at.saturating_sub(Duration::from_millis(500));
    let to = killed_at + Duration::from_millis(1500);
    for &(sent, latency) in &sends {
        all.record(latency);
        if sent >= from && sent <= to {
            around.record(latency);
        }
    }
    let (all, around) = (all.summarize(), around.summarize());
    let rate = confirmed.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "  {} confirmed in {elapsed:.2?} ({rate:.0} msg/s)",
        confirmed.len()
    );
    println!(
        "  latency, us: p50 {} p99 {} p99.9 {} max {}",
        all.p50, all.p99, all.p999, all.max
    );
    println!(
        "  around the kill ({} sends), us: p50 {} p99 {} max {}; longest gap {gap:.2?}",
        around.count, around.p50, around.p99, around.max
    );
    println!("  after restart: {lost} confirmed messages missing, {duplicates} duplicates");
    println!(
        "RESULT system=qbus scenario=failover size={} count={} window={window} msgs_per_s={rate:.0} \
         p50_us={} p99_us={} p999_us={} max_us={} kill_p99_us={} kill_max_us={} gap_us={} lost={lost} duplicates={duplicates}",
        args.size,
        confirmed.len(),
        all.p50,
        all.p99,
        all.p999,
        all.max,
        around.p99,
        around.max,
        gap.as_micros()
    );
    if lost > 0 {
        return Err(CliError::Failed(format!(
            "{lost} confirmed messages were lost"
        )));
    }
    Ok(())
}

/// Reads the MQ back from every broker; returns (confirmed keys missing, extra copies).
async fn read_back(client: &Broker, confirmed: &[u64]) -> Result<(usize, usize), CliError> {
    let mut wanted: HashMap<u64, u32> = confirmed.iter().map(|&k| (k, 0)).collect();
    let mut missing = wanted.len();
    let mut duplicates = 0;
    let mut consumer = client
        .consumer(MQ)
        .group("check")
        .batch(1024)
        .auto_ack(true)
        .subscribe()
        .await?;
    while missing > 0 {
        let delivery = match tokio::time::timeout(WAIT, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            _ => break,
        };
        let key = delivery.key.as_deref().and_then(|k| k.parse::<u64>().ok());
        if let Some(seen) = key.and_then(|k| wanted.get_mut(&k)) {
            *seen += 1;
            if *seen == 1 {
                missing -= 1;
            } else {
                duplicates += 1;
            }
        }
    }
    Ok((missing, duplicates))
}
