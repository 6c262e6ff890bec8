//! `qbus bench replicated`: what `replicated` receipts cost. Starts its own cluster on
//! loopback (one `qbus-tracker`, three `qbus-broker`s or as many as the largest
//! `--replicas`, temp stores, `--fsync always`), and produces to the first broker (with
//! `--ha`: through `tracker://` to every broker, each then a leader and a follower) as
//! `qbus bench produce` does: once to an MQ with one copy (receipts `synced`) and once to an
//! MQ with each `--replicas` (receipts `replicated`), for each `--sizes`, rounds
//! interleaved so that the machine's load falls on all alike. While each run is under way it
//! samples the followers' lag (records and bytes the leader holds that a follower has not
//! confirmed) every 100 ms.
//!
//! Each run prints a line; then, for each size and MQ, one machine-readable line of the
//! medians over the rounds: `RESULT system=qbus scenario=replicated size=.. count=..
//! window=.. msgs_per_s=.. mb_per_s=.. p50_us=.. p99_us=.. p999_us=.. replicas=.. ha=..
//! durability=.. lag_max=.. lag_bytes_max=.. lag_mean=.. rounds=..`, where the lag fields
//! are of the follower furthest behind (0 with one copy).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use qbus_client::{Broker, MqOptions};

use super::cluster::{wait_until, Cluster, ClusterArgs, Shape};
use super::histogram::{Latencies, Summary};
use super::produce::produce_run;
use super::report::{result_line, Rate};
use crate::error::CliError;

