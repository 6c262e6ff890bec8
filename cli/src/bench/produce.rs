//! `qbus bench produce`: confirmed produce throughput and latency against a running broker.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use qbus_client::{Broker, Durability, Message, MqOptions, PendingReceipt, Producer};

use super::histogram::Latencies;
use super::report::{print_latency, result_line, Rate};
use crate::error::CliError;

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
    /// Create the MQ with this many copies per broker (followers need trackers: run with
    /// `--broker tracker://...`); receipts are then `replicated`
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    replicas: Option<u32>,
    /// Give every message a unique dedupe id (to measure what deduplication costs)
    #[arg(long)]
    dedupe: bool,
}

/// Unique dedupe ids for a run: a prefix of this process and time (so runs within one window do not repeat
/// each other's ids) and a counter.
pub(super) struct DedupeIds {
    prefix: String,
    next: u64,
}

impl DedupeIds {
    pub(super) fn new() -> DedupeIds {
        DedupeIds {
            prefix: format!(
                "bench-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos()
            ),
            next: 0,
        }
    }

    fn message(&mut self, payload: &Bytes) -> Message {
        self.next += 1;
        Message::new(payload.clone()).with_dedupe_id(format!("{}-{}", self.prefix, self.next))
    }
}

type ReceiptFuture = <PendingReceipt as IntoFuture>::IntoFuture;

/// What one produce run measured.
pub(super) struct Produced {
    pub(super) elapsed: Duration,
    replicated: u64,
    synced: u64,
    written: u64,
}

impl Produced {
    /// The weakest durability any receipt had.
    pub(super) fn durability(&self) -> Durability {
        if self.written > 0 {
            Durability::Written
        } else if self.synced > 0 {
            Durability::Synced
        } else {
            Durability::Replicated
        }
    }
}

/// Sends `count` messages of `payload`, `batch` per request, with at most `window` requests
/// unconfirmed; records each request's send-to-confirmation latency.
pub(super) async fn produce_run(
    producer: &Producer,
    payload: &Bytes,
    count: u64,
    window: usize,
    batch: u32,
    mut dedupe: Option<&mut DedupeIds>,
    latencies: &mut Latencies,
) -> Result<Produced, CliError> {
    let mut pending: VecDeque<(Instant, ReceiptFuture)> = VecDeque::with_capacity(window);
    let mut remaining = count;
    let (mut replicated, mut synced, mut written) = (0, 0, 0);
    let started = Instant::now();
    while remaining > 0 || !pending.is_empty() {
        if remaining > 0 && pending.len() < window {
            let n = remaining.min(u64::from(batch));
            let sent_at = Instant::now();
            let mut message = || match dedupe.as_deref_mut() {
                Some(ids) => ids.message(payload),
                None => Message::new(payload.clone()),
            };
            let receipt = if n == 1 {
                producer.send_async(message()).await?
            } else {
                let messages: Vec<Message> = (0..n).map(|_| message()).collect();
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
            Durability::Replicated => replicated += u64::from(receipt.count),
            Durability::Synced => synced += u64::from(receipt.count),
            Durability::Written | Durability::Memory => written += u64::from(receipt.count),
        }
    }
    Ok(Produced {
        elapsed: started.elapsed(),
        replicated,
        synced,
        written,
    })
}

pub(super) async fn run(broker: &Broker, args: ProduceBench) -> Result<(), CliError> {
    if args.count == 0 {
        return Err(CliError::Usage("--count must be at least 1".into()));
    }
    let options = MqOptions {
        replicas: args.replicas,
        ..MqOptions::default()
    };
    broker.create_mq(&args.mq, options).await?;
    let producer = broker.producer(&args.mq);
    let payload = Bytes::from(vec![b'x'; args.size]);
    let window = args.in_flight as usize;
    let mut ids = args.dedupe.then(DedupeIds::new);
    if args.warmup > 0 {
        let mut ignored = Latencies::default();
        produce_run(
            &producer,
            &payload,
            args.warmup,
            window,
            args.batch,
            ids.as_mut(),
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
        ids.as_mut(),
        &mut latencies,
    )
    .await?;
    let durability = run.durability();
    let rate = Rate::new(args.count, args.size, run.elapsed);
    let lat = latencies.summarize();
    println!(
        "produce: {} messages of {} B to {:?}, {} requests in flight, {} per request, after {} warmup{}",
        args.count,
        args.size,
        args.mq,
        args.in_flight,
        args.batch,
        args.warmup,
        if args.dedupe { ", each with a dedupe id" } else { "" }
    );
    println!(
        "  {:.3} s, {:.0} msgs/s, {:.2} MB/s, durability {durability} ({} replicated, {} synced, {} written)",
        run.elapsed.as_secs_f64(),
        rate.msgs_per_s,
        rate.mb_per_s,
        run.replicated,
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
