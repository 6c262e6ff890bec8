//! `qbus bench consume`: consume throughput with acks, filling the MQ first if needed.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use qbus_client::{Broker, Delivery, MqOptions, Status};
use qbus_wire::now_ms;

use super::histogram::Latencies;
use super::produce::produce_run;
use super::report::{print_latency, result_line, Rate};
use crate::error::CliError;

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

/// Most acks awaiting confirmation at once. The SDK queues acks in a channel of 4096 and
/// sends them in batches; staying within it means no ack ever waits for room in that queue
/// (waiting there costs far more than the ack itself).
pub(crate) const ACK_WINDOW: usize = 4096;

pub(super) async fn run(broker: &Broker, args: ConsumeBench) -> Result<(), CliError> {
    if args.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    let info = broker.create_mq(&args.mq, MqOptions::default()).await?;
    let depth = info.depth();
    if depth < args.count {
        fill(broker, &args, args.count - depth).await?;
    }

    let group = format!("bench-{}-{}", std::process::id(), now_ms());
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
        None,
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