#[derive(Debug, Args)]
pub struct ReplicatedBench {
    /// Payload sizes to measure, bytes, comma-separated
    #[arg(long, default_value = "16,1024", value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Copies of the replicated MQs, comma-separated (each next to one copy, `synced`)
    #[arg(long, default_value = "2", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(2..=9))]
    replicas: Vec<u32>,
    /// Messages per run (after the warmup)
    #[arg(long, default_value_t = 200_000)]
    count: u64,
    /// Requests awaiting confirmation at once
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    in_flight: u32,
    /// Messages sent before each run
    #[arg(long, default_value_t = 10_000)]
    warmup: u64,
    /// Runs of each MQ; the RESULT lines give their medians
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Produce through `tracker://` to every broker (each leads its copy and follows
    /// another) instead of to the first broker only
    #[arg(long)]
    ha: bool,
    /// How often the brokers report to the tracker, e.g. 500ms
    #[arg(long, default_value = "500ms", value_name = "DURATION")]
    report_interval: String,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// How often the followers' lag is sampled during a run.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// One MQ measured: its name, copies and payload size.
struct Target {
    mq: String,
    replicas: u32,
    size: usize,
    runs: Vec<Run>,
}

/// What one run measured.
struct Run {
    rate: Rate,
    latency: Summary,
    durability: qbus_client::Durability,
    lag: Lag,
}

/// The lag of the follower furthest behind, over a run's samples.
#[derive(Debug, Default, Clone, Copy)]
struct Lag {
    max: u64,
    max_bytes: u64,
    mean: u64,
}

pub async fn run(args: ReplicatedBench) -> Result<(), CliError> {
    if args.count == 0 || args.sizes.is_empty() {
        return Err(CliError::Usage(
            "--count and --sizes must not be empty".into(),
        ));
    }
    let most = args.replicas.iter().copied().max().unwrap_or(2);
    let shape = Shape {
        name: "replicated",
        trackers: 1,
        brokers: (most as usize).max(3),
        report_interval: &args.report_interval,
    };
    let mut cluster = Cluster::start(&args.cluster, shape).await?;
    let outcome = measure(&args, &cluster).await;
    cluster.stop();
    outcome
}

async fn measure(args: &ReplicatedBench, cluster: &Cluster) -> Result<(), CliError> {
    // Every broker in the topology first, so placement has them all to choose from.
    let ha = Broker::connect_ha(&cluster.tracker_url(), Default::default()).await?;
    wait_until("every broker in the topology", || {
        ha.topology().is_some_and(|t| t.len() == cluster.len())
    })
    .await?;
    let leader = if args.ha {
        ha
    } else {
        Broker::connect(&cluster.addr(0)).await?
    };
    let mut targets = Vec::new();
    for &size in &args.sizes {
        for replicas in std::iter::once(1).chain(args.replicas.iter().copied()) {
            let mq = format!("bench-r{replicas}-{size}");
            let options = MqOptions {
                replicas: Some(replicas),
                ..MqOptions::default()
            };
            leader.create_mq(&mq, options).await?;
            targets.push(Target {
                mq,
                replicas,
                size,
                runs: Vec::new(),
            });
        }
    }
    for target in &targets {
        let copies = if args.ha { cluster.len() } else { 1 };
        wait_in_sync(&leader, &target.mq, target.replicas, copies).await?;
    }
    println!(
        "replicated: {} brokers, produce {}; {} messages a run after {} warmup, {} in flight, {} rounds",
        cluster.len(),
        if args.ha {
            "through tracker:// to all"
        } else {
            "to the first"
        },
        args.count,
        args.warmup,
        args.in_flight,
        args.rounds
    );
    for round in 1..=args.rounds {
        for target in &mut targets {
            let run = one_run(&leader, args, target).await?;
            println!(
                "  round {round}: {} B, {} copies: {:.0} msgs/s, p50 {} us, p99 {} us, {}, follower lag max {} records / {} B, mean {} records",
                target.size,
                target.replicas,
                run.rate.msgs_per_s,
                run.latency.p50,
                run.latency.p99,
                run.durability,
                run.lag.max,
                run.lag.max_bytes,
                run.lag.mean
            );
            target.runs.push(run);
        }
    }
    for target in &targets {
        let median = |f: &dyn Fn(&Run) -> f64| {
            let mut values: Vec<f64> = target.runs.iter().map(f).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let rate = Rate {
            msgs_per_s: median(&|r| r.rate.msgs_per_s),
            mb_per_s: median(&|r| r.rate.mb_per_s),
        };
        let latency = Summary {
            p50: median(&|r| f64::from(r.latency.p50)) as u32,
            p99: median(&|r| f64::from(r.latency.p99)) as u32,
            p999: median(&|r| f64::from(r.latency.p999)) as u32,
            ..target.runs[0].latency
        };
        let durability = target.runs[0].durability;
        println!(
            "{} replicas={} ha={} durability={durability} lag_max={} lag_bytes_max={} lag_mean={} rounds={}",
            result_line(
                "replicated",
                target.size,
                args.count,
                args.in_flight,
                &rate,
                &latency
            ),
            target.replicas,
            args.ha,
            median(&|r| r.lag.max as f64) as u64,
            median(&|r| r.lag.max_bytes as f64) as u64,
            median(&|r| r.lag.mean as f64) as u64,
            target.runs.len()
        );
    }
    Ok(())
}

/// Waits until `replicas - 1` followers of `mq` on `leader` are in sync (of each copy,
/// through `tracker://`).
async fn wait_in_sync(
    leader: &Broker,
    mq: &str,
    replicas: u32,
    copies: usize,
) -> Result<(), CliError> {
    let wanted = (replicas as usize - 1) * copies;
    let started = std::time::Instant::now();
    loop {
        let info = leader.query_mq(mq).await?;
        if info.followers.iter().filter(|f| f.in_sync).count() >= wanted {
            return Ok(());
        }
        if started.elapsed() > super::cluster::WAIT {
            return Err(CliError::Failed(format!(
                "{mq}: {wanted} follower(s) not in sync after {:?}",
                super::cluster::WAIT
            )));
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// One warmup and measured run to `target`, the followers' lag sampled meanwhile.
async fn one_run(
    leader: &Broker,
    args: &ReplicatedBench,
    target: &Target,
) -> Result<Run, CliError> {
    let producer = leader.producer(&target.mq);
    let payload = Bytes::from(vec![b'x'; target.size]);
    let window = args.in_flight as usize;
    if args.warmup > 0 {
        let mut ignored = Latencies::default();
        produce_run(
            &producer,
            &payload,
            args.warmup,
            window,
            1,
            None,
            &mut ignored,
        )
        .await?;
    }
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_lag(leader.clone(), target.mq.clone(), done.clone()));
    let mut latencies = Latencies::with_capacity(args.count as usize);
    let run = produce_run(
        &producer,
        &payload,
        args.count,
        window,
        1,
        None,
        &mut latencies,
    )
    .await;
    done.store(true, Ordering::Relaxed);
    let lag = sampler
        .await
        .map_err(|e| CliError::Failed(format!("lag sampler: {e}")))??;
    let run = run?;
    Ok(Run {
        rate: Rate::new(args.count, target.size, run.elapsed),
        latency: latencies.summarize(),
        durability: run.durability(),
        lag,
    })
}

/// Samples the lag of `mq`'s follower furthest behind until `done`.
async fn sample_lag(leader: Broker, mq: String, done: Arc<AtomicBool>) -> Result<Lag, CliError> {
    let (mut lag, mut sum, mut samples) = (Lag::default(), 0u64, 0u64);
    while !done.load(Ordering::Relaxed) {
        let info = leader.query_mq(&mq).await?;
        let behind = info.followers.iter().map(|f| f.lag).max().unwrap_or(0);
        let bytes = info
            .followers
            .iter()
            .map(|f| f.lag_bytes)
            .max()
            .unwrap_or(0);
        lag.max = lag.max.max(behind);
        lag.max_bytes = lag.max_bytes.max(bytes);
        sum += behind;
        samples += 1;
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    lag.mean = sum / samples.max(1);
    Ok(lag)
}
