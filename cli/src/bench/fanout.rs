//! `qbus bench fanout`: a memory MQ's fan-out, one unthrottled producer and one subscriber
//! per group, each on its own connection; delivery rate and publish-to-receive latency.
//!
//! Every message carries its send time (µs since the Unix epoch, the first 8 bytes of its
//! body): a subscriber's latency is its receive time minus that, on the same clock. The
//! same shape as `nats bench pub/sub`, so the two can be run side by side
//! (`scripts/bench-fanout-vs-nats.sh`).

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_client::{Broker, Delivery, Message, MqOptions};
use qbus_wire::now_ms;

use super::consume::ACK_WINDOW;
use super::histogram::{Latencies, Summary};
use super::report::{print_latency, result_line, Rate};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct FanoutBench {
    /// Consumer groups, each with one subscriber on its own connection
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    groups: u32,
    /// Payload bytes (at least 8: the send time)
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(8..))]
    size: u64,
    /// Messages to publish
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Messages sent and not yet confirmed: the producer's window (its sends leave in
    /// batches; the window bounds the client's memory, not the rate, unless it is smaller
    /// than the messages of one round trip)
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Most messages per fetch (as many as the producer's window: a subscriber fetching
    /// less per round trip than the producer sends falls behind, and its latency is queueing)
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
}

/// What one subscriber saw.
struct Received {
    count: u64,
    /// When the last message came.
    last: Instant,
    latencies: Summary,
    /// Set by the run: from the first publish to `last`.
    elapsed: Duration,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

pub(super) async fn run(
    broker: &str,
    connect_timeout: f64,
    args: FanoutBench,
) -> Result<(), CliError> {
    if args.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    let admin = crate::connect(broker, connect_timeout).await?;
    let mq = format!("fanout-{}-{}", std::process::id(), now_ms());
    let options = MqOptions {
        memory: Some(true),
        // Room for the whole run: a subscriber that falls behind is measured, not cut.
        memory_max_messages: Some(args.count),
        memory_max_bytes: Some(args.count.saturating_mul(args.size + 64)),
        ..MqOptions::default()
    };
    admin.create_mq(&mq, options).await?;

    let mut subscribers = Vec::new();
    for g in 0..args.groups {
        let client = crate::connect(broker, connect_timeout).await?;
        let consumer = client
            .consumer(&mq)
            .group(format!("g{g}"))
            .batch(args.batch)
            .long_poll(Duration::from_millis(100))
            .subscribe()
            .await?;
        subscribers.push(tokio::spawn(subscribe(client, consumer, args.count)));
    }

    let publisher = crate::connect(broker, connect_timeout).await?;
    let producer = publisher.producer(&mq);
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(args.in_flight as usize);
    for _ in 0..args.count {
        let mut body = BytesMut::with_capacity(args.size as usize);
        body.put_u64(now_us());
        body.resize(args.size as usize, b'x');
        pending.push_back(producer.send_async(Message::new(body.freeze())).await?);
        if pending.len() >= args.in_flight as usize {
            if let Some(receipt) = pending.pop_front() {
                receipt.await?;
            }
        }
    }
    for receipt in pending {
        receipt.await?;
    }
    let produced = started.elapsed();

    let mut results = Vec::new();
    for subscriber in subscribers {
        let mut received = subscriber
            .await
            .map_err(|e| CliError::Failed(format!("subscriber failed: {e}")))??;
        received.elapsed = received.last.saturating_duration_since(started);
        results.push(received);
    }
    let size = args.size as usize;
    let produce_rate = Rate::new(args.count, size, produced);
    println!(
        "fanout: {} messages of {size} B to memory MQ {mq:?}, {} group(s), one subscriber each; produce {:.0} msgs/s ({} in flight)",
        args.count, args.groups, produce_rate.msgs_per_s, args.in_flight
    );
    for (g, r) in results.iter().enumerate() {
        let rate = Rate::new(r.count, size, r.elapsed);
        println!(
            "  group g{g}: {} received in {:.3} s, {:.0} msgs/s",
            r.count,
            r.elapsed.as_secs_f64(),
            rate.msgs_per_s
        );
        print_latency("  publish-to-receive", &r.latencies);
    }
    // The slowest group sets the line: fan-out is as fast as its last subscriber.
    let slowest = results
        .iter()
        .min_by(|a, b| {
            let rate = |r: &Received| r.count as f64 / r.elapsed.as_secs_f64().max(1e-9);
            rate(a).total_cmp(&rate(b))
        })
        .ok_or_else(|| CliError::Failed("no subscriber".into()))?;
    let rate = Rate::new(slowest.count, size, slowest.elapsed);
    println!(
        "{} groups={} received={}",
        result_line(
            "fanout",
            size,
            args.count,
            args.in_flight,
            &rate,
            &slowest.latencies
        ),
        args.groups,
        slowest.count
    );
    admin.remove_mq(&mq).await?;
    Ok(())
}

/// Receives until `count` messages came or none for 2 s, acking as it goes.
async fn subscribe(
    _client: Broker,
    mut consumer: qbus_client::Consumer,
    count: u64,
) -> Result<Received, CliError> {
    let mut latencies = Latencies::with_capacity(count.min(1 << 22) as usize);
    let mut acks = FuturesUnordered::new();
    let (mut received, mut acked) = (0u64, 0u64);
    let mut last = Instant::now();
    while received < count {
        tokio::select! {
            biased;
            Some(ack) = acks.next(), if !acks.is_empty() => {
                acked += ack?;
            }
            batch = tokio::time::timeout(Duration::from_secs(2), consumer.recv_batch(4096)),
                if (received - acked) as usize <= ACK_WINDOW =>
            {
                let Ok(batch) = batch else { break };
                let batch = batch?;
                if batch.is_empty() {
                    break;
                }
                let now = now_us();
                last = Instant::now();
                for delivery in &batch {
                    let sent = delivery
                        .body
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(now, u64::from_be_bytes);
                    latencies.record(Duration::from_micros(now.saturating_sub(sent)));
                }
                received += batch.len() as u64;
                acks.push(async move {
                    Delivery::ack_all(&batch).await.map(|()| batch.len() as u64)
                });
            }
        }
    }
    drop(consumer);
    Ok(Received {
        count: received,
        last,
        latencies: latencies.summarize(),
        elapsed: Duration::ZERO,
    })
}
