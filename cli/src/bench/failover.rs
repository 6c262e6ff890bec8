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
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use qbus_client::ha::HaOptions;
use qbus_client::{Broker, Message, MqOptions};

use super::args::secs;
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
    /// Directory holding qbus-broker and qbus-tracker [default: the one holding qbus]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
}

const MQ: &str = "failover-bench";
const WAIT: Duration = Duration::from_secs(20);

pub async fn run(args: FailoverBench) -> Result<(), CliError> {
    let duration = secs("--duration", args.duration)?;
    let kill_after = secs("--kill-after", args.kill_after)?;
    if kill_after >= duration {
        return Err(CliError::Usage(
            "--kill-after must be less than --duration".into(),
        ));
    }
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| CliError::Usage("cannot tell where qbus lives; use --bin-dir".into()))?,
    };
    let mut cluster =
        Cluster::start(&bin_dir, args.brokers as usize, &args.report_interval).await?;
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
        client
            .topology()
            .is_some_and(|t| t.len() == cluster.brokers.len())
    })
    .await?;
    client.create_mq(MQ, MqOptions::default()).await?;
    wait_until("the MQ on every broker", || {
        client
            .topology()
            .is_some_and(|t| t.holders(MQ).len() == cluster.brokers.len())
    })
    .await?;
    println!(
        "failover: {} brokers, {} B messages, {} in flight, broker #2 killed after {kill_after:?} of {duration:?}",
        cluster.brokers.len(),
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
            .is_some_and(|t| t.holders(MQ).len() == cluster.brokers.len())
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

/// Polls `done` every 10 ms for up to [`WAIT`].
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<(), CliError> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > WAIT {
            return Err(CliError::Failed(format!(
                "timed out after {WAIT:?} waiting for {what}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A tracker and brokers on loopback, each a child process with its store in a temp
/// directory; everything is killed and removed on [`Cluster::stop`] or drop.
struct Cluster {
    dir: PathBuf,
    bin_dir: PathBuf,
    report_interval: String,
    tracker: (Child, u16),
    brokers: Vec<(Option<Child>, u16)>,
}

impl Cluster {
    async fn start(
        bin_dir: &Path,
        brokers: usize,
        report_interval: &str,
    ) -> Result<Cluster, CliError> {
        let dir = std::env::temp_dir().join(format!("qbus-bench-failover-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let tracker_port = free_port()?;
        let mut tracker = Command::new(bin_dir.join("qbus-tracker"));
        tracker.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &tracker_port.to_string(),
            "--warmup",
            "0ms",
        ]);
        let tracker = (spawn(tracker, "qbus-tracker", bin_dir)?, tracker_port);
        let mut cluster = Cluster {
            dir,
            bin_dir: bin_dir.to_owned(),
            report_interval: report_interval.to_owned(),
            tracker,
            brokers: Vec::new(),
        };
        listening(tracker_port).await?;
        for i in 0..brokers {
            let port = free_port()?;
            cluster.brokers.push((None, port));
            cluster.spawn_broker(i)?;
        }
        for &(_, port) in &cluster.brokers {
            listening(port).await?;
        }
        Ok(cluster)
    }

    fn tracker_url(&self) -> String {
        format!("tracker://127.0.0.1:{}", self.tracker.1)
    }

    fn spawn_broker(&mut self, i: usize) -> Result<(), CliError> {
        let port = self.brokers[i].1;
        let mut broker = Command::new(self.bin_dir.join("qbus-broker"));
        broker
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--store")
            .arg(self.dir.join(format!("broker-{i}")))
            .args(["--tracker", &format!("127.0.0.1:{}", self.tracker.1)])
            .args(["--report-interval", &self.report_interval]);
        self.brokers[i].0 = Some(spawn(broker, "qbus-broker", &self.bin_dir)?);
        Ok(())
    }

    /// SIGKILL to broker `i`.
    fn kill(&mut self, i: usize) -> Result<(), CliError> {
        if let Some(mut child) = self.brokers[i].0.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts broker `i` again on its port and store.
    async fn restart(&mut self, i: usize) -> Result<(), CliError> {
        self.kill(i)?;
        self.spawn_broker(i)?;
        listening(self.brokers[i].1).await
    }

    fn stop(&mut self) {
        for i in 0..self.brokers.len() {
            let _ = self.kill(i);
        }
        let _ = self.tracker.0.kill();
        let _ = self.tracker.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(super) fn spawn(mut command: Command, name: &str, bin_dir: &Path) -> Result<Child, CliError> {
    command
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot start {name} from {}: {e} (build it with `cargo build --release -p qbus-broker -p qbus-tracker`, or pass --bin-dir)",
                bin_dir.display()
            ))
        })
}

pub(super) fn free_port() -> Result<u16, CliError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts connections on `port`.
pub(super) async fn listening(port: u16) -> Result<(), CliError> {
    wait_until(&format!("a server on port {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
}
