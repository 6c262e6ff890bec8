//! `qbus bench tx`: transactional produce against a running broker: COUNT transactions of
//! MESSAGES messages of SIZE bytes (one send per message, then the commit), CONCURRENCY of
//! them at once; throughput in messages and transactions, latency begin-to-commit. With
//! `--together` a transaction's sends are all in flight at once instead of one by one.

use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use futures_util::future::try_join_all;
use qbus_client::{Broker, Message, MqOptions, TxOptions};

use super::histogram::Latencies;
use super::report::{print_latency, result_line, Rate};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct TxBench {
    /// MQ to use (created if missing)
    #[arg(long, default_value = "bench-tx")]
    mq: String,
    /// Payload bytes per message
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Messages per transaction
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,
    /// Transactions to run
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Transactions in progress at once
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Send a transaction's messages all at once (their order is then not kept) instead of
    /// each after the previous one's receipt
    #[arg(long)]
    together: bool,
}

/// One worker's share: `n` transactions, one after the other.
async fn worker(
    broker: &Broker,
    args: &TxBench,
    payload: &Bytes,
    n: u64,
) -> Result<Latencies, CliError> {
    let mut latencies = Latencies::with_capacity(n as usize);
    for _ in 0..n {
        let started = Instant::now();
        let tx = broker.begin(TxOptions::default()).await?;
        let send = || tx.send(&args.mq, Message::new(payload.clone()));
        if args.together {
            try_join_all((0..args.messages).map(|_| send())).await?;
        } else {
            for _ in 0..args.messages {
                send().await?;
            }
        }
        tx.commit().await?;
        latencies.record(started.elapsed());
    }
    Ok(latencies)
}

pub(super) async fn run(broker: &Broker, args: TxBench) -> Result<(), CliError> {
    broker.create_mq(&args.mq, MqOptions::default()).await?;
    let payload = Bytes::from(vec![b'x'; args.size]);
    let workers = args.concurrency.min(args.count);
    let started = Instant::now();
    let shares = (0..workers).map(|w| {
        let n = args.count / workers + u64::from(w < args.count % workers);
        worker(broker, &args, &payload, n)
    });
    let parts = try_join_all(shares).await?;
    let elapsed = started.elapsed();
    let mut latencies = Latencies::with_capacity(args.count as usize);
    for part in parts {
        latencies.merge(part);
    }
    let messages = args.count * u64::from(args.messages);
    let rate = Rate::new(messages, args.size, elapsed);
    let lat = latencies.summarize();
    println!(
        "tx: {} transactions of {} messages of {} B to {:?}, {} at once, sends {}",
        args.count,
        args.messages,
        args.size,
        args.mq,
        workers,
        if args.together {
            "together"
        } else {
            "one by one"
        }
    );
    println!(
        "  {:.3} s, {:.0} transactions/s, {:.0} msgs/s, {:.2} MB/s",
        elapsed.as_secs_f64(),
        args.count as f64 / elapsed.as_secs_f64().max(1e-9),
        rate.msgs_per_s,
        rate.mb_per_s
    );
    print_latency("begin-to-commit latency", &lat);
    println!(
        "{} messages_per_tx={} together={}",
        result_line("tx", args.size, messages, workers as u32, &rate, &lat),
        args.messages,
        args.together
    );
    Ok(())
}
