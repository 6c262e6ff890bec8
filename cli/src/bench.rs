//! `qbus bench produce|consume`: throughput and latency against a running broker.
//!
//! Both print a readable summary and one machine-readable line:
//! `RESULT system=qbus scenario=... size=.. count=.. window=.. msgs_per_s=.. mb_per_s=..
//! p50_us=.. p99_us=.. p999_us=..` followed by extra `key=value` fields.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Args, Subcommand};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_client::{
    Broker, Delivery, Durability, Message, MqOptions, PendingReceipt, Producer, Status,
};

use crate::error::CliError;
use crate::histogram::{Latencies, Summary};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Send COUNT messages of SIZE bytes keeping IN_FLIGHT requests unconfirmed
    Produce(ProduceBench),
    /// Consume COUNT messages with a fresh group (filling the MQ first if needed)
    Consume(ConsumeBench),
}

#[derive(Debug, Args)]
pub struct ProduceBench {
    /// MQ to use (created if missing)
    #[arg(long, default_value = "bench")]
    mq: String,
    /// Payload bytes per message
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Messages to send (after the warmup)
    #[arg(long, default_value_t = 400_000)]
    count: u64,
    /// Requests awaiting confirmation at once
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Messages per request (B > 1 uses batch sends; latency is then per batch)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Messages sent before measuring
    #[arg(long, default_value_t = 20_000)]
    warmup: u64,
}

#[derive(Debug, Args)]
pub struct ConsumeBench {
    /// MQ to use (created and filled if it holds fewer than COUNT messages)
    #[arg(long, default_value = "bench")]
    mq: String,
    /// Payload bytes of the messages produced to fill the MQ
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Messages to consume
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Most messages per fetch
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Produce requests in flight while filling the MQ
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
}

pub async fn run(broker: &Broker, cmd: BenchCommand) -> Result<(), CliError> {
    match cmd {
        BenchCommand::Produce(args) => produce(broker, args).await,
        BenchCommand::Consume(args) => consume(broker, args).await,
    }
}

/// Most acks awaiting confirmation at once. The SDK queues acks in a channel of 4096 and
/// sends them in batches; staying within it means no ack ever waits for room in that queue
/// (waiting there costs far more than the ack itself).
pub const ACK_WINDOW: usize = 4096;

type ReceiptFuture = <PendingReceipt as IntoFuture>::IntoFuture;

/// What one produce run measured.
struct Produced {
    elapsed: Duration,
    synced: u64,
    written: u64,
}

/// Sends `count` messages of `payload`, `batch` per request, with at most `window` requests
/// unconfirmed; records each request's send-to-confirmation latency.
async fn produce_run(
    producer: &Producer,
    payload: &Bytes,
    count: u64,
    window: usize,
    batch: u32,
    latencies: &mut Latencies,
) -> Result<Produced, CliError> {
    let mut pending: VecDeque<(Instant, ReceiptFuture)> = VecDeque::with_capacity(window);
    let mut remaining = count;
    let (mut synced, mut written) = (0, 0);
    let started = Instant::now();
    while remaining > 0 || !pending.is_empty() {
        if remaining > 0 && pending.len() < window {
            let n = remaining.min(u64::from(batch));
            let sent_at = Instant::now();
            let receipt = if n == 1 {
                producer.send_async(Message::new(payload.clone())).await?
            } else {
                let messages = (0..n).map(|_| Message::new(payload.clone()));
                producer.send_batch_async(messages).await?
            };
            pending.push_back((sent_at, receipt.into_future()));
            remaining -= n;
            continue;
        }
        let Some((sent_at, receipt)) = pending.pop_front() else {
            break;
        };
        let receipt = receipt.await?;
        latencies.record(sent_at.elapsed());
        match receipt.durability {
            Durability::Synced => synced += u64::from(receipt.count),
            Durability::Written => written += u64::from(receipt.count),
        }
    }
    Ok(Produced {
        elapsed: started.elapsed(),
        synced,
        written,
    })
}

async fn produce(broker: &Broker, args: ProduceBench) -> Result<(), CliError> {
    if args.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    broker.create_mq(&args.mq, MqOptions::default()).await?;
    let producer = broker.producer(&args.mq);
    let payload = Bytes::from(vec![b'x'; args.size]);
    let window = args.in_flight as usize;
    if args.warmup > 0 {
        let mut ignored = Latencies::default();
        produce_run(
            &producer,
            &payload,
            args.warmup,
            window,
            args.batch,
            &mut ignored,
        )
        .await?;
    }
    let requests = args.count.div_ceil(u64::from(args.batch));
    let mut latencies = Latencies::with_capacity(requests as usize);
    let run = produce_run(
        &producer,
        &payload,
        args.count,
        window,
        args.batch,
        &mut latencies,
    )
    .await?;
    let durability = if run.written > 0 {
        Durability::Written
    } else {
        Durability::Synced
    };
    let rate = Rate::new(args.count, args.size, run.elapsed);
    let lat = latencies.summarize();
    println!(
        "produce: {} messages of {} B to {:?}, {} requests in flight, {} per request, after {} warmup",
        args.count, args.size, args.mq, args.in_flight, args.batch, args.warmup
    );
    println!(
        "  {:.3} s, {:.0} msgs/s, {:.2} MB/s, durability {durability} ({} synced, {} written)",
        run.elapsed.as_secs_f64(),
        rate.msgs_per_s,
        rate.mb_per_s,
        run.synced,
        run.written
    );
    print_latency(
        if args.batch > 1 {
            "batch send-to-confirm latency"
        } else {
            "send-to-confirm latency"
        },
        &lat,
    );
    println!(
        "{} batch={} durability={durability}",
        result_line(
            "produce",
            args.size,
            args.count,
            args.in_flight,
            &rate,
            &lat
        ),
        args.batch
    );
    Ok(())
}

async fn consume(broker: &Broker, args: ConsumeBench) -> Result<(), CliError> {
    if args.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    let info = broker.create_mq(&args.mq, MqOptions::default()).await?;
    let depth = info.depth();
    if depth < args.count {
        fill(broker, &args, args.count - depth).await?;
    }

    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let group = format!("bench-{}-{nanos}", std::process::id());
    let mut consumer = broker
        .consumer(&args.mq)
        .group(group.clone())
        .batch(args.batch)
        // Short polls: the fetch still waiting when the run ends holds up removing the group.
        .long_poll(Duration::from_millis(100))
        .subscribe()
        .await?;
    let mut latencies = Latencies::with_capacity(1024);
    let mut acks = FuturesUnordered::new();
    let (mut received, mut acked, mut bytes) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut last_batch = started;
    while acked < args.count {
        let want = (args.count - received).min(u64::from(args.batch)) as usize;
        tokio::select! {
            biased;
            Some(ack) = acks.next(), if !acks.is_empty() => {
                acked += ack?;
            }
            batch = consumer.recv_batch(want),
                if want > 0 && (received - acked) as usize + want <= ACK_WINDOW.max(want) =>
            {
                let batch = batch?;
                if batch.is_empty() {
                    return Err(CliError::Failed(format!(
                        "the consumer stopped after {received} of {} messages",
                        args.count
                    )));
                }
                let now = Instant::now();
                latencies.record(now - last_batch);
                last_batch = now;
                received += batch.len() as u64;
                bytes += batch.iter().map(|d| d.body.len() as u64).sum::<u64>();
                acks.push(async move {
                    Delivery::ack_all(&batch).await.map(|()| batch.len() as u64)
                });
            }
        }
    }
    let elapsed = started.elapsed();
    drop(consumer);
    let size = usize::try_from(bytes / received.max(1)).unwrap_or(args.size);
    let rate = Rate::new(received, size, elapsed);
    let lat = latencies.summarize();
    println!(
        "consume: {received} messages ({} B avg) from {:?} as new group {group:?}, fetch batch {}",
        size, args.mq, args.batch
    );
    println!(
        "  {:.3} s, {:.0} msgs/s, {:.2} MB/s, every message acked and confirmed",
        elapsed.as_secs_f64(),
        rate.msgs_per_s,
        rate.mb_per_s
    );
    print_latency(
        &format!(
            "time between batch arrivals ({} batches, {:.0} msgs avg; not end-to-end)",
            lat.count,
            received as f64 / lat.count.max(1) as f64
        ),
        &lat,
    );
    println!(
        "{}",
        result_line("consume", size, received, args.batch, &rate, &lat)
    );
    remove_group(broker, &args.mq, &group).await
}

/// Removes the benchmark's group once the broker no longer counts its consumer (a moment
/// after its last fetch), so runs leave nothing behind.
async fn remove_group(broker: &Broker, mq: &str, group: &str) -> Result<(), CliError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match broker.remove_group(mq, group).await {
            Err(e) if e.status() == Some(Status::Conflict) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done => return done.map_err(CliError::from),
        }
    }
}

/// Produces `missing` messages of `args.size` bytes in big batches.
async fn fill(broker: &Broker, args: &ConsumeBench, missing: u64) -> Result<(), CliError> {
    const BATCH_BYTES: usize = 256 * 1024;
    let per_message = args.size + 32;
    let batch = (BATCH_BYTES / per_message).clamp(1, 8192) as u32;
    let payload = Bytes::from(vec![b'x'; args.size]);
    let mut ignored = Latencies::default();
    let producer = broker.producer(&args.mq);
    let run = produce_run(
        &producer,
        &payload,
        missing,
        args.in_flight as usize,
        batch,
        &mut ignored,
    )
    .await?;
    println!(
        "filled {:?} with {missing} messages of {} B in {:.2} s ({:.0} msgs/s, {batch} per request)",
        args.mq,
        args.size,
        run.elapsed.as_secs_f64(),
        missing as f64 / run.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

struct Rate {
    msgs_per_s: f64,
    mb_per_s: f64,
}

impl Rate {
    fn new(count: u64, size: usize, elapsed: Duration) -> Rate {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Rate {
            msgs_per_s: count as f64 / secs,
            mb_per_s: (count as f64 * size as f64) / 1e6 / secs,
        }
    }
}

fn print_latency(what: &str, lat: &Summary) {
    println!(
        "  {what}, us: min {} mean {} p50 {} p99 {} p99.9 {} max {}",
        lat.min, lat.mean, lat.p50, lat.p99, lat.p999, lat.max
    );
}

fn result_line(
    scenario: &str,
    size: usize,
    count: u64,
    window: u32,
    rate: &Rate,
    lat: &Summary,
) -> String {
    format!(
        "RESULT system=qbus scenario={scenario} size={size} count={count} window={window} \
         msgs_per_s={:.0} mb_per_s={:.2} p50_us={} p99_us={} p999_us={}",
        rate.msgs_per_s, rate.mb_per_s, lat.p50, lat.p99, lat.p999
    )
}
